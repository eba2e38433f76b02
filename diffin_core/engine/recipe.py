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
# the hyper-parameters of a param group the engine reads (others are recorded, informational)
GROUP_KEYS = ("weight_decay", "momentum", "dampening", "nesterov", "betas", "eps", "amsgrad",
              "decoupled_weight_decay", "maximize", "alpha", "centered")


@dataclass
class ParamGroup:
    """One optimiser param group as recorded: its parameters (names from named_parameters) and
    hyper-parameters (torch's keys; ``lr`` is the initial lr, every step's is in group_steps)."""
    params: list[str]
    hyper: dict = field(default_factory=dict)
    frozen: bool = False           # requires_grad False for all its parameters, or lr 0 at every step

    def get(self, key, default=None):
        v = self.hyper.get(key, default)
        return default if v is None else v

    def to_dict(self) -> dict:
        return {"params": list(self.params), "frozen": bool(self.frozen), **self.hyper}

    @classmethod
    def from_dict(cls, raw: dict) -> "ParamGroup":
        return cls([str(n) for n in raw.get("params", [])],
                   {k: v for k, v in raw.items() if k not in ("params", "frozen")}, bool(raw.get("frozen", False)))


def _jsonable(v):
    """A hyper-parameter as JSON (numbers, bools, strings, short lists of them), or None."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) else None
    if hasattr(v, "item") and getattr(v, "numel", lambda: 2)() == 1:      # a tensor lr (torch >= 2.2)
        return _jsonable(v.item())
    if isinstance(v, (tuple, list)) and len(v) <= 8:
        out = [_jsonable(b) for b in v]
        return None if any(b is None and a is not None for a, b in zip(v, out)) else out
    return None


def group_hyper(group: dict) -> dict:
    """The JSON-able hyper-parameters of a torch param group (every key but 'params')."""
    out = {}
    for k, v in group.items():
        if k == "params":
            continue
        j = _jsonable(v)
        if j is not None or v is None:
            out[k] = j
    return out


def refusal(name: str, amsgrad: bool = False) -> str | None:
    """One line why the engine cannot score a recipe with optimiser ``name``, or None."""
    if name not in MODELLED:
        return (f"the training optimiser {name} is recorded, but diffin does not model its update rule "
                f"(it models {', '.join(MODELLED)}): its influence would be a silently wrong number")
    if amsgrad:
        return (f"{name} with amsgrad=True is recorded, but diffin does not model amsgrad's running "
                "maximum of the second moment")
    return None


@dataclass
class Recipe:
    """One optimiser's update rule, in torch's conventions (torch.optim.SGD / Adam / AdamW).

    The scalar fields are the reference group's (the first trainable group); ``groups`` holds
    every param group when the manifest records them (the engine then models per-group lr,
    weight decay and frozen groups: engine's GroupMap in propagate.py)."""
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
    groups: list[ParamGroup] = field(default_factory=list)
    amsgrad: bool = False
    refused: str | None = None         # set: scoring refuses with this line (an unmodelled optimiser)

    @property
    def adam(self) -> bool:
        return self.optimizer in ADAM_LIKE

    def to_manifest(self) -> dict:
        """The manifest's optional recipe keys."""
        out = {"optimizer": self.optimizer, "momentum": self.momentum, "weight_decay": self.weight_decay,
               "decoupled_weight_decay": self.decoupled, "dampening": self.dampening, "nesterov": self.nesterov}
        if self.adam:
            out.update(betas=list(self.betas), eps=self.eps, amsgrad=bool(self.amsgrad))
        if self.batch_size:
            out["batch_size"] = int(self.batch_size)
        if self.groups:
            out["param_groups"] = [g.to_dict() for g in self.groups]
        return out

    @classmethod
    def from_optimizer(cls, optimizer, names: dict | None = None) -> "Recipe":
        """The recipe of any torch optimiser: every param group's hyper-parameters (``names``:
        id(parameter) -> its name in the model; parameters it does not name are listed as
        'param<i>'). The scalar fields come from the first group that trains. Never raises for
        an optimiser it does not model: ``refused`` then says so (scoring refuses with it)."""
        name = type(optimizer).__name__
        names = names or {}
        groups, counter = [], 0
        for g in optimizer.param_groups:
            params = []
            for p in g["params"]:
                params.append(names.get(id(p), f"param{counter}"))
                counter += 1
            frozen = bool(g["params"]) and all(not p.requires_grad for p in g["params"])
            groups.append(ParamGroup(params, group_hyper(g), frozen))
        ref = next((i for i, g in enumerate(groups) if not g.frozen), 0)
        g = optimizer.param_groups[ref] if optimizer.param_groups else {}
        decoupled = name == "AdamW" or bool(g.get("decoupled_weight_decay", False))
        betas = g.get("betas", (0.9, 0.999))
        try:
            betas = (float(betas[0]), float(betas[1]))
        except (TypeError, ValueError, IndexError):
            betas = (0.9, 0.999)
        recipe = cls(name, _float(g.get("momentum")), _float(g.get("dampening")), bool(g.get("nesterov", False)),
                     _float(g.get("weight_decay")), decoupled, betas, _float(g.get("eps"), 1e-8),
                     groups=groups, amsgrad=bool(g.get("amsgrad", False)))
        recipe.refused = refusal(name, recipe.amsgrad)
        return recipe

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
        decoupled = bool(raw.get("decoupled_weight_decay", name == "AdamW"))
        betas = raw.get("betas") or (0.9, 0.999)
        groups = [ParamGroup.from_dict(g) for g in raw.get("param_groups") or []]
        recipe = cls(name, float(raw.get("momentum", 0.0) or 0.0), float(raw.get("dampening", 0.0) or 0.0),
                     bool(raw.get("nesterov", False)), float(raw.get("weight_decay", 0.0) or 0.0), decoupled,
                     (float(betas[0]), float(betas[1])), float(raw.get("eps", 1e-8)),
                     int(raw["batch_size"]) if raw.get("batch_size") else None, approx, groups,
                     bool(raw.get("amsgrad", False)))
        recipe.refused = refusal(name, recipe.amsgrad)
        if recipe.refused is None:
            recipe.approximations += recipe.group_approximations()
        return recipe

    def group_approximations(self) -> list[str]:
        """One line per hyper-parameter that differs between trainable groups and is not
        modelled per group (lr, weight decay and frozen groups are; momentum, betas, eps,
        dampening and Nesterov are taken from the reference group)."""
        live = [g for g in self.groups if not g.frozen]
        out = []
        for key in ("momentum", "dampening", "nesterov", "betas", "eps"):
            vals = {json_key(g.get(key)) for g in live}
            if len(vals) > 1:
                out.append(f"per-group {key} (differs between param groups: the first trainable group's used)")
        return out

    def momentum_gain(self) -> float:
        """Long-run lr multiplier of the momentum buffer (1/(1-beta) for SGD, 1 for Adam)."""
        if self.adam or self.optimizer not in MODELLED or self.momentum <= 0:
            return 1.0
        return (1.0 - self.dampening) / max(1e-12, 1.0 - self.momentum)


def json_key(v):
    return repr(v)


def _float(v, default: float = 0.0) -> float:
    try:
        return float(v) if v is not None else default
    except (TypeError, ValueError):
        return default


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


class GroupMap:
    """Per-parameter hyper-parameters of a recipe whose param groups differ (lr, weight decay,
    frozen groups), on the flat parameter vector theta (P,) of the engine.

    The engine's scalar step lrs are the reference group's (``ref``: the trainable group with the
    largest summed lr); group g's lr at step s is ``lrs[s, g]``. Within checkpoint k's segment,
    group g moves by the lr-weighted mean ratio r_kg = sum_s lrs[s, g] / sum_s lrs[s, ref] times
    the reference lr (exact when the ratio is constant in the segment: any scheduler that scales
    every group's base lr by one factor, e.g. LambdaLR / cosine / warm-up). Parameters in no
    group, in a frozen group (requires_grad False) or in a group whose lr is 0 at every step
    have scale 0 and contribute nothing. ``wd`` (G,): each group's weight decay (its lr-weighted
    mean when a schedule changes it).

    Interface for the AdamW replay (adam_batches.py): ``step_lr_vector(s, device, dtype)`` (P,)
    the lr of every coordinate at step s; ``decay_vector(device, dtype)`` (P,) every
    coordinate's weight decay lambda; ``trainable_vector`` (P,) 1 / 0.
    """

    def __init__(self, tensor_groups: list[int], sizes: list[int], lrs: np.ndarray, wd: np.ndarray, ref: int,
                 bounds: np.ndarray | None = None):
        self.tensor_groups = [int(g) for g in tensor_groups]      # per parameter tensor; -1 = not trained
        self.sizes = [int(s) for s in sizes]
        self.lrs = np.asarray(lrs, dtype=np.float64)              # (T, G)
        self.wd = np.asarray(wd, dtype=np.float64)                # (G,)
        self.ref = int(ref)
        self.bounds = bounds
        self._cache: dict = {}

    @property
    def num_groups(self) -> int:
        return self.lrs.shape[1]

    def expand(self, values, device=None, dtype=None):
        """Per-group values (G,) -> per-coordinate (P,) torch tensor (0 where not trained)."""
        import torch
        vals = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values, dtype=np.float64))
        dtype = dtype or (vals.dtype if vals.is_floating_point() else torch.float64)
        vals = vals.to(device=device, dtype=dtype)
        ext = torch.cat([vals, torch.zeros(1, dtype=dtype, device=vals.device)])       # index -1 -> 0
        idx = torch.as_tensor([g if g >= 0 else len(vals) for g in self.tensor_groups], device=vals.device)
        return torch.repeat_interleave(ext[idx], torch.as_tensor(self.sizes, device=vals.device))

    def segment_ratios(self, lo: int, hi: int) -> np.ndarray:
        """r (G,): each group's summed lr over steps lo..hi-1 per unit of the reference's."""
        num = self.lrs[lo:hi].sum(0)
        den = num[self.ref]
        return num / den if den > 0 else np.zeros_like(num)

    def ratio_spread(self, lo: int, hi: int) -> float:
        """Largest relative change of a group's lr ratio to the reference within steps lo..hi-1
        (0: the segment's scale is exact)."""
        seg = self.lrs[lo:hi]
        ref = seg[:, self.ref]
        live = ref > 0
        if not live.any():
            return 0.0
        r = seg[live] / ref[live, None]
        mean = self.segment_ratios(lo, hi)
        return float(np.max(np.abs(r - mean[None]) / np.maximum(np.abs(mean[None]), 1e-300))) if r.size else 0.0

    def lr_scale(self, k: int, device=None, dtype=None):
        """(P,) checkpoint k's per-coordinate lr scale r_kg (``bounds`` set by the context)."""
        key = ("scale", k, str(device), dtype)
        if key not in self._cache:
            lo, hi = int(self.bounds[k]), int(self.bounds[k + 1])
            self._cache = {kk: v for kk, v in self._cache.items() if kk[0] != "scale"}
            self._cache[key] = self.expand(self.segment_ratios(lo, hi), device, dtype)
        return self._cache[key]

    def decay_vector(self, device=None, dtype=None):
        return self.expand(self.wd, device, dtype)

    def trainable_vector(self, device=None, dtype=None):
        return self.expand((self.lrs.sum(0) > 0).astype(np.float64), device, dtype)

    def step_lr_vector(self, s: int, device=None, dtype=None):
        return self.expand(self.lrs[s], device, dtype)


