#!/usr/bin/env bash
# The chaos test (crates/chat-server/tests/chaos) beyond what CI runs.
#
#   benches/chaos.sh seeds N [SECS]   N runs with fresh seeds, SECS of faults
#                                     per NATS shape each (default 180)
#   benches/chaos.sh planted [SEED [NAME]]
#                                     proof that the test bites: each bug in
#                                     benches/chaos-planted/ applied to a copy
#                                     of this tree, and the test run on it with
#                                     SEED (default 2: its schedule has a lost
#                                     tail); every one must fail
#
# Needs what the cluster tests need: nats-server on PATH (or
# NATS_SERVER_BIN) and nginx. A failing seed is printed; replay it with
# CHAOS_SEED=<seed> cargo test -p chat-server --test chaos -- --nocapture
set -euo pipefail
cd "$(dirname "$0")/.."
export NATS_SERVER_BIN=${NATS_SERVER_BIN:-$(command -v nats-server)}

run() { # extra cargo args...
  cargo test -q -p chat-server --test chaos "$@" -- --nocapture 2>&1 \
    | grep -E '^chaos|problem|^  \[|test result' | cut -c1-600
}

case "${1:-}" in
  seeds)
    n=${2:?how many seeds}
    export CHAOS_SECS=${3:-180}
    failed=0
    for i in $(seq 1 "$n"); do
      echo "== run $i of $n"
      out=$(run) || true
      echo "$out"
      grep -q "test result: ok" <<<"$out" || failed=$((failed + 1))
    done
    echo "chaos: $failed of $n runs failed"
    [ "$failed" -eq 0 ]
    ;;
  planted)
    export CHAOS_SEED=${2:-2}
    export CHAOS_SECS=${CHAOS_SECS:-20}
    tree=$(mktemp -d "${TMPDIR:-/tmp}/chaos-planted.XXXXXX")
    target=${CARGO_TARGET_DIR:-$PWD/target}/chaos-planted
    trap 'rc=$?; git worktree remove --force "$tree/src" 2>/dev/null || true; git worktree prune; rm -rf "$tree"; exit $rc' EXIT
    missed=0
    for bug in benches/chaos-planted/${3:-*}.patch; do
      name=$(basename "$bug" .patch)
      rm -rf "$tree/src"
      git worktree add -q -f "$tree/src" HEAD
      git -C "$tree/src" apply "$PWD/$bug"
      echo "== planted: $name (seed $CHAOS_SEED)"
      out=$(cd "$tree/src" && CARGO_TARGET_DIR=$target run) || true
      echo "$out"
      # Caught only if the test ran and failed: a tree that does not
      # build proves nothing.
      if grep -q "test result: FAILED" <<<"$out"; then
        echo "chaos: caught $name"
      else
        echo "chaos: MISSED $name (or it did not build)"
        missed=$((missed + 1))
      fi
      git worktree remove --force "$tree/src"
    done
    rm -rf "$tree"
    [ "$missed" -eq 0 ]
    ;;
  *)
    sed -n '2,15p' "$0"
    exit 2
    ;;
esac
