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

Where the nonlinearity lives (``--own``, the AdamW recipes): the linear response splits exactly into
    sum_s <ut_{s+1}, du_s>,  ut_{s+1} = d(query loss) / d(theta_{s+1}) with m_s, v_s held (autograd),
du_s the change of step s's Adam update u = -lr / c1 m / (sqrt(v / c2) + eps) caused by z's direct
deviation of the moments (dm, dv: z's term of each step holding it, decayed by b1, b2; what
feeds back through the Hessian is in ut). Replacing du_s's linearisation by exact pieces:
    quadv  dv exact, (1 - b2) ((G - g_z / B)^2 - G^2) (its square kept), du linear in (dm, dv)
    own    z's term removed exactly from the step that holds it (m, v and the update), its change
           of the state carried on linearly: what the engine computes (adam_batches.own_removal)
    semi   every step's update exact in the accumulated direct (dm, dv) of z
If own or semi is near rem, the nonlinearity is Adam's moments; what is left is the trajectory's
(the Hessian's) curvature.
        -> removal_nonlinearity_own.csv (+ _own_summary.csv): rem and lin from the main CSV.
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
from torch.func import functional_call, grad

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


def own_rows(case: Case, samples: np.ndarray, rem: dict) -> list[dict]:
    """lin / quadv / own / semi (module doc) of each sample, float64, by autograd through training."""
    n = len(case.y)
    wts = torch.ones(n, dtype=torch.float64, requires_grad=True)
    th = case.theta0.clone().requires_grad_(True)
    m, v = torch.zeros_like(th), torch.zeros_like(th)
    TH, NEXT, M, V, G, C = [], [], [], [], [], []

    def sqrt_v(vv, c2):                          # sqrt(v / c2) with a zero derivative where v = 0
        pos = vv > 0
        return torch.where(pos, torch.sqrt(torch.where(pos, vv, torch.ones_like(vv)) / c2), torch.zeros_like(vv))
    for s, idx in enumerate(case.batches):
        t = torch.as_tensor(idx)
        TH.append(th.detach().clone())
        g = torch.autograd.grad((case.losses(th, case.x[t], case.y[t]) * wts[t]).sum() / len(idx), th,
                                create_graph=True)[0]
        th.grad = None                           # (a retained grad's hook fires on autograd.grad too)
        lr, c1, c2 = case.lrs[s], 1 - B1 ** (s + 1), 1 - B2 ** (s + 1)
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        th = th * (1 - lr * WD) - lr / c1 * m / (sqrt_v(v, c2) + EPS)
        th.retain_grad()
        NEXT.append(th)
        M.append(m.detach().clone())
        V.append(v.detach().clone())
        G.append(g.detach().clone())
        C.append((lr, c1, c2))
    case.losses(th, case.qx, case.qy).mean().backward()
    lin_all = -wts.grad.detach()
    UT = [t.grad.detach() for t in NEXT]
    del NEXT

    def u(mm, vv, lr, c1, c2):
        return -lr / c1 * mm / (torch.sqrt(vv.clamp_min(0) / c2) + EPS)

    def du_lin(mm, vv, dm, dv, lr, c1, c2):
        sq = torch.sqrt(vv / c2)
        D = 1 / (sq + EPS)
        gam = torch.where(sq > 0, (mm / c1) * D * D / (2 * sq.clamp_min(1e-300) * c2), torch.zeros_like(sq))
        return -lr / c1 * D * dm + lr * gam * dv

    where: dict = {}
    for s, idx in enumerate(case.batches):
        for z in idx:
            where.setdefault(int(z), []).append(s)
    out = []
    T = len(case.batches)
    for z in (int(q) for q in samples):
        t0 = time.time()
        steps = where[z]
        r = {s: case.one_grad(TH[s], case.x[z], case.y[z]) / len(case.batches[s]) for s in steps}
        dm, dv, dvl = (torch.zeros_like(TH[0]) for _ in range(3))
        semi = quadv = lin = own = 0.0
        for s in range(steps[0], T):
            dm, dv, dvl = B1 * dm, B2 * dv, B2 * dvl
            if s in r:
                dm = dm - (1 - B1) * r[s]
                dv = dv + (1 - B2) * ((G[s] - r[s]) ** 2 - G[s] ** 2)
                dvl = dvl + (1 - B2) * (-2 * G[s] * r[s])
            semi += float(UT[s] @ (u(M[s] + dm, V[s] + dv, *C[s]) - u(M[s], V[s], *C[s])))
            lin += float(UT[s] @ du_lin(M[s], V[s], dm, dvl, *C[s]))
            quadv += float(UT[s] @ du_lin(M[s], V[s], dm, dv, *C[s]))
        for s0 in steps:
            dm1, dv1 = -(1 - B1) * r[s0], (1 - B2) * ((G[s0] - r[s0]) ** 2 - G[s0] ** 2)
            own += float(UT[s0] @ (u(M[s0] + dm1, V[s0] + dv1, *C[s0]) - u(M[s0], V[s0], *C[s0])))
            for s in range(s0 + 1, T):
                dm1, dv1 = B1 * dm1, B2 * dv1
                own += float(UT[s] @ du_lin(M[s], V[s], dm1, dv1, *C[s]))
        row = dict(z=z, rem=rem.get(z, np.nan), lin=float(lin_all[z]), lin_split=lin, quadv=quadv, own=own, semi=semi,
                   seconds=round(time.time() - t0, 1))
        if not np.isfinite(row["rem"]):
            row["rem"] = case.qloss(case.train(z, 0.0)) - case.L0
        out.append(row)
        print(row, flush=True)
    return out


def own_main(seeds, samples: int, out: Path) -> pd.DataFrame:
    torch.set_num_threads(1)
    main_csv = out / "removal_nonlinearity.csv"
    old = pd.read_csv(main_csv) if main_csv.is_file() else pd.DataFrame(columns=["recipe", "seed", "z", "rem"])
    rows = []
    for name, (opt, sm) in RECIPES.items():
        if opt != "adamw":
            continue
        for seed in seeds:
            t0 = time.time()
            case = Case(seed, opt, sm)
            d = old[(old.recipe == name) & (old.seed == seed)]
            rem = dict(zip(d.z.astype(int), d.rem))
            idx = np.random.default_rng(seed + 1).choice(N_TRAIN, samples, replace=False)
            rows += [dict(recipe=name, seed=seed, **r) for r in own_rows(case, idx, rem)]
            print(name, seed, "took", round(time.time() - t0, 1), "s", flush=True)
            df = pd.DataFrame(rows)
            df.to_csv(out / "removal_nonlinearity_own.csv", index=False, float_format="%.6g")
    summ = []
    for (name, seed), d in df.groupby(["recipe", "seed"], sort=False):
        r = dict(recipe=name, seed=seed, samples=len(d))
        for col in ("lin", "quadv", "own", "semi"):
            r[f"{col}_spearman"] = spearmanr(d[col], d.rem)[0]
            r[f"{col}_size"] = size(d[col], d.rem)
        summ.append(r)
    s = pd.DataFrame(summ)
    s.to_csv(out / "removal_nonlinearity_own_summary.csv", index=False, float_format="%.4g")
    return s


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
    ap.add_argument("--own", action="store_true", help="where the nonlinearity lives (AdamW recipes): "
                    "removal_nonlinearity_own.csv")
    a = ap.parse_args()
    if a.own:
        print(own_main(a.seeds, a.samples, a.out).to_string())
    else:
        print(main(a.seeds, a.samples, a.parts, a.out, a.only).to_string())
