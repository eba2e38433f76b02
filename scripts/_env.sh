# Shared by scripts/run.sh and scripts/test.sh: a .venv with torch and diffin installed.
# torch: machines with an NVIDIA GPU get pip's default (CUDA) build; others get the CPU build
# pinned to 2.13.0 (on the dev machines it installs from local disk). Override with
# DIFFIN_TORCH="torch==X.Y" (or DIFFIN_TORCH=skip to keep the torch you have).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if [ -z "${DIFFIN_TORCH:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then DIFFIN_TORCH="torch"; else DIFFIN_TORCH="torch==2.13.0"; fi
fi
if [ "$DIFFIN_TORCH" != skip ]; then
  python -c "import torch" 2>/dev/null || pip install -q "$DIFFIN_TORCH"
fi
pip install -q -e ".[test]"
