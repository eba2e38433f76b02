"""Real training recipes against true trajectory leave-one-out (float64, torch's own optimisers).

Each recipe trains a digits MLP (10% flipped labels) with torch.optim classes and schedulers,
recorded by the Recorder; diffin scores from the recorded folder (float32) at 5 and 20
checkpoints and is compared with retraining without each sample. Plus: the segment maps are
exact on a quadratic, self-influence and label issues, determinism, old manifests, refusals.
"""
import json
import shutil
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from diffin_core.project.checkpoints import read_manifest, read_state, save_state
from diffin_core.errors import DiffinError
from diffin_core.engine.lanczos import lanczos
from diffin_core.methods import ScoreSettings
from diffin_core.engine.propagate import SegmentOp, segment_coefficients, step_constants
from diffin_core.engine.recipe import Recipe, RecipeWarning, adam_scale, bias_correction1, segment_adam_scale
from diffin_core.run.scoring import run_method
from diffin_core.run.context import make_context, manifest_context
from diffin_core.tasks.truth import recipe_case, standard_recipes

N_TRAIN, EPOCHS, SAMPLES, EVERY = 400, 6, 24, 4
PEER = {"adamw-warmup-cosine": "tracin-adam"}
TARGET = {"batchnorm-sgd-momentum": 0.8}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    out = {}
    for name in standard_recipes():
        out[name] = recipe_case(name, root / name, n_train=N_TRAIN, epochs=EPOCHS, samples=SAMPLES, every=EVERY,
                                self_samples=30 if name == "sgd-momentum-wd" else 0)
        out[name]["dir"] = root / name / "checkpoints"
    return out


def subset(case, count):
    m = read_manifest(case["dir"] / "manifest.json")
    idx = sorted({int(round(i)) for i in np.linspace(0, len(m.checkpoints) - 1, count)})
    return replace(m, checkpoints=[m.checkpoints[i] for i in idx])


_CACHE: dict = {}


def estimate(case, method, count, settings=None, need_self=False):
    key = (case["recipe"].name, method, count, need_self)
    if settings is None and key in _CACHE:
        return _CACHE[key]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)          # the Recorder records everything
        ctx = manifest_context(case["recipe"].model_fn(), subset(case, count), case["train"], settings or ScoreSettings())
    out = run_method(ctx, method, case["query"].x, case["query"].y, need_self=need_self)
    if settings is None:
        _CACHE[key] = out
    return out


def rho(case, method, count):
    return spearmanr(estimate(case, method, count)["influence"][case["samples"]], case["truth"])[0]


# --- exactness of the segment maps -------------------------------------------------------------
@pytest.mark.parametrize("recipe", [Recipe(), Recipe(weight_decay=0.1), Recipe(momentum=0.9),
                                    Recipe(momentum=0.9, dampening=0.2, weight_decay=0.05),
                                    Recipe(momentum=0.9, nesterov=True, weight_decay=0.05),
                                    Recipe("AdamW", weight_decay=0.1, decoupled=True), Recipe("Adam", weight_decay=0.1)],
                         ids=["sgd", "sgd-wd", "momentum", "momentum-dampening-wd", "nesterov-wd", "adamw", "adam-wd"])
def test_segment_maps_equal_the_linear_recursion_on_a_quadratic(recipe):
    """A quadratic loss with a fixed preconditioner: the per-Ritz-value 2x2 products (full Lanczos)
    reproduce torch's update order step by step, with a cosine schedule ending at lr 0."""
    rng = np.random.default_rng(0)
    p = 12
    q, _ = np.linalg.qr(rng.normal(size=(p, p)))
    H = q @ np.diag(np.linspace(0.05, 3, p)) @ q.T
    D = np.exp(rng.normal(size=p)) if recipe.adam else np.ones(p)
    gq, e = rng.normal(size=p), rng.normal(size=p)
    lrs = 0.1 * (0.5 + 0.5 * np.cos(np.linspace(0, np.pi, 37)))
    beta, _c, _a, _g = step_constants(recipe)
    lam = recipe.weight_decay
    d, mu = np.zeros(p), np.zeros(p)
    for s, eta in enumerate(lrs):                    # torch.optim's order, on the removal's delta
        g = H @ d + (0.0 if recipe.decoupled else lam * d) - e
        if recipe.adam:
            d = d * (1 - eta * lam) if recipe.decoupled else d
            mu = recipe.betas[0] * mu + (1 - recipe.betas[0]) * g
            d = d - eta * bias_correction1(s, recipe.betas[0]) * D * mu
        else:
            mu = g.copy() if s == 0 else beta * mu + (1 - recipe.dampening) * g
            d = d - eta * ((g + beta * mu) if recipe.nesterov else (mu if beta > 0 else g))
    S = np.sqrt(D)
    M = S[:, None] * H * S[None, :] + (0.0 if (recipe.decoupled or not recipe.adam) else lam * np.diag(D))
    Mt, St = torch.tensor(M), torch.tensor(S)
    view = lanczos(lambda v: Mt @ v, torch.tensor(gq) * St, p)
    W, C = segment_coefficients(view.values.numpy(), lrs, 0, recipe)
    op = SegmentOp(view, torch.tensor(W), torch.tensor(C), St if recipe.adam else None)
    w, _, _ = op.rows(torch.tensor(gq), torch.zeros(p, dtype=torch.float64) if beta > 0 else None)
    assert float(w @ torch.tensor(e)) == pytest.approx(float(gq @ d), rel=1e-9)


