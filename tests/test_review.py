import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from diffin_core.errors import DiffinError
from diffin_core.review import ReviewLog

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
            "from diffin_core.review import ReviewLog; log = ReviewLog(sys.argv[2]); "
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
    assert str(err.value).startswith(str(tmp_path / "review.sqlite"))
    assert log.history().empty
