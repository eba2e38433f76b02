"""Why AdamW stays below the issue's 0.9: per-step references for Adam's second moment.

Trains the AdamW recipe of benchmarks/recipes.py (digits MLP, torch.optim.AdamW, warm-up +
cosine, float64) while storing every step (theta_s, Adam's m and v after it, the batch), takes
true trajectory leave-one-out, and compares it with the exact linearisation of Adam's step map
in the state (theta, m, v), every step stored, exact Hessian-vector products. Removing z changes
the batch gradient of each step s whose batch B_s held z by -g_z/|B|; linearised:
    dm' = b1 dm + (1-b1) dg             dv' = b2 dv + (1-b2) 2 G_s * dg          dg = H dtheta - r
    dtheta' = (1 - lr wd) dtheta - lr/bc1 D dm' + lr Gamma dv',  Gamma = m_hat D^2 / (2 sqrt(v_hat) bc2)
One adjoint pass back from g_Q(theta_T) gives each step's weights (Am, Av) of (dm', dv'); the
influence of z is -sum_s <(1-b1) Am_s + 2 (1-b2) X_s * Av_s, r_s> with, per row of the CSV:
  membership  exact: r_s = g_z/|B| at the steps whose batch held z;  expected: r_s = g_z/N at every
              step (what any estimator from checkpoints alone does: it does not know the batches)
  v           frozen: Av = 0 (v does not respond);  batch: X_s = G_s, the gradient of the batch
              z was in (z included);  full-data: X_s = the full-data gradient;  realised:
              X_s = G_s of each step's real batch (expected membership only)
  state       per-step: every step's own theta, m, v (checkpoints = all steps);  from only K
              checkpoints (the recipes benchmark's: K of the Recorder's every-10 steps, each
              owning the steps nearest it; theta, H, G_s and g_z at the owner, H and G_s on the real
              batch, exact HVPs):  checkpoint-held: the owner's recorded m, v for all its steps;
              checkpoint-replayed: Adam's m, v replayed forward from the latest recorded ones with
              the batch gradients (what diffin_core/engine/adam_batches.py does, there in float32 with
              finite-difference HVPs)

    python benchmarks/adam_study.py [--seeds 0 1]  -> benchmarks/results/adam_study.csv

CSV columns: seed, membership, v, state, checkpoints, spearman, pearson.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from torch.func import grad, jvp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from diffin_core.engine.functional import FunctionalModel  # noqa: E402
from diffin_core.engine.recipe import owned_bounds  # noqa: E402
from diffin_core.tasks.truth import batch_order, digits_case, leave_one_out_torch, standard_recipes  # noqa: E402


def record(recipe, x, y, batches):
    """Train with torch's optimiser; per step: theta before, lr, Adam's m and v after (flat)."""
    model = recipe.model_fn()
    model.train()
    opt = recipe.optimizer_fn(model.parameters())
    sched = recipe.scheduler_fn(opt, len(batches)) if recipe.scheduler_fn else None
    fm, params = FunctionalModel(model), list(model.parameters())
    steps = []
    for idx in batches:
        theta, lr = fm.theta_of(model), opt.param_groups[0]["lr"]
        opt.zero_grad()
        t = torch.as_tensor(idx)
        (F.cross_entropy(model(x[t]), y[t], reduction="sum") / len(idx)).backward()
        opt.step()
        if sched:
            sched.step()
        flat = lambda key: torch.cat([opt.state[p][key].reshape(-1) for p in params]).clone()  # noqa: E731
        steps.append(dict(theta=theta, lr=lr, m=flat("exp_avg"), v=flat("exp_avg_sq"), batch=idx))
    return fm, fm.theta_of(model), steps, opt.param_groups[0]


def study(seed: int, n_train: int = 800, epochs: int = 8, samples: int = 40) -> list[dict]:
    recipe = standard_recipes()["adamw-warmup-cosine"]
    train, query = digits_case(noise=0.1, n_train=n_train, seed=seed)
    x, y = torch.as_tensor(train.x, dtype=torch.float64), torch.as_tensor(train.y)
    qx, qy = torch.as_tensor(query.x, dtype=torch.float64), torch.as_tensor(query.y)
    batches = batch_order(n_train, 32, epochs, seed=seed)
    fm, theta_T, steps, hp = record(recipe, x, y, batches)
    idx = np.random.default_rng(seed + 1).choice(n_train, samples, replace=False)
    truth = leave_one_out_torch(recipe, x, y, qx, qy, batches, idx)
    b1, b2 = hp["betas"]
    eps, wd = hp["eps"], hp["weight_decay"]
    loss = lambda xs, ys: (lambda th: F.cross_entropy(fm.logits(th, xs), ys))  # noqa: E731
    full_loss = loss(x, y)
    for s, st in enumerate(steps):
        t = s + 1
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        v_hat, m_hat = st["v"] / bc2, st["m"] / bc1
        st["D"] = 1 / (v_hat.sqrt() + eps)
        st["Gam"] = torch.where(v_hat > 0, m_hat * st["D"] ** 2 / (2 * v_hat.sqrt().clamp_min(1e-300) * bc2), 0.0)
        st["bc1"], st["xb"], st["yb"] = bc1, x[torch.as_tensor(st["batch"])], y[torch.as_tensor(st["batch"])]
        st["G"] = grad(loss(st["xb"], st["yb"]))(st["theta"])
        st["Gf"] = grad(full_loss)(st["theta"])
    g_q = grad(loss(qx, qy))(theta_T)
    rows = []
    for v_on in (False, True):
        ut, um, uv = g_q.clone(), torch.zeros_like(g_q), torch.zeros_like(g_q)
        adj = [None] * len(steps)
        for s in range(len(steps) - 1, -1, -1):          # the adjoint of the linearised step map
            st = steps[s]
            am = um - st["lr"] / st["bc1"] * st["D"] * ut
            av = uv + st["lr"] * st["Gam"] * ut if v_on else torch.zeros_like(ut)
            w = (1 - b1) * am + 2 * (1 - b2) * st["G"] * av
            adj[s] = (am, av)
            ut = (1 - st["lr"] * wd) * ut + jvp(grad(loss(st["xb"], st["yb"])), (st["theta"],), (w,))[1]
            um, uv = b1 * am, b2 * av
        variants = {("exact", "frozen"), ("expected", "frozen")} if not v_on else \
            {("exact", "batch"), ("exact", "full-data"), ("expected", "full-data"), ("expected", "realised")}
        est = {k: np.zeros(samples) for k in variants}
        for s, st in enumerate(steps):
            am, av = adj[s]
            gz = fm.per_sample_grads(st["theta"], x[torch.as_tensor(idx)], y[torch.as_tensor(idx)])
            inb = np.isin(idx, st["batch"]).astype(np.float64) / len(st["batch"])
            for (member, vm) in variants:
                X = {"frozen": 0.0, "batch": st["G"], "full-data": st["Gf"], "realised": st["G"]}[vm]
                term = -(((1 - b1) * am + 2 * (1 - b2) * X * av) * gz).sum(1).numpy()
                est[(member, vm)] += term * (inb if member == "exact" else 1.0 / n_train)
        for (member, vm), e in sorted(est.items()):
            rows.append(dict(seed=seed, membership=member, v=vm, state="per-step", checkpoints=len(steps),
                             spearman=spearmanr(e, truth)[0], pearson=pearsonr(e, truth)[0]))
            print(rows[-1], flush=True)
    for count in (5, 20):
        for member, vm, state in [("exact", "frozen", "checkpoint-held"), ("exact", "batch", "checkpoint-held"),
                                  ("exact", "frozen", "checkpoint-replayed"),
                                  ("exact", "batch", "checkpoint-replayed")]:
            e = from_checkpoints(fm, steps, theta_T, hp, x, y, qx, qy, idx, count, vm == "batch",
                                 state == "checkpoint-replayed")
            rows.append(dict(seed=seed, membership=member, v=vm, state=state, checkpoints=count,
                             spearman=spearmanr(e, truth)[0], pearson=pearsonr(e, truth)[0]))
            print(rows[-1], flush=True)
    return rows


def from_checkpoints(fm, steps, theta_T, hp, x, y, qx, qy, idx, count, v_on, replay, every=10):
    """The exact-membership adjoint from ``count`` of the every-``every``-step checkpoints only
    (see the module doc: state checkpoint-held / checkpoint-replayed); returns the estimate (samples,)."""
    b1, b2 = hp["betas"]
    eps, wd = hp["eps"], hp["weight_decay"]
    T = len(steps)
    loss = lambda xs, ys: (lambda th: F.cross_entropy(fm.logits(th, xs), ys))  # noqa: E731
    thetas = [st["theta"] for st in steps] + [theta_T]
    ck = every * np.array(sorted({int(round(i)) for i in np.linspace(0, T // every, count)}))
    bounds = owned_bounds(ck, T)
    owner = np.clip(np.searchsorted(bounds, np.arange(T), side="right") - 1, 0, len(ck) - 1)
    anchor = {max(int(t), 1) - 1: (steps[max(int(t), 1) - 1]["m"], steps[max(int(t), 1) - 1]["v"]) for t in ck}
    batch = [(x[torch.as_tensor(st["batch"])], y[torch.as_tensor(st["batch"])]) for st in steps]
    G = [grad(loss(*batch[s]))(thetas[ck[owner[s]]]) for s in range(T)]
    M, V, C = [], [], []                        # moments after step s's update and their Adam count
    m = v = torch.zeros_like(theta_T)
    for s in range(T):
        if replay:
            m, v = anchor[s] if s in anchor else (b1 * m + (1 - b1) * G[s], b2 * v + (1 - b2) * G[s] ** 2)
            count = s + 1
        else:                                   # held: bias-corrected with their own count
            count = max(int(ck[owner[s]]), 1)
            m, v = steps[count - 1]["m"], steps[count - 1]["v"]
        M.append(m)
        V.append(v)
        C.append(count)
    ut, um, uv = grad(loss(qx, qy))(theta_T), torch.zeros_like(theta_T), torch.zeros_like(theta_T)
    est = np.zeros(len(idx))
    ix = torch.as_tensor(idx)
    gz = {}
    for s in range(T - 1, -1, -1):
        th, st = thetas[ck[owner[s]]], steps[s]
        if owner[s] not in gz:
            gz = {owner[s]: fm.per_sample_grads(th, x[ix], y[ix])}
        bc1, bc2 = 1 - b1 ** (s + 1), 1 - b2 ** (s + 1)
        sq = (V[s] / (1 - b2 ** C[s])).sqrt()
        D = 1 / (sq + eps)
        gam = torch.where(sq > 0, (M[s] / (1 - b1 ** C[s])) * D ** 2 / (2 * sq.clamp_min(1e-300) * bc2), 0.0)
        am = um - st["lr"] / bc1 * D * ut
        av = uv + st["lr"] * gam * ut if v_on else torch.zeros_like(ut)
        w = (1 - b1) * am + 2 * (1 - b2) * G[s] * av
        est -= (gz[owner[s]] @ w).numpy() * np.isin(idx, st["batch"]) / len(st["batch"])
        ut = (1 - st["lr"] * wd) * ut + jvp(grad(loss(*batch[s])), (th,), (w,))[1]
        um, uv = b1 * am, b2 * av
    return est


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    df = pd.DataFrame([r for seed in args.seeds for r in study(seed)])
    out = HERE / "results" / "adam_study.csv"
    df.to_csv(out, index=False, float_format="%.4f")
    print(df.to_string())
