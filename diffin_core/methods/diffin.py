"""Diff-In: influence as the sum of its per-step changes, each taken to second order.

``diffin`` (the product's estimator). Removing z changes the trajectory by
    delta_{s+1} = (I - lr_s H_s) delta_s + (lr_s / N) g_z(theta_s)        (plain SGD)
so influence(z, Q) = sum_s (lr_s / N) <u_{s+1}, g_z(theta_s)> with u_T = g_Q(theta_T) and
u_s = (I - lr_s H_s) u_{s+1}. With only checkpoints saved, checkpoint k stands for the steps
nearest to it (its own lrs, the Hessian H_k of a fixed batch at theta_k with its own buffers).
Walking back from the final checkpoint, per checkpoint (propagate.build_plan):
    w_k = W_k(H_k) u      (the segment's summed, lr-weighted queries)
    u  <- C_k(H_k) u      (carry u to the segment's start)
    influence(z) = sum_k (1 / N) <w_k, g_z(theta_k)>.
Momentum (heavy ball, Nesterov), weight decay (coupled, decoupled), Adam/AdamW's recorded
preconditioner and any lr schedule change only W and C: exact 2x2 recurrences per Ritz value
(see propagate.py). W and C are applied through a Lanczos view of H_k started at u, whose
matvecs are finite-difference Hessian-vector products (paper Eq. 6, TF32 off): ``lanczos_steps``
extra gradients of one batch per checkpoint, independent of the segment length, and
unconditionally stable (Ritz values clipped so every step contracts). The training set is then
scored by one dot product per checkpoint and sample. Self-influence (Q = {z}) propagates each
sample's own final gradient back through the same low-rank views (the unexplored complement
counts as zero curvature), per checkpoint ("self_by_checkpoint"), in the Ritz coordinates of
ritz_self.py (no P-sized adjoint per row; Adam with a recorded preconditioner: the direct walk,
``direct_walk``); label_issue is the estimated
leave-one-out loss, loss + self-influence (nats), for the model at the checkpoint with the lowest
query loss (label_issue.early_stopped_loo_loss; the final checkpoint when the model does not
overfit the query set).

``diffin-paper``: the published checkpoint estimator (Eq. 9; Eq. 12 for self-influence) with
one random batch B of 128 per checkpoint, mapped to the product's sign (the published term
has the opposite sign):  sum_k t_k lr_k^2 / (N m) <g_Q, H_B g_z + H_z g_B>. H_z g_B per sample
is a finite difference of per-sample gradients along g_B; <g_z, H_B g_z> in Eq. 12 uses the
Lanczos view of H_B (a per-sample HVP with the full batch would cost N batch gradients).
"""
from __future__ import annotations

import numpy as np
import torch

from diffin_core.methods import ritz_self
from diffin_core.engine.functional import no_tf32
from diffin_core.engine.propagate import build_plan, check_finite, plan_start, plan_step, has_momentum, hessian_view, random_start
from diffin_core.methods.base import Attributor, Context, loo_loss
from diffin_core.methods.first_order import rowdot


def interval_functions(lr: float, steps: float):
    """(phi, a) of a constant-lr plain-SGD segment on Hessian eigenvalues: phi(l) =
    sum_{j<steps} (1 - lr l)^j, a(l) = (1 - lr l)^steps, l clipped to [0, 1/lr].
    (The general case, any recipe or schedule, is propagate.segment_coefficients.)"""
    def clip(l):
        return l.clamp(0.0, 1.0 / lr) if lr > 0 else torch.zeros_like(l)

    def a(l):
        return (1.0 - lr * clip(l)) ** steps

    def phi(l):
        x = lr * clip(l)
        safe = torch.where(x > 1e-8, x, torch.ones_like(x))
        return torch.where(x > 1e-8, (1.0 - (1.0 - x) ** steps) / safe, torch.full_like(x, float(steps)))
    return phi, a


