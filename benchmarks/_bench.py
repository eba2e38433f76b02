"""Benchmark jobs (one per task x setting x seed); each returns a list of result rows.

A row: {"task", "method", "setting", "metric", "value", "seed"}; run.py aggregates them into
mean and std over the seeds. Every job is self-contained (it reloads the data) so that jobs can
run in parallel worker processes, each with one torch thread.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import diffin_core  # noqa: F401  first: OpenMP's passive wait and the thread count before torch loads (threads.py)
import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import roc_auc_score

from diffin_core.project.data import Split
from diffin_core.engine.functional import FunctionalModel
from diffin_core.methods import ScoreSettings
from diffin_core.engine.models import MLP, SmallCNN
from diffin_core.project.sample import RAW, flip_labels
from diffin_core.run.scoring import run_method
from diffin_core.run.context import make_context
from diffin_core.tasks.curate import cleaning_selection, coreset_selection, drop_most_harmful, el2n_scores, forgetting_scores, moso_scores
from diffin_core.project.training import query_metrics
from diffin_core.tasks import truth as gt
from diffin_core.tasks.truth import batch_order, cosine_lrs, digits_case, leave_one_out

# --- configuration -------------------------------------------------------------------------------
FULL = dict(
    n_train=3000, n_query=500, n_test=1500,          # MNIST-5k: train / query (validation) / test
    epochs=6, batch=64, lr=0.3, ckpts=10,            # SmallCNN, SGD, cosine lr from 0.3
    cleaning_methods=["diffin", "tracin", "influence-function", "loss", "cleanlab"],
    deletion_methods=["diffin", "tracin", "influence-function", "grad-dot"],
    deletion_ks=[0.01, 0.05, 0.10], loo_flipped=5, loo_clean=5,
    coreset_methods=["diffin", "tracin"], coreset_fractions=[0.3, 0.5, 0.7],
    gt_samples={"digits-mlp": 30, "digits-logreg": 30, "mnist-cnn": 20},
    gt_counts=[5, 10, 20],
    gt_methods=["diffin", "diffin-paper", "tracin", "grad-dot", "grad-cos", "influence-function"],
    gt_cnn=dict(n_train=500, n_query=200, epochs=8, batch=32, lr=0.4),
)
QUICK = dict(FULL, n_train=1000, n_query=200, n_test=500, epochs=10, lr=0.4, ckpts=6,
             deletion_ks=[0.05], loo_flipped=3, loo_clean=3, coreset_fractions=[0.5],
             gt_samples={"digits-mlp": 10, "digits-logreg": 10, "mnist-cnn": 6}, gt_counts=[5, 10],
             gt_cnn=dict(n_train=300, n_query=100, epochs=10, batch=32, lr=0.4))


def row(task, method, setting, metric, value, seed):
    return {"task": task, "method": method, "setting": setting, "metric": metric,
            "value": float(value), "seed": int(seed)}


# --- data and training ---------------------------------------------------------------------------
@dataclass
class Data:
    xtr: np.ndarray
    ytr: np.ndarray
    xq: np.ndarray
    yq: np.ndarray
    xte: np.ndarray
    yte: np.ndarray


def mnist_data(cfg) -> Data:
    """MNIST-5k split once (fixed seed) into train / query (validation) / held-out test."""
    with np.load(RAW) as d:
        x, y = d["X"], d["y"].astype(np.int64)
    perm = np.random.default_rng(1234).permutation(len(y))
    x = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    a, b = cfg["n_train"], cfg["n_train"] + cfg["n_query"]
    tr, q, te = perm[:a], perm[a:b], perm[b:b + cfg["n_test"]]
    return Data(x[tr], y[tr], x[q], y[q], x[te], y[te])


def train_cnn(x, y, seed, cfg, weights=None):
    """The benchmark recipe: SmallCNN, plain SGD, batch 64, cosine lr; same seed = same init and
    batch order. ``weights`` (N,) scales each sample's loss (0 = trajectory-specific removal).
    Returns (model, states, steps, lrs) with ``cfg['ckpts']`` evenly spaced checkpoints."""
    torch.manual_seed(seed)
    model = SmallCNN(1, 10, 28)
    return train_sgd(model, x, y, seed, cfg, torch.ones(len(y)) if weights is None else weights)


def train_sgd(model, x, y, seed, cfg, weights=None, keep_states=True):
    """Plain SGD with a cosine lr from cfg['lr'] over cfg['epochs'] epochs of cfg['batch'], batch
    order fixed by ``seed`` (the caller seeds the init). ``weights`` (N,) scale each sample's loss
    (batch mean keeps its denominator); None = the plain mean. Returns (model, states, steps, lrs)
    with cfg['ckpts'] evenly spaced checkpoints (only the final one unless ``keep_states``)."""
    n = len(y)
    batches = batch_order(n, cfg["batch"], cfg["epochs"], seed)
    lrs = cosine_lrs(cfg["lr"], len(batches))
    total = len(batches)
    save = sorted({int(round(s)) for s in np.linspace(0, total, cfg["ckpts"])}) if keep_states else [total]
    xt = torch.as_tensor(x)
    yt = torch.as_tensor(y)
    wt = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    states, steps, ck_lrs = [], [], []
    for s in range(total + 1):
        if s in save:
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            steps.append(s)
            ck_lrs.append(lrs[min(s, total - 1)])
        if s == total:
            break
        idx = torch.as_tensor(batches[s])
        opt.param_groups[0]["lr"] = lrs[s]
        opt.zero_grad()
        if wt is None:
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
        else:
            (F.cross_entropy(model(xt[idx]), yt[idx], reduction="none") * wt[idx]).sum().div(len(idx)).backward()
        opt.step()
    return model.eval(), states, steps, ck_lrs


def score_all(states, steps, lrs, split, qx, qy, methods, model_fn=lambda: SmallCNN(1, 10, 28),
              need_self=True, dtype=torch.float32):
    """{method: (output dict, seconds)} with the product's default settings."""
    out = {}
    for m in methods:
        t = time.time()
        ctx = make_context(model_fn(), states, steps, lrs, split, ScoreSettings(device="cpu"), dtype=dtype)
        res = run_method(ctx, m, qx, qy, need_self=need_self)
        out[m] = (res, time.time() - t)
    return out


