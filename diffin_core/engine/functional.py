"""A model as a function of one flat parameter vector, with the derivatives every estimator uses.

All derivatives come from torch.func. Shapes: ``theta`` is (P,) (the trainable parameters,
flattened in ``named_parameters`` order); a batch is ``x`` (B, ...) and integer labels ``y`` (B,).
Losses are per-sample (the stated LossSpec: cross-entropy by default) in nats; batch losses are
means over the batch.
Buffers (BatchNorm running statistics) are fixed per checkpoint: ``with_buffers`` gives the
same model bound to one checkpoint's buffers; the model runs in eval mode, except inside
``dropout.applied(masks)`` (a training step's recorded dropout masks, engine/dropout.py), where
every forward runs the train-mode network with those masks.

Finite-difference HVPs run with TF32 off (``no_tf32``): TF32's ~1e-3 relative precision is
coarser than the finite-difference step and would turn the difference into noise.
"""
from __future__ import annotations

import contextlib
import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from diffin_core.engine import dropout, precision
from diffin_core.engine.models import eval_mode

LOSSES = {"cross_entropy"}


class LossSpec:
    """The per-sample training loss every estimator differentiates (diffin.toml ``[model] loss``,
    or the loss the Recorder recorded): cross-entropy with ``label_smoothing``, class ``weight``
    and ``ignore_index`` (torch's meanings), or a user function ``fn(logits, y) -> (B,)``.

    ``scale`` multiplies every per-sample loss: torch's mean with class weights (or an ignored
    class) divides by the batch's weight sum, which diffin models by the training set's mean
    weight (``scale = 1 / mean weight``; set by the scoring context from the training labels).
    """

    def __init__(self, name: str = "cross_entropy", label_smoothing: float = 0.0, weight=None,
                 ignore_index: int = -100, fn=None, where: str = "", scale: float = 1.0):
        self.name, self.label_smoothing, self.ignore_index = name, float(label_smoothing), int(ignore_index)
        self.weight = None if weight is None else [float(w) for w in weight]
        self.fn, self.where, self.scale = fn, where, float(scale)
        self._w: dict = {}

    @property
    def plain(self) -> bool:
        """Plain cross-entropy (the default every estimator assumed before losses were stated)."""
        return (self.fn is None and not self.label_smoothing and self.weight is None and self.ignore_index == -100
                and self.scale == 1.0)

    def settings(self) -> dict:
        """The loss as the manifest's "loss" keys (without the user function's code)."""
        if self.fn is not None:
            return {"name": self.where or self.name}
        out = {"name": "cross_entropy", "label_smoothing": self.label_smoothing, "ignore_index": self.ignore_index}
        if self.weight is not None:
            out["weight"] = list(self.weight)
        return out

    def describe(self) -> str:
        if self.fn is not None:
            return f"the user loss {self.where or self.name}"
        parts = [f"label_smoothing {self.label_smoothing:g}"] if self.label_smoothing else []
        if self.weight is not None:
            parts.append("class weights")
        if self.ignore_index != -100:
            parts.append(f"ignore_index {self.ignore_index}")
        return "cross_entropy" + (f" ({', '.join(parts)})" if parts else "")

    def class_weights(self, y: torch.Tensor) -> torch.Tensor | None:
        """Each label's weight (B,) in torch's weighted mean (0 for ignore_index), or None."""
        if self.weight is None and self.ignore_index < 0:
            return None
        w = torch.ones(len(y), dtype=torch.float64) if self.weight is None else \
            torch.as_tensor(self.weight, dtype=torch.float64)[torch.as_tensor(y).clamp(0, len(self.weight) - 1)]
        return torch.where(torch.as_tensor(y) == self.ignore_index, torch.zeros_like(w), w)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.fn is not None:
            out = self.fn(logits, y)
            if not isinstance(out, torch.Tensor) or out.shape != y.shape[:1]:
                from diffin_core.errors import DiffinError
                raise DiffinError(f"the loss function {self.where or self.name} must return per-sample losses of "
                                  f"shape ({len(y)},), got {getattr(out, 'shape', type(out).__name__)}")
        else:
            w = None
            if self.weight is not None:
                key = (logits.device, logits.dtype)
                if key not in self._w:
                    self._w[key] = torch.as_tensor(self.weight, dtype=logits.dtype, device=logits.device)
                w = self._w[key]
            out = F.cross_entropy(logits, y, weight=w, ignore_index=self.ignore_index, reduction="none",
                                  label_smoothing=self.label_smoothing)
        return out * self.scale if self.scale != 1.0 else out


