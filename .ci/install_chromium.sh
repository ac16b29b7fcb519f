#!/bin/sh
# Install Debian's `chromium` (used headless by tests/report/test_chromium.py) when it is missing.
# Idempotent and quiet: exits at once when `chromium` is on PATH; prints apt's log only on failure.
set -e
command -v chromium >/dev/null 2>&1 && exit 0
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_chromium.sh: apt-get install chromium failed" >&2
    exit 1
fi
command -v chromium >/dev/null 2>&1
