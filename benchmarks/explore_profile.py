"""Where a new query's time goes, step by step, in one process (issue 23: each step's gain).

    nice -n 10 python benchmarks/explore_profile.py PROJECT --run diffin [--queries 3]
                  [--compare-store OLD_RUN_DIR/features]

PROJECT: scored with diffin by this version (its meta.json records the HVP decisions per
checkpoint, its feature store is version 3). Per query (seeded), process CPU time
(time.process_time: what the work costs on the cores it used; wall time on this shared machine
is several times that) of:
  plan_probe_s       the exact path's plan probing every Lanczos view's first product both ways
                     (hvp auto without the run's decisions: what every query paid before)
  plan_s             the same plan adopting the run's measured decisions (hvp.adopt: no probe), each
                     checkpoint's Hessian batch gradient computed afresh (what a query paid before the
                     run kept them)
  plan_kept_s        the same plan with the run's kept Hessian batch gradients (features.BaseGrads:
                     one batch gradient fewer per checkpoint); plan_kept_ratio = plan_s / plan_kept_s
  plan_wall_1t_s     wall seconds of that plan on 1 torch thread, plan_wall_2t_s on 2 (the batch
  plan_wall_2t_s     gradients' slices on two threads, FunctionalModel._sliced_grad with SLICE_WORKERS 2;
                     off by default); wall_2t_ratio: their ratio
  plan_same_bits     1 when the fresh, kept and 2-thread plans are the same bits (each w_k)
  vmap4_ratio        4 batch gradients at 4 thetas one after the other, CPU time over the same 4 under
                     torch.func.vmap (one batched call, as vmapping checkpoints or queries would make
                     them): below 1 means vmap is slower
  plan_rel_diff      max |w_k(adopted) - w_k(probed)| / max |w_k| over the checkpoints
  bounds_s           every row's estimate and sigma through the store (basis + sketches)
  rows               rows certified_rows rescored (both sides, top 10), certified_s their cost
  rows_compare       with --compare-store (a version-2 store of the same run: one sketch shared by
                     the checkpoints): the rows its old rule (sqrt of summed variances, which is no
                     bound there) and its sound rule (sum of deviations) would rescore
  z_max              max |estimate - exact| / sigma over all rows (a bound keeps it below 4)
  all_rows_s         every row rescored (what `diffin top --exact` adds to the plan)
  topk_overlap       the certified top 10 against all rows rescored (helpful and harmful)
Appends its rows to benchmarks/results/explore_profile.csv (``measured``: the date; earlier rows kept).
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


def wall(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def threads(n: int):
    import contextlib

    @contextlib.contextmanager
    def at():
        saved = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(saved)
    return at()


def vmap_ratio(ctx) -> float:
    """CPU of 4 batch gradients (the last checkpoint's Hessian batch, 4 nearby thetas) one after the
    other over the same 4 under torch.func.vmap."""
    k = ctx.m - 1
    x, y = ctx.sample_batch(ctx.hessian_rows, k)
    fm = ctx.fm_at(k)
    thetas = ctx.thetas[k] + 1e-3 * torch.randn(4, ctx.fm.num_params, generator=torch.Generator().manual_seed(0))
    seq = lambda: [fm.batch_grad(t, x, y) for t in thetas]                              # noqa: E731
    vm = lambda: torch.func.vmap(lambda t: fm.batch_grad(t, x, y))(thetas)              # noqa: E731
    seq(), vm()
    return min(cpu(seq)[1] for _ in range(2)) / min(cpu(vm)[1] for _ in range(2))


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
    torch.set_num_threads(1)
    kept = ctx.base_grads
    DiffIn().prepare(ctx, q.x[[0]], q.y[[0]])                       # warm: checkpoints, allocator, kept base
    for qi in picks.tolist():
        probed, t_probe = cpu(lambda: DiffIn().prepare(probing, q.x[[qi]], q.y[[qi]]))
        ctx.base_grads = None
        plan, t_plan = cpu(lambda: DiffIn().prepare(ctx, q.x[[qi]], q.y[[qi]]))
        ctx.base_grads = kept
        with threads(1):
            plan_k, t_kept = cpu(lambda: DiffIn().prepare(ctx, q.x[[qi]], q.y[[qi]]))
            _, w1 = wall(lambda: DiffIn().prepare(ctx, q.x[[qi]], q.y[[qi]]))
        from diffin_core.engine import functional
        saved, functional.SLICE_WORKERS = functional.SLICE_WORKERS, 2
        with threads(2):
            plan_2, w2 = wall(lambda: DiffIn().prepare(ctx, q.x[[qi]], q.y[[qi]]))
        functional.SLICE_WORKERS = saved
        same = all(torch.equal(a_.w, b_.w) and torch.equal(a_.w, c_.w) for a_, b_, c_ in zip(plan, plan_k, plan_2))
        scale = max(float(it.w.abs().max()) for it in plan)
        diff = max(float((a_.w - b_.w).abs().max()) for a_, b_ in zip(plan, probed)) / scale
        (est, sigma), t_b = cpu(lambda: store.plan_bounds(plan))
        (infl, exact), t_c = cpu(lambda: F.certified_rows(est, sigma, lambda r: F.rescore_rows(ctx, plan, r), 10))
        full, t_all = cpu(lambda: F.rescore_rows(ctx, plan, np.arange(ctx.n)))
        top = lambda v, s: set(np.argsort(-s * v, kind="stable")[:10].tolist())   # noqa: E731
        rec = {"query": qi, "plan_probe_s": t_probe, "plan_s": t_plan, "plan_kept_s": t_kept,
               "plan_kept_ratio": t_plan / t_kept, "plan_wall_1t_s": w1, "plan_wall_2t_s": w2,
               "wall_2t_ratio": w1 / w2, "plan_same_bits": int(same), "vmap4_ratio": vmap_ratio(ctx),
               "plan_rel_diff": diff,
               "bounds_s": t_b, "certified_s": t_c, "rows": int(exact.sum()),
               "rows_needed": needed(est, sigma, full), "z_max": float(np.max(np.abs(est - full) / sigma)),
               "all_rows_s": t_all,
               "topk_overlap": np.mean([len(top(infl, s) & top(full, s)) / 10 for s in (1, -1)]),
               "store_version": store.meta["version"], "basis": store.basis_rank,
               "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0],
               "measured": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
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
    out = RESULTS / "explore_profile.csv"
    old = pd.read_csv(out) if out.is_file() else pd.DataFrame()
    pd.concat([old, df.round(4)], ignore_index=True).to_csv(out, index=False)
    print(df.median(numeric_only=True).round(3).to_string())


if __name__ == "__main__":
    main()
