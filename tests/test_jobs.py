"""JobManager: progress, failures, cancellation, one-at-a-time, rate/eta, persistence, copies."""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time

import pytest

from diffin_core.workspace import jobs
from diffin_core.errors import DiffinError
from diffin_core.workspace.jobs import JobInfo, JobManager


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


class _Peak:
    """A job function that counts how many of its calls run at once (``.peak``); each call waits
    ``hold()`` and returns ``result``."""

    def __init__(self, hold, result=None):
        self.hold, self.result, self.lock, self.running, self.peak = hold, result, threading.Lock(), 0, 0

    def __call__(self, p):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        self.hold()
        with self.lock:
            self.running -= 1
        return self.result


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
    assert jm.wait(a, 5).error == "train.csv: no column named 'label'"     # the file's name, no folders
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
    fn = _Peak(lambda: time.sleep(0.03))
    ids = [jm.submit("score", fn) for _ in range(4)]
    infos = [jm.wait(i, 5) for i in ids]
    assert all(i.status == "done" for i in infos) and fn.peak == 1
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


def test_checkpoint_phase_is_real_progress(jm):
    """diffin's query phase reports "checkpoint k/m" with done = 0: shown as k of m, not 0/N."""
    gates, phases = [threading.Event() for _ in range(3)], []

    def fn(p):
        p.update(0, 4000, "diffin: preparing query vectors")
        for i, k in enumerate((12, 11, 10)):  # the engine propagates backwards: 12/12, 11/12, ...
            p.update(0, 4000, f"diffin: propagated the query through checkpoint {k}/12")
            gates[i].wait(5)
        p.update(1000, 4000, "diffin: scoring training samples")
        for k in (1, 2):  # a later phase with its own k/m messages starts again at 1
            p.update(0, 4000, f"features: Hessian view of checkpoint {k}/12")
            phases.append((jm.get(jid).step, jm.get(jid).steps))
        return "ok"

    jid = jm.submit("score", fn)
    _until(lambda: jm.get(jid).step == 1)
    info = jm.get(jid)
    assert info.in_phase and (info.step, info.steps) == (1, 12) and info.fraction == pytest.approx(1 / 12)
    assert info.eta_s is None  # no sample rate yet
    gates[0].set()
    _until(lambda: jm.get(jid).step == 2)
    assert jm.get(jid).fraction == pytest.approx(2 / 12)
    gates[1].set()
    gates[2].set()
    info = jm.wait(jid, 5)
    assert info.status == "done" and not info.in_phase
    assert phases == [(1, 12), (2, 12)]
    # the items phase counts its rate from the end of the query phase, not from the start
    assert info.counting_since is not None and info.counting_since >= info.started


def test_phase_then_items_fraction():
    now = time.time()
    info = JobInfo(id="p", kind="score", status="running", done=0, total=4000, step=3, steps=12, started=now - 5)
    assert info.in_phase and info.fraction == 0.25
    info.done = 1000
    assert not info.in_phase and info.fraction == 0.25  # now 1000/4000 of the items
    info.counting_since = now - 1
    assert info.rate == pytest.approx(1000, rel=0.05)  # 1000 items in the 1 s since counting began


def test_display_order_running_first_then_queue_order():
    mk = lambda i, s, c, f=None: JobInfo(id=i, kind="score", status=s, created=c, finished=f)  # noqa: E731
    infos = [mk("q2", "queued", 5), mk("q1", "queued", 4), mk("r", "running", 3),
             mk("old", "done", 1, 2), mk("new", "failed", 2, 3.5)]
    assert [i.id for i in jobs.display_order(infos)] == ["r", "q1", "q2", "new", "old"]


def test_submit_child_runs_in_another_process(jm):
    jid = jm.submit_child("probe", "os:getpid", with_progress=False)
    info = jm.wait(jid, 60)
    assert info.status == "done" and isinstance(info.result, int) and info.result != os.getpid()
    bad = jm.wait(jm.submit_child("probe", "os:_exit", (3,), label="exits", with_progress=False), 60)
    assert bad.status == "failed" and bad.error == "exits crashed (exit code 3)"
    assert jm.wait(jm.submit("after", lambda p: "next"), 5).result == "next"


# --- issue 20: no project holds the queue; every job has a time limit --------------------------

