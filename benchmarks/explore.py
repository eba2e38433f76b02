"""Explore speed and exactness: the fast top-k for a new query vs the exact Diff-In path.

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/explore.py --workspace /tmp/explore-ws  # 10k, 100k

The project: an MLP 784-32-10 (25,450 parameters, 12 checkpoints, plain SGD) trained on the
sample project's 4,000 digits, whose train split is tiled to N rows, each copy beyond the first
shifted by up to 2 pixels and given +-12 grey levels of noise (no two rows equal). One feature
pass per N at the largest d (view rank 32); smaller d fold the same CountSketch
(projector.fold). In the same pass every training row is scored by the exact path's own plan
(methods/diffin.DiffIn.prepare: Lanczos started at each query's gradient, its HVPs) for
``--queries`` random single-sample queries: `diffin top --exact` for those queries, all N rows.

Per (N, d, shortlist c): topk_overlap = |top-10 fast ∩ top-10 exact| / 10, averaged over helpful
and harmful and over the queries, where fast = the store's ranking with its top c per side
rescored by the exact path (features.fast_query_influence; the rescored values are the exact
ones, checked); topk_overlap_store_only and spearman_vs_exact (all N): the store alone.
query_ms: median wall time of fast_query_influence for a new query at the timed shortlist
(plan_ms, store_ms, rescore_ms: its parts, wall); query_cpu_ms: the same call's process CPU time
(one thread: what it takes on an idle core; on this shared machine wall time is 2-10x that); feature_pass_s: the pass at this N (views, per-sample
gradients, sketch, at the largest d); store_mb: the store with d columns (Hessian views included).
Writes benchmarks/results/explore.csv and explore.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
K = 10


def log(msg):
    print(f"[explore] {msg}", flush=True)


MLP_PY = """from diffin_core.engine.models import MLP


def build():
    return MLP(784, (32,), 10)
"""


def train_mlp(dest: Path, steps: int = 550, every: int = 50, seed: int = 0) -> None:
    """Replace the project's model by a tanh MLP 784-32-10 (25,450 parameters) trained by plain
    SGD (lr 0.3, batch 64) on the 4,000 sample digits, checkpoints every 50 steps (12 in all)."""
    import torch.nn.functional as Fn

    from diffin_core.project.checkpoints import Recorder
    from diffin_core.engine.models import MLP
    shutil.rmtree(dest / "checkpoints")
    (dest / "model.py").write_text(MLP_PY)
    with np.load(dest / "data" / "train.npz") as z:
        x = torch.as_tensor(z["x"].astype(np.float32) / 255.0)
        y = torch.as_tensor(z["y"].astype(np.int64))
    torch.manual_seed(seed)
    model = MLP(784, (32,), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    gen = torch.Generator().manual_seed(seed)
    with Recorder(dest, model, opt, train_size=len(y), every=every) as rec:
        for _ in range(steps):
            idx = torch.randint(0, len(y), (64,), generator=gen)
            opt.zero_grad()
            Fn.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            rec.step()


def build_project(ws: Path, n: int, model: str = "cnn", seed: int = 0) -> Path:
    from diffin_core.project.sample import SAMPLE_DIR
    dest = ws / f"mnist-{model}-{n}"
    if dest.exists():
        return dest
    shutil.copytree(SAMPLE_DIR / "mnist", dest, ignore=shutil.ignore_patterns("runs", "review.sqlite*", "exports"))
    if model == "mlp":
        train_mlp(dest)
    rng = np.random.default_rng(seed)
    with np.load(dest / "data" / "train.npz") as z:
        x, y = z["x"], z["y"].astype(np.int64)
        true_y = z["true_y"].astype(np.int64) if "true_y" in z else y
    pick = np.arange(n) % len(y)
    img = x[pick].reshape(n, 28, 28).astype(np.int16)
    if n > len(y):                                       # copies beyond the first: shifted + noisy
        for i in np.nonzero(np.arange(n) >= len(y))[0]:
            img[i] = np.roll(img[i], tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
        img[len(y):] += rng.integers(-12, 13, size=img[len(y):].shape, dtype=np.int16)
    xn = np.clip(img, 0, 255).astype(np.uint8).reshape(n, -1)
    np.savez(dest / "data" / "train.npz", x=xn, y=y[pick], true_y=true_y[pick], ids=np.arange(n, dtype=np.int64))
    man = dest / "checkpoints" / "manifest.json"
    m = json.loads(man.read_text())
    m["train_size"] = n
    man.write_text(json.dumps(m, indent=1))
    return dest


def fake_run(project, name="diffin-1"):
    """A run folder the store can hang off (scores are not needed by the fast path's maths)."""
    d = project.runs_dir / name
    d.mkdir(parents=True, exist_ok=True)
    n = len(project.train)
    pd.DataFrame({"sample_id": project.train.ids, "label": project.train.y, "influence": np.zeros(n),
                  "self_influence": np.zeros(n), "label_issue": np.zeros(n), "pred": project.train.y,
                  "confidence": np.ones(n), "loss": np.zeros(n)}).to_parquet(d / "scores.parquet")
    from diffin_core.methods import ScoreSettings
    (d / "meta.json").write_text(json.dumps({"run": name, "method": "diffin", "settings": ScoreSettings().to_dict(),
                                             "finished": time.time()}))
    return d


def store_with_dim(src: Path, dst: Path, dim: int, full: int) -> None:
    """A copy of the store at src whose features are the first ``dim`` projection columns."""
    from diffin_core.engine.projector import fold
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("train.npy", "query.npy", "class_sums.npy"))
    for name, norm in (("train", "train_norm"), ("query", "query_norm")):
        rows = np.load(src / f"{name}.npy", mmap_mode="r")
        lens = np.load(src / f"{norm}.npy")
        full = rows.shape[1]
        out = np.lib.format.open_memmap(dst / f"{name}.npy", mode="w+", dtype=np.float16, shape=(len(rows), dim))
        newlen = np.zeros(len(rows), np.float32)
        for s in range(0, len(rows), 16384):
            f = fold(torch.from_numpy(rows[s:s + 16384].astype(np.float32)) * torch.from_numpy(lens[s:s + 16384, None]), full, dim)
            ln = torch.linalg.vector_norm(f, dim=1)
            out[s:s + 16384] = (f / ln.clamp_min(1e-30)[:, None]).numpy().astype(np.float16)
            newlen[s:s + 16384] = ln.numpy()
        out.flush()
        del out
        np.save(dst / f"{norm}.npy", newlen)
    sums = fold(torch.from_numpy(np.load(src / "class_sums.npy")), full, dim).numpy()
    np.save(dst / "class_sums.npy", sums.astype(np.float32))
    meta = json.loads((src / "meta.json").read_text())
    meta["settings"]["dim"] = dim
    meta["store_mb"] = round(sum(p.stat().st_size for p in dst.iterdir()) / 2 ** 20, 3)
    (dst / "meta.json").write_text(json.dumps(meta, indent=1))