def test_segment_preconditioner_follows_adams_second_moment_through_the_segment():
    """With a stationary squared gradient per coordinate, the EMA between recorded anchors is exact:
    the segment's D equals the lr-weighted mean of Adam's own per-step D. The step-0 checkpoint
    (v after one step, near zero where that batch's gradient was) no longer gives D ~ 1/eps."""
    rng = np.random.default_rng(0)
    b2, eps, p = 0.99, 1e-8, 7
    g2 = rng.uniform(0.1, 2.0, p)
    g2_first = g2.copy()
    g2_first[:3] = 1e-18                                    # the first batch missed three features
    lrs = np.linspace(0.0, 1e-3, 60)
    v, vs = np.zeros(p), []
    for t in range(1, 61):                                   # Adam's v after t updates
        v = b2 * v + (1 - b2) * (g2_first if t == 1 else g2)
        vs.append(v.copy())
    truth_d = np.array([1 / (np.sqrt(vs[s] / (1 - b2 ** (s + 1))) + eps) for s in range(60)])
    anchors = [(vs[0], 1), (vs[29], 30), (vs[59], 60)]       # checkpoints at steps 0, 30, 60
    for k, (lo, hi) in enumerate([(0, 15), (15, 45), (45, 60)]):
        want = (lrs[lo:hi, None] * truth_d[lo:hi]).sum(0) / lrs[lo:hi].sum() if lrs[lo:hi].sum() else truth_d[lo:hi].mean(0)
        got = segment_adam_scale(anchors, k, lo, hi, lrs, b2, eps)
        exact_after_first = np.arange(p) >= 3 if k == 0 else np.ones(p, bool)
        assert np.allclose(got[exact_after_first], want[exact_after_first], rtol=1e-9)
    first = segment_adam_scale(anchors, 0, 0, 15, lrs, b2, eps)
    assert first[:3].max() < 1e3 < adam_scale(vs[0], 1, b2, eps)[:3].min()     # not 1/eps
    v, late_vs = np.zeros(p), []                             # recording began after 100 Adam steps
    for t in range(1, 161):
        v = b2 * v + (1 - b2) * g2 * (1 + 0.5 * (t > 130))   # g^2 steps up once, at an anchor
        late_vs.append(v.copy())
    truth_d = np.array([1 / (np.sqrt(late_vs[s + 100] / (1 - b2 ** (s + 101))) + eps) for s in range(60)])
    late = [(late_vs[100], 101), (late_vs[129], 130), (late_vs[159], 160)]
    got = segment_adam_scale(late, 1, 15, 45, lrs, b2, eps, offset=100)
    want = (lrs[15:45, None] * truth_d[15:45]).sum(0) / lrs[15:45].sum()
    assert np.allclose(got, want, rtol=2e-3) and not np.allclose(
        segment_adam_scale(late, 1, 15, 45, lrs, b2, eps), want, rtol=2e-3)      # without the offset


# --- ground truth per recipe ---------------------------------------------------------------------
@pytest.mark.slow
def test_truth_is_not_degenerate(cases):
    for name, case in cases.items():
        t = case["truth"]
        assert np.std(t) > 0.2 * np.abs(t).mean() and np.isfinite(t).all(), name      # a ranking to recover


@pytest.mark.slow
@pytest.mark.parametrize("count", [5, 20])
@pytest.mark.parametrize("name", ["sgd-momentum-wd", "nesterov"])
def test_diffin_meets_the_truth_on_sgd_recipes(cases, name, count):
    d, t = rho(cases[name], "diffin", count), rho(cases[name], "tracin", count)
    assert d >= 0.9 and d > t, (d, t)


