"""Run user code (model.py, train.py recipes, scoring that imports them) in a child process.

A user's model.py can hang, call ``os._exit``, or segfault. None of that may take the server
down, so every call that imports user code from the app goes through ``run``: a child started
with multiprocessing's *spawn* context (never fork: the server has threads and maybe CUDA)
runs ``"module:function"(*args, **kwargs)`` and the calling thread supervises it:

- progress: the child's ``progress(done, total, message)`` calls arrive through a queue and are
  handed to the caller's callback (throttled to ~20/s, every new message passes);
- cancel: ``cancelled()`` true -> the child is killed, ``JobCancelled`` is raised;
- time limit: past ``timeout`` seconds the child is killed and a DiffinError says so;
- crash: an exception becomes a DiffinError with its one line; a dead child (``os._exit``,
  a signal) becomes a DiffinError with the exit code and the last error line it printed
  (its stderr goes to a log file; faulthandler writes "Fatal Python error: ..." there).

The child never writes ``__pycache__`` (``sys.dont_write_bytecode``), and ``load_source``
imports a user file without writing bytecode next to it in any process.
Starting a child costs about 2-3 s (a fresh interpreter importing torch).

``run(..., warm=KEY)`` keeps the child for the next call with the same key (a *warm* child: the
Explore page's queries of one run, whose model, checkpoints and store it keeps loaded): calls run
in it one at a time, with the same progress, cancel, time limit and crash handling; a cancel asks
the call to stop (``errors.check_cancelled`` between its steps) and keeps the child when it does
within ``CANCEL_GRACE_S``; a time limit, a crash or an unexpected exception retires it. At most
``WARM_MAX`` are kept, each until ``WARM_IDLE_S`` seconds unused.
"""
from __future__ import annotations

import faulthandler
import importlib
import importlib.util
import multiprocessing
import multiprocessing.spawn as mp_spawn
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import types
import uuid
from pathlib import Path
from typing import Any, Callable

from diffin_core.errors import DiffinError, JobCancelled

SPAWN = multiprocessing.get_context("spawn")
_BARE = threading.local()  # set while run() starts a child: see _preparation_data


def _preparation_data(name, _original=mp_spawn.get_preparation_data):
    """multiprocessing's spawn data without the parent's __main__ for our children.

    A spawned child normally re-runs the parent's main module. In a Streamlit server that module
    is the app script itself (Streamlit installs it as ``__main__``), so the child would run
    app.py. Our children import only ``target``'s module; other spawns are left as they were."""
    data = _original(name)
    if getattr(_BARE, "on", False):
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
    return data


mp_spawn.get_preparation_data = _preparation_data
# Setup's model checks: how long importing and building a model may take (seconds).
MODEL_TIMEOUT_S = float(os.environ.get("DIFFIN_MODEL_TIMEOUT", "120"))
# Setup's ImageFolder zips: how long decoding one may take in its child (seconds).
IMAGES_TIMEOUT_S = 600.0
_NOISE = ("Current thread", "Thread 0x", "Extension modules", "Traceback", "File ", "Stack (most recent")


class ChildFailed(DiffinError):
    """The child was stopped at its time limit, or died (a signal, ``os._exit``)."""




# --- the child side --------------------------------------------------------------------------
class _ChildProgress:
    """The ``progress(done, total, message)`` callback inside the child: sends to the parent."""

    def __init__(self, q):
        self.q, self.last, self.last_msg = q, 0.0, None

    def __call__(self, done, total=None, message: str = "") -> None:
        now = time.monotonic()
        final = total is not None and int(done) >= int(total)
        if message != self.last_msg or final or now - self.last >= 0.05:
            self.q.put(("progress", int(done), None if total is None else int(total), str(message)))
            self.last, self.last_msg = now, message


