"""Label issues from the whole training trajectory.

A network that fits its training labels, flips included, ends with a low loss on a memorised
wrong label, so the final loss says little. What the product wants is the loss a sample would
have had if it had never been trained on (its leave-one-out, LOO, loss): a wrong label is one
that the rest of the data does not predict. The LOO loss depends on *which* model predicts, and
the best judge of a label is the model that predicts held-out labels best. The rule:

    label_issue(z) = loss_{k*}(z) + self_influence_{k*}(z)                            (nats)
    k* = argmin_k  mean query loss at checkpoint k      (over the saved checkpoints, step > 0;
                                                         ties -> the later checkpoint)

i.e. Diff-In's estimated LOO loss of z for the model at the checkpoint that generalises best
(early stopping on the project's query set, which is the held-out data the product already
has): the self-influence is Diff-In's, propagated through every checkpoint up to k*
(``truncate_context`` + the method's own run). When the model does not overfit the query set,
k* is the final checkpoint and the rule is the plain estimated LOO loss at the end. No weights
are learned and nothing is fitted to label-error benchmarks; the query set never sees the
training labels. Why not the final checkpoint: after memorisation the final model's loss on a
flipped label is ~0 and a first- or second-order self-influence cannot recover the large,
non-linear LOO effect; before memorisation the rest of the data still contradicts the flip.

Also here, used by the benchmark's ablations and the peers:
  * ``trajectory_mean_loo_loss``: the mean over the checkpoints of Diff-In's estimated LOO loss
    of z for the model at each checkpoint, loss_k(z) + SI_k(z) (SI_k: z's own gradient at
    checkpoint k carried back through checkpoints k..0, all k in one backward pass), i.e. the
    leave-one-out analogue of the mean loss. Measured on the dev seed of
    benchmarks/label_errors.py (--study: AUROC 0.974 / 0.947 at 10% / 20% noise vs 0.976 / 0.958
    for the rule above) and on seeds 0-2 as an ablation row: not the product's rule;
  * the time-averaged trajectory LOO loss with a first-order (TracIn-like) I_k, or I_k from a
    method's per-checkpoint contributions ``self_by_checkpoint`` - tried first, weaker on the
    memorisation benchmark (benchmarks/README.md);
  * the trajectory statistics of the training-dynamics peers (mean loss, AUM, forgetting).
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
            rows = [ctx.fm_at(k).logits(ctx.thetas[k], x).double().cpu() for _sl, x, _y in ctx.chunks()]
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
            g = ctx.fm_at(k).per_sample_grads(ctx.thetas[k], x, y)
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


# --- Diff-In's self-influence of the model at every checkpoint, averaged ------------------------
def _truncated_op(ctx, op, k: int):
    """Checkpoint k's segment op cut at step_k (the trajectory that ends at checkpoint k owns
    only the steps before it): same Lanczos view, W and C over step_lrs[bounds[k]:steps[k]]."""
    from diffin_core.engine.propagate import segment_op
    lo, end = int(ctx.bounds[k]), int(ctx.steps[k])
    if end >= int(ctx.bounds[k + 1]):
        return op
    return segment_op(ctx, k, op.view, lo, max(lo, end))


def mean_self_influence(ctx, plan, x, y, weights) -> torch.Tensor:
    """sum_k weights[k] * SI_k(z) for one chunk (b,), nats.

    SI_k(z) = Diff-In's self-influence of z for the model at checkpoint k: z's own gradient
    g_z(theta_k) carried back through checkpoints k, k-1, ..., 0 (the segment of k cut at step_k)
    with the plan's Lanczos views, dotted with g_z(theta_j) at each (the same rule as the final
    self-influence, which is SI_{m-1}). The adjoints are linear, so all targets share one
    backward pass: at checkpoint j the weighted start weights[j] g_z(theta_j) joins the carried
    sum of the later targets. One per-sample gradient per checkpoint and sample."""
    from diffin_core.engine.propagate import has_momentum
    from diffin_core.methods.first_order import rowdot
    total = torch.zeros(len(y), dtype=ctx.acc_dtype, device=ctx.device)
    carry_u = carry_v = None
    momentum = has_momentum(ctx.recipe)
    for it in plan:                                          # latest checkpoint first
        k = it.k
        g = ctx.fm_at(k).per_sample_grads(ctx.thetas[k], x, y)
        w = None
        if carry_u is not None:
            w, carry_u, carry_v = it.op.rows(carry_u, carry_v)
        if weights[k] != 0:
            start = g * float(weights[k])
            w_k, u_k, v_k = _truncated_op(ctx, it.op, k).rows(start, torch.zeros_like(start) if momentum else None)
            w = w_k if w is None else w + w_k
            carry_u = u_k if carry_u is None else carry_u + u_k
            carry_v = v_k if carry_v is None else (carry_v + v_k if v_k is not None else carry_v)
        if w is not None:
            total += it.coef * rowdot(w, g).to(total.dtype)
    return total


def trajectory_mean_loo_loss(method, ctx, qx, qy) -> np.ndarray:
    """label_issue (N,), nats: mean over the checkpoints with step > 0 of Diff-In's estimated
    leave-one-out loss of z for the model at that checkpoint, loss_k(z) + SI_k(z).

    The leave-one-out analogue of the mean loss over the trajectory (mean-loss / AUM's idea,
    with each checkpoint's loss corrected by how much training on z itself lowered it), equal
    weights, nothing learned. The query plan is rebuilt (deterministic: the same seeded batches
    and Lanczos views as the run's)."""
    ks = [k for k in trajectory_checkpoints(ctx.steps)]
    weights = np.zeros(ctx.m)
    weights[ks] = 1.0 / len(ks)
    plan = method.prepare(ctx, qx, qy)
    y_all = np.asarray(ctx.train.y)
    out = np.zeros(ctx.n)
    for sl, x, y in ctx.chunks(size=ctx.chunk_rows(True)):
        si = mean_self_influence(ctx, plan, x, y, weights)
        loss = torch.zeros(len(y), dtype=torch.float64)
        with torch.no_grad():
            for k in ks:
                loss += float(weights[k]) * ctx.fm_at(k).losses(ctx.thetas[k], x, y).double().cpu()
        out[sl] = loss.numpy() + si.double().cpu().numpy()
        ctx.progress(sl.stop, ctx.n, f"{method.name}: leave-one-out loss at every checkpoint")
    assert len(out) == len(y_all)
    return out


# --- the product's rule: the estimated LOO loss at the best-generalising checkpoint -------------
class _Prefix:
    """The first ``count`` items of a (possibly lazy) per-checkpoint sequence."""

    def __init__(self, seq, count: int):
        self.seq, self.count = seq, int(count)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(self.count))]
        k = int(k)
        if k < 0:
            k += self.count
        if not 0 <= k < self.count:
            raise IndexError(k)
        return self.seq[k]

    def __iter__(self):
        return (self.seq[k] for k in range(self.count))

    def __getattr__(self, name):          # e.g. a lazy store's dtype
        return getattr(self.seq, name)


