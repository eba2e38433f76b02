"""Score the open project in the background: choose methods, watch progress, cancel."""
import json
import sys
import time
from pathlib import Path

import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as ui  # noqa: E402
from diffin_core.methods import METHODS  # noqa: E402
from diffin_core.scoring import score  # noqa: E402

project = ui.page("Score", "⚡")
jm = ui.job_manager()
st.caption(f"Project: **{project.name}** · {len(project.train):,} training samples · "
           "jobs run one at a time in a background worker shared by every session; closing the tab "
           "does not stop them.")

DESCRIBE = {name: ((cls.__doc__ or "").strip().splitlines() or [""])[0] for name, cls in METHODS.items()}
methods = st.multiselect("Methods", list(METHODS), default=["diffin"], key="score_methods",
                         help="\n\n".join(f"**{k}**: {v}" for k, v in DESCRIBE.items() if v))


def _job(root: str, method: str):
    return lambda progress: str(score(root, method, progress=progress.update))


if st.button("Start scoring", key="score_start", type="primary", disabled=not methods):
    ids = [jm.submit("score", _job(str(project.root), m), label=m, project_dir=project.root) for m in methods]
    ui.add_job_ids(ids)
    st.session_state["score_watch"] = True

history = [j for j in jm.load_history(project.root) if j.kind == "score"]
mine = set(ui.job_ids())
active = [j for j in history if j.status in ("queued", "running")]


@st.fragment(run_every=1.0 if active else None)
def progress_panel():
    recent = time.time() - 300  # jobs that ended in the last 5 minutes show in every tab
    jobs = [jm.get(j.id) or j for j in history
            if j.id in mine or j.status in ("queued", "running") or (j.finished or 0) > recent][:8]
    still = False
    for info in jobs:
        if info.status in ("queued", "running"):
            still = True
            rate = f"{info.rate:,.0f} samples/s" if info.rate else "starting"
            eta = f"ETA {ui.fmt_seconds(info.eta_s)}" if info.eta_s is not None else ""
            text = f"{info.label}: {info.status} · {info.done:,}/{info.total or 0:,} · {rate} · {eta} · {info.message}"
            cols = st.columns([5, 1])
            cols[0].progress(info.fraction, text=text)
            if cols[1].button("Cancel", key=f"score_cancel_{info.id}"):
                jm.cancel(info.id)
                ui.add_job_ids([info.id])
        elif info.status == "failed":
            st.error(f"{info.label}: scoring failed: {info.error}")
        elif info.status == "cancelled":
            st.warning(f"{info.label}: cancelled")
        elif info.status == "done":
            st.success(f"{info.label}: done in {ui.fmt_seconds((info.finished or 0) - (info.started or 0))}")
    if active and not still:
        st.rerun()  # a job ended: redraw the whole page (runs list, no more ticking)


progress_panel()

st.subheader("Finished runs")
runs = project.runs()
if not runs:
    st.write("None yet.")
else:
    rows = [{"run": r.name, "method": r.method, "seconds": r.meta.get("seconds"), "device": r.meta.get("device"),
             "checkpoints": r.meta.get("checkpoints"), "train size": r.meta.get("train_size"),
             "finished": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.meta.get("finished", 0))),
             "settings": json.dumps(r.meta.get("settings", {}))} for r in runs]
    st.dataframe(pd.DataFrame(rows), key="score_runs", hide_index=True, width="stretch")
    st.page_link("pages/3_Explore.py", label="Next: explore", icon="🧭")
    st.page_link("pages/4_Review.py", label="Next: review suspects", icon="✅")
