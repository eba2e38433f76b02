"""Explore speed and exactness: the feature store's top-k for a new query vs the exact Diff-In path.

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/explore.py              # N = 10k and 100k
    python benchmarks/explore.py --n 4000 --dims 256 1024 --ranks 10 32 64     # choose the design

The project: the MNIST sample project (SmallCNN, 11,978 parameters, 12 checkpoints) with its
train split tiled to N rows, each copy shifted by up to 2 pixels and given +-12 grey levels of
noise (so no two rows are equal), manifest train_size set to N. One feature pass per view rank r
(Lanczos steps per checkpoint) at the largest d; smaller d use the first d columns of the same
projection (projector.prefix). In the same pass, the exact path's per-checkpoint gradients are
dotted with the exact plan of ``--queries`` single-sample queries (methods/diffin.DiffIn.prepare:
a fresh Lanczos view started at each query's vector, ``lanczos_steps`` HVPs per checkpoint):
that is `diffin top` without the store, computed for all queries at once.

Per (N, d, r): query_ms = median wall time of features.fast_query_influence for one new query on
a store with exactly d columns (one mean, one (N, d) product, the top ``rerank`` per side
rescored); topk_overlap = |top-10 fast ∩ top-10 exact| / 10, averaged over helpful and harmful
and over the queries; spearman_vs_exact over all N (projected scores, before rescoring);
feature_pass_s = the pass at this N (views + per-sample gradients + projection, largest d);
store_mb = the store with d columns. Writes benchmarks/results/explore.csv and explore.png.
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


MLP_PY = """from diffin_core.models import MLP


def build():
    return MLP(784, (32,), 10)