@pytest.mark.slow
@pytest.mark.parametrize("count", [5, 20])
def test_adamw_without_batch_order_still_agrees_with_the_truth(cases, tmp_path, count):
    """Without the batch order (older manifests) AdamW is scored with its recorded preconditioners
    (averaged over each checkpoint's steps), v frozen, with one warning line, and still agrees
    clearly with the truth. (The step-0 checkpoint's own D gave 0.31 at 5 here.)"""
    case = cases["adamw-warmup-cosine"]
    folder = tmp_path / "no-order"
    shutil.copytree(case["dir"], folder)
    raw = json.loads((folder / "manifest.json").read_text())
    del raw["batch_order"]
    (folder / "manifest.json").write_text(json.dumps(raw))
    m = read_manifest(folder / "manifest.json")
    idx = sorted({int(round(i)) for i in np.linspace(0, len(m.checkpoints) - 1, count)})
    with pytest.warns(RecipeWarning, match="no batch order") as caught:
        ctx = manifest_context(case["recipe"].model_fn(), replace(m, checkpoints=[m.checkpoints[i] for i in idx]),
                               case["train"])
    assert len([w for w in caught if issubclass(w.category, RecipeWarning)]) == 1
    est = run_method(ctx, "diffin", case["query"].x, case["query"].y, need_self=False)["influence"]
    assert spearmanr(est[case["samples"]], case["truth"])[0] >= 0.45


@pytest.mark.slow
@pytest.mark.parametrize("count", [5, 20])
def test_adamw_reaches_the_issue_target(cases, count):
    """AdamW + warm-up + cosine recorded with its batch order (truth.train_torch passes batch_ids
    to the Recorder): Adam's moments replayed step by step (adam_batches.py)."""
    case = cases["adamw-warmup-cosine"]
    d, t = rho(case, "diffin", count), rho(case, "tracin-adam", count)
    assert d >= 0.9 and d > t, (d, t)


@pytest.fixture(scope="module")
def bn_case(tmp_path_factory):
    """The BatchNorm recipe at the benchmark's size (800 samples, 8 epochs, 40 truths): at the
    module's small size (400 samples, 6 epochs, 24 truths) even the exact derivative of the
    truth, averaged over batch membership (what any estimator without the batch order can
    know), reaches only Spearman 0.73 against it (measured), below the target."""
    root = tmp_path_factory.mktemp("bn")
    case = recipe_case("batchnorm-sgd-momentum", root, n_train=800, epochs=8, samples=40, every=10)
    case["dir"] = root / "checkpoints"
    return case


@pytest.mark.slow
@pytest.mark.parametrize("count", [5, 20])
def test_batchnorm_reaches_the_issue_target(bn_case, count):
    """BatchNorm1d MLP, torch SGD + momentum 0.9, cosine schedule: every checkpoint scored in
    eval mode with its own running statistics and a Hessian batch of bn_hessian_batch, vs float64
    trajectory leave-one-out (benchmarks/recipes.py: also met on --seed 1, and by the CNN)."""
    d, t = rho(bn_case, "diffin", count), rho(bn_case, "tracin", count)
    assert d >= 0.8 and d > t, (d, t)


@pytest.mark.slow
def test_batchnorm_scores_with_each_checkpoints_own_statistics(cases):
    """A BatchNorm1d MLP scores (it was refused before) and every checkpoint is evaluated with
    its own running statistics, not the final model's."""
    case = cases["batchnorm-sgd-momentum"]
    ctx = manifest_context(case["recipe"].model_fn(), subset(case, 5), case["train"], ScoreSettings())
    means = [ctx.buffers[k]["2.running_mean"] for k in range(ctx.m)]
    assert not torch.equal(means[0], means[-1])
    x = torch.as_tensor(case["train"].x[:8])
    assert not torch.allclose(ctx.fm_at(0).logits(ctx.thetas[0], x), ctx.fm.logits(ctx.thetas[0], x))
    est = run_method(ctx, "diffin", case["query"].x, case["query"].y, need_self=False)["influence"]
    assert np.isfinite(est).all() and spearmanr(est[case["samples"]], case["truth"])[0] > 0


