"""BatchNorm as training ran it: batch statistics, and a sample's effect through them.

The product scores a BatchNorm net in eval mode, each checkpoint with its own running statistics
(Context.fm_at). This module is the measured alternative (benchmarks/batchnorm_modes.py: no
better against leave-one-out at checkpoint resolution, so not a method): the exact train-mode
linearisation of what truth.train_torch does when it leaves z out of its batches.

Training normalises each batch by its own statistics (mean and biased variance over the batch,
and over H, W for BatchNorm2d), with the gradient flowing through them. Leaving z out removes
z's loss term AND z's share of those statistics. The step change of one batch holding z is
(1/b) g_z_eff with
    g_z_eff = d/dw_z  grad_theta  sum_i w_i l_i(theta; stats_w)      (first order in the removal)
stats_w the w-weighted batch statistics. ``effective_directional`` gives <g_z_eff, v> for a chunk
in one reverse-over-forward pass: the chunk joins a fixed context batch with weight 0 (chunk rows
do not see each other) and d/dw at w = 0 is the effect of adding z (= removing it, to first order).

``batch_statistics`` swaps every BatchNorm's forward for a weighted batch-statistics one for the
duration of a call; running buffers are never written. With ``running_values`` the values are
the running buffers and the gradient that of the context's statistics (the eval-mode query loss,
whose running statistics track theta).
"""
from __future__ import annotations

import contextlib
import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

from diffin_core.engine.functional import FunctionalModel

_BN = nn.modules.batchnorm._BatchNorm


def bn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BN)]


def has_batchnorm(model: nn.Module) -> bool:
    return bool(bn_modules(model))


