"""The recipes people train with, at the spacing people save: diffin and TracIn vs true leave-one-out.

Each row trains the digits MLP 64-32-10 (tanh; 1,200 samples, 10% flipped labels, batch 32,
10 epochs = 380 steps, warm-up + cosine) with torch's own optimiser, records it with the
documented path (Recorder, ``rec.step(batch_ids=idx)``, one checkpoint per epoch = every 38
steps; clipping through ``rec.clip_grad_norm_`` and the loss through ``Recorder(loss=...)`` when
the Recorder has them), scores the recorded folder in float32 as a user would
(``manifest_context`` + ``run_method``), and compares with trajectory leave-one-out in float64
on 45 training samples: retrain with the same initial weights, batch order, dropout masks and
schedule, with z's loss weight 0 in every batch holding it (the batch keeps its denominator).
Truth = L_Q(theta_T without z) - L_Q(theta_T), L_Q the training loss on the query split.

    python benchmarks/recipes.py [--seeds 0 1] [--only adamw [--exact]] [--samples 45]
        -> benchmarks/results/recipes.csv + recipes.png  (--only: reruns those rows, keeps the rest;
           --exact: only the recipe named exactly so, e.g. "dropout-0.2" without "sgd-dropout-0.2")

CSV columns: recipe, seed, diffin (Spearman), tracin (Spearman; TracIn's Adam variant for Adam and
RMSprop recipes), tracin_method, ratio (median |diffin| / median |truth|), seconds (diffin's
scoring), tracin_seconds (TracIn's, the same run), truth_seconds, warnings (every RecipeWarning line, and the Adam self-check), refused (diffin's
one-line refusal, if any), target_met ("yes": Spearman >= 0.9 and ratio in [0.8, 1.25], or a
one-line refusal; else "NO"); for AdamW recipes also linear_diffin, linear_ratio, linear_seconds: the
same run scored by the replay's linear response (adam_batches.OWN_TERM off: without each sample's
own term of Adam's moments removed exactly), in the same process right after diffin's score.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from diffin_core.errors import DiffinError  # noqa: E402
from diffin_core.tasks.truth import batch_order, digits_case, warmup_cosine  # noqa: E402

N_TRAIN, BATCH, EPOCHS, EVERY = 1200, 32, 10, 38


@dataclass
class Spec:
    """One training recipe of the table."""
    name: str
    optimizer: str = "AdamW"            # AdamW, SGD, RMSprop
    groups: str = "one"                 # one | nodecay (biases wd 0, lr x3) | head (head lr x10)
    clip: str | None = None             # None | half (max_norm = median unclipped norm) | every
    dropout: float = 0.0
    smoothing: float = 0.0
    accumulate: int = 1                 # micro-batches per optimiser step (the batch split evenly)
    notes: list = field(default_factory=list)


SPECS = [
    Spec("sgd-momentum (control)", "SGD"),
    Spec("adamw-one-group"),
    Spec("adamw-nodecay-groups-lr", groups="nodecay"),
    Spec("sgd-head-lr-10x", "SGD", groups="head"),
    Spec("clip-half-steps", clip="half"),
    Spec("clip-every-step", clip="every"),
    Spec("dropout-0.2", dropout=0.2),
    Spec("sgd-dropout-0.2", "SGD", dropout=0.2),
    Spec("label-smoothing-0.1", smoothing=0.1),
    Spec("sgd-label-smoothing-0.1", "SGD", smoothing=0.1),
    Spec("grad-accumulation-2x16", accumulate=2),
    Spec("rmsprop", "RMSprop"),
    Spec("all-at-once (fine-tuning)", groups="nodecay", clip="half", dropout=0.1, smoothing=0.1, accumulate=2),
]


def model_fn(spec: Spec, seed: int):
    def build():
        torch.manual_seed(1000 + seed)
        layers = [nn.Flatten(), nn.Linear(64, 32), nn.Tanh()]
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        return nn.Sequential(*layers, nn.Linear(32, 10)).double()
    return build


def optimizer(spec: Spec, model: nn.Module):
    body, head = model[1], model[-1]
    if spec.optimizer == "SGD":
        lr, kw = 0.05, dict(momentum=0.9, weight_decay=5e-4)
        if spec.groups == "head":
            return torch.optim.SGD([{"params": body.parameters(), "lr": lr},
                                    {"params": head.parameters(), "lr": 10 * lr}], lr=lr, **kw)
        return torch.optim.SGD(model.parameters(), lr=lr, **kw)
    if spec.optimizer == "RMSprop":
        return torch.optim.RMSprop(model.parameters(), lr=3e-3)
    lr, wd = 1e-2, 0.05
    if spec.groups == "nodecay":
        weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
        return torch.optim.AdamW([{"params": weights, "weight_decay": wd, "lr": lr},
                                  {"params": biases, "weight_decay": 0.0, "lr": 3 * lr}], lr=lr)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)


def _supports(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def train(spec: Spec, seed: int, x, y, batches, drop: int | None = None, record_dir=None,
          max_norm: float | None = None, norms: list | None = None):
    """Train with the recipe; ``drop``: a training row whose loss weight is 0 (same forward, same
    dropout masks: each step's RNG is seeded by the step). Returns the model (eval mode)."""
    model = model_fn(spec, seed)()
    model.train()
    opt = optimizer(spec, model)
    sched = warmup_cosine(opt, len(batches))
    loss_mod = nn.CrossEntropyLoss(label_smoothing=spec.smoothing)
    rec = None
    if record_dir is not None:
        from diffin_core.project.checkpoints import Recorder
        kw = {"loss": loss_mod} if _supports(Recorder.__init__, "loss") else {}
        rec = Recorder(record_dir, model, opt, train_size=len(y), every=EVERY, **kw).__enter__()
    weights = torch.ones(len(y), dtype=torch.float64)
    if drop is not None:
        weights[drop] = 0.0
    params = list(model.parameters())
    for s, idx in enumerate(batches):
        opt.zero_grad()
        torch.manual_seed(10_000 * seed + s)             # the step's dropout masks
        for part in np.array_split(idx, spec.accumulate):
            t = torch.as_tensor(part)
            per = F.cross_entropy(model(x[t]), y[t], reduction="none", label_smoothing=spec.smoothing)
            ((per * weights[t]).sum() / len(idx)).backward()
        if norms is not None:
            norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))
        if max_norm is not None:
            if rec is not None and hasattr(rec, "clip_grad_norm_"):
                rec.clip_grad_norm_(params, max_norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        sched.step()
        if rec is not None:
            rec.step(batch_ids=idx)
    if rec is not None:
        rec.__exit__(None, None, None)
    return model.eval()


def query_loss(spec: Spec, model, qx, qy) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(qx), qy, label_smoothing=spec.smoothing))