@pytest.mark.slow
def test_self_influence_matches_true_leave_one_out_self_loss(cases):
    case = cases["sgd-momentum-wd"]
    out = estimate(case, "diffin", 20, need_self=True)
    s = spearmanr(out["self_influence"][case["self_samples"]], case["self_truth"])[0]
    assert s >= 0.9, s
    assert out["self_by_checkpoint"].shape == (N_TRAIN, 20)
    assert np.allclose(out["self_by_checkpoint"].sum(1), out["self_influence"], rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_self_influence_finds_flipped_labels_and_zeros_or_noise_would_not(cases):
    case = cases["sgd-momentum-wd"]
    flipped = case["train"].y != case["train"].true_y
    s = estimate(case, "diffin", 20, need_self=True)["self_influence"]
    auc = roc_auc_score(flipped, s)
    noise = np.random.default_rng(0).normal(size=len(s)) * s.std()
    assert auc >= 0.85, auc
    assert roc_auc_score(flipped, np.zeros_like(s)) < 0.85 - 0.3      # the same check fails on zeros
    assert roc_auc_score(flipped, noise) < 0.85 - 0.2                  # and on noise


@pytest.mark.slow
def test_same_settings_give_identical_scores(cases):
    case = cases["nesterov"]
    for method in ("diffin", "diffin-paper", "tracin"):
        a = estimate(case, method, 5, ScoreSettings(seed=3), need_self=True)
        b = estimate(case, method, 5, ScoreSettings(seed=3), need_self=True)
        assert np.array_equal(a["influence"], b["influence"]) and np.array_equal(a["self_influence"], b["self_influence"])


@pytest.mark.slow
def test_same_settings_give_identical_adamw_scores(cases):
    """AdamW (batch-order replay for influence, segment preconditioners from neighbouring
    exp_avg_sq for self-influence, Adam-aware TracIn): same settings twice -> identical scores;
    another seed -> another Lanczos start and batch for self-influence, while the batch-order
    influence makes no random choice and stays the same."""
    case = cases["adamw-warmup-cosine"]
    for method in ("diffin", "tracin-adam"):
        a = estimate(case, method, 5, ScoreSettings(seed=3), need_self=True)
        b = estimate(case, method, 5, ScoreSettings(seed=3), need_self=True)
        assert np.array_equal(a["influence"], b["influence"]) and np.array_equal(a["self_influence"], b["self_influence"])
    same = [estimate(case, "diffin", 5, ScoreSettings(seed=seed), need_self=True) for seed in (3, 3, 4)]
    assert np.array_equal(same[0]["self_influence"], same[1]["self_influence"])
    assert not np.array_equal(same[0]["self_influence"], same[2]["self_influence"])
    assert np.array_equal(same[0]["influence"], same[2]["influence"])


# --- manifests: old, contradicting; numerics ----------------------------------------------------
@pytest.mark.slow
def test_manifest_without_recipe_keys_scores_with_one_warning_line(cases, tmp_path):
    case = cases["sgd-momentum-wd"]
    folder = tmp_path / "old"
    shutil.copytree(case["dir"], folder)
    raw = json.loads((folder / "manifest.json").read_text())
    old = {"train_size": raw["train_size"], "optimizer": "SGD", "momentum": raw["momentum"],
           "checkpoints": [{k: c[k] for k in ("file", "step", "lr")} for c in raw["checkpoints"]]}
    (folder / "manifest.json").write_text(json.dumps(old))
    with pytest.warns(RecipeWarning) as caught:
        ctx = manifest_context(case["recipe"].model_fn(), read_manifest(folder / "manifest.json"), case["train"])
    msgs = [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)]
    assert len(msgs) == 1 and "\n" not in msgs[0]
    assert "weight decay" in msgs[0] and "per-step lrs" in msgs[0]
    est = run_method(ctx, "diffin", case["query"].x, case["query"].y, need_self=False)["influence"]
    assert np.isfinite(est).all() and spearmanr(est[case["samples"]], case["truth"])[0] > 0.5


@pytest.mark.slow
def test_swapped_checkpoint_files_are_refused(cases, tmp_path):
    case = cases["nesterov"]
    folder = tmp_path / "swapped"
    shutil.copytree(case["dir"], folder)
    raw = json.loads((folder / "manifest.json").read_text())
    a, b = raw["checkpoints"][1], raw["checkpoints"][2]
    a["file"], b["file"] = b["file"], a["file"]
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DiffinError) as err:
        manifest_context(case["recipe"].model_fn(), read_manifest(folder / "manifest.json"), case["train"])
    assert "manifest says step" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_non_finite_hessian_product_names_the_checkpoint(cases):
    case = cases["sgd-momentum-wd"]
    m = subset(case, 5)
    model = case["recipe"].model_fn()
    states = [read_state(case["dir"] / c.file)[0] for c in m.checkpoints]
    states[2] = {k: (torch.full_like(v, 3e38) if k == "3.weight" else v) for k, v in states[2].items()}
    ctx = make_context(model, states, [c.step for c in m.checkpoints], [c.lr for c in m.checkpoints],
                       case["train"], recipe=Recipe(momentum=0.9))
    with pytest.raises(DiffinError) as err:
        run_method(ctx, "diffin", case["query"].x, case["query"].y)
    assert "non-finite" in str(err.value) and f"checkpoint 3/5 (step {m.checkpoints[2].step}" in str(err.value)


def test_batchnorm_state_dicts_load_with_or_without_num_batches_tracked(tmp_path):
    from torch import nn

    from diffin_core.project.checkpoints import check_fits, complete_state
    from diffin_core.project.folder import Project
    from diffin_core.project.data import Split
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    model.train()
    out = Project._forward_one(model, Split(np.random.rand(5, 4).astype(np.float32), np.zeros(5, np.int64), np.arange(5)))
    assert out.shape == (1, 3) and model.training                 # eval for one sample, mode restored
    full = model.state_dict()
    without = {k: v for k, v in full.items() if not k.endswith("num_batches_tracked")}
    for state in (full, without):
        check_fits(model, state, tmp_path / "x")
        fresh = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
        fresh.load_state_dict(complete_state(fresh, state))
    plain = nn.Sequential(nn.Linear(4, 3))
    check_fits(plain, {**plain.state_dict(), "bn.num_batches_tracked": torch.tensor(3)}, tmp_path / "y")
    save_state(tmp_path / "bn.safetensors", model, {"step": 7})
    state, meta = read_state(tmp_path / "bn.safetensors")
    assert meta["step"] == "7" and "1.num_batches_tracked" in state