def _eval(model, x, y):
    return query_metrics(model, x, y)


# --- cleaning (+ deletion on the 10% setting) ----------------------------------------------------
def cleaning_job(noise, seed, cfg, deletion=False):
    d = mnist_data(cfg)
    y_noisy, flipped = flip_labels(d.ytr, noise, seed=100 + seed)
    is_flipped = np.zeros(len(y_noisy), bool)
    is_flipped[flipped] = True
    setting = f"noise {int(round(noise * 100))}%"
    rows = []
    t = time.time()
    model, states, steps, lrs = train_cnn(d.xtr, y_noisy, seed, cfg)
    train_seconds = time.time() - t
    base_test = _eval(model, d.xte, d.yte)
    base_q = _eval(model, d.xq, d.yq)
    rows.append(row("cleaning", "none (no cleaning)", setting, "test_acc", base_test["accuracy"], seed))
    rows.append(row("cleaning", "none (no cleaning)", setting, "train_seconds", train_seconds, seed))
    split = Split(d.xtr, y_noisy, np.arange(len(y_noisy)), d.ytr)
    methods = list(cfg["cleaning_methods"])
    if deletion:
        methods += [m for m in cfg["deletion_methods"] if m not in methods and m != "grad-dot"]
    scored = score_all(states, steps, lrs, split, d.xq, d.yq, methods)
    for m in cfg["cleaning_methods"]:
        res, secs = scored[m]
        issue = res["label_issue"]
        flagged = cleaning_selection(issue, noise)
        rows.append(row("cleaning", m, setting, "flipped_found", flagged[is_flipped].mean(), seed))
        rows.append(row("cleaning", m, setting, "auroc", roc_auc_score(is_flipped, np.nan_to_num(issue)), seed))
        rows.append(row("cleaning", m, setting, "score_seconds", secs, seed))
        model_c, *_ = train_cnn(d.xtr[~flagged], y_noisy[~flagged], seed, cfg)
        rows.append(row("cleaning", m, setting, "test_acc", _eval(model_c, d.xte, d.yte)["accuracy"], seed))
    model_o, *_ = train_cnn(d.xtr[~is_flipped], y_noisy[~is_flipped], seed, cfg)
    rows.append(row("cleaning", "oracle (drop the true flips)", setting, "test_acc",
                    _eval(model_o, d.xte, d.yte)["accuracy"], seed))
    rows.append(row("cleaning", "oracle (drop the true flips)", setting, "flipped_found", 1.0, seed))
    if not deletion:
        return rows, {}

    # deletion: remove the k most harmful for the query set, retrain, evaluate
    infl = {m: scored[m][0]["influence"] for m in cfg["deletion_methods"] if m in scored}
    if "grad-dot" in cfg["deletion_methods"]:
        infl["grad-dot"] = scored["loss"][0]["influence"]      # detectors carry grad-dot influence
    n = len(y_noisy)
    for m, ref in (("none (full data)", base_q), ):
        for kf in cfg["deletion_ks"]:
            s = f"k={int(round(kf * 100))}%"
            rows += [row("deletion", m, s, "query_loss", ref["loss"], seed),
                     row("deletion", m, s, "query_acc", ref["accuracy"], seed),
                     row("deletion", m, s, "test_loss", base_test["loss"], seed),
                     row("deletion", m, s, "test_acc", base_test["accuracy"], seed)]
    for m in list(infl) + ["random"]:
        for kf in cfg["deletion_ks"]:
            k = int(round(kf * n))
            s = f"k={int(round(kf * 100))}%"
            if m == "random":
                removed = np.zeros(n, bool)
                removed[np.random.default_rng(seed + 7).choice(n, k, replace=False)] = True
            else:
                removed = drop_most_harmful(infl[m], k)
                rows.append(row("deletion", m, s, "predicted_query_loss_change", infl[m][removed].sum(), seed))
            model_d, *_ = train_cnn(d.xtr[~removed], y_noisy[~removed], seed, cfg)
            q, te = _eval(model_d, d.xq, d.yq), _eval(model_d, d.xte, d.yte)
            rows += [row("deletion", m, s, "query_loss", q["loss"], seed),
                     row("deletion", m, s, "query_acc", q["accuracy"], seed),
                     row("deletion", m, s, "test_loss", te["loss"], seed),
                     row("deletion", m, s, "test_acc", te["accuracy"], seed),
                     row("deletion", m, s, "actual_query_loss_change", q["loss"] - base_q["loss"], seed),
                     row("deletion", m, s, "flipped_removed", is_flipped[removed].mean(), seed)]
    for m in infl:
        if m in scored:
            rows.append(row("deletion", m, "timing", "score_seconds", scored[m][1], seed))

    # single samples: trajectory-specific leave-one-out (same init, same batch order, weight 0)
    rng = np.random.default_rng(seed + 99)
    pick = np.concatenate([rng.choice(np.flatnonzero(is_flipped), cfg["loo_flipped"], replace=False),
                           rng.choice(np.flatnonzero(~is_flipped), cfg["loo_clean"], replace=False)])
    actual = []
    for z in pick:
        w = np.ones(n, np.float32)
        w[z] = 0.0
        model_z, *_ = train_cnn(d.xtr, y_noisy, seed, cfg, weights=w)
        actual.append(_eval(model_z, d.xq, d.yq)["loss"] - base_q["loss"])
    actual = np.asarray(actual)
    pairs = {}
    for m in infl:
        pred = infl[m][pick]
        pairs[m] = (pred, actual)
        rows += [row("deletion", m, f"single samples (LOO, {len(pick)}/seed)", "pearson", pearsonr(pred, actual)[0], seed),
                 row("deletion", m, f"single samples (LOO, {len(pick)}/seed)", "spearman", spearmanr(pred, actual)[0], seed),
                 row("deletion", m, f"single samples (LOO, {len(pick)}/seed)", "sign_agreement",
                     np.mean(np.sign(pred) == np.sign(actual)), seed)]
    return rows, {"loo_pairs": pairs}


