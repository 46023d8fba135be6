#!/usr/bin/env bash
# Soak and abuse against the real server binary: ordinary clients chat while
# clients that never read, slowloris connections, a connection flood from one
# address and junk senders attack, and plain HTTP clients load the page,
# /whoami and /metrics (with an oversized head now and then). Passes only if
# the chatters lost nothing, every HTTP answer was right, the server's memory
# stayed flat after warm-up and its file descriptors went back to their idle
# count once the clients left, every abuser was refused or dropped, and the
# server still answers at the end.
#
# Usage: benches/soak.sh [duration, default 10m]   (CI runs it for 60s)
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10m}
cargo build --release -q -p chat-server -p chat-loadgen
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# Small limits so that each abuser meets its bound within a short run, and a
# small history so that memory reaches its steady state during warm-up.
RUST_LOG=warn ./target/release/chat-server --listen "127.0.0.1:$port" --in-memory \
  --history-limit 500 --log-events 256 --write-timeout 2s --handshake-timeout 2s \
  --max-connections-per-ip 16 --message-rate 120 2>"${SOAK_SERVER_LOG:-/dev/null}" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
status=0
./target/release/chat-loadgen --url "ws://127.0.0.1:$port/ws" --server-pid "$server" \
  --note="--history-limit 500 --log-events 256 --write-timeout 2s --handshake-timeout 2s --max-connections-per-ip 16 --message-rate 120" \
  soak --duration "$duration" --chatters 50 --send-every 1s --non-readers 3 --slowloris 10 --flood 40 --junk 2 --browsers 4 \
  || status=$?
kill -TERM $server
wait $server || true
trap - EXIT
if [ "$status" -ne 0 ]; then echo "soak: FAILED"; else echo "soak: passed"; fi
exit "$status"
