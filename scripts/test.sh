#!/usr/bin/env bash
# Install everything the tests need (chromium for the browser test, a .venv) and run them all.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
source "$(dirname "$0")/_env.sh"
# Test against the newest streamlit that pyproject.toml allows: an existing .venv keeps whatever it
# had, so upgrade within the bound (a fresh .venv already has the newest). Without a reachable
# package index the installed release is tested, and the warning says which.
ST_SPEC=$(grep -o '"streamlit[^"]*"' pyproject.toml | head -1 | tr -d '"')
pip install -q --upgrade "$ST_SPEC" \
  || echo "warning: could not upgrade to the newest $ST_SPEC; testing the installed one" >&2
echo "streamlit $(python -c 'import streamlit; print(streamlit.__version__)') (allowed: $ST_SPEC)"
python -m pytest -q "$@"
