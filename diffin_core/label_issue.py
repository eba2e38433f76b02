"""Label issues from the whole training trajectory.

A network that fits its training labels, flips included, ends with a low loss on a memorised
wrong label, so the final loss says little. What does not fade is the loss the sample would
have had if it had never been trained on (its leave-one-out loss): the rest of the data keeps
contradicting a wrong label at every point of training. The rule here is therefore

    trajectory LOO loss(z) = time-average over the saved checkpoints k (step > 0) of
                             [ loss_k(z) + I_k(z) ]                                 (nats)

    loss_k(z) = cross-entropy of z's given label at checkpoint k,
    I_k(z)    = the self-influence accumulated up to checkpoint k: how much lower z's loss at
                checkpoint k is because z was trained on (>= 0 for a descent step),

the time-average weighting checkpoint k by the training steps it stands for (``segments``).
It is the held-out loss of z averaged over training: no learned weights, no benchmark tuning,
and each term is an estimate of a leave-one-out quantity in nats. At the final checkpoint the
bracket is the product's estimated leave-one-out loss (final loss + self-influence); the mean
loss over checkpoints is the same average with I_k = 0.

I_k comes from Diff-In's per-checkpoint self-influence when the engine gives it
(``self_by_checkpoint`` (N, m): checkpoint j's contribution to z's self-influence on the final
loss; I_k = the contributions of the steps before step k), otherwise from the first-order
trajectory estimate

    I_k(z) = < g_z(theta_k), sum_j w_jk (lr_j seg_j / N) g_z(theta_j) >

(the displacement that training on z caused up to step k, seen by z's own gradient at k;
w_jk = the fraction of checkpoint j's steps that lie before step k).

Also here: the trajectory statistics of the training-dynamics peers (mean loss, AUM,
forgetting counts), as plain functions of the per-checkpoint logits.
"""
from __future__ import annotations

import numpy as np
import torch


# --- per-checkpoint quantities ---------------------------------------------------------------
def trajectory_checkpoints(steps) -> list[int]:
    """Indices of the checkpoints that carry training information (step > 0; all if none)."""
    ks = [k for k, s in enumerate(steps) if s > 0]
    return ks or list(range(len(steps)))


def checkpoint_logits(ctx, ks=None) -> np.ndarray:
    """Logits of every training sample at checkpoints ``ks`` (default: step > 0): (K, N, C)."""
    ks = trajectory_checkpoints(ctx.steps) if ks is None else list(ks)
    out = []
    with torch.no_grad():
        for k in ks:
            rows = [ctx.fm.logits(ctx.thetas[k], x).double().cpu() for _sl, x, _y in ctx.chunks()]
            out.append(torch.cat(rows).numpy())
    return np.stack(out)


