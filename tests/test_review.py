import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from diffin_core.errors import DiffinError
from diffin_core.workspace.review import ReviewLog

REPO = Path(__file__).resolve().parents[1]


def test_decisions_persist_in_a_new_object(tmp_path):
    with ReviewLog(tmp_path) as log:
        log.decide(3, "exclude", user="ann", run="r1", method="diffin")
        log.decide(7, "relabel", new_label=2)
    assert (tmp_path / "review.sqlite").exists()
    with ReviewLog(tmp_path) as log:
        st = log.state()
        assert list(st.index) == [3, 7]
        assert st.loc[3, "action"] == "exclude" and pd.isna(st.loc[3, "label"])
        assert st.loc[3, "user"] == "ann"
        assert st.loc[7, "action"] == "relabel" and st.loc[7, "label"] == 2
        ev = log.history(3).iloc[0]
        assert (ev["run"], ev["method"]) == ("r1", "diffin")
        assert ev["ts"].endswith("+00:00")
    mode = sqlite3.connect(tmp_path / "review.sqlite").execute("PRAGMA journal_mode").fetchone()
    assert mode[0] == "wal"


def test_two_connections_write_concurrently(tmp_path):
    logs = [ReviewLog(tmp_path), ReviewLog(tmp_path)]
    shared = logs[0]
    errors = []

    def work(log, start, n):
        try:
            for i in range(start, start + n):
                log.decide(i, "exclude" if i % 2 else "keep", user=f"u{start}")
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(logs[0], 0, 60)),
               threading.Thread(target=work, args=(logs[1], 1000, 60)),
               threading.Thread(target=work, args=(shared, 2000, 60))]  # same object, two threads
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    st = ReviewLog(tmp_path).state()
    assert len(st) == 180
    assert st.loc[1001, "action"] == "exclude" and st.loc[1000, "action"] == "keep"
    hist = ReviewLog(tmp_path).history()
    assert len(hist) == 180 and hist["id"].is_unique


def test_second_process_writes_alongside(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from diffin_core.workspace.review import ReviewLog; log = ReviewLog(sys.argv[2]); "
            "[log.decide(i, 'keep', user='proc') for i in range(500, 600)]")
    proc = subprocess.Popen([sys.executable, "-c", code, str(REPO), str(tmp_path)])
    log = ReviewLog(tmp_path)
    for i in range(100):
        log.decide(i, "exclude")
    assert proc.wait(timeout=60) == 0
    st = log.state()
    assert len(st) == 200 and (st.loc[500:, "user"] == "proc").all()


def test_undo_walks_back_and_restores_previous_label(tmp_path):
    log = ReviewLog(tmp_path)
    log.decide(5, "relabel", new_label=3)
    log.decide(5, "relabel", new_label=1)
    log.decide(9, "exclude")
    assert log.undo() == 9
    assert 9 not in log.state().index
    assert log.undo() == 5
    assert log.state().loc[5, "label"] == 3
    hist = log.history(5)
    last = hist.iloc[-1]
    assert last["action"] == "undo" and last["prev_action"] == "relabel" and last["prev_label"] == 3
    assert last["undoes"] == hist.iloc[1]["id"]
    assert hist.iloc[1]["prev_label"] == 3  # the second relabel saw the first
    assert log.undo() == 5
    assert log.state().empty
    assert log.undo() is None
    log.decide(5, "keep")  # deciding again after undo works
    assert log.state().loc[5, "action"] == "keep"


def test_undo_by_user_leaves_others(tmp_path):
    log = ReviewLog(tmp_path)
    log.decide(1, "exclude", user="ann")
    log.decide(2, "exclude", user="bob")
    log.decide(1, "keep", user="bob")
    assert log.undo(user="ann") == 1
    # bob's later "keep" on sample 1 stays in force; ann's exclude is gone from the log's state
    st = log.state()
    assert st.loc[1, "action"] == "keep" and st.loc[2, "action"] == "exclude"
    assert log.undo(user="ann") is None


def test_bulk_decision_is_one_transaction(tmp_path):
    log = ReviewLog(tmp_path)
    log.decide(2, "keep")
    ids = log.decide_many([1, 2, 3], "exclude", user="ann", method="diffin")
    assert len(ids) == 3 and ids == sorted(ids)
    st = log.state()
    assert set(st.index) == {1, 2, 3} and (st["action"] == "exclude").all()
    assert log.history(2).iloc[-1]["prev_action"] == "keep"
    with pytest.raises(DiffinError):
        log.decide_many([10, 11, -1], "exclude")
    assert not {10, 11} & set(log.state().index)  # nothing written from the failed batch
    assert log.undo() == 3 and log.undo() == 2
    assert log.state().loc[2, "action"] == "keep"


