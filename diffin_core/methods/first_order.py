"""First-order estimators: TracIn (checkpoint sum), grad-dot and grad-cos (final checkpoint)."""
from __future__ import annotations

import numpy as np
import torch

from .base import Attributor, Context, loo_loss


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


class TracIn(Attributor):
    """tracin(z, Q) = sum_k (lr_k * segment_k / N) <g_Q, g_z> at checkpoint k.

    Self-influence: the same with g_Q = g_z (sum of weighted squared gradient norms);
    label_issue: the estimated leave-one-out loss (final loss + self-influence).
    """
    name = "tracin"

    def prepare(self, ctx: Context, qx, qy):
        coef = ctx.lrs * ctx.segments / ctx.n
        return [(k, float(coef[k]), ctx.mean_grad(k, qx, qy)) for k in range(ctx.m) if coef[k] > 0]

    def chunk(self, ctx, state, x, y, need_self):
        infl = torch.zeros(len(y), dtype=torch.float64, device=ctx.device)
        selfs = torch.zeros_like(infl) if need_self else None
        for k, c, gq in state:
            if need_self:
                g = ctx.fm.per_sample_grads(ctx.thetas[k], x, y)
                infl += c * (g @ gq)
                selfs += c * rowdot(g, g)
            else:
                infl += c * ctx.fm.directional(ctx.thetas[k], x, y, gq)
        return infl, selfs

    def label_issue(self, self_influence, probs, y):
        return loo_loss(self_influence, probs, y)


class GradDot(Attributor):
    """<g_Q, g_z> at the final checkpoint (unscaled). Self-influence: ||g_z||^2."""
    name = "grad-dot"

    def prepare(self, ctx, qx, qy):
        return ctx.mean_grad(ctx.m - 1, qx, qy)

    def chunk(self, ctx, gq, x, y, need_self):
        theta = ctx.thetas[-1]
        if not need_self:
            return ctx.fm.directional(theta, x, y, gq), None
        g = ctx.fm.per_sample_grads(theta, x, y)
        return g @ gq, rowdot(g, g)


class GradCos(GradDot):
    """cos(g_Q, g_z) at the final checkpoint. No self-influence (it would be 1);
    label_issue is the final gradient norm ||g_z||."""
    name = "grad-cos"
    has_self_influence = False

    def chunk(self, ctx, gq, x, y, need_self):
        g = ctx.fm.per_sample_grads(ctx.thetas[-1], x, y)
        norms = torch.linalg.vector_norm(g, dim=1)
        cos = (g @ gq) / (norms * torch.linalg.vector_norm(gq)).clamp_min(1e-30)
        return cos, (norms if need_self else None)

    def run(self, ctx, qx, qy, need_self=True):
        out = super().run(ctx, qx, qy, need_self)
        if need_self:
            out["label_issue"] = out["self_influence"]
            out["self_influence"] = np.full(ctx.n, np.nan)
        return out
