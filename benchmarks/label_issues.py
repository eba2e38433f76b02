"""Label-error detection and cost of every method on the sample project (issue: the engine).

    python benchmarks/label_issues.py            # ~10 min on 2 CPU cores

For the shipped sample project (MNIST 4k, 10% flipped) and the same recipe at 20% flips:
AUROC of label_issue against the flipped mask, recall of the flipped labels within the top 10%
(and top-k where k = the number flipped), and wall time. Every method is timed twice, in
alternating order after a warm-up, and the faster time is kept; Diff-In's cost is reported as a
ratio to TracIn's measured in the same run. Writes results/label_issues.csv and .png.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffin_core.methods import METHODS  # noqa: E402
from diffin_core.project.folder import Project  # noqa: E402
from diffin_core.project.sample import SAMPLE_DIR, build_sample_project  # noqa: E402
from diffin_core.run.scoring import run_method
from diffin_core.run.context import project_context

OUT = ROOT / "benchmarks" / "results"


def evaluate(project: Project, setting: str, repeats: int = 2) -> list[dict]:
    noisy = project.train.true_y != project.train.y
    ctx = project_context(project)
    run_method(ctx, "loss", project.query.x[:64], project.query.y[:64])       # warm-up
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    outs = {}
    for rep in range(repeats):
        order = list(METHODS) if rep % 2 == 0 else list(reversed(METHODS))
        for m in order:
            t = time.perf_counter()
            outs[m] = run_method(ctx, m, project.query.x, project.query.y)
            times[m].append(time.perf_counter() - t)
            print(f"{setting} {m}: {times[m][-1]:.1f}s", flush=True)
    rows = []
    k10, kn = int(0.1 * len(noisy)), int(noisy.sum())
    for m, out in outs.items():
        li = out["label_issue"]
        top = np.argsort(-li, kind="stable")
        rows.append({"method": m, "setting": setting, "auroc": roc_auc_score(noisy, li),
                     "recall_top10pct": noisy[top[:k10]].sum() / noisy.sum(),
                     "precision_at_k": noisy[top[:kn]].mean(), "seconds": min(times[m]),
                     "seconds_vs_tracin": min(times[m]) / min(times["tracin"])})
    return rows


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, metric in zip(axes, ["auroc", "recall_top10pct"]):
        piv = df.pivot(index="method", columns="setting", values=metric).sort_values(df["setting"].iloc[0])
        piv.plot.barh(ax=ax)
        ax.set_xlim(max(0.0, float(piv.min().min()) - 0.05), 1.0)
        ax.set_title(f"{metric} (label errors, MNIST sample project)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    rows = evaluate(Project(SAMPLE_DIR / "mnist"), "mnist-4k noise 10%")
    with tempfile.TemporaryDirectory() as tmp:
        rows += evaluate(Project(build_sample_project(Path(tmp) / "noise20", noise=0.2)), "mnist-4k noise 20%")
    df = pd.DataFrame(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    df.round(4).to_csv(OUT / "label_issues.csv", index=False)
    plot(df, OUT / "label_issues.png")
    print(df.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
