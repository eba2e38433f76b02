"""BatchNorm: which linearisation to score with, and what any checkpoint estimator can reach.

Part 1 (modes): the BatchNorm recipes of benchmarks/recipes.py (BatchNorm1d MLP, BatchNorm2d CNN;
torch SGD + momentum 0.9, cosine, float64, recorded every 10 steps), 120 truths each (trajectory
leave-one-out), Diff-In at 5 and 20 checkpoints, Hessian batch 256 or the default for BatchNorm
nets (bn_hessian_batch 1024, here all 800 samples), with BatchNorm linearised as
  eval          eval mode, each checkpoint's own running statistics (the product's path)
  recalibrated  eval mode, statistics recomputed per checkpoint from 256 training samples
  train         batch statistics throughout (batchnorm.train_mode_influence: train-mode HVPs,
                each sample's effect through the statistics, query gradient through the running
                statistics' dependence on theta)
Part 2 (ceiling): the exact derivative of the truth (autograd through every training step,
float64), with z's real batches ("exact") and averaged over batch membership ("expected": z
counted b/N in every batch, all a checkpoint estimator can know), for the MLP at a cosine and a
constant lr, against 40 truths.

    python benchmarks/batchnorm_modes.py  -> benchmarks/results/batchnorm_modes.csv + .png
CSV columns: part, model, variant, checkpoints, hessian_rows, spearman, pearson.
"""
from __future__ import annotations

import copy
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from torch.func import functional_call

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from diffin_core.engine.batchnorm import batch_statistics, bn_modules, train_mode_influence  # noqa: E402
from diffin_core.project.checkpoints import read_manifest  # noqa: E402
from diffin_core.engine.functional import FunctionalModel  # noqa: E402
from diffin_core.methods import ScoreSettings  # noqa: E402
from diffin_core.run.scoring import run_method
from diffin_core.run.context import manifest_context
from diffin_core.tasks.truth import (TorchRecipe, batch_order, batchnorm_cnn_recipe, digits_case,  # noqa: E402
                               leave_one_out_torch, recipe_case, standard_recipes)

N, EPOCHS, BATCH = 800, 8, 32


def recalibrated(ctx, k: int, size: int = 256) -> dict:
    """Checkpoint k's BatchNorm buffers recomputed from one seeded training batch (train mode)."""
    model = copy.deepcopy(ctx.fm.model)
    for m in bn_modules(model):
        m.momentum = None
        m.reset_running_stats()
    with torch.no_grad():
        for name, part in zip(ctx.fm.names, torch.split(ctx.thetas[k], ctx.fm.sizes)):
            model.get_parameter(name).copy_(part.view_as(model.get_parameter(name)))
        model.train()(ctx.sample_batch(size, k, salt=13)[0])
    return {n: b.clone() for n, b in model.named_buffers()}


def modes(rows, name, recipe, tmp):
    case = recipe_case(recipe, Path(tmp) / name, n_train=N, epochs=EPOCHS, samples=120, every=10)
    m = read_manifest(Path(tmp) / name / "checkpoints" / "manifest.json")
    sx, sy = case["train"].x[case["samples"]], case["train"].y[case["samples"]]
    for count in (5, 20):
        idx = sorted({int(round(i)) for i in np.linspace(0, len(m.checkpoints) - 1, count)})
        sub = replace(m, checkpoints=[m.checkpoints[i] for i in idx])
        for rows_, variant in [(r, v) for r in (256, 1024) for v in ("eval", "recalibrated", "train")]:
            settings = ScoreSettings(device="cpu", hessian_batch=256, bn_hessian_batch=0 if rows_ == 256 else rows_)
            ctx = manifest_context(recipe.model_fn(), sub, case["train"], settings)
            if variant == "train":
                est = train_mode_influence(ctx, case["query"].x, case["query"].y, sx, sy).cpu().numpy()
            else:
                if variant == "recalibrated":
                    ctx.buffers = [recalibrated(ctx, k) for k in range(ctx.m - 1)] + [ctx.buffers[-1]]
                est = run_method(ctx, "diffin", case["query"].x, case["query"].y, need_self=False)["influence"]
                est = est[case["samples"]]
            rows.append(dict(part="modes", model=name, variant=variant, checkpoints=len(idx),
                             hessian_rows=min(ctx.hessian_rows, ctx.n), spearman=spearmanr(est, case["truth"])[0],
                             pearson=pearsonr(est, case["truth"])[0]))
            print(rows[-1], flush=True)