def losses_from_logits(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cross-entropy (nats) of the given labels: (K, N, C) logits -> (K, N)."""
    t = torch.as_tensor(logits)
    logp = torch.log_softmax(t, -1).numpy()
    return -np.take_along_axis(logp, np.broadcast_to(y[None, :, None], logp.shape[:2] + (1,)), -1)[..., 0]


def margins(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pleiss et al.'s margin: assigned logit - largest other logit, (K, N, C) -> (K, N)."""
    idx = np.broadcast_to(y[None, :, None], logits.shape[:2] + (1,))
    given = np.take_along_axis(logits, idx, -1)[..., 0]
    other = logits.copy()
    np.put_along_axis(other, idx, -np.inf, -1)
    return given - other.max(-1)


def mean_loss(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mean cross-entropy over the checkpoints (N,), nats; higher = more likely mislabelled."""
    return losses_from_logits(logits, y).mean(0)


def area_under_margin(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """AUM (Pleiss et al. 2020) over the saved checkpoints (N,): the mean margin, in logits.
    Low (negative) AUM = the label keeps losing to another class = likely mislabelled."""
    return margins(logits, y).mean(0)


def forgetting_counts(correct: np.ndarray) -> np.ndarray:
    """Forgetting events (Toneva et al. 2019) from a (K, N) correct-or-not matrix in step order:
    transitions correct -> wrong between consecutive checkpoints; a sample never classified
    correctly at any checkpoint gets K + 1 (it was never learned, so it ranks first)."""
    correct = np.asarray(correct, dtype=bool)
    forgets = (correct[:-1] & ~correct[1:]).sum(0).astype(np.float64)
    forgets[~correct.any(0)] = correct.shape[0] + 1.0
    return forgets


# --- the trajectory leave-one-out loss --------------------------------------------------------
def steps_before(steps, segments) -> np.ndarray:
    """(m, m) matrix w[j, k]: the fraction of checkpoint j's ``segments[j]`` steps taken before
    step ``steps[k]`` (1 for j < k, the half-interval before it for j = k, 0 for j > k)."""
    steps = np.asarray(steps, dtype=np.float64)
    seg = np.asarray(segments, dtype=np.float64)
    m = len(steps)
    w = np.triu(np.ones((m, m)), 1)
    for k in range(m):
        before = (steps[k] - steps[k - 1]) / 2 if k > 0 else steps[0]
        w[k, k] = min(1.0, before / seg[k]) if seg[k] > 0 else 0.0
    return w


def first_order_self_by_target(ctx) -> np.ndarray:
    """I_k(z) = < g_z(theta_k), sum_j w_jk c_j g_z(theta_j) >, c_j = lr_j seg_j / N: (N, m).

    The first-order self-influence of training on z, seen at checkpoint k (nats, >= 0 up to
    curvature). One per-sample gradient per checkpoint and sample (TracIn's cost)."""
    w = steps_before(ctx.steps, ctx.segments)
    c = np.asarray(ctx.lrs) * np.asarray(ctx.segments) / ctx.n
    out = np.zeros((ctx.n, ctx.m))
    for sl, x, y in ctx.chunks():
        before = None                                      # sum_{j<k} c_j g_j
        for k in range(ctx.m):
            g = ctx.fm.per_sample_grads(ctx.thetas[k], x, y)
            disp = g * float(c[k] * w[k, k]) if before is None else before + g * float(c[k] * w[k, k])
            out[sl, k] = (g * disp).sum(-1).double().cpu().numpy()
            before = g * float(c[k]) if before is None else before + g * float(c[k])
        ctx.progress(sl.stop, ctx.n, "label issue: per-checkpoint self-influence")
    return out


def accumulated_self(self_by_checkpoint: np.ndarray, steps, segments) -> np.ndarray:
    """I_k from per-checkpoint contributions (N, m): sum_j w_jk * self_by_checkpoint[:, j]."""
    return np.asarray(self_by_checkpoint, dtype=np.float64) @ steps_before(steps, segments)


def trajectory_loo_loss(losses: np.ndarray, self_up_to: np.ndarray, segments, ks=None) -> np.ndarray:
    """The rule (module docstring): time-average of loss_k + I_k over checkpoints ``ks``.

    losses, self_up_to: (N, m) per checkpoint; segments: (m,) steps per checkpoint; ks:
    checkpoint indices to average over (default: all with a positive segment). Returns (N,)."""
    losses = np.asarray(losses, dtype=np.float64)
    self_up_to = np.asarray(self_up_to, dtype=np.float64)
    seg = np.asarray(segments, dtype=np.float64)
    ks = np.flatnonzero(seg > 0) if ks is None else np.asarray(list(ks))
    weights = seg[ks] / seg[ks].sum()
    return (losses[:, ks] + self_up_to[:, ks]) @ weights


def label_issue_from_trajectory(ctx, self_by_checkpoint: np.ndarray | None = None) -> np.ndarray:
    """The trajectory LOO loss of every training sample (N,), nats; higher = more likely mislabelled.

    ``self_by_checkpoint`` (N, m): Diff-In's per-checkpoint self-influence contributions; without
    it the first-order trajectory estimate is used."""
    ks = trajectory_checkpoints(ctx.steps)
    losses = np.zeros((ctx.n, ctx.m))
    losses[:, ks] = losses_from_logits(checkpoint_logits(ctx, ks), ctx.train.y).T
    if self_by_checkpoint is not None:
        up_to = accumulated_self(self_by_checkpoint, ctx.steps, ctx.segments)
    else:
        up_to = first_order_self_by_target(ctx)
    seg = np.asarray(ctx.segments, dtype=np.float64)
    return trajectory_loo_loss(losses, up_to, seg, [k for k in ks if seg[k] > 0])