def case(spec: Spec, seed: int, folder: Path, samples: int):
    train_split, query = digits_case(noise=0.1, n_train=N_TRAIN, seed=seed)
    x, y = torch.as_tensor(train_split.x, dtype=torch.float64), torch.as_tensor(train_split.y)
    qx, qy = torch.as_tensor(query.x, dtype=torch.float64), torch.as_tensor(query.y)
    batches = batch_order(N_TRAIN, BATCH, EPOCHS, seed=seed)
    max_norm = None
    if spec.clip:
        norms: list[float] = []
        train(spec, seed, x, y, batches, norms=norms)
        max_norm = float(np.median(norms)) if spec.clip == "half" else 0.5 * float(np.min(norms))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base_model = train(spec, seed, x, y, batches, record_dir=folder, max_norm=max_norm)
    rec_warnings = [str(w.message) for w in caught if "Warning" in type(w.message).__name__]
    base = query_loss(spec, base_model, qx, qy)
    idx = np.random.default_rng(seed + 1).choice(N_TRAIN, samples, replace=False)

    def truth():
        return np.array([query_loss(spec, train(spec, seed, x, y, batches, drop=int(z), max_norm=max_norm), qx, qy)
                         - base for z in idx])
    return dict(train=train_split, query=query, samples=idx, truth=truth, recorder_warnings=rec_warnings,
                max_norm=max_norm)


def score(spec: Spec, seed: int, folder: Path, c: dict, method: str, own: bool = True):
    """(influence of the truth's samples or None, warning lines, refusal line or None, seconds).
    ``own`` False: the AdamW replay's linear response (adam_batches.OWN_TERM off), for comparison."""
    from diffin_core.engine import adam_batches
    from diffin_core.project.checkpoints import read_manifest
    from diffin_core.methods import ScoreSettings
    from diffin_core.run.context import manifest_context
    from diffin_core.run.scoring import run_method
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keep = getattr(adam_batches, "OWN_TERM", None)
        if keep is not None:
            adam_batches.OWN_TERM = own
        try:
            m = read_manifest(folder / "checkpoints" / "manifest.json")
            ctx = manifest_context(model_fn(spec, seed)(), m, c["train"], ScoreSettings(device="cpu"))
            est = run_method(ctx, method, c["query"].x, c["query"].y, need_self=False)["influence"][c["samples"]]
            refused = None
        except DiffinError as e:
            est, refused = None, str(e)
        finally:
            if keep is not None:
                adam_batches.OWN_TERM = keep
    lines = list(dict.fromkeys(str(w.message) for w in caught if "Warning" in type(w.message).__name__))
    return est, lines, refused, time.time() - t0