@contextlib.contextmanager
def no_tf32():
    """Full float32 matmuls and convolutions inside (CUDA's TF32 off); the flags are restored.

    Only the ``allow_tf32`` flags are touched: torch >= 2.9 raises when code reads
    ``get_float32_matmul_precision`` after a mix of its legacy and new precision APIs (seen on an
    H100 with torch 2.11), and a user's training script may have set either.
    """
    saved = []
    for backend in (torch.backends.cuda.matmul, torch.backends.cudnn):
        try:
            saved.append((backend, backend.allow_tf32))
            backend.allow_tf32 = False
        except (RuntimeError, AttributeError):
            pass
    try:
        with precision.full():          # and no bf16/fp16 autocast (precision.py)
            yield
    finally:
        for backend, value in reversed(saved):
            try:
                backend.allow_tf32 = value
            except (RuntimeError, AttributeError):
                pass


def _reverse_grad(fn, theta: torch.Tensor, x, y) -> torch.Tensor:
    """d fn(theta, x, y) / d theta (P,) by torch.autograd on a detached leaf; under a torch.func
    transform (vmap, jvp, grad over theta) torch.func.grad, which composes with it."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return grad(fn)(theta, x, y).detach()
    with torch.enable_grad():
        t = theta.detach().requires_grad_(True)
        return torch.autograd.grad(fn(t, x, y), t)[0].detach()


SLICE_WORKERS = 1                   # threads at most for the slices of one batch gradient: 1, since on the
                                    # 2-core dev machine two measured 0.72-0.96x of one at load 1-3 (the GIL and
                                    # a 64-row slice's few ms; benchmarks/results/explore_profile.csv wall_2t_ratio);
                                    # the same bits with more (tests/test_plan_threads.py)
_POOL_SIZE = 8
SINGLE_THREAD_WORK = 1 << 24        # slice rows x P up to which batch gradients run one thread a slice (_sliced_grad)
_REPLICA_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _REPLICA_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(_POOL_SIZE, thread_name_prefix="diffin-slices")
        return _POOL


_TWIN = None                        # engine.twin.Twin of this process (start_twin), or None
_TWIN_MODELS: list = []             # the models it knows (as they were at its fork)


def start_twin(models, tasks: dict | None = None):
    """Fork this process's twin (engine/twin.py) for the batch gradients of ``models`` (the
    FunctionalModels whose slices it may take) and ``tasks`` (name -> fn, run there); once per
    process. None where no twin applies (twin.usable)."""
    global _TWIN
    from diffin_core.engine import twin
    if _TWIN is not None and _TWIN.alive:
        return _TWIN
    if not twin.usable():
        return None
    _TWIN_MODELS[:] = list(models)
    _TWIN = twin.Twin({"grad": _twin_grad, **(tasks or {})}, in_twin=_forget_twin)
    import atexit
    atexit.register(stop_twin)          # waited for at exit: its CPU is counted with this process's
    return _TWIN


def _forget_twin() -> None:
    """In the twin: no twin of the twin."""
    global _TWIN
    _TWIN = None


def stop_twin() -> None:
    global _TWIN
    if _TWIN is not None:
        _TWIN.close()
        _TWIN = None
    _TWIN_MODELS.clear()


def _twin_grad(index: int, step: int, theta, x, y) -> list:
    """In the twin: the slice gradients of x (its rows from one slice start on), one thread."""
    fm = _TWIN_MODELS[index]
    return [_reverse_grad(fm.mean_loss, theta, x[a:a + step], y[a:a + step]) for a in range(0, len(y), step)]


_OUTER_THREADS = 0                  # torch's thread count outside single_threaded (0: not inside)


def available_threads() -> int:
    """Threads this process may use: torch's count, or the count outside single_threaded."""
    return max(torch.get_num_threads(), _OUTER_THREADS)