def test_counts_and_precision(tmp_path):
    log = ReviewLog(tmp_path)
    assert log.precision({1}) is None
    log.decide_many([1, 2, 3], "exclude")
    log.decide(4, "relabel", new_label=0)
    log.decide(5, "keep")
    assert log.counts(10) == {"reviewed": 5, "remaining": 5, "excluded": 3, "relabelled": 1,
                              "kept": 1}
    assert log.precision({1, 2, 4, 5, 9}) == pytest.approx(3 / 4)
    log.undo()
    log.undo()  # removes keep(5) and relabel(4)
    assert log.precision({1, 2, 4, 5, 9}) == pytest.approx(2 / 3)


@pytest.mark.parametrize("args,kw,msg", [
    ((1, "delete"), {}, "unknown review action"),
    ((1, "undo"), {}, "unknown review action"),
    ((1, "relabel"), {}, "needs a new label"),
    ((-4, "keep"), {}, "negative"),
    ((1.5, "keep"), {}, "not an integer"),
    ((1, "keep"), {"new_label": 2}, "takes no new label"),
])
def test_bad_decisions_rejected(tmp_path, args, kw, msg):
    log = ReviewLog(tmp_path)
    with pytest.raises(DiffinError, match=msg) as err:
        log.decide(*args, **kw)
    assert str(err.value).startswith(str(tmp_path / "review.sqlite"))    # the CLI names the file
    assert err.value.brief() == err.value.problem and msg in err.value.brief()   # the app: no path
    assert log.history().empty


# --- stale clicks from a second tab, relabel no-ops, scoped undo, precision/recall -------------

from diffin_core.workspace.review import ReviewConflict  # noqa: E402


def test_stale_click_from_a_second_tab_is_refused(tmp_path):
    tab_a, tab_b = ReviewLog(tmp_path), ReviewLog(tmp_path)   # two tabs = two readers of one file
    seen_a, seen_b = tab_a.versions([3073]), tab_b.versions([3073])
    assert seen_a == seen_b == {3073: 0}
    tab_a.decide(3073, "exclude", user="ann", seen=seen_a[3073])
    with pytest.raises(ReviewConflict) as err:               # tab B still shows 3073 undecided
        tab_b.decide(3073, "keep", user="bob", seen=seen_b[3073])
    msg = str(err.value)
    assert "sample 3073 was changed by ann at" in msg and "UTC" in msg and "exclude" in msg
    assert "nothing was written" in msg and "\n" not in msg
    assert err.value.changes[0]["user"] == "ann"
    st = ReviewLog(tmp_path).state()
    assert st.loc[3073, "action"] == "exclude" and st.loc[3073, "user"] == "ann"
    assert len(ReviewLog(tmp_path).history(3073)) == 1
    # after a redraw the tab sees the new version and its click goes through
    tab_b.decide(3073, "keep", user="bob", seen=tab_b.versions([3073])[3073])
    assert ReviewLog(tmp_path).state().loc[3073, "action"] == "keep"


def test_stale_bulk_action_writes_nothing(tmp_path):
    log = ReviewLog(tmp_path)
    seen = log.versions([1, 2, 3, 4])
    log.decide(3, "relabel", new_label=5, user="ann")        # another tab, meanwhile
    with pytest.raises(ReviewConflict, match=r"1 of the 4 selected samples changed .*sample 3 was changed by ann"):
        log.decide_many([1, 2, 3, 4], "exclude", user="bob", seen=seen)
    assert list(log.state().index) == [3]
    log.undo_sample(3, user="ann")                           # an undo is a change too
    seen2 = {**seen, 3: seen[3]}
    with pytest.raises(ReviewConflict, match="undid a decision|changed"):
        log.decide_many([1, 2, 3, 4], "exclude", seen=seen2)
    ids = log.decide_many([1, 2, 3, 4], "exclude", seen=log.versions([1, 2, 3, 4]))
    assert len(ids) == 4


def test_threads_racing_on_one_sample_one_wins(tmp_path):
    seen = ReviewLog(tmp_path).versions([7])[7]
    results = []

    def click(action, user):
        try:
            ReviewLog(tmp_path).decide(7, action, user=user, seen=seen)
            results.append(("ok", user))
        except ReviewConflict:
            results.append(("refused", user))

    threads = [threading.Thread(target=click, args=(a, u)) for a, u in
               [("keep", "ann"), ("exclude", "bob"), ("keep", "cy"), ("exclude", "dee")]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r for r, _ in results) == ["ok", "refused", "refused", "refused"]
    assert len(ReviewLog(tmp_path).history(7)) == 1


