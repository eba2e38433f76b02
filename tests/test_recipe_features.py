"""Recipe features real training scripts use, against true trajectory leave-one-out (issue 17).

Digits MLP 64-32-10 (10% flipped labels), 400 samples, batch 32, 6 epochs (78 steps), recorded by
the Recorder with rec.step(batch_ids=...) and one checkpoint per epoch (what people save); the
truth retrains in float64 without each of 24 samples. Per feature: per-group lr / weight decay,
frozen groups (lr 0 and requires_grad False), gradient clipping (recorded and detected), gradient
accumulation, and the stated loss (label smoothing).
"""
import json
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch.optim import SGD
from torch.optim.lr_scheduler import CosineAnnealingLR

from diffin_core.project.checkpoints import Recorder, read_manifest
from diffin_core.methods import ScoreSettings
from diffin_core.engine.recipe import RecipeWarning
from diffin_core.run.context import manifest_context
from diffin_core.run.scoring import run_method
from diffin_core.tasks.truth import TorchRecipe, digits_mlp, recipe_case

N_TRAIN, EPOCHS, BATCH, SAMPLES = 400, 6, 32, 24
EVERY = N_TRAIN // BATCH            # one checkpoint per epoch


def _cos(o, t):
    return CosineAnnealingLR(o, T_max=t)


def _two_groups(p, body, head, **kw):
    """SGD momentum 0.9 with the first layer (weight, bias) as one group and the head as another."""
    p = list(p)
    return SGD([{"params": p[:2], "lr": body}, {"params": p[2:], "lr": head}], momentum=0.9, **kw)


def _frozen_body(p):
    p = list(p)
    for q in p[:2]:
        q.requires_grad_(False)
    return SGD([{"params": p[:2]}, {"params": p[2:]}], lr=0.05, momentum=0.9)


def _case(recipe, tmp_path, seed=0):
    return recipe_case(recipe, tmp_path, n_train=N_TRAIN, epochs=EPOCHS, batch=BATCH, samples=SAMPLES, every=EVERY,
                       seed=seed)


def _score(case, recipe, tmp_path, method="diffin", expect_warning=None):
    m = read_manifest(tmp_path / "checkpoints/manifest.json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx = manifest_context(recipe.model_fn(), m, case["train"], ScoreSettings(device="cpu"))
    lines = [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)]
    if expect_warning is None:
        assert not lines, lines
    else:
        assert len(lines) == 1 and expect_warning in lines[0], lines
    out = run_method(ctx, method, case["query"].x, case["query"].y, need_self=False)
    pred = out["influence"][case["samples"]]
    return ctx, spearmanr(pred, case["truth"])[0], np.median(np.abs(pred)) / np.median(np.abs(case["truth"]))


@pytest.mark.parametrize("body,head", [(0.005, 0.05), (0.05, 0.005)], ids=["head-lr-10x", "body-lr-10x"])
def test_per_group_lr_and_weight_decay_against_leave_one_out(body, head, tmp_path):
    """Each group moves with its own lr and weight decay: rank and size both right, whichever group
    comes first (issue 17 measured sizes 0.67x / 1.16x with one lr for all)."""
    recipe = TorchRecipe("groups", digits_mlp(), lambda p: _two_groups(p, body, head, weight_decay=5e-3), _cos)
    case = _case(recipe, tmp_path)
    ctx, rho, size = _score(case, recipe, tmp_path)
    assert ctx.groups is not None
    assert rho >= 0.95 and 0.8 <= size <= 1.25, (rho, size)