def row(spec: Spec, seed: int, samples: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        c = case(spec, seed, folder, samples)
        est, lines, refused, secs = score(spec, seed, folder, c, "diffin")
        peer = "tracin-adam" if spec.optimizer in ("AdamW", "RMSprop") else "tracin"
        t_est, _l, t_refused, t_secs = score(spec, seed, folder, c, peer)
        if t_est is None and peer == "tracin-adam":
            peer = "tracin"
            t_est, _l, t_refused, t_secs = score(spec, seed, folder, c, peer)
        lin_est, lin_secs = None, float("nan")        # the Adam replay's linear response, same run and load
        if spec.optimizer == "AdamW" and est is not None:
            lin_est, _l, _r, lin_secs = score(spec, seed, folder, c, "diffin", own=False)
        t1 = time.time()            # the truth only where something scored (a refused recipe needs none)
        truth = c["truth"]() if (est is not None or t_est is not None) else np.full(samples, np.nan)
        truth_s = time.time() - t1
    rho = float(spearmanr(est, truth)[0]) if est is not None else float("nan")
    ratio = float(np.median(np.abs(est)) / np.median(np.abs(truth))) if est is not None else float("nan")
    met = ("yes (refused)" if refused else "yes" if (rho >= 0.9 and 0.8 <= ratio <= 1.25) else "NO")
    notes = [n for n in dict.fromkeys(c["recorder_warnings"] + lines) if "torch.jit" not in n]   # torch's own noise
    out = dict(recipe=spec.name, seed=seed, diffin=round(rho, 4),
               tracin=round(float(spearmanr(t_est, truth)[0]), 4) if t_est is not None else float("nan"),
               tracin_method=peer, ratio=round(ratio, 4), seconds=round(secs, 1), tracin_seconds=round(t_secs, 1), truth_seconds=round(truth_s, 1),
               warnings=" | ".join(n.replace("\n", " ") for n in notes), refused=(refused or "").replace("\n", " "),
               target_met=met)
    if lin_est is not None:
        out.update(linear_diffin=round(float(spearmanr(lin_est, truth)[0]), 4),
                   linear_ratio=round(float(np.median(np.abs(lin_est)) / np.median(np.abs(truth))), 4),
                   linear_seconds=round(lin_secs, 1))
    print({k: v for k, v in out.items() if k != "warnings"}, "\n   warnings:", out["warnings"][:400], flush=True)
    return out


def main(seeds=(0, 1), only: str | None = None, samples: int = 45, out: Path = HERE / "results",
         exact: bool = False) -> pd.DataFrame:
    rows = [row(spec, seed, samples) for spec in SPECS
            if not only or (only == spec.name if exact else only in spec.name) for seed in seeds]
    df = pd.DataFrame(rows)
    path = out / "recipes.csv"
    if only and path.is_file():
        old = pd.read_csv(path, keep_default_na=False)
        order = [s.name for s in SPECS]
        df = pd.concat([old[~old.recipe.isin(df.recipe)], df])
        df = df.assign(_o=df.recipe.map(lambda r: order.index(r) if r in order else len(order)))
        df = df.sort_values(["_o", "seed"], kind="stable").drop(columns="_o")
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, float_format="%.4f")
    plot(df, out / "recipes.png")
    return df


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(df.recipe))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    xs = np.arange(len(names))
    for i, (col, label) in enumerate((("diffin", "diffin"), ("tracin", "TracIn (Adam variant for Adam)"))):
        vals = pd.to_numeric(df[col], errors="coerce")
        mean = [float(vals[df.recipe == r].mean()) for r in names]
        ax.bar(xs + (i - 0.5) * 0.4, np.nan_to_num(mean, nan=0.0), 0.4, label=label)
        for j, r in enumerate(names):
            ax.scatter([xs[j] + (i - 0.5) * 0.4] * int((df.recipe == r).sum()), vals[df.recipe == r], s=8, c="k")
    for j, r in enumerate(names):
        if (df[df.recipe == r].refused.astype(str).str.len() > 0).any():
            ax.text(xs[j], 0.05, "refused", rotation=90, ha="center", fontsize=8)
    ax.axhline(0.9, color="k", lw=0.6, ls="--")
    ax.set_ylabel("Spearman vs true leave-one-out")
    ax.set_ylim(min(0.0, float(pd.to_numeric(df.tracin, errors="coerce").min()) - 0.05), 1.0)
    ax.legend(fontsize=8, loc="lower left")
    ratio = pd.to_numeric(df.ratio, errors="coerce")
    bx.bar(xs, np.nan_to_num([float(ratio[df.recipe == r].mean()) for r in names], nan=0.0), 0.6, color="C2")
    bx.axhspan(0.8, 1.25, color="k", alpha=0.08)
    bx.set_ylabel("median |diffin| / median |truth|")
    for a in (ax, bx):
        a.set_xticks(xs, [n.replace(" (", "\n(") for n in names], rotation=60, ha="right", fontsize=7)
    fig.suptitle("Recipes at one checkpoint per epoch (digits MLP, 380 steps, 2 seeds; dots = seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--only", help="rerun only recipes whose name contains this; other CSV rows kept")
    ap.add_argument("--exact", action="store_true", help="--only names one recipe exactly")
    ap.add_argument("--samples", type=int, default=45)
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for recipes.csv / .png")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(main(tuple(args.seeds), args.only, args.samples, args.out, args.exact).drop(columns=["warnings"]).to_string())
