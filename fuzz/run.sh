#!/usr/bin/env bash
# Runs every fuzz target for a given time and prints how many inputs each
# survived. Needs a nightly toolchain and cargo-fuzz:
#   rustup toolchain install nightly && cargo install cargo-fuzz
# Usage: fuzz/run.sh [seconds per target, default 300]
#        TARGETS="decode handshake" fuzz/run.sh 600
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-300}
for target in ${TARGETS:-decode core_sequence handshake http_head}; do
  mkdir -p "corpus/$target"
  log=$(mktemp)
  # The corpus grows in corpus/ (not committed); seeds/ is the committed start.
  cargo +nightly fuzz run -O "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1 || { tail -50 "$log"; echo "$target: CRASH"; exit 1; }
  runs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}')
  rate=$(grep -E '^stat::average_exec_per_sec' "$log" | awk '{print $2}')
  echo "$target: $runs executions in ${secs}s ($rate/s), no crash"
  rm -f "$log"
done
