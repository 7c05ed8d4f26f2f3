#!/usr/bin/env bash
# Optional: headless Chromium for tests/test_web.py (the web page in a real browser). Without it
# those browser tests are skipped with a reason; nothing else needs it. Debian/Ubuntu only;
# tolerates failure (no apt-get, no root, no network) so CI can call it unconditionally.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium: no apt-get here; the browser tests will be skipped" >&2
  exit 0
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 && SUDO="sudo -n" || { echo "install_chromium: not root; skipped" >&2; exit 0; }
fi
export DEBIAN_FRONTEND=noninteractive
{ $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium; } >&2 \
  || echo "install_chromium: apt-get failed; the browser tests will be skipped" >&2
exit 0
