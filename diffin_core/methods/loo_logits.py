"""Diff-In's estimated leave-one-out logits of every training sample (no retraining).

Removing z from training moves the weights by delta_z (theta without z minus theta). Diff-In
carries a query's gradient back through the checkpoints' Lanczos views (propagate.py); with the
query "logit c of z at checkpoint k", the same walk gives the first-order change of that logit:

    dlogit_c(z) = < grad_theta f_c(z; theta_k), delta_z >
                = sum_{j <= k} coef_j < w_j^(c), g_z(theta_j) >,
    w_j^(c), carried u  =  the segment ops of checkpoints k, k-1, .., 0 applied to the start
                           grad_theta f_c(z; theta_k) (checkpoint k's segment cut at step_k),

one adjoint per class and sample, all in one backward pass. Units: logits (natural-log odds).
Consistency: g_z = J_z^T (p_z - e_y), so sum_c (p_c - e_y,c) dlogit_c = Diff-In's self-influence
SI_k(z) (label_issue.mean_self_influence) exactly: the self-influence is this shift read
through the loss's gradient.

Why logits and not the loss: a memorised sample has p_z ~ e_y, so its loss gradient at the
final checkpoint is ~0 and a loss-linear estimate (loss + SI) cannot see a large weight change
delta_z; the logits stay ~linear in theta where the softmax saturates. The leave-one-out
probabilities are then softmax(logits + dlogits): an out-of-sample probability matrix (N, C)
for confident learning (cleanlab), from one training run.

Status: a measured candidate, not the product's label_issue (benchmarks/label_errors.py, its
"diffin LOO logits" rows; benchmarks/README.md section 5). Cost: C adjoints per sample, i.e. about
C times the propagation of a self-influence pass, plus one per-sample logit Jacobian.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.func import jacrev, vmap


def per_sample_logit_jacobians(fm, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d logits / d theta for each sample: (b, C, P), via vmap(jacrev)."""
    def one(t, xi):
        return fm.logits(t, xi.unsqueeze(0))[0]
    return vmap(jacrev(one), in_dims=(None, 0))(theta, x).detach()


def loo_logit_shift(ctx, plan, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Estimated change of the logits of one chunk's samples at checkpoint k had each been left
    out of training: (b, C), logits. ``plan``: the method's query plan (DiffIn.prepare, latest
    checkpoint first); checkpoints after k are skipped, checkpoint k's segment is cut at step_k."""
    from diffin_core.methods.label_issue import _truncated_op
    from diffin_core.engine.propagate import has_momentum
    b = len(y)
    shift = None
    u = v = None
    for it in plan:                                          # latest checkpoint first
        if it.k > k:
            continue
        theta, fm = ctx.thetas[it.k], ctx.fm_at(it.k)
        g = fm.per_sample_grads(theta, x, y)                 # (b, P)
        if u is None:
            jac = per_sample_logit_jacobians(fm, theta, x)   # (b, C, P)
            c = jac.shape[1]
            shift = torch.zeros(b, c, dtype=ctx.acc_dtype, device=ctx.device)
            start = jac.reshape(b * c, -1)
            momentum = torch.zeros_like(start) if has_momentum(ctx.recipe) else None
            w, u, v = _truncated_op(ctx, it.op, k).rows(start, momentum)
        else:
            w, u, v = it.op.rows(u, v)
        shift += it.coef * (w.view(b, -1, w.shape[-1]) * g[:, None, :]).sum(-1).to(shift.dtype)
    if shift is None:
        raise ValueError(f"checkpoint {k} owns no training steps: no leave-one-out logits there")
    return shift


def loo_logits(method, ctx, qx, qy, k: int | None = None, plan=None) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, C), estimated leave-one-out shift (N, C)) of every training sample for the
    model at checkpoint k (default: the last). The plan is ``method.prepare(ctx, qx, qy)``
    (deterministic: the run's seeded batches and Lanczos views) unless given."""
    k = ctx.m - 1 if k is None else int(k)
    plan = method.prepare(ctx, qx, qy) if plan is None else plan
    logits, shifts = [], []
    rows = max(1, ctx.chunk_rows(True) // 10)               # C adjoints per sample (~10 classes)
    for sl, x, y in ctx.chunks(size=rows):
        with torch.no_grad():
            logits.append(ctx.fm_at(k).logits(ctx.thetas[k], x).double().cpu())
        shifts.append(loo_logit_shift(ctx, plan, x, y, k).double().cpu())
        ctx.progress(sl.stop, ctx.n, f"{method.name}: leave-one-out logits at checkpoint {k + 1}/{ctx.m}")
    return torch.cat(logits).numpy(), torch.cat(shifts).numpy()


def loo_probs(logits: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """softmax(logits + shift): the estimated out-of-sample probabilities (N, C)."""
    return torch.softmax(torch.as_tensor(logits + shift), -1).numpy()


def loo_cross_entropy(logits: np.ndarray, shift: np.ndarray, y: np.ndarray) -> np.ndarray:
    """-log softmax(logits + shift)[y]: the estimated leave-one-out loss (N,), nats, read through
    the logits (saturates where the loss-linear loss + self-influence cannot)."""
    logp = torch.log_softmax(torch.as_tensor(logits + shift, dtype=torch.float64), -1).numpy()
    return -logp[np.arange(len(y)), np.asarray(y)]


def early_stopped_loo_logit_loss(method, ctx, qx, qy) -> tuple[np.ndarray, int]:
    """(label issue (N,), k*): the candidate rule of benchmarks/label_errors.py. The estimated
    leave-one-out loss at the checkpoint with the lowest query loss (as the product's rule,
    label_issue.early_stopped_loo_loss) read through the logits: loo_cross_entropy of the
    truncated run's logits and their Diff-In shift. Same plan as the product's rule (the
    trajectory cut at k*), so to first order in the shift it is the product's loss + self-influence."""
    from diffin_core.methods.label_issue import best_checkpoint, query_loss_by_checkpoint, truncate_context
    k = best_checkpoint(query_loss_by_checkpoint(ctx, qx, qy), ctx.steps)
    cut = truncate_context(ctx, k) if k < ctx.m - 1 else ctx
    logits, shift = loo_logits(method, cut, qx, qy)
    return loo_cross_entropy(logits, shift, np.asarray(ctx.train.y)), k
