"""Recipe features real training scripts use (issue 17): per-group lr / weight decay, frozen groups,
gradient clipping, gradient accumulation, label smoothing; Diff-In and TracIn against true
leave-one-out, each scored as recorded ("modelled") and with the feature's manifest keys removed
("ignored": what an older Recorder wrote, one lr / no clip / plain cross-entropy).

Digits MLP 64-32-10 (10% flipped labels), N samples, batch 32, E epochs, recorded by the Recorder with
rec.step(batch_ids=...) and one checkpoint per epoch; truth = float64 retraining without each of
SAMPLES samples. Figures: Spearman and the size ratio median |pred| / median |true|.

    python benchmarks/recipe_features.py [--seeds 0 1] [--n 400] [--epochs 6] [--samples 30]
        -> benchmarks/results/recipe_features.csv

CSV columns: recipe, seed, scored (modelled / ignored), method, spearman, size_ratio, seconds,
clipping (clipped steps, median factor), approximations (the RecipeWarning line, if any).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from diffin_core.engine.recipe import RecipeWarning  # noqa: E402
from diffin_core.methods import ScoreSettings  # noqa: E402
from diffin_core.project.checkpoints import read_manifest  # noqa: E402
from diffin_core.run.context import manifest_context  # noqa: E402
from diffin_core.run.scoring import run_method  # noqa: E402
from diffin_core.tasks.truth import TorchRecipe, digits_mlp, recipe_case, warmup_cosine  # noqa: E402

# manifest keys removed for the "ignored" scoring of each feature
FEATURE_KEYS = {"groups": ("param_groups", "group_steps"), "clip": ("clip",), "loss": ("loss",), "none": ()}


def recipes() -> dict[str, tuple[TorchRecipe, str]]:
    from torch.optim import SGD, AdamW
    from torch.optim.lr_scheduler import CosineAnnealingLR

    def cos(o, t):
        return CosineAnnealingLR(o, T_max=t)

    def two(body, head, **kw):
        def make(p):
            p = list(p)
            return SGD([{"params": p[:2], "lr": body}, {"params": p[2:], "lr": head}], momentum=0.9, **kw)
        return make

    def adamw_groups(p):
        p = list(p)
        return AdamW([{"params": [p[0], p[2]], "weight_decay": 0.05},
                      {"params": [p[1], p[3]], "weight_decay": 0.0, "lr": 3e-2}], lr=1e-2)

    def frozen_rg(p):
        p = list(p)
        for q in p[:2]:
            q.requires_grad_(False)
        return SGD([{"params": p[:2]}, {"params": p[2:]}], lr=0.05, momentum=0.9)

    def sgd(p):
        return SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-3)
    smooth = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    return {
        "sgd-control": (TorchRecipe("sgd-control", digits_mlp(), sgd, cos), "none"),
        "sgd-head-lr-10x": (TorchRecipe("head", digits_mlp(), two(0.005, 0.05, weight_decay=5e-3), cos), "groups"),
        "sgd-body-lr-10x": (TorchRecipe("body", digits_mlp(), two(0.05, 0.005), cos), "groups"),
        "sgd-frozen-lr0": (TorchRecipe("frozen-lr0", digits_mlp(), two(0.0, 0.05), cos), "groups"),
        "sgd-frozen-requires-grad": (TorchRecipe("frozen-rg", digits_mlp(), frozen_rg, cos), "groups"),
        "adamw-nodecay-groups-bias-lr-3x": (TorchRecipe("adamw-groups", digits_mlp(), adamw_groups, warmup_cosine),
                                            "groups"),
        "clip-half-steps": (TorchRecipe("clip-half", digits_mlp(), sgd, cos, clip=0.6), "clip"),
        "clip-every-step": (TorchRecipe("clip-all", digits_mlp(), sgd, cos, clip=0.3), "clip"),
        "adamw-clip-every-step": (TorchRecipe("adamw-clip", digits_mlp(), lambda p: AdamW(p, lr=1e-2, weight_decay=0.05),
                                              warmup_cosine, clip=0.3), "clip"),
        "accumulation-2x16": (TorchRecipe("accum", digits_mlp(), sgd, cos, accumulate=2), "none"),
        "label-smoothing-0.1": (TorchRecipe("smooth", digits_mlp(), sgd, cos, loss=smooth), "loss"),
    }


def score(case, recipe, manifest, method):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx = manifest_context(recipe.model_fn(), manifest, case["train"], ScoreSettings(device="cpu"))
    lines = "; ".join(str(w.message).split("approximated: ", 1)[-1] for w in caught
                      if issubclass(w.category, RecipeWarning))
    t = time.time()
    out = run_method(ctx, method, case["query"].x, case["query"].y, need_self=False)
    pred = out["influence"][case["samples"]]
    truth = case["truth"]
    clipped = "" if ctx.clip is None else f"clipped {int((ctx.clip < 1).sum())}/{len(ctx.clip)} steps, median factor " \
        f"{float(np.median(ctx.clip)):.2f}"
    return (float(spearmanr(pred, truth)[0]), float(np.median(np.abs(pred)) / np.median(np.abs(truth))),
            round(time.time() - t, 2), lines, clipped)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--only", default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "recipe_features.csv"))
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        for name, (recipe, feature) in recipes().items():
            if args.only and args.only not in name:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RecipeWarning)
                    case = recipe_case(recipe, Path(tmp), n_train=args.n, epochs=args.epochs, batch=32,
                                       samples=args.samples, every=args.n // 32, seed=seed)
                m = read_manifest(Path(tmp) / "checkpoints/manifest.json")
                variants = [("modelled", m)]
                if FEATURE_KEYS[feature]:
                    variants.append(("ignored", replace(m, extra={k: v for k, v in m.extra.items()
                                                                  if k not in FEATURE_KEYS[feature]})))
                for scored, man in variants:
                    for method in ("diffin", "tracin"):
                        rho, size, secs, lines, clipped = score(case, recipe, man, method)
                        rows.append(dict(recipe=name, seed=seed, scored=scored, method=method, spearman=round(rho, 3),
                                         size_ratio=round(size, 3), seconds=secs, clipping=clipped,
                                         approximations=lines))
                        print(f"{name:34s} seed {seed} {scored:8s} {method:7s} rho {rho:.3f} size {size:.2f}"
                              + (f"  [{lines[:90]}]" if lines else ""), flush=True)
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.only and out.is_file():
        old = pd.read_csv(out)
        df = pd.concat([old[~old.recipe.str.contains(args.only, regex=False)], df], ignore_index=True)
    df.to_csv(out, index=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
