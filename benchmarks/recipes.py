"""Real training recipes: Diff-In vs TracIn (and Adam-aware TracIn) against true leave-one-out.

Each recipe of diffin_core.tasks.truth.standard_recipes trains a digits MLP 64-32-10 (10% flipped
labels, batch 32; plus a BatchNorm2d CNN on the 8x8 digits) with torch's own optimiser and
scheduler in float64, recorded by the Recorder every 10 steps; estimators score from the recorded folder in float32 at 5 and 20 checkpoints.
Truth: retraining without each of SAMPLES training samples (trajectory leave-one-out, float64).

    python benchmarks/recipes.py [--quick] [--seed S] [--only batchnorm]   -> benchmarks/results/recipes.csv + .png
    (another data/batch/sample seed S != 0 writes under benchmarks/results/seed<S>/; --only reruns
    the recipes whose name contains it and replaces just their rows in the CSV)

CSV columns: method, recipe, checkpoints, spearman, pearson, seconds (scoring time).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import pearsonr, spearmanr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from diffin_core.project.checkpoints import read_manifest  # noqa: E402
from diffin_core.methods import ScoreSettings  # noqa: E402
from diffin_core.run.scoring import run_method
from diffin_core.run.context import manifest_context
from diffin_core.tasks.truth import batchnorm_cnn_recipe, recipe_case, standard_recipes  # noqa: E402

METHODS = ("diffin", "tracin", "tracin-adam")


def recipes() -> dict:
    """The standard recipes plus a BatchNorm2d CNN (SGD + momentum, cosine)."""
    cnn = batchnorm_cnn_recipe()
    return {**standard_recipes(), cnn.name: cnn}


def main(quick: bool = False, out: Path = HERE / "results", seed: int = 0, only: str | None = None) -> pd.DataFrame:
    """``only``: a substring of recipe names; only those are rerun and their rows replaced in the
    existing CSV (the other rows kept)."""
    n_train, epochs, samples = (400, 4, 12) if quick else (800, 8, 40)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe in recipes().items():
            if only and only not in name:
                continue
            t0 = time.time()
            case = recipe_case(recipe, Path(tmp) / name, n_train=n_train, epochs=epochs, samples=samples, every=10,
                               seed=seed)
            print(f"{name}: truth in {time.time() - t0:.0f}s", flush=True)
            m = read_manifest(Path(tmp) / name / "checkpoints" / "manifest.json")
            for count in (5, 20):
                idx = sorted({int(round(i)) for i in np.linspace(0, len(m.checkpoints) - 1, count)})
                sub = replace(m, checkpoints=[m.checkpoints[i] for i in idx])
                for method in METHODS:
                    t0 = time.time()
                    ctx = manifest_context(case["recipe"].model_fn(), sub, case["train"], ScoreSettings(device="cpu"))
                    est = run_method(ctx, method, case["query"].x, case["query"].y, need_self=False)["influence"]
                    est = est[case["samples"]]
                    rows.append(dict(method=method, recipe=name, checkpoints=len(idx),
                                     spearman=spearmanr(est, case["truth"])[0], pearson=pearsonr(est, case["truth"])[0],
                                     seconds=time.time() - t0))
                    print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    folder = (out / "quick" if quick else out) / (f"seed{seed}" if seed else "")
    folder.mkdir(parents=True, exist_ok=True)
    if only and (folder / "recipes.csv").is_file():
        old = pd.read_csv(folder / "recipes.csv")
        order = list(dict.fromkeys(list(old.recipe) + list(df.recipe)))
        df = pd.concat([old[~old.recipe.isin(df.recipe)], df])
        df = df.assign(_o=df.recipe.map(order.index)).sort_values("_o", kind="stable").drop(columns="_o")
    df.to_csv(folder / "recipes.csv", index=False, float_format="%.4f")
    plot(df, folder / "recipes.png")
    return df


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recipes = list(dict.fromkeys(df.recipe))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, count in zip(axes, sorted(df.checkpoints.unique())):
        sub = df[df.checkpoints == count]
        width = 0.8 / len(METHODS)
        for i, method in enumerate(METHODS):
            vals = [float(sub[(sub.recipe == r) & (sub.method == method)].spearman.iloc[0]) for r in recipes]
            ax.bar(np.arange(len(recipes)) + (i - 1) * width, vals, width, label=method)
        ax.axhline(0.9, color="k", lw=0.6, ls="--")
        ax.set_xticks(np.arange(len(recipes)), [r.replace("-", "\n", 1) for r in recipes], fontsize=8)
        ax.set_title(f"{count} checkpoints")
        ax.set_ylim(min(0, float(df.spearman.min())) - 0.05, 1.0)
    axes[0].set_ylabel("Spearman vs true leave-one-out")
    axes[0].legend(fontsize=8)
    fig.suptitle("Real training recipes (digits MLP, torch optimisers, float64 truth)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", help="rerun only recipes whose name contains this; other CSV rows kept")
    args = ap.parse_args()
    print(main(args.quick, seed=args.seed, only=args.only).to_string())
