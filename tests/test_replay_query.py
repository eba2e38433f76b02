"""A new query on a batch-order (Adam / AdamW) run: the work a query's top-k does is cut, and its
answers stay those of the full plan (issue 18, "a new query's top-k").

* methods/diffin.replay_step: influence alone (``run(need_self=False)``: `diffin top`, Explore's
  exact path) skips the Lanczos views, which only self-influence reads;
* engine/adam_batches.adopt_check: a query on a finished run takes the run's replay self-check
  from its meta.json instead of replaying every interval again;
* engine/functional.hvp_directional: each step's HVP and per-sample jvps in one pass;
* _Replay.latest_first: an interval replayed once when its records fit the memory budget.
The reference everywhere is the plan a full score builds (views, a fresh self-check, the HVP and
the jvp apart, sqrt-block replays)."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.optim import AdamW

from diffin_core.engine import adam_batches, dropout, propagate
from diffin_core.engine.functional import FunctionalModel, no_tf32
from diffin_core.engine.hvp import summary as hvp_summary
from diffin_core.methods import ScoreSettings
from diffin_core.methods import runner
from diffin_core.methods.diffin import DiffIn
from diffin_core.project.checkpoints import read_manifest
from diffin_core.run.context import manifest_context
from diffin_core.run.scoring import run_method
from diffin_core.tasks.truth import TorchRecipe, batch_order, digits_case, digits_mlp, train_torch, warmup_cosine


@pytest.fixture(scope="module")
def adamw_dropout(tmp_path_factory):
    """AdamW (lr 3e-3, wd 0.05, warm-up + cosine) with Dropout 0.2 on 320 digits, batch 32,
    5 epochs = 50 steps, recorded with the batch order and the generator states, one checkpoint
    every 10 steps."""
    root = tmp_path_factory.mktemp("adamw-dropout")
    recipe = TorchRecipe("adamw-dropout", digits_mlp(dropout=0.2), lambda p: AdamW(p, lr=3e-3, weight_decay=0.05),
                         warmup_cosine, random_seed=123)
    train, query = digits_case(noise=0.1, n_train=320, seed=0)
    x, y = torch.as_tensor(train.x, dtype=torch.float64), torch.as_tensor(train.y)
    train_torch(recipe, x, y, batch_order(320, 32, 5, seed=0), record_dir=root, every=10)
    return {"recipe": recipe, "train": train, "query": query,
            "manifest": read_manifest(root / "checkpoints" / "manifest.json")}


def _ctx(case, **settings):
    return manifest_context(case["recipe"].model_fn(), case["manifest"], case["train"],
                            ScoreSettings(device="cpu", **settings))


def _query(case, idx):
    q = case["query"]
    return q.x[idx], q.y[idx]


def _reference(case, idx, monkeypatch) -> np.ndarray:
    """Influence as the full plan gives it: a fresh self-check, every checkpoint's Lanczos view,
    the HVP and the jvp of each step apart (the fused pass refused), sqrt-block replays."""
    ctx = _ctx(case)
    runner.configure(ctx, runner.memory_plan(DiffIn(), ctx, False))
    ctx.memory = None                                  # no budget: the sqrt-block replays
    with monkeypatch.context() as mp:
        mp.setattr(FunctionalModel, "hvp_directional", _refuse)
        plan = DiffIn().prepare(ctx, *_query(case, idx))
    assert all(it.op is not None and it.rows is not None for it in plan)
    assert ctx.adam_check["passed"]
    return DiffIn().row_terms(ctx, plan, 0, ctx.n)


def _refuse(*_a, **_k):
    raise RuntimeError("refused by the test")


def _same_answer(new: np.ndarray, ref: np.ndarray, k: int = 10) -> None:
    """Equal to float rounding (1e-6 of the largest value), the same top k on both ends."""
    np.testing.assert_allclose(new, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    assert set(np.argsort(-new, kind="stable")[:k]) == set(np.argsort(-ref, kind="stable")[:k])
    assert set(np.argsort(new, kind="stable")[:k]) == set(np.argsort(ref, kind="stable")[:k])


def test_a_query_plan_skips_the_views_and_gives_the_full_plans_influence(adamw_dropout, monkeypatch):
    """`diffin top`'s plan (influence alone) makes no Lanczos view and no self-check replay when
    the run's check is adopted, and its influence equals the full plan's to float rounding
    (same top 10 on both ends)."""
    case = adamw_dropout
    idx = np.array([3, 17, 40])
    ref = _reference(case, idx, monkeypatch)

    scored = _ctx(case)
    adam_batches.decide(scored)                        # the run's check, as meta.json keeps it
    meta = json.loads(json.dumps({"adam_check": scored.adam_check}))

    ctx = _ctx(case)
    assert adam_batches.adopt_check(ctx, meta)["passed"]
    assert ctx.adam_checks.keys() == scored.adam_checks.keys()
    views = []
    monkeypatch.setattr(propagate, "hessian_view", lambda *a, **k: views.append(a) or _refuse())
    monkeypatch.setattr(adam_batches, "interval_check", _refuse)
    new = run_method(ctx, "diffin", *_query(case, idx), need_self=False)["influence"]
    assert views == []
    _same_answer(new, ref)
    assert hvp_summary(ctx)["adam_replay"] == "exact"


def test_hvp_directional_equals_the_hvp_and_the_jvp(adamw_dropout):
    """One pass gives H v of the batch-mean loss and each row's <g_i, v>, as hvp_exact and
    directional do, with a step's dropout masks applied and with the batch sliced."""
    case = adamw_dropout
    ctx = _ctx(case)
    rep = adam_batches._Replay(ctx, 2, held=False)
    _state, recs = rep.run(rep.a, rep.a + 2, rep.entry, keep=True)
    _s, _rows, x, y, j, th, _g, _m, _v, masks = recs[-1]
    assert masks is not None
    fm = ctx.fm_at(j)
    th = th.to(ctx.thetas[j].dtype)
    v = torch.randn(th.shape, generator=torch.Generator().manual_seed(0), dtype=th.dtype)
    with no_tf32(), dropout.applied(masks):
        hv, d = fm.hvp_exact(th, x, y, v), fm.directional(th, x, y, v)
        for rows in (None, 7):
            fm.max_rows = rows
            hv2, d2 = fm.hvp_directional(th, x, y, v)
            assert hv2.dtype == hv.dtype and d2.shape == d.shape
            assert float((hv2 - hv).norm() / hv.norm()) < 1e-5      # float32 rounding (the engine's dtype)
            assert float((d2 - d).norm() / d.norm()) < 1e-5
    fm.max_rows = None