@pytest.mark.parametrize("body,wd", [(0.05, (5e-3, 0.0)), (0.005, (5e-3, 5e-3))], ids=["wd-groups", "lr-groups"])
def test_per_group_self_influence_against_leave_one_out(body, wd, tmp_path):
    """Self-influence with per-group hyper-parameters takes the generic walk (op.rows with the
    per-group scale; ritz_self's closed span assumes one complement value). Per-group weight decay:
    it matches true self-influence. A body lr 10x below the head's: measured 0.55, TracIn 0.40
    (0.93 / 0.75 with one lr): asserted above TracIn only (a doubt, docs/recipes.md)."""
    from diffin_core.methods import ritz_self

    def opt(p):
        p = list(p)
        return SGD([{"params": p[:2], "lr": body, "weight_decay": wd[0]},
                    {"params": p[2:], "lr": 0.05, "weight_decay": wd[1]}], momentum=0.9)
    recipe = TorchRecipe("groups-self", digits_mlp(), opt, _cos)
    case = recipe_case(recipe, tmp_path, n_train=N_TRAIN, epochs=EPOCHS, batch=BATCH, samples=4, every=EVERY,
                       self_samples=20)
    m = read_manifest(tmp_path / "checkpoints/manifest.json")
    ctx = manifest_context(recipe.model_fn(), m, case["train"], ScoreSettings(device="cpu"))
    assert ctx.groups is not None and not ritz_self.applies(ctx)
    rho = {}
    for method in ("diffin", "tracin"):
        out = run_method(ctx, method, case["query"].x, case["query"].y, need_self=True)
        rho[method] = spearmanr(out["self_influence"][case["self_samples"]], case["self_truth"])[0]
    if body == 0.05:
        assert rho["diffin"] >= 0.9, rho
    else:
        assert rho["diffin"] > rho["tracin"] + 0.05, rho


def test_per_group_weight_decay_alone_is_modelled(tmp_path):
    """Weight decay on the weights, none on the biases (the standard no-decay groups), one lr."""
    def opt(p):
        p = list(p)
        return SGD([{"params": [p[0], p[2]], "weight_decay": 0.05}, {"params": [p[1], p[3]], "weight_decay": 0.0}],
                   lr=0.05, momentum=0.9)
    recipe = TorchRecipe("nodecay", digits_mlp(), opt, _cos)
    case = _case(recipe, tmp_path)
    ctx, rho, size = _score(case, recipe, tmp_path)
    assert ctx.groups is not None and sorted(ctx.groups.wd) == [0.0, 0.05]
    assert rho >= 0.95 and 0.8 <= size <= 1.25, (rho, size)


@pytest.mark.parametrize("how", ["lr-0", "requires-grad-false"])
def test_a_frozen_group_contributes_zero(how, tmp_path):
    """A frozen first layer (lr 0, or requires_grad False) never moves: its coordinates carry no
    influence, and the trained head's influence matches leave-one-out."""
    make = (lambda p: _two_groups(p, 0.0, 0.05)) if how == "lr-0" else _frozen_body
    recipe = TorchRecipe("frozen", digits_mlp(), make, _cos)
    case = _case(recipe, tmp_path)
    ctx, rho, size = _score(case, recipe, tmp_path)
    body = 64 * 32 + 32
    assert float(ctx.groups.lr_scale(0)[:body].abs().max()) == 0.0
    from diffin_core.engine.propagate import build_plan
    plan = build_plan(ctx, ctx.mean_grad(ctx.m - 1, case["query"].x, case["query"].y))
    assert all(float(it.w[:body].abs().max()) == 0.0 for it in plan)
    assert all(float(it.w[body:].abs().max()) > 0.0 for it in plan)
    assert rho >= 0.95 and 0.8 <= size <= 1.25, (rho, size)