def exact_derivative(recipe: TorchRecipe, lrs, x, y, qx, qy, batches, expected: bool) -> np.ndarray:
    """-dL_Q/dw_z (N,) through every SGD-momentum step (torch's order and running-statistics
    update), w_z = z's weight in the loss and in the batch statistics; ``expected``: z weighted
    b/N in every batch instead of its real batches."""
    model = recipe.model_fn().eval()
    fm = FunctionalModel(model)
    beta = 0.9
    theta = fm.theta_of(model).requires_grad_(True)
    bufs = {k: v.clone() for k, v in fm.buffers.items() if "running" in k}
    names = {m: n for n, m in model.named_modules()}
    w = torch.ones(len(y), dtype=torch.float64, requires_grad=True)
    buf = None
    for s, idx in enumerate(batches):
        t = torch.as_tensor(idx)
        if expected:
            wb = torch.cat([torch.ones(len(idx), dtype=w.dtype), (w - 1) * len(idx) / len(y)])
            xb, yb = torch.cat([x[t], x]), torch.cat([y[t], y])
        else:
            wb, xb, yb = w[t], x[t], y[t]
        rec = []
        with batch_statistics(model, wb, record=rec):
            logits = functional_call(model, {**fm.unflatten(theta), **bufs}, (xb,))
        loss = (F.cross_entropy(logits, yb, reduction="none") * wb).sum() / len(idx)
        g = torch.autograd.grad(loss, theta, create_graph=True)[0]
        buf = g if buf is None else beta * buf + g
        theta = theta - lrs[s] * buf
        for mod, mean, var, cnt in rec:
            n, mom = names[mod], mod.momentum
            bufs[f"{n}.running_mean"] = (1 - mom) * bufs[f"{n}.running_mean"] + mom * mean
            bufs[f"{n}.running_var"] = (1 - mom) * bufs[f"{n}.running_var"] + mom * var * cnt / (cnt - 1)
    with batch_statistics(model, running_values="only"):
        loss_q = F.cross_entropy(functional_call(model, {**fm.unflatten(theta), **bufs}, (qx,)), qy)
    return -torch.autograd.grad(loss_q, w)[0].numpy()


def ceiling(rows):
    from torch.optim import SGD
    from torch.optim.lr_scheduler import CosineAnnealingLR
    bn = standard_recipes()["batchnorm-sgd-momentum"]
    train, query = digits_case(noise=0.1, n_train=N, seed=0)
    x, y = torch.as_tensor(train.x, dtype=torch.float64), torch.as_tensor(train.y)
    qx, qy = torch.as_tensor(query.x, dtype=torch.float64), torch.as_tensor(query.y)
    batches = batch_order(N, BATCH, EPOCHS, seed=0)
    samples = np.random.default_rng(1).choice(N, 40, replace=False)
    for sched in ("cosine", "constant"):
        recipe = replace(bn, name=sched, scheduler_fn=(lambda o, t: CosineAnnealingLR(o, T_max=t)) if sched == "cosine"
                         else None)
        opt = SGD([torch.zeros(1, requires_grad=True)], lr=0.05, momentum=0.9)
        sch = recipe.scheduler_fn(opt, len(batches)) if recipe.scheduler_fn else None
        lrs = []
        for _ in batches:
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            if sch:
                sch.step()
        truth = leave_one_out_torch(recipe, x, y, qx, qy, batches, samples)
        for expected in (False, True):
            d = exact_derivative(recipe, lrs, x, y, qx, qy, batches, expected)[samples]
            rows.append(dict(part="ceiling", model=f"mlp-{sched}-lr", variant="expected" if expected else "exact",
                             checkpoints=len(batches) + 1, hessian_rows=0, spearman=spearmanr(d, truth)[0],
                             pearson=pearsonr(d, truth)[0]))
            print(rows[-1], flush=True)


def main(out: Path = HERE / "results") -> pd.DataFrame:
    warnings.simplefilter("ignore")
    rows = []
    ceiling(rows)
    with tempfile.TemporaryDirectory() as tmp:
        modes(rows, "bn1d-mlp", standard_recipes()["batchnorm-sgd-momentum"], tmp)
        modes(rows, "bn2d-cnn", batchnorm_cnn_recipe(), tmp)
    df = pd.DataFrame(rows)
    df.to_csv(out / "batchnorm_modes.csv", index=False, float_format="%.4f")
    plot(df, out / "batchnorm_modes.png")
    return df


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.4), gridspec_kw=dict(width_ratios=[3, 1]))
    sub = df[df.part == "modes"]
    groups = sub.drop_duplicates(["model", "checkpoints", "hessian_rows"])
    labels = [f"{r.model}\n{r.checkpoints} ckpts\nH batch {r.hessian_rows}" for r in groups.itertuples()]
    for i, v in enumerate(("eval", "recalibrated", "train")):
        vals = sub[sub.variant == v].spearman.to_numpy()
        axes[0].bar(np.arange(len(vals)) + (i - 1) * 0.27, vals, 0.27, label=v)
    axes[0].set_xticks(np.arange(len(labels)), labels, fontsize=7)
    axes[0].axhline(0.8, color="k", lw=0.6, ls="--")
    axes[0].set_ylabel("Spearman vs leave-one-out (120 samples)")
    axes[0].set_title("Diff-In with BatchNorm linearised as ...")
    axes[0].legend(fontsize=8)
    c = df[df.part == "ceiling"]
    axes[1].bar(np.arange(len(c)), c.spearman, color=["C3" if v == "exact" else "C4" for v in c.variant])
    ticks = [f"{m.split('-')[1]} lr\n{v}" for m, v in zip(c.model, c.variant)]
    axes[1].set_xticks(np.arange(len(c)), ticks, fontsize=8)
    axes[1].axhline(0.8, color="k", lw=0.6, ls="--")
    axes[1].set_title("exact derivative of training (40 truths)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    print(main().to_string())
