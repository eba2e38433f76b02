"""SGD's batch-order replay (engine/sgd_batches.py): the weights between checkpoints rebuilt by
torch's own SGD update from each checkpoint's weights and momentum buffer, its self-check against
the next checkpoint, and the per-step adjoint at the replayed weights. Truth: trajectory
leave-one-out in float64 (tasks/truth.py), at one checkpoint per epoch (what people save)."""
import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch.optim import SGD

from diffin_core.engine.adam_batches import CHECK_TOL, check_text
from diffin_core.engine.recipe import RecipeWarning
from diffin_core.methods import ScoreSettings
from diffin_core.project.checkpoints import read_manifest
from diffin_core.run.context import manifest_context
from diffin_core.run.scoring import run_method
from diffin_core.tasks.truth import (TorchRecipe, batch_order, digits_case, digits_mlp, recipe_case, train_torch,
                                     warmup_cosine)

N_TRAIN, EPOCHS, BATCH = 320, 5, 32
EVERY = N_TRAIN // BATCH                # one checkpoint per epoch: 10 steps


def _head_10x(p):
    """SGD momentum 0.9 + weight decay, the head at 10x the body's lr (0.5): large steps."""
    p = list(p)
    return SGD([{"params": p[:2], "lr": 0.05}, {"params": p[2:], "lr": 0.5}], momentum=0.9, weight_decay=5e-4)


@pytest.fixture(scope="module")
def large_steps(tmp_path_factory):
    root = tmp_path_factory.mktemp("sgd-large")
    recipe = TorchRecipe("sgd-head-10x", digits_mlp(), _head_10x, warmup_cosine)
    case = recipe_case(recipe, root, n_train=N_TRAIN, epochs=EPOCHS, batch=BATCH, samples=24, every=EVERY)
    case["manifest"] = read_manifest(root / "checkpoints/manifest.json")
    return case


def _score(case, manifest, **settings):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx = manifest_context(case["recipe"].model_fn(), manifest, case["train"], ScoreSettings(device="cpu", **settings))
        est = run_method(ctx, "diffin", case["query"].x, case["query"].y, need_self=False)["influence"]
    lines = [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)]
    return ctx, est[case["samples"]], lines


def _fit(est, truth):
    return spearmanr(est, truth)[0], np.median(np.abs(est)) / np.median(np.abs(truth))


def test_recorder_saves_sgds_momentum_buffer_beside_each_checkpoint(large_steps, tmp_path):
    """One momentum_buffer file per checkpoint after step 0 (torch has none before its first step),
    named in the manifest; the last one is torch's buffer at the end of training."""
    m = large_steps["manifest"]
    assert m.batch_order and [c.step for c in m.checkpoints] == [0, 10, 20, 30, 40, 50]
    assert m.checkpoints[0].momentum_buffer is None
    assert all(c.momentum_buffer == c.file.replace(".safetensors", ".momentum_buffer.safetensors")
               for c in m.checkpoints[1:])
    from diffin_core.project.checkpoints import Recorder
    model = digits_mlp()()
    opt = _head_10x(model.parameters())
    x = torch.randn(8, 64, dtype=torch.float64)
    with Recorder(tmp_path, model, opt, train_size=8, every=2) as rec:
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            rec.step(batch_ids=np.arange(8))
    from safetensors.torch import load_file
    raw = json.loads((tmp_path / "checkpoints/manifest.json").read_text())
    last = raw["checkpoints"][-1]
    assert last["step"] == 3 and "momentum_buffer" not in raw["checkpoints"][0]
    saved = load_file(str(tmp_path / "checkpoints" / last["momentum_buffer"]))
    for name, p in model.named_parameters():
        torch.testing.assert_close(saved[name].double(), opt.state[p]["momentum_buffer"], rtol=1e-6, atol=1e-7)


def test_replay_at_large_steps_matches_leave_one_out(large_steps):
    """The head at lr 0.5 with momentum 0.9 (lr x the largest Ritz value above SHARP_LIMIT): the
    checkpoint walk, taking every step at its checkpoint's weights, misses the truth; the replay
    reaches each next checkpoint's recorded weights and buffer (the self-check passes), ranks like
    true leave-one-out and gets the sizes right."""
    c = large_steps
    ctx, est, lines = _score(c, c["manifest"])
    chk = ctx.adam_check
    assert chk["replay"] == "SGD" and chk["passed"] and chk["intervals"] == 5, chk
    assert max(chk["worst"].values()) < 1e-4 and set(chk["worst"]) == {"theta", "buf"}, chk["worst"]
    assert ctx.batch_order is not None and ctx.moments is not None
    assert check_text(chk).startswith("SGD replay check: passed, 5 intervals")
    assert not any("self-check failed" in ln for ln in lines), lines
    rho, size = _fit(est, c["truth"])
    assert rho >= 0.9 and 0.8 <= size <= 1.25, (rho, size)
    # the same recording without the momentum buffers (a Recorder before them): the checkpoint walk
    old = replace(c["manifest"], checkpoints=[replace(ck, momentum_buffer=None) for ck in c["manifest"].checkpoints])
    walk_ctx, walk, walk_lines = _score(c, old)
    assert walk_ctx.batch_order is None and getattr(walk_ctx, "adam_check", None) is None
    assert any("SGD steps large against the loss curvature" in ln for ln in walk_lines), walk_lines
    w_rho, w_size = _fit(walk, c["truth"])
    assert w_rho < rho - 0.05 or not 0.8 <= w_size <= 1.25, (w_rho, w_size, rho, size)