def truncate_context(ctx, k: int):
    """A scoring context whose trajectory ends at checkpoint ``k`` (that checkpoint is the model
    being explained): the checkpoints 0..k, their owned steps recomputed so that the last owns the
    half-interval before step_k, effective lrs from the per-step lrs when the context has them."""
    import dataclasses
    from diffin_core.methods.base import segment_lengths
    k = int(k)
    steps = list(ctx.steps[:k + 1])
    names = {f.name for f in dataclasses.fields(ctx)}
    change = {"thetas": _Prefix(ctx.thetas, k + 1), "steps": steps}
    if "of_checkpoints" in names:               # messages keep the full run's count: "checkpoint 9/12"
        change["of_checkpoints"] = getattr(ctx, "of_checkpoints", None) or ctx.m
    seg = segment_lengths(steps)
    lrs = np.asarray(ctx.lrs[:k + 1], dtype=np.float64)
    if "bounds" in names and getattr(ctx, "bounds", None) is not None:
        from diffin_core.engine.recipe import owned_bounds
        bounds = owned_bounds(steps, max(int(steps[-1]), 1))
        seg = np.diff(bounds).astype(np.float64)
        change["bounds"] = bounds
        step_lrs = getattr(ctx, "step_lrs", None)
        if step_lrs is not None:
            step_lrs = np.asarray(step_lrs, dtype=np.float64)[:max(int(steps[-1]), 1)]
            change["step_lrs"] = step_lrs
            sums = np.array([step_lrs[bounds[j]:bounds[j + 1]].sum() for j in range(len(steps))])
            gain = ctx.recipe.momentum_gain() if hasattr(getattr(ctx, "recipe", None), "momentum_gain") else 1.0
            lrs = np.where(seg > 0, sums / np.maximum(seg, 1), 0.0) * gain
    change["segments"] = seg
    change["lrs"] = lrs
    for name in ("buffers", "precond", "files"):
        if name in names and getattr(ctx, name) is not None:
            change[name] = _Prefix(getattr(ctx, name), k + 1)
    for name in ("memory", "stages"):
        if name in names:
            change[name] = None
    out = dataclasses.replace(ctx, **change)
    if getattr(ctx, "base_grads", None) is not None:    # the Hessian batches' gradients: the same batch at
        out.base_grads = ctx.base_grads                 # the same checkpoints (propagate.base_grad's keys)
    return out