def group_map(recipe: Recipe, names: list[str], sizes: list[int], steps: dict | None,
              step_lrs: np.ndarray | None) -> tuple[GroupMap | None, np.ndarray | None, list[str]]:
    """(GroupMap or None, the reference step lrs, approximation lines) for a recipe with recorded
    param groups and per-step group hyper-parameters (``steps``: checkpoints.load_group_steps).
    None when every trainable parameter shares one lr and weight decay (the scalar path, exact)."""
    if not recipe.groups or steps is None:
        return None, step_lrs, []
    lrs, wds = steps["lr"], steps["weight_decay"]
    where = {n: g for g, grp in enumerate(recipe.groups) for n in grp.params}
    frozen = {g for g, grp in enumerate(recipe.groups) if grp.frozen or not lrs[:, g].sum() > 0}
    tensor_groups = [-1 if where.get(n, -1) in frozen else where.get(n, -1) for n in names]
    live = sorted({g for g in tensor_groups if g >= 0})
    approx = []
    if not live:
        return GroupMap(tensor_groups, sizes, lrs, np.zeros(lrs.shape[1]), 0), np.zeros(len(lrs)), \
            ["no parameter of the model was trained (every param group frozen): influence 0"]
    ref = max(live, key=lambda g: lrs[:, g].sum())
    weights = np.maximum(lrs, 0)
    wd = np.array([float((wds[:, g] * weights[:, g]).sum() / weights[:, g].sum()) if weights[:, g].sum() > 0
                   else float(wds[:, g].mean()) if len(wds) else 0.0 for g in range(lrs.shape[1])])
    if any(np.ptp(wds[:, g][lrs[:, g] > 0]) > 1e-12 * max(abs(wd[g]), 1e-300) for g in live if (lrs[:, g] > 0).sum()):
        approx.append("a weight-decay schedule (each group's lr-weighted mean weight decay used)")
    moms = steps.get("momentum")
    if recipe.adam and moms is not None and any(np.ptp(moms[:, g][lrs[:, g] > 0]) > 1e-12 for g in live
                                                if (lrs[:, g] > 0).sum()):
        approx.append("a momentum / beta1 schedule (e.g. OneCycleLR's cycle_momentum): the first trainable "
                      "group's initial value used for every step")      # SGD's is modelled per step
    same_lr = all(np.allclose(lrs[:, g], lrs[:, ref], rtol=1e-12, atol=0) for g in live)
    same_wd = len({round(float(wd[g]), 15) for g in live}) == 1
    if same_lr and same_wd and all(g >= 0 for g in tensor_groups):
        return None, lrs[:, ref].copy(), approx
    return GroupMap(tensor_groups, sizes, lrs, wd, ref), lrs[:, ref].copy(), approx
