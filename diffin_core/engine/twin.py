"""A forked twin of this process: a second core for a query's plan, the same bits (issue 23).

A new query's plan is about 120 sequential batch gradients of the Hessian batch (the sample CNN:
four 64-row slices each, ~6 ms a slice on one thread). Threads did not pay for them (the GIL and a
slice of a few ms: functional.SLICE_WORKERS). A twin is this process forked once its context is
loaded (model, checkpoints, data: shared copy-on-write, nothing loaded again); it computes the
second half of each batch gradient's slices while this process computes the first, both on one
thread, and the slices are summed here in slice order, as ``FunctionalModel._sliced`` sums them.
The same operations on the same data in the same order: the same bits as one process (tested in
tests/test_plan_threads.py). A twin also rescores half of a query's rows (features.rescore_rows).

Transport: one shared anonymous mapping (``NBYTES``) for tensors and a pipe for small messages;
one call at a time (a busy or dead twin: the caller computes locally). The twin exits when this
process closes its end of the pipe or dies (it reads EOF), ignores SIGINT (Ctrl-C reaches the
parent, which reports it) and never runs the parent's exit handlers (``os._exit``).

Where it applies (``usable``): Linux, at least 2 CPUs this process may use, and
``DIFFIN_TWIN`` not 0. The twin runs only its loop and torch on one intra-op thread; should it
ever not answer within ``TIMEOUT_S`` (a lock another thread held at the fork, say), it is killed
and its part computed here.
"""
from __future__ import annotations

import mmap
import os
import signal
import sys
import threading
import time
from multiprocessing import Pipe
from typing import Callable

import torch

NBYTES = 64 << 20            # the shared mapping: tensors of one call in and out (pages used on touch)
ALIGN = 64
TIMEOUT_S = 300.0            # a call not answered in this long: the twin is killed, the work done here
CLOSE_S = 10.0               # at close, a twin not gone in this long is killed (never a hung exit)
PROBE = 6                    # batch gradients timed each way (with the twin, then here alone) ...
RUN = 36                     # ... before this many go the faster way; then both are timed again


class Twin:
    def __init__(self, tasks: dict[str, Callable], nbytes: int = NBYTES,
                 in_twin: Callable[[], None] | None = None):
        """Fork now. ``tasks``: name -> fn(*args, *tensors) -> list of tensors, run in the twin
        (they see this process's objects as they were at the fork). ``in_twin``: called once in
        the twin before its first task (the caller's own clean-up, e.g. forgetting its twin)."""
        self.in_twin = in_twin
        self.nbytes = int(nbytes)
        self.mm = mmap.mmap(-1, self.nbytes)          # MAP_SHARED | MAP_ANONYMOUS: both sides see it
        self.tasks = dict(tasks)
        self.lock = threading.Lock()
        self.alive = True
        self._plan = [("twin", PROBE), ("alone", PROBE)]   # (way, calls) still to make, in order
        self._walls = {"twin": [0.0, 0], "alone": [0.0, 0]}
        ours, theirs = Pipe(duplex=True)
        pid = os.fork()
        if pid == 0:                                  # the twin
            ours.close()
            _serve(self, theirs)                      # never returns
        theirs.close()
        self.conn, self.pid = ours, pid

    # --- this process's side ---------------------------------------------------------------
    def wanted(self) -> bool:
        """Whether to give it the next batch gradient. With a free core the twin's half is ready
        when ours is; on a loaded machine both halves wait to be scheduled, and the two processes
        may get no more CPU than one (the scheduler shares a session's processes; measured at load
        10-13 on 2 cores: 1.16-1.37x slower than alone, benchmarks/explore_click.py). So the calls
        are timed: PROBE with the twin, PROBE alone, then RUN the faster way, and again. The
        same bits either way."""
        return self.alive and self._plan[0][0] == "twin"

    def note(self, seconds: float, twin: bool) -> None:
        """One batch gradient's wall time, made with the twin or alone (wanted's bookkeeping)."""
        way = "twin" if twin else "alone"
        w = self._walls[way]
        w[0] += seconds
        w[1] += 1
        left = self._plan[0][1] - 1
        self._plan[0] = (self._plan[0][0], left)
        if left > 0:
            return
        self._plan.pop(0)
        if not self._plan:
            if self._walls["twin"][1] and self._walls["alone"][1]:
                mean = {k: v[0] / v[1] for k, v in self._walls.items()}
                best = "twin" if mean["twin"] < mean["alone"] else "alone"
            else:
                best = "alone"
            self._walls = {"twin": [0.0, 0], "alone": [0.0, 0]}
            self._plan = [(best, RUN), ("twin", PROBE), ("alone", PROBE)]

    def fits(self, tensors) -> bool:
        return sum(_padded(t.numel() * t.element_size()) for t in tensors) <= self.nbytes

    def submit(self, name: str, args: tuple, tensors: list[torch.Tensor]) -> "Pending | None":
        """Start ``name`` in the twin; None when it is busy, dead or the tensors do not fit (the
        caller computes locally). The tensors are copied out before this returns."""
        if not self.alive or not self.fits(tensors) or not self.lock.acquire(blocking=False):
            return None
        try:
            metas, off = [], 0
            for t in tensors:
                t = t.detach().contiguous()
                if t.device.type != "cpu":
                    raise ValueError("the twin runs on the CPU")
                n = t.numel() * t.element_size()
                _view(self.mm, off, t.shape, t.dtype).copy_(t)
                metas.append((off, tuple(t.shape), t.dtype))
                off += _padded(n)
            self.conn.send((name, args, metas))
        except ValueError:                            # not a CPU tensor
            self.lock.release()
            return None
        except (OSError, EOFError):                   # the twin is gone
            self.lock.release()
            self.alive = False
            return None
        return Pending(self)

    def kill(self) -> None:
        self.alive = False
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except OSError:
            pass

    def close(self, wait_s: float | None = None) -> None:
        """Close the pipe (the twin reads EOF and exits) and reap it; a twin not gone within
        ``wait_s`` seconds (CLOSE_S: finishing a task, or hung on a lock held at the fork) is
        killed, so that this process's exit never waits on it."""
        if not self.alive:
            return
        self.alive = False
        try:
            self.conn.close()
        except OSError:
            pass
        deadline = time.monotonic() + (CLOSE_S if wait_s is None else wait_s)
        while True:
            try:
                pid, _status = os.waitpid(self.pid, os.WNOHANG)
            except OSError:                           # already reaped
                return
            if pid:
                return
            if time.monotonic() >= deadline:
                self.kill()
                return
            time.sleep(0.01)


