"""BatchNorm: every per-checkpoint computation uses that checkpoint's own running statistics;
a BatchNorm2d CNN trained with torch's SGD + momentum meets true leave-one-out; TracIn's
checkpoint weights follow torch's momentum update exactly."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from diffin_core.project.data import Split
from diffin_core.methods import ScoreSettings
from diffin_core.methods.first_order import checkpoint_weights
from diffin_core.engine.recipe import Recipe
from diffin_core.run.scoring import run_method
from diffin_core.run.context import make_context, manifest_context


def _bn_context(conv: bool):
    """Three checkpoints of one BatchNorm net whose running statistics differ a lot."""
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(),
                              nn.Flatten(), nn.Linear(12, 3))
    else:
        model = nn.Sequential(nn.Linear(16, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    rng = np.random.default_rng(0)
    train = Split(rng.normal(size=(40, 16)).astype(np.float32), rng.integers(0, 3, 40), np.arange(40))
    states = []
    for k in range(3):
        st = {n: v.clone() for n, v in model.state_dict().items()}
        for n in st:
            if n.endswith("running_mean"):
                st[n] = torch.full_like(st[n], 2.0 * k - 2.0)
            elif n.endswith("running_var"):
                st[n] = torch.full_like(st[n], 0.2 + k)
        states.append(st)
    ctx = make_context(model, states, [0, 10, 20], [0.1, 0.1, 0.1], train, ScoreSettings(device="cpu"))
    return ctx, train


@pytest.mark.parametrize("conv", [False, True], ids=["bn1d", "bn2d"])
def test_per_checkpoint_tasks_use_each_checkpoints_own_statistics(conv):
    """EL2N, MoSo, forgetting logits, first-order self-influence and TRAK evaluate checkpoint k
    with checkpoint k's running statistics (they used the final model's)."""
    from diffin_core.methods import label_issue
    from diffin_core.tasks import lds
    from diffin_core.tasks import curate as tasks
    ctx, train = _bn_context(conv)
    x = torch.as_tensor(train.x)
    own = torch.softmax(ctx.fm_at(0).logits(ctx.thetas[0], x), -1).double().numpy()
    final = torch.softmax(ctx.fm.logits(ctx.thetas[0], x), -1).double().numpy()
    assert not np.allclose(own, final, atol=1e-3)                 # the statistics matter here
    assert np.allclose(tasks._probs(ctx, 0), own, atol=1e-6)
    assert np.allclose(label_issue.checkpoint_logits(ctx, [0])[0],
                       ctx.fm_at(0).logits(ctx.thetas[0], x).double().numpy(), atol=1e-5)
    n, c = ctx.n, ctx.lrs * ctx.segments / ctx.n
    gd = [ctx.mean_grad(k, train.x, train.y) for k in range(ctx.m)]
    want = np.zeros(n)
    for k in range(ctx.m):
        g = ctx.fm_at(k).per_sample_grads(ctx.thetas[k], x, torch.as_tensor(train.y)).double()
        want += c[k] * ((n * (g @ gd[k].double()) - (g * g).sum(1)) / (n - 1)).numpy()
    assert np.allclose(tasks.moso_scores(ctx), want, rtol=1e-4, atol=1e-9)
    k0 = torch.as_tensor(train.x[:5]), torch.as_tensor(train.y[:5])
    g0 = ctx.fm_at(0).per_sample_grads(ctx.thetas[0], *k0)
    gf = ctx.fm.per_sample_grads(ctx.thetas[0], *k0)
    assert not torch.allclose(g0, gf, atol=1e-4)
    sbt = label_issue.first_order_self_by_target(ctx)
    g = [ctx.fm_at(k).per_sample_grads(ctx.thetas[k], x, torch.as_tensor(train.y)).double() for k in (0, 1)]
    w = label_issue.steps_before(ctx.steps, ctx.segments)
    expect1 = (g[1] * (c[0] * g[0] + c[1] * w[1, 1] * g[1])).sum(1).numpy()
    assert np.allclose(sbt[:, 1], expect1, rtol=1e-4, atol=1e-12)
    t = lds.trak_influence(ctx, train.x[:3], train.y[:3], dim=8, last=3)
    assert t.shape == (n, 3) and np.isfinite(t).all()


def test_batchnorm_nets_get_a_larger_hessian_batch():
    """The Hessian batch of a BatchNorm net is raised to bn_hessian_batch (256 samples measured too
    noisy there: benchmarks/recipes.py), capped at N; other nets keep hessian_batch."""
    ctx, _ = _bn_context(conv=True)
    assert ctx.hessian_rows == 1024 and len(ctx.sample_batch(ctx.hessian_rows, 0)[1]) == ctx.n
    assert replace(ctx, settings=ScoreSettings(bn_hessian_batch=0)).hessian_rows == 256
    lin = nn.Sequential(nn.Linear(16, 3))
    plain = make_context(lin, [lin.state_dict()] * 2, [0, 5], [0.1, 0.1], ctx.train, ScoreSettings(device="cpu"))
    assert plain.hessian_rows == 256


@pytest.mark.parametrize("recipe", [Recipe(momentum=0.9), Recipe(momentum=0.9, nesterov=True),
                                    Recipe(momentum=0.8, dampening=0.3)], ids=["heavy-ball", "nesterov", "dampening"])
def test_tracin_checkpoint_weights_follow_torch_sgd(recipe):
    """Checkpoint k's TracIn weight = the final weight change per unit gradient applied on the
    steps it owns, measured with torch.optim.SGD (cosine schedule, no curvature)."""
    steps, total = [0, 7, 19, 30, 40], 40
    model = nn.Linear(2, 2)
    train = Split(np.zeros((4, 2), np.float32), np.zeros(4, np.int64), np.arange(4))
    lrs = 0.1 * (0.5 + 0.5 * np.cos(np.pi * np.arange(total) / total))
    ctx = make_context(model, [model.state_dict()] * len(steps), steps, list(lrs[np.minimum(steps, total - 1)]),
                       train, ScoreSettings(device="cpu"), recipe=recipe, step_lrs=lrs)
    got = checkpoint_weights(ctx)
    for k in range(len(steps)):
        p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD([p], lr=0.1, momentum=recipe.momentum, dampening=recipe.dampening,
                              nesterov=recipe.nesterov)
        for s in range(total):
            opt.param_groups[0]["lr"] = float(lrs[s])
            p.grad = torch.full((1,), float(ctx.bounds[k] <= s < ctx.bounds[k + 1]), dtype=torch.float64)
            opt.step()
        assert got[k] == pytest.approx(-float(p.detach()), rel=1e-9), k
    plain = replace(ctx, recipe=Recipe())
    assert np.allclose(checkpoint_weights(plain), plain.lrs * plain.segments)
    assert got[-1] < ctx.lrs[-1] * ctx.segments[-1] * 0.8       # truncated: not lr/(1-beta) at the end


@pytest.mark.slow
@pytest.mark.parametrize("count", [5, 20])
def test_batchnorm2d_cnn_meets_true_leave_one_out(tmp_path_factory, count):
    """A BatchNorm2d CNN trained with torch's SGD + momentum 0.9 (cosine schedule), recorded by
    the Recorder: diffin vs float64 trajectory leave-one-out, above TracIn (issue 7: >= 0.8)."""
    case, m = _cnn_case(tmp_path_factory)
    idx = sorted({int(round(i)) for i in np.linspace(0, len(m.checkpoints) - 1, count)})
    sub = replace(m, checkpoints=[m.checkpoints[i] for i in idx])
    rho = {}
    for method in ("diffin", "tracin"):
        ctx = manifest_context(case["recipe"].model_fn(), sub, case["train"], ScoreSettings(device="cpu"))
        est = run_method(ctx, method, case["query"].x, case["query"].y, need_self=False)["influence"]
        rho[method] = spearmanr(est[case["samples"]], case["truth"])[0]
    assert rho["diffin"] >= 0.8 and rho["diffin"] > rho["tracin"] + 0.2, rho


_CASES: dict = {}


def _cnn_case(tmp_path_factory):
    if "cnn" not in _CASES:
        from diffin_core.project.checkpoints import read_manifest
        from diffin_core.tasks.truth import batchnorm_cnn_recipe, recipe_case
        root = tmp_path_factory.mktemp("bn2d")
        case = recipe_case(batchnorm_cnn_recipe(), root, n_train=800, epochs=8, samples=40, every=10)
        _CASES["cnn"] = case, read_manifest(root / "checkpoints" / "manifest.json")
    return _CASES["cnn"]


# --- batchnorm.py: BatchNorm as training ran it (the comparison path of benchmarks/batchnorm_modes.py)
def _tiny(conv: bool):
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))
        x = torch.randn(40, 2, 6, 6, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
        x = torch.randn(40, 6, dtype=torch.float64)
    model = model.double().eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model, x, torch.randint(0, 3, (40,))


def _sum_grad(model, x, y):
    m = __import__("copy").deepcopy(model).train()
    nn.functional.cross_entropy(m(x), y, reduction="sum").backward()
    return torch.cat([p.grad.reshape(-1) for p in m.parameters()])


@pytest.mark.parametrize("conv", [False, True], ids=["bn1d", "bn2d"])
def test_train_mode_derivatives_match_torch_train_mode(conv):
    """Batch-statistics gradients equal torch's train mode (buffers untouched); a sample's effective
    gradient (its loss + its effect through the statistics) matches adding it to the batch; the
    eval-only forward equals eval mode."""
    from diffin_core.engine.batchnorm import TrainModeModel, batch_statistics, effective_directional
    from diffin_core.engine.functional import FunctionalModel
    model, x, y = _tiny(conv)
    fm = FunctionalModel(model)
    theta = fm.theta_of(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = _sum_grad(model, x[:16], y[:16]) / 16
    got = TrainModeModel.of(fm).batch_grad(theta, x[:16], y[:16])
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    v = torch.randn_like(theta)
    cx, cy, zx, zy = x[:30], y[:30], x[30:], y[30:]
    eff = effective_directional(fm, theta, zx, zy, v, cx, cy)
    base = _sum_grad(model, cx, cy)
    added = torch.stack([(_sum_grad(model, torch.cat([cx, zx[i:i + 1]]), torch.cat([cy, zy[i:i + 1]])) - base) @ v
                         for i in range(len(zy))])
    assert float((eff - added).norm() / added.norm()) < 0.1             # first order in 1/31
    own = effective_directional(fm, theta, zx, zy, v, cx, cy, through_stats=False)
    assert float((own - added).norm() / added.norm()) > float((eff - added).norm() / added.norm())
    with batch_statistics(model, running_values="only"):
        a = fm.logits(theta, x)
    assert torch.allclose(a, fm.logits(theta, x), atol=1e-12)


def test_train_mode_path_equals_diffin_without_batchnorm():
    """Without BatchNorm the train-mode comparison path is Diff-In itself (same plan, same scores)."""
    from diffin_core.engine.batchnorm import train_mode_influence
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 3))
    rng = np.random.default_rng(0)
    train = Split(rng.normal(size=(40, 16)).astype(np.float32), rng.integers(0, 3, 40), np.arange(40))
    states = []
    for k in range(3):
        states.append({n: v + 0.1 * k * torch.randn_like(v) for n, v in model.state_dict().items()})
    ctx = make_context(model, states, [0, 10, 20], [0.1, 0.1, 0.1], train, ScoreSettings(device="cpu"),
                       recipe=Recipe(momentum=0.9))
    q = train.x[:4], train.y[:4]
    want = run_method(ctx, "diffin", *q, need_self=False)["influence"]
    got = train_mode_influence(ctx, *q, train.x, train.y).numpy()
    assert np.allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())        # float32 rounding
