"""Score the open project in the background: choose methods, watch progress, cancel."""
import sys
import time
from pathlib import Path

import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as ui  # noqa: E402
from diffin_core.tasks import methodinfo
from diffin_core.engine import precision  # noqa: E402
from diffin_core.workspace.jobs import display_order  # noqa: E402
from diffin_core.engine.adam_batches import check_text, meta_check  # noqa: E402
from diffin_core.engine.hvp import text as hvp_text  # noqa: E402
from diffin_core.methods import METHODS  # noqa: E402
from diffin_core.run.features import pass_times  # noqa: E402

project = ui.page("Score")
jm = ui.job_manager()
st.caption(f"Project: **{project.name}** · {len(project.train):,} training samples · "
           "jobs run one at a time in a background worker shared by every session, each in its own "
           "process (your model.py cannot take the app down); closing the tab does not stop them.")

methods = st.multiselect("Methods", list(METHODS), default=["diffin"], key="score_methods",
                         help="\n\n".join(f"**{k}** ({methodinfo.info(k).scale}): {methodinfo.description(k, c)}"
                                          for k, c in METHODS.items()))
for m in methods:
    i = methodinfo.info(m)
    note = ("its influence is a change of the mean query loss in nats: values add up"
            if i.calibrated else "compare its influence within this run only (the size is not a loss change)")
    st.caption(f"**{m}** · {i.scale}: {note} ({i.evidence}).")

mem_col, batch_col, hvp_col = st.columns(3)
budget_mb = mem_col.number_input("Memory budget (MB, 0 = auto)", min_value=0, value=0, step=512, key="score_budget",
                                 help="Memory the engine may use; it sets the chunk sizes, not the scores. "
                                      "Auto: half the free RAM, or 80% of the free GPU memory.")
batch = batch_col.number_input("Batch size (max samples per chunk)", min_value=1, value=256, step=32,
                               key="score_batch", help="The memory budget may choose fewer.")
hvp_mode = hvp_col.selectbox("Hessian-vector products", ["auto", "exact", "fd"], key="score_hvp",
                            help="diffin's second-order products. exact: double backward; fd: finite differences "
                                 "(one gradient each); auto: exact where finite differences are measured not "
                                 "accurate enough (Adam's replay, or a checkpoint whose first fd product is over "
                                 "1% off). What was used is recorded in the run.")

if st.button("Start scoring", key="score_start", type="primary", disabled=not methods):
    from diffin_core.methods import ScoreSettings
    root = str(project.root)
    settings = ScoreSettings(batch_size=int(batch), memory_budget=int(budget_mb) * 2**20, hvp=hvp_mode)
    ids = [jm.submit_child("score", "diffin_core.run.scoring:score", (root, m), {"settings": settings},
                           label=m, project_dir=root)
           for m in methods]
    ui.add_job_ids(ids)

history = [j for j in jm.load_history(project.root) if j.kind == "score"]
mine = set(ui.job_ids())
active = [j for j in history if j.status in ("queued", "running")]


def _progress_text(info) -> str:
    message = info.message.removeprefix(f"{info.label}: ")  # the engine names the method too
    if message.startswith("features"):   # the run is published; this is the pass after it
        message = "scores published (the run is usable); now its feature store for Explore's fast top-k: " + \
            message.removeprefix("features: ")
    if info.status == "queued":
        return f"{info.label}: queued"
    if info.in_phase:  # e.g. diffin carrying the query back through the checkpoints
        what = info.phase.removeprefix(f"{info.label}: ")  # its k may count down: show the steps done
        return f"{info.label}: {what} ({info.step} of {info.steps} done)"
    if not info.done:
        return f"{info.label}: {message or 'starting'}"
    eta = f" · about {ui.fmt_seconds(info.eta_s)} left" if info.eta_s is not None else ""
    return f"{info.label}: {message} · {info.done:,}/{info.total or 0:,} samples · {info.rate:,.0f}/s{eta}"


@st.fragment(run_every=1.0 if active else None)
def progress_panel():
    recent = time.time() - 300  # jobs that ended in the last 5 minutes show in every tab
    jobs = display_order([jm.get(j.id) or j for j in history
                          if j.id in mine or j.status in ("queued", "running") or (j.finished or 0) > recent])[:8]
    still = False
    for info in jobs:
        if info.status in ("queued", "running"):
            still = True
            cols = st.columns([5, 1])
            cols[0].progress(info.fraction, text=_progress_text(info))
            if cols[1].button("Cancel", key=f"score_cancel_{info.id}", icon=":material/cancel:"):
                jm.cancel(info.id)
                ui.add_job_ids([info.id])
        elif info.status == "failed" and info.timed_out:     # jobs.TimeLimit stopped it
            st.error(f"{info.label}: stopped at its time limit: {info.error}", icon=":material/timer_off:")
        elif info.status == "failed":
            st.error(f"{info.label}: scoring failed: {info.error}", icon=":material/error:")
        elif info.status == "cancelled":
            st.warning(f"{info.label}: cancelled", icon=":material/cancel:")
        elif info.status == "done":
            st.success(f"{info.label}: done in {ui.fmt_seconds((info.finished or 0) - (info.started or 0))}",
                       icon=":material/check_circle:")
    if active and not still:
        st.rerun()  # a job ended: redraw the whole page (runs list, no more ticking)


progress_panel()

st.subheader("Finished runs")
runs = project.runs()
if not runs:
    st.write("None yet. A run is named after its method: diffin-1, then diffin-2, …")
else:
    def _took(r) -> dict:
        """Scores published after X; the feature store (Explore's fast top-k) ready after Y."""
        t = pass_times(r.path, r.meta)
        features = (ui.fmt_seconds(t["features_s"]) if t["features_s"] is not None else
                    f"{ui.fmt_seconds(t['features_own_s'])} (built separately)" if t["separate"] else "no store")
        return {"scores published after": ui.fmt_seconds(t["scores_s"]), "features ready after": features}

    rows = [{"run": r.name, "method": r.method, "scale": methodinfo.info(r.method).scale,
             **_took(r), "device": r.meta.get("device"),
             "checkpoints": r.meta.get("checkpoints"), "train size": r.meta.get("train_size"),
             "finished": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.meta.get("finished", 0))),
             "settings": " · ".join(filter(None, [methodinfo.settings_text(r.method, r.meta.get("settings", {})),
                                                    precision.summary(r.meta.get("precision"))])),
             "checks": " · ".join(filter(None, [check_text(meta_check(r.meta)),
                                                hvp_text(r.meta.get("hvp") or {}) if len(r.meta.get("hvp") or {}) > 1
                                                else ""]))} for r in runs]
    st.dataframe(pd.DataFrame(rows), key="score_runs", hide_index=True, width="stretch")
    for r in runs:                  # what each run's estimate approximates of the training recipe
        failed = (meta_check(r.meta) or {}).get("message")    # a failed self-check: a warning, not a caption
        if failed:
            st.warning(f"{r.name}: {failed}", icon=":material/warning:")
        for entry in r.meta.get("approximations") or []:
            if entry != failed:
                st.caption(f"{r.name} approximates: {entry}")
    ui.page_link("pages/3_Explore.py", "Next: explore")
    ui.page_link("pages/4_Review.py", "Next: review suspects")