def overlap(a: np.ndarray, b: np.ndarray, k: int = K) -> float:
    top = lambda v: set(np.argsort(-v, kind="stable")[:k])     # noqa: E731
    return (len(top(a) & top(b)) + len(top(-a) & top(-b))) / (2 * k)


def build_case(n: int, nq: int, dim: int, rank: int, ws: Path, chunk: int, model: str) -> Path:
    """One feature pass at N = n (d = ``dim``, view rank ``rank``) that also scores every training
    row with the exact path's own plan for ``nq`` single-sample queries (DiffIn.prepare: Lanczos
    started at each query's vector, its HVPs). Writes the store to runs/diffin-1/features-full and
    the exact influences (n, nq) with the query indices, the pass time and the plan times to
    runs/diffin-1/exact.npz. Skipped when that file exists."""
    from diffin_core.run import features as F
    from diffin_core.methods.diffin import DiffIn
    from diffin_core.project.folder import Project
    from diffin_core.run.context import project_context
    project = Project(build_project(ws, n, model))
    run = fake_run(project)
    out = run / "exact.npz"
    if out.is_file():
        return out
    ctx = project_context(project)
    q = project.query
    queries = np.random.default_rng(1).choice(len(q), nq, replace=False)
    t = time.time()
    plans = [DiffIn().prepare(ctx, q.x[[i]], q.y[[i]]) for i in queries]
    plan_s = (time.time() - t) / nq
    log(f"N={n}: exact plans for {nq} queries, {plan_s:.2f} s each (HVPs)")
    exact = np.zeros((n, nq))
    W = {k: torch.stack([{it.k: it.w for it in plan}.get(k, torch.zeros_like(ctx.thetas[k]))
                         for plan in plans], 1) for k in range(ctx.m)}
    C = {it.k: it.coef for plan in plans for it in plan}

    def on_grads(k, sl, g):
        if k in C:
            exact[sl] += C[k] * (g @ W[k]).double().cpu().numpy()
    last = [0.0]

    def progress(d, tot, msg):
        if time.time() - last[0] > 60:
            last[0] = time.time()
            log(f"  N={n} {msg} {d}/{tot}")
    t = time.time()
    meta = F.build(ctx, q, run / "features-full", F.FeatureSettings(dim=dim, view_rank=rank, chunk_size=chunk),
                   progress, on_grads=on_grads, num_classes=10)
    pass_s = time.time() - t
    log(f"N={n}: feature pass {pass_s:.1f} s (views {meta['views_s']:.1f} s), store {meta['store_mb']:.1f} MB at d={dim}")
    np.savez(out, exact=exact, queries=queries, pass_s=pass_s, plan_s=plan_s)
    return out


