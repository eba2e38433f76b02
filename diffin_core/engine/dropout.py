"""Dropout as training ran it: the masks drawn again from the recorded generator states.

The Recorder (project/checkpoints.py) keeps the random generator's state at the start of every
training forward that drew random numbers (CPU, and the model's CUDA device), with the rows it
forwarded and a hash of the state it left. For an optimiser step s the engine then redraws the
very masks training used and evaluates every batch quantity of that step (the gradient, the
HVPs, the per-sample directional derivatives, per-sample gradients) on the train-mode network
with those masks fixed:

capture   the recorded state is restored and the forward runs once, without gradients, with
          every module except the normalisation layers in train mode (BatchNorm keeps the
          engine's eval-mode statistics; it draws nothing). Each dropout call (F.dropout,
          dropout1d/2d/3d, alpha_dropout, feature_alpha_dropout, torch.dropout and friends,
          which nn.Dropout* and transformers' attention call) is answered by drawing its noise
          on a tensor of ones of the input's shape, dtype and device: the same generator draws
          as training made, so the same mask A (alpha dropout, affine: the draw on zeros B with
          the state rewound, then on ones: out = A x + B). Training's state after the forward
          (its recorded hash) must be reached again, else some draw differed (another random
          op, another CPU kernel) and scoring says so in one line.
replay    every later forward of that step's rows (inside grad, jvp, vmap) answers the i-th
          dropout call with x * A_i (+ B_i) instead of drawing. Micro-batches (gradient
          accumulation) keep their own forwards and masks, concatenated by rows; slicing a
          batch (the memory budget) or one sample per vmap lane takes the mask's rows (masks
          lead with the batch dimension). A mask is never drawn inside a vmap: each sample gets
          its own row of the batch's masks.

Nothing here changes what an eval-mode forward computes: without an active StepMasks the model
runs as before. Cost per step: one no-grad forward per micro-batch and the masks' memory (one
activation-sized tensor per dropout call) while that step is evaluated.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from diffin_core.errors import DiffinError

# function -> (multiplicative?, default training flag, name of the training argument)
_FUNCS: dict = {}
for _f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d):
    _FUNCS[_f] = (True, True, "training")
for _f in (F.alpha_dropout, F.feature_alpha_dropout):
    _FUNCS[_f] = (False, False, "training")
for _name, _mul in (("dropout", True), ("feature_dropout", True), ("alpha_dropout", False),
                    ("feature_alpha_dropout", False)):
    for _suffix in ("", "_"):
        _f = getattr(torch, _name + _suffix, None)
        if _f is not None:
            _FUNCS[_f] = (_mul, None, "train")


def _parse(func, args, kwargs):
    """(input, p, training, inplace) of a dropout-family call."""
    mul, default, train_name = _FUNCS[func]
    x = args[0] if args else kwargs.get("input")
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    training = args[2] if len(args) > 2 else kwargs.get(train_name, default)
    inplace = (args[3] if len(args) > 3 else kwargs.get("inplace", False)) if train_name == "training" else \
        func.__name__.endswith("_")
    return x, float(p), bool(training), bool(inplace)


def draws(p: float, training: bool) -> bool:
    return training and 0.0 < p < 1.0


# --- generator states ---------------------------------------------------------------------------
def get_states(device: torch.device | None) -> dict:
    """{"cpu": ByteTensor, "cuda": ByteTensor (the device's, when ``device`` is CUDA)}."""
    out = {"cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_states(states: dict, device: torch.device | None) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def state_hash(states: dict) -> int:
    """An int64 fingerprint of the generator states (training's after-forward check)."""
    h = hashlib.blake2b(digest_size=8)
    for key in ("cpu", "cuda"):
        if key in states:
            h.update(states[key].cpu().numpy().tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a if k in b)


# --- the recorded forwards ------------------------------------------------------------------------
@dataclass
class ForwardStates:
    """Every random training forward the Recorder saw: its optimiser step, rows, the generator
    states at its start (cpu (F, S) uint8; cuda (F, 16) uint8 or None) and the hash of the states
    it left. ``device``: where training drew ("cpu" or "cuda")."""
    step: np.ndarray
    rows: np.ndarray
    cpu: np.ndarray
    cuda: np.ndarray | None
    after: np.ndarray
    device: str = "cpu"
    problems: dict = field(default_factory=dict)       # what could not be redrawn: kind -> steps

    def __post_init__(self):
        self._by_step: dict[int, list[int]] = {}
        for i, s in enumerate(self.step.tolist()):
            self._by_step.setdefault(int(s), []).append(i)

    def forwards(self, s: int) -> list[int]:
        return self._by_step.get(int(s), [])

    def states(self, i: int) -> dict:
        out = {"cpu": torch.from_numpy(np.ascontiguousarray(self.cpu[i]))}
        if self.cuda is not None:
            out["cuda"] = torch.from_numpy(np.ascontiguousarray(self.cuda[i]))
        return out

    def note(self, kind: str, s: int) -> None:
        self.problems.setdefault(kind, set()).add(int(s))


def train_flags(model: nn.Module):
    """A context: every module in train mode except normalisation layers with running statistics
    (BatchNorm, InstanceNorm: the engine scores them with the checkpoint's statistics)."""
    @contextlib.contextmanager
    def ctx():
        saved = [(m, m.training) for m in model.modules()]
        try:
            for m, _ in saved:
                m.training = not isinstance(m, nn.modules.batchnorm._NormBase)
            yield
        finally:
            for m, was in saved:
                m.training = was
    return ctx()


class _DropoutMode(TorchFunctionMode):
    """Passes every call through except a dropout-family call that draws, which goes to
    ``self.dropout(func, x, p)``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _FUNCS:
            return func(*args, **kwargs)
        x, p, training, _inplace = _parse(func, args, kwargs)
        if not draws(p, training):
            return func(*args, **kwargs)
        return self.dropout(func, x, p)


class _Capture(_DropoutMode):
    """Draws each dropout call's noise on ones (and zeros, for alpha dropout), keeping it."""

    def __init__(self, device):
        super().__init__()
        self.device, self.calls, self.after_last = device, [], None

    def dropout(self, func, x, p):
        mul = _FUNCS[func][0]
        base = func.__name__.rstrip("_")
        fn = getattr(torch, base) if func.__name__.endswith("_") else func
        b = None
        if not mul:
            st = get_states(x.device)
            b = fn(torch.zeros_like(x), p, True)
            set_states(st, x.device)
        a = fn(torch.ones_like(x), p, True)
        if b is not None:
            a = a - b
        self.calls.append((a, b))
        self.after_last = get_states(self.device)
        return x * a if b is None else x * a + b


class _Apply(_DropoutMode):
    """Answers the i-th dropout call with x * A_i (+ B_i)."""

    def __init__(self, calls):
        super().__init__()
        self.calls, self.i = calls, 0

    def dropout(self, func, x, p):
        if self.i >= len(self.calls):
            raise DiffinError(f"the model made more dropout calls ({self.i + 1}) than training's forward did "
                              f"({len(self.calls)}): its masks cannot be replayed")
        a, b = self.calls[self.i]
        self.i += 1
        if a.shape != x.shape:
            raise DiffinError(f"dropout call {self.i}: training's mask has shape {list(a.shape)}, the replay's "
                              f"input {list(x.shape)}")
        return x * a if b is None else x * a + b


_ACTIVE: list = []


def current() -> "StepMasks | None":
    """The StepMasks every FunctionalModel forward applies now (None: the eval-mode network)."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def applied(masks: "StepMasks | None"):
    """Inside, FunctionalModel's forwards of this step's rows run with its masks (None: no-op)."""
    if masks is None:
        yield
        return
    _ACTIVE.append(masks)
    try:
        yield
    finally:
        _ACTIVE.pop()


class StepMasks:
    """One optimiser step's masks: per training forward (micro-batch, consecutive rows of the
    step's batch) the (A, B) of each dropout call, in call order."""

    def __init__(self, parts: list[tuple[int, list]], model: nn.Module):
        self.parts, self.model = parts, model
        self.n = sum(n for n, _ in parts)
        self.window = (0, self.n)
        self.lane: list | None = None      # one sample's masks (vmap over samples)

    @contextlib.contextmanager
    def rows(self, a: int, b: int):
        """Forwards inside see rows [a, b) of the step's batch (a slice of it)."""
        old, self.window = self.window, (a, b)
        try:
            yield
        finally:
            self.window = old

    def forward(self, fn, x: torch.Tensor) -> torch.Tensor:
        """fn(x) (the model's logits of rows ``window`` of the step) with training's masks."""
        with train_flags(self.model):
            if self.lane is not None:
                with _Apply(self.lane):
                    return fn(x)
            a, b = self.window
            if x.shape[0] != b - a:
                raise DiffinError(f"a forward of {x.shape[0]} rows inside a step whose masks cover rows {a}..{b - 1}")
            outs, lo = [], 0
            for n, calls in self.parts:
                hi = lo + n
                s, e = max(a, lo), min(b, hi)
                if s < e:
                    sub = calls if (s, e) == (lo, hi) else [(_rows(A, s - lo, e - lo, n),
                                                             None if B is None else _rows(B, s - lo, e - lo, n))
                                                            for A, B in calls]
                    with _Apply(sub):
                        outs.append(fn(x[s - a:e - a]))
                lo = hi
            return outs[0] if len(outs) == 1 else torch.cat(outs)

    def stacked(self) -> list:
        """Each dropout call's masks over the whole step (rows concatenated): for vmap over samples."""
        counts = {len(c) for _, c in self.parts}
        if len(counts) != 1:
            raise DiffinError("the step's micro-batches made different numbers of dropout calls")
        out = []
        for i in range(counts.pop()):
            a = torch.cat([_rows(c[i][0], 0, n, n) for n, c in self.parts])
            b = None if self.parts[0][1][i][1] is None else torch.cat([_rows(c[i][1], 0, n, n) for n, c in self.parts])
            out.append((a, b))
        return out

    @contextlib.contextmanager
    def one_sample(self, lane: list):
        old, self.lane = self.lane, lane
        try:
            yield
        finally:
            self.lane = old


def _rows(t: torch.Tensor, a: int, b: int, n: int) -> torch.Tensor:
    if t.dim() == 0 or t.shape[0] != n:
        raise DiffinError(f"a dropout mask of shape {list(t.shape)} does not lead with the batch's {n} rows: "
                          "it cannot be split by samples")
    return t[a:b]


def capture(record: ForwardStates, s: int, fm, theta: torch.Tensor, x: torch.Tensor) -> StepMasks | None:
    """Step s's masks for its batch ``x`` (the step's rows, micro-batches in order), drawn again
    from the recorded states; None when the step drew nothing. Problems (rows that do not add up,
    a forward that drew something else, a state hash that differs) are noted in
    ``record.problems`` and the masks drawn are used."""
    idx = record.forwards(s)
    if not idx:
        if len(record.step):              # other steps drew: this one's forward went unrecorded
            record.note("missing", s)
        return None
    sizes = [int(record.rows[i]) for i in idx]
    if sum(sizes) != len(x):
        record.note("rows", s)
        return None
    device = x.device
    if (record.device == "cuda") != (device.type == "cuda"):
        record.note("device", s)
        return None
    parts, lo = [], 0
    from torch.func import functional_call
    params = fm.unflatten(theta)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        for i, n in zip(idx, sizes):
            set_states(record.states(i), device)
            mode = _Capture(device)
            start = get_states(device)
            with train_flags(fm.model), mode:
                functional_call(fm.model, params, (x[lo:lo + n],))
            end = get_states(device)
            if not _same(end, mode.after_last if mode.after_last is not None else start):
                record.note("other", s)
            if int(record.after[i]) != state_hash(end):
                record.note("hash", s)
            parts.append((n, mode.calls))
            lo += n
    return StepMasks(parts, fm.model)


def step_masks(ctx, s: int, fm, theta: torch.Tensor, x: torch.Tensor) -> StepMasks | None:
    """capture() for a scoring context (ctx.rng: the recorded ForwardStates, or None)."""
    record = getattr(ctx, "rng", None)
    if record is None:
        return None
    return capture(record, s, fm, theta, x)


PROBLEMS = {"missing": "no generator state was recorded for the step's forward",
            "rows": "the recorded forwards' rows do not add up to the step's batch",
            "device": "the masks were drawn on another device type than the one scoring",
            "other": "the forward drew random numbers outside dropout",
            "hash": "the redrawn masks left the generator in another state than training did"}


def problem_line(record: ForwardStates | None) -> str | None:
    """One approximation line naming the steps whose masks could not be redrawn exactly, or None."""
    if record is None or not record.problems:
        return None
    parts = [f"{PROBLEMS[k]} ({len(v)} step{'s' if len(v) > 1 else ''}, first {min(v)})"
             for k, v in sorted(record.problems.items())]
    return ("dropout masks not redrawn exactly: " + "; ".join(parts) +
            " (those steps use the masks drawn, or the eval-mode network where none could be)")


def flag(ctx) -> None:
    """Once per context: the problem line (if any) joins the run's approximations and is warned."""
    line = problem_line(getattr(ctx, "rng", None))
    approx = getattr(ctx.recipe, "approximations", None)
    if not line or not isinstance(approx, list) or any(a.startswith("dropout masks not redrawn") for a in approx):
        return
    import warnings
    from diffin_core.engine.recipe import RecipeWarning
    approx.append(line)
    warnings.warn(RecipeWarning(line), stacklevel=3)
