"""Diff-In: influence as the sum of its per-step changes, each taken to second order.

``diffin`` (the product's estimator). Removing z changes the trajectory by
    delta_{s+1} = (I - lr_s H_s) delta_s + (lr_s / N) g_z(theta_s),
so influence(z, Q) = sum_s (lr_s / N) <u_{s+1}, g_z(theta_s)> with u_T = g_Q(theta_T) and
u_s = (I - lr_s H_s) u_{s+1}. With only checkpoints saved, checkpoint k stands for the
``segment_k`` steps nearest to it (lr_k, Hessian H_k of a fixed batch at theta_k). Walking back
from the final checkpoint, per checkpoint:
    w_k = phi_k(H_k) u,   phi(l) = sum_{j<segment} (1 - lr l)^j     (the steps' summed queries)
    u  <- a_k(H_k) u,     a(l)   = (1 - lr l)^segment               (carry u to the earlier steps)
    influence(z) = sum_k (lr_k / N) <w_k, g_z(theta_k)>.
phi and a are applied through a Lanczos decomposition of H_k started at u, whose matvecs are
finite-difference Hessian-vector products (paper Eq. 6): ``lanczos_steps`` extra gradients of
one batch per checkpoint, independent of the segment length, and unconditionally stable because
the functions are evaluated exactly on the Ritz values (clipped to [0, 1/lr], so every factor
stays in [0, 1]). The training set is then scored by one dot product per checkpoint and sample.
Self-influence (Q = {z}) propagates each sample's own final gradient back through the same
low-rank views (the unexplored complement counts as zero curvature); label_issue is the
estimated leave-one-out loss, final loss + self-influence (nats).

``diffin-paper``: the published checkpoint estimator (Eq. 9; Eq. 12 for self-influence) with
one random batch B of 128 per checkpoint, mapped to the product's sign (the published term
has the opposite sign):  sum_k t_k lr_k^2 / (N m) <g_Q, H_B g_z + H_z g_B>. H_z g_B per sample
is a finite difference of per-sample gradients along g_B; <g_z, H_B g_z> in Eq. 12 uses the
Lanczos view of H_B (a per-sample HVP with the full batch would cost N batch gradients).
"""
from __future__ import annotations

import torch

from ..lanczos import lanczos
from .base import Attributor, Context, loo_loss
from .first_order import rowdot


def interval_functions(lr: float, steps: float):
    """(phi, a) for one checkpoint segment, applied to Hessian eigenvalues."""
    def clip(l):
        return l.clamp(0.0, 1.0 / lr) if lr > 0 else torch.zeros_like(l)

    def a(l):
        return (1.0 - lr * clip(l)) ** steps

    def phi(l):
        x = lr * clip(l)
        safe = torch.where(x > 1e-8, x, torch.ones_like(x))
        return torch.where(x > 1e-8, (1.0 - (1.0 - x) ** steps) / safe, torch.full_like(x, float(steps)))
    return phi, a


def hessian_view(ctx: Context, k: int, start: torch.Tensor, batch, salt: int = 0):
    """Lanczos view of the batch Hessian at checkpoint k (finite-difference HVPs by default)."""
    x, y = batch
    theta = ctx.thetas[k]
    g0 = ctx.fm.batch_grad(theta, x, y)
    if ctx.settings.hvp == "exact":
        matvec = lambda v: ctx.fm.hvp_exact(theta, x, y, v)                          # noqa: E731
    else:
        matvec = lambda v: ctx.fm.hvp_fd(theta, x, y, v, base_grad=g0, eps=ctx.settings.eps)  # noqa: E731
    return lanczos(matvec, start, ctx.settings.lanczos_steps), g0


class DiffIn(Attributor):
    name = "diffin"

    def prepare(self, ctx: Context, qx, qy):
        u = ctx.mean_grad(ctx.m - 1, qx, qy)
        plan = []
        for k in reversed(range(ctx.m)):
            lr, seg = float(ctx.lrs[k]), float(ctx.segments[k])
            phi, a = interval_functions(lr, seg)
            if lr <= 0 or seg <= 0 or not torch.any(u != 0):
                continue
            view, _ = hessian_view(ctx, k, u, ctx.sample_batch(ctx.settings.hessian_batch, k))
            plan.append((k, lr / ctx.n, view.apply(phi, u), view, phi, a))
            u = view.apply(a, u)
            ctx.progress(0, ctx.n, f"diffin: propagated the query through checkpoint {k + 1}/{ctx.m}")
        return plan   # latest checkpoint first

    def chunk(self, ctx, plan, x, y, need_self):
        infl = torch.zeros(len(y), dtype=torch.float64, device=ctx.device)
        if not need_self:
            for k, c, w, *_ in plan:
                infl += c * ctx.fm.directional(ctx.thetas[k], x, y, w)
            return infl, None
        selfs = torch.zeros_like(infl)
        g_final = ctx.fm.per_sample_grads(ctx.thetas[-1], x, y)
        u = g_final                                            # each sample's own query gradient
        for k, c, w, view, phi, a in plan:
            g = g_final if k == ctx.m - 1 else ctx.fm.per_sample_grads(ctx.thetas[k], x, y)
            infl += c * (g @ w)
            # <phi(H) u, g> and a(H) u through the low-rank view, without forming phi(H) u:
            # phi(0) = segment and a(0) = 1 on the complement of the Ritz vectors.
            seg = float(ctx.segments[k])
            cu, cg = u @ view.vectors, g @ view.vectors
            selfs += c * (seg * rowdot(u, g) + (cu * (phi(view.values) - seg) * cg).sum(-1))
            u = u + (cu * (a(view.values) - 1.0)) @ view.vectors.T
        return infl, selfs

    def label_issue(self, self_influence, probs, y):
        return loo_loss(self_influence, probs, y)


class DiffInPaper(Attributor):
    name = "diffin-paper"

    def prepare(self, ctx: Context, qx, qy):
        plan = []
        for k in range(ctx.m):
            factor = ctx.steps[k] * ctx.lrs[k] ** 2 / (ctx.n * ctx.m)
            if factor <= 0:
                continue
            xb, yb = ctx.sample_batch(ctx.settings.paper_batch, k, salt=1)
            view, gb = hessian_view(ctx, k, torch.randn_like(ctx.thetas[k]), (xb, yb))
            gq = ctx.mean_grad(k, qx, qy)
            hb_gq = ctx.fm.hvp_fd(ctx.thetas[k], xb, yb, gq, eps=ctx.settings.eps)
            h = ctx.settings.eps / torch.linalg.vector_norm(gb).clamp_min(1e-30)
            plan.append((k, float(factor), gq, hb_gq, gb, float(h), view))
        return plan

    def chunk(self, ctx, plan, x, y, need_self):
        infl = torch.zeros(len(y), dtype=torch.float64, device=ctx.device)
        selfs = torch.zeros_like(infl) if need_self else None
        for k, factor, gq, hb_gq, gb, h, view in plan:
            theta = ctx.thetas[k]
            if not need_self:
                d0 = ctx.fm.directional(theta, x, y, gq)
                d1 = ctx.fm.directional(theta + h * gb, x, y, gq)
                infl += factor * (ctx.fm.directional(theta, x, y, hb_gq) + (d1 - d0) / h)
                continue
            g = ctx.fm.per_sample_grads(theta, x, y)
            hz_gb = (ctx.fm.per_sample_grads(theta + h * gb, x, y) - g) / h     # (b, P)
            infl += factor * (g @ hb_gq + hz_gb @ gq)
            selfs += factor * (rowdot(view.apply(lambda l: l, g), g) + rowdot(g, hz_gb))
        return infl, selfs
