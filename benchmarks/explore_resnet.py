"""Explore on a ResNet-18 whose Hessian views exceed the memory budget (issue 23's ResNet row): a new
query's exact top-10 through the view-less feature store (features.SketchSink), in two phases that
can run at the same time on a busy machine (each in its own process; CPU seconds are the measure):

    python benchmarks/explore_resnet.py plan  PROJECT --query 3 --budget 3500MB --work DIR
    python benchmarks/explore_resnet.py query PROJECT --run diffin-0 --query 3 --work DIR

plan   the query's own exact plan, exactly as `diffin top` makes it (features.exact_plan: the run's
       settings and memory plan, Lanczos from the query at every checkpoint, the engine's HVPs), its
       CPU seconds, then the exact path's value of every training row under that plan (one jvp per
       checkpoint and row: `diffin top --exact`'s numbers); writes DIR/plan-q<Q>.npz (w_k),
       DIR/exact-q<Q>.npy and DIR/plan-q<Q>.json. Needs no run: the plan does not depend on it.
query  on a diffin run of the same project with its store: puts the plan where the run keeps plans
       (answers.plan_path; a ResNet's plan, m x P floats, is above answers.PLAN_MAX_BYTES, so the
       product does not keep it itself) and times the real CLI, `diffin top PROJECT --run RUN -q Q
       --k 10`: the store's bounds and the exact rescoring of the rows they cannot rule out (its CPU
       seconds and peak RSS), then the same command again (the answer kept with the run). The new
       query's CPU = the plan's + this. Top-10 overlap against the exact values of phase 1.
       Appends the row (model resnet18) to benchmarks/results/explore.csv (bench explore_resnet.py).
sketch after plan: how large a per-checkpoint CountSketch would have to be for the store to rule rows
       out of the top 10 (features.certified_rows: estimate + 4 sigma against the k-th exact value;
       a view-less store has no basis (the ResNet's basis budget, basis_mb, holds none), so with
       independent per-checkpoint sketches sigma^2 = sum_k c_k^2 2 |w_k|^2 |g_z(theta_k)|^2 / d; a
       store whose meta.json lacks "independent_sketches" sums the deviations instead, a larger
       sigma, so these shares are the best case).
       On --rows training rows drawn at random it computes |g_z(theta_k)| at every checkpoint
       (per-sample gradients), checks sum_k c_k <w_k, g_z(theta_k)> against phase 1's exact values
       (c_k = 1/N), and for each d the share of rows the certification would still rescore, taking
       each row's estimate as its exact value (the best case for the sketch) and the store's size
       N x checkpoints x d x 4 bytes. Writes benchmarks/results/explore_resnet_sketch.csv.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
K = 10


def plan_phase(a) -> None:
    from diffin_core.engine.threads import configure
    configure(1)
    from diffin_core.engine.budget import parse_bytes
    from diffin_core.methods import ScoreSettings
    from diffin_core.methods.diffin import DiffIn
    from diffin_core.project.folder import Project
    from diffin_core.run.context import project_context
    from diffin_core.run.features import configured, rescore_rows
    from scale import peak_rss_mb
    project = Project(a.project)
    ctx = configured(project_context(project, ScoreSettings(memory_budget=parse_bytes(a.budget))))
    q, idx = project.query, [int(a.query)]
    c0, w0 = time.process_time(), time.perf_counter()
    plan = DiffIn().prepare(ctx, q.x[idx], q.y[idx])
    plan_cpu, plan_wall = time.process_time() - c0, time.perf_counter() - w0
    c1 = time.process_time()
    exact = rescore_rows(ctx, plan, np.arange(ctx.n))
    exact_cpu = time.process_time() - c1
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / f"plan-q{a.query}.npz", **{f"w{it.k}": it.w.detach().cpu().numpy() for it in plan})
    np.save(work / f"exact-q{a.query}.npy", exact)
    rec = {"query": int(a.query), "plan_cpu_s": round(plan_cpu, 2), "plan_wall_s": round(plan_wall, 2),
           "exact_all_rows_cpu_s": round(exact_cpu, 2), "hessian_rows": int(ctx.hessian_rows),
           "hvp": getattr(ctx, "hvp_log", None), "peak_rss_mb": round(peak_rss_mb(), 1),
           "load_end": round(os.getloadavg()[0], 2)}
    (work / f"plan-q{a.query}.json").write_text(json.dumps(rec, indent=1, default=str))
    print(json.dumps(rec, default=str), flush=True)


def query_phase(a) -> None:
    import pandas as pd
    from diffin_core.project.folder import Project
    from diffin_core.run import answers
    from diffin_core.run.features import FeatureStore
    from explore_query import cli, parse
    project = Project(a.project)
    run_dir = project.run(a.run).path
    for sub in ("answers", "topk"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)
    work = Path(a.work)
    dest = answers.plan_path(run_dir, [int(a.query)])
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / f"plan-q{a.query}.npz", dest)
    planned = json.loads((work / f"plan-q{a.query}.json").read_text())
    exact = np.load(work / f"exact-q{a.query}.npy")
    startup = statistics.median(cli("--help")[0] for _ in range(3))
    load0 = os.getloadavg()[0]
    wall, cpu, rss, out = cli("top", a.project, "--run", a.run, "-q", str(a.query), "--k", str(K))
    wall2, cpu2, _, out2 = cli("top", a.project, "--run", a.run, "-q", str(a.query), "--k", str(K))
    assert "answered before" in out2, out2[:300]
    label = out.splitlines()[0]
    m = re.search(r"the (\d+) rows", label)
    h, hv, mm, mv = parse(out)
    ids = np.asarray(project.train.ids)
    top_h = set(ids[np.argsort(-exact, kind="stable")[:K]].tolist())
    top_m = set(ids[np.argsort(exact, kind="stable")[:K]].tolist())
    overlap = (len(set(h) & top_h) + len(set(mm) & top_m)) / (2 * K)
    pos = {int(s): i for i, s in enumerate(ids)}
    diff = max(abs(v - exact[pos[i]]) for i, v in zip(h + mm, hv + mv))
    store = FeatureStore.open(project, a.run)
    size = sum(p.stat().st_size for p in (run_dir / "features").rglob("*") if p.is_file()) / 2 ** 20
    row = {"model": "resnet18", "N": len(project.train), "d": store.dim, "checkpoint_dim": store.checkpoint_dim,
           "queries": 1, "new_query_s": round(planned["plan_wall_s"] + wall - startup, 2),
           "new_query_cpu_s": round(planned["plan_cpu_s"] + cpu, 2),
           "plan_ms": round(planned["plan_cpu_s"] * 1000), "rescore_ms": round(cpu * 1000),
           "asked_before_s": round(wall2 - startup, 3), "asked_before_cpu_s": round(cpu2, 3),
           "topk_overlap": overlap, "topk_overlap_min": overlap, "max_abs_diff": diff,
           "max_abs_value": float(np.abs(exact).max()),
           "rescored_rows": int(m.group(1)) if m else np.nan, "store_mb": round(size, 1),
           "peak_rss_mb": round(max(rss, planned["peak_rss_mb"]), 1), "cli_startup_s": round(startup, 2),
           "load_avg": round(load0, 2), "bench": "explore_resnet.py"}
    print(label, flush=True)
    csv = RESULTS / "explore.csv"        # its row appended (replacing an older one) in the file's own columns:
    lines = csv.read_text().splitlines() if csv.is_file() else []     # the other rows are left as written
    header = lines[0].split(",") if lines else list(row)
    keep = [ln for ln in lines[1:] if not (ln.split(",")[0] == "resnet18" and "explore_resnet.py" in ln.split(","))]
    cell = ["" if row.get(k) is None or (isinstance(row.get(k), float) and np.isnan(row[k])) else str(row[k])
            for k in header]
    csv.write_text("\n".join([",".join(header)] + keep + [",".join(cell)]) + "\n")
    print(pd.DataFrame([row]).T.to_string())


def sketch_phase(a) -> None:
    import pandas as pd
    import torch
    from diffin_core.engine.threads import configure
    configure(1)
    from diffin_core.engine.budget import parse_bytes
    from diffin_core.methods import ScoreSettings
    from diffin_core.project.folder import Project
    from diffin_core.run.context import project_context
    from diffin_core.run.features import CERTIFIED_Z, configured
    project = Project(a.project)
    ctx = configured(project_context(project, ScoreSettings(memory_budget=parse_bytes(a.budget))))
    work = Path(a.work)
    exact = np.load(work / f"exact-q{a.query}.npy")
    with np.load(work / f"plan-q{a.query}.npz") as z:
        w = {int(name[1:]): torch.as_tensor(z[name]) for name in z.files}
    n, c = ctx.n, 1.0 / ctx.n
    rows = np.sort(np.random.default_rng(a.seed).choice(n, min(a.rows, n), replace=False))
    g2 = np.zeros((len(rows), len(w)))
    value = np.zeros(len(rows))
    c0 = time.process_time()
    for j, k in enumerate(sorted(w)):
        for s in range(0, len(rows), 5):
            r = rows[s:s + 5]
            x, y = ctx.tensors(ctx.train.x[r], ctx.train.y[r])
            g = ctx.fm_at(k).per_sample_grads(ctx.thetas[k], x, y)
            g2[s:s + 5, j] = g.double().square().sum(1).numpy()
            value[s:s + 5] += c * (g.double() @ w[k].double()).numpy()
    grads_cpu = time.process_time() - c0
    check = float(np.abs(value - exact[rows]).max() / np.abs(exact).max())
    var_d = 2.0 * c ** 2 * (g2 * np.array([float(w[k].double().square().sum()) for k in sorted(w)])).sum(1)
    top = np.sort(exact)
    hi, lo = top[-K], top[K - 1]
    out = []
    for d in (4096, 16384, 65536, 262144, 1 << 20, 1 << 22):
        s4 = CERTIFIED_Z * np.sqrt(var_d / d)
        left = (exact[rows] + s4 >= hi) | (exact[rows] - s4 <= lo)
        out.append({"model": "resnet18", "N": n, "checkpoints": len(w), "query": a.query, "rows_sampled": len(rows),
                    "d": d, "rows_left_share": round(float(left.mean()), 3),
                    "rows_left_est": int(round(float(left.mean()) * n)),
                    "sigma4_median_over_gap": round(float(np.median(s4 / np.minimum(np.abs(hi - exact[rows]),
                                                                                    np.abs(exact[rows] - lo)))), 3),
                    "store_mb": round(n * len(w) * d * 4 / 2 ** 20, 1), "value_check_rel": check,
                    "grads_cpu_s": round(grads_cpu, 1), "load_end": round(os.getloadavg()[0], 2)})
    df = pd.DataFrame(out)
    df.to_csv(RESULTS / "explore_resnet_sketch.csv", index=False)
    print(df.to_string(index=False))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=("plan", "query", "sketch"))
    ap.add_argument("project")
    ap.add_argument("--query", type=int, default=3)
    ap.add_argument("--run", default="diffin-0")
    ap.add_argument("--budget", default="3500MB", help="the run's --memory-budget (plan phase)")
    ap.add_argument("--work", default="/tmp/diffin_explore_resnet")
    ap.add_argument("--rows", type=int, default=60, help="training rows sampled (sketch phase)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    {"plan": plan_phase, "query": query_phase, "sketch": sketch_phase}[a.phase](a)


if __name__ == "__main__":
    main()