def evaluate(n: int, dims: list[int], fractions: list[float], ws: Path, model: str, timed: float,
             timed_queries: int = 4) -> list[dict]:
    """Rows (N, d, shortlist) from a ``build_case`` workspace.

    Overlap and Spearman need no model run: rescoring gives the shortlisted rows the exact path's
    values, which exact.npz holds (checked on one query per d against features.rescore_rows).
    query_ms times the real call, features.fast_query_influence, for a NEW query (the plan cache
    emptied first) at the shortlist fraction ``timed`` only, with its parts: the store's (N, d)
    product (store_ms), the exact path's plan for the query (plan_ms, its HVPs: the same at any N)
    and the jvps of the shortlisted rows (rescore_ms); the first ``timed_queries`` queries."""
    from diffin_core.run import features as F
    from diffin_core.project.folder import Project
    project = Project(build_project(ws, n, model))
    run = project.runs_dir / "diffin-1"
    z = np.load(run / "exact.npz")
    exact, queries = z["exact"], z["queries"]
    pass_s = float(z["pass_s"])
    full = json.loads((run / "features-full" / "meta.json").read_text())
    rows = []
    for d in dims:
        store_with_dim(run / "features-full", run / "features", d, full["settings"]["dim"])
        store = F.FeatureStore(run / "features")
        F._CTX.clear()
        proj = np.stack([store.query_influence([qi]) for qi in queries], 1)        # (n, nq)
        rho = float(np.mean([spearmanr(proj[:, j], exact[:, j])[0] for j in range(len(queries))]))
        ov0 = float(np.mean([overlap(proj[:, j], exact[:, j]) for j in range(len(queries))]))
        seen = set()
        for frac in fractions:
            c = max(F.SHORTLIST_MIN, int(np.ceil(frac * n)))
            if c in seen and frac != timed:
                continue
            seen.add(c)
            ovs = []
            for j in range(len(queries)):
                helpful, harmful = F.shortlists(proj[:, j], c)
                cand = np.union1d(helpful, harmful)
                fast = F.merge_rescored(proj[:, j], helpful, harmful, cand, exact[cand, j])
                ovs.append(overlap(fast, exact[:, j]))
            row = {"model": model, "N": n, "d": d, "view_rank": full["settings"]["view_rank"], "shortlist": c,
                   "queries": len(queries), "timed_queries": np.nan, "query_ms": np.nan, "query_cpu_ms": np.nan, "topk_overlap": round(float(np.mean(ovs)), 3),
                   "topk_overlap_min": round(float(np.min(ovs)), 3), "topk_overlap_store_only": round(ov0, 3),
                   "spearman_vs_exact": round(rho, 3), "feature_pass_s": round(pass_s, 1),
                   "store_mb": store.meta["store_mb"], "plan_ms": np.nan, "store_ms": np.nan, "rescore_ms": np.nan}
            if frac == timed:
                F.fast_query_influence(project, run.name, [int(queries[0])], store=store, rerank=c)  # warm: context
                ctx = F._context(project, run.name)
                t, cpu, parts = [], [], []
                for j, qi in enumerate(queries[:timed_queries]):
                    F._PLANS.clear()
                    t0, c0 = time.perf_counter(), time.process_time()
                    got, _ = F.fast_query_influence(project, run.name, [int(qi)], store=store, rerank=c)
                    t.append((time.perf_counter() - t0) * 1000)
                    cpu.append((time.process_time() - c0) * 1000)
                    if j == 0:                        # the rescored rows are the exact path's values
                        cand = np.union1d(*F.shortlists(proj[:, 0], c))
                        err = np.abs(got[cand] - exact[cand, 0]).max() / np.abs(exact[:, 0]).max()
                        assert err < 1e-3, f"rescored rows differ from the exact path by {err:.2g}"
                    q = project.query
                    t0 = time.perf_counter()
                    store.query_influence([qi])
                    t1 = time.perf_counter()
                    F._PLANS.clear()
                    plan = F.exact_plan(ctx, q.x[[qi]], q.y[[qi]])
                    t2 = time.perf_counter()
                    F.rescore_rows(ctx, plan, np.arange(2 * c) % n)
                    t3 = time.perf_counter()
                    parts.append(((t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000))
                med = np.median(np.array(parts), 0)
                row.update(timed_queries=len(t), query_ms=round(statistics.median(t), 1),
                           query_cpu_ms=round(statistics.median(cpu), 1), store_ms=round(med[0], 1),
                           plan_ms=round(med[1], 1), rescore_ms=round(med[2], 1))
            log(f"  {row}")
            rows.append(row)
    return rows


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
    for (n, d), sub in df.groupby(["N", "d"]):
        sub = sub.sort_values("shortlist")
        axes[0].plot(sub["shortlist"] / n * 100, sub["topk_overlap"], "o-", label=f"N={n:,}, d={d}")
    axes[0].axhline(0.9, color="#c44e52", ls="--", lw=1)
    axes[0].set_xlabel("shortlist per side (% of N) rescored by the exact path")
    axes[0].set_title("top-10 overlap with the exact path", fontsize=9)
    axes[0].set_xscale("log")
    one = df.drop_duplicates(["N", "d"])
    for n, sub in one.groupby("N"):
        axes[1].plot(sub["d"], sub["spearman_vs_exact"], "o-", label=f"N={n:,} Spearman, store alone")
        axes[1].plot(sub["d"], sub["topk_overlap_store_only"], "x--", label=f"N={n:,} top-10 overlap, store alone")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("projection dimension d")
    axes[1].set_title("the store alone vs the exact path (all N)", fontsize=9)
    timed = df.dropna(subset=["query_ms"])
    for n, sub in timed.groupby("N"):
        axes[2].plot(sub["d"], sub["query_ms"], "o-", label=f"N={n:,} total, wall")
        axes[2].plot(sub["d"], sub["query_cpu_ms"], "^-", label=f"N={n:,} total, CPU time")
        axes[2].plot(sub["d"], sub["plan_ms"], "x--", label=f"N={n:,} exact plan (HVPs), wall")
        axes[2].plot(sub["d"], sub["store_ms"], "s:", label=f"N={n:,} store product, wall")
    axes[2].axhline(1000, color="#c44e52", ls="--", lw=1)
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("projection dimension d")
    axes[2].set_title("top-k for a new query at a 2% shortlist (ms, 1 thread,\nshared 2-core CPU at load 5-14)", fontsize=9)
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, nargs="+", default=[16, 8], help="queries per N (exact path for each)")
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.001, 0.0025, 0.005, 0.01, 0.02, 0.05])
    ap.add_argument("--timed", type=float, default=0.02, help="the shortlist fraction whose query is timed")
    ap.add_argument("--timed-queries", type=int, default=4)
    ap.add_argument("--rank", type=int, default=32, help="Lanczos steps of each stored Hessian view")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--workspace", type=Path, help="keep the projects, stores and exact scores here")
    ap.add_argument("--model", choices=["mlp", "cnn"], default="mlp",
                    help="mlp: MLP 784-32-10 retrained on the sample digits (default; CPU-sized); "
                         "cnn: the sample project's own SmallCNN")
    ap.add_argument("--out", type=Path, default=RESULTS / "explore.csv")
    ap.add_argument("--append", action="store_true", help="keep the CSV's rows of other N")
    args = ap.parse_args()
    torch.manual_seed(0)
    log(f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="diffin-explore-") as tmp:
        ws = (args.workspace or Path(tmp)).resolve()
        ws.mkdir(parents=True, exist_ok=True)
        rows = []
        if args.append and args.out.is_file():
            old = pd.read_csv(args.out)
            rows = old[~old["N"].isin(args.n)].to_dict("records")
        for n, nq in zip(args.n, args.queries + args.queries[-1:] * len(args.n)):
            build_case(n, nq, max(args.dims), args.rank, ws, args.chunk, args.model)
            rows += evaluate(n, sorted(args.dims), sorted(args.fractions), ws, args.model, args.timed,
                             args.timed_queries)
            df = pd.DataFrame(rows)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            df.to_csv(args.out, index=False)
            plot(df, args.out.with_suffix(".png"))
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
