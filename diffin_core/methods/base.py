"""The estimator interface. A method only supplies its query-side vectors and a per-chunk rule;
the base class does the batching over the training set, the checkpoint bookkeeping, the final
predictions and the progress reports (dattri-style attributors, TRAK-style one front).

Sign convention (the whole product): influence(z, Q) = L_Q(theta_T without z) - L_Q(theta_T).
Positive = helpful (removing z raises the query loss), negative = harmful. Self-influence uses
Q = {z}; label_issue: higher = more likely mislabelled.
"""
from __future__ import annotations

from dataclasses import dataclass, field, asdict
from typing import Callable, Sequence

import numpy as np
import torch

from diffin_core.errors import DiffinError
from diffin_core.project.data import Split
from diffin_core.engine.functional import FunctionalModel
from diffin_core.engine.recipe import Recipe

ProgressFn = Callable[[int, int, str], None]


@dataclass
class ScoreSettings:
    """Every knob of every estimator, saved into runs/<run>/meta.json."""
    batch_size: int = 256          # at most this many training samples per chunk (the memory
                                   # budget may choose fewer; per-sample gradients live per chunk)
    hessian_batch: int = 256       # samples in the fixed batch whose Hessian Diff-In propagates through
    bn_hessian_batch: int = 1024   # at least this many for nets with BatchNorm (0: hessian_batch): from 256
                                   # samples their Hessian was measured too noisy (benchmarks/recipes.py)
    lanczos_steps: int = 10        # Hessian-vector products per checkpoint (Diff-In, IF low-rank)
    eps: float = 1e-3              # finite-difference step: ||eps-scaled v|| (paper Eq. 6)
    hvp: str = "auto"              # "fd": finite differences of gradients (paper Eq. 6, one extra
                                   # gradient); "exact": forward-over-reverse; "auto": exact where
                                   # finite differences are measured not accurate enough (hvp.py)
    paper_batch: int = 128         # diffin-paper: the random batch B per checkpoint
    damping: float = 0.01          # influence-function damping lambda (absolute)
    explicit_max_params: int = 5000  # influence-function: explicit Hessian at or below this many params
    cg_iters: int = 100
    seed: int = 0
    device: str = "auto"
    memory_budget: int = 0         # bytes the engine's tensors may use (0 = auto: half the free RAM,
                                   # 80% of the free VRAM); sets the chunks (budget.py), not the scores
    precision: str = "float32"     # "bfloat16" / "float16": the scoring forward passes under autocast,
                                   # only after a check against float32 passes (precision.py)

    def to_dict(self) -> dict:
        return asdict(self)


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: cuda, then mps, then cpu. A device string that is not a device, or names one
    this machine lacks, is a one-line DiffinError (never torch's traceback)."""
    if name != "auto":
        try:
            dev = torch.device(name)
        except (RuntimeError, TypeError, ValueError):
            raise DiffinError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N or mps)") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise DiffinError(f"--device {name}: this machine has no usable CUDA GPU "
                                  f"(torch {torch.__version__}{'' if torch.version.cuda else ', a CPU-only build'})")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise DiffinError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
        elif dev.type == "mps":
            mps = getattr(torch.backends, "mps", None)
            if mps is None or not mps.is_available():
                raise DiffinError(f"--device {name}: MPS (Apple GPU) is not available on this machine")
        elif dev.type not in ("cpu",):
            raise DiffinError(f"--device {name!r}: diffin runs on cpu, cuda or mps")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def segment_lengths(steps: list[int]) -> np.ndarray:
    """Training steps owned by each checkpoint (sum = last step).

    Checkpoint k owns the steps nearer to it than to its neighbours: boundaries sit half-way
    between saved steps; steps before the first checkpoint go to the first, and the final
    checkpoint (the explained model) owns the half-interval before it.
    """
    t = np.asarray(steps, dtype=np.float64)
    if len(t) == 1:
        return np.array([max(t[0], 1.0)])
    bounds = np.concatenate([[0.0], (t[:-1] + t[1:]) / 2, [t[-1]]])
    return np.diff(bounds)