def test_relabel_to_the_current_label_is_refused(tmp_path):
    log = ReviewLog(tmp_path)
    with pytest.raises(DiffinError, match="sample 3073 already has label 6"):
        log.decide(3073, "relabel", new_label=6, given_label=6)
    assert log.history().empty
    log.decide(3073, "relabel", new_label=2, given_label=6)
    with pytest.raises(DiffinError, match="already has label 2"):   # the relabel in force counts
        log.decide(3073, "relabel", new_label=2, given_label=6)
    log.decide(3073, "relabel", new_label=6, given_label=6)          # back to the given label: a change
    with pytest.raises(DiffinError, match="already has label"):      # bulk: all or nothing
        log.decide_many([1, 2], "relabel", new_label={1: 4, 2: 3}, given_labels={1: 0, 2: 3})
    assert not {1, 2} & set(log.state().index)
    log.decide_many([1, 2], "relabel", new_label={1: 4, 2: 5}, given_labels={1: 0, 2: 3})
    assert list(log.state().loc[[1, 2], "label"]) == [4, 5]


def test_undo_scopes_sample_and_history(tmp_path):
    log = ReviewLog(tmp_path)
    log.decide(1, "exclude", user="ann")
    log.decide(2, "relabel", new_label=3, user="ann")
    log.decide(1, "keep", user="bob")
    # per sample: the card's undo reverts the decision in force on that sample only
    assert log.undo_sample(1, user="ann") == "keep"
    st = log.state()
    assert st.loc[1, "action"] == "exclude" and st.loc[2, "action"] == "relabel"
    assert log.undo_sample(5, user="ann") is None                  # nothing on sample 5
    # history: the reviewer's newest decision on any sample, checked against what was offered
    last = log.last_decision("ann")
    assert (last["sample_id"], last["action"]) == (2, "relabel")
    log.decide(2, "exclude", user="bob")                          # another tab changes sample 2
    with pytest.raises(ReviewConflict, match="sample 2 was changed by bob"):
        log.undo("ann", expect=last["id"])
    assert log.state().loc[2, "action"] == "exclude"
    log.decide(9, "keep", user="ann")
    offered = log.last_decision("ann")
    log.decide(8, "keep", user="ann")                              # newer decision in another tab
    with pytest.raises(DiffinError, match="no longer the latest"):
        log.undo("ann", expect=offered["id"])
    assert log.undo("ann", expect=log.last_decision("ann")["id"]) == 8
    seen = log.versions([9])[9]
    log.decide(9, "exclude", user="bob")
    with pytest.raises(ReviewConflict):                           # stale per-sample undo
        log.undo_sample(9, user="ann", seen=seen)


def test_precision_and_recall_count_keeps_on_mislabelled(tmp_path):
    log = ReviewLog(tmp_path)
    assert log.quality({1, 2}) == {"precision": None, "recall": None, "flagged": 0, "caught": 0,
                                   "noisy_reviewed": 0, "missed": 0}
    noisy = {1, 2, 3, 4}
    log.decide_many([1, 2], "exclude")
    log.decide(10, "relabel", new_label=1)       # a clean sample flagged: hurts precision
    log.decide_many([3, 4], "keep")              # mislabelled samples kept: hurt recall
    q = log.quality(noisy)
    assert q["precision"] == pytest.approx(2 / 3) and q["recall"] == pytest.approx(2 / 4)
    assert (q["flagged"], q["caught"], q["noisy_reviewed"], q["missed"]) == (3, 2, 4, 2)
    assert log.precision(noisy) == pytest.approx(2 / 3)   # the old precision ignored the keeps


def test_app_text_of_errors_names_no_server_folder(tmp_path):
    """DiffinError.brief(), what the app shows: a refused decision is its problem alone; any other
    input error keeps the file's name, never the server's folders."""
    log = ReviewLog(tmp_path)
    with pytest.raises(DiffinError) as err:
        log.decide(3, "relabel")
    assert str(tmp_path) in str(err.value) and str(tmp_path) not in err.value.brief()
    assert err.value.brief() == "relabel of sample 3 needs a new label"
    other = DiffinError("row 3 has no label", tmp_path / "data/train.csv")
    assert other.brief() == "train.csv: row 3 has no label" and str(other).startswith(str(tmp_path))
    assert DiffinError("plain").brief() == "plain"
