"""What-if: choose samples to remove, see the predicted change of the query loss, verify by paired retraining."""
import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as ui  # noqa: E402
from diffin_core.tasks import lds
from diffin_core.tasks import curate as tasks  # noqa: E402

project = ui.page("What-if", "🧪", "What-if: remove samples, predict, verify")
run = ui.chosen_run(project, key="whatif_run")
scores = ui.scores(project, run)
jm = ui.job_manager()
method = project.run(run).method

SOURCES = ["the k most harmful", "the samples excluded in review", "a saved selection (Explore's lasso)"]
source = st.radio("Remove", SOURCES, key="whatif_source", horizontal=True)
if source == SOURCES[0]:
    k = st.number_input("k", 1, max(1, len(scores) - 1), min(20, len(scores) - 1), key="whatif_k")
    ids = scores["sample_id"].to_numpy()[tasks.drop_most_harmful(scores, int(k))].tolist()
elif source == SOURCES[1]:
    state = ui.review_log(str(project.root)).state()
    ids = state.index[state["action"] == "exclude"].tolist()
else:
    ids = ui.pick_selection(project, key="whatif_selection")  # named selections (selections.json)

predicted = tasks.predicted_loss_change(scores, ids)
c = st.columns(3)
c[0].metric("Samples to remove", f"{len(ids):,}")
c[1].metric("Predicted change of the mean query loss", f"{predicted:+.4f} nats",
            help="Sum of the removed samples' influence (influence = query loss without z minus with z).")
c[2].metric("Direction", "query loss falls" if predicted < 0 else "query loss rises" if predicted > 0 else "no change")

known = lds.known_lds(method, project.root)
if known:
    st.caption(f"How far to trust {method}'s predictions: linear datamodeling score (LDS, Spearman between "
               "predicted and retrained query-loss change over random 50% subsets; 1 = perfect) "
               + "; ".join(f"{r['lds_mean']:.2f} ± {r['lds_std']:.2f} on {r['model']} ({r['source']})" for r in known) + ".")
else:
    st.caption(f"No linear datamodeling score is known for {method}.")

if not project.recipe:
    st.info("Add `[train] recipe = \"train.py:train\"` to diffin.toml to verify predictions by retraining.")
else:
    job_id = st.session_state.get("whatif_job")
    job = jm.get(job_id) if job_id else None
    busy = job is not None and job.status in ("queued", "running")
    n_seeds = st.number_input("Seeds (paired retrains with and without the selection)", 1, 10, 3, key="whatif_seeds",
                              help="Each seed trains twice with the same init and batch order, once with and once "
                                   "without the selection; 3 or more seeds show whether the change is above the "
                                   "retrain noise.")
    if st.button("Verify by retraining", key="whatif_verify", type="primary", disabled=busy or not ids):
        root, chosen, seeds = str(project.root), list(ids), list(range(int(n_seeds)))
        st.session_state["whatif_job"] = jm.submit_child(  # train.py runs in a child process
            "whatif", "diffin_core.tasks.curate:verify_by_retraining", (root, chosen), {"run": run, "seeds": seeds},
            label=f"verify: remove {len(chosen)} from {run}, {len(seeds)} seeds", project_dir=root)
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
    latest = results[0]
    st.subheader(f"Latest verification: {latest['n_removed']} removed, {len(latest.get('seeds', [0]))} paired seeds")
    show = {"confirmed": st.success, "size off": st.info, "inside noise": st.info}.get(latest.get("verdict"), st.warning)
    show(latest.get("verdict_text", "One seed only: the retrain noise is unknown."))
    st.dataframe(tasks.per_seed_table(latest), key="whatif_per_seed", hide_index=True, width="stretch")
    st.subheader("All verifications (predicted vs paired retrains)")
    st.dataframe(tasks.whatif_table(results), key="whatif_results", hide_index=True, width="stretch")