# --- coreset --------------------------------------------------------------------------------------
def coreset_job(seed, cfg):
    d = mnist_data(cfg)
    rows = []
    model, states, steps, lrs = train_cnn(d.xtr, d.ytr, seed, cfg)
    full = _eval(model, d.xte, d.yte)
    split = Split(d.xtr, d.ytr, np.arange(len(d.ytr)))
    values, secs = {}, {}
    scored = score_all(states, steps, lrs, split, d.xq, d.yq, cfg["coreset_methods"], need_self=False)
    for m, (res, s) in scored.items():
        values[m], secs[m] = res["influence"], s
    ctx = make_context(SmallCNN(1, 10, 28), states, steps, lrs, split, ScoreSettings(device="cpu"))
    for name, fn in (("el2n", el2n_scores), ("forgetting", forgetting_scores), ("moso", moso_scores)):
        t = time.time()
        values[name] = fn(ctx)
        secs[name] = time.time() - t
    values["random"] = None
    for frac in cfg["coreset_fractions"]:
        s = f"keep {int(round(frac * 100))}%"
        sub_cfg = dict(cfg, epochs=int(round(cfg["epochs"] / frac)))
        rows.append(row("coreset", "full data", s, "test_acc", full["accuracy"], seed))
        for m, v in values.items():
            if m == "random":
                keep = coreset_selection(None, frac, value="random", labels=d.ytr, seed=seed + 11)
            else:
                keep = coreset_selection(None, frac, value=v, labels=d.ytr)
            # same number of SGD steps as the full run (epochs scaled by 1/fraction): with the
            # full run's epoch count a 30% subset gets 30% of the steps and the CNN never leaves
            # its initial plateau, which would measure the step budget, not the subset
            model_c, *_ = train_cnn(d.xtr[keep], d.ytr[keep], seed, sub_cfg)
            rows.append(row("coreset", m, s, "test_acc", _eval(model_c, d.xte, d.yte)["accuracy"], seed))
    for m, s in secs.items():
        rows.append(row("coreset", m, "timing", "score_seconds", s, seed))
    return rows, {}