# --- Adam with the recorded batch order (adam_batches.py) -----------------------------------------
@pytest.fixture(scope="module")
def adam_tiny(tmp_path_factory):
    """AdamW + warm-up/cosine on 96 digits, batch 16, 2 epochs (12 steps), every step a checkpoint,
    recorded with its batch order; plus each step's own theta, m, v (float64)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from adam_study import record
    from diffin_core.tasks.truth import batch_order, digits_case, train_torch
    root = tmp_path_factory.mktemp("adam-tiny")
    recipe = standard_recipes()["adamw-warmup-cosine"]
    train, query = digits_case(noise=0.1, n_train=96, seed=0)
    x, y = torch.as_tensor(train.x, dtype=torch.float64), torch.as_tensor(train.y)
    batches = batch_order(96, 16, 2, seed=0)
    train_torch(recipe, x, y, batches, record_dir=root, every=1)
    fm, theta_T, steps, hp = record(recipe, x, y, batches)
    return dict(recipe=recipe, train=train, query=query, x=x, y=y, fm=fm, theta_T=theta_T, steps=steps, hp=hp,
                dir=root / "checkpoints")


def test_adam_batch_order_path_equals_the_exact_per_step_adjoint(adam_tiny, monkeypatch):
    """Every step a checkpoint: the engine's replay (float32, exact HVPs) equals the exact
    linearisation of torch's AdamW in (theta, m, v) with each step's own state and batch
    (benchmarks/adam_study.py, Spearman 0.995 against true leave-one-out), for all 96 samples;
    the same manifest without its batch order (v frozen, membership spread) does not. (The
    linearisation's machinery: each sample's own term removed exactly, adam_batches.OWN_TERM, is
    off here; tests/test_adam_own_term.py checks it against its own float64 reference.)"""
    from adam_study import from_checkpoints
    from diffin_core.engine import adam_batches
    monkeypatch.setattr(adam_batches, "OWN_TERM", False)
    c = adam_tiny
    q = c["query"]
    qx, qy = torch.as_tensor(q.x[:60], dtype=torch.float64), torch.as_tensor(q.y[:60])
    T = len(c["steps"])
    ref = from_checkpoints(c["fm"], c["steps"], c["theta_T"], c["hp"], c["x"], c["y"], qx, qy, np.arange(96),
                           T + 1, True, True, every=1)
    m = read_manifest(c["dir"] / "manifest.json")
    assert len(m.checkpoints) == T + 1 and m.batch_order
    ctx = manifest_context(c["recipe"].model_fn(), m, c["train"], ScoreSettings(hvp="exact"))
    assert ctx.batch_order is not None
    est = run_method(ctx, "diffin", q.x[:60], q.y[:60], need_self=False)["influence"]
    assert np.linalg.norm(est - ref) <= 2e-3 * np.linalg.norm(ref), np.linalg.norm(est - ref) / np.linalg.norm(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecipeWarning)
        old = manifest_context(c["recipe"].model_fn(), replace(m, batch_order=None), c["train"],
                               ScoreSettings(hvp="exact"))
    assert old.batch_order is None
    prev = run_method(old, "diffin", q.x[:60], q.y[:60], need_self=False)["influence"]
    assert np.linalg.norm(prev - ref) > 0.1 * np.linalg.norm(ref)


def test_adam_batch_order_scores_the_same_streamed_chunked_and_resumed(adam_tiny, tmp_path):
    """The batch-order influence (plan items' per-sample rows) through the runner's walks: the
    influence-only walk per checkpoint, the row-range walk with self-influence in small chunks,
    and a job resumed from saved stages give the same scores."""
    from diffin_core.methods.runner import run as run_walk
    from diffin_core.methods import METHODS
    from diffin_core.project.stages import Stages, StageSettings
    from diffin_core.engine.functional import single_threaded
    c = adam_tiny
    q = c["query"]
    m = read_manifest(c["dir"] / "manifest.json")
    sub = replace(m, checkpoints=[m.checkpoints[i] for i in (0, 4, 8, 12)])
    ctx = lambda **kw: manifest_context(c["recipe"].model_fn(), sub, c["train"], ScoreSettings(**kw))  # noqa: E731
    # one torch thread throughout: the walks differ in their kernels' shapes, and at 2 threads their
    # rounding differs; the own term of Adam's moments (own_removal: v + DV cancels) amplifies that
    # to ~2e-9 relative (measured with DIFFIN_THREADS=2), above this test's 1e-9 of chunking alone
    with single_threaded():
        a = run_method(ctx(), "diffin", q.x, q.y, need_self=False)["influence"]
        b = run_method(ctx(batch_size=7), "diffin", q.x, q.y, need_self=True)
        assert np.allclose(a, b["influence"], rtol=1e-9, atol=1e-12) and np.isfinite(b["self_influence"]).all()
        stages = Stages(tmp_path / "st", StageSettings("diffin", {}, "q", "t", need_self=False))
        first = run_walk(METHODS["diffin"](), ctx(), q.x, q.y, False, stages)["influence"]
        again = run_walk(METHODS["diffin"](), ctx(), q.x, q.y, False, stages)["influence"]    # from the stages
    assert np.allclose(first, a, rtol=1e-9, atol=1e-12) and np.array_equal(first, again)


def _corrupt_order(adam_tiny, tmp_path, **arrays):
    folder = tmp_path / "bad"
    shutil.copytree(adam_tiny["dir"], folder)
    if arrays:
        np.savez(folder / "batch_order.npz", **arrays)
    else:
        (folder / "batch_order.npz").unlink()
    return folder / "manifest.json"


@pytest.mark.parametrize("problem, message", [
    ("out-of-range", "out of range"), ("uncovered", "does not cover the training set"),
    ("short", "holds 3 batches"), ("missing", "is missing")])
def test_bad_batch_order_is_refused_in_one_line_naming_the_manifest(adam_tiny, tmp_path, problem, message):
    with np.load(adam_tiny["dir"] / "batch_order.npz") as z:
        ids, offsets = z["ids"].copy(), z["offsets"].copy()
    if problem == "out-of-range":
        ids[5] = 96
        arrays = dict(ids=ids, offsets=offsets)
    elif problem == "uncovered":          # a batch's worth (16) of samples in no batch
        arrays = dict(ids=np.where(ids < 16, ids + 16, ids), offsets=offsets)
    elif problem == "short":
        arrays = dict(ids=ids[:offsets[3]], offsets=offsets[:4])
    else:
        arrays = {}
    path = _corrupt_order(adam_tiny, tmp_path, **arrays)
    with pytest.raises(DiffinError) as err:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RecipeWarning)
            manifest_context(adam_tiny["recipe"].model_fn(), read_manifest(path), adam_tiny["train"])
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_recorder_writes_the_batch_order_only_when_every_step_gives_it(tmp_path):
    """rec.step(batch_ids=...) on every step: batch_order.npz with each step's rows (read back by
    load_batch_order) and exp_avg beside exp_avg_sq; a plain rec.step() loop, or one step without
    ids, writes no batch order."""
    from diffin_core.project.checkpoints import Recorder, load_batch_order
    from diffin_core.engine.models import MLP
    x, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
    gen = torch.Generator().manual_seed(0)
    order = [b for _ in range(2) for b in torch.randperm(20, generator=gen).split(5)][:6]   # 1.5 epochs
    for mode in ("all", "plain", "one-missing"):
        torch.manual_seed(0)
        model = MLP(4, (3,), 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        with Recorder(tmp_path / mode, model, opt, train_size=20, every=2) as rec:
            for s, idx in enumerate(order):
                _optimizer_step(model, opt, x[idx], y[idx])
                rec.step(batch_ids=None if mode == "plain" or (mode == "one-missing" and s == 3) else idx)
        folder = tmp_path / mode / "checkpoints"
        m = read_manifest(folder / "manifest.json")
        assert all(c.exp_avg and c.exp_avg_sq for c in m.checkpoints)
        first, meta = read_state(folder / m.checkpoints[-1].exp_avg)
        name, param = next(iter(model.named_parameters()))
        assert meta["checkpoint_step"] == "6" and torch.equal(first[name], opt.state[param]["exp_avg"].float())
        if mode != "all":
            assert m.batch_order is None and not (folder / "batch_order.npz").exists()
            continue
        got = load_batch_order(m, 20)
        assert all(np.array_equal(got.batch(s), idx.numpy()) for s, idx in enumerate(order))


def _optimizer_step(model, opt, x, y):
    """One training step of the recorded loops: zero_grad, mean cross-entropy backward, step."""
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _tiny_adamw_project(tmp_path):
    """The tiny test project without checkpoints, its tensors, a seeded model and its AdamW."""
    from diffin_core.project.folder import Project
    from helpers import make_tiny_project
    root = make_tiny_project(tmp_path / "p")
    shutil.rmtree(root / "checkpoints")
    project = Project(root)
    x, y = torch.as_tensor(project.train.x), torch.as_tensor(project.train.y)
    torch.manual_seed(0)
    model = project.build_model()
    return root, project, x, y, model, torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)


def test_adam_batch_order_project_scores_top_k_by_the_exact_path(tmp_path):
    """A project trained with AdamW and recorded with its batch order: `diffin score` writes the
    replay's own store (the query-span store, run/span.py; not the checkpoint estimator's views),
    whose top-k here (every query gradient in its span) is the exact path's and ranks by the
    run's own influence, as `--exact` does; a later feature pass rebuilds it."""
    from diffin_core.project.checkpoints import Recorder
    from diffin_core.run.features import build_for_run
    from diffin_core.run.scoring import query_influence, score, top_k
    from diffin_core.project.folder import Project
    root, project, x, y, model, opt = _tiny_adamw_project(tmp_path)
    with Recorder(root, model, opt, train_size=len(y), every=4) as rec:
        for _ in range(3):
            for idx in torch.randperm(len(y)).split(16):
                _optimizer_step(model, opt, x[idx], y[idx])
                rec.step(batch_ids=idx)
    project = Project(root)
    run = score(project, "diffin", run="d")
    import json
    assert json.loads((run / "features" / "meta.json").read_text())["kind"] == "query-span"
    helpful, _harmful = top_k(project, "d", [3], k=5)
    infl = query_influence(project, "diffin", [3])
    assert helpful.attrs["path"].startswith("exact path: Adam's batch-order replay, read from the store")
    assert helpful["sample_id"].tolist() == list(np.argsort(-infl)[:5])
    exact, _ = top_k(project, "d", [3], k=5, exact=True)
    assert exact.attrs["path"] == "exact path" and exact["sample_id"].tolist() == helpful["sample_id"].tolist()
    assert build_for_run(project, "d") == run / "features"


