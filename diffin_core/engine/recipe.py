"""The training recipe the engine models: optimiser, its hyper-parameters and every step's lr.

A ``Recipe`` is read from the manifest (optional keys written by the Recorder, see
checkpoints.py) or built by hand. What it cannot know is listed in ``approximations`` and
shown to the user as one warning line. Steps are global optimiser steps: step s is the update
taken from the weights theta_s (0-based) with learning rate ``step_lrs[s]``.

Checkpoint k (saved at step t_k) stands for the steps nearest to it: ``owned_bounds`` gives
integer bounds b (m+1,) with checkpoint k owning steps b[k] <= s < b[k+1]; boundaries sit
half-way between saved steps (ties go to the later checkpoint), steps before the first
checkpoint go to it, and the final checkpoint (the explained model) owns the steps before it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

ADAM_LIKE = ("Adam", "AdamW")
MODELLED = ("SGD",) + ADAM_LIKE


@dataclass
class Recipe:
    """One optimiser's update rule, in torch's conventions (torch.optim.SGD / Adam / AdamW)."""
    optimizer: str = "SGD"
    momentum: float = 0.0              # SGD heavy-ball / Nesterov beta
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0          # lambda
    decoupled: bool = False            # True: theta *= 1 - lr*lambda (AdamW); False: g += lambda*theta
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int | None = None      # training batch size (recorded; informational)
    approximations: list[str] = field(default_factory=list)

    @property
    def adam(self) -> bool:
        return self.optimizer in ADAM_LIKE

    def to_manifest(self) -> dict:
        """The manifest's optional recipe keys."""
        out = {"optimizer": self.optimizer, "momentum": self.momentum, "weight_decay": self.weight_decay,
               "decoupled_weight_decay": self.decoupled}
        if self.adam:
            out.update(betas=list(self.betas), eps=self.eps)
        if self.batch_size:
            out["batch_size"] = int(self.batch_size)
        else:
            out.update(dampening=self.dampening, nesterov=self.nesterov)
        return out

    @classmethod
    def from_optimizer(cls, optimizer) -> "Recipe":
        """The recipe of a torch optimiser (its first param group; other groups must match)."""
        g = optimizer.param_groups[0]
        name = type(optimizer).__name__
        approx = []
        if any(other.get("weight_decay", 0) != g.get("weight_decay", 0) for other in optimizer.param_groups[1:]):
            approx.append("per-group weight decay (first group's used)")
        if g.get("amsgrad"):
            approx.append("amsgrad's max second moment")
        if name not in MODELLED:
            approx.append(f"{name}'s update rule (modelled as plain SGD)")
        decoupled = name == "AdamW" or bool(g.get("decoupled_weight_decay", False))
        return cls(name, float(g.get("momentum", 0.0) or 0.0), float(g.get("dampening", 0.0) or 0.0),
                   bool(g.get("nesterov", False)), float(g.get("weight_decay", 0.0) or 0.0), decoupled,
                   tuple(float(b) for b in g.get("betas", (0.9, 0.999))), float(g.get("eps", 1e-8)), approx)

    @classmethod
    def from_manifest(cls, raw: dict) -> "Recipe":
        """From a manifest's top-level keys; missing recipe keys are listed in ``approximations``."""
        name = str(raw.get("optimizer", "SGD"))
        approx = []
        if "weight_decay" not in raw:
            approx.append("weight decay (assumed 0)")
        if name == "SGD" and "nesterov" not in raw:
            approx.append("Nesterov/dampening (assumed off)")
        if name in ADAM_LIKE and "betas" not in raw:
            approx.append("Adam betas/eps (torch defaults assumed)")
        if name not in MODELLED:
            approx.append(f"{name}'s update rule (modelled as plain SGD)")
        decoupled = bool(raw.get("decoupled_weight_decay", name == "AdamW"))
        betas = raw.get("betas") or (0.9, 0.999)
        return cls(name, float(raw.get("momentum", 0.0) or 0.0), float(raw.get("dampening", 0.0) or 0.0),
                   bool(raw.get("nesterov", False)), float(raw.get("weight_decay", 0.0) or 0.0), decoupled,
                   (float(betas[0]), float(betas[1])), float(raw.get("eps", 1e-8)),
                   int(raw["batch_size"]) if raw.get("batch_size") else None, approx)

    def momentum_gain(self) -> float:
        """Long-run lr multiplier of the momentum buffer (1/(1-beta) for SGD, 1 for Adam)."""
        if self.adam or self.optimizer not in MODELLED or self.momentum <= 0:
            return 1.0
        return (1.0 - self.dampening) / max(1e-12, 1.0 - self.momentum)


def owned_bounds(steps, total: int | None = None) -> np.ndarray:
    """Integer step bounds (m+1,): checkpoint k owns steps b[k] <= s < b[k+1] (see module doc)."""
    t = np.asarray(steps, dtype=np.float64)
    total = int(t[-1]) if total is None else int(total)
    if len(t) == 1:
        return np.array([0, max(total, 1)], dtype=np.int64)
    mids = np.ceil((t[:-1] + t[1:]) / 2).astype(np.int64)
    return np.concatenate([[0], np.minimum(mids, total), [total]]).astype(np.int64)


