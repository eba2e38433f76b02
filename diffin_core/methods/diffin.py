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
from diffin_core.engine.adam_batches import decide
from diffin_core.engine.functional import no_tf32
from diffin_core.engine.propagate import build_plan, check_finite, plan_start, plan_step, has_momentum, hessian_view, random_start
from diffin_core.methods.base import Attributor, Context, loo_loss, tap_grads
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
    uses_recipe = True

    fold_label_issue = True                    # label_issue's pass folded into the scoring walk when exact

    def __init__(self):
        self._grams = ritz_self.Grams()        # the plan's Y_i^T Y_j, made at the first chunk
        self._fold = None                      # _Fold: the label_issue walk sharing this run's gradients
        self._influence_only = False           # run(need_self=False): a batch-order replay's plan skips
                                               # the Lanczos views (only self-influence reads them)

    def prepare(self, ctx: Context, qx, qy):
        decide(ctx)                 # Adam's replay self-check: a failed one turns the batch-order path off
        return build_plan(ctx, ctx.mean_grad(ctx.m - 1, qx, qy), batches=True)   # latest checkpoint first

    # the same plan one checkpoint at a time (runner.py saves each step: resumable, streamed)
    def plan_steps(self, ctx: Context) -> int:
        return ctx.m

    def prepare_start(self, ctx: Context, qx, qy):
        decide(ctx)
        return plan_start(ctx, ctx.mean_grad(ctx.m - 1, qx, qy), batches=True)

    def prepare_step(self, ctx: Context, i: int, carry, qx=None, qy=None):
        if self._influence_only and len(carry) > 2:
            return replay_step(ctx, i, carry)
        return plan_step(ctx, i, carry)

    def chunk_parts(self, ctx, plan, x, y):
        """(influence (b, m) per checkpoint, None): the terms ``chunk`` sums when no self-influence
        is asked (the per-checkpoint plot shows these very columns)."""
        infl = torch.zeros(len(y), ctx.m, dtype=ctx.acc_dtype, device=ctx.device)
        for it in plan:
            if it.rows is None:          # else: row_terms adds the batch-order influence
                infl[:, it.k] = it.coef * ctx.fm_at(it.k).directional(ctx.thetas[it.k], x, y, it.w).to(infl.dtype)
        check_finite(ctx, infl, "influence")
        return infl, None

    def chunk(self, ctx, plan, x, y, need_self):
        if not need_self:
            return self.chunk_parts(ctx, plan, x, y)[0].sum(1), None
        if self._fold is not None and isinstance(plan, list):
            return self._folded_chunk(ctx, plan, x, y)
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
        bufs: list = []                                        # _rows_into's (b, P) buffers
        for it in plan:
            g = g_final if it.k == last else ctx.fm_at(it.k).per_sample_grads(ctx.thetas[it.k], x, y)
            tap_grads(ctx, it.k, g)
            if it.rows is None:
                infl[:, it.k] = it.coef * (g @ it.w).to(infl.dtype)
            if _in_place(it.op, u, v):
                if not bufs:                                   # u is g_final: written from here on
                    bufs = [torch.empty_like(u) for _ in range(3)]
                    u = u.clone()
                w, u, v = _rows_into(it.op, u, v, bufs)
            else:
                w, u, v = it.op.rows(u, v)
            selfs[:, it.k] = it.coef * rowdot(w, g).to(selfs.dtype)
        check_finite(ctx, infl, "influence")
        check_finite(ctx, selfs, "self-influence")
        return infl, selfs

    def _folded_chunk(self, ctx, plan, x, y):
        """The scoring walk and the label_issue walk (checkpoints 0..k*, its own plan) over one
        chunk, each checkpoint's per-sample gradients computed once for both: (influence (b,),
        self-influence (b, m), {"fold_self": (b,) self-influence of the model at k*, "fold_probs":
        (b, C) its probabilities}). The same numbers as the separate pass (the same gradients,
        plans and operators; float rounding aside)."""
        fold, last = self._fold, ctx.m - 1
        cache = {last: ctx.fm_at(last).per_sample_grads(ctx.thetas[last], x, y)}

        def grad(k):
            return cache[k] if k in cache else ctx.fm_at(k).per_sample_grads(ctx.thetas[k], x, y)
        cache[fold.k] = grad(fold.k)               # the label walk's final gradient (k* < last)
        main = ritz_self.Walk(ctx, plan, self._grams, cache[last])
        sub = ritz_self.Walk(fold.ctx, fold.plan, fold.grams, cache[fold.k])
        main_i = {it.k: i for i, it in enumerate(plan)}
        sub_i = {it.k: i for i, it in enumerate(fold.plan)}
        for k in sorted(set(main_i) | set(sub_i), reverse=True):     # both plans: latest first
            g = grad(k)
            if k in main_i:
                tap_grads(ctx, k, g)
            if k in main_i:
                main.step(main_i[k], g)
            if k in sub_i:
                sub.step(sub_i[k], g)
            del g
        del cache
        infl, selfs = main.finish()
        _, sub_selfs = sub.finish()
        with torch.no_grad(), torch.autocast(ctx.device.type, enabled=False):   # float32, as score_rows
            probs = torch.softmax(ctx.fm_at(fold.k).logits(ctx.thetas[fold.k], x), -1)
        return infl.sum(1), selfs, {"fold_self": sub_selfs.sum(1), "fold_probs": probs}

    def _make_fold(self, ctx, qx, qy, k: int):
        """The label_issue walk's plan on the trajectory cut at checkpoint k, built as its
        separate run builds it (runner.memory_plan/configure/prepare on the truncated context),
        or None where the fold does not apply: Adam's direct walk or batch-order terms, or plans
        too large to hold both in memory (then the separate pass runs, as before)."""
        from diffin_core.methods import runner
        from diffin_core.methods.label_issue import truncate_context
        if not ritz_self.applies(ctx) or getattr(ctx, "batch_order", None) is not None \
                or not getattr(type(self), "fold_label_issue", False):
            return None
        mem = runner.memory_plan(self, ctx, True)
        entry = runner.plan_vectors(self, ctx) * ctx.fm.num_params * torch.tensor([], dtype=ctx.dtype).element_size()
        if mem.cached_checkpoints < ctx.m or (k + 1) * entry > mem.budget // 4:
            return None
        sub_ctx = truncate_context(ctx, k)
        sub = type(self)()
        sub_ctx.progress = ctx.progress
        runner.configure(sub_ctx, runner.memory_plan(sub, sub_ctx, True))
        plan = runner.prepare(sub, sub_ctx, qx, qy, runner.Stages(None, runner.StageSettings(sub.name, {}, "", "")))
        if not isinstance(plan, list):
            return None
        return _Fold(k, sub_ctx, plan, ritz_self.Grams())

    def memory_key(self, ctx) -> str:
        """budget.GRAD_ROWS key: Adam recipes take the direct walk (more P-vectors per row); the
        folded label_issue walk holds one more gradient per row."""
        if self._fold is not None:
            return "diffin-fold"
        return "diffin" if ritz_self.applies(ctx) else "diffin-adam"

    def row_terms(self, ctx, plan, start: int, stop: int) -> np.ndarray | None:
        """Influence of rows [start, stop) that plan items hold per sample (Adam with a recorded
        batch order: adam_batches.py), float64, or None. runner.score_rows adds it."""
        parts = [it.rows[start:stop].double().cpu().numpy() for it in plan if getattr(it, "rows", None) is not None]
        return np.sum(parts, axis=0) if parts else None

    def label_issue(self, self_influence, probs, y):
        return loo_loss(self_influence, probs, y)

    def run(self, ctx, qx, qy, need_self=True):
        """label_issue = the estimated leave-one-out loss at the checkpoint k* with the lowest
        query loss. When k* is not the last checkpoint its self-influence walk is folded into
        the scoring walk (``_folded_chunk``: one per-sample gradient per checkpoint for both;
        its plan is built first), else, where the fold does not apply, one more pass
        (label_issue.early_stopped_loo_loss)."""
        import time
        from diffin_core.methods.base import loo_loss
        from diffin_core.methods.label_issue import (best_checkpoint, early_stopped_loo_loss, query_loss_by_checkpoint,
                                                     share_probes)
        started = time.perf_counter()
        k = None
        if need_self:
            k = best_checkpoint(query_loss_by_checkpoint(ctx, qx, qy), ctx.steps)
            if k < ctx.m - 1:
                ctx.progress(0, ctx.n, f"{self.name}: label issues at {ctx.label(k)} (the lowest query loss): "
                             "its plan, then one walk for both")
                self._fold = self._make_fold(ctx, qx, qy, k)
                if self._fold is not None:          # its probes' HVP decisions for the query plan
                    share_probes(ctx, self._fold.ctx)
        fold_s = time.perf_counter() - started
        self._influence_only = not need_self
        try:
            out = super().run(ctx, qx, qy, need_self)
        finally:
            folded, self._fold = self._fold, None
            self._influence_only = False
        if need_self:
            started = time.perf_counter()
            folded = folded if folded is not None and "fold_self" in out else None
            if folded is not None:
                out["label_issue"] = loo_loss(out.pop("fold_self"), out.pop("fold_probs"), np.asarray(ctx.train.y))
            else:
                out.pop("fold_self", None), out.pop("fold_probs", None)
                out["label_issue"], _k = early_stopped_loo_loss(self, ctx, qx, qy, out)
            timings = getattr(ctx, "timings", None)
            if isinstance(timings, dict):          # meta.json: the label_issue part, k* and whether folded
                timings["label_issue_s"] = round(fold_s + time.perf_counter() - started, 3)
                timings["label_issue_checkpoint"] = int(k)
                timings["label_issue_folded"] = folded is not None
        return out