class _Indexed(torch.utils.data.Dataset):
    """(x, y) rows, plus the row index when ``with_index`` (the hand-passed ids' loader)."""

    def __init__(self, x, y, with_index=False):
        self.x, self.y, self.with_index = x, y, with_index

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.x[i], self.y[i], i) if self.with_index else (self.x[i], self.y[i])


def _record_with_loader(folder, x, y, mode, epochs=2, drop_last=False, workers=0, shuffle=True):
    """AdamW on (x, y) through a DataLoader(batch_size=7, shuffle, seeded generator; persistent
    workers when ``workers``): ``mode`` "track": rec.track(loader) + plain rec.step(); "hand": the
    dataset returns its row index, passed as rec.step(batch_ids=...)."""
    from torch.utils.data import DataLoader
    from diffin_core.project.checkpoints import Recorder
    from diffin_core.engine.models import MLP
    torch.manual_seed(0)
    model = MLP(x.shape[1], (5,), int(y.max()) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
    loader = DataLoader(_Indexed(x, y, mode == "hand"), batch_size=7, shuffle=shuffle, drop_last=drop_last,
                        num_workers=workers, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(3))
    with Recorder(folder, model, opt, train_size=len(y), every=3) as rec:
        batches = rec.track(loader) if mode == "track" else loader      # one tracked loader, every epoch
        for _ in range(epochs):
            for batch in batches:
                _optimizer_step(model, opt, batch[0], batch[1])
                rec.step(batch_ids=batch[2]) if mode == "hand" else rec.step()
    return folder / "checkpoints"


@pytest.mark.parametrize("workers, drop_last", [(0, False), (2, True)])
def test_recorder_tracks_a_plain_shuffled_dataloader(tmp_path, workers, drop_last):
    """rec.track(loader) over a plain DataLoader(shuffle=True, seeded generator) records the same
    batch_order.npz as passing each batch's ids by hand (worker processes and drop_last too: the
    indices come from the batch sampler in the main process), and the same weights; the loader's
    own batch sampler is left untouched."""
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    got = {m: _record_with_loader(tmp_path / m, x, y, m, drop_last=drop_last, workers=workers)
           for m in ("track", "hand")}
    arrays = {}
    for m, folder in got.items():
        with np.load(folder / "batch_order.npz") as z:
            arrays[m] = (z["ids"].copy(), z["offsets"].copy())
    assert np.array_equal(arrays["track"][0], arrays["hand"][0])
    assert np.array_equal(arrays["track"][1], arrays["hand"][1])
    ids, offsets = arrays["track"]
    assert len(offsets) - 1 == 2 * (5 if drop_last else 6) and not np.array_equal(ids[:40], np.arange(40))
    last = read_manifest(got["track"] / "manifest.json").checkpoints[-1].file
    final = {m: read_state(folder / last)[0] for m, folder in got.items()}
    assert all(torch.equal(v, final["hand"][k]) for k, v in final["track"].items())
    from torch.utils.data import BatchSampler, DataLoader
    from diffin_core.project.checkpoints import Recorder
    from diffin_core.engine.models import MLP
    plain = DataLoader(_Indexed(x, y), batch_size=7)
    model = MLP(4, (5,), 3)
    rec = Recorder(tmp_path / "x", model, torch.optim.AdamW(model.parameters()))
    tracked = rec.track(plain)
    assert type(plain.batch_sampler) is BatchSampler and len(tracked) == len(plain) == 6
    with pytest.raises(DiffinError, match="DataLoader"):
        rec.track([x, y])


def test_adamw_project_recorded_through_track_scores_by_the_batch_order_path(tmp_path):
    """A tiny AdamW project whose loop is `for x, y in rec.track(loader)` with a plain rec.step():
    the manifest names the batch order, and scoring takes the replay (no approximation warning)."""
    from torch.utils.data import DataLoader, TensorDataset
    from diffin_core.project.checkpoints import Recorder
    from diffin_core.run.context import project_context
    from diffin_core.project.folder import Project
    root, project, x, y, model, opt = _tiny_adamw_project(tmp_path)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    with Recorder(root, model, opt, train_size=len(y), every=4) as rec:
        for _ in range(2):
            for xb, yb in rec.track(loader):
                _optimizer_step(model, opt, xb, yb)
                rec.step()
    project = Project(root)
    assert project.manifest.batch_order == "batch_order.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        ctx = project_context(project)
    assert ctx.batch_order is not None and ctx.moments is not None
    assert sorted(ctx.batch_order.ids[:len(y)].tolist()) == list(range(len(y)))


def test_drop_last_samples_in_no_batch_get_zero_influence_with_one_warning(tmp_path):
    """DataLoader(drop_last=True, no shuffle), 40 samples in batches of 7: rows 35..39 are in no
    batch and never touch the weights (true leave-one-out effect 0). The batch order is accepted
    with one warning line naming the count, and the replay gives those rows influence exactly 0
    (the others not); a batch's worth missing stays refused."""
    from diffin_core.project.data import Split
    from diffin_core.engine.models import MLP
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    folder = _record_with_loader(tmp_path / "p", x, y, "track", epochs=3, drop_last=True, shuffle=False)
    m = read_manifest(folder / "manifest.json")
    train = Split(x.numpy(), y.numpy(), np.arange(40))
    with pytest.warns(RecipeWarning) as caught:
        ctx = manifest_context(MLP(4, (5,), 3), m, train)
    lines = [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)]
    assert len(lines) == 1 and "5 of 40 training samples in no batch" in lines[0] and "\n" not in lines[0]
    assert ctx.batch_order is not None
    infl = run_method(ctx, "diffin", x[:6].numpy(), y[:6].numpy(), need_self=False)["influence"]
    assert np.all(infl[35:] == 0) and np.all(infl[:35] != 0)
    with np.load(folder / "batch_order.npz") as z:
        ids, offsets = z["ids"].copy(), z["offsets"].copy()
    np.savez(folder / "batch_order.npz", ids=np.where(ids < 7, ids + 7, ids), offsets=offsets)   # 12 missing
    with pytest.raises(DiffinError, match="12 of 40 samples are in no batch"):
        manifest_context(MLP(4, (5,), 3), m, train)