def test_a_hung_job_in_one_project_does_not_block_another(tmp_path):
    m = JobManager(workers=2, per_project=1)
    try:
        a, b = tmp_path / "a", tmp_path / "b"
        hang = threading.Event()
        hung = m.submit("score", lambda p: hang.wait(30), project_dir=a)
        queued_a = m.submit("score", lambda p: "a2", project_dir=a)       # waits behind a's own job
        _until(lambda: m.get(hung).status == "running")
        fn = _Peak(lambda: time.sleep(0.05), "b")
        bs = [m.submit("score", fn, project_dir=b) for _ in range(3)]
        assert [m.wait(j, 5).result for j in bs] == ["b", "b", "b"]          # b ran while a's job hung
        assert fn.peak == 1                                                  # one at a time within b
        assert m.get(queued_a).status == "queued"                            # a holds only its own slot
        hang.set()
        assert m.wait(queued_a, 5).result == "a2"
    finally:
        hang.set()
        m.reset()


def test_the_global_cap_holds_across_projects(tmp_path):
    m = JobManager(workers=2, per_project=1)
    try:
        gate = threading.Event()
        fn = _Peak(lambda: gate.wait(5))
        ids = [m.submit("score", fn, project_dir=tmp_path / f"p{i}") for i in range(4)]
        _until(lambda: sum(m.get(i).status == "running" for i in ids) == 2)
        time.sleep(0.1)
        assert sum(m.get(i).status == "running" for i in ids) == 2
        gate.set()
        assert all(m.wait(i, 5).status == "done" for i in ids) and fn.peak == 2
    finally:
        gate.set()
        m.reset()


def test_a_job_past_its_own_time_limit_is_stopped_and_says_so(tmp_path):
    m = JobManager(workers=1, watch_every=0.05)
    try:
        def slow(p):
            for i in range(10_000):
                p.update(i, 10_000, "scoring")
                time.sleep(0.01)
        jid = m.submit("score", slow, label="tracin", project_dir=tmp_path, time_limit=0.3)
        info = m.wait(jid, 5)
        assert info.status == "failed" and info.timed_out, info
        assert info.error.startswith("timed out after ") and "(its time limit is 0 s)" in info.error, info.error
        assert "\n" not in info.error
        on_disk = json.loads((tmp_path / "runs" / ".jobs" / f"{jid}.json").read_text())
        assert on_disk["timed_out"] is True and on_disk["status"] == "failed"
        assert m.wait(m.submit("score", lambda p: "next"), 5).result == "next"
    finally:
        m.reset()


def test_the_default_limit_comes_from_the_jobs_own_eta():
    limits = jobs.TimeLimit(eta_factor=4, min_s=1, stall_s=1000)
    now = time.time()
    info = JobInfo(id="x", kind="score", status="running", started=now - 10, last_update=now - 7,
                   done=10, total=40, expected_s=2.0)    # at its last update it predicted 2 s in all
    assert limits.exceeded(info, now) == ("timed out after 10 s: its progress predicted 2 s and the limit is 4x "
                                          "that, at least 1 s (DIFFIN_JOB_TIME_LIMIT sets one)")
    assert limits.exceeded(dataclasses.replace(info, expected_s=3.0), now) is None   # 10 s < 4 x 3 s
    stalled = JobInfo(id="y", kind="score", status="running", started=now - 2000, last_update=now - 1500)
    assert "no progress for 25 min" in limits.exceeded(stalled, now)
    assert limits.exceeded(dataclasses.replace(stalled, last_update=now - 10), now) is None
    assert "its time limit is 5 s" in jobs.TimeLimit(fixed_s=5).exceeded(dataclasses.replace(stalled, last_update=now), now)


def test_progress_records_the_predicted_total(jm):
    gate = threading.Event()

    def fn(p):
        p.update(0, 100, "scoring")
        time.sleep(0.2)
        p.update(50, 100)
        gate.wait(5)
    jid = jm.submit("score", fn)
    _until(lambda: jm.get(jid).done == 50)
    info = jm.get(jid)
    assert 0.3 <= info.expected_s <= 1.5, info.expected_s        # 50 in ~0.2 s: ~0.4 s for 100, plus the start
    gate.set()
    jm.wait(jid, 5)


def test_a_new_phase_drops_the_last_phases_prediction(jm):
    gate = threading.Event()

    def fn(p):
        p.update(0, 100, "scoring")
        time.sleep(0.1)
        p.update(50, 100)
        p.update(0, 10, "features: 1/3")                 # a later phase (the feature pass) begins
        gate.wait(5)
    jid = jm.submit("score", fn)
    _until(lambda: jm.get(jid).message == "features: 1/3")
    assert jm.get(jid).expected_s is None                # scoring's 0.2 s no longer limits the feature pass
    gate.set()
    jm.wait(jid, 5)


