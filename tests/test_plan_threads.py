"""Issue 23, a new query's plan made cheaper without changing it: batch gradients whose slices run
one thread each (in parallel where torch has several threads) give the same bits at any thread
count, and the Hessian batches' gradients kept with the run (features.BaseGrads) give the same
plan as fresh ones, with one batch gradient fewer per checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffin_core.engine.functional import FunctionalModel, _reverse_grad, available_threads, single_threaded
from diffin_core.engine.models import SmallCNN
from diffin_core.methods.diffin import DiffIn
from diffin_core.project.folder import Project
from diffin_core.run import features as F
from diffin_core.run.context import project_context
from diffin_core.run.scoring import score, top_k

from helpers import make_tiny_project


def _threads(n):
    class At:
        def __enter__(self):
            self.saved = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.saved)
    return At()


def test_batch_gradient_same_bits_at_any_thread_count(monkeypatch):
    from diffin_core.engine import functional
    monkeypatch.setattr(functional, "SLICE_WORKERS", 3)              # the slices on parallel threads too
    torch.manual_seed(0)
    model = SmallCNN()
    fm = FunctionalModel(model)
    fm.max_rows = 64
    theta = fm.theta_of(model)
    x, y = torch.rand(150, 1, 28, 28), torch.randint(0, 10, (150,))     # 3 slices, the last short
    with _threads(1):                                                   # the slices in turn, as before
        ref = fm._sliced(lambda xs, ys: _reverse_grad(fm.mean_loss, theta, xs, ys), x, y)
        one = fm.batch_grad(theta, x, y)
        q1 = fm.batch_grad(theta, x[:1], y[:1])                         # one small slice
    assert torch.equal(one, ref)
    for n in (2, 3):
        with _threads(n):
            assert torch.equal(fm.batch_grad(theta, x, y), ref)
            assert torch.equal(fm.batch_grad(theta, x[:1], y[:1]), q1)
            assert torch.get_num_threads() == n                         # restored
    assert len(fm._replicas) == 2                                       # a module copy per extra thread
    # inside single_threaded, batch gradients still see the threads outside it
    with _threads(2), single_threaded():
        assert torch.get_num_threads() == 1 and available_threads() == 2
        assert torch.equal(fm.batch_grad(theta, x, y), ref)
    # a torch.func transform slices in the caller's thread as before (same value, float rounding)
    g = torch.func.vmap(lambda t: fm.batch_grad(t, x, y))(theta[None])[0]
    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)


def test_plan_same_at_any_thread_count_and_with_the_runs_kept_base_gradients(tmp_path, monkeypatch):
    project = Project(make_tiny_project(tmp_path / "p"))
    score(project, "diffin", run="d")
    q = project.query
    F._CTX.clear()
    ctx = F._context(project, "d")
    assert isinstance(ctx.base_grads, F.BaseGrads) and not ctx.base_grads
    kept, ctx.base_grads = ctx.base_grads, None
    with _threads(1):
        fresh = DiffIn().prepare(ctx, q.x[[3]], q.y[[3]])
    with _threads(2):
        two = DiffIn().prepare(ctx, q.x[[3]], q.y[[3]])
    assert all(torch.equal(a.w, b.w) for a, b in zip(fresh, two))     # the same bits on 2 threads
    ctx.base_grads = kept
    with _threads(1):
        first = F.exact_plan(ctx, q.x[[3]], q.y[[3]])                   # fills and saves the base
    assert len(kept) == ctx.m and kept.path.is_file()
    assert all(torch.equal(a.w, b.w) for a, b in zip(fresh, first))
    # another process: the run's kept base gradients, one batch gradient fewer per checkpoint
    F._CTX.clear()
    ctx2 = F._context(project, "d")
    assert len(ctx2.base_grads) == ctx.m
    calls = []
    real = FunctionalModel.batch_grad
    monkeypatch.setattr(FunctionalModel, "batch_grad", lambda self, *a: (calls.append(1), real(self, *a))[1])
    with _threads(2):
        again = DiffIn().prepare(ctx2, q.x[[3]], q.y[[3]])
    n_kept = len(calls)
    ctx2.base_grads = None
    calls.clear()
    with _threads(1):
        DiffIn().prepare(ctx2, q.x[[3]], q.y[[3]])
    assert n_kept == len(calls) - ctx.m
    assert all(torch.equal(a.w, b.w) for a, b in zip(fresh, again))
    monkeypatch.undo()
    # the fast path's values are `diffin top --exact`'s
    fast_h, fast_m = top_k(project, "d", [5], k=5)
    assert fast_h.attrs["path"].startswith("exact path: this query's own plan")
    exact_h, exact_m = top_k(project, "d", [5], k=5, exact=True)
    for f, e in ((fast_h, exact_h), (fast_m, exact_m)):
        assert list(f["sample_id"]) == list(e["sample_id"])
        np.testing.assert_allclose(f["influence"], e["influence"], rtol=1e-6, atol=0)
    # a kept base of other settings (another Hessian batch) is not used
    F._CTX.clear()
    ctx3 = F._context(project, "d")
    monkeypatch.setattr(ctx3.settings, "hessian_batch", 32)
    from diffin_core.engine.propagate import base_grad_key
    assert base_grad_key(ctx3, ctx3.m - 1) not in ctx3.base_grads
    # a plan made by the exact path's own context (no kept base) is the same
    exact_ctx = F.configured(project_context(project))
    from diffin_core.engine.hvp import adopt
    adopt(exact_ctx, project.run("d").meta.get("hvp"))
    plan_exact = DiffIn().prepare(exact_ctx, q.x[[3]], q.y[[3]])
    assert all(torch.equal(a.w, b.w) for a, b in zip(fresh, plan_exact))


def test_a_forked_twin_gives_the_same_plan_and_rescored_values(tmp_path, monkeypatch):
    """Issue 23: the process's twin (engine/twin.py) computes the later half of every batch
    gradient's slices and of the rescored rows; the plan and the values are the same bits as one
    process's, the twin ignores a model it does not know, and a dead twin leaves the work here."""
    from diffin_core.engine import functional, twin
    monkeypatch.setattr(twin, "usable", lambda: True)                  # whatever this machine's CPUs
    project = Project(make_tiny_project(tmp_path / "p"))
    score(project, "diffin", run="d")
    q = project.query
    F._CTX.clear()
    ctx = F._context(project, "d")
    with _threads(1):
        alone = DiffIn().prepare(ctx, q.x[[3]], q.y[[3]])
        rows = np.arange(ctx.n)
        here = F.rescore_rows(ctx, alone, rows)
    assert getattr(ctx, "twin", None) is None and functional._TWIN is None
    tw = F.with_twin(ctx)
    assert tw is not None and tw.alive and functional._TWIN is tw
    calls = []
    real = tw.submit
    monkeypatch.setattr(tw, "submit", lambda *a: (calls.append(a[0]), real(*a))[1])
    with _threads(1):
        paired = DiffIn().prepare(ctx, q.x[[3]], q.y[[3]])
        both = F.rescore_rows(ctx, paired, rows)
    assert "grad" in calls and "rescore" in calls                      # the twin took its halves
    assert all(torch.equal(a.w, b.w) for a, b in zip(alone, paired))
    assert np.array_equal(here, both)
    # a model the twin does not know (made after its fork): computed here, the same bits
    torch.manual_seed(0)
    other = FunctionalModel(SmallCNN())
    other.max_rows = 64
    theta = other.theta_of(other.model)
    x, y = torch.rand(150, 1, 28, 28), torch.randint(0, 10, (150,))
    calls.clear()
    with _threads(1):               # both at one thread: a 2-thread kernel rounds otherwise
        g = other.batch_grad(theta, x, y)
        ref = other._sliced(lambda a, b: _reverse_grad(other.mean_loss, theta, a, b), x, y)
    assert calls == [] and torch.equal(g, ref)
    # the twin gone: the plan is made here, the same
    monkeypatch.undo()
    os_pid = tw.pid
    import os
    import signal
    os.kill(os_pid, signal.SIGKILL)
    os.waitpid(os_pid, 0)
    with _threads(1):
        after = DiffIn().prepare(ctx, q.x[[3]], q.y[[3]])
    assert not tw.alive
    assert all(torch.equal(a.w, b.w) for a, b in zip(alone, after))
    functional.stop_twin()
    assert functional._TWIN is None


