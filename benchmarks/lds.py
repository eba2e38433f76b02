"""Linear datamodeling score (LDS) of every influence estimator on two models.

    nice -n 10 python benchmarks/lds.py            # ~10-15 min on 2 shared CPU cores, + ~30 min sample-cnn
    nice -n 19 python benchmarks/lds.py --models sample-cnn    # one case: the other cases' rows stay as they are
    python benchmarks/lds.py --quick               # smoke: 1 seed, 10 subsets -> results/quick/

LDS as TRAK and dattri define it (diffin_core/tasks/lds.py): 50 random subsets keeping 50% of the
training set; each is retrained from scratch with the run's recipe and seed; for each query
sample, Spearman between the predicted change of its loss (the summed influence of the left-out
half) and the retrained loss; averaged over the query samples. Per seed (0, 1, 2: data flips,
init, batch order and subsets), then mean ± std over the seeds.

Models (the first two: small training budgets so that 50 retrains x 3 seeds fit a tiny CPU):
  digits-mlp  tanh MLP 64-32-10, sklearn digits, 1,200 train (10% flipped), batch 32, 10 epochs,
              cosine lr from 0.2, 10 checkpoints; 20 query samples
  mnist-cnn   a cut-down version of the sample CNN: SmallCNN, 400 MNIST train digits (10% flipped),
              batch 32, 6 epochs (78 steps), cosine lr from 0.3 (to 0), 6 checkpoints; 20 query samples
  sample-cnn  the sample project itself (sample_data/mnist, fixed a priori, nothing tuned): its 4,000
              training digits (10% flipped, fixed by the project's data) and query split, its model and
              its [train] recipe run as the product runs it (SGD batch 64, 8 epochs = 500 steps, cosine
              lr 0.3 -> 0.003, a checkpoint every 50 steps; a 50% subset gets 8 epochs = 256 steps),
              scored from the recipe's own manifest (per-step lrs) as the product scores a project;
              20 query samples. The seed sets init, batch order and subsets (the flips are the data's)
20 query samples per case for every method and both models (session 3 had 10 and 5): the
retrains are the cost and the query losses are free, and with 5 queries a seed's LDS was a mean
of 5 numbers and a 0.002 gap between methods could not be told from query sampling. Each row
also gives the paired per-query difference to TracIn (same seed, retrains and queries), pooled
over seeds x queries: vs_tracin_mean, vs_tracin_std, vs_tracin_wins (fraction > 0).
Methods: diffin, tracin, influence-function (registry defaults) and trak (diffin_core.tasks.lds's
TRAK-style projected estimator, 1,024 dims, the last 3 checkpoints).
Writes results/lds.csv (method, model, subsets, lds_mean, lds_std, seeds, queries, vs_tracin_*,
seconds) and lds.png, after each seed (a late finish still leaves the seeds done); rows of cases
not run now are kept as they are.

    nice -n 10 python benchmarks/lds.py --reference --models mnist-cnn     # -> results/lds_reference.csv
        (bench-loop cases only: the sample project's recipe cannot weight samples)
        seed 0: Diff-In and TracIn against the exact every-step SGD-influence (truth.sgd_influence,
        exact Hessian-vector products at every step) with expected membership (lr/N at every step,
        the whole set's Hessian: Diff-In's estimand) and with the real batches (the linear term of
        the trajectory-specific retrain), on fresh and trajectory-specific retrains of the subsets;
        pearson_vs_expected = how closely each reproduces Diff-In's estimand; also the LDS of each
        method's clean-sample and flipped-sample parts alone, and of the flip count left out

    nice -n 10 python benchmarks/lds.py --sweep --models mnist-cnn --queries 5   # -> results/lds_sweep.csv
        seed 0: Diff-In with Lanczos rank 30, Hessian batch 400, 12 checkpoints, vs TracIn
    nice -n 10 python benchmarks/lds.py --trajectory --models mnist-cnn --queries 5   (session 3: 5 queries)
        the same subsets retrained trajectory-specifically (same init, batch order and number of
        steps, the left-out half's loss weighted 0, as the trajectory LOO ground truth does):
        what the estimators approximate, without the fresh retrain's change of batch order and
        step count -> results/lds_trajectory.csv/png
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

METHODS = ["diffin", "tracin", "influence-function", "trak"]
CASES = {
    "digits-mlp": dict(batch=32, epochs=10, lr=0.2, ckpts=10, queries=20),
    "mnist-cnn": dict(n_train=400, batch=32, epochs=6, lr=0.3, ckpts=6, queries=20),
    "sample-cnn": dict(project="sample_data/mnist", queries=20),
}
FULL = dict(seeds=[0, 1, 2], subsets=50)
QUICK = dict(seeds=[0], subsets=10)


def case_data(name, seed):
    """(model_fn, x, y, qx, qy): the training split (10% flipped labels) and query samples."""
    from diffin_core.engine.models import MLP, SmallCNN
    from diffin_core.tasks.truth import digits_case
    c = CASES[name]
    if "project" in c:
        from diffin_core.project.folder import Project
        project = Project(HERE.parent / c["project"])
        x, y, qx, qy = project.train.x, project.train.y, project.query.x, project.query.y
        model_fn = project.build_model
    elif name == "digits-mlp":
        train, query = digits_case(noise=0.1, n_train=1200, seed=seed)
        x, y, qx, qy = train.x, train.y, query.x, query.y
        model_fn = lambda: MLP(64, (32,), 10)          # noqa: E731
    else:
        from diffin_core.project.sample import RAW, flip_labels
        with np.load(RAW) as d:
            xa, ya = d["X"].astype(np.float32).reshape(-1, 1, 28, 28) / 255.0, d["y"].astype(np.int64)
        perm = np.random.default_rng(1234 + seed).permutation(len(ya))
        tr, q = perm[:c["n_train"]], perm[c["n_train"]:c["n_train"] + 500]
        y, _ = flip_labels(ya[tr], 0.1, seed=300 + seed)
        x, qx, qy = xa[tr], xa[q], ya[q]
        model_fn = lambda: SmallCNN(1, 10, 28)         # noqa: E731
    pick = np.random.default_rng(seed + 17).choice(len(qy), c["queries"], replace=False)
    return model_fn, x, y, qx[pick], qy[pick]


def train(model_fn, x, y, seed, c, keep_states=True, weights=None):
    """SGD with cosine lr, batch order and init fixed by ``seed``: (model, states, steps, lrs).
    ``weights`` (N,): each sample's loss weight (0 = removed from its batches, same batch order
    and steps: the trajectory-specific retrain)."""
    import torch
    from _bench import train_sgd
    torch.manual_seed(seed)
    return train_sgd(model_fn(), x, y, seed, c, weights=weights, keep_states=keep_states)


def run_recipe(name, x, y, seed, folder):
    """A project case's [train] recipe run on (x, y) with ``seed``, its checkpoints and manifest
    written into ``folder``."""
    from diffin_core.project.folder import Project
    project = Project(HERE.parent / CASES[name]["project"])
    recipe, _ = project.load_callable(project.recipe, "[train] recipe")
    recipe(x, y, seed, Path(folder))


def recipe_context(name, x, y, folder, settings):
    """A project case's scoring context as the product builds it from the recipe's manifest in
    ``folder`` (checkpoints read lazily from there, per-step lrs, optimiser): manifest_context."""
    from diffin_core.project.checkpoints import read_manifest
    from diffin_core.project.data import Split
    from diffin_core.project.folder import Project
    from diffin_core.run.context import manifest_context
    project = Project(HERE.parent / CASES[name]["project"])
    return manifest_context(project.build_model(), read_manifest(Path(folder) / "manifest.json"),
                            Split(x, y, np.arange(len(y))), settings)


def retrain(name, model_fn, x, y, seed, c, weights=None):
    """The final model retrained on (x, y) from scratch with the case's recipe and ``seed``."""
    if "project" in c:
        if weights is not None:
            raise SystemExit(f"{name}: a project recipe cannot weight samples (no --trajectory / --reference)")
        from diffin_core.project.folder import Project
        from diffin_core.project.training import recipe_trainer
        return recipe_trainer(Project(HERE.parent / c["project"]))(x, y, seed).eval()
    return train(model_fn, x, y, seed, c, keep_states=False, weights=weights)[0]


