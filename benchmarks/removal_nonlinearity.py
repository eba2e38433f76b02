"""Why AdamW + label smoothing misses the size target: is removing a sample linear in its weight?

The recipe table's "label-smoothing-0.1" row ranks at 0.99 but its sizes are 0.73-0.74x true
leave-one-out. This script takes that run (the digits MLP 64-32-10, tanh, 1,200 samples with 10%
flipped labels, batch 32, 10 epochs = 380 steps, warm-up + cosine, AdamW lr 1e-2 wd 0.05; the
same data, initial weights, batch order and samples as benchmarks/recipes.py) with its own AdamW
and SGD written out in float64, and for each of the 45 samples z measures the query loss change
    rem  removing z (its loss weight 0 in every batch holding it, the batch keeps its denominator)
    lin  the exact linear response: (L(w_z = 1 - e) - L) / e, e = 1e-4 (what diffin estimates)
    gdr  g_Q . (theta_T without z - theta_T): the first order in the true weight change
and, for AdamW + smoothing (``--parts``), which part of the optimiser carries the difference:
    fixv_rem, fixv_lin   removal and linear response with Adam's v frozen to the base run's
    src  the linear response to the direct quadratic term of v, (1 - b2) (g_z / B)^2 added to v at
         each step holding z (forward difference, delta 1e-3): the hypothesis that the linear
         response misses mainly this term of v.

    python benchmarks/removal_nonlinearity.py [--seeds 0 1] [--samples 45] [--parts 20]
        -> benchmarks/results/removal_nonlinearity.csv (one row per recipe, seed and sample)
           + removal_nonlinearity_summary.csv (per recipe and seed)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from torch.func import functional_call, grad, jvp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from diffin_core.tasks.truth import batch_order, digits_case, warmup_cosine  # noqa: E402

N_TRAIN, BATCH, EPOCHS = 1200, 32, 10
B1, B2, EPS, WD = 0.9, 0.999, 1e-8, 0.05            # AdamW (benchmarks/recipes.py)
SGD_LR, SGD_MOM, SGD_WD = 0.05, 0.9, 5e-4           # SGD momentum (the recipe table's control)
RECIPES = {"adamw+smoothing-0.1": ("adamw", 0.1), "adamw": ("adamw", 0.0), "sgd+smoothing-0.1": ("sgd", 0.1)}


class Case:
    def __init__(self, seed: int, opt: str, smoothing: float):
        self.opt, self.sm = opt, smoothing
        train, query = digits_case(noise=0.1, n_train=N_TRAIN, seed=seed)
        self.x, self.y = torch.as_tensor(train.x, dtype=torch.float64), torch.as_tensor(train.y)
        self.qx, self.qy = torch.as_tensor(query.x, dtype=torch.float64), torch.as_tensor(query.y)
        self.batches = batch_order(N_TRAIN, BATCH, EPOCHS, seed=seed)
        torch.manual_seed(1000 + seed)                   # benchmarks/recipes.py's initial weights
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
        self.names = [n for n, _ in self.net.named_parameters()]
        self.shapes = [p.shape for _, p in self.net.named_parameters()]
        self.theta0 = torch.cat([p.detach().reshape(-1) for p in self.net.parameters()])
        dummy = torch.optim.AdamW([torch.zeros(1)], lr=1e-2 if opt == "adamw" else SGD_LR)
        sched, self.lrs = warmup_cosine(dummy, len(self.batches)), []
        for _ in self.batches:
            self.lrs.append(dummy.param_groups[0]["lr"])
            dummy.step()
            sched.step()
        self.batch_grad = grad(lambda t, xb, yb, wb: (self.losses(t, xb, yb) * wb).sum() / len(wb))   # the batch's own size
        self.one_grad = grad(lambda t, xi, yi: self.losses(t, xi[None], yi[None])[0])
        self.query_grad = grad(lambda t: self.losses(t, self.qx, self.qy).mean())
        self.v_base: list[torch.Tensor] = []
        self.theta_T = self.train(keep_v=True)
        self.L0 = self.qloss(self.theta_T)

    def losses(self, theta, x, y):
        params, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = int(np.prod(s))
            params[n] = theta[i:i + k].view(s)
            i += k
        return F.cross_entropy(functional_call(self.net, params, (x,)), y, reduction="none",
                               label_smoothing=self.sm)

    def qloss(self, theta) -> float:
        return float(self.losses(theta, self.qx, self.qy).mean())

    def train(self, z: int | None = None, w: float = 1.0, fix_v: bool = False, src: float = 0.0,
              keep_v: bool = False) -> torch.Tensor:
        """theta_T with z's loss weight ``w``; ``fix_v``: Adam's v is the base run's at every step;
        ``src``: z's weight stays 1 and v += src (1 - b2) (g_z / B)^2 at each step holding z."""
        th, m, v = self.theta0.clone(), torch.zeros_like(self.theta0), torch.zeros_like(self.theta0)
        for s, idx in enumerate(self.batches):
            t = torch.as_tensor(idx)
            wb = torch.ones(len(idx), dtype=torch.float64)
            hit = z is not None and z in idx
            if hit and not src:
                wb[list(idx).index(z)] = w
            g, lr = self.batch_grad(th, self.x[t], self.y[t], wb), self.lrs[s]
            if self.opt == "sgd":                       # torch's SGD: coupled decay, buffer = g at step 0
                g = g + SGD_WD * th
                m = SGD_MOM * m + g if s else g.clone()
                th = th - lr * m
                continue
            th = th * (1 - lr * WD)
            m = B1 * m + (1 - B1) * g
            v = self.v_base[s] if fix_v else B2 * v + (1 - B2) * g * g
            if src and hit:
                v = v + src * (1 - B2) * (self.one_grad(th, self.x[z], self.y[z]) / len(idx)) ** 2
            if keep_v:
                self.v_base.append(v.clone())
            c1, c2 = 1 - B1 ** (s + 1), 1 - B2 ** (s + 1)
            th = th - lr / c1 * m / ((v / c2).sqrt() + EPS)
        return th