def _one_line(exc: BaseException) -> str:
    # shown in the app: a DiffinError names its file without the server's folders (brief)
    text = exc.brief() if isinstance(exc, DiffinError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _child(target: str, args: tuple, kwargs: dict, q, log_path: str, with_progress: bool) -> None:
    sys.dont_write_bytecode = True
    log = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    os.dup2(log.fileno(), 2)  # C-level and Python stderr both land in the log
    sys.stderr = log
    faulthandler.enable(file=log)
    try:
        module, fn = target.split(":")
        call = getattr(importlib.import_module(module), fn)
        if with_progress:
            kwargs = dict(kwargs, progress=_ChildProgress(q))
        q.put(("done", call(*args, **kwargs)))
    except BaseException as e:  # SystemExit and KeyboardInterrupt from user code too
        traceback.print_exc(file=log)
        q.put(("error", _one_line(e)))
    finally:
        log.flush()


# --- the parent side -------------------------------------------------------------------------
def last_error_line(text: str) -> str:
    """The line of a crash log that says what went wrong (not a stack frame)."""
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not ln[:1].isspace() and not ln.startswith(_NOISE)]
    for ln in reversed(lines):
        if ln.startswith("Fatal Python error"):
            return ln
    return lines[-1] if lines else ""


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run(target: str, *args, progress: Callable | None = None, cancelled: Callable[[], bool] | None = None,
        timeout: float | None = None, what: str = "user code", warm: str | None = None, **kwargs) -> Any:
    """``target(*args, **kwargs)`` (target = ``"package.module:function"``) in a spawned child.

    With ``progress`` the target gets a ``progress=`` keyword and its calls are forwarded here.
    Returns the target's (picklable) result. Raises JobCancelled when ``cancelled()`` turns
    true, DiffinError on an exception, a crash or the time limit. The child is gone on return,
    unless ``warm`` names a warm child to run it in (module doc).
    """
    if warm is not None:
        return _run_warm(str(warm), target, args, kwargs, progress, cancelled, timeout, what)
    fd, log_path = tempfile.mkstemp(prefix="diffin-child-", suffix=".log")
    os.close(fd)
    q = SPAWN.Queue()
    proc = SPAWN.Process(target=_child, args=(target, args, kwargs, q, log_path, progress is not None),
                         name=f"diffin-{what}", daemon=True)
    start = time.monotonic()
    _BARE.on = True
    try:
        proc.start()
    finally:
        _BARE.on = False
    try:
        dead_polls = 0
        while True:
            try:
                msg = q.get(timeout=0.05)
            except queue.Empty:
                msg = None
            if msg is not None:
                if msg[0] == "progress":
                    progress(*msg[1:])  # Progress.update raises JobCancelled when cancelled
                    continue
                if msg[0] == "done":
                    proc.join(10)
                    return msg[1]
                raise DiffinError(msg[1])
            if cancelled is not None and cancelled():
                raise JobCancelled()
            if timeout is not None and time.monotonic() - start > timeout:
                raise ChildFailed(f"{what} did not finish within {timeout:g} s and was stopped")
            if not proc.is_alive():
                dead_polls += 1  # what it sent just before dying may still be in the pipe
                if dead_polls < 5:
                    continue
                last = last_error_line(Path(log_path).read_text(encoding="utf-8", errors="replace"))
                raise ChildFailed(f"{what} crashed ({_exit_text(proc.exitcode)})" + (f": {last}" if last else ""))
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        q.close()
        q.cancel_join_thread()
        try:
            os.unlink(log_path)
        except OSError:
            pass


# --- warm children: one process for a series of calls --------------------------------------------
WARM_IDLE_S = float(os.environ.get("DIFFIN_WARM_IDLE", "600"))
WARM_MAX = 2
CANCEL_GRACE_S = 10.0


class _WarmProgress(_ChildProgress):
    """progress() in a warm child: tagged with the call, raises JobCancelled once cancelled."""

    def __init__(self, q, call_id: str, cancel):
        super().__init__(q)
        self.call_id, self.cancel = call_id, cancel

    def __call__(self, done, total=None, message: str = "") -> None:
        if self.cancel.is_set():
            raise JobCancelled()
        now = time.monotonic()
        final = total is not None and int(done) >= int(total)
        if message != self.last_msg or final or now - self.last >= 0.05:
            self.q.put((self.call_id, "progress", int(done), None if total is None else int(total), str(message)))
            self.last, self.last_msg = now, message


def _warm_child(inq, outq, cancel, log_path: str) -> None:
    sys.dont_write_bytecode = True
    log = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    os.dup2(log.fileno(), 2)
    sys.stderr = log
    faulthandler.enable(file=log)
    from diffin_core import errors
    errors._cancel_check = cancel.is_set
    while True:
        msg = inq.get()
        if msg is None:
            return
        call_id, target, args, kwargs, with_progress = msg
        try:
            module, fn = target.split(":")
            call = getattr(importlib.import_module(module), fn)
            if with_progress:
                kwargs = dict(kwargs, progress=_WarmProgress(outq, call_id, cancel))
            outq.put((call_id, "done", call(*args, **kwargs)))
        except JobCancelled:
            outq.put((call_id, "cancelled"))
        except DiffinError as e:                     # an input problem: the child stays usable
            outq.put((call_id, "error", _one_line(e), True))
        except BaseException as e:  # noqa: BLE001 - user code: the parent retires this child
            traceback.print_exc(file=log)
            outq.put((call_id, "error", _one_line(e), False))
            return
        finally:
            log.flush()