def per_query_losses(model, qx, qy):
    import torch
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(torch.as_tensor(qx)), torch.as_tensor(qy),
                                                 reduction="none").double().numpy()


def job(name, seed, cfg):
    if cfg.get("queries"):                      # spawned workers re-import CASES
        CASES[name]["queries"] = cfg["queries"]
    from diffin_core.project.data import Split
    from diffin_core.tasks.lds import lds, per_query_influence, predicted_changes, random_subsets, trak_influence
    from diffin_core.methods import ScoreSettings
    from diffin_core.run.context import make_context
    c = CASES[name]
    model_fn, x, y, qx, qy = case_data(name, seed)
    folder = tempfile.TemporaryDirectory(prefix="lds-ckpts-")   # a project case's checkpoints
    if "project" in c:
        run_recipe(name, x, y, seed, folder.name)
    else:
        _, states, steps, lrs = train(model_fn, x, y, seed, c)
    split = Split(x, y, np.arange(len(y)))
    masks = random_subsets(len(y), cfg["subsets"], 0.5, seed=1000 + seed)
    t = time.time()
    if cfg.get("trajectory"):        # same init, batch order and steps, the left-out half weighted 0
        actual = np.stack([per_query_losses(retrain(name, model_fn, x, y, seed, c, weights=m.astype(np.float32)),
                                            qx, qy) for m in masks])
    else:                            # the standard LDS: retrain from scratch on the subset
        actual = np.stack([per_query_losses(retrain(name, model_fn, x[m], y[m], seed, c), qx, qy)
                           for m in masks])                                           # (M, Q)
    retrain_s = time.time() - t
    print(f"  {name} seed {seed}: {len(masks)} retrains in {retrain_s:.0f}s", flush=True)
    rows = []
    for label, method, ckpts, settings in (SWEEP if cfg.get("sweep") else [(m, m, None, {}) for m in METHODS]):
        t = time.time()
        if "project" in c:               # the recipe's own checkpoints and manifest
            if ckpts:
                raise SystemExit(f"{name}: the recipe fixes its checkpoints (no --sweep)")
            ctx = recipe_context(name, x, y, folder.name, ScoreSettings(device="cpu", **settings))
        else:
            if ckpts:
                _, states, steps, lrs = train(model_fn, x, y, seed, dict(c, ckpts=ckpts))
            ctx = make_context(model_fn(), states, steps, lrs, split, ScoreSettings(device="cpu", **settings))
        infl = trak_influence(ctx, qx, qy) if method == "trak" else per_query_influence(ctx, method, qx, qy)
        secs = time.time() - t
        score, per = lds(predicted_changes(infl, masks), actual)
        print(f"  {name} seed {seed}: {label} LDS {score:.4f} in {secs:.0f}s", flush=True)
        rows.append({"method": label, "model": name, "seed": seed, "subsets": len(masks), "lds": score,
                     "per_query": per.tolist(), "seconds": secs, "retrain_seconds": retrain_s})
    folder.cleanup()
    return rows


