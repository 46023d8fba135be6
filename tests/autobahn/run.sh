#!/usr/bin/env bash
# WebSocket conformance: runs the Autobahn|Testsuite fuzzing client against
# the server in `--echo` mode (same handshake, WebSocketConfig, limits and
# close handling as chat), and compares every case's result with
# tests/autobahn/expected.json. Fails on any unexpected result.
#
# The suite needs Python 2.7 (this machine kind ships it under pyenv).
# Without it this script says so and skips, except in CI (CI=true), where a
# conformance run that did not happen must not pass for one that did.
# Usage: tests/autobahn/run.sh [--update]   (--update rewrites expected.json)
set -euo pipefail
cd "$(dirname "$0")/../.."
here=tests/autobahn

py=""
for candidate in python2.7 "$HOME/.pyenv/versions/2.7.18/bin/python2.7"; do
  if "$candidate" -c 'import sys; assert sys.version_info[0] == 2' >/dev/null 2>&1; then
    py=$(command -v "$candidate" || echo "$candidate")
    break
  fi
done
if [ -z "$py" ]; then
  if [ -n "${CI:-}" ]; then
    echo "autobahn: FAILED: no Python 2.7 on this machine, which the suite needs"
    exit 1
  fi
  echo "autobahn: SKIPPED: no Python 2.7 on this machine, which the suite needs"
  exit 0
fi
export PYENV_VERSION=2.7.18
if ! "$py" -c 'import autobahntestsuite' >/dev/null 2>&1; then
  "$py" -m pip install -q autobahntestsuite
fi
wstest=$("$py" -c 'import sys, os; print(os.path.join(os.path.dirname(os.path.realpath(sys.executable)), "wstest"))')

cargo build --release -q -p chat-server
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
./target/release/chat-server --echo --in-memory --listen "127.0.0.1:$port" >/dev/null 2>&1 &
server=$!
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

cat >"$work/fuzzingclient.json" <<JSON
{
  "outdir": "$work/reports",
  "servers": [{"agent": "chat-server", "url": "ws://127.0.0.1:$port/ws"}],
  "cases": ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"],
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
JSON
(cd "$work" && "$wstest" -m fuzzingclient -s fuzzingclient.json >"$work/wstest.log" 2>&1) || {
  tail -30 "$work/wstest.log"; echo "autobahn: the suite itself failed"; exit 1; }
python3 "$here/compare.py" "$work/reports/index.json" "$here/expected.json" "${1:-}"