def _weighted_forward(module, weights, running_values, record, x):
    dims = [0] + list(range(2, x.dim()))
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if running_values == "only":                       # eval mode, buffers differentiable
        mean, var = module.running_mean, module.running_var
    elif weights is None:
        mean = x.mean(dims)
        var = ((x - mean.view(shape)) ** 2).mean(dims)
    else:
        w = weights.to(x.dtype).view([-1] + [1] * (x.dim() - 1))
        count = weights.to(x.dtype).sum() * (x[0, 0].numel())
        mean = (w * x).sum(dims) / count
        var = (w * (x - mean.view(shape)) ** 2).sum(dims) / count
    if record is not None and running_values != "only":
        record.append((module, mean, var, count if weights is not None else x.numel() // x.shape[1]))
    if running_values is True and module.running_mean is not None:
        mean = module.running_mean + (mean - mean.detach())
        var = module.running_var + (var - var.detach())
    out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + module.eps)
    if module.affine:
        out = out * module.weight.view(shape) + module.bias.view(shape)
    return out


@contextlib.contextmanager
def batch_statistics(model: nn.Module, weights: torch.Tensor | None = None, running_values: bool = False,
                     record: list | None = None):
    """Inside, every BatchNorm of ``model`` normalises by the (``weights``-weighted, (B,)) batch
    statistics with gradient through them; running buffers are read (``running_values``), never
    written; ``running_values="only"``: eval mode with the buffers as values and their gradient.
    ``record``: a list that receives (module, mean, biased var, count) per call."""
    mods = bn_modules(model)
    for m in mods:
        m.forward = functools.partial(_weighted_forward, m, weights, running_values, record)
    try:
        yield
    finally:
        for m in mods:
            m.__dict__.pop("forward", None)


class TrainModeModel(FunctionalModel):
    """The same model with BatchNorm in batch-statistics mode: ``batch_grad`` / ``mean_loss`` /
    HVPs are those of the training loss, each ghost batch of ``ghost`` rows normalised by its own
    statistics (training's batch size; the mean over ghost batches). Running buffers untouched."""

    ghost: int | None = None

    @classmethod
    def of(cls, fm: FunctionalModel, ghost: int | None = None) -> "TrainModeModel":
        other = copy.copy(fm)
        other.__class__ = cls
        other.ghost = ghost
        other.max_rows = None if ghost is None else ghost
        return other

    def logits(self, theta, x):
        with batch_statistics(self.model):
            return functional_call(self.model, self.unflatten(theta), (x,))

    def _slice_rows(self) -> int | None:
        """Slices are ghost batches: each is normalised by its own statistics, whatever max_rows is."""
        return self.ghost


def effective_directional(fm: FunctionalModel, theta, x, y, v, cx, cy, through_stats: bool = True) -> torch.Tensor:
    """<g_z_eff, v> (B,) for each row z of (x, y): z's gradient with BatchNorm statistics of the
    context batch (cx, cy), plus (``through_stats``) z's first-order effect on those statistics
    and through them on the context's losses. One reverse-over-forward pass over (c + B) rows."""
    c = len(cy)
    X, Y = torch.cat([cx, x]), torch.cat([cy, y])
    w0 = torch.cat([torch.ones(c, dtype=theta.dtype, device=theta.device),
                    torch.zeros(len(y), dtype=theta.dtype, device=theta.device)])

    def phi(w):
        wl = w if through_stats else torch.cat([torch.zeros_like(w[:c]), w[c:]])
        ws = w if through_stats else w0
        return jvp(lambda t: _weighted_loss(fm, t, X, Y, ws, wl), (theta,), (v,))[1]
    return grad(phi)(w0)[c:].detach()


def _weighted_loss(fm, theta, x, y, w_stats, w_loss, running_values=False):
    with batch_statistics(fm.model, w_stats, running_values):
        logits = functional_call(fm.model, fm.unflatten(theta), (x,))
    per = F.cross_entropy(logits, y, reduction="none") if fm.loss.plain else fm.loss(logits, y)
    return (per * w_loss).sum()


def train_mode_influence(ctx, qx, qy, x, y, context: int = 256, through_stats: bool = True) -> torch.Tensor:
    """Diff-In with BatchNorm linearised as training ran it (a comparison path, not a method):
    HVPs of the training loss with batch statistics (one statistics batch per ``hessian_batch``),
    the query gradient with the final running statistics' values and their dependence on theta
    (through ``context`` training samples), and each row's effective gradient (its effect on the
    statistics included with ``through_stats``). Influence (B,) of the rows (x, y), product sign."""
    from diffin_core.engine.propagate import build_plan
    last = ctx.m - 1
    qx, qy = ctx.tensors(qx, qy)
    u = query_grad(ctx.fm_at(last), ctx.thetas[last], qx, qy, ctx.sample_batch(context, last, salt=11)[0])
    own = ctx.fm_at
    ctx.fm_at = lambda k: TrainModeModel.of(own(k))
    try:
        plan = build_plan(ctx, u)
    finally:
        del ctx.fm_at
    x, y = ctx.tensors(x, y)
    out = torch.zeros(len(y), dtype=torch.float64, device=ctx.device)
    for it in plan:
        cx, cy = ctx.sample_batch(context, it.k, salt=12)
        out += it.coef * effective_directional(ctx.fm_at(it.k), ctx.thetas[it.k], x, y, it.w, cx, cy,
                                               through_stats).double()
    return out


def query_grad(fm: FunctionalModel, theta, qx, qy, cx, mode: str = "running") -> torch.Tensor:
    """Gradient (P,) of the mean query loss with BatchNorm normalisation by
    "running": the running buffers' values, gradient through the context batch's statistics;
    "context": the context batch's statistics (values and gradient)."""
    c = len(cx)
    X = torch.cat([cx, qx])
    ws = torch.cat([torch.ones(c, dtype=theta.dtype, device=theta.device),
                    torch.zeros(len(qy), dtype=theta.dtype, device=theta.device)])
    wl = torch.cat([torch.zeros(c, dtype=theta.dtype, device=theta.device),
                    torch.full((len(qy),), 1.0 / len(qy), dtype=theta.dtype, device=theta.device)])
    Y = torch.cat([torch.zeros(c, dtype=qy.dtype, device=qy.device), qy])
    return grad(lambda t: _weighted_loss(fm, t, X, Y, ws, wl, mode == "running"))(theta).detach()
