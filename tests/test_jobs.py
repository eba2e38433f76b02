"""JobManager: progress, failures, cancellation, one-at-a-time, rate/eta, persistence, copies."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

from diffin_core import jobs
from diffin_core.errors import DiffinError
from diffin_core.jobs import JobInfo, JobManager


@pytest.fixture
def jm():
    m = JobManager()
    yield m
    m.reset()  # the worker thread outlives the test


def _until(cond, timeout=3.0):
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "condition not reached in time"
        time.sleep(0.005)


def test_progress_then_result(jm):
    gate = threading.Event()

    def fn(p):
        p.update(3, 10, "scoring")
        gate.wait(5)
        p.update(10)
        return {"n": 10}

    jid = jm.submit("score", fn, label="first")
    _until(lambda: jm.get(jid).done == 3)
    mid = jm.get(jid)
    assert (mid.status, mid.total, mid.message, mid.fraction) == ("running", 10, "scoring", 0.3)
    assert [i.id for i in jm.active()] == [jid]
    gate.set()
    info = jm.wait(jid, 5)
    assert info.status == "done" and info.result == {"n": 10} and info.error is None
    assert info.fraction == 1.0 and info.message == "scoring"  # empty message keeps the last one
    assert info.created <= info.started <= info.finished
    assert jm.active() == []


def test_failures_are_one_line_and_worker_keeps_going(jm):
    def bad(p):
        raise DiffinError("no column named\n'label'", "data/train.csv")

    def crash(p):
        raise ValueError("line one\nline two")

    a, b = jm.submit("score", bad), jm.submit("score", crash)
    c = jm.submit("score", lambda p: "ok")
    assert jm.wait(a, 5).error == "data/train.csv: no column named 'label'"
    assert jm.wait(a, 5).status == "failed"
    assert jm.wait(b, 5).error == "ValueError: line one line two"
    info = jm.wait(c, 5)
    assert info.status == "done" and info.result == "ok"


def test_cancel_running_job_stops_quickly(jm):
    steps = []

    def fn(p):
        for i in range(1000):
            steps.append(i)
            p.update(i + 1, 1000)
            time.sleep(0.01)
        return "finished"

    jid = jm.submit("score", fn)
    _until(lambda: jm.get(jid).done >= 3)
    t0 = time.time()
    assert jm.cancel(jid) is True
    info = jm.wait(jid, 2)
    assert info.status == "cancelled" and info.result is None
    assert time.time() - t0 < 1.0
    assert len(steps) < 100
    assert jm.cancel(jid) is False  # no longer active


def test_queued_job_cancelled_never_runs(jm, tmp_path):
    gate, ran = threading.Event(), []
    first = jm.submit("score", lambda p: gate.wait(5))
    second = jm.submit("score", lambda p: ran.append(1), project_dir=tmp_path)
    _until(lambda: jm.get(first).status == "running")
    assert jm.get(second).status == "queued"
    assert jm.cancel(second) is True
    assert jm.get(second).status == "cancelled"  # at once, not when the worker gets to it
    gate.set()
    assert jm.wait(first, 5).status == "done"
    third = jm.submit("score", lambda p: "after")
    assert jm.wait(third, 5).result == "after"  # the worker has passed the cancelled job
    assert ran == [] and jm.get(second).status == "cancelled"
    on_disk = json.loads((tmp_path / "runs" / ".jobs" / f"{second}.json").read_text())
    assert on_disk["status"] == "cancelled"


def test_jobs_run_one_at_a_time(jm):
    lock, running, peak = threading.Lock(), [0], [0]

    def fn(p):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.03)
        with lock:
            running[0] -= 1

    ids = [jm.submit("score", fn) for _ in range(4)]
    infos = [jm.wait(i, 5) for i in ids]
    assert all(i.status == "done" for i in infos) and peak[0] == 1
    for a, b in zip(infos, infos[1:]):  # FIFO and no overlap
        assert a.finished <= b.started
    assert [i.id for i in jm.list()] == ids[::-1]  # newest first


def test_rate_and_eta():
    now = time.time()
    info = JobInfo(id="x", kind="score", status="running", done=10, total=30, started=now - 2)
    assert info.rate == pytest.approx(5, rel=0.05)
    assert info.eta_s == pytest.approx(4, rel=0.05)
    assert info.fraction == pytest.approx(1 / 3)
    done = JobInfo(id="y", kind="score", status="done", done=30, total=30,
                   started=now - 10, finished=now - 4)
    assert done.rate == pytest.approx(5) and done.eta_s is None and done.fraction == 1.0
    assert JobInfo(id="z", kind="score").rate == 0.0
    assert JobInfo(id="z", kind="score", status="running", started=now).eta_s is None


def test_rate_and_eta_live(jm):
    gate = threading.Event()

    def fn(p):
        time.sleep(0.2)
        p.update(5, 10)
        gate.wait(5)

    jid = jm.submit("score", fn)
    _until(lambda: jm.get(jid).done == 5)
    info = jm.get(jid)
    gate.set()
    assert 0 < info.rate <= 5 / 0.2
    assert info.eta_s == pytest.approx(5 / info.rate, rel=0.2)


def test_status_written_throttled_and_reloaded(jm, tmp_path, monkeypatch):
    writes = []
    real = jobs.write_text
    monkeypatch.setattr(jobs, "write_text", lambda path, text: (writes.append(json.loads(text)["status"]),
                                                               real(path, text))[1])

    def fn(p):
        for i in range(200):
            p.update(i + 1, 200)
            time.sleep(0.001)
        return {"flagged": [1, 2]}

    jid = jm.submit("score", fn, label="run 1", project_dir=tmp_path)
    assert jm.wait(jid, 5).status == "done"
    assert writes[0] == "queued" and writes[1] == "running" and writes[-1] == "done"
    assert len(writes) <= 5  # 200 updates in ~0.3 s: throttled to ~2 writes/s
    rec = json.loads((tmp_path / "runs" / ".jobs" / f"{jid}.json").read_text())
    assert rec["status"] == "done" and rec["done"] == 200 and rec["result"] == {"flagged": [1, 2]}

    # A record left "running" by a server that has since stopped (same pid, other process).
    stale = dict(rec, id="dead0001", status="running", created=rec["created"] + 1, finished=None,
                 result=None, owner={"pid": os.getpid(), "boot": "an-earlier-process"})
    (tmp_path / "runs" / ".jobs" / "dead0001.json").write_text(json.dumps(stale))
    (tmp_path / "runs" / ".jobs" / "junk.json").write_text("{not json")

    fresh = JobManager()
    try:
        hist = fresh.load_history(tmp_path)
        assert [i.id for i in hist] == ["dead0001", jid]  # newest first, junk skipped
        assert hist[0].status == "failed" and hist[0].error == jobs.INTERRUPTED
        assert hist[0].finished is not None and hist[0].eta_s is None
        assert (hist[1].status, hist[1].label, hist[1].result) == ("done", "run 1", {"flagged": [1, 2]})
        # live jobs merge with the records; a live one wins over its own file
        gate = threading.Event()
        live = fresh.submit("score", lambda p: gate.wait(5), project_dir=tmp_path)
        _until(lambda: fresh.get(live).status == "running")
        merged = {i.id: i.status for i in fresh.load_history(tmp_path)}
        assert merged == {live: "running", "dead0001": "failed", jid: "done"}
        gate.set()
        fresh.wait(live, 5)
    finally:
        fresh.reset()


def test_get_returns_a_copy(jm):
    gate = threading.Event()

    def fn(p):
        p.update(1, 3, "one")
        gate.wait(5)
        p.update(3, 3, "three")
        return [1, 2, 3]

    jid = jm.submit("score", fn)
    _until(lambda: jm.get(jid).done == 1)
    snap = jm.get(jid)
    snap.done, snap.status = 99, "done"  # mutating a copy changes nothing in the manager
    assert jm.get(jid).done == 1 and jm.get(jid).status == "running"
    snap = jm.get(jid)
    gate.set()
    jm.wait(jid, 5)
    assert (snap.done, snap.message, snap.status, snap.result) == (1, "one", "running", None)
    assert jm.get(jid).done == 3 and jm.get(jid).result == [1, 2, 3]


def test_reset_cancels_and_clears(jm):
    gate = threading.Event()
    a = jm.submit("score", lambda p: (gate.wait(5), p.check()))
    b = jm.submit("score", lambda p: None)
    _until(lambda: jm.get(a).status == "running")
    jm.reset()
    assert jm.list() == [] and jm.get(a) is None and jm.get(b) is None
    gate.set()
    c = jm.submit("score", lambda p: "next")
    assert jm.wait(c, 5).result == "next"
