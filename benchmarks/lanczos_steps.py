"""What fewer Lanczos steps per plan view would cost in accuracy (issue 19: a ResNet-18's plan is
40 exact Hessian-vector products, 3.7 s each; 4 steps would make it 16).

    python benchmarks/lanczos_steps.py [--steps 10,4,6,20] [--checkpoints 10]
    python benchmarks/lanczos_steps.py --hessian-batch 256,64,32,16,8    # -> results/hessian_batch.csv

The ground-truth case of tests/test_ground_truth.py (sklearn digits, 10% flipped
labels, tanh MLP 64-32-10, 800 rows, SGD cosine lr from 0.2, 8 epochs), diffin from
``--checkpoints`` checkpoints with exact HVPs and ``lanczos_steps`` = each of --steps. Against
trajectory leave-one-out in float64 on 40 samples (10 flipped, 30 clean): Spearman of influence
(query set) and of self-influence (truth L_z(theta without z) - L_z(theta)), the median size
ratio of self-influence to its truth, label_issue's AUROC for the flips over all 800 rows, and
the relative L2 change of influence and self-influence against the first --steps value.
Writes results/lanczos_steps.csv. With ``--hessian-batch`` the sweep is over the Hessian batch's
rows instead (at the first --steps value; the other way to make a plan cheaper: an exact product
costs about as many per-sample gradients as the batch has rows), written to
results/hessian_batch.csv; the L2 changes are then against the first --hessian-batch value.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "lanczos_steps.csv"


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def digits(steps: list[int], checkpoints: int, batches: list[int] | None = None) -> list[dict]:
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score
    from diffin_core.engine.models import MLP
    from diffin_core.methods import ScoreSettings
    from diffin_core.run.context import make_context
    from diffin_core.run.scoring import run_method
    from diffin_core.tasks.truth import digits_sgd_run, leave_one_out, train_sgd
    r = digits_sgd_run()
    train, query, fm, x, y, qx, qy, traj = r.train, r.query, r.fm, r.x, r.y, r.qx, r.qy, r.traj
    flipped = np.asarray(train.y) != np.asarray(train.true_y)
    rng = np.random.default_rng(1)
    samples = np.concatenate([rng.choice(np.flatnonzero(flipped), 10, replace=False),
                              rng.choice(np.flatnonzero(~flipped), 30, replace=False)])
    truth = leave_one_out(fm, traj, x, y, qx, qy, samples)
    T = len(traj.batches)
    self_truth = []
    for z in samples:
        t = train_sgd(fm, traj.theta0, x, y, traj.batches, traj.lrs, drop=int(z), save_every=None)
        self_truth.append(float(fm.mean_loss(t.saved[T], x[z:z + 1], y[z:z + 1]))
                          - float(fm.mean_loss(traj.saved[T], x[z:z + 1], y[z:z + 1])))
    self_truth = np.asarray(self_truth)
    rows, ref = [], None
    cases = [(s, None) for s in steps] if not batches else [(steps[0], b) for b in batches]
    for s, hb in cases:
        ck_steps, thetas, lrs = traj.checkpoints(checkpoints)
        states = [{k: v.float() for k, v in fm.unflatten(t).items()} for t in thetas]
        extra = {} if hb is None else {"hessian_batch": hb}
        ctx = make_context(MLP(64, (32,), 10), states, ck_steps, lrs, train,
                           ScoreSettings(hvp="exact", lanczos_steps=s, **extra))
        c = time.process_time()
        out = run_method(ctx, "diffin", query.x, query.y, need_self=True)
        cpu = time.process_time() - c
        ref = ref or out
        si = out["self_influence"]
        rows.append({"case": "digits-mlp", "checkpoints": checkpoints, "lanczos_steps": s,
                     **({} if hb is None else {"hessian_batch": int(ctx.hessian_rows)}),
                     "influence_spearman_vs_loo": round(spearmanr(out["influence"][samples], truth)[0], 4),
                     "self_spearman_vs_loo": round(spearmanr(si[samples], self_truth)[0], 4),
                     "self_size_vs_loo": round(float(np.median(np.abs(si[samples])) / np.median(np.abs(self_truth))), 3),
                     "label_issue_auroc": round(roc_auc_score(flipped, out["label_issue"]), 4),
                     "influence_rel_l2_vs_first": round(rel(out["influence"], ref["influence"]), 4),
                     "self_rel_l2_vs_first": round(rel(si, ref["self_influence"]), 4),
                     "cpu_s": round(cpu, 1)})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="10,4,6,20")
    ap.add_argument("--checkpoints", type=int, default=10)
    ap.add_argument("--hessian-batch", default="", help="comma list of Hessian batch rows to sweep instead")
    a = ap.parse_args(argv)
    from diffin_core.engine.threads import configure
    configure(1)
    import pandas as pd
    steps = [int(s) for s in a.steps.split(",")]
    load0 = os.getloadavg()[0]
    batches = [int(b) for b in a.hessian_batch.split(",")] if a.hessian_batch else None
    rows = digits(steps, a.checkpoints, batches)
    for r in rows:
        r.update(load_start=round(load0, 2), load_end=round(os.getloadavg()[0], 2))
    df = pd.DataFrame(rows)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    out = OUT.with_name("hessian_batch.csv") if batches else OUT
    df.to_csv(out, index=False)
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