def flipped(name, seed):
    """(N,) bool: the training samples whose label case_data flipped."""
    if name == "digits-mlp":
        from diffin_core.tasks.truth import digits_case
        train, _ = digits_case(noise=0.1, n_train=1200, seed=seed)
        return train.y != train.true_y
    from diffin_core.project.sample import RAW, flip_labels
    with np.load(RAW) as d:
        ya = d["y"].astype(np.int64)
    tr = np.random.default_rng(1234 + seed).permutation(len(ya))[:CASES[name]["n_train"]]
    noisy, _ = flip_labels(ya[tr], 0.1, seed=300 + seed)
    return noisy != ya[tr]


def reference_job(name, seed, cfg):
    """--reference: Diff-In and TracIn against the exact every-step SGD-influence (truth.sgd_influence,
    exact HVPs at all steps) with expected membership (Diff-In's estimand: lr/N at every step, the
    whole set's Hessian) and with the real batches (the first-order term of the trajectory-specific
    retrain), on fresh and on trajectory-specific retrains of the same subsets."""
    if cfg.get("queries"):
        CASES[name]["queries"] = cfg["queries"]
    import torch
    from diffin_core.project.data import Split
    from diffin_core.engine.functional import FunctionalModel
    from diffin_core.tasks.lds import lds, per_query_influence, predicted_changes, random_subsets
    from diffin_core.methods import ScoreSettings
    from diffin_core.run.context import make_context
    from diffin_core.tasks.truth import batch_order, cosine_lrs, sgd_influence, train_sgd
    c = CASES[name]
    if "project" in c:
        raise SystemExit(f"{name}: --reference needs the bench's own SGD loop (sample weights), not a project recipe")
    model_fn, x, y, qx, qy = case_data(name, seed)
    _, states, steps, lrs = train(model_fn, x, y, seed, c)
    masks = random_subsets(len(y), cfg["subsets"], 0.5, seed=1000 + seed)
    actual = {"fresh": np.stack([per_query_losses(train(model_fn, x[m], y[m], seed, c, keep_states=False)[0], qx, qy)
                                 for m in masks]),
              "trajectory": np.stack([per_query_losses(train(model_fn, x, y, seed, c, keep_states=False,
                                                             weights=m.astype(np.float32))[0], qx, qy) for m in masks])}
    infl = {}
    for method in ("diffin", "tracin"):
        t = time.time()
        ctx = make_context(model_fn(), states, steps, lrs, Split(x, y, np.arange(len(y))), ScoreSettings(device="cpu"))
        infl[method] = (per_query_influence(ctx, method, qx, qy), time.time() - t)
    torch.manual_seed(seed)                       # the same init and batch order as train()
    model = model_fn()
    fm = FunctionalModel(model)
    batches = batch_order(len(y), c["batch"], c["epochs"], seed)
    traj = train_sgd(fm, fm.theta_of(model), torch.as_tensor(x), torch.as_tensor(y), batches,
                     cosine_lrs(c["lr"], len(batches)))
    for membership in ("expected", "batch"):
        t = time.time()
        infl[f"every-step {membership}"] = (sgd_influence(fm, traj, torch.as_tensor(x), torch.as_tensor(y),
                                                          torch.as_tensor(qx), torch.as_tensor(qy), membership),
                                            time.time() - t)
    flips = flipped(name, seed)[:, None]          # does the flip count of each half drive the LDS?
    for method in ("diffin", "tracin"):
        values, secs = infl[method]
        infl[f"{method}, clean samples only"] = (np.where(flips, 0.0, values), secs)
        infl[f"{method}, flipped samples only"] = (np.where(flips, values, 0.0), secs)
    infl["flips left out (count)"] = (np.repeat(-flips.astype(np.float64), len(qy), 1), 0.0)
    rows = []
    for kind, act in actual.items():
        for method, (values, secs) in infl.items():
            score, per = lds(predicted_changes(values, masks), act)
            pear = np.mean([np.corrcoef(values[:, q], infl["every-step expected"][0][:, q])[0, 1] for q in range(len(qy))])
            rows.append({"kind": kind, "method": method, "model": name, "seed": seed, "subsets": len(masks),
                         "lds": score, "per_query": per.tolist(), "pearson_vs_expected": pear, "seconds": secs})
    return rows