def _in_place(op, u: torch.Tensor, v: torch.Tensor | None) -> bool:
    """Whether _rows_into applies: Adam's scaled operator (one param group), a momentum adjoint,
    every tensor of one dtype and device (then op.rows' result dtype is u's)."""
    if op is None or op.scale is None or op.expand is not None or v is None or u.dim() != 2:
        return False
    Y = op.view.vectors
    return all(t.dtype == u.dtype and t.device == u.device for t in (v, op.scale, Y, op.W, op.C))


def _rows_into(op, u: torch.Tensor, v: torch.Tensor, bufs: list):
    """op.rows(u, v) (propagate.SegmentOp) for the direct walk's (b, P) adjoints, in place:
    returns (w, u, v) with u and v overwritten by the adjoints at the segment's start and w in
    bufs[2]; bufs[0:2] are scratch. op.rows makes about a dozen (b, P) temporaries per checkpoint
    (141 MB each at b = 256 on the text sample's 137,538 parameters): allocated afresh each time
    they are page-faulted in again, which cost the sample's score 46 s of system time. The same
    sums (coefs Y^T + f(0) u S + f(0) v S^-1, then scaled), added in another order: float
    rounding apart, the same numbers (tests/test_replay_query.py)."""
    S, inv, Y = op.scale, op.inv_scale, op.view.vectors
    us, vs, w = bufs
    torch.mul(u, S, out=us)
    torch.mul(v, inv, out=vs)
    cu, cv = us @ Y, vs @ Y
    maps = ((op.W[:, 0], op.W[:, 1], w, S), (op.C[:, 0, 0], op.C[:, 0, 1], u, inv),
            (op.C[:, 1, 0], op.C[:, 1, 1], v, S))
    for fu, fv, out, post in maps:
        coef = cu * (fu[:-1] - fu[-1]) + cv * (fv[:-1] - fv[-1])
        torch.mm(coef, Y.T, out=out)
        out.addcmul_(us, fu[-1])
        out.addcmul_(vs, fv[-1])
        out.mul_(post)
    return w, u, v


