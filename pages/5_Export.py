"""Export a cleaned training split (review decisions applied) or a score-based subset."""
import re
import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as ui  # noqa: E402
from diffin_core.workspace import appstate
from diffin_core.workspace import export
from diffin_core.tasks import curate as tasks  # noqa: E402
from diffin_core.errors import DiffinError  # noqa: E402

project = ui.page("Export", "📦")
runs = project.runs()
log = ui.review_log(str(project.root))
counts = log.counts(len(project.train))
st.caption(f"{counts['reviewed']:,} decisions so far: {counts['excluded']:,} excluded, "
           f"{counts['relabelled']:,} relabelled, {counts['kept']:,} kept.")
k_reviewers = log.reviewers_per_sample()
if k_reviewers > 1:
    open_disagreements = len(log.disagreements())
    st.caption(f"Consensus review: {k_reviewers} reviewers per sample. A sample counts as decided when they agree "
               "or an admin resolved it; the manifest lists every vote.")
    if open_disagreements:
        st.warning(f"{open_disagreements:,} disagreements are not resolved yet: those samples are exported "
                   "undecided (kept with their given label). Resolve them on the Review page first.")

SOURCES = {"review": "Cleaned split: review decisions applied (excluded removed, relabels applied)",
           "coreset": "Task: prune to a coreset of X% (coverage-centric sampling over influence, balanced across classes)",
           "drop": "Task: drop the k most harmful samples"}
source = st.radio("What to export", list(SOURCES), format_func=SOURCES.get, key="export_source")
data_src = export.project_source(project)          # None: a folder source, written from the arrays
own = data_src.format if data_src else None
formats = (list(export.FORMATS) if project.kind == "image" else list(export.TEXT_FORMATS) if project.kind == "text"
           else ["npz", "csv", "parquet"])
if own in formats:                                 # the input's own format first: a faithful copy
    formats.remove(own)
    formats.insert(0, own)
fmt = st.selectbox("Format", formats, key="export_format",
                   format_func=lambda f: f"{f} (same as the input: byte-faithful)" if f == own else f"{f} (converted)",
                   help="Kept rows only; relabels written into the label; every decision (who, when) and the "
                        "written rows' sample ids in the .decisions.json beside it. The input's own format keeps "
                        "its arrays, dtypes, shapes, ids and column order and adds nothing; other formats convert "
                        "the stored values (uint8 stays 0-255).")
run = None
if runs:
    run = ui.run_picker(project, key="export_run", label="Scores from run",
                        default=appstate.preferred_run(runs))
elif source != "review":
    st.info("Task exports need a finished run: score the project first.")
    st.stop()
if source == "coreset":
    pct = st.slider("Keep this share of the training set (%)", 1, 100, 50, key="export_pct")
elif source == "drop":
    k = st.number_input("k (samples to drop)", 0, len(project.train), min(100, len(project.train)), key="export_k")
default_name = {"review": "clean", "coreset": "coreset", "drop": "drop-harmful"}[source]
default_name = f"{project.root.name}-{default_name}-{fmt}"
name = st.text_input("File name (without extension)", value="", placeholder=default_name, key="export_name") or default_name
ext = {"npz": ".npz", "csv": ".csv", "tsv": ".tsv", "jsonl": ".jsonl", "parquet": ".parquet", "imagefolder": ".zip"}[fmt]
out = project.root / "exports" / (re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "export")
out = out.with_name(out.name + ext)

if st.button("Write export", key="export_write", type="primary"):
    tr = project.train
    extra = {"project": project.name, "split": "train"}
    try:
        export.check_out_path(project, out)
        if run:
            sc = ui.scores(project, run)
            info = project.run(run)
            extra.update(run=run, method=info.method, settings=info.meta.get("settings", {}),
                         scores={c: sc[c].tolist() for c in ("sample_id", "label_issue", "influence") if c in sc})
        names = project.label_names or (tr.classes if project.kind == "text" else None)
        common = dict(label_names=names, image_shape=project.image_shape, source=data_src)
        if source == "review":
            extra.update(review={"reviewers_per_sample": k_reviewers, "exported_by": ui.current_user().name,
                                 "unresolved_disagreements": log.disagreements()["sample_id"].astype(int).tolist()})
            export.export_split(out, fmt, tr.x, tr.y, tr.ids, log.state(), manifest_extra=extra,
                                votes=log.votes(), num_classes=project.num_classes, **common)
        else:
            sc = ui.scores(project, run).set_index("sample_id").loc[tr.ids].reset_index()
            mask = tasks.coreset_keep(sc, pct / 100) if source == "coreset" else ~tasks.drop_most_harmful(sc, int(k))
            reason = f"coreset {pct}%" if source == "coreset" else f"drop {k} most harmful"
            export.export_subset(out, fmt, tr.x, tr.y, tr.ids, mask, reason=reason, manifest_extra=extra, **common)
        st.session_state["export_last"] = str(out)
    except DiffinError as e:
        st.error(e.brief())

last = st.session_state.get("export_last")
if last and Path(last).is_file():
    last = Path(last)
    man = export.manifest_path(last)
    st.success(f"Wrote `{last}` and its decisions manifest `{man.name}`.")
    d = st.columns(2)
    d[0].download_button(f"Download {last.name}", data=last.read_bytes, file_name=last.name, key="export_download",
                         type="primary")
    if man.is_file():
        d[1].download_button(f"Download {man.name}", data=man.read_bytes, file_name=man.name,
                             mime="application/json", key="export_download_manifest")
