"""Label errors the model has memorised: AUROC and recall@k of every label-issue method.

    nice -n 10 python benchmarks/label_errors.py            # ~10-15 min on 2 shared CPU cores
    python benchmarks/label_errors.py --quick               # 1 seed, 10% noise, small: results/quick/
    python benchmarks/label_errors.py --study               # dev seed 9: diffin's rule vs the candidate
    python benchmarks/label_errors.py --methods "diffin mean LOO loss over checkpoints" \
        --name label_errors_candidate                       # the candidate alone on seeds 0-2
    python benchmarks/label_errors.py --study --seeds 9 10 11 12 13 17 28 --noises 0.2 \
        --methods "diffin rule alone" "diffin rule, 40 Lanczos steps" \
        "diffin LOO logits at best checkpoint" mean-loss cleanlab-cv \
        --name label_errors_dev_seeds                       # candidates vs peers on 7 dev seeds
    python benchmarks/label_errors.py --methods "diffin LOO logits at best checkpoint" \
        "diffin LOO logits at final checkpoint" --name label_errors_logits   # ... and on seeds 0-2

The case (built for issue 9): MNIST-5k, 1,000 training digits with 10% or 20% of the labels
moved to a random other class (seeds 0, 1, 2), a tanh MLP 784-64-64-10 (55k
parameters) trained long (100 epochs, batch 64, SGD with cosine lr from 0.3, 8 evenly spaced
checkpoints), so that it fits >= 90% of its training labels, flips included (the ``fit`` rows
report both rates per setting). The query set (for the influence columns only) is 500 clean
held-out digits. Every method runs with the product's default ScoreSettings, float32, CPU.

Methods: every registered method with a label_issue (diffin = the product's rule: the
estimated leave-one-out loss at the checkpoint with the lowest query loss, label_issue.py),
plus two ablations of it: ``diffin final LOO loss`` (final loss + Diff-In self-influence, the
rule before issue 9), ``loss at best checkpoint`` (the same checkpoint, no self-influence) and the
candidate ``diffin mean LOO loss over checkpoints`` (label_issue.trajectory_mean_loo_loss). The
candidates ``diffin LOO logits at best / final checkpoint`` (loo_logits.py) read Diff-In's
leave-one-out change through the logits: -log softmax(logits + estimated LOO logit shift)[label]
(cleanlab's self-confidence on Diff-In's out-of-sample probabilities ranks the same way).
``diffin rule alone`` is diffin's label_issue without its ablations, ``diffin rule, 40 Lanczos
steps`` the same with a 4x higher-rank Hessian view (for the development-seed study).
cleanlab-cv retrains the same recipe on 5 folds. Metrics: AUROC of label_issue against the
flipped mask; recall@k = the fraction of the flips among the k highest label_issue, k = the
number flipped.
Writes results/label_errors.csv (method, setting, metric, mean, std over seeds) and .png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

FULL = dict(n_train=1000, n_query=500, hidden=(64, 64), epochs=100, batch=64, lr=0.3, ckpts=8,
            seeds=[0, 1, 2], noises=[0.1, 0.2], folds=5)
QUICK = dict(FULL, n_train=600, n_query=200, epochs=60, ckpts=6, seeds=[0], noises=[0.1], folds=3)
CANDIDATE = "diffin mean LOO loss over checkpoints"     # label_issue.trajectory_mean_loo_loss
LOGITS_BEST = "diffin LOO logits at best checkpoint"    # loo_logits.early_stopped_loo_logit_loss
LOGITS_FINAL = "diffin LOO logits at final checkpoint"  # loo_logits.loo_logits at the last checkpoint
RULE = "diffin rule alone"                              # diffin's label_issue without its ablations
RULE40 = "diffin rule, 40 Lanczos steps"                # the same with a 4x higher-rank Hessian view
METHODS = ["diffin", "tracin", "influence-function", "loss", "margin", "cleanlab", "mean-loss", "aum",
           "forgetting", "cleanlab-cv"]


def data(cfg):
    from diffin_core.project.sample import RAW
    with np.load(RAW) as d:
        x, y = d["X"].astype(np.float32).reshape(-1, 784) / 255.0, d["y"].astype(np.int64)
    perm = np.random.default_rng(1234).permutation(len(y))
    tr, q = perm[:cfg["n_train"]], perm[cfg["n_train"]:cfg["n_train"] + cfg["n_query"]]
    return x[tr], y[tr], x[q], y[q]


def train(x, y, seed, cfg, keep_states=True):
    """The memorisation recipe: (model, states, steps, lrs) with cfg['ckpts'] checkpoints."""
    import torch
    from diffin_core.engine.models import MLP
    from _bench import train_sgd
    torch.manual_seed(seed)
    return train_sgd(MLP(784, cfg["hidden"], 10), x, y, seed, cfg, keep_states=keep_states)


def job(noise, seed, cfg, methods=None):
    import torch
    from sklearn.metrics import roc_auc_score
    from diffin_core.project.data import Split
    from diffin_core.methods.label_issue import (best_checkpoint, checkpoint_logits, early_stopped_loo_loss, losses_from_logits,
                                         query_loss_by_checkpoint, trajectory_mean_loo_loss)
    from diffin_core.methods import METHODS as METHOD_CLASSES
    from diffin_core.methods import ScoreSettings
    from diffin_core.engine.models import MLP
    from diffin_core.project.sample import flip_labels
    from diffin_core.run.scoring import run_method
    from diffin_core.run.context import make_context
    xtr, ytr, xq, yq = data(cfg)
    noisy, flipped = flip_labels(ytr, noise, seed=100 + seed)
    bad = np.zeros(len(noisy), bool)
    bad[flipped] = True
    setting = f"noise {int(round(noise * 100))}%"
    rows = []

    def add(method, metric, value):
        rows.append({"task": "label_errors", "method": method, "setting": setting, "metric": metric,
                     "value": float(value), "seed": seed})

    model, states, steps, lrs = train(xtr, noisy, seed, cfg)
    with torch.no_grad():
        fitted = model(torch.as_tensor(xtr)).argmax(1).numpy() == noisy
    add("(model)", "fit_all_labels", fitted.mean())
    add("(model)", "fit_flipped_labels", fitted[bad].mean())
    split = Split(xtr, noisy, np.arange(len(noisy)), ytr)
    k = int(bad.sum())

    def ctx_():
        c = make_context(MLP(784, cfg["hidden"], 10), states, steps, lrs, split, ScoreSettings(device="cpu"))
        c.trainer = lambda x, y, s: train(x, y, s, cfg, keep_states=False)[0]
        return c

    def report(method, score, secs):
        score = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=-np.inf)
        add(method, "auroc", roc_auc_score(bad, score))
        add(method, "recall_at_k", bad[np.argsort(-score, kind="stable")[:k]].mean())
        add(method, "seconds", secs)

    for m in methods or METHODS:
        t = time.time()
        if m == CANDIDATE:                   # the candidate rule alone (--methods), without diffin's run
            report(m, trajectory_mean_loo_loss(METHOD_CLASSES["diffin"](), ctx_(), xq, yq), time.time() - t)
            continue
        if m in (RULE, RULE40):
            c = ctx_()
            if m == RULE40:
                import dataclasses
                c = dataclasses.replace(c, settings=dataclasses.replace(c.settings, lanczos_steps=40))
            meth = METHOD_CLASSES["diffin"]()
            k_best = best_checkpoint(query_loss_by_checkpoint(c, xq, yq), c.steps)
            full = run_method(c, "diffin", xq, yq) if k_best == c.m - 1 else None
            score = full["label_issue"] if full is not None else early_stopped_loo_loss(meth, c, xq, yq, None)[0]
            report(m, score, time.time() - t)
            continue
        if m in (LOGITS_BEST, LOGITS_FINAL):
            from diffin_core.methods.loo_logits import early_stopped_loo_logit_loss, loo_cross_entropy, loo_logits
            if m == LOGITS_BEST:
                score = early_stopped_loo_logit_loss(METHOD_CLASSES["diffin"](), ctx_(), xq, yq)[0]
            else:
                score = loo_cross_entropy(*loo_logits(METHOD_CLASSES["diffin"](), ctx_(), xq, yq), noisy)
            report(m, score, time.time() - t)
            continue
        try:
            out = run_method(ctx_(), m, xq, yq)
        except Exception as e:                      # report and go on with the other methods
            print(f"{m} failed on {setting} seed {seed}: {type(e).__name__}: {e}", flush=True)
            continue
        report(m, out["label_issue"], time.time() - t)
        if m == "diffin":
            p = out["probs"]
            final = -np.log(np.clip(p[np.arange(len(noisy)), noisy], 1e-12, None)) + out["self_influence"]
            report("diffin final LOO loss", final, time.time() - t)
            c = ctx_()
            k_best = best_checkpoint(query_loss_by_checkpoint(c, xq, yq), c.steps)
            add("(model)", "best_checkpoint_step", c.steps[k_best])
            report("loss at best checkpoint", losses_from_logits(checkpoint_logits(c, [k_best]), noisy)[0], 0.0)
            # the two candidate rules (label_issue.py), whichever the product does not use
            t = time.time()
            c = ctx_()
            if getattr(METHOD_CLASSES["diffin"], "label_rule", "") != "trajectory":
                report(CANDIDATE, trajectory_mean_loo_loss(
                    METHOD_CLASSES["diffin"](), c, xq, yq), time.time() - t)
            else:
                out_c = run_method(c, "diffin", xq, yq)
                report("diffin LOO loss at best checkpoint", early_stopped_loo_loss(
                    METHOD_CLASSES["diffin"](), ctx_(), xq, yq, out_c)[0], time.time() - t)
    return rows


def plot(table, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, metric in zip(axes, ["auroc", "recall_at_k"]):
        part = table[table.metric == metric]
        settings = list(dict.fromkeys(part.setting))
        methods = list(dict.fromkeys(part.method))
        h = 0.8 / max(len(settings), 1)
        for i, s in enumerate(settings):
            r = part[part.setting == s].set_index("method").reindex(methods)
            ax.barh(np.arange(len(methods)) + i * h, r["mean"], h, xerr=r["std"], label=s, capsize=2)
        ax.set_yticks(np.arange(len(methods)) + 0.4 - h / 2)
        ax.set_yticklabels(methods, fontsize=8)
        lo = float(np.nanmin(part["mean"] - part["std"]))
        ax.set_xlim(max(0.0, lo - 0.02), 1.0)
        ax.set_title(f"{metric}: memorised label errors (MLP fits >= 90% of labels)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    from _bench import pool_map
    from run import aggregate, markdown
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--study", action="store_true",
                    help="dev seed 9, diffin and its candidate rules only -> results/label_errors_study.csv")
    ap.add_argument("--methods", nargs="*", default=None,
                    help=f"only these (default: all, with diffin's ablations); {CANDIDATE!r} = the candidate alone")
    ap.add_argument("--name", default=None, help="output file stem (default label_errors)")
    ap.add_argument("--seeds", nargs="*", type=int, default=None, help="seeds (default: 0 1 2; --study: 9)")
    ap.add_argument("--noises", nargs="*", type=float, default=None, help="flip rates (default: 0.1 0.2)")
    a = ap.parse_args(argv)
    cfg = QUICK if a.quick else FULL
    out = HERE / "results" / ("quick" if a.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    methods, name = a.methods, a.name or "label_errors"
    if a.study:
        cfg, methods, name = dict(cfg, seeds=[9]), a.methods or ["diffin", "mean-loss"], a.name or "label_errors_study"
    if a.seeds:
        cfg = dict(cfg, seeds=a.seeds)
    if a.noises:
        cfg = dict(cfg, noises=a.noises)
    jobs = [(noise, seed, cfg, methods) for seed in cfg["seeds"] for noise in cfg["noises"]]
    rows, started = [], time.time()
    for args, r, secs in pool_map(job, jobs, a.workers):
        rows += r
        print(f"[{time.time() - started:6.0f}s] noise {args[0]} seed {args[1]} done in {secs:.0f}s", flush=True)
        table = aggregate(rows)["label_errors"]
        table.to_csv(out / f"{name}.csv", index=False)
        if not a.study and not a.methods:
            plot(table, out / f"{name}.png")
    for metric in ("auroc", "recall_at_k", "fit_all_labels", "fit_flipped_labels", "seconds"):
        print(f"### {metric}\n\n{markdown(table, metric)}\n")


if __name__ == "__main__":
    main()