class _Warm:
    """A warm child and what the parent needs to talk to it."""

    def __init__(self, key: str):
        self.key = key
        fd, self.log_path = tempfile.mkstemp(prefix="diffin-warm-", suffix=".log")
        os.close(fd)
        self.inq, self.outq, self.cancel = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Event()
        self.proc = SPAWN.Process(target=_warm_child, args=(self.inq, self.outq, self.cancel, self.log_path),
                                  name="diffin-warm", daemon=True)
        self.lock = threading.Lock()
        self.last_used = time.monotonic()
        self.calls = 0
        _BARE.on = True
        try:
            self.proc.start()
        finally:
            _BARE.on = False

    def alive(self) -> bool:
        return self.proc.is_alive()

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)
        for q in (self.inq, self.outq):
            q.close()
            q.cancel_join_thread()
        try:
            os.unlink(self.log_path)
        except OSError:
            pass


_WARM: dict[str, _Warm] = {}
_WARM_LOCK = threading.Lock()
_REAPER: list = []


def _retire(w: _Warm) -> None:
    with _WARM_LOCK:
        if _WARM.get(w.key) is w:
            del _WARM[w.key]
    w.close()


def _reap() -> None:
    while True:
        time.sleep(min(30.0, max(1.0, WARM_IDLE_S / 4)))
        now = time.monotonic()
        with _WARM_LOCK:
            idle = [w for w in _WARM.values() if now - w.last_used > WARM_IDLE_S and not w.lock.locked()]
        for w in idle:
            _retire(w)


def _warm_for(key: str) -> _Warm:
    """The warm child for ``key`` (started when there is none, or it died)."""
    stale = []
    with _WARM_LOCK:
        w = _WARM.get(key)
        if w is not None and not w.alive():
            stale.append(_WARM.pop(key))
            w = None
        if w is None:
            spare = sorted((v for v in _WARM.values() if not v.lock.locked()), key=lambda v: v.last_used)
            while len(_WARM) >= WARM_MAX and spare:
                stale.append(_WARM.pop(spare.pop(0).key))
            w = _WARM[key] = _Warm(key)
        if not _REAPER:
            _REAPER.append(threading.Thread(target=_reap, name="diffin-warm-reaper", daemon=True))
            _REAPER[0].start()
    for v in stale:
        v.close()
    return w


def warm_pids() -> dict[str, int]:
    """{key: pid} of the warm children alive (for tests and the page's status)."""
    with _WARM_LOCK:
        return {k: w.proc.pid for k, w in _WARM.items() if w.alive()}


def close_warm(key: str | None = None) -> None:
    """Stop the warm child of ``key`` (every one when None)."""
    with _WARM_LOCK:
        ws = [w for k, w in _WARM.items() if key is None or k == key]
    for w in ws:
        _retire(w)


def _run_warm(key: str, target: str, args: tuple, kwargs: dict, progress, cancelled, timeout, what) -> Any:
    w = _warm_for(key)
    with w.lock:
        if not w.alive():                               # died while this call waited for it
            _retire(w)
            w = _warm_for(key)
        w.cancel.clear()
        call_id = uuid.uuid4().hex
        w.inq.put((call_id, target, args, kwargs, progress is not None))
        start, keep, dead_polls = time.monotonic(), False, 0
        try:
            while True:
                try:
                    msg = w.outq.get(timeout=0.05)
                except queue.Empty:
                    msg = None
                if msg is not None and msg[0] == call_id:
                    if msg[1] == "progress":
                        progress(*msg[2:])              # raises JobCancelled when the job was cancelled
                        continue
                    if msg[1] == "done":
                        keep = True
                        return msg[2]
                    if msg[1] == "cancelled":
                        keep = True
                        raise JobCancelled()
                    keep = bool(msg[3])
                    raise DiffinError(msg[2])
                if cancelled is not None and cancelled():
                    raise JobCancelled()
                if timeout is not None and time.monotonic() - start > timeout:
                    raise ChildFailed(f"{what} did not finish within {timeout:g} s and was stopped")
                if not w.alive():
                    dead_polls += 1
                    if dead_polls < 5:
                        continue
                    last = last_error_line(Path(w.log_path).read_text(encoding="utf-8", errors="replace"))
                    raise ChildFailed(f"{what} crashed ({_exit_text(w.proc.exitcode)})" + (f": {last}" if last else ""))
        except JobCancelled:
            if not keep and w.alive():                  # ask it to stop; keep it when it does in time
                w.cancel.set()
                end = time.monotonic() + CANCEL_GRACE_S
                while time.monotonic() < end and w.alive():
                    try:
                        msg = w.outq.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    if msg[0] == call_id and msg[1] in ("cancelled", "done", "error"):
                        keep = msg[1] != "error" or bool(msg[3])
                        break
            raise
        finally:
            w.calls += 1
            w.last_used = time.monotonic()
            if not keep:
                _retire(w)


