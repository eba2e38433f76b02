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
