#!/usr/bin/env bash
# Install everything the tests need (chromium for the browser test, a .venv) and run them all.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
source "$(dirname "$0")/_env.sh"
python -m pytest -q "$@"