def test_clipping_recorded_per_step_and_modelled(tmp_path):
    """rec.clip_grad_norm_ records torch's factor on every step. Clipped on every step (max norm
    0.3), the norm's response to z matters (the update is c g / |g|): with the batch order the
    per-step path (sgd_batches.py) takes each sample's removal through the clipped gradients
    (adam_batches.clip_removal) and matches leave-one-out;
    without the batch order the checkpoint walk holds the factor fixed, says so in one line, and
    ranks far worse (0.50 measured)."""
    from dataclasses import replace
    recipe = TorchRecipe("clip", digits_mlp(), lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-3), _cos,
                         clip=0.3)
    case = _case(recipe, tmp_path)
    raw = json.loads((tmp_path / "checkpoints/manifest.json").read_text())
    assert raw["clip"]["max_norm"] == 0.3
    factors = np.load(tmp_path / "checkpoints/clip_factors.npy")
    m = read_manifest(tmp_path / "checkpoints/manifest.json")
    assert len(factors) == m.checkpoints[-1].step and (factors < 1).all()
    # modelled: the removal through each clipped gradient taken exactly (no approximation line)
    ctx, rho, size = _score(case, recipe, tmp_path)
    np.testing.assert_array_equal(ctx.clip, factors[:len(ctx.step_lrs)])
    assert ctx.batch_order is not None
    assert rho >= 0.9 and 0.8 <= size <= 1.25, (rho, size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        walk = manifest_context(recipe.model_fn(), replace(m, batch_order=None), case["train"],
                                ScoreSettings(device="cpu"))
    lines = [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)]
    assert len(lines) == 1 and "gradient clipping's norm held fixed" in lines[0]
    pred = run_method(walk, "diffin", case["query"].x, case["query"].y, need_self=False)["influence"]
    assert spearmanr(pred[case["samples"]], case["truth"])[0] < rho - 0.2