@contextlib.contextmanager
def single_threaded(enabled: bool = True):
    """Torch's intra-op threads at 1 inside (restored after; re-entrant): kernels then round the
    same at any thread count. Batch gradients inside still spread their slices over
    available_threads() (FunctionalModel._sliced_grad)."""
    global _OUTER_THREADS
    threads = torch.get_num_threads()
    if not enabled or threads == 1:
        yield
        return
    outer, _OUTER_THREADS = _OUTER_THREADS, max(_OUTER_THREADS, threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _OUTER_THREADS = outer


class FunctionalModel:
    """Wraps an ``nn.Module`` so that ``theta`` (P,) is the only free argument."""

    def __init__(self, model: nn.Module, loss: "str | LossSpec" = "cross_entropy"):
        if isinstance(loss, str) and loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; known: {sorted(LOSSES)}")
        self.loss = loss if isinstance(loss, LossSpec) else LossSpec()
        self.model = eval_mode(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.num_params = sum(self.sizes)
        self.buffers = dict(model.named_buffers())
        self.max_rows: int | None = None   # batch gradients / HVPs of more rows run in slices of this
                                           # many (same result: the mean is linear); set by the budget
        self._replicas: list = []          # module copies for slices on other threads (shared by
                                           # with_buffers' copies; see _replica)

    # --- parameters -------------------------------------------------------------------------
    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(theta, self.sizes)
        params = {n: t.view(s) for n, t, s in zip(self.names, parts, self.shapes)}
        return {**self.buffers, **params}

    def flatten(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[n].reshape(-1) for n in self.names])

    def theta_of(self, model: nn.Module) -> torch.Tensor:
        return self.flatten(dict(model.named_parameters())).detach().clone()

    def with_buffers(self, buffers: dict[str, torch.Tensor] | None) -> "FunctionalModel":
        """The same model bound to other buffers (one checkpoint's BatchNorm statistics);
        keys missing from ``buffers`` keep this model's values. Cheap: shares the module."""
        if not buffers:
            return self
        other = copy.copy(self)
        other.buffers = {k: buffers.get(k, v) for k, v in self.buffers.items()}
        return other

    def to(self, device, dtype=None) -> "FunctionalModel":
        self._replicas.clear()
        self.model.to(device=device, dtype=dtype)
        self.buffers = {k: v.to(device) for k, v in self.buffers.items()}
        return self

    # --- forward ----------------------------------------------------------------------------
    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        masks = dropout.current()           # a training step's dropout masks (engine/dropout.py)
        if masks is not None:
            params = self.unflatten(theta)
            return masks.forward(lambda xs: functional_call(self.model, params, (xs,)), x)
        return functional_call(self.model, self.unflatten(theta), (x,))

    def losses(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample losses (B,): the stated loss (LossSpec; plain cross-entropy by default)."""
        if self.loss.plain:
            return F.cross_entropy(self.logits(theta, x), y, reduction="none")
        return self.loss(self.logits(theta, x), y)

    def mean_loss(self, theta, x, y) -> torch.Tensor:
        return self.losses(theta, x, y).mean()

    # --- first order ------------------------------------------------------------------------
    def _slice_rows(self) -> int | None:
        """Rows per slice of a batch gradient / HVP (None: the whole batch at once)."""
        return self.max_rows

    def _sliced(self, fn, x, y) -> torch.Tensor:
        """mean over the batch of fn(x_slice, y_slice) (a per-slice mean), ``_slice_rows()`` at a time."""
        n, step = len(y), self._slice_rows() or len(y)
        if n <= step:
            return fn(x, y)
        masks = dropout.current()           # a step's dropout masks: each slice takes its rows
        total = None
        for a in range(0, n, step):
            with (masks.rows(masks.window[0] + a, masks.window[0] + min(n, a + step)) if masks is not None
                  else contextlib.nullcontext()):
                part = fn(x[a:a + step], y[a:a + step]) * (min(n, a + step) - a)
            total = part if total is None else total.add_(part)
        return total / n

    def _replica(self, i: int) -> "FunctionalModel | None":
        """This model (its buffers and loss) on module copy ``i`` (0: its own module), for a slice
        on another thread: functional_call swaps a module's parameters in place, so two threads
        cannot share one. None when the module cannot be copied."""
        if i == 0:
            return self
        reps = self._replicas
        with _REPLICA_LOCK:
            while len(reps) < i:
                try:
                    reps.append(copy.deepcopy(self.model))
                except Exception:           # a module deepcopy cannot copy: slices stay on one thread
                    return None
        other = copy.copy(self)
        other.model = reps[i - 1]
        return other

    def threads_round(self, rows: int) -> bool:
        """Whether a batch gradient of ``rows`` rows rounds by torch's thread count: only where one
        slice is too large for one thread (slice rows x P above SINGLE_THREAD_WORK, e.g. a
        ResNet's 32-row Hessian batch), whose kernels then use every intra-op thread."""
        return min(rows, self._slice_rows() or rows) * self.num_params > SINGLE_THREAD_WORK

    def _sliced_grad(self, theta, x, y) -> torch.Tensor | None:
        """The batch-mean gradient over slices of ``_slice_rows()`` rows, each slice's ops on ONE
        intra-op thread, the slices spread over up to min(available_threads(), SLICE_WORKERS) threads
        (1 by default), each on its own module copy, and summed in slice order: the same bits whatever the thread count (a 2-thread
        kernel rounds otherwise, and finite-difference HVPs amplify that rounding: measured 0.5% on
        the sample CNN's plan, 4e-4 on its top influence values). For slices small enough (rows x P at most SINGLE_THREAD_WORK, as the
        sample CNN's 64-row slices and a query's gradient); None where this does not apply (larger
        slices keep the intra-op threads: threads_round; dropout masks, a torch.func transform, not
        CPU, a subclass with its own forward): the caller slices as before."""
        n, step = len(y), self._slice_rows() or len(y)
        if (self.threads_round(n) or type(self) is not FunctionalModel or dropout.current() is not None
                or theta.device.type != "cpu" or x.device.type != "cpu"
                or torch._C._functorch.peek_interpreter_stack() is not None):
            return None
        starts = list(range(0, n, step))
        workers = max(1, min(available_threads(), len(starts), SLICE_WORKERS, _POOL_SIZE))
        models = [self._replica(i) for i in range(workers)]
        if any(m is None for m in models):
            models, workers = [self], 1

        def run(w: int) -> list[tuple[int, torch.Tensor]]:
            fm = models[w]
            return [(i, _reverse_grad(fm.mean_loss, theta, x[a:a + step], y[a:a + step]))
                    for i, a in enumerate(starts) if i % workers == w]
        with single_threaded():
            twin = self._twin_half(theta, x, y, starts, step) if workers == 1 else None
            if twin is not None:            # the later slices in the forked twin, the first here
                pending, h = twin
                parts = []
                t0 = time.perf_counter()
                try:
                    parts = [(i, _reverse_grad(self.mean_loss, theta, x[a:a + step], y[a:a + step]))
                             for i, a in enumerate(starts[:h])]
                finally:
                    theirs = pending.result()           # always collected: the twin is free again
                    pending.twin.note(time.perf_counter() - t0, True)
                if theirs is None:                      # the twin failed: its slices here
                    theirs = [_reverse_grad(self.mean_loss, theta, x[a:a + step], y[a:a + step]) for a in starts[h:]]
                parts += list(zip(range(h, len(starts)), theirs))
            elif workers == 1:              # _sliced's own slice-order sum: the same bits as below
                timed = _TWIN if (_TWIN is not None and len(starts) >= 2
                                  and any(m is self for m in _TWIN_MODELS)) else None
                t0 = time.perf_counter()
                out = self._sliced(lambda xs, ys: _reverse_grad(self.mean_loss, theta, xs, ys), x, y)
                if timed is not None:           # timed against the twin's calls (Twin.wanted)
                    timed.note(time.perf_counter() - t0, False)
                return out
            else:
                parts = [p for f in [_pool().submit(run, w) for w in range(workers)] for p in f.result()]
        parts.sort(key=lambda p: p[0])
        total = None
        for i, part in parts:
            part = part * (min(n, starts[i] + step) - starts[i])
            total = part if total is None else total.add_(part)
        return total / n

    def _twin_half(self, theta, x, y, starts, step):
        """(pending, h): the slices from ``starts[h]`` on sent to the process's twin (engine/twin.py),
        or None where it does not apply (no twin, this model not one it knows, fewer than 2 slices,
        low precision active, the tensors do not fit its mapping or it is busy)."""
        twin = _TWIN
        if twin is None or len(starts) < 2 or not isinstance(x, torch.Tensor) or precision._ACTIVE.get() is not None:
            return None
        index = next((i for i, m in enumerate(_TWIN_MODELS) if m is self), None)
        if index is None or not twin.wanted():
            return None
        h = (len(starts) + 1) // 2
        a = starts[h]
        pending = twin.submit("grad", (index, step), [theta, x[a:], y[a:]])
        return None if pending is None else (pending, h)

    def batch_grad(self, theta, x, y) -> torch.Tensor:
        """Gradient of the batch-mean loss (P,): reverse mode on a leaf copy of ``theta``
        (torch.autograd; the same gradient as torch.func.grad to float rounding, about 1.4x faster
        on the sample CNN's 256-row Hessian batch, where the query plan spends its time). A batch of
        several slices runs them single-threaded (_sliced_grad: the same bits at any thread count)."""
        out = self._sliced_grad(theta, x, y)
        if out is not None:
            return out
        return self._sliced(lambda xs, ys: _reverse_grad(self.mean_loss, theta, xs, ys), x, y)

    def per_sample_grads(self, theta, x, y) -> torch.Tensor:
        """Per-sample gradients (B, P) via vmap(grad)."""
        def single(t, xi, yi):
            return self.mean_loss(t, xi.unsqueeze(0), yi.unsqueeze(0))
        masks = dropout.current()
        if masks is not None:               # a training step's masks: each sample its own row
            lo, hi = masks.window
            calls = masks.stacked()
            affine = [b is not None for _a, b in calls]
            flat = [t[lo:hi] for a, b in calls for t in (a, b) if t is not None]

            def lane(t, xi, yi, rows):
                it, mine = iter(rows), []
                for has_b in affine:
                    a = next(it).unsqueeze(0)
                    mine.append((a, next(it).unsqueeze(0) if has_b else None))
                with masks.one_sample(mine):
                    return single(t, xi, yi)
            with precision.autocast():
                return vmap(grad(lane), in_dims=(None, 0, 0, 0))(theta, x, y, flat).detach()
        with precision.autocast():          # low precision only inside precision.lowered
            return vmap(grad(single), in_dims=(None, 0, 0))(theta, x, y).detach()

    def directional(self, theta, x, y, v: torch.Tensor) -> torch.Tensor:
        """Per-sample directional derivatives <g_i, v> (B,) in one forward-mode pass (jvp)."""
        with precision.autocast():          # low precision only inside precision.lowered
            _, d = jvp(lambda t: self.losses(t, x, y), (theta,), (v,))
        return d.detach().float() if d.dtype in (torch.bfloat16, torch.float16) else d.detach()

    # --- second order -----------------------------------------------------------------------
    def hvp_fd(self, theta, x, y, v, base_grad: torch.Tensor | None = None, eps: float = 1e-3) -> torch.Tensor:
        """Hessian-vector product by a forward difference of gradients (Diff-In, paper Eq. 6).

        H v ~ (g(theta + h v) - g(theta)) / h with h chosen so that ||h v|| = eps.
        One extra gradient per product when ``base_grad`` = g(theta) is passed in (compute it
        inside ``no_tf32()`` too). TF32 is off for both gradients.
        """
        norm = torch.linalg.vector_norm(v)
        if norm == 0:
            return torch.zeros_like(v)
        h = eps / norm
        with no_tf32():
            g0 = self.batch_grad(theta, x, y) if base_grad is None else base_grad
            return (self.batch_grad(theta + h * v, x, y) - g0) / h

    def hvp_directional(self, theta, x, y, v) -> tuple[torch.Tensor, torch.Tensor]:
        """(H v (P,) of the batch-mean loss, the per-sample directional derivatives <g_i, v> (B,))
        in one reverse-over-reverse pass: with a = (1/B, ..., 1/B) as a leaf, the first backward
        gives J^T a = the batch gradient as a function of (theta, a); the second, of <J^T a, v>,
        gives H v (its theta part) and J v = (<g_i, v>)_i (its a part). The same quantities as
        hvp_exact and directional (float rounding aside: 1e-7 relative measured on the text
        sample's BERT) in one pass of about two and a half gradients instead of their two passes
        (47 ms against 70 + 27 ms CPU on a batch of 32 there): Adam's batch-order replay needs
        both for every training step (adam_batches.segment). Under a torch.func transform
        (where torch.autograd does not compose) it takes the forward-over-reverse form."""
        functorch = torch._C._functorch.peek_interpreter_stack() is not None

        def one(xs, ys):
            if functorch:
                def f(t):
                    losses = self.losses(t, xs, ys)
                    return losses.mean(), losses
                _, (hv, dl) = jvp(grad(f, has_aux=True), (theta,), (v,))
                return hv.detach(), dl.detach()
            with torch.enable_grad():
                t, a, losses, g = self._weighted_first_backward(theta, xs, ys)
                hv, dl = torch.autograd.grad(torch.dot(g, v.to(g.dtype)), (t, a), allow_unused=True)
            hv = torch.zeros_like(theta) if hv is None else hv.detach()
            return hv, (torch.zeros_like(losses) if dl is None else dl).detach()
        n, step = len(y), self._slice_rows() or len(y)
        if n <= step:
            return one(x, y)
        return _row_sliced(one, x, y, step, 0)

    def _weighted_first_backward(self, theta, xs, ys):
        """(t, a, losses, g) for the directional HVPs: t a leaf copy of theta, a the per-row loss
        weights 1/B as a leaf (so a second backward gives <g_i, v> per row), g = d(a . losses)/dt
        kept differentiable (create_graph). Call under torch.enable_grad()."""
        t = theta.detach().requires_grad_(True)
        losses = self.losses(t, xs, ys)
        a = torch.full(losses.shape, 1.0 / len(ys), dtype=losses.dtype, device=losses.device, requires_grad=True)
        g, = torch.autograd.grad(losses, t, grad_outputs=a, create_graph=True)
        return t, a, losses, g

    def hvp_directional_many(self, theta, x, y, V, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hvp_directional for K directions at once: (H V^T (K, P), <g_i, v_j> (K, B)) from one
        first backward (create_graph) shared by K second backwards (retain_graph). Measured on the
        text sample's BERT (batch 32): about 25 ms a direction at K = 64 against 47-58 ms for one
        fused pass (vmap over the directions, forward-over-reverse or is_grads_batched, was no
        faster). Same quantities as K calls of hvp_directional (float rounding aside). Under a
        torch.func transform: K calls of hvp_directional. ``out``: a (K, P) buffer of theta's dtype
        the products are written into when the batch is one slice (else a new tensor)."""
        V = V.reshape(-1, theta.numel())
        if torch._C._functorch.peek_interpreter_stack() is not None:
            parts = [self.hvp_directional(theta, x, y, v) for v in V]
            return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])

        def one(xs, ys, buf=None):
            with torch.enable_grad():
                t, a, losses, g = self._weighted_first_backward(theta, xs, ys)
                hv = (buf.zero_() if buf is not None else
                      torch.zeros(len(V), theta.numel(), dtype=theta.dtype, device=theta.device))
                dl = torch.zeros(len(V), len(ys), dtype=losses.dtype, device=losses.device)
                for i in range(len(V)):
                    h, d = torch.autograd.grad(g, (t, a), grad_outputs=V[i].to(g.dtype),
                                               retain_graph=i + 1 < len(V), allow_unused=True)
                    if h is not None:
                        hv[i] = h
                    if d is not None:
                        dl[i] = d
            return hv, dl
        n, step = len(y), self._slice_rows() or len(y)
        if n <= step:
            ok = out is not None and out.shape == (len(V), theta.numel()) and out.dtype == theta.dtype
            return one(x, y, out if ok else None)
        return _row_sliced(one, x, y, step, 1)

    def hvp_exact(self, theta, x, y, v) -> torch.Tensor:
        """Exact Hessian-vector product of the batch-mean loss: reverse-over-reverse (torch.autograd:
        the gradient with create_graph, then the gradient of <g, v>), which measured 1.27x faster
        than torch.func's forward-over-reverse on the text sample's BERT (256-row batch: 317 vs
        404 ms) and 1.07x on a ResNet-18 (3.82 vs 4.09 s, docs/performance.md); the same product
        to float rounding. Forward-over-reverse under a torch.func transform, and for a model with
        an op that has no double backward (then for the rest of this model's life)."""
        def forward(xs, ys):
            _, hv = jvp(grad(lambda t: self.mean_loss(t, xs, ys)), (theta,), (v,))
            return hv.detach()

        def reverse(xs, ys):
            with torch.enable_grad():
                t = theta.detach().requires_grad_(True)
                g, = torch.autograd.grad(self.mean_loss(t, xs, ys), t, create_graph=True)
                hv, = torch.autograd.grad(torch.dot(g, v.to(g.dtype)), t, allow_unused=True)
            return torch.zeros_like(theta) if hv is None else hv.detach()
        if torch._C._functorch.peek_interpreter_stack() is not None or getattr(self, "_no_double_backward", False):
            return self._sliced(forward, x, y)
        try:
            return self._sliced(reverse, x, y)
        except (RuntimeError, NotImplementedError):
            self._no_double_backward = True
            return self._sliced(forward, x, y)

    def hvp_retained(self, theta, x, y):
        """hv(v) -> the exact Hessian-vector product of the batch-mean loss at ``theta``
        (reverse-over-reverse), for many products on ONE batch (a Lanczos view): the batch's
        gradient graph (create_graph) is built at the first call and kept while ``hv`` lives, so each
        product is one backward through it. On a ResNet-18's 32-row Hessian batch (CPU, one thread)
        2.56 s a product after a 1.21 s build, against 3.97 s for hvp_exact, which repeats the
        forward and the first backward every time (benchmarks/resnet_profile.py, hvp_retained_32).
        The graph holds about twice the batch's activations (329 MB there). The same product as
        hvp_exact to float rounding (4e-7 relative there); slices as hvp_exact (the same
        slice-order sum). None where it does not apply (dropout masks, a torch.func transform):
        the caller takes hvp_exact."""
        if dropout.current() is not None or torch._C._functorch.peek_interpreter_stack() is not None:
            return None
        n, step = len(y), self._slice_rows() or len(y)
        graphs: list = []

        def build():
            with torch.enable_grad():
                for a in range(0, n, step):
                    t = theta.detach().requires_grad_(True)
                    g, = torch.autograd.grad(self.mean_loss(t, x[a:a + step], y[a:a + step]), t, create_graph=True)
                    graphs.append((t, g, min(n, a + step) - a))

        def hv(v: torch.Tensor) -> torch.Tensor:
            if not graphs:
                build()
            total = None
            with torch.enable_grad():
                for t, g, rows in graphs:
                    part, = torch.autograd.grad(g, t, grad_outputs=v.to(g.dtype), retain_graph=True,
                                                allow_unused=True)
                    part = torch.zeros_like(theta) if part is None else part.detach()
                    if len(graphs) == 1:
                        return part
                    part = part * rows
                    total = part if total is None else total.add_(part)
            return total / n
        return hv


def _row_sliced(one, x, y, step: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch-mean product taken ``step`` rows at a time: ``one(xs, ys)`` -> (a slice's mean
    product, its per-row terms); returns (the row-weighted mean over slices, the per-row terms
    concatenated along ``dim``). A step's recorded dropout masks: each slice takes its rows."""
    n = len(y)
    masks = dropout.current()
    total, parts = None, []
    for a in range(0, n, step):
        b = min(n, a + step)
        with (masks.rows(masks.window[0] + a, masks.window[0] + b) if masks is not None
              else contextlib.nullcontext()):
            hv, dl = one(x[a:b], y[a:b])
        hv = hv * (b - a)
        total = hv if total is None else total.add_(hv)
        parts.append(dl)
    return total / n, torch.cat(parts, dim=dim)