@dataclass
class Context:
    """What an estimator sees: the model as a function, the checkpoints, the training split.

    Per-checkpoint data are indexable sequences, read only as ``seq[k]`` (they may be lazy):
    ``thetas[k]`` (P,) trainable parameters, ``buffers[k]`` that checkpoint's buffers (BatchNorm
    running statistics; None = the model's own), ``precond[k]`` Adam's D = 1/(sqrt(v_hat)+eps)
    (P,) frozen at that checkpoint (None = not Adam / not recorded). Use ``fm_at(k)`` for the
    model bound to checkpoint k's buffers.
    """
    fm: FunctionalModel
    thetas: Sequence[torch.Tensor]        # (P,) per checkpoint, on ``device``, step order
    steps: list[int]
    lrs: np.ndarray                       # mean effective lr of each checkpoint's owned steps
                                          # (momentum-adjusted: lr (1-dampening)/(1-beta) for SGD)
    segments: np.ndarray                  # steps owned by each checkpoint (= diff(bounds))
    train: Split
    settings: ScoreSettings
    device: torch.device
    progress: ProgressFn = field(default=lambda d, t, m: None)
    recipe: Recipe = field(default_factory=Recipe)
    step_lrs: np.ndarray | None = None    # (T,) lr of every optimiser step (float64)
    bounds: np.ndarray | None = None      # (m+1,) checkpoint k owns steps bounds[k] <= s < bounds[k+1]
    buffers: Sequence[dict | None] | None = None
    precond: Sequence[torch.Tensor | None] | None = None
    files: Sequence[str] | None = None    # checkpoint file names, for messages
    memory: object | None = None          # budget.MemoryPlan of the running method (set by runner.run)
    stages: object | None = None          # stages.Stages: where a resumable job saves its stages
    precision: dict | None = None         # precision.decide's record: the precision used, the check
    moments: Sequence | None = None       # Adam with a batch order: per checkpoint (exp_avg (P,),
                                          # exp_avg_sq (P,), Adam's step count) (adam_batches.py)
    batch_order: object | None = None     # checkpoints.BatchOrder: every step's batch rows, or None
    replay: object | None = None          # the forward replay class of the batch-order path (SGD:
                                          # sgd_batches.SGDReplay; None: Adam's, adam_batches._Replay)
    adam_checks: dict = field(default_factory=dict)   # adam_batches.choose: per checkpoint interval,
                                          # (held weights?, the replay's self-check record)
    groups: object | None = None          # recipe.GroupMap: per-group lr scale / weight decay / frozen
                                          # parameters (None: one lr and weight decay for all)
    clip: np.ndarray | None = None        # (T,) gradient clipping's factor per step (None: no clipping)
    clip_max_norm: float | None = None    # clip_grad_norm_'s max norm (2-norm) on the batch-order paths:
                                          # the removal through each clipped gradient exactly (adam_batches.clip_removal)
    clip_stats: dict = field(default_factory=dict)    # clip_removal's per-step records (once per context)
    momenta: np.ndarray | None = None     # (T,) SGD's momentum per step when a schedule changes it
    loss: object | None = None            # functional.LossSpec the per-sample loss (None: cross-entropy)
    rng: object | None = None             # dropout.ForwardStates: training's generator states per random
                                          # forward, on the batch-order paths (None: eval-mode network)
    of_checkpoints: int | None = None     # a truncated context (label_issue.truncate_context): the
                                          # full run's checkpoint count, so messages name its checkpoints

    def fm_at(self, k: int) -> FunctionalModel:
        """The model bound to checkpoint k's buffers (its own BatchNorm statistics)."""
        return self.fm if self.buffers is None else self.fm.with_buffers(self.buffers[k])

    @property
    def hessian_rows(self) -> int:
        """Rows of the fixed Hessian batch: settings.hessian_batch, raised to bn_hessian_batch for
        a model with BatchNorm (capped at N by sample_batch)."""
        rows = self.settings.hessian_batch
        bn = torch.nn.modules.batchnorm._BatchNorm
        if self.fm.buffers and any(isinstance(m, bn) for m in self.fm.model.modules()):
            rows = max(rows, self.settings.bn_hessian_batch)
        return rows

    def label(self, k: int) -> str:
        """'checkpoint 3/10 (step 200, ckpt_000200.safetensors)' for one-line messages."""
        name = f", {self.files[k]}" if self.files is not None else ""
        return f"checkpoint {k + 1}/{self.of_checkpoints or self.m} (step {self.steps[k]}{name})"

    @property
    def acc_dtype(self) -> torch.dtype:
        """Accumulation dtype for sums over checkpoints: float64, float32 on MPS (no float64)."""
        return torch.float32 if self.device.type == "mps" else torch.float64

    @property
    def n(self) -> int:
        return len(self.train)

    @property
    def m(self) -> int:
        return len(self.steps)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (read without loading a checkpoint from a lazy store)."""
        return getattr(self.thetas, "dtype", None) or self.thetas[0].dtype

    def tensors(self, x: np.ndarray, y: np.ndarray):
        return (torch.as_tensor(np.asarray(x), dtype=self.dtype).to(self.device),
                torch.as_tensor(np.asarray(y), dtype=torch.long).to(self.device))

    def chunk_rows(self, need_self: bool = False) -> int:
        """Rows per chunk: the memory plan's (per-sample-gradient or jvp path), else batch_size."""
        return self.memory.chunk(need_self) if self.memory is not None else self.settings.batch_size

    def chunks(self, split: Split | None = None, size: int | None = None):
        """(slice, x, y) over a split, read (streamed sources: only these rows, through a
        DataLoader) and moved to the device one chunk at a time."""
        split = split or self.train
        size = size or self.chunk_rows()
        if hasattr(split, "iter_chunks"):
            for start, x, y in split.iter_chunks(size):
                yield (slice(start, start + len(y)), *self.tensors(x, y))
            return
        for start in range(0, len(split), size):
            sl = slice(start, min(start + size, len(split)))
            yield (sl, *self.tensors(split.x[sl], split.y[sl]))

    def mean_grad(self, k: int, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        """Gradient of the mean loss over all of (x, y) at checkpoint k, chunked (P,)."""
        theta, fm = self.thetas[k], self.fm_at(k)
        step = self.memory.batch_rows if self.memory is not None else self.settings.batch_size
        total = torch.zeros_like(theta)
        for start in range(0, len(y), step):
            xb, yb = self.tensors(x[start:start + step], y[start:start + step])
            total += fm.batch_grad(theta, xb, yb) * len(yb)
        return total / max(len(y), 1)

    def sample_batch(self, size: int, k: int, salt: int = 0):
        """A fixed random training batch for checkpoint k (seeded: reruns see the same batch)."""
        rng = np.random.default_rng([self.settings.seed, k, salt])
        idx = rng.choice(self.n, size=min(size, self.n), replace=False)
        return self.tensors(self.train.x[idx], self.train.y[idx])


def tap_grads(ctx, k: int, g: torch.Tensor) -> None:
    """Hand one chunk's per-sample gradients at checkpoint k to ``ctx.grad_tap`` when the scoring
    walk has one (runner.score_rows sets the rows; features.SketchSink: the feature store built
    from the walk's own gradients, none computed twice)."""
    tap = getattr(ctx, "grad_tap", None)
    if tap is not None:
        tap(k, g)


def loo_loss(self_influence: np.ndarray, probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Estimated leave-one-out loss of each sample (nats): its final loss plus its
    self-influence, i.e. the loss the model would have on z had z not been trained on.
    A memorised mislabelled sample has a low final loss but a high leave-one-out loss."""
    return -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)) + self_influence


class Attributor:
    """One estimator. Subclasses set ``name`` and implement ``prepare`` and ``chunk``."""
    name = "base"
    has_self_influence = True
    uses_recipe = False          # True: models the training run (refused for an optimiser it cannot model)

    def prepare(self, ctx: Context, qx: np.ndarray, qy: np.ndarray):
        """Query-side work, done once per query set; returns state handed to ``chunk``."""
        raise NotImplementedError

    def chunk(self, ctx: Context, state, x, y, need_self: bool):
        """Scores of one training chunk: (influence (b,), self_influence (b,) or None).

        Self-influence may come as (b, m): each checkpoint's contribution; ``run`` then sums it
        and also returns it as "self_by_checkpoint" (N, m) float32."""
        raise NotImplementedError

    def label_issue(self, self_influence: np.ndarray | None, probs: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Higher = more likely mislabelled. Default: the self-influence itself."""
        return self_influence

    # --- driven by the base class -----------------------------------------------------------
    def run(self, ctx: Context, qx: np.ndarray, qy: np.ndarray, need_self: bool = True) -> dict[str, np.ndarray]:
        """Score every training sample; returns arrays of length N keyed by column name
        (plus "self_by_checkpoint" (N, m) when the method reports per-checkpoint self-influence).

        runner.run does the walk in bounded memory: the query plan first (saved per checkpoint
        in ``ctx.stages`` when set), then checkpoint by checkpoint (influence only) or row range
        by row range (with self-influence), chunk sizes from the memory budget."""
        from diffin_core.errors import DiffinError
        from diffin_core.methods.runner import run
        if self.uses_recipe and getattr(ctx.recipe, "refused", None):
            raise DiffinError(f"{self.name}: {ctx.recipe.refused}")
        return run(self, ctx, qx, qy, need_self, ctx.stages)
