"""Explore on an AdamW run recorded with its batch order: a top-k query by the replay vs a store.

A small project (sklearn digits, 400 training rows with 10% flipped labels, 50 query rows, MLP
64-32-10 float32, torch.optim.AdamW lr 0.01 wd 0.01, batch 32, 4 epochs = 52 steps, a checkpoint
every 10 steps) recorded with ``rec.track(DataLoader(shuffle=True))``, scored with `diffin score`
(the replay: adam_batches.py; no feature store for such runs). Then the alternatives a faster
Explore could use: the checkpoint estimator (the same checkpoints without the batch order:
Adam's moments frozen per checkpoint) by its exact path, and the feature store folded from it
(features.build on that context; what `diffin score` writes for runs without a batch order).
Metrics (CSV long format: seed, query, metric, value; query = a single query row, or "all"):
  per query   replay_s   `diffin top --exact` from a cold cache (project context + replay, every row)
              replay_warm_s   the replay alone (warm context)
              ckpt_s     the checkpoint estimator's exact path (warm context)
              store_ms   the store's top-k (one (N, d) product, no model code)
              spearman_{store,ckpt}_replay, top10_{store,ckpt}_replay   agreement with the replay
                         (all rows; overlap of the 10 most helpful)
  once        train_s (the training loop with the Recorder), score_s (`diffin score`),
              store_build_s (the store's pass), and on the mean loss of all 50 query rows
              truth_spearman_{replay,ckpt,store}: Spearman against true leave-one-out (float64
              retraining with the recorded batches, --truth samples)

    python benchmarks/adam_explore.py [--queries 5] [--truth 100] [--seeds 0 1]
        -> benchmarks/results/adam_explore.csv, adam_explore.png
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffin_core.run import features as feature_store  # noqa: E402
from diffin_core.project.checkpoints import Recorder, load_batch_order  # noqa: E402
from diffin_core.engine.models import MLP  # noqa: E402
from diffin_core.project.folder import Project  # noqa: E402
from diffin_core.run.scoring import run_method, score, top_k, topk_cache_path
from diffin_core.run.context import project_context
from diffin_core.tasks.truth import TorchRecipe, digits_case, leave_one_out_torch  # noqa: E402

MODEL = "from diffin_core.engine.models import MLP\n\n\ndef build():\n    return MLP(64, (32,), 10)\n"
TOML = """[model]\nfactory = "model.py:build"\nloss = "cross_entropy"\n\n[data]\ntrain = "data/train.npz"
query = "data/query.npz"\nkind = "tabular"\n\n[checkpoints]\nmanifest = "checkpoints/manifest.json"\n"""
LR, WD, BATCH, EPOCHS, EVERY = 0.01, 0.01, 32, 4, 10


def make_project(root: Path, seed: int) -> float:
    """Write the project and train it with the Recorder; returns the training loop's seconds."""
    train, query = digits_case(noise=0.1, n_train=400, seed=seed)
    (root / "data").mkdir(parents=True)
    np.savez(root / "data/train.npz", x=train.x, y=train.y)
    np.savez(root / "data/query.npz", x=query.x[:50], y=query.y[:50])
    (root / "model.py").write_text(MODEL)
    (root / "diffin.toml").write_text(TOML)
    torch.manual_seed(seed)
    model = MLP(64, (32,), 10)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    ds = torch.utils.data.TensorDataset(torch.as_tensor(train.x), torch.as_tensor(train.y))
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    t = time.perf_counter()
    with Recorder(root, model, opt, train_size=len(ds), every=EVERY) as rec:
        for _ in range(EPOCHS):
            for x, y in rec.track(loader):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                rec.step()
    return time.perf_counter() - t


def truth(project: Project, seed: int, samples: np.ndarray) -> np.ndarray:
    """True leave-one-out on the mean query loss: the same initial weights and recorded batches,
    float64, torch's AdamW."""
    def model_fn():
        torch.manual_seed(seed)
        return MLP(64, (32,), 10).double()
    recipe = TorchRecipe("adamw", model_fn, lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=WD))
    order = load_batch_order(project.manifest, len(project.train))
    batches = [order.batch(s) for s in range(len(order.offsets) - 1)]
    x = torch.as_tensor(project.train.x, dtype=torch.float64)
    qx = torch.as_tensor(project.query.x, dtype=torch.float64)
    return leave_one_out_torch(recipe, x, torch.as_tensor(project.train.y), qx, torch.as_tensor(project.query.y),
                               batches, samples)


def top10(a: np.ndarray, b: np.ndarray) -> float:
    return len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10


