"""Dropout replayed (engine/dropout.py): the Recorder keeps the generator states of every random
training forward, the engine redraws each step's masks from them and evaluates the train-mode
network with those masks. Truth: trajectory leave-one-out in float64 with the same masks
(tasks/truth.py, ``random_seed``: z left out by loss weight 0, so every retraining draws alike)."""
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from torch.optim import SGD, AdamW

from diffin_core.engine import dropout
from diffin_core.engine.functional import FunctionalModel
from diffin_core.engine.recipe import RecipeWarning
from diffin_core.methods import ScoreSettings
from diffin_core.project.checkpoints import Recorder, load_rng, read_manifest
from diffin_core.run.context import manifest_context
from diffin_core.run.scoring import run_method
from diffin_core.tasks.truth import TorchRecipe, digits_mlp, recipe_case, warmup_cosine


class Net(nn.Module):
    """nn.Dropout, a functional F.dropout and an alpha dropout (affine noise) in one forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.drop, self.b = nn.Linear(6, 8), nn.Dropout(0.3), nn.Linear(8, 3)

    def forward(self, x):
        h = self.drop(torch.tanh(self.a(x)))
        h = F.dropout(h, 0.2, self.training)
        return self.b(F.alpha_dropout(h, 0.1, self.training))


def _record(tmp_path, model, x, y, steps=3, micro=2, extra=None):
    """Train ``steps`` SGD steps of all rows in ``micro`` micro-batches under the Recorder; returns
    (manifest, per step the list of training's micro-batch logits, per step the summed gradient)."""
    opt = SGD(model.parameters(), lr=0.1)
    logits, grads = [], []
    with Recorder(tmp_path, model, opt, train_size=len(y), every=steps) as rec:
        torch.manual_seed(7)
        for _ in range(steps):
            opt.zero_grad()
            outs = []
            for part in np.array_split(np.arange(len(y)), micro):
                out = model(x[part])
                if extra is not None:
                    out = out + extra(out)
                outs.append(out.detach().clone())
                (F.cross_entropy(out, y[part], reduction="sum") / len(y)).backward()
            logits.append(outs)
            grads.append(torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()]))
            opt.step()
            rec.step(batch_ids=np.arange(len(y)))
    return read_manifest(tmp_path / "checkpoints" / "manifest.json"), logits, grads


def test_redrawn_masks_reproduce_training_forward_and_gradient(tmp_path):
    """Every batch quantity of a step, evaluated with the redrawn masks at the step's weights,
    is training's own: the micro-batches' logits, the batch gradient (also sliced by the memory
    budget), per-sample gradients (each sample its own mask row inside vmap) and directional
    derivatives agree with them."""
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    model = Net().double().train()
    thetas = []
    model.register_forward_pre_hook(lambda m, a: thetas.append(torch.cat([p.detach().reshape(-1).clone()
                                                                          for p in m.parameters()])))
    m, logits, grads = _record(tmp_path, model, x, y)
    rng = load_rng(m)
    assert m.extra["rng"]["forwards"] == 6 and list(rng.rows) == [5, 5] * 3
    fm = FunctionalModel(Net().double())
    for s in range(3):
        theta = thetas[2 * s]
        masks = dropout.capture(rng, s, fm, theta, x)
        with dropout.applied(masks):
            out = fm.logits(theta, x)
            g = fm.batch_grad(theta, x, y)
            fm.max_rows = 3                         # slices across the micro-batch boundary
            g_sliced = fm.batch_grad(theta, x, y)
            fm.max_rows = None
            per = fm.per_sample_grads(theta, x, y)
            v = torch.randn_like(theta)
            d = fm.directional(theta, x, y, v)
        assert torch.allclose(out, torch.cat(logits[s]), atol=1e-12)
        assert torch.allclose(g, grads[s], atol=1e-12) and torch.allclose(g_sliced, g, atol=1e-12)
        assert torch.allclose(per.mean(0), g, atol=1e-12) and torch.allclose(per @ v, d, atol=1e-10)
        assert not torch.allclose(fm.logits(theta, x), out)          # outside: the eval-mode network
    assert rng.problems == {}


def test_recorder_keeps_states_only_for_random_forwards(tmp_path):
    """A model that draws nothing in training records no "rng"; with dropout each random forward
    costs one compressed CPU generator state (measured here: under 4 KB a forward)."""
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    plain = nn.Sequential(nn.Linear(6, 3)).double()
    m, _l, _g = _record(tmp_path / "plain", plain, x, y)
    assert "rng" not in m.extra and load_rng(m) is None
    m, _l, _g = _record(tmp_path / "drop", Net().double(), x, y, steps=4, micro=1)
    info = m.extra["rng"]
    assert info["forwards"] == 4 and info["files"] == ["rng_000004.npz"] and info["bytes"] < 4 * 4096


