"""The feature store's per-checkpoint gradient basis: the float64 SVD against the Gram matrix's
eigendecomposition (features.basis_of), on the sample project's real per-sample gradients.

Per checkpoint (the rows build() fits on): CPU seconds of each route, the route the rule takes,
its error bound, and how far apart the two bases are, in float64 and as stored (float32): the sine of the largest principal angle
between the spanned subspaces = the spectral norm of the difference of their projectors.
Then, unless --no-stores, two stores of the sample's shipped diffin run built with each route
forced, and the same queries answered by both (`fast_answer`, the certified top-k): top-10
overlap, the largest difference of the answers' values, and of the store's estimates and sigmas
(`plan_bounds`) before any row is rescored.

    python benchmarks/fit_basis.py [--queries 0 1 2 3,4] [--no-stores]
"""
from __future__ import annotations

import diffin_core  # noqa: F401  first: OpenMP's passive wait and the thread count before torch loads
import argparse
import csv
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffin_core.run import features as F

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "mnist"


def cpu() -> float:
    return time.process_time()


def subspace_sin(q1: torch.Tensor, q2: torch.Tensor) -> float:
    """sin of the largest principal angle between span(q1) and span(q2) (both orthonormal)."""
    q1, q2 = q1.double(), q2.double()
    return float(torch.linalg.matrix_norm(q2 - q1 @ (q1.T @ q2), ord=2))


def copy_sample(dest: Path) -> Path:
    shutil.copytree(SAMPLE, dest, ignore=shutil.ignore_patterns("prebuilt"))
    run = dest / "runs" / "diffin-1"
    shutil.copytree(SAMPLE / "prebuilt" / "diffin-1", run)
    return dest


def bases_table(project, settings: F.FeatureSettings) -> list[dict]:
    from diffin_core.methods import runner
    from diffin_core.methods.diffin import DiffIn
    from diffin_core.methods import ScoreSettings
    from dataclasses import replace
    from diffin_core.run.context import project_context
    info = project.run("diffin-1")
    ctx = project_context(project, replace(ScoreSettings(), **info.meta.get("settings", {})))
    runner.configure(ctx, runner.memory_plan(DiffIn(), ctx, True))
    n = ctx.n
    r = F.checkpoint_basis_rank(settings, ctx.m, n, ctx.fm.num_params)
    fit = np.sort(np.random.default_rng([settings.seed, 4409]).choice(n, min(n, settings.basis_rows), replace=False))
    out = []
    for k in range(ctx.m):
        fm, theta = ctx.fm_at(k), ctx.thetas[k]
        parts = []
        for a in range(0, len(fit), 256):
            x, y = ctx.tensors(ctx.train.x[fit[a:a + 256]], ctx.train.y[fit[a:a + 256]])
            parts.append(fm.per_sample_grads(theta, x, y).double())
        a = torch.cat(parts)
        t0 = cpu(); q_svd, _ = F.basis_of(a, r, "svd"); t1 = cpu()
        q_gram, _ = F.basis_of(a, r, "gram"); t2 = cpu()
        _, route = F.basis_of(a, r, "auto")
        sin64 = subspace_sin(F.basis64(a, r, "svd")[0], F.basis64(a, r, "gram")[0])
        lam = torch.linalg.eigvalsh(a @ a.T).flip(0)
        eps = torch.finfo(torch.float64).eps
        bound = len(a) * eps * float(lam[0]) / float(lam[r - 1] - lam[r])
        out.append({"checkpoint": k, "rows": len(a), "params": a.shape[1], "r": r,
                    "svd_cpu_s": round(t1 - t0, 4), "gram_cpu_s": round(t2 - t1, 4), "route_auto": route,
                    "gram_error_bound": f"{bound:.3g}", "s1_over_sr": f"{float((lam[0] / lam[r - 1]).sqrt()):.4g}",
                    "gap_r_rel": f"{float((lam[r - 1] - lam[r]) / lam[r - 1]):.4g}",
                    "sin_max_angle_float64": f"{sin64:.3g}",
                    "sin_max_angle": f"{subspace_sin(q_svd, q_gram):.3g}",
                    "orth_err_gram": f"{float((q_gram.double().T @ q_gram.double() - torch.eye(r, dtype=torch.float64)).abs().max()):.3g}"})
        print(out[-1], flush=True)
    return out


def answers_table(root: Path, queries: list[list[int]], settings: F.FeatureSettings) -> list[dict]:
    from diffin_core.project.folder import Project
    real = F.basis_of
    stores, times = {}, {}
    for route in ("svd", "gram"):
        d = root / route
        copy_sample(d)
        project = Project(d)
        F.basis_of = lambda a, r, _route="auto", route=route: real(a, r, route)
        t0 = cpu()
        F.build_for_run(project, "diffin-1", settings)
        times[route] = cpu() - t0
        F.basis_of = real
        stores[route] = project
        print(route, "store built", round(times[route], 1), "s CPU", flush=True)
    rows = []
    for q in queries:
        res = {}
        for route, project in stores.items():
            store = F.FeatureStore.open(project, "diffin-1")
            ctx = F._context(project, "diffin-1")
            plan = F.exact_plan(ctx, project.query.x[q], project.query.y[q])
            est, sigma = store.plan_bounds(plan)
            ans = F.fast_answer(project, "diffin-1", q, store=store)
            res[route] = (est, sigma, np.asarray(ans.influence, dtype=np.float64), np.asarray(ans.exact))
        (e0, s0, a0, x0), (e1, s1, a1, x1) = res["svd"], res["gram"]
        top = lambda v, side: set(np.argsort(-side * v, kind="stable")[:10].tolist())
        scale = float(np.abs(a0).max())
        rows.append({"query": " ".join(map(str, q)),
                     "top10_helpful_overlap": len(top(a0, 1) & top(a1, 1)) / 10,
                     "top10_harmful_overlap": len(top(a0, -1) & top(a1, -1)) / 10,
                     "top10_values_max_diff_rel": f"{max(np.abs(a0[list(top(a0, s))] - a1[list(top(a0, s))]).max() for s in (1, -1)) / scale:.3g}",
                     "answer_max_diff_rel": f"{float(np.abs(a0 - a1).max()) / scale:.3g}",
                     "rescored_rows_svd": int(x0.sum()), "rescored_rows_gram": int(x1.sum()),
                     "estimate_max_diff_rel": f"{float(np.abs(e0 - e1).max()) / scale:.3g}",
                     "sigma_median_ratio": f"{float(np.median(s1 / np.maximum(s0, 1e-300))):.6g}",
                     "store_cpu_s_svd": round(times["svd"], 2), "store_cpu_s_gram": round(times["gram"], 2)})
        print(rows[-1], flush=True)
    return rows


def write(path: Path, rows: list[dict], extra: dict) -> None:
    rows = [{**r, **extra} for r in rows]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("wrote", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", nargs="*", default=["0", "1", "2", "3,4"])
    ap.add_argument("--no-stores", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="fit_basis")
    args = ap.parse_args()
    from diffin_core.project.folder import Project
    settings = F.FeatureSettings()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        load0 = os.getloadavg()[0]
        rows = bases_table(Project(copy_sample(tmp / "bases")), settings)
        write(args.out / f"{args.name}.csv", rows, {"load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2),
                                                    "threads": torch.get_num_threads()})
        if not args.no_stores:
            load0 = os.getloadavg()[0]
            rows = answers_table(tmp, [[int(i) for i in q.split(",")] for q in args.queries], settings)
            write(args.out / f"{args.name}_answers.csv", rows,
                  {"load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2), "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
