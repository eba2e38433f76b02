"""SGD with gradient clipping and the recorded batch order: the per-step adjoint, real batches.

A clipped step's update uses c g / |g|: removing z changes it by f (I - g g^T / |g|^2) dg, not
f dg, so the clip factor alone (the checkpoint walk, propagate.py) misses how z's own gradient
moves the norm: measured Spearman 0.50 against leave-one-out with every step clipped
(benchmarks/recipe_features.py). With the batch order recorded, diffin walks the steps one by
one instead, the way adam_batches.py does for Adam: z enters exactly the batches it was in and
each clipped step's gradient response is projected off that batch's gradient g_s.

Per step s (lr eta_s, per coordinate with per-group lrs; f_s the clip factor; P_s = I - g^ g^T
when f_s < 1, else I; torch's SGD order: coupled weight decay added after clipping):
    dg  = f_s P_s (H dtheta - r_s) + lambda dtheta          r_s = g_z / |B_s| for z in B_s
    dmu' = beta dmu + c_s dg           dtheta' = dtheta - eta (alpha dg + gamma dmu')
The adjoint (ut, um) starts at (g_Q(theta_T), 0) and goes back step by step:
    am = um - gamma eta ut      w = c_s am - alpha eta ut      wm = f_s P_s w
    ut <- ut + H wm + lambda w       um <- beta am
    influence(z) -= <wm, g_z> / |B_s|  for z in B_s                        (nats; > 0 helpful)
theta, H and g_s of step s are taken on the line between the two recorded checkpoints around it
(SGD's momentum buffer is not recorded, so theta is not replayed; buffers: the earlier one's). Cost per query: per
training step one batch gradient, one HVP and one jvp on its batch.
"""
from __future__ import annotations

import numpy as np
import torch

from diffin_core.engine.adam_batches import _clip, interval
from diffin_core.engine.dropout import applied, flag, step_masks
from diffin_core.engine.functional import no_tf32
from diffin_core.errors import DiffinError


def applies(ctx) -> bool:
    """SGD (not Adam) with a recorded batch order and at least one clipped step, or recorded
    dropout masks (engine/dropout.py: each step's train-mode network)."""
    clip = getattr(ctx, "clip", None)
    return (not ctx.recipe.adam and getattr(ctx, "batch_order", None) is not None
            and (clip is not None and bool((clip < 1).any()) or getattr(ctx, "rng", None) is not None))


def start(u: torch.Tensor):
    """The adjoint (ut, um) at the final weights, float64 (float32 on MPS)."""
    ut = u.detach().to(torch.float32 if u.device.type == "mps" else torch.float64)
    return ut.clone(), torch.zeros_like(ut)


def segment(ctx, k: int, carry):
    """Checkpoint k's interval, latest step first: (influence (N,) float64 on the CPU from the
    samples of its batches, the adjoint carried to the interval's start, None)."""
    from diffin_core.engine.hvp import product
    ut, um = carry
    rows_out = torch.zeros(ctx.n, dtype=torch.float64)
    lo, hi = interval(ctx, k)
    if hi <= lo:
        return rows_out, carry, None
    recipe, groups = ctx.recipe, getattr(ctx, "groups", None)
    beta, c, alpha, gamma = 0.0, 1.0, 0.0, 1.0          # torch's SGD (as propagate.step_constants)
    if recipe.momentum > 0:
        beta, c = recipe.momentum, 1.0 - recipe.dampening
        alpha, gamma = (1.0, beta) if recipe.nesterov else (0.0, 1.0)
    lam = (groups.decay_vector(ut.device, ut.dtype) if groups is not None
           else (recipe.weight_decay if not recipe.decoupled else 0.0))
    momenta = getattr(ctx, "momenta", None)
    theta0, fm = ctx.thetas[k], ctx.fm_at(k)
    dt = theta0.dtype
    t0 = int(ctx.steps[k])
    nxt = ctx.thetas[k + 1] if k + 1 < ctx.m else None
    span = (int(ctx.steps[k + 1]) - t0) if nxt is not None else 0
    hvp_state: dict = {}
    for s in range(hi - 1, lo - 1, -1):
        # the weights at step s: on the line between the interval's two recorded checkpoints
        theta = theta0 if nxt is None or span <= 0 or s <= t0 else theta0 + ((s - t0) / span) * (nxt - theta0)
        rows = ctx.batch_order.batch(s)
        x, y = ctx.tensors(np.asarray(ctx.train.x[rows], dtype=np.float32), np.asarray(ctx.train.y)[rows])
        masks = step_masks(ctx, s, fm, theta, x)          # training's dropout masks of step s (dropout.py)
        with no_tf32(), applied(masks):
            g = fm.batch_grad(theta, x, y)
        eta = (groups.step_lr_vector(s, ut.device, ut.dtype) if groups is not None else float(ctx.step_lrs[s]))
        f = _clip(ctx, s)
        cs = 1.0 if (s == 0 and beta > 0) else c
        bs = float(momenta[s]) if momenta is not None and beta > 0 else beta     # a momentum schedule
        gs = bs if (recipe.nesterov and beta > 0) else gamma
        am = um - gs * eta * ut
        w = cs * am - alpha * eta * ut
        if f < 1.0:
            gh = g.to(w.dtype) / torch.linalg.vector_norm(g.to(w.dtype)).clamp_min(1e-300)
            wc = w - gh * (gh @ w)
        else:
            wc = w
        wm = (f * wc).to(dt)
        with no_tf32(), applied(masks):
            dz = fm.directional(theta, x, y, wm).cpu().to(torch.float64)
            hw = product(ctx, k, fm, theta, x, y, g, "adam", hvp_state)(wm)
        rows_out.index_add_(0, torch.as_tensor(rows), -dz / len(rows))
        ut = ut + hw.to(ut.dtype) + lam * w
        um = bs * am
    flag(ctx)
    if not (torch.isfinite(ut).all() and torch.isfinite(rows_out).all()):
        raise DiffinError(f"non-finite SGD replay at {ctx.label(k)}: refusing to write NaN scores")
    return rows_out, (ut, um), None
