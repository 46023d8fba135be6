#!/usr/bin/env bash
# How long a cluster node takes to catch up: a node fills the stream with
# 10,000 messages (through chat-loadgen), then a second node starts, and we
# time from its spawn to its /healthz answering 200 (it serves only once it
# has applied and published everything the stream held). Three ways:
# reading the whole stream (snapshots off), from the cluster's newest
# snapshot (the default, one every 1,000 entries), and from the node's own
# snapshot in its data directory (it ran once, was stopped, and restarts).
# Needs nats-server on PATH.
#
# Usage: benches/cluster-catchup.sh [messages, default 10000] [runs, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
messages=${1:-10000}
runs=${2:-3}
cargo build --release -q -p chat-server -p chat-loadgen
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 600); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.01; done; return 1; }
# A node binds at once and answers /healthz 503 while it catches up.
wait_serving() {
  python3 - "$1" <<'PY'
import sys, time, urllib.request, urllib.error
url = f"http://127.0.0.1:{sys.argv[1]}/healthz"
for _ in range(6000):
    try:
        if urllib.request.urlopen(url, timeout=1).status == 200:
            sys.exit(0)
    except (urllib.error.URLError, ConnectionError, OSError):
        pass
    time.sleep(0.005)
sys.exit(1)
PY
}
flags=(--identity raw-ip --message-rate 1000000 --max-connections-per-ip 1000 --history-limit "$messages")
for mode in "whole stream:1000000000" "from the cluster's snapshot:1000" "from its own snapshot:1000000000"; do
  label=${mode%%:*}; every=${mode##*:}
  # Node b keeps no data directory, except when it restarts from its own.
  own=false; [[ $label == "from its own snapshot" ]] && own=true
  times=()
  for run in $(seq "$runs"); do
    store=$(mktemp -d); nport=$(free_port)
    nats-server -js -a 127.0.0.1 -p "$nport" -sd "$store" >/dev/null 2>&1 & nats=$!
    wait_port "$nport"
    aport=$(free_port)
    RUST_LOG=warn target/release/chat-server --listen "127.0.0.1:$aport" --cluster "nats://127.0.0.1:$nport" \
      --in-memory --cluster-snapshot-every "$every" "${flags[@]}" 2>/dev/null & a=$!
    wait_port "$aport"
    target/release/chat-loadgen --url "ws://127.0.0.1:$aport/ws" --json connect --clients 1 \
      --history "$messages" --prefill-senders 20 >/dev/null 2>&1
    sleep 1 # the last snapshot is stored in the background
    bport=$(free_port)
    bdir=$(mktemp -d)
    bflags=(--in-memory)
    if $own; then
      # A first run catches up and, stopped, writes its own snapshot.
      bflags=(--data-dir "$bdir")
      RUST_LOG=warn target/release/chat-server --listen "127.0.0.1:$bport" --cluster "nats://127.0.0.1:$nport" \
        "${bflags[@]}" --cluster-snapshot-every "$every" "${flags[@]}" 2>/dev/null & b=$!
      wait_serving "$bport"
      kill -TERM "$b"; wait "$b" 2>/dev/null || true
      test -s "$bdir"/cluster-chat.snapshot.json
    fi
    start=$(date +%s.%N)
    RUST_LOG=warn target/release/chat-server --listen "127.0.0.1:$bport" --cluster "nats://127.0.0.1:$nport" \
      "${bflags[@]}" --cluster-snapshot-every "$every" "${flags[@]}" 2>/dev/null & b=$!
    wait_serving "$bport"
    end=$(date +%s.%N)
    times+=("$(python3 -c "print(round($end - $start, 3))")")
    kill "$a" "$b" "$nats"; wait "$a" "$b" "$nats" 2>/dev/null || true
    rm -rf "$store" "$bdir"
  done
  median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (runs + 1) / 2 ))p")
  echo "$label ($messages messages): ${times[*]} s; median $median s"
done
