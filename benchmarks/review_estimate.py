"""How close Review's "expected label errors left" comes on the sample project (issue 21).

    python benchmarks/review_estimate.py        # < 5 s: reads the shipped run, trains nothing

The sample project's shipped diffin run (sample_data/mnist/prebuilt/diffin-1/scores.parquet,
4,000 digits, 400 labels flipped to another class; the file keeps the true labels) is reviewed
by a simulated perfect reviewer in label_issue order (the Review queue's order): after n
decisions (exclude for a flipped label, keep otherwise), the estimate of workspace/triage.py
(expected_errors: EM noise rate, the decisions standing in for their posterior) is compared
with the flipped labels really left among the undecided samples.

Writes benchmarks/results/review_estimate.csv: reviewed, true_left, estimated_left, noise_rate,
predicted_in_reviewed (the model's count over the reviewed samples, before their decisions),
found_in_reviewed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffin_core.workspace import triage  # noqa: E402

SCORES = ROOT / "sample_data/mnist/prebuilt/diffin-1/scores.parquet"
OUT = ROOT / "benchmarks/results/review_estimate.csv"
STEPS = (0, 50, 100, 200, 300, 400, 500, 600, 800, 1000)


def main() -> None:
    s = pd.read_parquet(SCORES)
    flipped = (s["label"] != s["true_label"]).to_numpy()
    order = np.argsort(-s["label_issue"].to_numpy(), kind="stable")
    ids = s["sample_id"].to_numpy()
    rows = []
    for n in STEPS:
        done = order[:n]
        state = pd.DataFrame({"action": np.where(flipped[done], "exclude", "keep")},
                             index=pd.Index(ids[done], name="sample_id"))
        est = triage.expected_errors(s, state, 10, "diffin")
        rows.append({"reviewed": n, "true_left": int(flipped[order[n:]].sum()),
                     "estimated_left": round(est["left"], 1), "noise_rate": round(est["noise_rate"], 4),
                     "predicted_in_reviewed": round(est["predicted"], 1), "found_in_reviewed": est["found"]})
    df = pd.DataFrame(rows)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(OUT, index=False)
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