"""


def train_mlp(dest: Path, steps: int = 550, every: int = 50, seed: int = 0) -> None:
    """Replace the project's model by a tanh MLP 784-32-10 (25,450 parameters) trained by plain
    SGD (lr 0.3, batch 64) on the 4,000 sample digits, checkpoints every 50 steps (12 in all)."""
    import torch.nn.functional as Fn

    from diffin_core.checkpoints import Recorder
    from diffin_core.models import MLP
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
    from diffin_core.sample import SAMPLE_DIR
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
    from diffin_core.projector import prefix
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("train.npy", "query.npy", "class_sums.npy"))
    for name, norm in (("train", "train_norm"), ("query", "query_norm")):
        rows = np.load(src / f"{name}.npy", mmap_mode="r")
        lens = np.load(src / f"{norm}.npy")
        out = np.lib.format.open_memmap(dst / f"{name}.npy", mode="w+", dtype=np.float16, shape=(len(rows), dim))
        newlen = np.zeros(len(rows), np.float32)
        for s in range(0, len(rows), 16384):
            f = prefix(torch.from_numpy(rows[s:s + 16384, :dim].astype(np.float32)), full, dim) * torch.from_numpy(lens[s:s + 16384, None])
            ln = torch.linalg.vector_norm(f, dim=1)
            out[s:s + 16384] = (f / ln.clamp_min(1e-30)[:, None]).numpy().astype(np.float16)
            newlen[s:s + 16384] = ln.numpy()
        out.flush()
        del out
        np.save(dst / f"{norm}.npy", newlen)
    sums = np.load(src / "class_sums.npy")[:, :dim] * (full / dim) ** 0.5
    np.save(dst / "class_sums.npy", sums.astype(np.float32))
    meta = json.loads((src / "meta.json").read_text())
    meta["settings"]["dim"] = dim
    meta["store_mb"] = round(sum(p.stat().st_size for p in dst.iterdir()) / 2 ** 20, 3)
    (dst / "meta.json").write_text(json.dumps(meta, indent=1))


def overlap(a: np.ndarray, b: np.ndarray, k: int = K) -> float:
    top = lambda v: set(np.argsort(-v, kind="stable")[:k])     # noqa: E731
    return (len(top(a) & top(b)) + len(top(-a) & top(-b))) / (2 * k)


def bench(n: int, dims: list[int], ranks: list[int], nq: int, rerank: int, ws: Path, chunk: int,
          model: str) -> list[dict]:
    from diffin_core import features as F
    from diffin_core.methods.diffin import DiffIn
    from diffin_core.project import Project
    from diffin_core.scoring import project_context
    project = Project(build_project(ws, n, model))
    run = fake_run(project)
    ctx = project_context(project)
    q = project.query
    queries = np.random.default_rng(1).choice(len(q), nq, replace=False)
    t = time.time()
    plans = [DiffIn().prepare(ctx, q.x[[i]], q.y[[i]]) for i in queries]     # the exact path's vectors
    exact_prep_s = (time.time() - t) / nq
    log(f"N={n}: exact plans for {nq} queries, {exact_prep_s:.2f} s each (HVPs)")
    rows = []
    full = max(dims)
    for r in ranks:
        exact = np.zeros((n, nq))
        W = {k: torch.stack([{it.k: it.w for it in plan}.get(k, torch.zeros_like(ctx.thetas[k]))
                             for plan in plans], 1) for k in range(ctx.m)}
        C = {it.k: it.coef for plan in plans for it in plan}

        def on_grads(k, sl, g):
            if k in C:
                exact[sl] += C[k] * (g @ W[k]).double().cpu().numpy()
        settings = F.FeatureSettings(dim=full, view_rank=r, chunk_size=chunk, rerank=rerank)
        t = time.time()
        last = [0.0]

        def progress(d, tot, msg):
            if time.time() - last[0] > 30:
                last[0] = time.time()
                log(f"  {msg} {d}/{tot}")
        meta = F.build(ctx, q, run / "features-full", settings, progress, on_grads=on_grads, num_classes=10)
        pass_s = time.time() - t
        log(f"N={n} r={r}: feature pass {pass_s:.1f} s (views {meta['views_s']:.1f} s), store {meta['store_mb']:.1f} MB at d={full}")
        for d in dims:
            store_with_dim(run / "features-full", run / "features", d, full)
            store = F.FeatureStore(run / "features")
            ov_proj, ov_fast, rho, times = [], [], [], []
            F._CTX.clear()
            F.fast_query_influence(project, run.name, [int(queries[0])], store=store)    # warm: context, views
            for j, qi in enumerate(queries):
                proj = store.query_influence([qi])
                t0 = time.perf_counter()
                fast, _ = F.fast_query_influence(project, run.name, [int(qi)], store=store)
                times.append((time.perf_counter() - t0) * 1000)
                ov_proj.append(overlap(proj, exact[:, j]))
                ov_fast.append(overlap(fast, exact[:, j]))
                rho.append(spearmanr(proj, exact[:, j])[0])
            row = {"model": model, "N": n, "d": d, "view_rank": r, "rerank": rerank, "queries": nq,
                   "query_ms": round(statistics.median(times), 1),
                   "topk_overlap": round(float(np.mean(ov_fast)), 3),
                   "topk_overlap_projected_only": round(float(np.mean(ov_proj)), 3),
                   "spearman_vs_exact": round(float(np.mean(rho)), 3),
                   "feature_pass_s": round(pass_s, 1), "store_mb": store.meta["store_mb"],
                   "exact_plan_s": round(exact_prep_s, 2)}
            log(f"  d={d}: {row}")
            rows.append(row)
    return rows


def timing_only(n: int, src_n: int, dims: list[int], nq: int, ws: Path, model: str) -> list[dict]:
    """query_ms at N = n on a store whose rows are the N = src_n store's rows tiled (same shape and
    dtype as a real one; the exactness columns stay empty: the pass at n was not run here)."""
    from diffin_core import features as F
    from diffin_core.project import Project
    src = ws / f"mnist-{model}-{src_n}" / "runs" / "diffin-1" / "features-full"
    if not src.is_dir():
        src = src.parent / "features"          # the largest d of that run
    project = Project(build_project(ws, n, model))
    run = fake_run(project)
    full = json.loads((src / "meta.json").read_text())["settings"]["dim"]
    tmp = run / "features-full"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("train.npy", "train_norm.npy"))
    rows = np.load(src / "train.npy", mmap_mode="r")
    pick = np.arange(n) % len(rows)
    out = np.lib.format.open_memmap(tmp / "train.npy", mode="w+", dtype=np.float16, shape=(n, rows.shape[1]))
    for s in range(0, n, 20000):
        out[s:s + 20000] = rows[pick[s:s + 20000]]
    out.flush()
    del out
    np.save(tmp / "train_norm.npy", np.load(src / "train_norm.npy")[pick])
    meta = json.loads((tmp / "meta.json").read_text())
    meta["n_train"] = n
    (tmp / "meta.json").write_text(json.dumps(meta))
    queries = np.random.default_rng(1).choice(len(project.query), nq, replace=False)
    res = []
    for d in dims:
        store_with_dim(tmp, run / "features", d, full)
        store = F.FeatureStore(run / "features")
        F._CTX.clear()
        F.fast_query_influence(project, run.name, [int(queries[0])], store=store)
        times, alone = [], []
        for qi in queries:
            t0 = time.perf_counter()
            F.fast_query_influence(project, run.name, [int(qi)], store=store)
            times.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            F.fast_query_influence(project, run.name, [int(qi) + 1], store=store, rerank=0)   # the app's path
            alone.append((time.perf_counter() - t0) * 1000)
        row = {"model": model, "N": n, "d": d, "view_rank": meta["settings"]["view_rank"],
               "rerank": meta["settings"]["rerank"], "queries": nq, "query_ms": round(statistics.median(times), 1),
               "query_ms_store_only": round(statistics.median(alone), 1),
               "topk_overlap": np.nan, "topk_overlap_projected_only": np.nan, "spearman_vs_exact": np.nan,
               "feature_pass_s": np.nan, "store_mb": store.meta["store_mb"], "exact_plan_s": np.nan,
               "note": f"timing only: store rows tiled from N={src_n}"}
        log(f"  timing-only N={n} d={d}: {row['query_ms']} ms, store alone {row['query_ms_store_only']} ms")
        res.append(row)
    return res


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
    for (mdl, n, r), sub in df.groupby(["model", "N", "view_rank"]):
        lab = f"{mdl} N={n:,}, r={r}"
        axes[0].plot(sub["d"], sub["topk_overlap"], "o-", label=lab)
        axes[0].plot(sub["d"], sub["topk_overlap_projected_only"], "x--", alpha=0.6)
        axes[1].plot(sub["d"], sub["spearman_vs_exact"], "o-", label=lab)
        axes[2].plot(sub["d"], sub["query_ms"], "o-", label=lab)
    axes[0].axhline(0.9, color="#c44e52", ls="--", lw=1)
    axes[0].set_title("top-10 overlap vs exact\n(solid: rescored, dashed: projected only)", fontsize=9)
    axes[1].set_title("Spearman vs exact (all N, projected)", fontsize=9)
    axes[2].axhline(1000, color="#c44e52", ls="--", lw=1)
    axes[2].set_title("top-k for a new query (ms, CPU)", fontsize=9)
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("projection dimension d")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--ranks", type=int, nargs="+", default=[32])
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--rerank", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--workspace", type=Path)
    ap.add_argument("--model", choices=["mlp", "cnn"], default="mlp",
                    help="mlp: MLP 784-32-10 retrained on the sample digits (default; CPU-sized); "
                         "cnn: the sample project's own SmallCNN")
    ap.add_argument("--out", type=Path, default=RESULTS / "explore.csv")
    ap.add_argument("--tile-from", type=int, help="timing only: tile the store of this N (same workspace)")
    ap.add_argument("--append", type=Path, help="keep the rows of this CSV (e.g. the --out of a previous run)")
    args = ap.parse_args()
    torch.manual_seed(0)
    log(f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="diffin-explore-") as tmp:
        ws = (args.workspace or Path(tmp)).resolve()
        ws.mkdir(parents=True, exist_ok=True)
        rows = [] if args.append is None else pd.read_csv(args.append).to_dict("records")
        for n in args.n:
            if args.tile_from:
                rows += timing_only(n, args.tile_from, sorted(args.dims), args.queries, ws, args.model)
            else:
                rows += bench(n, sorted(args.dims), args.ranks, args.queries, args.rerank, ws, args.chunk, args.model)
            df = pd.DataFrame(rows)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            df.to_csv(args.out, index=False)
            plot(df, args.out.with_suffix(".png"))
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
