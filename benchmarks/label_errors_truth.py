"""How close is Diff-In's leave-one-out estimate to the truth on the memorisation case?

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/label_errors_truth.py     # ~5 min, 1 core

Development seed 9 of benchmarks/label_errors.py at 20% flips (never an evaluation seed): the
same MLP, recipe and 8 checkpoints. Truth: retrain without z (same init, same batches, z's weight
0; trajectory-specific leave-one-out) for 12 flipped and 12 clean samples, and read z's logits at
every checkpoint. Estimates, at every checkpoint k (step > 0), with the product's settings and
with 40 / 100 Lanczos steps:
  * loss + SI_k (the product's label_issue reading: loss-linear),
  * -log softmax(logits + estimated LOO logit shift)[label] (loo_logits.py: logit-linear),
and the estimated logit shift itself against the true one (cosine over all 24 x 10 entries, and
the ratio of norms: > 1 = the estimate overshoots).
Writes results/label_errors_truth.csv and .png (``--plot``: only redraw the png from the csv).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

SEED, NOISE, PER_CLASS, LANCZOS = 9, 0.2, 12, (10, 40, 100)


def plot(table, path):
    """Left: Spearman with the true LOO loss per checkpoint; right: estimated / true shift norm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, color in (("loss", "grey"), ("loss + SI (the rule's reading)", "tab:blue"), ("LOO logits", "tab:red")):
        for r, style in ((10, "-"), (40, "--"))[:1 if name == "loss" else 2]:
            part = table[(table.estimate == name) & (table.lanczos == r)]
            label = name if name == "loss" else f"{name}, {r} Lanczos"
            a.plot(part.step, part.spearman_vs_true, style, color=color, marker="o", label=label)
    a.set_xlabel("checkpoint step (k* = 229)")
    a.set_ylabel("Spearman with the true LOO loss (24 samples)")
    a.legend(fontsize=7)
    for r in sorted(table.lanczos.unique()):
        part = table[(table.estimate == "logit shift vs true") & (table.lanczos == r)]
        b.plot(part.step, part.shift_norm_ratio, marker="o", label=f"{r} Lanczos steps")
    b.axhline(1.0, color="k", lw=0.8)
    b.set_xlabel("checkpoint step")
    b.set_ylabel("|estimated LOO logit shift| / |true|")
    b.legend(fontsize=8)
    fig.suptitle("Diff-In's leave-one-out estimate vs retraining (dev seed 9, 20% flips)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    import pandas as pd
    if "--plot" in sys.argv:
        plot(pd.read_csv(HERE / "results" / "label_errors_truth.csv"), HERE / "results" / "label_errors_truth.png")
        return
    import torch
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score
    import label_errors as le
    from _bench import train_sgd
    from diffin_core.project.data import Split
    from diffin_core.methods.loo_logits import loo_cross_entropy, loo_logit_shift
    from diffin_core.methods import METHODS, ScoreSettings
    from diffin_core.engine.models import MLP
    from diffin_core.project.sample import flip_labels
    from diffin_core.run.context import make_context
    cfg = le.FULL
    xtr, ytr, xq, yq = le.data(cfg)
    noisy, flipped = flip_labels(ytr, NOISE, seed=100 + SEED)
    bad = np.zeros(len(noisy), bool)
    bad[flipped] = True
    rng = np.random.default_rng(0)
    samples = np.concatenate([rng.choice(np.flatnonzero(bad), PER_CLASS, replace=False),
                              rng.choice(np.flatnonzero(~bad), PER_CLASS, replace=False)])
    _model, states, steps, lrs = le.train(xtr, noisy, SEED, cfg)
    xs = torch.as_tensor(xtr[samples])
    ys = noisy[samples]
    true = np.zeros((len(samples), len(steps), 10))
    net = MLP(784, cfg["hidden"], 10)
    for i, z in enumerate(samples):                     # trajectory-specific leave-one-out
        w = np.ones(len(noisy), np.float32)
        w[z] = 0.0
        torch.manual_seed(SEED)
        _m, st, _s, _l = train_sgd(MLP(784, cfg["hidden"], 10), xtr, noisy, SEED, cfg, weights=w)
        for k, s in enumerate(st):
            net.load_state_dict(s)
            with torch.no_grad():
                true[i, k] = net.eval()(xs[i:i + 1]).double().numpy()[0]
        print(f"retrained without sample {i + 1}/{len(samples)}", flush=True)
    split = Split(xtr, noisy, np.arange(len(noisy)), ytr)
    rows = []
    for r in LANCZOS:
        ctx = make_context(MLP(784, cfg["hidden"], 10), states, steps, lrs, split,
                           ScoreSettings(device="cpu", lanczos_steps=r))
        plan = METHODS["diffin"]().prepare(ctx, xq, yq)
        x, y = ctx.tensors(xtr[samples], ys)
        for k in range(1, ctx.m):
            with torch.no_grad():
                logits = ctx.fm.logits(ctx.thetas[k], x).double().numpy()
            shift = loo_logit_shift(ctx, plan, x, y, k).double().numpy()
            p = torch.softmax(torch.as_tensor(logits), -1).numpy()
            loss = loo_cross_entropy(logits, 0 * logits, ys)
            si = ((p - np.eye(10)[ys]) * shift).sum(1)
            truth = loo_cross_entropy(true[:, k], 0 * logits, ys)
            ts = true[:, k] - logits
            est = {"loss": loss, "loss + SI (the rule's reading)": loss + si,
                   "LOO logits": loo_cross_entropy(logits, shift, ys), "true LOO loss": truth}
            for name, v in est.items():
                rows.append(dict(lanczos=r, checkpoint=k, step=steps[k], estimate=name,
                                 spearman_vs_true=spearmanr(v, truth)[0], auroc_24=roc_auc_score(bad[samples], v),
                                 mean_flipped=v[:PER_CLASS].mean(), mean_clean=v[PER_CLASS:].mean()))
            rows.append(dict(lanczos=r, checkpoint=k, step=steps[k], estimate="logit shift vs true",
                             shift_cosine=float((ts * shift).sum() / np.linalg.norm(ts) / np.linalg.norm(shift)),
                             shift_norm_ratio=float(np.linalg.norm(shift) / np.linalg.norm(ts))))
            print(f"lanczos {r} checkpoint {k} done", flush=True)
    table = pd.DataFrame(rows)
    (HERE / "results").mkdir(exist_ok=True)
    tmp = HERE / "results" / "label_errors_truth.csv.tmp"
    table.to_csv(tmp, index=False, float_format="%.4f")
    tmp.replace(HERE / "results" / "label_errors_truth.csv")
    plot(table, HERE / "results" / "label_errors_truth.png")
    print(table.to_string())


if __name__ == "__main__":
    main()