# --sweep: what could separate Diff-In from TracIn on a case (label, method, checkpoints, settings)
SWEEP = [("diffin", "diffin", None, {}), ("tracin", "tracin", None, {}),
         ("diffin lanczos 30", "diffin", None, {"lanczos_steps": 30}),
         ("diffin hessian batch 400", "diffin", None, {"hessian_batch": 400}),
         ("diffin 12 checkpoints", "diffin", 12, {}), ("tracin 12 checkpoints", "tracin", 12, {})]


def paired(rows, base="tracin"):
    """Per row: the per-query LDS differences (method - ``base``) on the same seed, model,
    retrains and queries (NaN where either is undefined)."""
    ref = {(r["model"], r["seed"], r.get("kind")): np.asarray(r["per_query"]) for r in rows if r["method"] == base}
    return [np.asarray(r["per_query"]) - ref.get((r["model"], r["seed"], r.get("kind")), np.nan) for r in rows]


def summarise(rows, keys=("method", "model", "subsets")):
    """Mean ± std over seeds of the LDS; queries per seed; the paired per-query difference to
    TracIn pooled over seeds and queries (mean, std over the pairs, fraction > 0)."""
    import pandas as pd
    df = pd.DataFrame(rows)
    diffs = paired(rows)
    df["queries"] = [len(r["per_query"]) for r in rows]
    out = []
    for key, g in df.groupby(list(keys), sort=False):
        d = np.concatenate([diffs[i] for i in g.index])
        d = d[np.isfinite(d)]
        out.append(dict(zip(keys, key), lds_mean=g.lds.mean(), lds_std=float(g.lds.std(ddof=1)) if len(g) > 1 else 0.0,
                        seeds=len(g), queries=int(g.queries.iloc[0]),
                        vs_tracin_mean=float(d.mean()) if len(d) else np.nan,
                        vs_tracin_std=float(d.std(ddof=1)) if len(d) > 1 else np.nan,
                        vs_tracin_wins=float((d > 0).mean()) if len(d) else np.nan,
                        seconds=g.seconds.mean()))
    return pd.DataFrame(out)