# --- what the app runs in a child --------------------------------------------------------------
def describe_model(project_dir: str) -> str:
    """(child) Build the project's model, check one training sample goes through; a summary line."""
    from diffin_core.project.folder import Project
    project = Project(project_dir)
    model = project.build_model()
    project.check_model_input(model)
    params = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__}, {params:,} parameters, {project.num_classes} classes"


def validate_project(project_dir: str, brief: bool = False) -> list[str]:
    """(child) ``Project.validate()``: one line per problem, empty when the project loads."""
    from diffin_core.project.folder import Project
    return Project(project_dir).validate(brief=brief)


def check_project(project_dir: str | Path, timeout: float | None = None, brief: bool = False) -> list[str]:
    """The project's problems, found by loading it (model included) in a child with a time limit.
    ``brief``: files named without their folders (what the app shows: no server paths)."""
    try:
        return run("diffin_core.workspace.usercode:validate_project", str(project_dir), brief,
                   timeout=timeout or MODEL_TIMEOUT_S, what="loading the project (model.py)")
    except DiffinError as e:
        return [e.brief() if brief else str(e)]


def _store_upload_from_file(project_dir: str, role: str, name: str, path: str) -> str:
    """(child) uploads.store_upload on a spooled file; its staging folders are noted next to the
    spooled file so the parent removes them if this child is killed or crashes."""
    from diffin_core.workspace import uploads
    note = Path(path).parent / "staging.txt"
    real = tempfile.mkdtemp

    def mkdtemp(*a, **kw):
        made = real(*a, **kw)
        with open(note, "a", encoding="utf-8") as f:
            f.write(made + "\n")
        return made
    uploads.tempfile = types.SimpleNamespace(mkdtemp=mkdtemp)  # this child only
    with open(path, "rb") as f:
        return uploads.store_upload(project_dir, role, name, f)


def _model_is_code(project_dir: Path) -> bool:
    from diffin_core.workspace.uploads import read_draft
    return read_draft(project_dir).get("model") == "model.py"


def store_upload(project_dir: str | Path, role: str, name: str, fileobj, timeout: float | None = None) -> str:
    """``uploads.store_upload`` with the model's import and build in a child (a time limit,
    crashes reported). An ImageFolder zip is decoded in a child too, so its images never take
    the server's memory (safezip caps the decoded total by the memory budget). Other data
    uploads, and checkpoints when no model.py is set, stay in-process."""
    project_dir = Path(project_dir)
    image_zip = role in ("train", "query") and Path(str(name)).suffix.lower() == ".zip"
    if not image_zip and (role not in ("model", "checkpoint")
                          or (role == "checkpoint" and not _model_is_code(project_dir))):
        from diffin_core.workspace import uploads
        return uploads.store_upload(project_dir, role, name, fileobj)
    if image_zip:
        timeout, what = timeout or max(MODEL_TIMEOUT_S, IMAGES_TIMEOUT_S), "reading the images"
    else:
        timeout, what = timeout or MODEL_TIMEOUT_S, "the model check"
    project_dir.parent.mkdir(parents=True, exist_ok=True)
    spool = Path(tempfile.mkdtemp(prefix=f".diffin-upload-{os.getpid()}-", dir=project_dir.parent))
    try:
        tmp = spool / Path(str(name)).name
        with open(tmp, "wb") as out:
            if hasattr(fileobj, "seek"):
                fileobj.seek(0)
            shutil.copyfileobj(fileobj, out, 1 << 20)
        try:
            return run("diffin_core.workspace.usercode:_store_upload_from_file", str(project_dir), role, str(name), str(tmp),
                       timeout=timeout, what=what)
        except ChildFailed as e:
            raise DiffinError(e.problem, Path(str(name)).name) from None
    finally:
        note = spool / "staging.txt"
        for left in (note.read_text(encoding="utf-8").split() if note.is_file() else []):
            shutil.rmtree(left, ignore_errors=True)  # a killed child's staging
        shutil.rmtree(spool, ignore_errors=True)


def finish(project_dir: str | Path, table, image_shape=None, name: str | None = None,
           timeout: float | None = None, max_length: int = 128, brief: bool = False) -> list[str]:
    """``uploads.finish`` (which builds the model to check the project loads) in a child.
    ``brief``: problems name files without their folders (what the app shows)."""
    try:
        return run("diffin_core.workspace.uploads:finish", str(project_dir), table, image_shape, name,
                   timeout=timeout or MODEL_TIMEOUT_S, what="checking the project (model.py)",
                   max_length=int(max_length), brief=brief)
    except DiffinError as e:
        return [e.brief() if brief else str(e)]
