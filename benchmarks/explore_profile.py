"""Where a new query's time goes, step by step, in one process (issue 23: each step's gain).

    nice -n 10 python benchmarks/explore_profile.py PROJECT --run diffin [--queries 3]
                  [--compare-store OLD_RUN_DIR/features]

PROJECT: scored with diffin by this version (its meta.json records the HVP decisions per
checkpoint, its feature store is version 3). Per query (seeded), process CPU time
(time.process_time: what the work costs on the cores it used; wall time on this shared machine
is several times that) of:
  plan_probe_s       the exact path's plan probing every Lanczos view's first product both ways
                     (hvp auto without the run's decisions: what every query paid before)
  plan_s             the same plan adopting the run's measured decisions (hvp.adopt: no probe)
  plan_rel_diff      max |w_k(adopted) - w_k(probed)| / max |w_k| over the checkpoints
  bounds_s           every row's estimate and sigma through the store (basis + sketches)
  rows               rows certified_rows rescored (both sides, top 10), certified_s their cost
  rows_compare       with --compare-store (a version-2 store of the same run: one sketch shared by
                     the checkpoints): the rows its old rule (sqrt of summed variances, which is no
                     bound there) and its sound rule (sum of deviations) would rescore
  z_max              max |estimate - exact| / sigma over all rows (a bound keeps it below 4)
  all_rows_s         every row rescored (what `diffin top --exact` adds to the plan)
  topk_overlap       the certified top 10 against all rows rescored (helpful and harmful)
Writes benchmarks/results/explore_profile.csv.
"""
from __future__ import annotations

import argparse
import os
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


def needed(est, sigma, exact, k=10, z=4.0) -> int:
    """Rows a certified answer must rescore: those whose estimate + z sigma reaches the k-th
    exact value of a side."""
    return int(sum(np.sum(s * est + z * sigma >= np.sort(s * exact)[-k]) for s in (1, -1)))


def main() -> None:
    from diffin_core.project.folder import Project
    from diffin_core.run import features as F
    from diffin_core.run.context import project_context
    from diffin_core.methods import ScoreSettings
    from diffin_core.methods.diffin import DiffIn
    from dataclasses import replace
    ap = argparse.ArgumentParser()
    ap.add_argument("project")
    ap.add_argument("--run", default="diffin")
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--compare-store", type=Path, default=None)
    a = ap.parse_args()
    project = Project(a.project)
    store = F.FeatureStore.open(project, a.run)
    old = F.FeatureStore(a.compare_store) if a.compare_store else None
    ctx = F._context(project, a.run)                                    # adopts the run's HVP decisions
    probing = F.configured(project_context(project, replace(ScoreSettings(), **project.run(a.run).meta.get("settings", {}))))
    q = project.query
    picks = np.random.default_rng(a.seed).choice(len(q), a.queries, replace=False)
    rows = []
    DiffIn().prepare(ctx, q.x[[0]], q.y[[0]])                       # warm: checkpoints, allocator
    for qi in picks.tolist():
        probed, t_probe = cpu(lambda: DiffIn().prepare(probing, q.x[[qi]], q.y[[qi]]))
        plan, t_plan = cpu(lambda: DiffIn().prepare(ctx, q.x[[qi]], q.y[[qi]]))
        scale = max(float(it.w.abs().max()) for it in plan)
        diff = max(float((a_.w - b_.w).abs().max()) for a_, b_ in zip(plan, probed)) / scale
        (est, sigma), t_b = cpu(lambda: store.plan_bounds(plan))
        (infl, exact), t_c = cpu(lambda: F.certified_rows(est, sigma, lambda r: F.rescore_rows(ctx, plan, r), 10))
        full, t_all = cpu(lambda: F.rescore_rows(ctx, plan, np.arange(ctx.n)))
        top = lambda v, s: set(np.argsort(-s * v, kind="stable")[:10].tolist())   # noqa: E731
        rec = {"query": qi, "plan_probe_s": t_probe, "plan_s": t_plan, "plan_rel_diff": diff,
               "bounds_s": t_b, "certified_s": t_c, "rows": int(exact.sum()),
               "rows_needed": needed(est, sigma, full), "z_max": float(np.max(np.abs(est - full) / sigma)),
               "all_rows_s": t_all,
               "topk_overlap": np.mean([len(top(infl, s) & top(full, s)) / 10 for s in (1, -1)]),
               "store_version": store.meta["version"], "basis": store.basis_rank,
               "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0]}
        if old is not None:
            e2, dev = old.plan_bounds(plan)                              # the sound rule for a shared sketch
            var = sum(it.coef ** 2 * 2 * float(it.w.double().square().sum()) * old.ck_norm2[it.k] / old.checkpoint_dim
                      for it in plan)
            rec |= {"rows_compare_old_rule": needed(e2, np.sqrt(var), full),
                    "z_max_compare_old_rule": float(np.max(np.abs(e2 - full) / np.sqrt(var))),
                    "rows_compare_sound_rule": needed(e2, dev, full)}
        rows.append(rec)
        print(rec, flush=True)
    df = pd.DataFrame(rows)
    df.round(4).to_csv(RESULTS / "explore_profile.csv", index=False)
    print(df.median(numeric_only=True).round(3).to_string())


if __name__ == "__main__":
    main()
