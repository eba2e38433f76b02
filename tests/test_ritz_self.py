"""Diff-In's self-influence in Ritz coordinates (ritz_self.walk) gives the direct walk's numbers
(DiffIn.direct_walk: each row's adjoints carried as P-vectors), per checkpoint, on a tiny
BatchNorm CNN trained with torch's SGD (plain, and heavy ball + weight decay), chunked and with
the plan read lazily from its stage folder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffin_core.methods import ritz_self
from diffin_core.methods import runner
from diffin_core.engine.budget import plan_memory
from diffin_core.project.data import Split
from diffin_core.methods import METHODS, ScoreSettings
from diffin_core.methods.diffin import DiffIn
from diffin_core.engine.recipe import Recipe
from diffin_core.run.context import make_context
from diffin_core.project.stages import Stages, StageSettings


def bn_case(momentum: float, weight_decay: float):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = 48
    x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, n)
    x[np.arange(n), 0, y * 2, y * 2] += 3.0
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Tanh(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    states, steps = [], []
    for step in range(13):
        if step % 4 == 0:
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            steps.append(step)
        idx = torch.as_tensor(rng.choice(n, 12, replace=False))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
        opt.step()
    states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    steps.append(13)
    recipe = Recipe(momentum=momentum, weight_decay=weight_decay)
    s = ScoreSettings(lanczos_steps=6, hessian_batch=16, bn_hessian_batch=0)
    ctx = make_context(model, states, steps, [0.05] * len(steps), Split(x, y, np.arange(n)), s, recipe=recipe)
    return ctx, x[:6], y[:6]


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 5e-3)])
def test_ritz_coordinates_equal_the_direct_walk(momentum, weight_decay):
    ctx, qx, qy = bn_case(momentum, weight_decay)
    method = DiffIn()
    plan = method.prepare(ctx, qx, qy)
    assert ritz_self.applies(ctx) and len(plan) == ctx.m - 1          # step 0 owns no steps
    assert all(it.op.view.vectors.shape[1] >= 6 for it in plan)
    for a in (0, 20, 40):
        x, y = ctx.tensors(ctx.train.x[a:a + 7], ctx.train.y[a:a + 7])
        i_ref, s_ref = method.direct_walk(ctx, plan, x, y)
        i_new, s_new = ritz_self.walk(ctx, plan, x, y, method._grams)
        scale = float(s_ref.abs().max())
        assert scale > 0 and bool((s_ref.sum(1) > 0).any())
        torch.testing.assert_close(i_new, i_ref, rtol=1e-4, atol=1e-5 * float(i_ref.abs().max()))
        torch.testing.assert_close(s_new, s_ref, rtol=1e-4, atol=1e-4 * scale)
    # a second plan (another query) is not scored with the first plan's Gram matrices
    other = method.prepare(ctx, ctx.train.x[30:33], ctx.train.y[30:33])
    x, y = ctx.tensors(ctx.train.x[:5], ctx.train.y[:5])
    s_ref = method.direct_walk(ctx, other, x, y)[1]
    torch.testing.assert_close(ritz_self.walk(ctx, other, x, y, method._grams)[1], s_ref,
                               rtol=1e-4, atol=1e-4 * float(s_ref.abs().max()))


def test_lazy_plan_and_chunks_give_the_direct_walks_scores(tmp_path):
    """The whole run (plan spilled to a stage folder, one entry kept, chunks of 5) equals the
    direct walk in one chunk with the in-memory plan."""
    ctx, qx, qy = bn_case(0.9, 5e-3)
    method = DiffIn()
    plan = method.prepare(ctx, qx, qy)
    x, y = ctx.tensors(ctx.train.x, ctx.train.y)
    ref = method.direct_walk(ctx, plan, x, y)[1].sum(1).double().numpy()
    stages = Stages(tmp_path, StageSettings("diffin", {}, "q", "t"))
    mem = plan_memory(ctx.fm.num_params, 10_000, "diffin", True, budget=2**33, batch_size=5, checkpoints=1)
    out = runner.run(METHODS["diffin"](), ctx, qx, qy, True, stages=stages, mem=mem)
    np.testing.assert_allclose(out["self_influence"], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 5e-3)])
def test_blocked_products_equal_the_products_apart(monkeypatch, tmp_path, momentum, weight_decay):
    """Issue 19: a large model's walk (no stacked plan, on the CPU) makes a step's products
    (g @ w, Y_j^T g for j <= i, Y_i^T g_F, <g_F, g>) in one pass over blocks of the parameters
    (ritz_self.blocked_products). Forced on the tiny CNN with blocks of 13 parameters (not
    dividing P): the same numbers as the products apart and the direct walk, in memory and with
    the plan read lazily from its stage folder (one entry kept), and as float64 products."""
    ctx, qx, qy = bn_case(momentum, weight_decay)
    method = DiffIn()
    plan = method.prepare(ctx, qx, qy)
    x, y = ctx.tensors(ctx.train.x[:9], ctx.train.y[:9])
    monkeypatch.setattr(ritz_self.Grams, "stacked", lambda self, plan, ctx: None)
    monkeypatch.setattr(ritz_self, "BLOCK_MIN_PARAMS", 10 ** 12)
    i_apart, s_apart = ritz_self.walk(ctx, plan, x, y, ritz_self.Grams())
    calls = []
    orig = ritz_self.blocked_products
    monkeypatch.setattr(ritz_self, "blocked_products", lambda *a: calls.append(len(a[3])) or orig(*a))
    monkeypatch.setattr(ritz_self, "BLOCK_MIN_PARAMS", 1)
    monkeypatch.setattr(ritz_self, "BLOCK_ROWS", 13)
    assert ctx.fm.num_params % 13
    i_blk, s_blk = ritz_self.walk(ctx, plan, x, y, ritz_self.Grams())
    assert calls == list(range(1, len(plan) + 1))                # every step blocked, Y_0..Y_i
    i_ref, s_ref = method.direct_walk(ctx, plan, x, y)
    for got, apart, ref in ((i_blk, i_apart, i_ref), (s_blk, s_apart, s_ref)):
        scale = float(ref.abs().max())
        torch.testing.assert_close(got, apart, rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * scale)
    stages = Stages(tmp_path, StageSettings("diffin", {}, "q", "t"))   # the plan from disk, one entry kept
    mem = plan_memory(ctx.fm.num_params, 10_000, "diffin", True, budget=2**33, batch_size=5, checkpoints=1)
    out = runner.run(METHODS["diffin"](), ctx, qx, qy, True, stages=stages, mem=mem)
    xa, ya = ctx.tensors(ctx.train.x, ctx.train.y)
    ref = method.direct_walk(ctx, plan, xa, ya)[1].sum(1).double().numpy()
    np.testing.assert_allclose(out["self_influence"], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # the products themselves, against float64 (w or not; g the final gradient or not)
    gen = torch.Generator().manual_seed(1)
    g, gf, w = (torch.randn(*s, generator=gen) for s in ((3, 1000), (3, 1000), (1000,)))
    ys = [torch.randn(1000, r, generator=gen) for r in (4, 6)]
    d = lambda t: t.double()                                                    # noqa: E731
    for rows in (13, 1000, 4096):
        monkeypatch.setattr(ritz_self, "BLOCK_ROWS", rows)
        g_w, ons, f_on, d_f = orig(g, gf, w, ys)
        torch.testing.assert_close(d(g_w), d(g) @ d(w), rtol=1e-5, atol=1e-5)
        for on, yy in zip(ons, ys):
            torch.testing.assert_close(d(on), d(g) @ d(yy), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d(f_on), d(gf) @ d(ys[-1]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d(d_f), (d(gf) * d(g)).sum(1), rtol=1e-5, atol=1e-5)
        none_w, ons, no_f, d_f = orig(g, g, None, ys[:1])
        assert none_w is None and no_f is None and len(ons) == 1 and ons[0].dtype == g.dtype
        torch.testing.assert_close(d(d_f), (d(g) ** 2).sum(1), rtol=1e-5, atol=1e-5)


def test_adam_with_a_preconditioner_keeps_the_direct_walk_and_its_budget():
    import dataclasses
    ctx, _, _ = bn_case(0.0, 0.0)
    assert DiffIn().memory_key(ctx) == "diffin"
    adam = dataclasses.replace(ctx, recipe=Recipe("AdamW", weight_decay=0.01, decoupled=True),
                               precond=[torch.ones_like(t) for t in ctx.thetas])
    assert not ritz_self.applies(adam) and DiffIn().memory_key(adam) == "diffin-adam"
    small = plan_memory(10**7, 10**6, "diffin", True, budget=2**32).grad_chunk
    assert plan_memory(10**7, 10**6, "diffin-adam", True, budget=2**32).grad_chunk < small


@pytest.mark.parametrize("momentum,weight_decay,k_best", [(0.0, 0.0, 2), (0.9, 5e-3, 1), (0.0, 0.0, 3)])
def test_folded_label_issue_equals_its_separate_pass(monkeypatch, momentum, weight_decay, k_best):
    """label_issue at an early checkpoint k*: folded into the scoring walk (one per-sample
    gradient per checkpoint for both walks) gives the separate pass's numbers, in chunks."""
    from diffin_core.methods import label_issue
    monkeypatch.setattr(label_issue, "best_checkpoint", lambda q, steps: k_best)
    ctx, qx, qy = bn_case(momentum, weight_decay)
    ctx.settings.batch_size = 10                                   # several chunks, a ragged last one
    folded = DiffIn().run(ctx, qx, qy)
    assert ctx.timings["label_issue_folded"] and ctx.timings["label_issue_checkpoint"] == k_best
    monkeypatch.setattr(DiffIn, "fold_label_issue", False)
    ctx2, _, _ = bn_case(momentum, weight_decay)
    ctx2.settings.batch_size = 10
    separate = DiffIn().run(ctx2, qx, qy)
    assert not ctx2.timings["label_issue_folded"]
    assert not np.allclose(separate["label_issue"], separate["self_influence"] - np.log(separate["probs"][
        np.arange(ctx.n), ctx.train.y]))                            # k* is not the last checkpoint
    for key in ("influence", "self_influence", "label_issue", "probs"):
        np.testing.assert_allclose(folded[key], separate[key], rtol=1e-5, atol=1e-9 * np.abs(separate[key]).max())
    assert "fold_self" not in folded and "fold_probs" not in folded


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 5e-3)])
def test_the_label_plan_and_the_query_plan_share_the_hessian_batch_gradients(monkeypatch, momentum, weight_decay):
    """Issue 19: with the score's kept Hessian-batch gradients (scoring.keep_base_grads) the query
    plan reuses those the folded label_issue plan at k* computed (the same batch at the same
    checkpoints 0..k*) instead of computing them again, and every score is the same bits."""
    from diffin_core.engine.functional import FunctionalModel
    from diffin_core.methods import label_issue
    from diffin_core.run.scoring import keep_base_grads
    k_best = 2
    monkeypatch.setattr(label_issue, "best_checkpoint", lambda q, steps: k_best)
    real = FunctionalModel.batch_grad
    grads = []
    monkeypatch.setattr(FunctionalModel, "batch_grad",
                        lambda self, theta, x, y: (grads.append(len(y)), real(self, theta, x, y))[1])
    outs, counts = [], []
    for keep in (False, True):
        ctx, qx, qy = bn_case(momentum, weight_decay)
        ctx.settings.hvp = "fd"                     # every view takes finite differences from its base
        rows = min(ctx.hessian_rows, ctx.n)
        if keep:
            keep_base_grads(ctx)
            assert ctx.base_grads == {}
        grads.clear()
        outs.append(DiffIn().run(ctx, qx, qy))
        assert ctx.timings["label_issue_folded"]
        counts.append(grads.count(rows))
    owned = [k for k in range(ctx.m) if ctx.bounds[k + 1] > ctx.bounds[k]]
    assert counts[0] - counts[1] == len([k for k in owned if k <= k_best]) > 0, counts
    assert len(ctx.base_grads) == len(owned)
    for key in ("influence", "self_influence", "label_issue", "probs"):
        assert np.array_equal(outs[0][key], outs[1][key]), key


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 5e-3)])
def test_the_query_plan_adopts_the_label_plans_hvp_probes(monkeypatch, momentum, weight_decay):
    """Issue 19: `--hvp auto` probes every Lanczos view's first product with an exact product.
    The folded label_issue plan at k* (built first) views the same Hessian batches at checkpoints
    0..k*; the query plan adopts its decisions there (label_issue.share_probes) and probes only the
    later checkpoints. The scores are the same bits as with a probe in every view, and meta.json's
    hvp views keep a measured error for every checkpoint (the run's queries adopt them)."""
    from diffin_core.engine import hvp
    from diffin_core.engine.functional import FunctionalModel
    from diffin_core.methods import label_issue
    k_best = 2
    monkeypatch.setattr(label_issue, "best_checkpoint", lambda q, steps: k_best)
    probes, sharing = [], {}
    real, real_share = FunctionalModel.hvp_retained, label_issue.share_probes
    monkeypatch.setattr(FunctionalModel, "hvp_retained", lambda self, *a: (probes.append(1), real(self, *a))[1])
    monkeypatch.setattr(label_issue, "share_probes", lambda ctx, sub: real_share(ctx, sub) if sharing["on"] else None)
    outs, counts, ctxs = [], [], []
    for share in (False, True):
        sharing["on"] = share
        ctx, qx, qy = bn_case(momentum, weight_decay)
        assert ctx.settings.hvp == "auto"
        probes.clear()
        outs.append(DiffIn().run(ctx, qx, qy))
        assert ctx.timings["label_issue_folded"]
        counts.append(len(probes))
        ctxs.append(ctx)
    owned = [k for k in range(ctx.m) if ctx.bounds[k + 1] > ctx.bounds[k]]
    shared = [k for k in owned if k <= k_best]
    assert counts[0] - counts[1] == len(shared) > 0, counts
    views = [e for e in ctxs[1].hvp_log if e["where"] == "lanczos"]
    assert sorted(e["checkpoint"] for e in views if e.get("adopted")) == shared
    s, s0 = hvp.summary(ctxs[1]), hvp.summary(ctxs[0])
    assert set(s["views"]) == set(s0["views"]) == {str(k) for k in owned}
    assert all(v["used"] == "fd" and v["fd_error"] <= hvp.ADOPT_TOL for v in s["views"].values())
    assert s["lanczos_views"] == s0["lanczos_views"]
    for key in ("influence", "self_influence", "label_issue", "probs"):
        assert np.array_equal(outs[0][key], outs[1][key]), key


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 5e-3)])
def test_the_walk_makes_no_host_round_trip_per_chunk(monkeypatch, momentum, weight_decay):
    """The GPU score path (issue 19, item 4), checked on the CPU: runner.score_rows keeps every
    chunk's results on the device and checks them once per row range, and the Ritz walk reads
    its scalars once per plan, so the number of device-to-host reads does not grow with the
    number of chunks (and the scores equal the one-chunk ones)."""
    ctx, qx, qy = bn_case(momentum, weight_decay)
    method = DiffIn()
    plan = method.prepare(ctx, qx, qy)
    reads = {"n": 0}
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            reads["n"] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    counts, outs = {}, {}
    for chunk in (48, 6, 4):                        # 1, 8 and 12 chunks over the same rows
        method._grams = ritz_self.Grams()
        reads["n"] = 0
        outs[chunk] = runner.score_rows(method, ctx, plan, 0, 48, True, chunk)
        counts[chunk] = reads["n"]
    assert counts[48] > 0 and counts[6] == counts[48] == counts[4], counts     # the per-range reads only
    for chunk in (6, 4):                            # float32: a chunk size changes the GEMM
        for key in ("influence", "self_influence", "probs"):   # blocking, by ulps of the scale
            scale = np.abs(outs[48][key]).max()
            np.testing.assert_allclose(outs[chunk][key], outs[48][key], rtol=1e-5, atol=1e-5 * scale)


def test_a_non_finite_score_is_still_one_line_after_the_deferred_check():
    from diffin_core.errors import DiffinError
    ctx, qx, qy = bn_case(0.0, 0.0)
    method = DiffIn()
    plan = method.prepare(ctx, qx, qy)
    plan[1].w[:] = float("nan")                     # checkpoint plan[1].k's influence turns NaN
    with pytest.raises(DiffinError, match=rf"non-finite influence at checkpoint {plan[1].k + 1}/"):
        runner.score_rows(method, ctx, plan, 0, 24, True, 6)
