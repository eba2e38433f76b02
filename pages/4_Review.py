"""Review likely-mislabelled samples: keep, relabel, exclude, undo; every click is logged at once.

Every button carries the versions of the samples this page showed (ReviewLog.versions); when
another tab or person changed one meanwhile, the engine writes nothing and the page says who
changed it and when. Widgets on the card are keyed by sample id, so nothing carries over.

The reviewer is the signed-in user (issue 20). With k reviewers per sample (consensus), the
queue holds the samples this reviewer has not decided; an admin also has the disagreements
queue, where a decision is a resolution. Logic lives in diffin_core/workspace/review.py.

Pace (issue 21): keyboard shortcuts on the card's buttons (Streamlit's own ``shortcut=``, which
never fires while typing in a box), a filter over the queue (class, prediction, review state,
label_issue range, ids, text) kept in the URL, and a session summary (decided per minute, left,
expected label errors left: diffin_core/workspace/triage.py).
"""
import sys
from pathlib import Path

import numpy as np
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as ui  # noqa: E402
from _common import triage_views as tv  # noqa: E402
from diffin_core.workspace import appstate  # noqa: E402
from diffin_core.errors import DiffinError  # noqa: E402

project = ui.page("Review", "✅", "Review suspects")
run = ui.chosen_run(project, key="review_run", label="Queue ranked by the label_issue of run")
method = project.run(run).method
scores = ui.scores(project, run)
log = ui.review_log(str(project.root))
me = ui.current_user()
user = me.name                         # the signed-in user: what the log records as "who"
k_reviewers = log.reviewers_per_sample()
disagreements = log.disagreements()
resolving = me.is_admin and k_reviewers > 1 and st.session_state.get("review_mode") == "disagreements"
scope = None if resolving else user   # whose events a stale check compares (consensus: your own)
labels = list(range(project.num_classes))
given_of = dict(zip(scores["sample_id"].astype(int), scores["label"].astype(int)))


def _report(fn, *args, **kw):
    """Run one write; a refusal (stale page, no-op relabel, bad id) is shown once, above the card."""
    try:
        return fn(*args, **kw)
    except DiffinError as e:
        st.session_state["review_error"] = e.brief()
        return None


def act(sample_ids, action, seen, new_label=None):
    """Button callback: write the decision(s) if the samples are as this page showed them."""
    ids = [int(s) for s in sample_ids]
    done = _report(log.decide_many, ids, action, new_label=new_label, user=user, run=run, method=method,
                   seen=seen, given_labels={s: given_of[s] for s in ids if s in given_of}, resolution=resolving)
    if done:
        if len(ids) == 1:
            st.session_state["review_last"] = ids[0]
        st.session_state.pop("review_focus", None)
    for key in ("review_bulk_ids", "review_top_n"):
        st.session_state.pop(key, None)


def relabel_suggested(sample_ids, preds, seen):
    change = [s for s in sample_ids if int(preds[s]) != given_of.get(int(s))]
    if len(change) < len(sample_ids):
        st.session_state["review_note"] = (f"Skipped {len(sample_ids) - len(change)} selected sample(s) whose "
                                           "suggested label is already their label.")
    if change:
        act(change, "relabel", {s: seen[s] for s in change}, new_label={int(s): int(preds[s]) for s in change})


def undo_sample(sid, seen):
    # an admin's undo takes the decision in force (k = 1, or resolving); a vote is its voter's own
    reverted = _report(log.undo_sample, sid, user=user, seen=seen,
                       any_user=me.is_admin and (k_reviewers <= 1 or resolving))
    if reverted is not None:
        st.session_state["review_note"] = f"Undid the {reverted} decision on sample {sid}."
        st.session_state["review_focus"] = int(sid)
    elif "review_error" not in st.session_state:
        st.session_state["review_note"] = f"Sample {sid} has no decision to undo."


def undo_history(expect):
    sid = _report(log.undo, user=user, expect=expect)
    if sid is not None:
        st.session_state["review_note"] = f"Undid your latest decision (sample {sid})."
        st.session_state["review_focus"] = int(sid)


def skip(sid):
    """Next: leave this sample undecided and show the next one (skipped samples go to the end of
    this tab's queue)."""
    skipped = st.session_state.setdefault("review_skipped", [])
    if int(sid) not in skipped:
        skipped.append(int(sid))
    st.session_state.pop("review_focus", None)


