#!/usr/bin/env bash
# The main job: install, then serve the app at once on http://${DIFFIN_ADDRESS:-127.0.0.1}:${DIFFIN_PORT:-8501}
# while the sample project is copied into the workspace and scored in the app's background job
# (DIFFIN_AUTOSCORE: the methods, one run each; set it empty to skip). `diffin demo` does the
# same scoring from the command line.
source "$(dirname "$0")/_env.sh"
export DIFFIN_AUTOSCORE="${DIFFIN_AUTOSCORE-diffin,tracin,loss}"
exec streamlit run app.py --server.headless true --server.address "${DIFFIN_ADDRESS:-127.0.0.1}" \
  --server.port "${DIFFIN_PORT:-8501}" --browser.gatherUsageStats false --server.fileWatcherType none -- --workspace "${DIFFIN_WORKSPACE:-workspace}"
