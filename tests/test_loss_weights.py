"""Issue 17, item 3: cross-entropy with class weights and ignore_index, recorded by the Recorder
from the user's nn.CrossEntropyLoss, used by scoring, named in one line; ignore_index against
leave-one-out.

Training uses torch's own weighted mean (each batch divided by its weight sum); the batch-order
replays model that denominator per step (adam_batches.step_loss), the checkpoint walk by the
training set's mean weight (docs/recipes.md "Loss"). The truth retrains in float64 without each
sample (its loss weight 0, the batch keeps its denominator, the convention of tasks/truth.py).
Unequal class weights with the mean weight failed the replay's self-check and scored Spearman 0.18,
sizes 0.75x here; now the replay passes its check and meets the target (lr 0.05)."""
import contextlib
import json
import warnings

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.optim import SGD

from diffin_core.engine.recipe import RecipeWarning
from diffin_core.methods import ScoreSettings
from diffin_core.project.checkpoints import Recorder, read_manifest
from diffin_core.run.context import manifest_context
from diffin_core.run.scoring import run_method
from diffin_core.tasks.truth import digits_case, digits_mlp

N, BATCH, EPOCHS, IGNORED = 240, 24, 3, 3
UNEQUAL = [1.0, 2.0, 1.0, 1.0, 0.5, 1.0, 1.5, 1.0, 1.0, 2.0]


