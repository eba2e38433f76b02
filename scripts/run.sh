#!/usr/bin/env bash
# The main job: install, then serve the app at once on http://${DIFFIN_ADDRESS:-127.0.0.1}:${DIFFIN_PORT:-8501}
# while the sample project is copied into the workspace and scored in the app's background job
# (DIFFIN_AUTOSCORE: the methods, one run each; set it empty to skip). `diffin demo` does the
# same scoring from the command line.
#
# Serving beyond 127.0.0.1 (DIFFIN_ADDRESS=0.0.0.0) refuses to start while the workspace has no
# account (`diffin users add NAME --role admin`): a Setup upload runs its model.py on this
# server. `bash scripts/run.sh --insecure-open` (or DIFFIN_INSECURE_OPEN=1) serves without
# sign-in on purpose. docs/serving.md has the details.
source "$(dirname "$0")/_env.sh"
for arg in "$@"; do
  case "$arg" in
    --insecure-open) export DIFFIN_INSECURE_OPEN=1 ;;
    *) echo "error: unknown option $arg (scripts/run.sh takes only --insecure-open)" >&2; exit 2 ;;
  esac
done
export DIFFIN_AUTOSCORE="${DIFFIN_AUTOSCORE-diffin,tracin,loss}"
ADDRESS="${DIFFIN_ADDRESS:-127.0.0.1}"
WORKSPACE="${DIFFIN_WORKSPACE:-workspace}"
python -m diffin_core.cli serve-check --address "$ADDRESS" --workspace "$WORKSPACE" || exit $?
exec streamlit run app.py --server.headless true --server.address "$ADDRESS" \
  --server.port "${DIFFIN_PORT:-8501}" --browser.gatherUsageStats false --server.fileWatcherType none -- --workspace "$WORKSPACE"