def share_probes(ctx, sub) -> None:
    """Let ``ctx``'s query plan adopt the HVP decisions that the label_issue plan on ``sub``
    (truncate_context(ctx, k*), built first) measured. hvp auto probes every Lanczos view's first
    product both ways, and the exact one costs about four finite differences (the sample CNN: 103
    against 22 ms CPU, 10% of its whole diffin score over both plans' 22 views). Both plans view the
    same Hessian batch at the same checkpoints 0..k*, so where the label plan measured finite
    differences within hvp.ADOPT_TOL the query plan takes them without a new probe (as a query on
    a finished run does, hvp.adopt) and records that error (meta.json hvp.views, which the run's
    queries adopt in turn); elsewhere it probes. Where the decision is the same, the same bits."""
    from diffin_core.engine.hvp import ADOPT_TOL
    if getattr(ctx.settings, "hvp", None) != "auto":
        return
    views = dict(getattr(ctx, "hvp_views", None) or {})
    errors = dict(getattr(ctx, "hvp_view_errors", None) or {})
    for e in getattr(sub, "hvp_log", None) or []:
        k = int(e["checkpoint"])
        if e["where"] == "lanczos" and e["used"] == "fd" and e.get("fd_error", 1.0) <= ADOPT_TOL and k not in views:
            views[k], errors[k] = "fd", float(e["fd_error"])
    if views:
        ctx.hvp_views, ctx.hvp_view_errors = views, errors


def query_loss_by_checkpoint(ctx, qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
    """Mean query loss (nats) at every checkpoint (m,)."""
    out = np.zeros(ctx.m)
    with torch.no_grad():
        for k in range(ctx.m):
            fm = ctx.fm_at(k) if hasattr(ctx, "fm_at") else ctx.fm
            total = 0.0
            for s in range(0, len(qy), 512):
                x, y = ctx.tensors(qx[s:s + 512], qy[s:s + 512])
                total += float(fm.losses(ctx.thetas[k], x, y).double().sum())
            out[k] = total / max(len(qy), 1)
    return out


def best_checkpoint(query_losses, steps) -> int:
    """k* = the checkpoint (step > 0) with the lowest mean query loss; ties -> the later one."""
    ks = trajectory_checkpoints(steps)
    q = np.asarray(query_losses, dtype=np.float64)
    best = min(q[k] for k in ks)
    return max(k for k in ks if q[k] == best)


def early_stopped_loo_loss(method, ctx, qx, qy, out: dict) -> tuple[np.ndarray, int]:
    """(label_issue (N,), k*): ``method``'s estimated LOO loss (loss + self-influence) for the
    model at the checkpoint with the lowest query loss. ``out``: the method's run on the full
    trajectory (reused when k* is the last checkpoint). Costs one more self-influence pass over
    checkpoints 0..k* when k* is earlier."""
    from diffin_core.methods.base import Attributor, loo_loss
    k = best_checkpoint(query_loss_by_checkpoint(ctx, qx, qy), ctx.steps)
    if k == ctx.m - 1:
        return loo_loss(out["self_influence"], out["probs"], np.asarray(ctx.train.y)), k
    ctx.progress(0, ctx.n, f"{method.name}: label issues at {ctx.label(k) if hasattr(ctx, 'label') else k}"
                 " (the lowest query loss)")
    sub = Attributor.run(method, truncate_context(ctx, k), qx, qy, need_self=True)
    return loo_loss(sub["self_influence"], sub["probs"], np.asarray(ctx.train.y)), k