def test_one_replay_per_interval_when_it_fits(adamw_dropout, monkeypatch):
    """latest_first hands out the same records, latest first, whether the interval is replayed
    once (its records fit the budget) or in sqrt blocks; the once-replay takes one batch gradient
    per step."""
    case = adamw_dropout
    ctx = _ctx(case)
    counts = {"grad": 0}
    real = adam_batches._grad

    def counted(*a, **k):
        counts["grad"] += 1
        return real(*a, **k)
    monkeypatch.setattr(adam_batches, "_grad", counted)

    def walk(budget):
        ctx.memory = None if budget is None else replace(runner.memory_plan(DiffIn(), ctx, False), budget=budget)
        counts["grad"] = 0
        rep = adam_batches._Replay(ctx, 1, held=False)
        out = [(r[0], r[5].clone(), r[6].clone(), r[7].clone(), r[8].clone()) for r in rep.latest_first()]
        return out, counts["grad"], (rep.a, rep.b)
    blocks, n_blocks, (a, b) = walk(None)
    steps = b - a
    once, n_once, _ = walk(1 << 34)
    assert steps >= 4 and [r[0] for r in once] == [r[0] for r in blocks] == list(range(b - 1, a - 1, -1))
    for a, b in zip(once, blocks):
        for ta, tb in zip(a[1:], b[1:]):
            assert torch.equal(ta, tb)
    assert n_once == steps and n_blocks > steps
    tight, n_tight, _ = walk(64)                      # nothing fits: the sqrt blocks (+ the probe step)
    assert [r[0] for r in tight] == [r[0] for r in blocks] and n_tight == n_blocks + 1


def test_adopted_check_failed_or_foreign(adamw_dropout):
    """A failed check adopted turns the replay off as decide() does (one approximation line); a
    check of another trajectory (its intervals differ) or of another replay is not adopted."""
    case = adamw_dropout
    scored = _ctx(case)
    adam_batches.decide(scored)
    summary = json.loads(json.dumps(scored.adam_check))

    failed = dict(summary, passed=False, failed=1, message="Adam replay self-check failed at 1 of 4 intervals (test)")
    ctx = _ctx(case)
    out = adam_batches.adopt_check(ctx, {"adam_check": failed})
    assert out["fallback"] == "checkpoint estimator" and ctx.batch_order is None
    assert failed["message"] in ctx.recipe.approximations

    foreign = json.loads(json.dumps(summary))
    foreign["per_checkpoint"][0]["interval"] = [0, 3]
    ctx = _ctx(case)
    assert adam_batches.adopt_check(ctx, {"adam_check": foreign}) is None and getattr(ctx, "adam_check", None) is None
    ctx = _ctx(case)
    assert adam_batches.adopt_check(ctx, {"sgd_check": dict(summary, replay="SGD")}) is None
    assert adam_batches.adopt_check(ctx, {}) is None and ctx.batch_order is not None


