"""Where a new query's time goes, step by step, in one process (issue 23: each step's gain).

    nice -n 10 python benchmarks/explore_profile.py PROJECT --run diffin [--queries 3]

PROJECT: scored with diffin and a feature store that has the per-checkpoint sketch. Per query
(seeded), process CPU time (time.process_time: what the work costs on the cores it used; wall
time on this shared machine is several times that) of:
  plan_func_grad_s   the exact path's plan with batch gradients by torch.func.grad (before)
  plan_s             the same plan with batch gradients by torch.autograd on a leaf (now)
  plan_rel_diff      max |w_k(now) - w_k(before)| / max |w_k| over the checkpoints
  bounds_s           every row's estimate and sigma through the per-checkpoint sketch
  certified_s        the rows certified_rows rescored (rows: how many) by the exact path
  all_rows_s         every row rescored (what `diffin top --exact` adds to the plan)
Writes benchmarks/results/explore_profile.csv.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def cpu(fn):
    t = time.process_time()
    out = fn()
    return out, time.process_time() - t


def main() -> None:
    from torch.func import grad
    from diffin_core.engine import functional
    from diffin_core.project.folder import Project
    from diffin_core.run import features as F
    from diffin_core.methods.diffin import DiffIn
    ap = argparse.ArgumentParser()
    ap.add_argument("project")
    ap.add_argument("--run", default="diffin")
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--seed", type=int, default=2)
    a = ap.parse_args()
    project = Project(a.project)
    store = F.FeatureStore.open(project, a.run)
    ctx = F._context(project, a.run)
    q = project.query
    picks = np.random.default_rng(a.seed).choice(len(q), a.queries, replace=False)
    new_grad = functional.FunctionalModel.batch_grad

    def old_grad(self, theta, x, y):
        return self._sliced(lambda xs, ys: grad(self.mean_loss)(theta, xs, ys).detach(), x, y)
    rows = []
    DiffIn().prepare(ctx, q.x[[0]], q.y[[0]])                       # warm: checkpoints, allocator
    for qi in picks.tolist():
        functional.FunctionalModel.batch_grad = old_grad
        try:
            before, t_old = cpu(lambda: DiffIn().prepare(ctx, q.x[[qi]], q.y[[qi]]))
        finally:
            functional.FunctionalModel.batch_grad = new_grad
        plan, t_new = cpu(lambda: DiffIn().prepare(ctx, q.x[[qi]], q.y[[qi]]))
        scale = max(float(it.w.abs().max()) for it in plan)
        diff = max(float((a_.w - b_.w).abs().max()) for a_, b_ in zip(plan, before)) / scale
        (est, sigma), t_b = cpu(lambda: store.plan_bounds(plan))
        (infl, exact), t_c = cpu(lambda: F.certified_rows(est, sigma, lambda r: F.rescore_rows(ctx, plan, r), 10))
        full, t_all = cpu(lambda: F.rescore_rows(ctx, plan, np.arange(ctx.n)))
        top = lambda v, s: set(np.argsort(-s * v, kind="stable")[:10].tolist())   # noqa: E731
        rows.append({"query": qi, "plan_func_grad_s": t_old, "plan_s": t_new, "plan_rel_diff": diff,
                     "bounds_s": t_b, "certified_s": t_c, "rows": int(exact.sum()), "all_rows_s": t_all,
                     "topk_overlap": np.mean([len(top(infl, s) & top(full, s)) / 10 for s in (1, -1)]),
                     "threads": torch.get_num_threads()})
        print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    df.round(4).to_csv(RESULTS / "explore_profile.csv", index=False)
    print(df.median(numeric_only=True).round(3).to_string())


if __name__ == "__main__":
    main()