def test_a_draw_the_replay_cannot_make_is_named(tmp_path):
    """Training that drew random numbers outside dropout (noise added to the logits here), or a
    generator state that does not lead to training's end state, is named in one approximation
    line, never silently replayed."""
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    model = Net().double()
    m, _l, _g = _record(tmp_path, model, x, y, steps=1)
    rng = load_rng(m)
    rng.after[:] = 12345                           # as if training's kernels drew differently
    fm = FunctionalModel(Net().double())
    dropout.capture(rng, 0, fm, fm.theta_of(model), x)
    assert "left the generator in another state" in dropout.problem_line(rng)
    later = load_rng(m)
    later = dropout.ForwardStates(later.step + 5, later.rows, later.cpu, None, later.after)
    assert dropout.capture(later, 0, fm, fm.theta_of(model), x) is None       # step 0's forward not recorded
    assert "no generator state was recorded" in dropout.problem_line(later)

    class Noisy(Net):
        def forward(self, x):
            return super().forward(x) + 0.01 * torch.randn(len(x), 3, dtype=x.dtype)
    m2, _l, _g = _record(tmp_path / "noisy", Noisy().double(), x, y, steps=1)
    rng2 = load_rng(m2)
    fm2 = FunctionalModel(Noisy().double())
    dropout.capture(rng2, 0, fm2, fm2.theta_of(Noisy().double()), x)
    line = dropout.problem_line(rng2)
    assert "drew random numbers outside dropout" in line and "\n" not in line


def _recipe(name, optimizer_fn, accumulate=1):
    return TorchRecipe(name, digits_mlp(dropout=0.2), optimizer_fn, warmup_cosine, accumulate=accumulate,
                       random_seed=123)


@pytest.fixture(scope="module", params=["sgd-momentum", "adamw"])
def dropout_case(request, tmp_path_factory):
    """Dropout 0.2 on the digits MLP, 320 samples, batch 32, 5 epochs = 50 steps, one checkpoint
    per epoch (every 10 steps), recorded with rec.step(batch_ids=...); SGD with momentum in two
    micro-batches per step (gradient accumulation: two forwards, two generator states a step)."""
    if request.param == "sgd-momentum":
        recipe = _recipe("sgd-dropout", lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4), accumulate=2)
    else:
        recipe = _recipe("adamw-dropout", lambda p: AdamW(p, lr=3e-3, weight_decay=0.05))
    root = tmp_path_factory.mktemp(request.param)
    case = recipe_case(recipe, root, n_train=320, epochs=5, samples=24, every=10, seed=0)
    case["manifest"] = read_manifest(root / "checkpoints" / "manifest.json")
    return case


def _score(case, manifest):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx = manifest_context(case["recipe"].model_fn(), manifest, case["train"], ScoreSettings(device="cpu"))
        est = run_method(ctx, "diffin", case["query"].x, case["query"].y, need_self=False)["influence"]
    lines = [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)]
    return ctx, est[case["samples"]], lines


def test_dropout_replayed_matches_leave_one_out_with_the_same_masks(dropout_case):
    """With the generator states recorded, each step's masks are redrawn: diffin ranks like true
    leave-one-out with the same masks and gets the sizes right, nothing about dropout is
    approximated, and Adam's replay self-check passes (it failed by 15-59% before). The same
    run read without the states ("rng" removed) is scored on the eval-mode network, says so in
    one line, and is measurably worse."""
    c = dropout_case
    m = c["manifest"]
    assert m.extra["rng"]["forwards"] == 50 * c["recipe"].accumulate and m.batch_order
    ctx, est, lines = _score(c, m)
    rho = spearmanr(est, c["truth"])[0]
    ratio = np.median(np.abs(est)) / np.median(np.abs(c["truth"]))
    assert rho >= 0.95 and 0.8 <= ratio <= 1.25, (rho, ratio)
    assert not any("Dropout" in ln or "dropout masks" in ln for ln in lines), lines
    assert ctx.batch_order is not None and ctx.rng is not None and ctx.rng.problems == {}
    if c["recipe"].name == "adamw-dropout":
        assert ctx.adam_check["passed"] and max(ctx.adam_check["worst"].values()) < 1e-4, ctx.adam_check["worst"]
    old = replace(m, extra={k: v for k, v in m.extra.items() if k != "rng"})
    _ctx, est_old, lines_old = _score(c, old)
    assert any("Dropout (1 layer, p=0.2): training's random masks are not replayed" in ln for ln in lines_old)
    assert spearmanr(est_old, c["truth"])[0] < rho


class _Noisy(torch.utils.data.Dataset):
    """Rows with random augmentation noise (drawn in the worker that loads them)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.01 * torch.randn(self.x.shape[1], dtype=self.x.dtype), self.y[i]


def test_masks_survive_shuffling_workers_and_augmentation(tmp_path):
    """A DataLoader loop that draws from the global generator between forwards (the shuffling
    sampler's epoch seed) and in 2 worker processes (augmentation): the states are read at each
    forward's start, so every step's masks are still training's own."""
    x, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    model = Net().double().train()
    opt = SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(_Noisy(x, y), batch_size=4, shuffle=True, num_workers=2)
    seen = []
    torch.manual_seed(11)
    with Recorder(tmp_path, model, opt, train_size=12, every=3) as rec:
        for _epoch in range(2):
            for xb, yb in rec.track(loader):
                theta = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
                out = model(xb)
                seen.append((theta, xb, out.detach().clone()))
                opt.zero_grad()
                F.cross_entropy(out, yb).backward()
                opt.step()
                rec.step()
    m = read_manifest(tmp_path / "checkpoints" / "manifest.json")
    rng, fm = load_rng(m), FunctionalModel(Net().double())
    assert m.extra["rng"]["forwards"] == 6 and m.batch_order
    for s, (theta, xb, out) in enumerate(seen):
        with dropout.applied(dropout.capture(rng, s, fm, theta, xb)):
            assert torch.allclose(fm.logits(theta, xb), out, atol=1e-12)
    assert rng.problems == {}