@pytest.mark.parametrize("max_norm,seed", [(0.6, 0), (0.3, 1)], ids=["clip-half-steps-seed0", "clip-every-step-seed1"])
def test_clipped_sgd_sizes_take_the_removal_through_the_clip_exactly(max_norm, seed, tmp_path):
    """The two clipped runs whose sizes missed (recipe_features.csv: 0.65x and 0.77x true
    leave-one-out while the replay's check passed). The replay's linear response was right (it
    equals the float64 derivative in the sample's weight, benchmarks/clip_nonlinearity.py); the
    removal is not linear through a clipped step: clip(g - g_z / B) keeps the norm C, so whichever
    way g_z turns the step it shortens it along g^ (a second-order term of one sign), and a step
    near C switches between clipped and not. Taking each sample's removal through its steps'
    clipped gradients exactly (adam_batches.clip_removal) meets the target; its linear part alone
    (ctx.clip_max_norm None: what ran before) is further off on both, out of the target on the
    first (on these 24 samples the second's linear size is 1.24x, just inside it)."""
    recipe = TorchRecipe("clip", digits_mlp(), lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-3), _cos,
                         clip=max_norm)
    case = _case(recipe, tmp_path, seed=seed)
    ctx, rho, size = _score(case, recipe, tmp_path)
    assert ctx.clip_max_norm == max_norm and ctx.batch_order is not None and ctx.moments is not None
    assert rho >= 0.95 and 0.8 <= size <= 1.25, (rho, size)
    assert not ctx.clip_stats.get("mismatched")          # the replay's norm reproduced every recorded factor
    m = read_manifest(tmp_path / "checkpoints/manifest.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecipeWarning)
        lin = manifest_context(recipe.model_fn(), m, case["train"], ScoreSettings(device="cpu"))
    lin.clip_max_norm = None                              # the linearised removal: the previous engine
    pred = run_method(lin, "diffin", case["query"].x, case["query"].y, need_self=False)["influence"][case["samples"]]
    lin_size = np.median(np.abs(pred)) / np.median(np.abs(case["truth"]))
    assert abs(np.log(size)) < abs(np.log(lin_size)) - 0.15, (lin_size, size)
    if max_norm == 0.6:                                   # the linear part alone misses the target here
        assert lin_size < 0.8, lin_size


def test_clipped_sgd_with_dropout_masks_and_sliced_per_sample_gradients(tmp_path, monkeypatch):
    """clip_removal's per-sample pass under a step's recorded dropout masks (each row its own masks),
    and in slices of a few rows (the memory cap of large models): the same scores as one slice, and
    the target met (measured: Spearman 0.98 / size 0.86 linear, 1.00 / 0.99 exact, 30 samples)."""
    from diffin_core.engine import adam_batches
    recipe = TorchRecipe("clip-dropout", digits_mlp(dropout=0.2), lambda p: SGD(p, lr=0.05, momentum=0.9,
                                                                                  weight_decay=5e-3),
                         _cos, clip=0.6, random_seed=3)
    case = _case(recipe, tmp_path)
    ctx, rho, size = _score(case, recipe, tmp_path)
    assert ctx.rng is not None and ctx.clip_max_norm == 0.6 and bool((ctx.clip < 1).any())
    assert rho >= 0.95 and 0.8 <= size <= 1.25, (rho, size)
    whole = run_method(ctx, "diffin", case["query"].x, case["query"].y, need_self=False)["influence"]
    monkeypatch.setattr(adam_batches, "CLIP_ROWS_BYTES", 8 * ctx.fm.num_params * 5)      # 5 rows a slice
    m = read_manifest(tmp_path / "checkpoints/manifest.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecipeWarning)
        sliced_ctx = manifest_context(recipe.model_fn(), m, case["train"], ScoreSettings(device="cpu"))
    sliced = run_method(sliced_ctx, "diffin", case["query"].x, case["query"].y, need_self=False)["influence"]
    np.testing.assert_allclose(sliced, whole, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("clip", [False, True], ids=["no-clip", "clip"])
@pytest.mark.parametrize("kind", ["sgd-momentum", "nesterov", "adamw", "adam-coupled"])
def test_per_group_and_clip_segment_maps_equal_the_linear_recursion_on_a_quadratic(kind, clip):
    """Per-coordinate lr scale R (a frozen coordinate included), per-group weight decay and a
    per-step clip factor f (it scales the loss gradient, not torch's weight decay): with a full
    Lanczos view the segment op reproduces torch's update order on a quadratic step by step.
    (Coupled per-group decay on clipped steps is modelled along Rayleigh quotients, not exactly:
    that case runs without decay here.)"""
    from diffin_core.engine.lanczos import lanczos
    from diffin_core.engine.propagate import SegmentOp, segment_coefficients, step_constants
    from diffin_core.engine.recipe import GroupMap, Recipe, bias_correction1
    recipe = {"sgd-momentum": Recipe(momentum=0.9, dampening=0.1), "nesterov": Recipe(momentum=0.9, nesterov=True),
              "adamw": Recipe("AdamW", decoupled=True), "adam-coupled": Recipe("Adam")}[kind]
    rng = np.random.default_rng(1)
    p, n = 8, 23
    q, _ = np.linalg.qr(rng.normal(size=(p, p)))
    H = q @ np.diag(np.linspace(0.05, 3, p)) @ q.T
    sizes, tg = [3, 2, 2, 1], [0, 1, 0, -1]              # 4 tensors in 2 groups, the last one frozen
    lrs = 0.1 * (0.5 + 0.5 * np.cos(np.linspace(0, np.pi, n)))
    wd = np.array([0.0, 0.0]) if (clip and not recipe.decoupled) else np.array([0.05, 0.2])
    groups = GroupMap(tg, sizes, np.stack([lrs, 0.3 * lrs], 1), wd, 0, bounds=np.array([0, n]))
    R = groups.lr_scale(0, dtype=torch.float64).numpy()
    lamv = groups.decay_vector(dtype=torch.float64).numpy()
    D = np.exp(rng.normal(size=p)) if recipe.adam else np.ones(p)
    f = np.where(rng.random(n) < 0.5, rng.uniform(0.2, 1.0, n), 1.0) if clip else np.ones(n)
    gq, e = rng.normal(size=p), rng.normal(size=p)
    beta = step_constants(recipe)[0]
    d, mu = np.zeros(p), np.zeros(p)
    for s, eta in enumerate(lrs):                        # torch's order, on the removal's delta
        g = f[s] * (H @ d - e) + (0.0 if recipe.decoupled else lamv * d)
        if recipe.adam:
            d = d * (1 - eta * R * lamv) if recipe.decoupled else d
            mu = recipe.betas[0] * mu + (1 - recipe.betas[0]) * g
            d = d - eta * R * bias_correction1(s, recipe.betas[0]) * D * mu
        else:
            mu = g.copy() if s == 0 else beta * mu + (1 - recipe.dampening) * g
            d = d - eta * R * ((g + beta * mu) if recipe.nesterov else mu)
    S = np.sqrt(D * R)
    lam_in = np.zeros(p) if recipe.decoupled else lamv
    Mt = torch.tensor(S[:, None] * (H + np.diag(lam_in)) * S[None, :])
    view = lanczos(lambda v: Mt @ v, torch.tensor(gq * S), p - 1)     # rank p - 1: the frozen row is 0
    assert view.vectors.shape[1] == p - 1
    if recipe.decoupled:
        Y = view.vectors.numpy()
        decay, comp = np.concatenate([(Y * Y).T @ (lamv * R), wd * [1.0, 0.3]]), np.zeros(2)
    else:
        decay, comp = None, np.zeros(2)
    W, C = segment_coefficients(view.values.numpy(), lrs, 0, recipe, complement=comp, gscale=f, decay=decay,
                                coupled_in_matvec=True)
    op = SegmentOp(view, torch.tensor(W), torch.tensor(C), torch.tensor(S),
                   lambda vals: groups.expand(vals, dtype=torch.float64))
    w, _, _ = op.rows(torch.tensor(gq), torch.zeros(p, dtype=torch.float64) if beta > 0 else None)
    assert float(w[-1]) == 0.0                                            # the frozen coordinate
    # AdamW's per-group decoupled decay acts along each Ritz direction by its Rayleigh quotient
    # (lambda R does not commute with M): close, not exact; every other case is exact
    tol = 5e-3 if recipe.decoupled and len(set(wd * [1.0, 0.3])) > 1 else 1e-8
    assert float(w @ torch.tensor(e)) == pytest.approx(float(gq @ d), rel=tol)


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy-ball", "nesterov"])
def test_a_momentum_schedule_equals_the_linear_recursion_on_a_quadratic(nesterov):
    """SGD's momentum changing every step (OneCycleLR's cycle_momentum): the segment maps with
    per-step momenta reproduce torch's update order step by step on a quadratic."""
    from diffin_core.engine.lanczos import lanczos
    from diffin_core.engine.propagate import SegmentOp, segment_coefficients
    from diffin_core.engine.recipe import Recipe
    recipe = Recipe(momentum=0.9, dampening=0.0 if nesterov else 0.1, nesterov=nesterov, weight_decay=0.05)
    rng = np.random.default_rng(2)
    p, n = 10, 31
    q, _ = np.linalg.qr(rng.normal(size=(p, p)))
    H = q @ np.diag(np.linspace(0.05, 3, p)) @ q.T
    lrs = 0.1 * (0.5 + 0.5 * np.cos(np.linspace(0, np.pi, n)))
    moms = 0.85 + 0.1 * np.cos(np.linspace(0, np.pi, n))
    gq, e = rng.normal(size=p), rng.normal(size=p)
    d, mu = np.zeros(p), np.zeros(p)
    for s, eta in enumerate(lrs):
        g = H @ d + recipe.weight_decay * d - e
        mu = g.copy() if s == 0 else moms[s] * mu + (1 - recipe.dampening) * g
        d = d - eta * ((g + moms[s] * mu) if nesterov else mu)
    view = lanczos(lambda v: torch.tensor(H) @ v, torch.tensor(gq), p)
    W, C = segment_coefficients(view.values.numpy(), lrs, 0, recipe, momenta=moms)
    op = SegmentOp(view, torch.tensor(W), torch.tensor(C), None)
    w, _, _ = op.rows(torch.tensor(gq), torch.zeros(p, dtype=torch.float64))
    assert float(w @ torch.tensor(e)) == pytest.approx(float(gq @ d), rel=1e-9)


def test_clipping_without_the_recorder_is_detected(tmp_path):
    """torch.nn.utils.clip_grad_norm_ called directly: the step pre-hook sees the clipped steps at
    exactly max_norm, warns while recording, and scoring names it as not modelled."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Recorder(tmp_path, model, opt, train_size=64, every=4) as rec:
            for idx in torch.arange(64).split(8):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                opt.step()
                rec.step(batch_ids=idx)
    lines = [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)]
    assert len(lines) == 1 and "rec.clip_grad_norm_" in lines[0]
    m = read_manifest(tmp_path / "checkpoints/manifest.json")
    assert m.extra["detected_clipping"]["max_norm"] == pytest.approx(0.05, rel=1e-4)
    from diffin_core.project.data import Split
    with pytest.warns(RecipeWarning, match="gradient clipping .* not modelled"):
        manifest_context(model, m, Split(x.numpy(), y.numpy(), np.arange(64)), ScoreSettings(device="cpu"))


def test_gradient_accumulation_records_the_optimiser_step_batch(tmp_path):
    """2 micro-batches of 16 per optimiser step: the batch size recorded is 32 and every step's
    batch is the union; naming only one micro-batch's ids is caught while recording."""
    recipe = TorchRecipe("accum", digits_mlp(), lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-3), _cos,
                         accumulate=2)
    case = _case(recipe, tmp_path)
    raw = json.loads((tmp_path / "checkpoints/manifest.json").read_text())
    assert raw["batch_size"] == BATCH
    with np.load(tmp_path / "checkpoints/batch_order.npz") as z:
        assert np.diff(z["offsets"]).max() == BATCH
    ctx, rho, size = _score(case, recipe, tmp_path)
    assert rho >= 0.9 and 0.75 <= size <= 1.25, (rho, size)
    plain = TorchRecipe("plain", digits_mlp(), recipe.optimizer_fn, _cos)      # the same run in one batch per step
    _case(plain, tmp_path / "plain")
    ctx_plain = manifest_context(plain.model_fn(), read_manifest(tmp_path / "plain/checkpoints/manifest.json"),
                                 case["train"], ScoreSettings(device="cpu"))
    a, b = (run_method(c, "diffin", case["query"].x, case["query"].y, need_self=False)["influence"]
            for c in (ctx, ctx_plain))
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    with pytest.warns(RecipeWarning, match="union of the micro-batches"):
        with Recorder(tmp_path / "micro", model, opt, every=4) as rec:
            for idx in torch.arange(32).split(8):
                opt.zero_grad()
                for micro in idx.split(4):
                    torch.nn.functional.cross_entropy(model(x[micro]), y[micro]).backward()
                opt.step()
                rec.step(batch_ids=micro)           # only the last micro-batch: wrong


def _smoothing_recipe():
    return TorchRecipe("smooth", digits_mlp(), lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-3), _cos,
                       loss=torch.nn.CrossEntropyLoss(label_smoothing=0.1))


def test_label_smoothing_recorded_and_used_by_every_estimator(tmp_path):
    """Recorder(..., loss=nn.CrossEntropyLoss(label_smoothing=0.1)) records it; scoring then uses the
    smoothed per-sample loss (training and query side): sizes match leave-one-out, which plain
    cross-entropy misses (1.27x measured)."""
    recipe = _smoothing_recipe()
    case = _case(recipe, tmp_path)
    raw = json.loads((tmp_path / "checkpoints/manifest.json").read_text())
    assert raw["loss"] == {"name": "cross_entropy", "label_smoothing": 0.1, "ignore_index": -100, "reduction": "mean"}
    ctx, rho, size = _score(case, recipe, tmp_path)
    assert ctx.fm.loss.label_smoothing == 0.1
    assert rho >= 0.9 and 0.8 <= size <= 1.25, (rho, size)


def test_label_smoothing_with_adam_is_named_in_one_line(tmp_path):
    """AdamW with label smoothing: removal is not linear there (measured 1.35-1.38x the exact linear
    response, benchmarks/removal_nonlinearity.py). With the batch order recorded the replay removes
    each sample's own term of Adam's moments exactly (adam_batches.own_removal; sizes 0.84 / 0.82x in
    benchmarks/recipes.py "label-smoothing-0.1", the linear response 0.74 / 0.73x), and the line says
    that; without it the checkpoint estimator's linear response scores and the line gives its
    figures. Either way one line; the SGD run above (within the target) has no such line."""
    from torch import nn
    from torch.optim import AdamW
    from diffin_core.project.data import Split
    x, y = torch.randn(64, 64, dtype=torch.float64), torch.arange(64) % 10
    train = Split(x.numpy().astype(np.float32), y.numpy(), np.arange(64))
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    for ordered in (True, False):
        folder = tmp_path / ("ordered" if ordered else "plain")
        model = digits_mlp()()
        opt = AdamW(model.parameters(), lr=1e-2)
        with Recorder(folder, model, opt, train_size=64, every=2, loss=loss) as rec:
            for s in range(4):
                idx = np.arange(16 * s, 16 * s + 16)
                opt.zero_grad()
                loss(model(x[idx]), y[idx]).backward()
                opt.step()
                rec.step(batch_ids=idx) if ordered else rec.step()
        m = read_manifest(folder / "checkpoints/manifest.json")
        with pytest.warns(RecipeWarning) as caught:
            ctx = manifest_context(digits_mlp()(), m, train, ScoreSettings(device="cpu"))
        assert (ctx.batch_order is not None) == ordered
        lines = [a for a in ctx.recipe.approximations if "label smoothing (0.1) with Adam" in a]
        assert len(lines) == 1 and "\n" not in lines[0], ctx.recipe.approximations
        if ordered:
            assert "own term of Adam's moments exactly" in lines[0] and "0.84 / 0.82x" in lines[0], lines[0]
        else:
            assert "1.35-1.38x" in lines[0] and "record the batch order" in lines[0], lines[0]
        assert any(lines[0] in str(w.message) for w in caught)


LOSS_PY = '''import torch
import torch.nn.functional as F


def smoothed(logits, y):
    """Per-sample cross-entropy with label smoothing 0.1, written out by hand."""
    logp = F.log_softmax(logits, -1)
    return -(0.9 * logp.gather(1, y[:, None])[:, 0] + 0.1 * logp.mean(-1))
'''


def test_loss_py_user_function_and_stated_options(tmp_path):
    """[model] loss = "loss.py:fn" (a per-sample function, imported from the project like model.py)
    gives the same influence as the recorded label smoothing; a stated loss that contradicts the
    recorded one is refused in one line; bad [model] loss options are refused naming diffin.toml."""
    from diffin_core.project.data import Split
    from diffin_core.errors import DiffinError
    from diffin_core.project.folder import Project
    from diffin_core.run.context import project_context
    recipe = _smoothing_recipe()
    case = recipe_case(recipe, tmp_path, n_train=160, epochs=2, batch=32, samples=4, every=5)
    root = tmp_path
    (root / "data").mkdir()
    np.savez(root / "data/train.npz", x=case["train"].x, y=case["train"].y)
    np.savez(root / "data/query.npz", x=case["query"].x[:20], y=case["query"].y[:20])
    (root / "model.py").write_text("import torch\nfrom torch import nn\n\n\ndef build():\n    return nn.Sequential("
                                   "nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))\n")
    (root / "loss.py").write_text(LOSS_PY)
    toml = ('[model]\nfactory = "model.py:build"\n{loss}\n[data]\ntrain = "data/train.npz"\nquery = "data/query.npz"\n'
            'kind = "tabular"\n\n[checkpoints]\nmanifest = "checkpoints/manifest.json"\n')
    settings = ScoreSettings(device="cpu")
    out = {}
    for name, line in [("recorded", ""), ("user", 'loss = "loss.py:smoothed"'),
                       ("stated", "loss = {name = \"cross_entropy\", label_smoothing = 0.1}")]:
        (root / "diffin.toml").write_text(toml.format(loss=line))
        ctx = project_context(Project(root), settings)
        out[name] = run_method(ctx, "diffin", np.asarray(case["query"].x[:20]), case["query"].y[:20],
                               need_self=False)["influence"]
    assert np.abs(out["user"] - out["recorded"]).max() <= 1e-4 * np.abs(out["recorded"]).max()
    assert np.abs(out["stated"] - out["recorded"]).max() <= 1e-6 * np.abs(out["recorded"]).max()
    (root / "diffin.toml").write_text(toml.format(loss="loss = {name = \"cross_entropy\", label_smoothing = 0.2}"))
    with pytest.raises(DiffinError, match="recorded with cross_entropy .label_smoothing 0.1") as err:
        project_context(Project(root), settings)
    assert "\n" not in str(err.value)
    for line, match in [("loss = {label_smothing = 0.1}", "did you mean 'label_smoothing'"),
                        ("loss = \"mse\"", "not supported"), ("loss = {label_smoothing = 1.5}", r"\[0, 1\)")]:
        (root / "diffin.toml").write_text(toml.format(loss=line))
        with pytest.raises(DiffinError, match=match) as err:
            Project(root)
        assert "diffin.toml" in str(err.value)
    del Split


def test_sgd_sharp_steps_named_in_one_line():
    """SGD's checkpoint walk names, once, a segment whose largest step lr times its largest Ritz
    value exceeds SHARP_LIMIT (measured: right at 0.12, wrong at 0.46-0.47 with leave-one-out
    linear there; benchmarks/recipes.py): a RecipeWarning and the recipe's approximations line;
    nothing at or below the limit."""
    from types import SimpleNamespace
    from diffin_core.engine.propagate import SHARP_LIMIT, note_sharpness

    def ctx(lr):
        return SimpleNamespace(step_lrs=np.full(10, lr), recipe=SimpleNamespace(approximations=[], adam=False),
                               label=lambda k: f"checkpoint {k + 1}/2")
    view = SimpleNamespace(values=torch.tensor([0.3, 2.0]))
    quiet = ctx(SHARP_LIMIT / 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        note_sharpness(quiet, 0, view, 0, 10)
    assert quiet.recipe.approximations == []
    loud = ctx(0.25)                                  # 0.25 x 2.0 = 0.50
    with pytest.warns(RecipeWarning, match=r"Ritz value 0.50 at checkpoint 2/2.*not validated"):
        note_sharpness(loud, 1, view, 0, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        note_sharpness(loud, 0, view, 0, 10)          # once per context
    assert len(loud.recipe.approximations) == 1 and "SGD steps large" in loud.recipe.approximations[0]


def test_sgd_replay_of_a_clipped_run_states_a_linearised_clip_in_one_line():
    """SGD's replay takes the removal through a 2-norm clip over every parameter exactly: no line.
    Another clip (norm_type inf, or a clip over part of the parameters) keeps the linear part and
    says so in one line with the benchmark's measured cost; AdamW's replay (linear, within the
    target) and unclipped runs carry none; the checkpoint walk has its own line."""
    from diffin_core.project.checkpoints import Manifest
    from diffin_core.run.context import clip_approximations
    two = Manifest(train_size=10, checkpoints=[], extra={"clip": {"max_norm": 1.0, "norm_type": 2.0,
                                                                  "all_params": True, "factors": "f.npy"}})
    inf = Manifest(train_size=10, checkpoints=[], extra={"clip": {"max_norm": 1.0, "norm_type": float("inf"),
                                                                  "all_params": True, "factors": "f.npy"}})
    part = Manifest(train_size=10, checkpoints=[], extra={"clip": {"max_norm": 1.0, "norm_type": 2.0,
                                                                   "all_params": False, "factors": "f.npy"}})
    clipped, unclipped = np.array([1.0, 0.5, 0.8, 1.0]), np.ones(4)
    assert clip_approximations(two, clipped, replayed=True, adam=False) == []
    for m, what in ((inf, "norm_type inf"), (part, "part of the parameters")):
        (line,) = clip_approximations(m, clipped, replayed=True, adam=False)
        assert "SGD's replay (2 of 4 steps clipped" in line and what in line and "0.65-1.15x" in line
        assert "\n" not in line
        assert clip_approximations(m, clipped, replayed=True, adam=True) == []
        assert clip_approximations(m, unclipped, replayed=True, adam=False) == []
    (walk,) = clip_approximations(two, clipped, replayed=False, adam=False)     # the checkpoint walk's own line
    assert "norm held fixed" in walk