def replay_step(ctx: Context, i: int, carry):
    """plan_step for influence alone on a batch-order replay (Adam's or SGD's): checkpoint
    k = m-1-i's replayed interval, without the Lanczos view of its Hessian. The replay's ``rows``
    are the whole influence of the interval's samples (chunk_parts and row_terms read nothing
    else); the view, ``w`` and the checkpoint walk's carried (u, v) only serve self-influence,
    which a query's top-k (``run(need_self=False)``) does not ask for. The same influence as
    plan_step's items, without 10-20 exact HVPs on the Hessian batch per checkpoint."""
    from diffin_core.engine.propagate import PlanItem
    u, v, state = carry
    k = ctx.m - 1 - i
    lo, hi = int(ctx.bounds[k]), int(ctx.bounds[k + 1])
    if hi <= lo:
        return None, carry
    if ctx.recipe.adam:
        from diffin_core.engine.adam_batches import segment
    else:
        from diffin_core.engine.sgd_batches import segment
    rows, state, check = segment(ctx, k, state)
    return PlanItem(k, 1.0 / ctx.n, None, None, rows, check), (u, v, state)


class _Fold:
    """DiffIn's label_issue walk riding on the scoring walk: k*, the truncated context, its plan."""

    def __init__(self, k: int, ctx, plan: list, grams):
        self.k, self.ctx, self.plan, self.grams = int(k), ctx, plan, grams


class DiffInPaper(Attributor):
    name = "diffin-paper"
    uses_recipe = True

    def prepare(self, ctx: Context, qx, qy):
        plan = []
        for k in range(ctx.m):
            factor = ctx.steps[k] * ctx.lrs[k] ** 2 / (ctx.n * ctx.m)
            if factor <= 0:
                continue
            xb, yb = ctx.sample_batch(ctx.settings.paper_batch, k, salt=1)
            view, gb = hessian_view(ctx, k, random_start(ctx, k, salt=1), (xb, yb), scaled=False)
            gb = gb()
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
