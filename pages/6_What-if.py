"""What-if: choose samples to remove, see the predicted change of the query loss, verify by retraining."""
import sys
from pathlib import Path

import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as ui  # noqa: E402
from diffin_core import tasks  # noqa: E402

project = ui.page("What-if", "🧪", "What-if: remove samples, predict, verify")
run = ui.chosen_run(project, key="whatif_run")
scores = ui.scores(project, run)
jm = ui.job_manager()

SOURCES = ["the k most harmful", "the samples excluded in review", "the map's lasso selection (Explore)"]
source = st.radio("Remove", SOURCES, key="whatif_source", horizontal=True)
if source == SOURCES[0]:
    k = st.number_input("k", 1, max(1, len(scores) - 1), min(20, len(scores) - 1), key="whatif_k")
    ids = scores["sample_id"].to_numpy()[tasks.drop_most_harmful(scores, int(k))].tolist()
elif source == SOURCES[1]:
    state = ui.review_log(str(project.root)).state()
    ids = state.index[state["action"] == "exclude"].tolist()
else:
    ids = list(st.session_state.get("explore_selected_ids", []))

predicted = tasks.predicted_loss_change(scores, ids)
c = st.columns(3)
c[0].metric("Samples to remove", f"{len(ids):,}")
c[1].metric("Predicted change of the mean query loss", f"{predicted:+.4f} nats",
            help="Sum of the removed samples' influence (influence = query loss without z minus with z).")
c[2].metric("Direction", "query loss falls" if predicted < 0 else "query loss rises" if predicted > 0 else "no change")

if not project.recipe:
    st.info("Add `[train] recipe = \"train.py:train\"` to diffin.toml to verify predictions by retraining.")
else:
    job_id = st.session_state.get("whatif_job")
    job = jm.get(job_id) if job_id else None
    busy = job is not None and job.status in ("queued", "running")
    if st.button("Verify by retraining", key="whatif_verify", type="primary", disabled=busy or not ids):
        root, chosen = str(project.root), list(ids)
        st.session_state["whatif_job"] = jm.submit(
            "whatif", lambda p: tasks.verify_by_retraining(ui.open_project(root), chosen, run=run,
                                                           progress=p.update),
            label=f"verify: remove {len(chosen)} from {run}", project_dir=root)
        st.rerun()

    @st.fragment(run_every=1.0 if busy else None)
    def verify_progress():
        info = jm.get(st.session_state.get("whatif_job", "")) if st.session_state.get("whatif_job") else None
        if info is None:
            return
        if info.status in ("queued", "running"):
            st.progress(info.fraction, text=f"{info.status}: {info.message}")
        elif info.status == "failed":
            st.error(f"Retraining failed: {info.error}")
        if busy and info.status not in ("queued", "running"):
            st.rerun()
    verify_progress()

results = tasks.whatif_results(project, run)
if results:
    st.subheader("Predicted vs actual (retrained with the project's recipe)")
    table = pd.DataFrame([{
        "removed": r["n_removed"], "predicted Δ loss": r["predicted_loss_change"],
        "actual Δ loss": r["actual_loss_change"], "actual Δ accuracy": r["actual_accuracy_change"],
        "loss before": r["before"]["loss"], "loss after": r["after"]["loss"],
        "seconds": r["seconds"], "seed": r["seed"]} for r in results])
    st.dataframe(table, key="whatif_results", hide_index=True, width="stretch")
