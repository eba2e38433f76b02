"""Influence functions (Koh & Liang 2017) at the final checkpoint.

influence(z, Q) = <g_Q, (H + lambda I)^-1 g_z> / N, H the training-loss Hessian at the final
weights with negative eigenvalues clipped to 0 (a non-convex net's Hessian is indefinite).
Up to ``explicit_max_params`` parameters H is built exactly and eigendecomposed; above that the
query side is solved by conjugate gradients with exact HVPs on ``hessian_batch`` samples and the
self-influence uses a Lanczos low-rank view (the complement counts as curvature 0).
label_issue: the estimated leave-one-out loss (final loss + self-influence).
"""
from __future__ import annotations

import torch
from torch.func import hessian

from diffin_core.engine.lanczos import SpectralView, lanczos
from diffin_core.methods.base import Attributor, Context, loo_loss
from diffin_core.methods.first_order import rowdot


def conjugate_gradient(matvec, b: torch.Tensor, iters: int, tol: float = 1e-6) -> torch.Tensor:
    """Solve A x = b by CG. A non-convex net's damped Hessian can still be indefinite: on a
    direction of non-positive curvature CG stops and returns its current iterate (Steihaug),
    which keeps the solution finite and on the well-conditioned part of the spectrum."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = torch.dot(r, r)
    for _ in range(iters):
        ap = matvec(p)
        curvature = torch.dot(p, ap)
        if not curvature > 0:
            return x if torch.any(x != 0) else b      # first step already indefinite: grad-dot
        alpha = rs / curvature
        x += alpha * p
        r -= alpha * ap
        rs_new = torch.dot(r, r)
        if rs_new.sqrt() <= tol * torch.linalg.vector_norm(b):
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def explicit_hessian_view(ctx: Context) -> SpectralView:
    """Eigendecomposition of the exact training-loss Hessian at the final weights, built once per
    context (cached on it: several query sets on one context, e.g. one per query sample in the
    LDS benchmark, share it; the Hessian does not depend on the query)."""
    theta = ctx.thetas[ctx.m - 1]
    cached = getattr(ctx, "_explicit_hessian", None)
    if cached is not None and cached[0] is theta:
        return cached[1]
    H = torch.zeros(ctx.fm.num_params, ctx.fm.num_params, dtype=theta.dtype, device=ctx.device)
    for sl, x, y in ctx.chunks():
        H += hessian(ctx.fm.mean_loss)(theta, x, y).detach() * len(y)
        ctx.progress(0, ctx.n, "influence-function: building the Hessian")
    values, vectors = torch.linalg.eigh(H / ctx.n)
    view = SpectralView(values, vectors)
    ctx._explicit_hessian = (theta, view)
    return view


class InfluenceFunction(Attributor):
    name = "influence-function"

    def prepare(self, ctx: Context, qx, qy):
        s, theta = ctx.settings, ctx.thetas[-1]
        inv = lambda l: 1.0 / (l.clamp_min(0.0) + s.damping)   # noqa: E731
        gq = ctx.mean_grad(ctx.m - 1, qx, qy)
        if ctx.fm.num_params <= s.explicit_max_params:
            view = explicit_hessian_view(ctx)
            direction = view.apply(inv, gq)
        else:
            x, y = ctx.sample_batch(ctx.hessian_rows, ctx.m - 1)
            direction = conjugate_gradient(lambda v: ctx.fm.hvp_exact(theta, x, y, v) + s.damping * v, gq, s.cg_iters)
            view = lanczos(lambda v: ctx.fm.hvp_exact(theta, x, y, v), torch.randn_like(theta), s.lanczos_steps)
        return direction / ctx.n, view, inv

    def chunk(self, ctx, state, x, y, need_self):
        direction, view, inv = state
        theta = ctx.thetas[-1]
        if not need_self:
            return ctx.fm.directional(theta, x, y, direction), None
        g = ctx.fm.per_sample_grads(theta, x, y)
        return g @ direction, rowdot(view.apply(inv, g), g) / ctx.n

    def label_issue(self, self_influence, probs, y):
        return loo_loss(self_influence, probs, y)
