"""First-order estimators: TracIn (checkpoint sum), its Adam-aware peer, grad-dot and grad-cos."""
from __future__ import annotations

import numpy as np
import torch

from diffin_core.methods.base import Attributor, Context, loo_loss


LONG_ROW = 1 << 20     # row length from which rowdot takes one BLAS dot per row


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a_i, b_i> per row, (b, n) x (b, n) -> (b,). Rows of LONG_ROW or more (P-sized, e.g. a
    ResNet's per-sample gradients) take one BLAS dot each, without the (b, n) product temporary
    (torch.bmm of (b, 1, n) x (b, n, 1) was measured 20x slower on CPU)."""
    if a.dim() < 2 or a.shape[-1] < LONG_ROW:
        return (a * b).sum(-1)
    return torch.stack([torch.dot(ai, bi) for ai, bi in zip(a, b)]) if len(a) else a.new_zeros(0)


def checkpoint_weights(ctx: Context) -> np.ndarray:
    """TracIn's weight of each checkpoint (m,): the final weight change per unit gradient summed
    over the steps it owns, curvature (and weight decay) ignored. With SGD momentum (heavy ball,
    Nesterov, dampening) this is momentum's impulse response in torch's update order, truncated
    at the end of training (a gradient taken 3 steps before the end moves the weights by about
    3 lr, not lr/(1-beta)); without momentum, or for Adam, it is the summed lr (ctx.lrs * segments)."""
    from dataclasses import replace

    from diffin_core.engine.propagate import has_momentum, segment_coefficients
    recipe = ctx.recipe
    if ctx.step_lrs is None or ctx.bounds is None or recipe.adam or not has_momentum(recipe):
        return np.asarray(ctx.lrs) * np.asarray(ctx.segments)
    cached = getattr(ctx, "_checkpoint_weights", None)      # one pass over all steps per context
    if cached is not None and cached[0] is recipe:
        return cached[1]
    free = replace(recipe, weight_decay=0.0)
    out, u, v = np.zeros(ctx.m), 1.0, 0.0          # adjoints of (weights, momentum buffer) at the end
    for k in range(ctx.m - 1, -1, -1):
        lo, hi = int(ctx.bounds[k]), int(ctx.bounds[k + 1])
        if hi <= lo:
            continue
        clip = getattr(ctx, "clip", None)
        mom = getattr(ctx, "momenta", None)
        W, C = segment_coefficients(np.zeros(0), ctx.step_lrs[lo:hi], lo, free,      # curvature 0 only
                                    gscale=None if clip is None else clip[lo:hi],
                                    momenta=None if mom is None else mom[lo:hi])
        out[k] = W[-1, 0] * u + W[-1, 1] * v
        u, v = C[-1, 0, 0] * u + C[-1, 0, 1] * v, C[-1, 1, 0] * u + C[-1, 1, 1] * v
    ctx._checkpoint_weights = (recipe, out)
    return out


class TracIn(Attributor):
    """tracin(z, Q) = sum_k (c_k / N) <g_Q, g_z> at checkpoint k (its own buffers); c_k =
    checkpoint_weights: the summed lrs of the steps checkpoint k stands for, with SGD momentum's
    exact impulse response (not the long-run lr/(1-beta), wrong at the end of training).

    Self-influence: the same with g_Q = g_z (sum of weighted squared gradient norms), reported
    per checkpoint; label_issue: the estimated leave-one-out loss (final loss + self-influence).
    """
    name = "tracin"
    uses_recipe = True

    def preconditioner(self, ctx: Context, k: int) -> torch.Tensor | None:
        """Per-group lrs: each coordinate's lr scale in checkpoint k's segment (0 frozen)."""
        return _group_scale(ctx, k)

    def prepare(self, ctx: Context, qx, qy):
        coef = checkpoint_weights(ctx) / ctx.n
        plan = []
        for k in range(ctx.m):
            if coef[k] > 0:
                d = self.preconditioner(ctx, k)
                gq = ctx.mean_grad(k, qx, qy)
                plan.append((k, float(coef[k]), gq if d is None else d * gq, d))
        return plan

    # the same plan one checkpoint at a time (runner.py saves each entry as it is made)
    def plan_steps(self, ctx: Context) -> int:
        return ctx.m

    def prepare_start(self, ctx: Context, qx, qy):
        return None

    def prepare_step(self, ctx: Context, k: int, carry, qx, qy):
        coef = float(checkpoint_weights(ctx)[k] / ctx.n)
        if coef <= 0:
            return None, None
        d = self.preconditioner(ctx, k)
        gq = ctx.mean_grad(k, qx, qy)
        return (k, coef, gq if d is None else d * gq, d), None

    def chunk(self, ctx, state, x, y, need_self):
        infl = torch.zeros(len(y), ctx.m, dtype=ctx.acc_dtype, device=ctx.device)
        selfs = torch.zeros_like(infl) if need_self else None
        for k, c, gq, d in state:
            fm = ctx.fm_at(k)
            if need_self:
                g = fm.per_sample_grads(ctx.thetas[k], x, y)
                infl[:, k] = c * (g @ gq).to(infl.dtype)
                selfs[:, k] = c * rowdot(g, g if d is None else d * g).to(infl.dtype)
            else:
                infl[:, k] = c * fm.directional(ctx.thetas[k], x, y, gq).to(infl.dtype)
        from diffin_core.engine.propagate import check_finite
        check_finite(ctx, infl, "influence")
        if need_self:
            check_finite(ctx, selfs, "self-influence")
        return infl.sum(1), selfs

    def label_issue(self, self_influence, probs, y):
        return loo_loss(self_influence, probs, y)


class TracInAdam(TracIn):
    """Adam-aware TracIn (LESS-style, Xia et al. 2024): sum_k (lr_k segment_k / N) <g_Q, D_k g_z>
    with D_k = 1/(sqrt(v_hat) + eps) from checkpoint k's recorded exp_avg_sq: the step Adam
    takes along g_z. Without a recorded preconditioner (SGD runs) D = I: plain TracIn."""
    name = "tracin-adam"

    def preconditioner(self, ctx: Context, k: int) -> torch.Tensor | None:
        R = _group_scale(ctx, k)
        if ctx.precond is None or not ctx.recipe.adam:
            return R
        return ctx.precond[k] if R is None else ctx.precond[k] * R


def _group_scale(ctx: Context, k: int) -> torch.Tensor | None:
    groups = getattr(ctx, "groups", None)
    return None if groups is None else groups.lr_scale(k, ctx.device, ctx.thetas[k].dtype)


class GradDot(Attributor):
    """<g_Q, g_z> at the final checkpoint (unscaled). Self-influence: ||g_z||^2."""
    name = "grad-dot"

    def prepare(self, ctx, qx, qy):
        return ctx.mean_grad(ctx.m - 1, qx, qy)

    def chunk(self, ctx, gq, x, y, need_self):
        theta, fm = ctx.thetas[ctx.m - 1], ctx.fm_at(ctx.m - 1)
        if not need_self:
            return fm.directional(theta, x, y, gq), None
        g = fm.per_sample_grads(theta, x, y)
        return g @ gq, rowdot(g, g)


class GradCos(GradDot):
    """cos(g_Q, g_z) at the final checkpoint. No self-influence (it would be 1);
    label_issue is the final gradient norm ||g_z||."""
    name = "grad-cos"
    has_self_influence = False

    def chunk(self, ctx, gq, x, y, need_self):
        g = ctx.fm_at(ctx.m - 1).per_sample_grads(ctx.thetas[ctx.m - 1], x, y)
        norms = torch.linalg.vector_norm(g, dim=1)
        cos = (g @ gq) / (norms * torch.linalg.vector_norm(gq)).clamp_min(1e-30)
        return cos, (norms if need_self else None)

    def run(self, ctx, qx, qy, need_self=True):
        out = super().run(ctx, qx, qy, need_self)
        if need_self:
            out["label_issue"] = out["self_influence"]
            out["self_influence"] = np.full(ctx.n, np.nan)
        return out