def interpolated_lrs(steps, lrs) -> np.ndarray:
    """Per-step lrs (T,) when only each checkpoint's lr is known: linear between checkpoints
    (an lr of 0 at a checkpoint does not zero its neighbourhood), constant before the first."""
    t = np.asarray(steps, dtype=np.float64)
    total = max(int(t[-1]), 1)
    return np.interp(np.arange(total, dtype=np.float64), t, np.asarray(lrs, dtype=np.float64))


def adam_scale(exp_avg_sq: np.ndarray, step: int, beta2: float, eps: float) -> np.ndarray:
    """D = 1 / (sqrt(v / (1 - beta2^step)) + eps), Adam's per-coordinate step multiplier."""
    bc = 1.0 - beta2 ** max(int(step), 1)
    return 1.0 / (np.sqrt(np.asarray(exp_avg_sq, dtype=np.float64) / bc) + eps)


def segment_adam_scale(anchors, k: int, lo: int, hi: int, step_lrs, beta2: float, eps: float,
                       offset: int = 0) -> np.ndarray:
    """Adam's D over the steps checkpoint k owns: the lr-weighted mean of D_s = 1/(sqrt(v_hat_s)+eps).

    anchors: per checkpoint (exp_avg_sq (P,), Adam's step count t) or None, in step order; the
    update of global step s uses v after t = s + 1 + offset updates (offset: Adam steps taken
    before the recording started). v between two recorded anchors (t_a, v_a), (t_b, v_b) is
    the EMA of a constant squared gradient (exact for stationary g^2):
        v_t = beta2^(t-t_a) v_a + (1 - beta2^(t-t_a)) / (1 - beta2^(t_b-t_a)) (v_b - beta2^(t_b-t_a) v_a)
    and beyond the last anchor v_hat stays. Returns D (P,) float64 for steps lo <= s < hi.

    Why: one checkpoint's own v_hat stands for every step it owns; the step-0 checkpoint's is
    one batch's g^2 (Adam's first step), whose near-zero coordinates give D ~ 1/eps although
    later steps see larger v_hat. D is convex in v_hat, so the mean over the segment matters.
    """
    own = anchors[k]
    v_k, t_k = np.asarray(own[0], dtype=np.float64), int(own[1])
    pts = [(int(a[1]), np.asarray(a[0], dtype=np.float64)) for j in (k - 1, k + 1)
           if 0 <= j < len(anchors) and (a := anchors[j]) is not None and int(a[1]) != t_k]
    pts = sorted(pts + [(t_k, v_k)], key=lambda p: p[0])
    lrs = np.asarray(step_lrs, dtype=np.float64)[lo:hi]
    if hi <= lo:
        return adam_scale(v_k, t_k, beta2, eps)
    weights = lrs if lrs.sum() > 0 else np.ones_like(lrs)
    total = np.zeros_like(v_k)
    for s, w in zip(range(lo, hi), weights):
        if w == 0:
            continue
        t = s + 1 + int(offset)
        if t <= pts[0][0]:
            v_hat = pts[0][1] / (1.0 - beta2 ** max(pts[0][0], 1))
        elif t >= pts[-1][0]:
            v_hat = pts[-1][1] / (1.0 - beta2 ** pts[-1][0])
        else:
            (ta, va), (tb, vb) = next((pts[i], pts[i + 1]) for i in range(len(pts) - 1) if pts[i][0] <= t <= pts[i + 1][0])
            da, db = beta2 ** (t - ta), beta2 ** (tb - ta)
            inc = np.maximum(vb - db * va, 0.0)
            v_hat = (da * va + (1.0 - da) / max(1.0 - db, 1e-300) * inc) / (1.0 - beta2 ** t)
        total += w / (np.sqrt(v_hat) + eps)
    return total / weights.sum()


def bias_correction1(step_index: np.ndarray, beta1: float) -> np.ndarray:
    """1 / (1 - beta1^(s+1)) for 0-based step indices (Adam's first-moment correction)."""
    return 1.0 / (1.0 - beta1 ** (np.asarray(step_index, dtype=np.float64) + 1.0))


def describe(recipe: Recipe) -> str:
    """A short human name: 'SGD momentum 0.9 (Nesterov) wd 5e-4' / 'AdamW wd 0.01'."""
    parts = [recipe.optimizer]
    if not recipe.adam and recipe.momentum:
        parts.append(f"momentum {recipe.momentum:g}" + (" (Nesterov)" if recipe.nesterov else ""))
    if recipe.weight_decay:
        parts.append(f"wd {recipe.weight_decay:g}" + (" decoupled" if recipe.decoupled and not recipe.adam else ""))
    return " ".join(parts) if math.isfinite(recipe.momentum) else recipe.optimizer


class RecipeWarning(UserWarning):
    """One line: what of the training recipe the manifest does not record, and is approximated."""
