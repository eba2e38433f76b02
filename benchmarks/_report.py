"""Print the headline markdown tables from benchmarks/results/*.csv (used for the README).

    python benchmarks/_report.py [results folder]
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import markdown  # noqa: E402

SHOW = {"cleaning": ["test_acc", "flipped_found", "auroc", "score_seconds"],
        "deletion": ["query_loss", "query_acc", "test_loss", "test_acc", "flipped_removed",
                     "spearman", "pearson", "sign_agreement", "score_seconds"],
        "coreset": ["test_acc", "score_seconds"], "ground_truth": ["spearman", "pearson", "seconds"]}

if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results"
    for task, metrics in SHOW.items():
        f = out / f"{task}.csv"
        if not f.is_file():
            continue
        t = pd.read_csv(f)
        for m in metrics:
            if (t.metric == m).any():
                d = 1 if "seconds" in m else 3
                print(f"### {task}: {m}\n\n{markdown(t, m, digits=d)}\n")