# --- ground truth -----------------------------------------------------------------------------------
def _gt_case(name, seed, cfg):
    """(model_fn, fm (float64), x, y, qx, qy, batches, lrs, Split)"""
    if name.startswith("digits"):
        train, query = digits_case(noise=0.1, n_train=1200, seed=seed)
        hidden = (32,) if name == "digits-mlp" else ()
        model_fn = lambda: MLP(64, hidden, 10)   # noqa: E731
        batch, epochs, lr0 = 32, 10, (0.2 if name == "digits-mlp" else 0.5)
        qx, qy = query.x, query.y
    else:
        c = cfg["gt_cnn"]
        d = mnist_data(dict(n_train=c["n_train"], n_query=c["n_query"], n_test=0))
        y_noisy, _ = flip_labels(d.ytr, 0.1, seed=200 + seed)
        train = Split(d.xtr, y_noisy, np.arange(len(y_noisy)), d.ytr)
        model_fn = lambda: SmallCNN(1, 10, 28)   # noqa: E731
        batch, epochs, lr0 = c["batch"], c["epochs"], c["lr"]
        qx, qy = d.xq, d.yq
    torch.manual_seed(seed)
    model = model_fn().double()
    fm = FunctionalModel(model)
    theta0 = fm.theta_of(model)
    batches = batch_order(len(train), batch, epochs, seed)
    lrs = cosine_lrs(lr0, len(batches))
    return model_fn, fm, train, qx, qy, theta0, batches, lrs


def gt_job(name, seed, cfg):
    model_fn, fm, train, qx, qy, theta0, batches, lrs = _gt_case(name, seed, cfg)
    x = torch.as_tensor(train.x, dtype=torch.float64)
    y = torch.as_tensor(train.y)
    qxt, qyt = torch.as_tensor(qx, dtype=torch.float64), torch.as_tensor(qy)
    t = time.time()
    traj = gt.train_sgd(fm, theta0, x, y, batches, lrs, save_every=1)
    rng = np.random.default_rng(seed + 5)
    samples = rng.choice(len(train), cfg["gt_samples"][name], replace=False)
    truth = leave_one_out(fm, traj, x, y, qxt, qyt, samples)
    rows = [row("ground_truth", "trajectory LOO (truth)", name, "seconds", time.time() - t, seed)]
    sub = Split(train.x, train.y, train.ids, train.true_y)
    for count in cfg["gt_counts"]:
        steps, thetas, ck_lrs = traj.checkpoints(count)
        states = [{k: v.detach().float() for k, v in fm.unflatten(th).items()} for th in thetas]
        for m in cfg["gt_methods"]:
            t = time.time()
            ctx = make_context(model_fn(), states, steps, ck_lrs, sub, ScoreSettings(device="cpu"))
            est = run_method(ctx, m, qx, qy, need_self=False)["influence"][samples]
            secs = time.time() - t
            s = f"{name}, {count} ckpts"
            rows += [row("ground_truth", m, s, "spearman", spearmanr(est, truth)[0], seed),
                     row("ground_truth", m, s, "pearson", pearsonr(est, truth)[0], seed),
                     row("ground_truth", m, s, "seconds", secs, seed)]
    return rows, {}


# --- worker entry points (importable by name from a spawned process, whatever the main module) ---
def init_worker():
    from diffin_core.engine.threads import configure
    configure(1)            # one torch thread per worker (the pool shares the CPUs), passive wait


def run_job(job):
    kind, kwargs = job
    t = time.time()
    rows, extra = globals()[kind](**kwargs)
    return kind, kwargs, rows, extra, time.time() - t


def _timed(item):
    job, args = item
    t = time.time()
    return args, job(*args), time.time() - t


def pool_map(job, jobs, workers: int = 2):
    """Run ``job(*args)`` for every args tuple in ``jobs`` in spawned worker processes (one torch
    thread each, a fresh process per job); yields (args, job's result, seconds) as they finish.
    ``job`` must be importable by name in the workers (a module-level function of the script)."""
    import multiprocessing as mp
    jobs = list(jobs)
    with mp.get_context("spawn").Pool(max(1, min(workers, len(jobs))), initializer=init_worker,
                                      maxtasksperchild=1) as pool:
        yield from pool.imap_unordered(_timed, [(job, args) for args in jobs])
