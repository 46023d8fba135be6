#!/usr/bin/env bash
# The web client in a real browser: builds the server, installs
# playwright-core (never a browser: Debian's chromium is used), and runs
# browser.test.mjs. Screenshots go to $SCREENSHOT_DIR
# (default target/browser-screenshots).
#
# Needs /usr/bin/chromium (apt-get install chromium fonts-noto-color-emoji);
# .ci/run installs it.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

if [ ! -x "${CHROMIUM:-/usr/bin/chromium}" ]; then
  echo "browser test: no chromium at ${CHROMIUM:-/usr/bin/chromium}; install it with apt-get install chromium" >&2
  exit 1
fi
cargo build -q --locked -p chat-server
export CHAT_SERVER_BIN="$root/target/debug/chat-server"
export SCREENSHOT_DIR="${SCREENSHOT_DIR:-$root/target/browser-screenshots}"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
cd tests/browser
npm ci --no-audit --no-fund --loglevel=error
node --test --test-reporter=spec browser.test.mjs
echo "screenshots: $SCREENSHOT_DIR"