class DiffIn(Attributor):
    name = "diffin"

    def __init__(self):
        self._grams = ritz_self.Grams()        # the plan's Y_i^T Y_j, made at the first chunk

    def prepare(self, ctx: Context, qx, qy):
        return build_plan(ctx, ctx.mean_grad(ctx.m - 1, qx, qy), batches=True)   # latest checkpoint first

    # the same plan one checkpoint at a time (runner.py saves each step: resumable, streamed)
    def plan_steps(self, ctx: Context) -> int:
        return ctx.m

    def prepare_start(self, ctx: Context, qx, qy):
        return plan_start(ctx, ctx.mean_grad(ctx.m - 1, qx, qy), batches=True)

    def prepare_step(self, ctx: Context, i: int, carry, qx=None, qy=None):
        return plan_step(ctx, i, carry)

    def chunk(self, ctx, plan, x, y, need_self):
        infl = torch.zeros(len(y), ctx.m, dtype=ctx.acc_dtype, device=ctx.device)
        if not need_self:
            for it in plan:
                if it.rows is None:          # else: row_terms adds the batch-order influence
                    infl[:, it.k] = it.coef * ctx.fm_at(it.k).directional(ctx.thetas[it.k], x, y, it.w).to(infl.dtype)
            check_finite(ctx, infl, "influence")
            return infl.sum(1), None
        if ritz_self.applies(ctx):              # exact, no P-sized adjoints per row (ritz_self.py)
            infl, selfs = ritz_self.walk(ctx, plan, x, y, self._grams)
        else:
            infl, selfs = self.direct_walk(ctx, plan, x, y)
        return infl.sum(1), selfs

    def direct_walk(self, ctx, plan, x, y):
        """(influence (b, m), self-influence (b, m)): each row's own adjoints (u, v) carried back
        through the plan with SegmentOp.rows (any recipe; Adam's scale included)."""
        infl = torch.zeros(len(y), ctx.m, dtype=ctx.acc_dtype, device=ctx.device)
        selfs = torch.zeros_like(infl)
        last = ctx.m - 1
        g_final = ctx.fm_at(last).per_sample_grads(ctx.thetas[last], x, y)
        u = g_final                                            # each sample's own query gradient
        v = torch.zeros_like(u) if has_momentum(ctx.recipe) else None      # and its momentum adjoint
        for it in plan:
            g = g_final if it.k == last else ctx.fm_at(it.k).per_sample_grads(ctx.thetas[it.k], x, y)
            if it.rows is None:
                infl[:, it.k] = it.coef * (g @ it.w).to(infl.dtype)
            w, u, v = it.op.rows(u, v)
            selfs[:, it.k] = it.coef * rowdot(w, g).to(selfs.dtype)
        check_finite(ctx, infl, "influence")
        check_finite(ctx, selfs, "self-influence")
        return infl, selfs

    def memory_key(self, ctx) -> str:
        """budget.GRAD_ROWS key: Adam recipes take the direct walk (more P-vectors per row)."""
        return "diffin" if ritz_self.applies(ctx) else "diffin-adam"

    def row_terms(self, ctx, plan, start: int, stop: int) -> np.ndarray | None:
        """Influence of rows [start, stop) that plan items hold per sample (Adam with a recorded
        batch order: adam_batches.py), float64, or None. runner.score_rows adds it."""
        parts = [it.rows[start:stop].double().cpu().numpy() for it in plan if getattr(it, "rows", None) is not None]
        return np.sum(parts, axis=0) if parts else None

    def label_issue(self, self_influence, probs, y):
        return loo_loss(self_influence, probs, y)

    def run(self, ctx, qx, qy, need_self=True):
        """label_issue = the estimated leave-one-out loss at the checkpoint with the lowest query
        loss (label_issue.early_stopped_loo_loss: one more self-influence pass up to it)."""
        out = super().run(ctx, qx, qy, need_self)
        if need_self:
            from diffin_core.methods.label_issue import early_stopped_loo_loss
            out["label_issue"], _k = early_stopped_loo_loss(self, ctx, qx, qy, out)
        return out


class DiffInPaper(Attributor):
    name = "diffin-paper"

    def prepare(self, ctx: Context, qx, qy):
        plan = []
        for k in range(ctx.m):
            factor = ctx.steps[k] * ctx.lrs[k] ** 2 / (ctx.n * ctx.m)
            if factor <= 0:
                continue
            xb, yb = ctx.sample_batch(ctx.settings.paper_batch, k, salt=1)
            view, gb = hessian_view(ctx, k, random_start(ctx, k, salt=1), (xb, yb), scaled=False)
            gq = ctx.mean_grad(k, qx, qy)
            hb_gq = ctx.fm_at(k).hvp_fd(ctx.thetas[k], xb, yb, gq, eps=ctx.settings.eps)
            h = ctx.settings.eps / torch.linalg.vector_norm(gb).clamp_min(1e-30)
            plan.append((k, float(factor), gq, hb_gq, gb, float(h), view))
        return plan

    def chunk(self, ctx, plan, x, y, need_self):
        infl = torch.zeros(len(y), dtype=ctx.acc_dtype, device=ctx.device)
        selfs = torch.zeros_like(infl) if need_self else None
        for k, factor, gq, hb_gq, gb, h, view in plan:
            theta, fm = ctx.thetas[k], ctx.fm_at(k)
            if not need_self:
                with no_tf32():
                    d0 = fm.directional(theta, x, y, gq)
                    d1 = fm.directional(theta + h * gb, x, y, gq)
                infl += factor * (fm.directional(theta, x, y, hb_gq) + (d1 - d0) / h)
                continue
            with no_tf32():
                g = fm.per_sample_grads(theta, x, y)
                hz_gb = (fm.per_sample_grads(theta + h * gb, x, y) - g) / h     # (b, P)
            infl += factor * (g @ hb_gq + hz_gb @ gq)
            selfs += factor * (rowdot(view.apply(lambda l: l, g), g) + rowdot(g, hz_gb))
        return infl, selfs
