"""Adam's batch-order replay at the spacing people save (one checkpoint per epoch), its
self-check, the HVP modes and Dropout's warning (engine/adam_batches.py, engine/hvp.py,
engine/models.py). Truth: trajectory leave-one-out in float64 (tasks/truth.py)."""
import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.optim import AdamW

from diffin_core.cli import main
from diffin_core.engine.adam_batches import CHECK_TOL
from diffin_core.engine.hvp import check_mode, summary as hvp_summary
from diffin_core.engine.models import train_mode_randomness
from diffin_core.engine.recipe import RecipeWarning
from diffin_core.errors import DiffinError
from diffin_core.methods import ScoreSettings
from diffin_core.project.checkpoints import read_manifest
from diffin_core.run.context import manifest_context
from diffin_core.run.scoring import run_method
from diffin_core.tasks.truth import (TorchRecipe, batch_order, digits_case, digits_mlp, recipe_case, train_torch,
                                     warmup_cosine)

from helpers import make_tiny_project


def adamw_recipe(model_fn=None, lr: float = 3e-3):
    return TorchRecipe("adamw", model_fn or digits_mlp(), lambda p: AdamW(p, lr=lr, weight_decay=0.05),
                       warmup_cosine)


@pytest.fixture(scope="module")
def adam_epoch(tmp_path_factory):
    """AdamW (lr 3e-3, wd 0.05, warm-up + cosine) on 320 digits, batch 32, 5 epochs = 50 steps,
    recorded by the Recorder with rec.step(batch_ids=...) at every step; ``manifest`` keeps one
    checkpoint per epoch (every 10 steps: the files a Recorder(every=10) writes), ``every_step``
    all of them."""
    root = tmp_path_factory.mktemp("adam-epoch")
    case = recipe_case(adamw_recipe(), root, n_train=320, epochs=5, samples=24, every=1, seed=0)
    m = read_manifest(root / "checkpoints" / "manifest.json")
    case["every_step"] = m
    case["manifest"] = replace(m, checkpoints=[ck for ck in m.checkpoints if ck.step % 10 == 0])
    return case


def _score(case, manifest=None, **settings):
    ctx = manifest_context(case["recipe"].model_fn(), manifest or case["manifest"], case["train"],
                           ScoreSettings(device="cpu", **settings))
    est = run_method(ctx, "diffin", case["query"].x, case["query"].y, need_self=False)["influence"]
    return ctx, est[case["samples"]]


def test_replay_at_one_checkpoint_per_epoch_matches_leave_one_out(adam_epoch):
    """The replay (theta, m, v replayed forward from each checkpoint with torch's AdamW update)
    reaches the next checkpoint's recorded state (the self-check passes at every interval), so
    one checkpoint per epoch scores as every step saved does, and ranks like true leave-one-out
    with the right sizes. (At lr 1e-2 on these 320 samples the sizes come out 0.58x at either
    spacing: the linearisation's limit, not the spacing's.)"""
    c = adam_epoch
    assert [ck.step for ck in c["manifest"].checkpoints] == [0, 10, 20, 30, 40, 50] and c["manifest"].batch_order
    ctx, est = _score(c)
    chk = ctx.adam_check
    assert chk["passed"] and chk["intervals"] == 5 and max(chk["worst"].values()) < 1e-3, chk["worst"]
    assert ctx.batch_order is not None                     # the replay scored, not the fallback
    _ctx, dense = _score(c, c["every_step"])
    assert np.linalg.norm(est - dense) <= 1e-3 * np.linalg.norm(dense)
    rho = spearmanr(est, c["truth"])[0]
    ratio = np.median(np.abs(est)) / np.median(np.abs(c["truth"]))
    assert rho >= 0.9 and 0.8 <= ratio <= 1.25, (rho, ratio)