def _train(x, y, batches, weight, drop: int | None = None, folder=None, loss=None, lr: float = 0.1):
    """SGD momentum 0.9 on torch's weighted mean; ``drop``: that sample's loss weight 0, the
    batch's denominator kept. Returns the final model."""
    model = digits_mlp()()
    opt = SGD(model.parameters(), lr=lr, momentum=0.9)
    rec = Recorder(folder, model, opt, train_size=N, every=len(batches) // EPOCHS, loss=loss) if folder else None
    with rec if rec is not None else contextlib.nullcontext():
        _loop(model, opt, x, y, batches, weight, drop, loss, rec)
    return model


def _loop(model, opt, x, y, batches, weight, drop, loss, rec):
    w = torch.as_tensor(weight, dtype=torch.float64)
    for idx in batches:
        opt.zero_grad()
        if drop is None:
            loss(model(x[idx]), y[idx]).backward()           # the user's module: torch's weighted mean
        else:
            per = nn.functional.cross_entropy(model(x[idx]), y[idx], weight=w, ignore_index=IGNORED,
                                              reduction="none")
            denom = torch.where(y[idx] == IGNORED, 0.0, w[y[idx]]).sum()
            keep = torch.as_tensor(idx != drop, dtype=torch.float64)
            ((per * keep).sum() / denom).backward()
        opt.step()
        if rec is not None:
            rec.step(batch_ids=idx)


def _recorded(tmp_path, weight, lr: float = 0.1):
    """The run recorded with nn.CrossEntropyLoss(weight, ignore_index) and its scoring context."""
    train, query = digits_case(noise=0.1, n_train=N, seed=0)
    x, y = torch.as_tensor(train.x, dtype=torch.float64), torch.as_tensor(train.y)
    rng = np.random.default_rng(0)
    batches = [p for _ in range(EPOCHS) for p in np.split(rng.permutation(N), N // BATCH)]
    loss = nn.CrossEntropyLoss(weight=torch.as_tensor(weight, dtype=torch.float64), ignore_index=IGNORED)
    base = _train(x, y, batches, weight, folder=tmp_path, loss=loss, lr=lr)
    raw = json.loads((tmp_path / "checkpoints/manifest.json").read_text())
    assert raw["loss"]["weight"] == weight and raw["loss"]["ignore_index"] == IGNORED
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx = manifest_context(digits_mlp()(), read_manifest(tmp_path / "checkpoints/manifest.json"), train,
                               ScoreSettings(device="cpu"))
        est = run_method(ctx, "diffin", query.x[:60], query.y[:60], need_self=False)["influence"]
    lines = [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)]
    named = [a for a in ctx.recipe.approximations if "class weights / ignore_index" in a]
    assert len(named) == 1 and "\n" not in named[0], ctx.recipe.approximations
    assert any(named[0] in ln for ln in lines), lines
    spec = ctx.fm.loss                      # torch's per-sample loss over the training set's mean weight
    w_train = np.where(train.y == IGNORED, 0.0, np.asarray(weight)[train.y])
    np.testing.assert_allclose(spec.scale, 1.0 / w_train.mean(), rtol=1e-12)
    logits, labels = torch.randn(10, 10, dtype=torch.float64), torch.arange(10)
    expect = nn.functional.cross_entropy(logits, labels, weight=torch.as_tensor(weight, dtype=torch.float64),
                                         ignore_index=IGNORED, reduction="none") / w_train.mean()
    torch.testing.assert_close(spec(logits, labels), expect)
    ignored = np.flatnonzero(train.y == IGNORED)
    assert len(ignored) and np.all(est[ignored] == 0), est[ignored]   # no gradient, no influence
    return dict(train=train, query=query, x=x, y=y, batches=batches, base=base, ctx=ctx, est=est, lines=lines,
                rng=rng, lr=lr)


def _meets_the_target(c, weight):
    """16 scored samples (ignored rows excluded) against float64 leave-one-out retrained at the run's
    lr: Spearman >= 0.9 and median |estimate| / |truth| in [0.8, 1.25] (issue 17's target)."""
    spec = c["ctx"].fm.loss
    qx, qy = torch.as_tensor(c["query"].x[:60], dtype=torch.float64), torch.as_tensor(c["query"].y[:60])

    def q_loss(model):
        with torch.no_grad():
            return float(spec(model(qx), qy).mean())
    l0 = q_loss(c["base"])
    samples = c["rng"].choice(np.flatnonzero(c["train"].y != IGNORED), 16, replace=False)
    truth = np.array([q_loss(_train(c["x"], c["y"], c["batches"], weight, drop=int(z), lr=c["lr"])) - l0
                      for z in samples])
    est = c["est"][samples]
    rho = spearmanr(est, truth)[0]
    size = np.median(np.abs(est)) / np.median(np.abs(truth))
    assert rho >= 0.9 and 0.8 <= size <= 1.25, (rho, size)


def test_ignore_index_recorded_replayed_and_against_leave_one_out(tmp_path):
    """ignore_index alone: the replay's self-check passes (each batch's count of ignored rows is
    modelled by the mean, within its tolerance here) and the estimate meets the target."""
    weight = [1.0] * 10
    c = _recorded(tmp_path, weight)
    assert c["ctx"].batch_order is not None and not any("self-check failed" in ln for ln in c["lines"])
    _meets_the_target(c, weight)


def test_unequal_class_weights_are_never_silent(tmp_path):
    """Unequal class weights: recorded, used and named; where the replay cannot follow the
    batches' own weight sums its self-check says so in one line (a known gap, module doc)."""
    c = _recorded(tmp_path, UNEQUAL)
    if c["ctx"].batch_order is None:
        failed = [ln for ln in c["lines"] if "self-check failed" in ln]
        assert len(failed) == 1 and "\n" not in failed[0], c["lines"]
        # the line names the cause and its measured cost, not "an unrecorded loss or clipping"
        assert "class weights" in failed[0] and "unrecorded loss" not in failed[0], failed[0]
        assert "Spearman 0.18, sizes 0.75x" in failed[0], failed[0]
    named = [a for a in c["ctx"].recipe.approximations if "class weights / ignore_index" in a]
    assert "Spearman 0.18, sizes 0.75x" in named[0], named
    assert np.isfinite(c["est"]).all()


def test_unequal_class_weights_replayed_against_leave_one_out(tmp_path):
    """Unequal class weights modelled exactly (adam_batches.step_loss): each replayed step's batch loss
    is torch's sum_j w_j l_j / W_B over its own batch, and z's removal term at a step holding it is
    -(w_z / W_B) g_z (the batch's denominator kept, as the truth keeps it). The replay's self-check
    passes (it failed with the training set's mean weight: buffer 6% off), nothing says it failed,
    and the estimate meets the target against float64 leave-one-out. lr 0.05: at the other tests'
    lr 0.1 the same replay ranks 0.96 with sizes 0.72x, and 1.00 / 1.00x against a removal of 1% of
    z's weight, so the gap there is removal's nonlinearity, not the model (docs/recipes.md "Loss")."""
    c = _recorded(tmp_path, UNEQUAL, lr=0.05)
    ctx = c["ctx"]
    assert ctx.batch_order is not None and ctx.adam_check["passed"], ctx.adam_check
    assert ctx.adam_check["worst"]["buf"] < 1e-4, ctx.adam_check["worst"]
    assert not any("self-check failed" in ln for ln in c["lines"]), c["lines"]
    named = [a for a in ctx.recipe.approximations if "class weights / ignore_index" in a]
    assert "modelled exactly by the batch-order replay" in named[0], named
    _meets_the_target(c, UNEQUAL)
