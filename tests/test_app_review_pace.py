"""Review's pace (issue 21): the queue filter (kept in the URL), Next, the keyboard shortcuts on the
card's buttons, and the session summary. The keys themselves are pressed in a real browser in
tests/test_browser_review_keys.py (AppTest runs no JavaScript)."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from app_fixtures import current_sample, jobs, loss_run, metrics, new_app, scored, texts, workspace  # noqa: F401
from text_fixtures import text_project, text_sample  # noqa: F401

from diffin_core.workspace.review import ReviewLog


def test_class_filter_next_and_shortcuts(scored):
    scores = pd.read_parquet(scored / "runs/loss-1/scores.parquet")
    threes = scores[scores["label"] == 3].sort_values("label_issue", ascending=False, kind="stable")
    ranked = threes["sample_id"].tolist()
    at = new_app(scored, "pages/4_Review.py")
    at.multiselect(key="review_filter_given").set_value([3]).run()
    assert current_sample(at) == ranked[0]
    assert list(at.query_params["given"]) in (["3"], ["3"[0]])
    assert metrics(at)["Left in this queue"] == str(len(ranked))
    # the card's buttons carry their keys (Streamlit draws them and fires them, never in a text box)
    shortcuts = {b.key: b.proto.shortcut.upper() for b in at.button}
    assert shortcuts["review_keep"] == "K" and shortcuts["review_exclude"] == "X"
    assert shortcuts["review_next"] == "N"
    at.button(key="review_exclude").click().run()
    assert current_sample(at) == ranked[1]                     # the next 3, not the global next
    at.button(key="review_next").click().run()                 # skip ranked[1]: undecided, to the end
    assert current_sample(at) == ranked[2]
    at.button(key="review_keep").click().run()
    assert current_sample(at) == ranked[3]
    assert at.button(key="review_undo").proto.shortcut.upper() == "U"
    state = ReviewLog(scored).state()
    assert state.loc[ranked[0], "action"] == "exclude" and state.loc[ranked[2], "action"] == "keep"
    assert ranked[1] not in state.index
    assert metrics(at)["Left in this queue"] == str(len(ranked) - 2)
    # the state filter: the excluded ones only, e.g. to look again
    at.multiselect(key="review_filter_states").set_value(["exclude"]).run()
    assert current_sample(at) == ranked[0]
    assert metrics(at)["Left in this queue"] == "1"


def test_relabel_key_only_when_the_button_relabels_to_the_suggestion(scored):
    scores = pd.read_parquet(scored / "runs/loss-1/scores.parquet")
    disagree = scores[scores["label"] != scores["pred"]]
    at = new_app(scored, "pages/4_Review.py")
    at.multiselect(key="review_filter_given").set_value([int(disagree["label"].iloc[0])]).run()
    sid = current_sample(at)
    row = scores.set_index("sample_id").loc[sid]
    assert row["pred"] != row["label"]          # the top suspect of a class: the model disagrees
    assert at.button(key="review_relabel").proto.shortcut.upper() == "L"
    other = next(y for y in range(10) if y not in (row["pred"], row["label"]))
    at.selectbox(key=f"review_new_label_{sid}").set_value(other).run()
    assert not at.button(key="review_relabel").proto.shortcut       # L never relabels to another class


def test_filter_and_run_come_back_from_the_url(scored):
    fresh = new_app(scored)             # a reload: a new session, the page state in the URL only
    fresh.query_params.update({"given": "5,7", "state": "keep", "run": "loss-1"})
    fresh.switch_page("pages/4_Review.py").run()
    assert fresh.multiselect(key="review_filter_given").value == [5, 7]
    assert fresh.multiselect(key="review_filter_states").value == ["keep"]
    assert fresh.selectbox(key="review_run").value == "loss-1"
    assert any("No sample matches this filter" in s for s in texts(fresh.success))


def test_session_summary(scored):
    # a diffin run (its label_issue is an estimated leave-one-out loss): the expected errors show
    run = scored / "runs" / "diffin-1"
    shutil.copytree(scored / "runs" / "loss-1", run)
    meta = json.loads((run / "meta.json").read_text())
    (run / "meta.json").write_text(json.dumps({**meta, "run": "diffin-1", "method": "diffin",
                                               "finished": meta["finished"] + 1}))
    at = new_app(scored, "pages/4_Review.py")
    assert at.selectbox(key="review_run").value == "diffin-1"
    m = metrics(at)
    assert m["Decided per minute"] == "–" and m["Left in this queue"] == "4000"
    assert float(m["Expected label errors left"]) > 0 and "…of them in this queue" not in m
    for _ in range(3):
        at.button(key="review_keep").click().run()
    m = metrics(at)
    assert m["Decided per minute"] != "–" and m["Left in this queue"] == "3997"
    assert any("were excluded or relabelled" in c for c in texts(at.caption))
    at.multiselect(key="review_filter_given").set_value([3]).run()      # a filtered queue: its own share
    m = metrics(at)
    assert 0 <= float(m["…of them in this queue"]) <= float(m["Expected label errors left"])
    at.selectbox(key="review_run").set_value("loss-1").run()
    assert metrics(at)["Expected label errors left"] == "–"      # a ranking, not a LOO loss


def test_explore_steps_queries_by_key_and_keeps_its_view_in_the_url(scored):
    at = new_app(scored, "pages/3_Explore.py")
    keys = {b.key: (b.proto.shortcut or "").upper() for b in at.button}
    assert keys["explore_next_query"] == "N" and keys["explore_prev_query"] == "P"
    assert keys["explore_topk"] == "F"
    at.button(key="explore_next_query").click().run()
    at.button(key="explore_next_query").click().run()
    assert at.number_input(key="explore_query").value == 2 and at.query_params["query"] in ("2", ["2"])
    at.button(key="explore_prev_query").click().run()
    assert at.number_input(key="explore_query").value == 1
    at.radio(key="explore_view").set_value("Histograms").run()
    assert at.query_params["view"] in ("histograms", ["histograms"])
    fresh = new_app(scored)                       # a reload: the URL alone
    fresh.query_params.update({"view": "topk", "query": "7"})
    fresh.switch_page("pages/3_Explore.py").run()
    assert fresh.radio(key="explore_view").value == "Top-k for a query"
    assert fresh.number_input(key="explore_query").value == 7


@pytest.mark.slow
def test_review_filter_searches_the_text(workspace, text_project, jobs):
    train = pd.read_csv(text_project / "data/train.tsv", sep="\t", dtype=str, keep_default_na=False, quoting=3)
    text_of = dict(zip(train["sample_id"].astype(int), train["text"]))
    hits = {s for s, t in text_of.items() if "call" in t.casefold()}
    assert 2 <= len(hits) < len(text_of)
    at = new_app(text_project, "pages/4_Review.py")
    at.text_input(key="review_filter_text").set_value("CALL").run()       # any case
    assert metrics(at)["Left in this queue"] == str(len(hits))
    seen = []
    for _ in range(2):
        sid = current_sample(at)
        assert sid in hits and "call" in text_of[sid].casefold()
        seen.append(sid)
        at.button(key="review_keep").click().run()
    assert metrics(at)["Left in this queue"] == str(len(hits) - 2)
    assert at.query_params["text"] in ("CALL", ["CALL"])


def test_a_bad_url_value_falls_back_to_the_default(scored):
    at = new_app(scored)
    at.query_params.update({"view": "nonsense", "query": "x", "given": "a,b", "state": "maybe", "run": "nope"})
    at.switch_page("pages/3_Explore.py").run()
    assert not at.exception and at.radio(key="explore_view").value == "Top-k for a query"
    assert at.number_input(key="explore_query").value == 0
    at.switch_page("pages/4_Review.py").run()
    assert not at.exception and at.multiselect(key="review_filter_given").value == []
    assert at.multiselect(key="review_filter_states").value == ["undecided"]
    assert at.selectbox(key="review_run").value == "loss-1"


def test_explore_filter_is_kept_in_the_url(scored):
    """Explore's grid filter (class, prediction, state, score range) lives in the URL as Review's
    does (triage_views.filter_bar): set on the page it is written there; a reload brings it back."""
    at = new_app(scored, "pages/3_Explore.py")
    at.multiselect(key="explore_filter_given").set_value([3]).run()
    at.multiselect(key="explore_filter_pred").set_value([5, 3]).run()
    at.multiselect(key="explore_filter_states").set_value(["keep"]).run()
    assert not at.exception
    assert at.query_params["given"] in ("3", ["3"]) and at.query_params["pred"] in ("3,5", ["3,5"])
    assert at.query_params["state"] in ("keep", ["keep"])
    lo, hi = at.slider(key="explore_filter_score").value
    at.slider(key="explore_filter_score").set_value((lo + (hi - lo) / 2, hi)).run()
    a, b = (float(v) for v in "".join(at.query_params["score"]).split(".."))
    assert a == pytest.approx(lo + (hi - lo) / 2, rel=1e-5) and b == pytest.approx(hi, rel=1e-5)
    fresh = new_app(scored)                       # a reload: the URL alone
    fresh.query_params.update({"view": "topk", "given": "3", "pred": "3,5", "state": "keep",
                               "score": f"{a:.6g}..{b:.6g}"})
    fresh.switch_page("pages/3_Explore.py").run()
    assert not fresh.exception
    assert fresh.multiselect(key="explore_filter_given").value == [3]
    assert fresh.multiselect(key="explore_filter_pred").value == [3, 5]
    assert fresh.multiselect(key="explore_filter_states").value == ["keep"]
    assert fresh.slider(key="explore_filter_score").value[0] == pytest.approx(a, rel=1e-5)
    assert any(e.label.startswith("Filter (on)") for e in fresh.expander)
    fresh.multiselect(key="explore_filter_given").set_value([]).run()     # cleared: gone from the URL
    assert "given" not in fresh.query_params