def one_seed(seed: int, queries: int, n_truth: int) -> list[dict]:
    """The metric rows of one seed (project, training and sampled truths seeded)."""
    root = Path(tempfile.mkdtemp(prefix="adam-explore-"))
    rows = []

    def put(query, metric, value):
        rows.append({"seed": seed, "query": query, "metric": metric, "value": round(float(value), 4)})
        print(rows[-1], flush=True)
    try:
        put("all", "train_s", make_project(root / "p", seed))
        project = Project(root / "p")
        t = time.perf_counter()
        run = score(project, "diffin", run="d")
        put("all", "score_s", time.perf_counter() - t)
        ctx = project_context(project)
        assert ctx.batch_order is not None and not (run / "features").exists()
        ck = replace(ctx, batch_order=None, moments=None)          # the checkpoint estimator
        t = time.perf_counter()
        feature_store.build(ck, project.query, root / "store", num_classes=10)
        put("all", "store_build_s", time.perf_counter() - t)
        store = feature_store.FeatureStore(root / "store")
        q = project.query
        for qi in range(queries):
            topk_cache_path(project, "d", [qi]).unlink(missing_ok=True)
            t = time.perf_counter()
            helpful, _ = top_k(project, "d", [qi], k=len(project.train), exact=True)
            put(qi, "replay_s", time.perf_counter() - t)
            rep = helpful.set_index("sample_id")["influence"].sort_index().to_numpy()
            t = time.perf_counter()
            run_method(ctx, "diffin", q.x[[qi]], q.y[[qi]], need_self=False)
            put(qi, "replay_warm_s", time.perf_counter() - t)
            t = time.perf_counter()
            cke = run_method(ck, "diffin", q.x[[qi]], q.y[[qi]], need_self=False)["influence"]
            put(qi, "ckpt_s", time.perf_counter() - t)
            t = time.perf_counter()
            st = store.query_influence([qi])
            np.argsort(-st)[:10]
            put(qi, "store_ms", 1e3 * (time.perf_counter() - t))
            for name, v in (("store", st), ("ckpt", cke)):
                put(qi, f"spearman_{name}_replay", spearmanr(v, rep)[0])
                put(qi, f"top10_{name}_replay", top10(v, rep))
        samples = np.random.default_rng(seed).choice(len(project.train), n_truth, replace=False)
        loo = truth(project, seed, samples)
        ests = {"replay": project.scores("d")["influence"].to_numpy(),
                "ckpt": run_method(ck, "diffin", q.x, q.y, need_self=False)["influence"],
                "store": store.query_influence(np.arange(len(q)))}
        for name, v in ests.items():
            put("all", f"truth_spearman_{name}", spearmanr(v[samples], loo)[0])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--truth", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = []
    for seed in a.seeds:
        rows += one_seed(seed, a.queries, a.truth)
    df = pd.DataFrame(rows)
    out = Path(a.out)
    df.to_csv(out / "adam_explore.csv", index=False)
    plot(df, out / "adam_explore.png")
    return df


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    every = df["query"].astype(str) == "all"
    per = df[~every].groupby("metric")["value"].median()        # over queries and seeds
    once = df[every].groupby("metric")["value"].median()         # over seeds
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 2.8), gridspec_kw={"width_ratios": [3, 2]})
    times = {"training loop": once["train_s"], "top-k: replay (exact, cold)": per["replay_s"],
             "top-k: replay (warm context)": per["replay_warm_s"],
             "top-k: checkpoint estimator": per["ckpt_s"], "top-k: store": per["store_ms"] / 1e3}
    ax.barh(list(times), list(times.values()), color=["grey", "C3", "C3", "C1", "C0"])
    ax.set_xscale("log")
    ax.set_xlabel("seconds (median over seeds and single-sample queries)")
    names = ["replay", "ckpt", "store"]
    bx.bar(names, [once[f"truth_spearman_{n}"] for n in names], color=["C3", "C1", "C0"],
           label="vs true LOO (mean query loss)")
    bx.plot(names[1:], [per[f"spearman_{n}_replay"] for n in names[1:]], "k^", label="vs replay (per query)")
    bx.set_ylabel("Spearman")
    bx.axhline(0, color="k", lw=0.5)
    bx.set_ylim(min(0.0, float(per[["spearman_store_replay", "spearman_ckpt_replay"]].min())), 1.3)
    bx.legend(fontsize=7, loc="upper right")
    fig.suptitle("AdamW + recorded batch order (400 digits, 52 steps, 2 shared CPU cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plot"]:                 # redraw from the CSV
        plot(pd.read_csv(ROOT / "benchmarks/results/adam_explore.csv"), ROOT / "benchmarks/results/adam_explore.png")
    else:
        main()
