"""Adam/AdamW with the recorded batch order: the per-step adjoint of Adam's whole state.

diffin takes this path when the manifest records the batch order and every checkpoint's
exp_avg and exp_avg_sq (the Recorder with ``rec.step(batch_ids=...)``). Removing z changes the
gradient of each step s whose batch B_s held z by -r_s, r_s = g_z / |B_s|. Linearised in Adam's
state (theta, m, v); m_s, v_s are the moments after step s's update, t = Adam's count at s,
c1 = 1 - b1^t, c2 = 1 - b2^t, D = 1 / (sqrt(v_s / c2) + eps), rho = 1 - lr lambda (AdamW):
    dg  = H dtheta (+ lambda dtheta, Adam's coupled decay) - r_s
    dm' = b1 dm + (1 - b1) dg            dv' = b2 dv + 2 (1 - b2) G_s * dg     (G_s: B_s's gradient)
    dtheta' = rho dtheta - lr / c1 D dm' + lr Gamma dv',   Gamma = (m_s / c1) D^2 / (2 sqrt(v_s / c2) c2)
The adjoint (ut, um, uv) starts at (g_Q(theta_T), 0, 0) and goes back step by step:
    am = um - lr / c1 D ut      av = uv + lr Gamma ut      w_s = (1 - b1) am + 2 (1 - b2) G_s * av
    ut <- rho ut + H w_s (+ lambda w_s)      um <- b1 am      uv <- b2 av
    influence(z) = -sum_{s: z in B_s} <w_s, g_z> / |B_s|      (nats; > 0 helpful)
From checkpoints: theta, H, G_s and g_z of step s are taken at the checkpoint that owns s (its
weights and buffers), H and G_s on the real batch B_s (the HVP: settings.hvp, finite differences
based at G_s by default). Adam's moments of every step are replayed forward from the latest
recorded (exp_avg, exp_avg_sq) at or before it with those batch gradients: exact at every
checkpoint, and m_s, v_s hold step s's own batch gradient, which the v response multiplies.
What it buys (benchmarks/adam_study.py, digits AdamW, 800 samples, 200 steps, float64, exact
HVPs; Spearman vs true leave-one-out at 5 / 20 checkpoints, seeds 0 and 1): replayed 0.91 / 0.99
and 0.98 / 0.99; each checkpoint's recorded moments held over its steps instead: -0.05 / 0.72 and
-0.10 / 0.56; replayed but v frozen (the real batches alone): 0.80 / 0.85 and 0.84 / 0.86.

Cost per query: per training step two batch gradients (the replay and, again, the walk back),
one HVP and one jvp on its batch; the influence of the samples of B_s is written as that step
is passed. Memory: the moments at about sqrt(L) block starts of an L-step segment and one
block's (m, v, G) at a time.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from diffin_core.errors import DiffinError
from diffin_core.engine.functional import no_tf32


def start(u: torch.Tensor):
    """The adjoint (ut, um, uv) at the final weights, float64 (float32 on MPS)."""
    ut = u.detach().to(torch.float32 if u.device.type == "mps" else torch.float64)
    return ut.clone(), torch.zeros_like(ut), torch.zeros_like(ut)


def _owner(ctx, s: int) -> int:
    return int(min(max(np.searchsorted(ctx.bounds, s, side="right") - 1, 0), ctx.m - 1))


def _anchor_steps(ctx) -> dict[int, int]:
    """Step index s -> checkpoint k whose recorded moments are Adam's after step s's update
    (a checkpoint at step t > 0 holds the state after step t - 1; the step-0 one after step 0)."""
    return {max(int(ctx.steps[k]), 1) - 1: k for k in range(ctx.m)}


def _offset(ctx) -> int:
    """Adam updates taken before the recording's step 0 (from the first checkpoint's count)."""
    _m, _v, count = ctx.moments[0]
    return max(int(count) - max(int(ctx.steps[0]), 1), 0)


def _batch_grad(ctx, s: int):
    """(rows, x, y, G_s) of step s's batch at its owner checkpoint; G_s (P,) in the model's dtype
    (+ lambda theta for Adam's coupled weight decay, as torch adds it before the moments)."""
    k = _owner(ctx, s)
    rows = ctx.batch_order.batch(s)
    x, y = ctx.tensors(np.asarray(ctx.train.x[rows], dtype=np.float32), np.asarray(ctx.train.y)[rows])
    with no_tf32():
        g = ctx.fm_at(k).batch_grad(ctx.thetas[k], x, y)
    return rows, x, y, g


def _advance(ctx, state, s: int, g: torch.Tensor, anchors: dict[int, int]):
    """Adam's (m, v) after step s from those after step s - 1 and the step's gradient; the
    recorded moments where a checkpoint holds them."""
    if s in anchors:
        m, v, _ = ctx.moments[anchors[s]]
        return m.clone(), v.clone()
    b1, b2 = ctx.recipe.betas
    m, v = state
    gd = g.to(m.dtype) + _coupled(ctx) * ctx.thetas[_owner(ctx, s)].to(m.dtype)
    return b1 * m + (1 - b1) * gd, b2 * v + (1 - b2) * gd * gd


def _coupled(ctx) -> float:
    return ctx.recipe.weight_decay if not ctx.recipe.decoupled else 0.0


def _entry_state(ctx, lo: int, anchors: dict[int, int]):
    """(first step to replay from, (m, v) before it): the latest anchor at or before ``lo``, or
    zeros before step 0 (Adam's own start) when the recording began with the optimiser."""
    before = [s for s in anchors if s <= lo]
    if before:
        a = max(before)
        m, _v, _ = ctx.moments[anchors[a]]
        return a, (torch.zeros_like(m), torch.zeros_like(m))
    m, _v, _ = ctx.moments[anchors[min(anchors)]]
    if _offset(ctx):
        raise DiffinError(f"{ctx.label(0)}: Adam's moments before the first recorded checkpoint are unknown "
                          "(the recording began after training did)")
    return 0, (torch.zeros_like(m), torch.zeros_like(m))


def segment(ctx, k: int, carry):
    """Checkpoint k's segment (its owned steps, latest first): (influence (N,) float64 on the CPU
    from the samples of its batches, the adjoint carried to the segment's start)."""
    lo, hi = int(ctx.bounds[k]), int(ctx.bounds[k + 1])
    ut, um, uv = carry
    rows_out = torch.zeros(ctx.n, dtype=torch.float64)
    if hi <= lo:
        return rows_out, carry
    anchors = _anchor_steps(ctx)
    b1, b2 = ctx.recipe.betas
    eps, lam = ctx.recipe.eps, ctx.recipe.weight_decay
    offset = _offset(ctx)
    first, state = _entry_state(ctx, lo, anchors)
    block = max(1, int(math.ceil(math.sqrt(hi - lo))))
    entry: dict[int, tuple] = {}                 # (m, v) entering each block start in [lo, hi)
    for s in range(first, hi):
        if s >= lo and (s - lo) % block == 0:
            entry[s] = state
        state = _advance(ctx, state, s, _batch_grad(ctx, s)[3] if s not in anchors else None, anchors)
    theta, fm = ctx.thetas[k], ctx.fm_at(k)
    dt = theta.dtype
    for b in sorted(entry, reverse=True):
        state, steps = entry[b], []
        for s in range(b, min(b + block, hi)):
            rows, x, y, g = _batch_grad(ctx, s)
            state = _advance(ctx, state, s, g, anchors)
            steps.append((s, rows, x, y, g, state))
        for s, rows, x, y, g, (m, v) in reversed(steps):
            lr = float(ctx.step_lrs[s])
            t = s + 1 + offset
            c1, c2 = 1.0 - b1 ** t, 1.0 - b2 ** t
            sq = (v / c2).clamp_min(0).sqrt()
            D = 1.0 / (sq + eps)
            gam = torch.where(sq > 0, (m / c1) * D * D / (2 * sq.clamp_min(1e-300) * c2), torch.zeros_like(sq))
            gd = g.to(ut.dtype) + _coupled(ctx) * theta.to(ut.dtype)
            am = um - (lr / c1) * D * ut
            av = uv + lr * gam * ut
            w = (1 - b1) * am + 2 * (1 - b2) * gd * av
            wm = w.to(dt)
            with no_tf32():
                dz = fm.directional(theta, x, y, wm).cpu().to(torch.float64)
                hw = (fm.hvp_exact(theta, x, y, wm) if ctx.settings.hvp == "exact"
                      else fm.hvp_fd(theta, x, y, wm, base_grad=g, eps=ctx.settings.eps))
            rows_out.index_add_(0, torch.as_tensor(rows), -dz / len(rows))
            rho = 1.0 - lr * lam if ctx.recipe.decoupled else 1.0
            ut = rho * ut + hw.to(ut.dtype) + _coupled(ctx) * w
            um, uv = b1 * am, b2 * av
        if not (torch.isfinite(ut).all() and torch.isfinite(rows_out).all()):
            raise DiffinError(f"non-finite Adam replay at {ctx.label(k)}: refusing to write NaN scores")
    return rows_out, (ut, um, uv)