def test_replay_equals_every_step_saved(large_steps, tmp_path):
    """With a checkpoint at every step there is nothing to replay between them: one checkpoint per
    epoch gives the same influence (the replay rebuilt the same weights)."""
    c = large_steps
    dense_root = tmp_path / "dense"
    x, y = torch.as_tensor(c["train"].x, dtype=torch.float64), torch.as_tensor(c["train"].y)
    train_torch(c["recipe"], x, y, batch_order(N_TRAIN, BATCH, EPOCHS, seed=0), record_dir=dense_root, every=1)
    dense = read_manifest(dense_root / "checkpoints/manifest.json")
    _ctx, sparse, _ = _score(c, c["manifest"], hvp="exact")
    _ctx, every, _ = _score(c, dense, hvp="exact")
    assert np.linalg.norm(sparse - every) <= 1e-3 * np.linalg.norm(every)


@pytest.mark.parametrize("kw", [dict(momentum=0.9, nesterov=True, weight_decay=5e-3),
                                dict(momentum=0.8, dampening=0.3, weight_decay=1e-3),
                                dict(lr=0.3)], ids=["nesterov", "dampening", "plain"])
def test_replay_follows_torchs_sgd_exactly(kw, tmp_path):
    """Nesterov, dampening, plain SGD, per-group lrs and weight decay, clipping on some steps: the
    replay's weights and buffers land on the recorded ones (float32 scoring of a float64 run)."""
    def opt(p):
        p = list(p)
        args = {"lr": 0.1, **kw}
        lr = args.pop("lr")
        return SGD([{"params": p[:2], "lr": lr, "weight_decay": 0.0}, {"params": p[2:], "lr": 2 * lr}], lr=lr, **args)
    recipe = TorchRecipe("exact", digits_mlp(), opt, warmup_cosine, clip=0.55)
    train, _query = digits_case(noise=0.1, n_train=160, seed=0)
    x, y = torch.as_tensor(train.x, dtype=torch.float64), torch.as_tensor(train.y)
    train_torch(recipe, x, y, batch_order(160, 32, 4, seed=0), record_dir=tmp_path, every=5)
    m = read_manifest(tmp_path / "checkpoints/manifest.json")
    clip = np.load(tmp_path / "checkpoints/clip_factors.npy")
    assert 0 < (clip < 1).sum() < len(clip)
    ctx = manifest_context(recipe.model_fn(), m, train, ScoreSettings(device="cpu"))
    from diffin_core.engine.adam_batches import decide
    chk = decide(ctx)
    assert chk["passed"] and chk["intervals"] == 4 and max(chk["worst"].values()) < 1e-5, chk["worst"]
    assert all(("buf" in r) == ("momentum" in kw) for r in chk["per_checkpoint"]), chk["per_checkpoint"]


def test_self_check_flags_train_mode_batchnorm_and_falls_back_in_one_line(tmp_path):
    """SGD on a BatchNorm MLP: training normalised with batch statistics, the replay runs the
    eval-mode network with each checkpoint's running statistics, so it cannot follow. The check
    fails, says so in one line, records it, and the checkpoint walk scores (unclipped); a clipped
    run keeps the per-step path with the weights on the line between checkpoints."""
    train, query = digits_case(noise=0.1, n_train=160, seed=0)
    x, y = torch.as_tensor(train.x, dtype=torch.float64), torch.as_tensor(train.y)
    model_fn = digits_mlp(batchnorm=True)
    for clip, fallback in ((None, "checkpoint walk"), (0.5, "line")):
        recipe = TorchRecipe("bn", model_fn, lambda p: SGD(p, lr=0.1, momentum=0.9), warmup_cosine, clip=clip)
        root = tmp_path / str(clip)
        train_torch(recipe, x, y, batch_order(160, 32, 4, seed=0), record_dir=root, every=5)
        m = read_manifest(root / "checkpoints/manifest.json")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ctx = manifest_context(model_fn(), m, train, ScoreSettings(device="cpu"))
            out = run_method(ctx, "diffin", query.x, query.y, need_self=False)["influence"]
        chk = ctx.adam_check
        assert not chk["passed"] and chk["fallback"] == fallback and chk["worst"]["theta"] > CHECK_TOL, chk
        assert np.isfinite(out).all() and ctx.moments is None
        assert (ctx.batch_order is None) == (clip is None)
        msg = [str(w.message) for w in caught if "self-check failed" in str(w.message)]
        assert len(msg) == 1 and "\n" not in msg[0] and msg[0].startswith("SGD replay self-check failed"), msg
        assert "train-mode BatchNorm" in msg[0] and msg[0] in ctx.recipe.approximations