def test_a_hung_thread_is_left_behind_and_the_queue_moves_on(monkeypatch):
    monkeypatch.setattr(JobManager, "GRACE_S", 0.2)
    m = JobManager(workers=1, watch_every=0.05)
    forever = threading.Event()
    try:
        jid = m.submit("score", lambda p: forever.wait(30), label="hung", time_limit=0.2)  # never calls update
        after = m.submit("score", lambda p: "ran")
        assert m.wait(after, 10).result == "ran"
        info = m.get(jid)
        assert info.status == "failed" and info.timed_out
        assert info.error.endswith("(its thread did not stop and was left behind)"), info.error
    finally:
        forever.set()
        m.reset()


def test_a_child_job_past_its_limit_is_killed(jm):
    t0 = time.time()
    jid = jm.submit_child("sleep", "time:sleep", (60,), label="sleeper", with_progress=False, timeout=3)
    info = jm.wait(jid, 60)
    assert info.status == "failed" and info.timed_out and "its time limit is 3 s" in info.error, info
    assert time.time() - t0 < 30


def test_the_apps_worker_count(monkeypatch):
    import torch
    monkeypatch.delenv("DIFFIN_JOB_WORKERS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert jobs.default_workers() == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert jobs.default_workers() == 1            # one GPU's free memory is not planned twice
    monkeypatch.setenv("DIFFIN_JOB_WORKERS", "3")
    assert jobs.default_workers() == 3
    monkeypatch.setenv("DIFFIN_JOB_WORKERS", "none")
    with pytest.raises(DiffinError, match="DIFFIN_JOB_WORKERS='none' must be a whole number of workers"):
        jobs.default_workers()


def test_projects_take_turns_on_a_single_worker(tmp_path):
    m = JobManager(workers=1)
    try:
        gate, order = threading.Event(), []
        first = m.submit("score", lambda p: gate.wait(5), project_dir=tmp_path / "a")
        _until(lambda: m.get(first).status == "running")
        ids = [m.submit("score", lambda p, k=k: order.append(k), project_dir=tmp_path / k[0])
               for k in ("a1", "a2", "a3", "b1", "c1")]
        gate.set()
        assert all(m.wait(i, 5).status == "done" for i in ids)
        assert order == ["b1", "c1", "a1", "a2", "a3"], order     # a ran last: b and c go before its queue
    finally:
        gate.set()
        m.reset()


def test_job_phases_are_the_cli_bars(jm):
    """The app's job progress reads the engine's reports as the CLI's bars do (workspace/phases.py):
    a k/m inside the text ("label issues at checkpoint 9/12 (step 504 ...)") is an announcement, not
    a step; the same steps again after m of m start a new phase at 1; items count on their own."""
    import io

    from diffin_core.cli import Bar
    plan = [(0, 4000, f"diffin: query plan: checkpoint {i}/12 done") for i in range(1, 13)]
    reports = [(0, 4000, "diffin: preparing query vectors"), *plan, *plan[:2],
               (0, 4000, "diffin: label issues at checkpoint 9/12 (step 504, ckpt_000504.safetensors) "
                         "(the lowest query loss): its plan, then one walk for both"),
               (256, 4000, "diffin: scoring training samples"), (4000, 4000, "diffin: scoring training samples"),
               *[(0, 4000, f"features: Hessian view of checkpoint {k}/3") for k in (3, 2, 1)]]
    bar, seen, ids = Bar(file=io.StringIO()), [], []

    def fn(p):
        for r in reports:
            p.update(*r)
            bar(*r)
            info = jm.get(ids[0])
            b = bar.bar if bar.bar is not None and bar.bar.unit == "step" else None
            seen.append(((info.step, info.steps, info.phase, info.in_phase),
                         (b.n, b.total, b.desc.removesuffix(": "), True) if b is not None else (0, None, "", False)))
        return "ok"

    ids.append(jm.submit("score", fn))
    assert jm.wait(ids[0], 10).status == "done"
    assert [job for job, _ in seen] == [cli for _, cli in seen]          # the same phases, step for step
    steps = [job[:2] for job, _ in seen]
    assert steps[0] == (0, None)                                         # an announcement
    assert steps[1:13] == [(k, 12) for k in range(1, 13)]
    assert steps[13:15] == [(1, 12), (2, 12)]                            # the plan again: a new phase
    assert steps[15] == (0, None)                                        # "checkpoint 9/12 (step 504 ...)": no step
    assert seen[1][0][2] == "diffin: query plan: checkpoint"
    assert steps[16:18] == [(0, None)] * 2 and steps[18:] == [(1, 3), (2, 3), (3, 3)]
