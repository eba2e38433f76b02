"""How often the store's first grid agrees with the exact one, on the sample project (issue 21).

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/explore_agreement.py PROJECT --run diffin \
        [--queries 50] [--keep DIR]

PROJECT: the sample project scored with `diffin score PROJECT --method diffin --run diffin`
(its feature store included), e.g. after `diffin demo`. Queries: 5 per query class (seeded), 50
single-sample queries in all. Per query:
  exact        every training row scored by the exact path's own plan (features.exact_plan +
               rescore_rows over all N: `diffin top --exact`; the first query is checked against
               scoring.top_k(exact=True), max_abs_diff_vs_cli in the CSV);
  store        the store alone (`diffin top --shortlist 0`): the approximate first grid;
  shortlisted  the store's default shortlist (2% of N per side) given the exact values (what
               `diffin top` answered before the per-checkpoint sketch: features.merge_rescored);
  certified    with the per-checkpoint sketch (when the store has one): features.certified_rows
               on the plan's bounds, rows "rescored" from the exact vector (the same values);
               certified_rows: how many rows it rescored.
overlap_* = |top-10 of that path ∩ exact top-10| / 10, for the helpful and the harmful side.
Writes benchmarks/results/explore_agreement.csv; ``--keep DIR`` saves each query's exact influence
and plan vectors there and reuses them on a rerun (a query already in DIR costs no model run).
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
K = 10


def overlap(a: np.ndarray, b: np.ndarray, largest: bool) -> float:
    sa = np.argsort(-a if largest else a, kind="stable")[:K]
    sb = np.argsort(-b if largest else b, kind="stable")[:K]
    return len(set(sa.tolist()) & set(sb.tolist())) / K


def main() -> None:
    from diffin_core.run.features import FeatureStore, _context, exact_plan, rescore_rows
    from diffin_core.project.folder import Project
    from diffin_core.run.scoring import top_k
    ap = argparse.ArgumentParser()
    ap.add_argument("project")
    ap.add_argument("--run", default="diffin")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default=None)
    ap.add_argument("--out", default=str(RESULTS / "explore_agreement.csv"))
    a = ap.parse_args()
    project = Project(a.project)
    store = FeatureStore.open(project, a.run)
    if store is None:
        raise SystemExit(f"run {a.run!r} has no feature store")
    q = project.query
    rng = np.random.default_rng(a.seed)
    classes = np.unique(q.y)
    per = int(np.ceil(a.queries / len(classes)))
    picks = np.concatenate([rng.choice(np.flatnonzero(q.y == c), size=min(per, int((q.y == c).sum())), replace=False)
                            for c in classes])[: a.queries]
    ctx = _context(project, a.run)
    n = ctx.n
    keep = Path(a.keep) if a.keep else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    rows = []
    from diffin_core.run.features import certified_rows, merge_rescored, shortlists
    for i, qi in enumerate(picks.tolist()):
        t0 = time.time()
        saved = keep / f"q{qi}_exact.npy" if keep else None
        if saved is not None and saved.is_file() and (keep / f"q{qi}_plan.pt").is_file():
            exact = np.load(saved)
            plan_w = torch.load(keep / f"q{qi}_plan.pt", weights_only=True)
            t_plan = t_exact = float("nan")
        else:
            plan = exact_plan(ctx, q.x[[qi]], q.y[[qi]])
            t_plan = time.time() - t0
            exact = rescore_rows(ctx, plan, np.arange(n))
            t_exact = time.time() - t0
            plan_w = {it.k: it.w.clone() for it in plan}
            if keep:
                np.save(saved, exact)
                torch.save(plan_w, keep / f"q{qi}_plan.pt")
        diff = np.nan
        if i == 0:
            helpful, harmful = top_k(project, a.run, [qi], k=K, exact=True)
            ids = dict(zip(project.train.ids.tolist(), range(n)))
            cli = np.concatenate([helpful["influence"].to_numpy(), harmful["influence"].to_numpy()])
            mine = exact[[ids[int(s)] for s in np.concatenate([helpful["sample_id"], harmful["sample_id"]])]]
            diff = float(np.abs(cli - mine).max())
        st = store.query_influence([qi])
        helpful_r, harmful_r = shortlists(st, store.shortlist())
        cand = np.union1d(helpful_r, harmful_r)
        short = merge_rescored(st, helpful_r, harmful_r, cand, exact[cand])
        rec = {"query": qi, "query_label": int(q.y[qi]),
               "overlap_store_helpful": overlap(st, exact, True),
               "overlap_store_harmful": overlap(st, exact, False),
               "overlap_shortlisted_helpful": overlap(short, exact, True),
               "overlap_shortlisted_harmful": overlap(short, exact, False),
               "shortlist": store.shortlist()}
        if store.per_checkpoint is not None:
            from diffin_core.engine.propagate import PlanItem
            items = [PlanItem(k, 1.0 / n, w, None) for k, w in plan_w.items()]
            est, sigma = store.plan_bounds(items)
            cert, ex_mask = certified_rows(est, sigma, lambda rows: exact[rows], K)
            rec.update({"overlap_certified_helpful": overlap(cert, exact, True),
                        "overlap_certified_harmful": overlap(cert, exact, False),
                        "certified_rows": int(ex_mask.sum())})
        rec.update({"plan_s": round(t_plan, 2), "exact_s": round(t_exact, 2), "max_abs_diff_vs_cli": diff})
        rows.append(rec)
        r = rows[-1]
        print(f"[agreement] {i + 1}/{len(picks)} q{qi}: store {r['overlap_store_helpful']:.1f}/"
              f"{r['overlap_store_harmful']:.1f} shortlisted {r['overlap_shortlisted_helpful']:.1f}/"
              f"{r['overlap_shortlisted_harmful']:.1f} certified {r.get('overlap_certified_helpful', np.nan):.1f}/"
              f"{r.get('overlap_certified_harmful', np.nan):.1f} ({time.time() - t0:.1f} s)", flush=True)
        pd.DataFrame(rows).to_csv(a.out, index=False)
    df = pd.DataFrame(rows)
    print(df[[c for c in df if c.startswith("overlap")]].describe().round(3).to_string())


if __name__ == "__main__":
    main()
