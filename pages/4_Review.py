"""Review likely-mislabelled samples: keep, relabel, exclude, undo; every click is logged at once."""
import os
import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as ui  # noqa: E402
from diffin_core import appstate  # noqa: E402
from diffin_core.errors import DiffinError  # noqa: E402

project = ui.page("Review", "✅", "Review suspects")
run = ui.chosen_run(project, key="review_run", label="Queue ranked by the label_issue of run")
method = project.run(run).method
scores = ui.scores(project, run)
log = ui.review_log(str(project.root))
user = st.sidebar.text_input("Reviewer name", value=os.environ.get("USER", "reviewer"), key="review_user")
labels = list(range(project.num_classes))


def act(sample_ids, action, new_label=None):
    """Button callback: write the decision(s), then the page redraws with the next sample."""
    try:
        log.decide_many([int(s) for s in sample_ids], action, new_label=new_label, user=user, run=run, method=method)
    except DiffinError as e:
        st.session_state["review_error"] = str(e)
    for key in ("review_new_label", "review_bulk_ids", "review_top_n"):
        st.session_state.pop(key, None)


def relabel_suggested(sample_ids, preds):
    for s in sample_ids:
        act([s], "relabel", int(preds[s]))


def undo():
    sid = log.undo(user=user)
    st.session_state["review_note"] = f"Undid the last decision on sample {sid}." if sid is not None else "Nothing to undo."
    st.session_state.pop("review_new_label", None)


state = log.state()
counts = log.counts(len(scores))
c = st.columns(5)
c[0].metric("Reviewed", counts["reviewed"])
c[1].metric("Remaining", counts["remaining"])
c[2].metric("Excluded", counts["excluded"])
c[3].metric("Relabelled", counts["relabelled"])
noisy = appstate.noisy_ids(scores)
if noisy is not None:
    prec = log.precision(noisy)
    c[4].metric("Precision (truly mislabelled)", "–" if prec is None else f"{prec:.0%}",
                help="Share of excluded or relabelled samples whose label really was wrong (known for the sample project).")

for key in ("review_error", "review_note"):
    if key in st.session_state:
        (st.error if key == "review_error" else st.info)(st.session_state.pop(key))

queue = scores[~scores["sample_id"].isin(state.index)].sort_values("label_issue", ascending=False, kind="stable")
if queue.empty:
    st.success("Every sample has a decision.")
else:
    cur = queue.iloc[0]
    sid, given, pred = int(cur["sample_id"]), int(cur["label"]), int(cur["pred"])
    st.subheader(f"Sample {sid}")
    left, right = st.columns([1, 2])
    with left:
        ui.show_sample(project, sid, width=220)
    with right:
        st.markdown(f"**Given label:** {ui.label_name(project, given)}  \n"
                    f"**Suggested label (model's prediction):** {ui.label_name(project, pred)} "
                    f"({cur['confidence']:.0%} confident)")
        st.caption(f"label_issue {cur['label_issue']:.4g} · influence {cur['influence']:.4g} · "
                   f"self-influence {cur['self_influence']:.4g} · loss {cur['loss']:.4g}  ({method})")
        b = st.columns(4)
        b[0].button("Keep", key="review_keep", on_click=act, args=([sid], "keep"), width="stretch")
        b[1].button("Exclude", key="review_exclude", on_click=act, args=([sid], "exclude"), width="stretch")
        b[3].button("Undo", key="review_undo", on_click=undo, width="stretch")
        if "review_new_label" not in st.session_state:
            st.session_state["review_new_label"] = pred
        new = st.selectbox("Relabel to", labels, key="review_new_label", format_func=lambda y: ui.label_name(project, y))
        b[2].button(f"Relabel to {ui.label_name(project, new)}", key="review_relabel", on_click=act, args=([sid], "relabel", int(new)),
                    width="stretch", type="primary")

    st.subheader("Bulk actions")
    page = queue.head(200)[["sample_id", "label", "pred", "confidence", "label_issue"]].reset_index(drop=True)
    picked = st.dataframe(page, key="review_table", on_select="rerun", selection_mode="multi-row", hide_index=True)
    rows = list(getattr(picked, "selection", {}).get("rows", [])) if picked else []
    chosen = set(int(page.loc[r, "sample_id"]) for r in rows)
    extra = st.multiselect("…or pick sample ids", page["sample_id"].tolist(), key="review_bulk_ids")
    chosen |= set(int(s) for s in extra)
    top_n = st.number_input("…or the top N of the queue", min_value=0, max_value=len(page), value=0, key="review_top_n")
    chosen |= set(int(s) for s in page["sample_id"].head(int(top_n)))
    ids = sorted(chosen)
    st.caption(f"{len(ids)} selected")
    bb = st.columns(3)
    bb[0].button("Keep selected", key="review_bulk_keep", on_click=act, args=(ids, "keep"), disabled=not ids)
    bb[1].button("Exclude selected", key="review_bulk_exclude", on_click=act, args=(ids, "exclude"), disabled=not ids)
    preds = dict(zip(page["sample_id"], page["pred"]))
    bb[2].button("Relabel selected to their suggested label", key="review_bulk_relabel", disabled=not ids,
                 on_click=relabel_suggested, args=(ids, preds))

with st.expander("Decision history (newest first)"):
    st.dataframe(log.history().iloc[::-1].head(200), hide_index=True, key="review_history")