def test_self_check_flags_a_run_the_replay_cannot_follow(tmp_path):
    """AdamW with Dropout 0.2 recorded without the generator states (a manifest from before the
    Recorder kept them: "rng" removed): the replay (eval-mode network) cannot follow training's
    random masks, at any spacing (measured misses of exp_avg: 27% at one checkpoint per epoch,
    23% with every step saved). The self-check fails, says so in one RecipeWarning line, records
    it and scores with the checkpoint estimator instead; the Dropout layer is named in the
    recipe's approximation line. (With the states the masks are redrawn and the check passes:
    tests/test_dropout_replay.py.)"""
    def dropout_mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 10)).double()
    recipe = adamw_recipe(dropout_mlp, lr=1e-2)
    train, query = digits_case(noise=0.1, n_train=320, seed=0)
    x, y = torch.as_tensor(train.x, dtype=torch.float64), torch.as_tensor(train.y)
    batches = batch_order(320, 32, 5, seed=0)
    misses = {}
    for every in (10, 1):
        torch.manual_seed(1)
        train_torch(recipe, x, y, batches, record_dir=tmp_path / str(every), every=every)
        m = read_manifest(tmp_path / str(every) / "checkpoints" / "manifest.json")
        assert m.extra.pop("rng")["forwards"] == 50          # recorded, then dropped: an older recording
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ctx = manifest_context(dropout_mlp(), m, train, ScoreSettings(device="cpu"))
            out = run_method(ctx, "diffin", query.x, query.y, need_self=False)["influence"]
        lines = [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)]
        assert any("Dropout (1 layer, p=0.2)" in ln for ln in lines), lines     # detected, named
        assert not ctx.adam_check["passed"] and ctx.adam_check["fallback"] == "checkpoint estimator"
        assert ctx.adam_check["worst"]["m"] > 0.1 and ctx.batch_order is None and np.isfinite(out).all()
        msg = [ln for ln in lines if "self-check failed" in ln]
        assert len(msg) == 1 and "\n" not in msg[0], lines


def test_self_check_flags_a_spacing_the_replay_cannot_handle(adam_epoch):
    """A manifest whose first checkpoint is at step 10 of a run that began at step 0: no weights
    are recorded before it, so its first 20 steps can only be taken at the nearest checkpoint's
    weights (the path every interval took before the replay). Their replayed moments miss the
    recorded ones at step 20 by far more than the tolerance: flagged in one line, recorded, and
    scored with the checkpoint estimator; the same run from step 0 passes (first test)."""
    c = adam_epoch
    late = replace(c["manifest"], checkpoints=c["manifest"].checkpoints[1:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx, est = _score(c, late)
    chk = ctx.adam_check
    assert not chk["passed"] and chk["failed"] == 1 and chk["per_checkpoint"][0]["interval"] == [0, 20]
    assert chk["per_checkpoint"][0]["m"] > CHECK_TOL and "theta" not in chk["per_checkpoint"][0]
    assert all(r["m"] < 1e-3 for r in chk["per_checkpoint"][1:])
    assert ctx.batch_order is None and chk["fallback"] == "checkpoint estimator" and np.isfinite(est).all()
    lines = [str(w.message) for w in caught if "self-check failed at 1 of 4" in str(w.message)]
    assert len(lines) == 1 and "misses the recorded one by" in lines[0] and "save one at step 0" in lines[0]


def test_hvp_modes_are_recorded_and_auto_is_exact_in_the_replay(adam_epoch):
    """--hvp: exact and fd give nearly the same replay scores (fd ~1% off along Adam's
    preconditioned directions); auto takes exact products there, and a Lanczos view (the
    self-influence path) probes finite differences against one exact product."""
    c = adam_epoch
    ctx_a, a = _score(c, hvp="auto")
    ctx_e, e = _score(c, hvp="exact")
    ctx_f, f = _score(c, hvp="fd")
    assert np.allclose(a, e, rtol=1e-6, atol=1e-12)
    assert np.linalg.norm(f - e) <= 0.05 * np.linalg.norm(e)
    assert hvp_summary(ctx_a)["adam_replay"] == "exact" and hvp_summary(ctx_f) == {"setting": "fd"}
    ctx = manifest_context(c["recipe"].model_fn(), c["manifest"], c["train"], ScoreSettings(device="cpu"))
    run_method(ctx, "diffin", c["query"].x[:20], c["query"].y[:20], need_self=True)
    s = hvp_summary(ctx)
    assert s["lanczos_views"]["exact"] + s["lanczos_views"]["fd"] >= 5 and s["fd_error_max"] >= 0
    with pytest.raises(DiffinError, match="unknown HVP mode 'bogus'"):
        check_mode("bogus")


def test_cli_hvp_option_lands_in_meta(tmp_path, capsys):
    root = make_tiny_project(tmp_path / "tiny")
    main(["score", str(root), "--method", "diffin", "--run", "h", "--hvp", "exact", "--no-features"])
    meta = json.loads((root / "runs/h/meta.json").read_text())
    assert meta["settings"]["hvp"] == "exact" and meta["hvp"]["setting"] == "exact"
    assert "adam_check" not in meta                          # SGD: no replay, no check
    with pytest.raises(SystemExit):
        main(["score", str(root), "--method", "diffin", "--run", "b", "--hvp", "bogus", "--no-features"])
    assert "unknown HVP mode 'bogus'" in capsys.readouterr().err


def test_dropout_detection():
    assert train_mode_randomness(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0))) is None
    line = train_mode_randomness(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), nn.Dropout2d(0.3)))
    assert line.startswith("Dropout (2 layers, p=0.1..0.3)") and "\n" not in line
