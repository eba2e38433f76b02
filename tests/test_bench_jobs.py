"""The benchmark workers that `diffin bench` spawns still run against today's engine.

benchmarks/_bench.py is not imported by the product, so a refactor there can break
`diffin bench` without any other test noticing (a shadowed `train_sgd` once did). This runs the
ground-truth job on its smallest case and checks what it reports, not only that it ran.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _bench  # noqa: E402

pytestmark = pytest.mark.slow


def test_ground_truth_job_reports_diffin_tracking_leave_one_out():
    cfg = {"gt_samples": {"digits-logreg": 5}, "gt_counts": [5], "gt_methods": ["diffin", "tracin"]}
    rows, _ = _bench.gt_job("digits-logreg", 0, cfg)
    spearman = {r["method"]: r["value"] for r in rows if r["metric"] == "spearman"}
    assert set(spearman) == {"diffin", "tracin"}
    # convex case, 5 checkpoints: propagation should track true leave-one-out and beat TracIn
    assert spearman["diffin"] >= 0.9
    assert spearman["diffin"] >= spearman["tracin"]
    assert any(r["method"] == "trajectory LOO (truth)" and r["metric"] == "seconds" for r in rows)