@pytest.mark.slow
def test_text_sample_new_query_equals_the_full_plan(tmp_path, monkeypatch):
    """On a small build of the text sample (a BERT trained by the Trainer + DiffinCallback:
    AdamW, warm-up + linear decay, clipping, dropout): `diffin top` on a new query equals the
    full plan's influence (views, fresh check, HVP and jvp apart) and `diffin top --exact`."""
    from diffin_core.project.folder import Project
    from diffin_core.project.sample_text import build_text_sample
    from diffin_core.run.context import project_context
    from diffin_core.run.scoring import score, top_k
    root = build_text_sample(tmp_path / "sms", n_train=96, n_query=24, epochs=2)
    score(root, "diffin", run="d", features=False)      # the replay path (the store's: test_span_store)
    project = Project(root)
    meta = project.run("d").meta
    assert meta["adam_check"]["passed"]

    ctx = project_context(project)
    runner.configure(ctx, runner.memory_plan(DiffIn(), ctx, False))
    ctx.memory = None
    q = project.query
    with monkeypatch.context() as mp:
        mp.setattr(FunctionalModel, "hvp_directional", _refuse)
        plan = DiffIn().prepare(ctx, q.x[[5]], q.y[[5]])
    ref = DiffIn().row_terms(ctx, plan, 0, ctx.n)

    with monkeypatch.context() as mp:
        mp.setattr(adam_batches, "interval_check", _refuse)     # the run's check is adopted
        mp.setattr(propagate, "hessian_view", _refuse)          # no view is made
        helpful, harmful = top_k(root, "d", [5], k=10)
    infl = np.load(root / "runs" / "d" / "topk" / "q5.npy")
    _same_answer(infl, ref)
    ex_help, ex_harm = top_k(root, "d", [5], k=10, exact=True)
    assert list(helpful["sample_id"]) == list(ex_help["sample_id"])
    assert list(harmful["sample_id"]) == list(ex_harm["sample_id"])
    order = np.argsort(-ref, kind="stable")[:10]
    assert set(helpful["sample_id"]) == set(np.asarray(project.train.ids)[order])

    # planning ahead on a run without a store: the exact path's answers, one context for all
    from diffin_core.run.scoring import answer_ahead
    assert answer_ahead(str(root), "d", [5, 7, 9]) == 2                 # query 5 was answered above
    (root / "runs" / "d" / "topk" / "q5.npy").unlink()
    assert answer_ahead(str(root), "d", [5]) == 1
    np.testing.assert_allclose(np.load(root / "runs" / "d" / "topk" / "q5.npy"), infl, rtol=0, atol=1e-12)
    assert (root / "runs" / "d" / "topk" / "q9.npy").is_file()
    shutil.rmtree(root, ignore_errors=True)


def test_direct_walk_in_place_equals_segment_rows(adamw_dropout, monkeypatch):
    """Adam's self-influence walk (DiffIn.direct_walk) with its adjoints carried in place
    (_rows_into) gives what SegmentOp.rows gives, checkpoint by checkpoint."""
    from diffin_core.methods import diffin as diffin_mod
    case = adamw_dropout
    ctx = _ctx(case)
    runner.configure(ctx, runner.memory_plan(DiffIn(), ctx, True))
    plan = DiffIn().prepare(ctx, *_query(case, np.arange(40)))
    tr = case["train"]
    x, y = ctx.tensors(np.asarray(tr.x[:48], dtype=np.float32), np.asarray(tr.y)[:48])
    assert diffin_mod._in_place(plan[0].op, torch.zeros(2, ctx.fm.num_params), torch.zeros(2, ctx.fm.num_params))
    infl, selfs = DiffIn().direct_walk(ctx, plan, x, y)
    monkeypatch.setattr(diffin_mod, "_in_place", lambda *a: False)
    infl0, selfs0 = DiffIn().direct_walk(ctx, plan, x, y)
    assert torch.equal(infl, infl0)
    torch.testing.assert_close(selfs, selfs0, rtol=1e-5, atol=1e-6 * float(selfs0.abs().max()))
