"""Where the feature store's top-k loses the exact path (issue 8's diagnosis), in two parts.

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/explore_diagnose.py truth   # ~3 min
    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/explore_diagnose.py split 4000 8 32

truth: on tests/test_ground_truth.py's case (digits, tanh MLP 64-32-10, 800 rows, 40 sampled
rows, float64 trajectory leave-one-out), Spearman vs the truth of the exact path (Lanczos started
at each query's gradient) and of the stored query-independent views of rank r (features.
hessian_views + features.propagate), for the mean query set and 5 single-sample queries.
split: on benchmarks/explore.py's MNIST MLP project at N rows and nq single-sample queries, every
row scored (a) by the exact path, (b) through the stored rank-r views in full parameter space
(the fold, unprojected: e_z . g_Q), (c) by the sketched store; prints top-10 overlap, Spearman
and the shortlist recall of (b) vs (a), (c) vs (b) and (c) vs (a), and the last layer's share.
Results as measured: benchmarks/results/explore_diagnosis.md.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def overlap(a, b, k=10):
    top = lambda v: set(np.argsort(-v)[:k])                   # noqa: E731
    return (len(top(a) & top(b)) + len(top(-a) & top(-b))) / (2 * k)


def recall(store, ex, c, k=10):
    return np.mean([len(set(np.argsort(-s * store)[:c]) & set(np.argsort(-s * ex)[:k])) / k for s in (1, -1)])


def report(name, a, b):
    nq = a.shape[1]
    o = np.mean([overlap(a[:, j], b[:, j]) for j in range(nq)])
    s = np.mean([spearmanr(a[:, j], b[:, j])[0] for j in range(nq)])
    rc = {c: round(float(np.mean([recall(a[:, j], b[:, j], c) for j in range(nq)])), 3)
          for c in (50, 200, 1000) if c < len(a)}
    print(f"{name:40s} top-10 overlap {o:.3f}  Spearman {s:.3f}  recall of the top 10 in the top c {rc}", flush=True)


def truth():
    from diffin_core.run import features as F
    from diffin_core.methods import ScoreSettings
    from diffin_core.engine.models import MLP
    from diffin_core.run.scoring import run_method
    from diffin_core.run.context import make_context
    from diffin_core.tasks.truth import digits_sgd_run, leave_one_out
    r = digits_sgd_run()
    train, query, fm, x, y, qx, qy, traj = r.train, r.query, r.fm, r.x, r.y, r.qx, r.qy, r.traj
    samples = np.random.default_rng(1).choice(800, 40, replace=False)
    qsets = [np.arange(len(query))] + [np.array([i]) for i in np.random.default_rng(2).choice(len(query), 5, replace=False)]
    truths = [leave_one_out(fm, traj, x, y, qx[q], qy[q], samples) for q in qsets]
    for ck in (10, 20):
        steps, thetas, lrs = traj.checkpoints(ck)
        states = [{k: v.float() for k, v in fm.unflatten(t).items()} for t in thetas]
        ctx = make_context(MLP(64, (32,), 10), states, steps, lrs, train, ScoreSettings())
        xs, ys = ctx.tensors(train.x[samples], train.y[samples])
        views = {r: F.hessian_views(ctx, r) for r in (10, 32, 64, 128)}
        for qi, q in enumerate(qsets):
            ex = run_method(ctx, "diffin", query.x[q], query.y[q], need_self=False)["influence"][samples]
            line = [f"{ck} ckpts, {'all queries' if qi == 0 else f'query {q[0]}'}: exact {spearmanr(ex, truths[qi])[0]:.3f}"]
            u = ctx.mean_grad(ctx.m - 1, query.x[q], query.y[q])
            for r, v in views.items():
                tot = torch.zeros(len(samples), dtype=torch.float64)
                for it in F.propagate(ctx, v, u):
                    tot += it.coef * ctx.fm_at(it.k).directional(ctx.thetas[it.k], xs, ys, it.w).double()
                line.append(f"r={r} {spearmanr(tot.numpy(), truths[qi])[0]:.3f}")
            print(" | ".join(line), flush=True)


def split(n: int, nq: int, rank: int):
    import explore as B
    from diffin_core.run import features as F
    from diffin_core.methods.diffin import DiffIn
    from diffin_core.project.folder import Project
    from diffin_core.engine.projector import Projector
    from diffin_core.run.context import project_context
    ws = Path("/tmp/explore-diagnose")
    ws.mkdir(exist_ok=True)
    project = Project(B.build_project(ws, n, "mlp"))
    ctx = project_context(project)
    q = project.query
    queries = np.random.default_rng(1).choice(len(q), nq, replace=False)
    t = time.time()
    plans = [DiffIn().prepare(ctx, q.x[[i]], q.y[[i]]) for i in queries]
    print(f"exact plan {(time.time() - t) / nq:.2f} s per query", flush=True)
    items = F.segment_ops(ctx, F.hessian_views(ctx, rank))
    U = torch.stack([ctx.mean_grad(ctx.m - 1, q.x[[i]], q.y[[i]]) for i in queries], 1)
    W = {k: torch.stack([{it.k: it.w for it in p}[k] for p in plans], 1) for k in [it.k for it in plans[0]]}
    C = {it.k: it.coef for it in plans[0]}
    P = ctx.fm.num_params
    last = sum(ctx.fm.sizes[-2:])
    dims = (256, 1024, 4096)
    projs = {d: Projector(P, d, 0) for d in dims}
    PU = {d: projs[d](U.T) for d in dims}
    exact, exact_last, views = np.zeros((n, nq)), np.zeros((n, nq)), np.zeros((n, nq))
    sk = {d: np.zeros((n, nq)) for d in dims}
    for sl, x, y in ctx.chunks(size=256):
        def hook(k, g, sl=sl):
            if k in C:
                exact[sl] += C[k] * (g @ W[k]).double().numpy()
                exact_last[sl] += C[k] * (g[:, P - last:] @ W[k][P - last:]).double().numpy()
        e = F.effective_grads(ctx, items, x, y, hook)
        views[sl] = (e @ U).double().numpy()
        for d in dims:
            sk[d][sl] = (projs[d](e) @ PU[d].T).double().numpy()
    report(f"stored views r={rank} (unprojected) vs exact", views, exact)
    for d in dims:
        report(f"sketch d={d} vs stored views", sk[d], views)
        report(f"sketch d={d} vs exact", sk[d], exact)
    report("last layer alone vs exact", exact_last, exact)
    print("last layer's share of the exact influence's variance",
          round(float(np.mean([np.var(exact_last[:, j]) / np.var(exact[:, j]) for j in range(nq)])), 3))


if __name__ == "__main__":
    if sys.argv[1] == "truth":
        truth()
    else:
        split(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