noisy = appstate.noisy_ids(scores)
KEYS = {"keep": "K", "exclude": "X", "relabel": "L", "next": "N", "undo": "U"}   # R and C are Streamlit's own


@st.fragment(run_every="5s")
def live(sid, seen, queue_ids=()):
    """Counts, precision/recall, the session summary and a stale-card warning, redrawn every 5 s:
    another tab's or reviewer's decisions show up without a reload."""
    counts = log.counts(len(scores))
    if k_reviewers > 1:
        mine = len(scores) - len(log.queue_done(user) & set(given_of))
        st.caption(f"Consensus: {k_reviewers} reviewers per sample · {len(log.disagreements()):,} disagreements "
                   f"waiting for an admin · {mine:,} samples in your queue · \"Reviewed\" counts samples decided "
                   "by agreement or resolution")
    c = st.columns(7 if noisy is not None else 5)
    c[0].metric("Reviewed", counts["reviewed"])
    c[1].metric("Remaining", counts["remaining"])
    c[2].metric("Excluded", counts["excluded"])
    c[3].metric("Relabelled", counts["relabelled"])
    c[4].metric("Kept", counts["kept"])
    if noisy is not None:
        q = log.quality(noisy)
        c[5].metric("Precision", "–" if q["precision"] is None else f"{q['precision']:.0%}",
                    help=f"Of the {q['flagged']} samples you excluded or relabelled, the share whose label really "
                         "was wrong (the sample project knows the true labels).")
        c[6].metric("Recall", "–" if q["recall"] is None else f"{q['recall']:.0%}",
                    help=f"Of the {q['noisy_reviewed']} truly mislabelled samples you reviewed, the share you excluded "
                         f"or relabelled; {q['missed']} were kept.")
    tv.session_summary(log, user, scores, queue_ids, method, project.num_classes, log.state())
    if sid is not None and log.versions([sid], user=scope)[sid] != seen:
        ev = log.history(sid).iloc[-1]
        st.warning(f"Sample {sid} was changed by {ev['user']} at {str(ev['ts'])[:19].replace('T', ' ')} UTC "
                   f"({ev['action']}) in another tab: the card below is out of date and its buttons will be refused.")
        if st.button("Show the current state", key="review_refresh"):
            st.rerun(scope="app")


state = log.state()
if me.is_admin:
    with st.sidebar.expander("Consensus review", expanded=k_reviewers > 1):
        new_k = st.number_input("Reviewers per sample", 1, 20, k_reviewers, key="review_k",
                                help="Each sample is decided by this many reviewers; when they differ it goes to "
                                     "the disagreements queue, which an admin resolves.")
        if st.button("Save", key="review_k_save", disabled=int(new_k) == k_reviewers):
            _report(log.set_reviewers_per_sample, int(new_k), user=user)
            st.rerun()
if me.is_admin and k_reviewers > 1:
    st.radio("Queue", ["mine", "disagreements"], horizontal=True, key="review_mode",
             format_func={"mine": "My review queue",
                          "disagreements": f"Disagreements to resolve ({len(disagreements):,})"}.get)
elif k_reviewers > 1:
    st.caption(f"Consensus review: {k_reviewers} reviewers decide each sample; your queue holds the samples "
               "you have not decided yet. Disagreements go to an admin.")
head = st.container()
flt = tv.filter_bar(project, scores, "review_filter", states=not resolving)

for key in ("review_error", "review_note"):
    if key in st.session_state:
        (st.error if key == "review_error" else st.info)(st.session_state.pop(key))

if resolving:
    queue = tv.apply_filter(project, scores[scores["sample_id"].isin(disagreements["sample_id"])], flt, state)
else:       # the filter's "undecided" = not yet decided by you (your vote, under consensus)
    queue = tv.apply_filter(project, scores, flt, state, done=log.queue_done(user))
queue = queue.sort_values("label_issue", ascending=False, kind="stable")
skipped = set(st.session_state.get("review_skipped", []))
if skipped:                           # Next (N): skipped samples at the end of this tab's queue
    queue = queue.iloc[np.argsort(queue["sample_id"].isin(skipped).to_numpy(), kind="stable")]
if tv.narrowed("review_filter"):
    st.caption(f"Queue filtered: {flt.describe(lambda y: ui.label_name(project, y))} · {len(queue):,} samples.")
rows = scores.set_index("sample_id", drop=False)
focus = st.session_state.get("review_focus")
if focus is not None and int(focus) not in rows.index:
    focus = None
