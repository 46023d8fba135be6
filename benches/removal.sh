#!/usr/bin/env bash
# How long a moderator's removal takes to reach every client (issue 23):
# chat-loadgen's `removal` scenario against one node, then against three
# nodes of one cluster (one nats-server -js; the clients spread over the
# nodes, the removal asked of the first). Release builds.
#
#   benches/removal.sh [CLIENTS] [REMOVALS]      default 1000 and 20
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-1000}
removals=${2:-20}
cargo build -q --release -p chat-server -p chat-loadgen
bin=target/release
work=$(mktemp -d "${TMPDIR:-/tmp}/removal.XXXXXX")
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
key=$(head -c 32 /dev/urandom | base64)
printf 'bench %s\n' "$key" > "$work/keys"
chmod 600 "$work/keys"
export CHAT_ADMIN_KEY=$key
flags=(--in-memory --identity raw-ip --message-rate 1000000 --max-connections-per-ip 1000
       --max-connections 20000 --admin-keys-file "$work/keys")
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
healthy() { for _ in $(seq 200); do curl -sf "http://127.0.0.1:$1/healthz" >/dev/null && return; sleep 0.05; done; echo "node on $1 never served" >&2; exit 1; }

echo "== one node, $clients clients, $removals removals"
p=$(port)
RUST_LOG=warn "$bin/chat-server" --listen "127.0.0.1:$p" "${flags[@]}" & pids+=($!)
healthy "$p"
"$bin/chat-loadgen" --url "ws://127.0.0.1:$p/ws" --json removal --clients "$clients" --removals "$removals" 2>/dev/null | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["results"]))'
kill "${pids[@]}"; wait 2>/dev/null || true; pids=()

echo "== three nodes, one nats-server, $clients clients spread, $removals removals"
np=$(port)
nats-server -js -a 127.0.0.1 -p "$np" -sd "$work/nats" >/dev/null 2>&1 & pids+=($!)
sleep 0.5
urls=()
for n in a b c; do
  p=$(port)
  RUST_LOG=warn "$bin/chat-server" --listen "127.0.0.1:$p" "${flags[@]}" --cluster "nats://127.0.0.1:$np" --node-id "$n" & pids+=($!)
  healthy "$p"
  urls+=("ws://127.0.0.1:$p/ws")
done
"$bin/chat-loadgen" --url "$(IFS=,; echo "${urls[*]}")" --json removal --clients "$clients" --removals "$removals" 2>/dev/null | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["results"]))'