def test_killed_run_keeps_the_batch_order_up_to_its_last_checkpoint(tmp_path):
    """Training that dies after step 8 (checkpoints every 3 steps): batch_order.npz, rewritten at
    each checkpoint, holds the 6 batches up to the last checkpoint (step 6) and the manifest names
    it, so the run scores by the replay; no temp files are left beside it."""
    from torch.utils.data import DataLoader, TensorDataset
    from diffin_core.project.checkpoints import Recorder, load_batch_order
    from diffin_core.project.data import Split
    from diffin_core.engine.models import MLP
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    torch.manual_seed(0)
    model = MLP(4, (5,), 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    loader = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(1))
    seen = []
    with pytest.raises(KeyboardInterrupt):
        with Recorder(tmp_path, model, opt, train_size=40, every=3) as rec:
            for _ in range(2):
                for xb, yb in rec.track(loader):
                    _optimizer_step(model, opt, xb, yb)
                    rec.step()
                    seen.append(rec.batches[-1])
                    if rec.global_step == 8:
                        raise KeyboardInterrupt
    folder = tmp_path / "checkpoints"
    m = read_manifest(folder / "manifest.json")
    assert [c.step for c in m.checkpoints] == [0, 3, 6] and m.batch_order == "batch_order.npz"
    with np.load(folder / "batch_order.npz") as z:
        assert len(z["offsets"]) == 7
    order = load_batch_order(m, 40)
    assert all(np.array_equal(order.batch(s), seen[s]) for s in range(6))
    assert not [p.name for p in folder.iterdir() if "tmp" in p.name or p.name.startswith(".")]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        ctx = manifest_context(MLP(4, (5,), 3), m, Split(x.numpy(), y.numpy(), np.arange(40)))
    assert ctx.batch_order is not None