def test_the_twin_takes_the_calls_only_where_it_is_faster():
    """Batch gradients are timed PROBE with the twin and PROBE alone, then RUN go the faster way,
    and both are timed again (a loaded machine: alone; a free core: the twin)."""
    from diffin_core.engine import twin
    t = twin.Twin.__new__(twin.Twin)                                    # no fork: the bookkeeping only
    t.alive = True
    t._plan = [("twin", twin.PROBE), ("alone", twin.PROBE)]
    t._walls = {"twin": [0.0, 0], "alone": [0.0, 0]}

    def cycle(twin_s, alone_s):
        ways = []
        for _ in range(2 * twin.PROBE):
            ways.append(t.wanted())
            t.note(twin_s if ways[-1] else alone_s, ways[-1])
        assert ways == [True] * twin.PROBE + [False] * twin.PROBE
        ways = []
        for _ in range(twin.RUN):
            ways.append(t.wanted())
            t.note(twin_s if ways[-1] else alone_s, ways[-1])
        return ways
    assert cycle(0.030, 0.020) == [False] * twin.RUN                    # the twin slower: alone
    assert cycle(0.012, 0.020) == [True] * twin.RUN                     # a free core: the twin
    t.alive = False
    assert not t.wanted()


def test_closing_a_hung_twin_kills_it_instead_of_waiting():
    """A twin that does not read its pipe (hung on a lock held at the fork, or busy) must never hang
    this process's exit (`diffin serve` on Ctrl-C waited on it in CI): close() reaps a healthy twin
    at once and kills one still there after its bound."""
    import os
    import signal
    import time
    from diffin_core.engine import twin
    healthy = twin.Twin({})
    t0 = time.monotonic()
    healthy.close()
    assert time.monotonic() - t0 < twin.CLOSE_S and not healthy.alive
    with pytest.raises(ChildProcessError):
        os.waitpid(healthy.pid, os.WNOHANG)                             # reaped: no zombie left
    hung = twin.Twin({})
    os.kill(hung.pid, signal.SIGSTOP)                                   # it reads nothing from now on
    t0 = time.monotonic()
    hung.close(wait_s=0.5)
    took = time.monotonic() - t0
    assert 0.5 <= took < 5, took
    with pytest.raises(ChildProcessError):
        os.waitpid(hung.pid, os.WNOHANG)                                # killed and reaped