if queue.empty and focus is None:
    with head:
        live(None, None)
    if tv.narrowed("review_filter"):
        st.success("No sample matches this filter: widen it above.")
    else:
        st.success("No disagreement is waiting." if resolving else "Every sample has a decision"
                   + (" (or your vote, or enough votes)." if k_reviewers > 1 else "."))
else:
    cur = rows.loc[int(focus)] if focus is not None else queue.iloc[0]
    sid, given, pred = int(cur["sample_id"]), int(cur["label"]), int(cur["pred"])
    seen = log.versions([sid], user=scope)[sid]
    with head:
        live(sid, seen, tuple(int(s) for s in queue["sample_id"]))
    decided = state.loc[sid] if sid in state.index else None
    current = int(decided["label"]) if decided is not None and decided["action"] == "relabel" else given
    st.subheader(f"Sample {sid}")
    left, right = st.columns([1, 2])
    with left:
        ui.show_sample(project, sid, width=220)
        if project.kind == "text":                     # tokens by gradient x input, on request
            from _common import text_views
            text_views.highlight_section(project, sid, ui.job_manager())
    with right:
        st.markdown(f"**Given label:** {ui.label_name(project, given)}  \n"
                    f"**Suggested label (model's prediction):** {ui.label_name(project, pred)} "
                    f"({cur['confidence']:.0%} confident)")
        if decided is not None:
            what = decided["action"] + (f" to {ui.label_name(project, decided['label'])}"
                                        if decided["action"] == "relabel" else "")
            st.markdown(f"**Current decision:** {what} (by {decided['user']}, {str(decided['ts'])[:19].replace('T', ' ')} UTC)")
        if k_reviewers > 1:
            votes = log.votes()
            votes = votes[votes["sample_id"] == sid]
            if len(votes):
                st.markdown("**Votes:** " + "; ".join(
                    f"{u}: {a}" + (f" to {ui.label_name(project, lab)}" if a == "relabel" else "")
                    for u, a, lab in zip(votes["user"], votes["action"], votes["label"])))
            if resolving:
                st.caption("Your decision here resolves the disagreement (it overrides the votes).")
        st.caption(f"label_issue {cur['label_issue']:.4g} · influence {cur['influence']:.4g} · "
                   f"self-influence {cur['self_influence']:.4g} · loss {cur['loss']:.4g}  ({method})")
        b = st.columns(4)
        b[0].button("Keep", key="review_keep", on_click=act, args=([sid], "keep", {sid: seen}), width="stretch",
                    shortcut=KEYS["keep"])
        b[1].button("Exclude", key="review_exclude", on_click=act, args=([sid], "exclude", {sid: seen}),
                    width="stretch", shortcut=KEYS["exclude"])
        options = [y for y in labels if y != current]          # never offer the label it already has
        new = st.selectbox("Relabel to", options, key=f"review_new_label_{sid}",
                           index=options.index(pred) if pred in options else 0,
                           format_func=lambda y: ui.label_name(project, y))
        suggested = int(new) == pred != current         # the key relabels only to the model's suggestion
        b[2].button(f"Relabel to {ui.label_name(project, new)}", key="review_relabel", on_click=act,
                    args=([sid], "relabel", {sid: seen}, int(new)), width="stretch", type="primary",
                    shortcut=KEYS["relabel"] if suggested else None)
        b[3].button("Next", key="review_next", on_click=skip, args=(sid,), width="stretch", shortcut=KEYS["next"],
                    icon=":material/skip_next:", help="Leave this sample undecided for now and show the next one.")
        st.caption(f"Keys: **{KEYS['keep']}** keep · **{KEYS['exclude']}** exclude · "
                   + (f"**{KEYS['relabel']}** relabel to the suggestion ({ui.label_name(project, pred)}) · "
                      if suggested else "")
                   + f"**{KEYS['next']}** next · **{KEYS['undo']}** undo your latest decision "
                   "(keys do nothing while you type in a box)")
        own_vote = False
        if k_reviewers > 1 and not resolving:            # under consensus your undo takes back your vote
            v = log.votes()
            own_vote = bool(((v["sample_id"] == sid) & (v["user"] == user)).any())
        if decided is not None or own_vote:
            st.button(f"Undo {'your vote' if own_vote else 'the decision'} on sample {sid}", key="review_undo_sample",
                      icon=":material/undo:", on_click=undo_sample, args=(sid, seen))
        last = st.session_state.get("review_last")
        if last is not None and int(last) != sid and int(last) in state.index:
            st.button(f"Undo the decision on sample {last} ({state.loc[int(last), 'action']}, your previous card)",
                      key="review_undo_sample_last", icon=":material/undo:", on_click=undo_sample,
                      args=(int(last), log.versions([int(last)], user=scope)[int(last)]),
                      help="Reverts the decision in force on that sample only.")
    from _common import influence_views as iv        # issue 8: whom it helps and harms, and when
    iv.review_card_section(project, run, sid)
    with st.expander("Open a sample by id (to see or change its decision)"):
        pick = st.number_input("Sample id", min_value=0, value=None, step=1, key="review_open_id")
        if pick is not None and st.button("Show it on the card", key="review_open"):
            if int(pick) in rows.index:
                st.session_state["review_focus"] = int(pick)
                st.rerun()
            st.error(f"No sample {int(pick)} in this run.")
        if focus is not None and st.button("Back to the queue", key="review_back"):
            st.session_state.pop("review_focus", None)
            st.rerun()

    st.subheader("Bulk actions")
    page = queue.head(200)[["sample_id", "label", "pred", "confidence", "label_issue"]].reset_index(drop=True)
    page_seen = log.versions(page["sample_id"].tolist(), user=scope)   # what this page shows; checked on click
    picked = st.dataframe(page, key="review_table", on_select="rerun", selection_mode="multi-row", hide_index=True)
    sel = list(getattr(picked, "selection", {}).get("rows", [])) if picked else []
    chosen = set(int(page.loc[r, "sample_id"]) for r in sel)
    extra = st.multiselect("…or pick sample ids", page["sample_id"].tolist(), key="review_bulk_ids")
    chosen |= set(int(s) for s in extra)
    top_n = st.number_input("…or the top N of the queue", min_value=0, max_value=len(page), value=0, key="review_top_n")
    chosen |= set(int(s) for s in page["sample_id"].head(int(top_n)))
    ids = sorted(chosen)
    seen_ids = {s: page_seen.get(s, 0) for s in ids}
    st.caption(f"{len(ids)} selected")
    bb = st.columns(3)
    bb[0].button("Keep selected", key="review_bulk_keep", on_click=act, args=(ids, "keep", seen_ids), disabled=not ids)
    bb[1].button("Exclude selected", key="review_bulk_exclude", on_click=act, args=(ids, "exclude", seen_ids),
                 disabled=not ids)
    preds = dict(zip(page["sample_id"], page["pred"]))
    bb[2].button("Relabel selected to their suggested label", key="review_bulk_relabel", disabled=not ids,
                 on_click=relabel_suggested, args=(ids, preds, seen_ids))

