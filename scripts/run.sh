#!/usr/bin/env bash
# The main job: install, score the sample project (diffin demo), serve the app on :8501.
source "$(dirname "$0")/_env.sh"
diffin demo --workspace "${DIFFIN_WORKSPACE:-workspace}"
exec streamlit run app.py --server.headless true --server.address "${DIFFIN_ADDRESS:-127.0.0.1}" \
  --server.port "${DIFFIN_PORT:-8501}" --browser.gatherUsageStats false -- --workspace "${DIFFIN_WORKSPACE:-workspace}"