def sample_rows(case: Case, samples: np.ndarray, parts: int) -> list[dict]:
    e, delta = 1e-4, 1e-3
    g_q = case.query_grad(case.theta_T)
    out = []
    for i, z in enumerate(int(s) for s in samples):
        t0 = time.time()
        removed = case.train(z, 0.0)
        lin_dir = (case.train(z, 1 - e) - case.theta_T) / e
        dr = removed - case.theta_T
        row = dict(z=z, rem=case.qloss(removed) - case.L0, lin=(case.qloss(case.theta_T + e * lin_dir) - case.L0) / e,
                   gdr=float(g_q @ dr))
        if i < parts and case.opt == "adamw":
            row["fixv_rem"] = case.qloss(case.train(z, 0.0, fix_v=True)) - case.L0
            row["fixv_lin"] = (case.qloss(case.train(z, 1 - e, fix_v=True)) - case.L0) / e
            row["src"] = (case.qloss(case.train(z, src=delta)) - case.L0) / delta
        row["seconds"] = round(time.time() - t0, 1)
        out.append(row)
        print(row, flush=True)
    return out


def size(a, b) -> float:
    return float(np.median(np.abs(a)) / np.median(np.abs(b)))


def summary(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (name, seed), d in df.groupby(["recipe", "seed"], sort=False):
        r = dict(recipe=name, seed=seed, samples=len(d), lin_spearman=spearmanr(d.lin, d.rem)[0],
                 lin_size=size(d.lin, d.rem), removal_over_linear=1 / size(d.lin, d.rem),
                 rem_above_lin=float((d.rem > d.lin).mean()), median_excess=float((d.rem - d.lin).median()),
                 median_abs_lin=float(d.lin.abs().median()), gdr_size=size(d.gdr, d.rem))
        top = d.lin.abs().rank(ascending=False) <= 10        # the ten largest linear responses
        r.update(top10_lin_size=size(d.lin[top], d.rem[top]), rest_lin_size=size(d.lin[~top], d.rem[~top]),
                 top10_median_ratio=float((d.lin[top] / d.rem[top]).median()))
        p = d.dropna(subset=["src"]) if "src" in d else d.iloc[:0]
        if len(p):
            r.update(parts=len(p), part_lin_size=size(p.lin, p.rem),
                     fixv_excess_share=float((p.fixv_rem - p.fixv_lin).median() / (p.rem - p.lin).median()),
                     with_src_spearman=spearmanr(p.lin + p.src, p.rem)[0], with_src_size=size(p.lin + p.src, p.rem))
        rows.append(r)
    return pd.DataFrame(rows)


def main(seeds, samples: int, parts: int, out: Path, only: list[str] | None = None) -> pd.DataFrame:
    """Every recipe (or ``only`` those), each recipe and seed written as it finishes (rows of
    recipes not rerun are kept)."""
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "removal_nonlinearity.csv"
    old = pd.read_csv(path) if only and path.is_file() else None
    rows = []
    for name, (opt, sm) in RECIPES.items():
        if only and name not in only:
            continue
        for seed in seeds:
            case = Case(seed, opt, sm)
            idx = np.random.default_rng(seed + 1).choice(N_TRAIN, samples, replace=False)
            rows += [dict(recipe=name, seed=seed, **r) for r in sample_rows(case, idx, parts)]
            df = pd.DataFrame(rows)
            if old is not None:
                keep = old[~old.set_index(["recipe", "seed"]).index.isin(df.set_index(["recipe", "seed"]).index)]
                df = pd.concat([keep, df], ignore_index=True)
            df.to_csv(path, index=False, float_format="%.6g")
            s = summary(df)
            s.to_csv(out / "removal_nonlinearity_summary.csv", index=False, float_format="%.4g")
    return s


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--samples", type=int, default=45)
    ap.add_argument("--parts", type=int, default=20, help="samples (of the first) that also take fixv / src")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--only", nargs="+", choices=list(RECIPES), help="rerun these recipes, keep the others' rows")
    a = ap.parse_args()
    print(main(a.seeds, a.samples, a.parts, a.out, a.only).to_string())