class Pending:
    def __init__(self, twin: Twin):
        self.twin = twin

    def result(self) -> list[torch.Tensor] | None:
        """The task's tensors (copies), or None when the twin failed (the caller computes them)."""
        twin = self.twin
        try:
            if not twin.conn.poll(TIMEOUT_S):
                twin.kill()
                return None
            status, payload = twin.conn.recv()
            if status != "ok":
                return None
            return [_view(twin.mm, off, shape, dtype).clone() for off, shape, dtype in payload]
        except (OSError, EOFError):
            twin.alive = False
            return None
        finally:
            twin.lock.release()


def _padded(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _view(mm, off: int, shape, dtype) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= int(s)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mm, dtype=dtype, count=n, offset=off).view(shape)


def _serve(twin: Twin, conn) -> None:
    """The twin's loop: one task at a time until the parent goes away."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        torch.set_num_threads(1)
        if twin.in_twin is not None:
            twin.in_twin()                           # e.g. functional: no twin of the twin
        while True:
            try:
                name, args, metas = conn.recv()
            except (EOFError, OSError):
                break
            try:
                ins = [_view(twin.mm, off, shape, dtype).clone() for off, shape, dtype in metas]
                outs = twin.tasks[name](*args, *ins)
                metas, off = [], 0
                for t in outs:
                    t = t.detach().contiguous()
                    _view(twin.mm, off, t.shape, t.dtype).copy_(t)
                    metas.append((off, tuple(t.shape), t.dtype))
                    off += _padded(t.numel() * t.element_size())
                    if off > twin.nbytes:
                        raise ValueError("the twin's answer does not fit its mapping")
                conn.send(("ok", metas))
            except Exception as e:                    # the parent computes it itself
                conn.send(("error", repr(e)))
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def usable() -> bool:
    """Whether a twin may start here: Linux, DIFFIN_TWIN is not 0, and this process may use at
    least 2 CPUs."""
    if os.environ.get("DIFFIN_TWIN", "1").strip() in ("0", "no", "off", "false") or not sys.platform.startswith("linux"):
        return False                                  # (macOS: its system libraries are not fork-safe)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return cpus >= 2
