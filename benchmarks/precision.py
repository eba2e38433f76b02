"""Low-precision scoring vs float32 on the sample project (issue 11, item 3).

    python benchmarks/precision.py                         # CPU: float32 vs bfloat16, ~5 min on 2 cores
    python benchmarks/precision.py --device cuda --precisions float32,bfloat16,float16
    python benchmarks/precision.py --precisions float32,float16 --paths influence --name precision_float16

For each precision, Diff-In on the sample project (MNIST 4k, SmallCNN, 12 checkpoints, 10% flipped
labels) along two paths: ``influence`` (one query set's influence over the training set, jvp)
and ``score`` (``diffin score``: influence, self-influence from per-sample gradients and
label_issue). Against float32 in the same run: Spearman and relative L2 error of the influence,
top-10 / top-100 overlap (most helpful), label-issue AUROC (flipped labels), the check's own
figures and the precision it chose, and training-set samples/s (the scoring walk, check
included; the query plan is float32 in every run and excluded) as a ratio to float32's; each
precision runs twice in ABBA order and its faster run is kept.
Writes results/precision.csv and .png (or --out).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffin_core.methods import METHODS, ScoreSettings  # noqa: E402
from diffin_core.engine.precision import PrecisionWarning  # noqa: E402
from diffin_core.project.folder import Project  # noqa: E402
from diffin_core.project.sample import SAMPLE_DIR  # noqa: E402
from diffin_core.run.context import project_context  # noqa: E402


def one(project: Project, prec: str, path: str, device: str) -> tuple[dict, dict]:
    ctx = project_context(project, ScoreSettings(precision=prec, device=device))
    q = project.query
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = METHODS["diffin"]().run(ctx, np.asarray(q.x), q.y, need_self=path == "score")
    wall = time.perf_counter() - started
    for w in caught:
        if issubclass(w.category, PrecisionWarning):
            print(f"  warning: {w.message}", flush=True)
    rec = ctx.precision or {}
    return out, {"device": str(ctx.device), "precision": prec, "path": path, "used": rec.get("used", prec),
                 "wall_s": round(wall, 2), "scores_s": ctx.timings["scores_s"],
                 "samples_per_s": round(ctx.n / ctx.timings["scores_s"], 1),
                 "check_spearman": rec.get("influence", {}).get("spearman"),
                 "check_rel_l2": rec.get("influence", {}).get("rel_l2"),
                 "check_topk": rec.get("influence", {}).get("topk_overlap")}


def overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precisions", default="float32,bfloat16")
    ap.add_argument("--paths", default="influence,score")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default=None, help="file stem (default precision, precision_<device>)")
    args = ap.parse_args()
    project = Project(SAMPLE_DIR / "mnist")
    noisy = project.train.true_y != project.train.y
    rows = []
    precs = args.precisions.split(",")
    for path in args.paths.split(","):
        runs: dict[str, tuple[dict, dict]] = {}
        for prec in precs + precs[::-1]:         # ABBA order: each precision's faster run is kept
            out, row = one(project, prec, path, args.device)
            print(f"  {path} {prec}: {row['scores_s']} s", flush=True)
            if prec not in runs or row["scores_s"] < runs[prec][1]["scores_s"]:
                runs[prec] = (out, row)
        r_out, r_row = runs[precs[0]]
        for prec in precs:
            out, row = runs[prec]
            a, b = r_out["influence"], out["influence"]
            row.update(spearman=round(float(spearmanr(a, b)[0]), 5),
                       rel_l2=round(float(np.linalg.norm(b - a) / np.linalg.norm(a)), 6),
                       top10=overlap(a, b, 10), top100=overlap(a, b, 100),
                       speed_ratio=round(row["samples_per_s"] / r_row["samples_per_s"], 3))
            if path == "score":
                row["auroc"] = round(float(roc_auc_score(noisy, out["label_issue"])), 4)
            rows.append(row)
            print(row, flush=True)
    df = pd.DataFrame(rows)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or ("precision" if args.device == "cpu" else f"precision_{args.device}")
    df.to_csv(out_dir / f"{name}.csv", index=False)
    plot(df, out_dir / f"{name}.png")
    print(df.to_string(index=False))


def plot(df: pd.DataFrame, png: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    low = df[df.precision != "float32"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    labels = [f"{r.path}\n{r.precision}" for r in low.itertuples()]
    x = np.arange(len(low))
    axes[0].bar(x - 0.2, low.spearman, 0.4, label="Spearman")
    axes[0].bar(x + 0.2, low.top100, 0.4, label="top-100 overlap")
    axes[0].set_ylim(0.9 if len(low) and min(low.spearman.min(), low.top100.min()) > 0.9 else 0, 1.0)
    axes[0].set_xticks(x, labels)
    axes[0].set_title("agreement with float32 (influence)")
    axes[0].legend(loc="lower right", fontsize=8)
    axes[1].bar(x, low.speed_ratio)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_xticks(x, labels)
    axes[1].set_title(f"samples/s vs float32 ({df.device.iloc[0]})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