st.subheader("Decision history")
mine = log.last_decision(user)
if mine is not None:
    st.button(f"History undo: revert your latest decision (sample {mine['sample_id']}, {mine['action']})",
              key="review_undo", icon=":material/history:", on_click=undo_history, args=(mine["id"],),
              shortcut=KEYS["undo"],
              help=f"Reverts the newest decision by {user} on any sample; press again to walk further back.")
else:
    st.caption(f"No decision by {user} to undo.")
with st.expander("All events (newest first)"):
    st.dataframe(log.history().iloc[::-1].head(200), hide_index=True, key="review_history")

st.subheader("Team")
counts_by = log.reviewer_counts()
if counts_by.empty:
    st.caption("No decisions yet.")
else:
    st.dataframe(counts_by, hide_index=True, key="review_team_counts")
    agree = log.agreement()
    c = st.columns(2)
    c[0].metric("Fleiss' kappa", "–" if agree["fleiss"] is None else f"{agree['fleiss']:.2f}",
                help=f"Agreement among all reviewers over the {agree['samples']:,} samples two or more decided "
                     "(1 = always agree, 0 = chance). Categories: keep, exclude, relabel to each label.")
    c[1].metric("Samples with 2+ reviewers", f"{agree['samples']:,}")
    if agree["pairs"]:
        st.dataframe([{"reviewers": f"{p['a']} / {p['b']}", "shared samples": p["n"],
                       "Cohen's kappa": None if p["cohen"] is None else round(p["cohen"], 3)}
                      for p in agree["pairs"]], hide_index=True, key="review_team_kappa")