def plot(table, path, trajectory=False):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(table.model))
    methods = list(dict.fromkeys(table.method))
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        r = table[table.method == m].set_index("model").reindex(models)
        ax.bar(np.arange(len(models)) + i * w, r["lds_mean"], w, yerr=r["lds_std"], label=m, capsize=2)
    ax.set_xticks(np.arange(len(models)) + 0.4 - w / 2)
    ax.set_xticklabels(models)
    ax.axhline(0, lw=0.5, c="k")
    ax.set_ylabel("LDS (mean Spearman over query samples)")
    kind = "trajectory-specific retrains" if trajectory else "fresh retrains"
    queries = f", {int(table.queries.iloc[0])} query samples" if "queries" in table else ""
    ax.set_title(f"linear datamodeling score, {int(table.subsets.iloc[0])} random 50% subsets ({kind}{queries}), "
                 "mean ± std over seeds",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    from _bench import pool_map
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--models", nargs="*", default=list(CASES))
    ap.add_argument("--queries", type=int, default=None, help="query samples per case (default: CASES)")
    ap.add_argument("--name", default=None, help="output file stem (default lds, lds_trajectory)")
    ap.add_argument("--trajectory", action="store_true",
                    help="trajectory-specific subsets: retrain with the same init, batch order and steps, the "
                         "left-out half weighted 0 (the estimand of trajectory LOO) -> results/lds_trajectory.csv")
    ap.add_argument("--reference", action="store_true",
                    help="seed 0 only: Diff-In and TracIn vs the exact every-step SGD-influence (expected and real "
                         "batch membership), fresh and trajectory-specific retrains -> results/lds_reference.csv")
    ap.add_argument("--sweep", action="store_true",
                    help="seed 0 only, Diff-In's settings and checkpoint count vs TracIn (SWEEP) -> results/lds_sweep.csv")
    a = ap.parse_args(argv)
    cfg = dict(QUICK if a.quick else FULL, trajectory=a.trajectory, sweep=a.sweep)
    if a.sweep or a.reference:
        cfg["seeds"] = [0]
    a.name = a.name or ("lds_reference" if a.reference else "lds_sweep" if a.sweep
                        else "lds_trajectory" if a.trajectory else "lds")
    out = HERE / "results" / ("quick" if a.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    if a.queries:
        for name in a.models:
            CASES[name]["queries"] = a.queries
        cfg = dict(cfg, queries=a.queries)
    jobs = [(name, seed, cfg) for name in a.models for seed in cfg["seeds"]]
    rows, started = [], time.time()
    keys = ("kind", "method", "model", "subsets") if a.reference else ("method", "model", "subsets")
    for args, r, secs in pool_map(reference_job if a.reference else job, jobs, a.workers):
        rows += r
        print(f"[{time.time() - started:6.0f}s] {args[0]} seed {args[1]} done in {secs:.0f}s: "
              + ", ".join(f"{x.get('kind', '')} {x['method']} {x['lds']:.4f}" for x in r), flush=True)
        table = summarise(rows, keys)
        if not (a.quick or a.reference or a.sweep):
            table = with_other_models(table, out / f"{a.name}.csv", a.models)
        if a.reference:
            table["pearson_vs_expected"] = [np.mean([x["pearson_vs_expected"] for x in rows if (x["kind"], x["method"],
                                            x["model"]) == (k, m, mo)]) for k, m, mo in zip(table.kind, table.method, table.model)]
        else:
            plot(table, out / f"{a.name}.png", a.trajectory)
        write_csv(table, out / f"{a.name}.csv")
    print(table.to_string(index=False))


def with_other_models(table, path, models):
    """``table`` after the rows of an existing ``path`` for models not run now (kept as they are:
    pandas reads floats round-trip, so a run of one case leaves the others' rows identical)."""
    import pandas as pd
    if not path.is_file():
        return table
    old = pd.read_csv(path)
    old = old[~old.model.isin(models)]
    return pd.concat([old, table], ignore_index=True) if len(old) else table


def write_csv(table, path):
    """Atomic: a temp file renamed over the table (the What-if page may be reading it)."""
    tmp = path.with_suffix(".csv.tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(path)


if __name__ == "__main__":
    main()
