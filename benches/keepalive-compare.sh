#!/usr/bin/env bash
# Keep-alive plain HTTP throughput of two server builds, side by side:
# rounds interleaved, 8 keep-alive connections from one address asking for
# /healthz (the cheapest route, so any per-request cost shows most), with
# wrk (`apt-get install wrk`). Prints requests per second per round and the
# medians.
#
# Usage: benches/keepalive-compare.sh BINARY_A BINARY_B [rounds, default 5]
set -euo pipefail
a=$1 b=$2 rounds=${3:-5}
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)"; exit 2; }
declare -A runs
for round in $(seq "$rounds"); do
  for bin in "$a" "$b"; do
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    RUST_LOG=warn "$bin" --in-memory --listen "127.0.0.1:$port" >/dev/null 2>&1 &
    pid=$!
    for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    rps=$(wrk -t1 -c8 -d8s "http://127.0.0.1:$port/healthz" | awk '/Requests\/sec/ {print $2}')
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "round $round  $bin  $rps req/s"
    runs[$bin]+="$rps "
  done
done
for bin in "$a" "$b"; do
  echo "median $bin  $(echo ${runs[$bin]} | tr ' ' '\n' | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}') req/s"
done
