"""Background jobs: worker threads run heavy (torch) jobs, at most one per project at a time.

Engine code only, no Streamlit: the app holds one ``JobManager`` in ``@st.cache_resource`` and
polls ``get()`` from a fragment. A job's state is also kept in
``<project_dir>/runs/.jobs/<job_id>.json`` so a reloaded page sees how it ended after a restart.

No project can hold the queue: ``workers`` threads (the global cap) each take a queued job whose
project has fewer than ``per_project`` jobs running, projects taking turns (the one that started
a job least recently goes first; a project's own jobs run in order; jobs without a project form
one group of their own). And no job runs for ever: each has a time limit (``TimeLimit``): a fixed
number of seconds when given, else ``eta_factor`` x the total its own progress predicted (its
ETA at its last update), at least ``min_s``, and no progress update for ``stall_s`` seconds. A
job past its limit is cancelled (a child process is killed at once), marked failed with
``timed_out`` and a one-line error that says which limit; if its thread does not come back
within a few seconds it is left behind and a fresh worker takes its place, so the slot frees.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from diffin_core.project.atomic import write_text
from diffin_core.workspace.phases import Phases
from diffin_core.errors import DiffinError, JobCancelled

log = logging.getLogger(__name__)
_BOOT = uuid.uuid4().hex  # tells this process apart from an earlier one that had the same pid
_ACTIVE = ("queued", "running")
INTERRUPTED = "interrupted (the server stopped)"


@dataclass
class JobInfo:
    """A snapshot of one job; ``get()``/``list()`` hand out copies."""
    id: str
    kind: str
    label: str = ""
    project_dir: str | None = None
    status: str = "queued"  # queued | running | done | failed | cancelled
    done: int = 0
    total: int | None = None
    message: str = ""
    error: str | None = None
    result: Any = None
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    step: int = 0                  # a step phase (phases.py, as the CLI's bars): steps done of ``steps``
    steps: int | None = None       # (each done == 0 message ending "... k/m" is one step of m)
    phase: str = ""                # that phase's text without its k/m
    counting_since: float | None = None  # when the current phase's clock started (its rate counts from there)
    last_update: float | None = None     # when progress last arrived (the stall limit counts from it)
    expected_s: float | None = None      # the run time its progress predicted at the last update
    time_limit_s: float | None = None    # the job's own fixed limit (None: from its ETA, TimeLimit)
    timed_out: bool = False              # stopped at its time limit (status "failed", error says which)

    @property
    def rate(self) -> float:
        """Items per second since counting started (the last update with done == 0, else the start)."""
        t0 = self.counting_since or self.started
        if t0 is None:
            return 0.0
        elapsed = (self.finished or time.time()) - t0
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def in_phase(self) -> bool:
        """True while a k/m phase (e.g. propagating the query through checkpoints) runs, before items count."""
        return self.status == "running" and self.done == 0 and bool(self.steps)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current rate; None when unknown or not running."""
        if self.status != "running" or not self.total or self.rate <= 0:
            return None
        return max(self.total - self.done, 0) / self.rate

    @property
    def fraction(self) -> float:
        """0..1 share done (1.0 once done, 0.0 when the total is unknown)."""
        if self.status == "done":
            return 1.0
        if self.in_phase:
            return min(max(self.step / self.steps, 0.0), 1.0)
        return min(max(self.done / self.total, 0.0), 1.0) if self.total else 0.0

    @classmethod
    def from_dict(cls, d: dict) -> "JobInfo":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def _one_line(exc: BaseException) -> str:
    # shown in the app: a DiffinError names its file without the server's folders (brief)
    text = exc.brief() if isinstance(exc, DiffinError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


@dataclass(frozen=True)
class TimeLimit:
    """When a running job is stopped (module docstring). ``fixed_s``: this many seconds for every
    job without its own ``time_limit`` (``DIFFIN_JOB_TIME_LIMIT``); else ``eta_factor`` x the run
    time its progress predicted, at least ``min_s``; and never more than ``stall_s`` without a
    progress update (``DIFFIN_JOB_STALL``)."""
    fixed_s: float | None = None
    eta_factor: float = 4.0
    min_s: float = 15 * 60
    stall_s: float = 60 * 60

    @classmethod
    def from_env(cls) -> "TimeLimit":
        def seconds(name, default):
            raw = os.environ.get(name, "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise DiffinError(f"{name}={raw!r} is not a number of seconds") from None
            if not value > 0:
                raise DiffinError(f"{name} must be a positive number of seconds, not {raw!r}")
            return value
        return cls(fixed_s=seconds("DIFFIN_JOB_TIME_LIMIT", None), stall_s=seconds("DIFFIN_JOB_STALL", cls.stall_s))

    def exceeded(self, info: JobInfo, now: float) -> str | None:
        """Why ``info`` (running) is past its limit, in words; None while within it."""
        if info.started is None:
            return None
        ran = now - info.started
        fixed = info.time_limit_s if info.time_limit_s is not None else self.fixed_s
        if fixed is not None:
            return f"timed out after {_dur(ran)} (its time limit is {_dur(fixed)})" if ran > fixed else None
        if info.expected_s:
            allowed = max(self.min_s, self.eta_factor * info.expected_s)
            if ran > allowed:
                return (f"timed out after {_dur(ran)}: its progress predicted {_dur(info.expected_s)} and the limit "
                        f"is {self.eta_factor:g}x that, at least {_dur(self.min_s)} (DIFFIN_JOB_TIME_LIMIT sets one)")
        quiet = now - (info.last_update or info.started)
        if quiet > self.stall_s:
            return (f"timed out: no progress for {_dur(quiet)} (the limit is {_dur(self.stall_s)}; "
                    "DIFFIN_JOB_STALL sets it)")
        return None


def _dur(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _Job:
    def __init__(self, info: JobInfo, fn: Callable):
        self.info, self.fn = info, fn
        self.cancel = threading.Event()
        self.last_write = 0.0
        self.timeout: str | None = None      # why it was stopped at its time limit
        self.stopped_at = 0.0
        self.worker: "_Worker | None" = None


class _Worker:
    """One worker thread; ``retired`` once it was left behind with a job past its time limit."""

    def __init__(self):
        self.retired = False


class Progress:
    """Handed to a job function: report progress, notice cancellation."""

    def __init__(self, manager: "JobManager", job: _Job):
        self._m, self._job = manager, job
        self._phases = Phases()           # how its reports read: steps, items, announcements

    @property
    def cancelled(self) -> bool:
        return self._job.cancel.is_set()

    def check(self) -> None:
        """Raise JobCancelled if cancel was requested."""
        if self.cancelled:
            raise JobCancelled()

    def update(self, done: int, total: int | None = None, message: str = "") -> None:
        """Record progress (an empty message keeps the last one); raise JobCancelled if cancelled."""
        with self._m._cv:
            info = self._job.info
            info.done = int(done)
            if total is not None:
                info.total = int(total)
            info.last_update = time.time()
            if message:
                info.message = " ".join(str(message).split())
            r = self._phases.report(info.done, info.total, info.message if message else "", now=info.last_update)
            if r.kind == "steps":                # one bar of m steps in the CLI: step k of m here
                info.step, info.steps, info.phase = r.n, r.total, r.text
            elif r.new or r.kind == "items":     # an announcement or counted items: no steps
                info.step, info.steps, info.phase = 0, None, ""
            if r.new:                            # a phase's clock starts at the report before it
                info.counting_since = self._phases.since if r.kind == "items" else info.last_update
            eta = info.eta_s
            if info.done == 0:                   # a new phase: its items have no ETA yet (the stall limit holds)
                info.expected_s = None
            elif eta is not None and info.started is not None:   # frozen between updates: a hung job's stays put
                info.expected_s = info.last_update - info.started + eta
            if time.time() - self._job.last_write >= 0.5:  # at most ~2 writes/s
                self._m._save(self._job)
        self.check()


class JobManager:
    """Queue of jobs served by ``workers`` daemon threads (the global cap), at most
    ``per_project`` of them on one project's jobs; ``limits``: when a running job is stopped
    (``TimeLimit``; default from the environment)."""

    GRACE_S = 5.0          # a job past its limit that ignores cancel is left behind after this

    def __init__(self, workers: int = 1, per_project: int = 1, limits: TimeLimit | None = None,
                 watch_every: float = 1.0):
        self._cv = threading.Condition()  # guards the job table, the queue and every JobInfo in it
        self._jobs: dict[str, _Job] = {}
        self._pending: list[_Job] = []    # queued, in submit order
        self._running: dict[str | None, int] = {}   # project -> jobs running
        self._last_start: dict[str | None, float] = {}   # project -> when it last started a job
        self.workers, self.per_project = max(1, int(workers)), max(1, int(per_project))
        self.limits = limits or TimeLimit.from_env()
        self._n = 0
        for _ in range(self.workers):
            self._spawn_worker()
        threading.Thread(target=self._watch, args=(watch_every,), name="diffin-job-watch", daemon=True).start()

    # -- public API ---------------------------------------------------------------------
    def submit(self, kind: str, fn: Callable[[Progress], Any], *, label: str = "",
               project_dir: str | os.PathLike | None = None, time_limit: float | None = None) -> str:
        """Queue ``fn(progress)``; returns the job id at once. ``time_limit``: seconds this job
        may run (default: the manager's ``TimeLimit``)."""
        pdir = None if project_dir is None else str(Path(project_dir).resolve())
        job = _Job(JobInfo(id=uuid.uuid4().hex[:8], kind=kind, label=label, project_dir=pdir,
                           created=time.time(), time_limit_s=time_limit), fn)
        with self._cv:
            self._jobs[job.info.id] = job
            self._save(job)  # before a worker can see it, so "queued" never lands after "running"
            self._pending.append(job)
            self._cv.notify_all()
        return job.info.id

    def submit_child(self, kind: str, target: str, args: tuple = (), kwargs: dict | None = None, *,
                     label: str = "", project_dir: str | os.PathLike | None = None,
                     timeout: float | None = None, with_progress: bool = True, warm: str | None = None) -> str:
        """Queue ``target(*args, progress=..., **kwargs)`` (``"module:function"``) to run in a
        child process (usercode.run): cancel kills it, a crash fails only this job. ``timeout``:
        the job's time limit (seconds; default the manager's ``TimeLimit``): the child is killed.
        ``warm``: run it in the warm child of that key (usercode.run: kept for the next call; a
        cancel asks the call to stop and keeps the child)."""
        from diffin_core.workspace import usercode

        def fn(progress: Progress):
            return usercode.run(target, *args, progress=progress.update if with_progress else None,
                                cancelled=lambda: progress.cancelled, what=label or kind, warm=warm,
                                **(kwargs or {}))
        return self.submit(kind, fn, label=label, project_dir=project_dir, time_limit=timeout)

    def get(self, job_id: str) -> JobInfo | None:
        with self._cv:
            job = self._jobs.get(job_id)
            return dataclasses.replace(job.info) if job else None

    def list(self, project_dir: str | os.PathLike | None = None) -> list[JobInfo]:
        """All known jobs (of one project if given), newest first."""
        pdir = None if project_dir is None else str(Path(project_dir).resolve())
        with self._cv:
            infos = [dataclasses.replace(j.info) for j in self._jobs.values()
                     if pdir is None or j.info.project_dir == pdir]
        return sorted(infos, key=lambda i: i.created, reverse=True)

    def active(self, project_dir: str | os.PathLike | None = None) -> list[JobInfo]:
        return [i for i in self.list(project_dir) if i.status in _ACTIVE]

    def cancel(self, job_id: str) -> bool:
        """Queued jobs end at once; running ones at their next update/check. False if not active."""
        with self._cv:
            job = self._jobs.get(job_id)
            if job is None or job.info.status not in _ACTIVE:
                return False
            job.cancel.set()
            if job.info.status == "queued":
                self._finish(job, "cancelled")
            return True

    def wait(self, job_id: str, timeout: float | None = None) -> JobInfo | None:
        """Block until the job is no longer queued/running (or timeout); return its snapshot."""
        with self._cv:
            self._cv.wait_for(lambda: job_id not in self._jobs
                              or self._jobs[job_id].info.status not in _ACTIVE, timeout)
        return self.get(job_id)

    def load_history(self, project_dir: str | os.PathLike) -> list[JobInfo]:
        """Jobs recorded under ``project_dir`` merged with live ones, newest first.

        A queued/running record whose process is gone is reported as failed (interrupted)."""
        live = {i.id: i for i in self.list(project_dir)}
        for path in (Path(project_dir) / "runs" / ".jobs").glob("*.json"):
            try:
                d = json.loads(path.read_text(encoding="utf-8"))
                info = JobInfo.from_dict(d)
            except (OSError, ValueError, TypeError) as exc:
                log.warning("skipping job record %s: %s", path, exc)
                continue
            if info.id in live:
                continue
            if info.status in _ACTIVE and _owner_gone(d.get("owner")):
                info.status, info.error = "failed", INTERRUPTED
                info.finished = info.finished or path.stat().st_mtime
            live[info.id] = info
        return sorted(live.values(), key=lambda i: i.created, reverse=True)

    def reset(self) -> None:
        """For tests: cancel every job and forget them all."""
        with self._cv:
            for job_id in list(self._jobs):
                self.cancel(job_id)
            self._jobs.clear()
            self._pending.clear()
            self._cv.notify_all()

    # -- internals ------------------------------------------------------------------------
    def _spawn_worker(self) -> None:  # at start, and in place of a worker left behind
        self._n += 1
        w = _Worker()
        threading.Thread(target=self._worker, args=(w,), name=f"diffin-job-{self._n}", daemon=True).start()

    def _next(self) -> _Job | None:
        """(caller holds the lock) The next job to start: among queued jobs whose project has room,
        the oldest of the project that started a job least recently (a project's own jobs in
        order; projects take turns, so one with many queued jobs cannot hold the queue)."""
        self._pending = [j for j in self._pending if j.info.status == "queued" and not j.cancel.is_set()]
        ready = [j for j in self._pending if self._running.get(j.info.project_dir, 0) < self.per_project]
        if not ready:
            return None
        job = min(ready, key=lambda j: (self._last_start.get(j.info.project_dir, 0.0), j.info.created))
        self._pending.remove(job)
        self._last_start[job.info.project_dir] = time.monotonic()
        return job

    def _worker(self, me: _Worker) -> None:
        while not me.retired:
            with self._cv:
                job = self._next()
                while job is None:
                    self._cv.wait()
                    job = self._next()
                key = job.info.project_dir
                self._running[key] = self._running.get(key, 0) + 1
                job.worker = me
                job.info.status, job.info.started = "running", time.time()
                job.info.last_update = job.info.started
                self._save(job)
                self._cv.notify_all()
            try:
                self._run(job)
            except Exception:  # never let a bug here kill the worker
                log.exception("job %s: internal error", job.info.id)
            finally:
                with self._cv:
                    if not me.retired:           # a retired worker's slot was freed already
                        self._running[key] -= 1
                    self._cv.notify_all()

    def _run(self, job: _Job) -> None:
        result, error = None, None
        try:
            result, status = job.fn(Progress(self, job)), "done"
        except JobCancelled:
            status = "cancelled"
        except Exception as exc:
            status, error = "failed", _one_line(exc)
            log.info("job %s failed: %s", job.info.id, error, exc_info=not isinstance(exc, DiffinError))
        with self._cv:
            if job.info.status != "running":     # left behind at its time limit: already failed
                return
            if job.timeout is not None:          # stopped at its time limit (cancel raised, or it ended anyway)
                result, status, error = None, "failed", job.timeout
            job.info.result, job.info.error = result, error
            self._finish(job, status)

    def _watch(self, every: float) -> None:
        """Stop running jobs past their time limit; leave behind those that ignore it."""
        while True:
            time.sleep(every)
            try:
                self._check_limits(time.time())
            except Exception:  # never let a bug here end the watch
                log.exception("job watch: internal error")

    def _check_limits(self, now: float) -> None:
        with self._cv:
            for job in list(self._jobs.values()):
                info = job.info
                if info.status != "running":
                    continue
                if job.timeout is None:
                    why = self.limits.exceeded(info, now)
                    if why is not None:
                        job.timeout, job.stopped_at = why, now
                        info.timed_out = True
                        job.cancel.set()         # a child process is killed at once; a thread at its next update
                        log.warning("job %s (%s): %s", info.id, info.label or info.kind, why)
                elif now - job.stopped_at > self.GRACE_S and job.worker is not None and not job.worker.retired:
                    # it ignores cancel (hung in a thread): fail it, free its slot, start a fresh worker
                    job.worker.retired = True
                    self._running[info.project_dir] -= 1
                    info.error = job.timeout + " (its thread did not stop and was left behind)"
                    self._finish(job, "failed")
                    self._spawn_worker()

    def _finish(self, job: _Job, status: str) -> None:  # caller holds the lock
        job.info.status, job.info.finished = status, time.time()
        self._save(job)
        self._cv.notify_all()

    def _save(self, job: _Job) -> None:  # caller holds the lock; writes are small
        job.last_write = time.time()
        if job.info.project_dir is None:
            return
        d = dataclasses.asdict(job.info) | {"owner": {"pid": os.getpid(), "boot": _BOOT}}
        try:
            write_text(Path(job.info.project_dir) / "runs" / ".jobs" / f"{job.info.id}.json",
                       json.dumps(d, indent=1, default=str))
        except OSError as exc:
            log.warning("job %s: could not write its status: %s", job.info.id, exc)


def default_workers() -> int:
    """The app's global cap: ``DIFFIN_JOB_WORKERS``, else 2 on a CPU machine and 1 with CUDA (two
    scoring jobs starting together would each plan for 80% of the same free VRAM; the time
    limits still free the queue from a hung job)."""
    raw = os.environ.get("DIFFIN_JOB_WORKERS", "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:
            raise DiffinError(f"DIFFIN_JOB_WORKERS={raw!r} must be a whole number of workers, at least 1")
        return n
    import torch
    return 1 if torch.cuda.is_available() else 2


def display_order(infos: list[JobInfo]) -> list[JobInfo]:
    """Jobs as a page lists them: the running one, then the queued in the order they will run,
    then the finished, most recent first."""
    rank = {"running": 0, "queued": 1}
    return sorted(infos, key=lambda i: (rank.get(i.status, 2),
                                        i.created if i.status == "queued" else -(i.finished or i.created)))


def _owner_gone(owner: Any) -> bool:
    """True when the process that wrote a record no longer runs."""
    if not isinstance(owner, dict):
        return True
    if owner.get("boot") == _BOOT:
        return False
    pid = owner.get("pid")
    if pid == os.getpid() or not isinstance(pid, int) or os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
