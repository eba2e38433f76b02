"""The memory budget: how many training samples, per-sample gradients and checkpoints may be live.

Every size here is in bytes; P = trainable parameters, float32 unless said. The engine never
holds anything of size N x P or m x P: the training set is read chunk by chunk, per-sample
gradients exist only for ``grad_chunk`` rows at a time, and at most ``cached_checkpoints``
parameter vectors (and query-side plan entries) stay in memory; the rest are re-read from disk.

    plan = plan_memory(P, activation_bytes, method="diffin", need_self=True, budget=4 * 2**30)
    plan.grad_chunk   # rows of per-sample gradients per chunk (self-influence path)
    plan.jvp_chunk    # rows per chunk when only directional derivatives (jvp) are needed

The cost model (measured on CPU, ResNet-18 and the small CNN; see benchmarks/scale.py):
a per-sample-gradient row costs ``GRAD_ROWS[method]`` P-vectors (the gradient and the
method's per-row temporaries) plus ``PSG_ACTIVATION`` times one sample's forward activations;
a jvp row costs ``JVP_ACTIVATION`` times the activations (primal and tangent, nothing of size P).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from diffin_core.errors import DiffinError

# P-sized rows live per training sample on the per-sample-gradient path (g_z and temporaries).
# diffin: g_final, g_k and vmap's flattening copy (ritz_self.walk: the adjoints are Ritz coordinates);
# diffin-adam (DiffIn.direct_walk): g_final, g_k, the carried u, v, w, the next u and v, temporaries
GRAD_ROWS = {"diffin": 4, "diffin-fold": 5, "diffin-adam": 11, "diffin-paper": 6, "tracin": 3, "tracin-adam": 4, "grad-dot": 3,
             "grad-cos": 3, "influence-function": 4}
DEFAULT_GRAD_ROWS = 6
PSG_ACTIVATION = 6.0     # vmap(grad) keeps the forward activations plus their gradients
JVP_ACTIVATION = 4.0     # primal + tangent activations and the op temporaries
FIXED_VECTORS = 10       # model weights, the carried query vectors, HVP and Gram-Schmidt temporaries (P each)
MIN_BUDGET = 64 * 2**20
HEADROOM = 0.85          # plan with 85% of the budget: the allocator's slack and small temporaries
                         # (measured: peak RSS rose 8-12% above the planned bytes without it)
# Diff-In's Hessian views cost hessian_batch x (HVPs + 1) gradient rows per checkpoint, whatever N.
# Below HESSIAN_FREE_WORK (batch x HVPs x P, a few CPU seconds) the requested batch is kept; above
# it the batch is cut so that the views take at most HESSIAN_SHARE of one pass over the training
# set per checkpoint (never below HESSIAN_MIN_BATCH). Small models and large N keep the default
# 256 (BatchNorm nets their bn_hessian_batch); a ResNet-18 (P = 11.2M) on N = 1,000 gets 32.
HESSIAN_FREE_WORK = 2e9
HESSIAN_SHARE = 0.5
HESSIAN_MIN_BATCH = 32
BATCH_ROWS = 64          # rows per slice of a batch gradient / HVP (fixed, so that the budget does
                         # not change finite-difference HVPs' rounding); fewer only when it must


def parse_bytes(text: str | int | float | None) -> int:
    """'4GB', '512M', '1.5GiB', 2e9 -> bytes; None, 0, '' or 'auto' -> 0 (auto)."""
    if text is None or text == "" or (isinstance(text, str) and text.strip().lower() == "auto"):
        return 0
    if isinstance(text, (int, float)):
        return max(0, int(text))
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not m:
        raise DiffinError(f"memory budget {text!r} is not a size like 4GB, 512MB or 2000000000")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def free_memory(device: torch.device | str = "cpu") -> int:
    """Free bytes on the device: CUDA free VRAM, else the OS's MemAvailable (or 4 GiB if unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def default_budget(device: torch.device | str = "cpu") -> int:
    """Half of the free RAM on CPU, 80% of the free VRAM on CUDA."""
    device = torch.device(device)
    return int(free_memory(device) * (0.8 if device.type == "cuda" else 0.5))


def activation_bytes(model: nn.Module, sample: torch.Tensor) -> int:
    """Bytes of every module's output for ONE sample (a forward probe with hooks, no grad)."""
    total = [0]

    def hook(_m, _inp, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel() * out.element_size()

    floor = sample[:1].numel() * sample.element_size()
    try:
        leaves = [m for m in model.modules() if not list(m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
    except (RuntimeError, NotImplementedError):       # e.g. a torch.export program
        return 64 * floor
    try:
        with torch.no_grad():
            model(sample[:1])
    finally:
        for h in handles:
            h.remove()
    return max(total[0], floor)


@dataclass(frozen=True)
class MemoryPlan:
    """Chunk sizes chosen for one scoring run (saved in meta.json)."""
    budget: int               # bytes the run may use for the engine's tensors
    num_params: int
    grad_chunk: int           # training rows per chunk on the per-sample-gradient path
    jvp_chunk: int            # training rows per chunk on the jvp / forward-only path
    cached_checkpoints: int   # parameter vectors (and plan entries) kept in memory at once
    row_bytes_grad: int       # estimated bytes per row, per-sample-gradient path
    row_bytes_jvp: int        # estimated bytes per row, jvp path
    fixed_bytes: int = 0      # estimated bytes besides the rows and the cached checkpoints
    checkpoint_bytes: int = 0  # estimated bytes per cached checkpoint (theta_k + its plan entry)
    batch_rows: int = BATCH_ROWS  # rows per slice of batch gradients / HVPs (query, Hessian batch)
    hessian_batch: int = 0    # the Hessian rows when hessian_batch_for cut them; 0 = not cut

    def chunk(self, need_self: bool) -> int:
        return self.grad_chunk if need_self else self.jvp_chunk

    def to_dict(self) -> dict:
        return asdict(self)


def plan_memory(num_params: int, act_bytes: int, method: str, need_self: bool = True,
                budget: int = 0, batch_size: int = 256, checkpoints: int = 1, plan_vectors: int = 1,
                device: torch.device | str = "cpu", dtype_bytes: int = 4) -> MemoryPlan:
    """Chunk sizes that keep the engine's live tensors under ``budget`` bytes (0 = auto).

    ``plan_vectors`` = P-sized query-side vectors one checkpoint's plan entry holds (diffin:
    w_k plus its Ritz vectors; also the Lanczos workspace while it is made). ``batch_size`` caps
    both chunks (the user's --batch-size). Raises a DiffinError when even one row does not fit.
    Guarantee (tests/test_scale.py): fixed_bytes + cached_checkpoints * checkpoint_bytes +
    chunk * row bytes <= HEADROOM * budget for either path, and a measured peak stays under it.
    """
    budget = int(budget) or default_budget(device)
    budget = max(budget, MIN_BUDGET)
    p_bytes = num_params * dtype_bytes
    per_ckpt = p_bytes * (1 + plan_vectors)                  # theta_k + its plan entry
    fixed = (FIXED_VECTORS + plan_vectors) * p_bytes + per_ckpt   # + Lanczos workspace, one checkpoint
    row_grad = GRAD_ROWS.get(method, DEFAULT_GRAD_ROWS) * p_bytes + int(PSG_ACTIVATION * act_bytes)
    row_jvp = int(JVP_ACTIVATION * act_bytes) + 64
    room = int(budget * HEADROOM) - fixed
    if room < row_jvp or (need_self and room < row_grad):
        need = (fixed + (row_grad if need_self else row_jvp)) / HEADROOM
        raise DiffinError(f"memory budget {budget / 2**20:.0f} MB is too small for a model of "
                          f"{num_params:,} parameters: it needs at least {math.ceil(need / 2**20)} MB")
    # rows first, then as many extra checkpoints as the rest allows (re-reading one costs a file read)
    grad_chunk = max(1, min(batch_size, room // row_grad))
    jvp_chunk = max(1, min(batch_size, room // row_jvp))
    used = max(grad_chunk * row_grad if need_self else 0, jvp_chunk * row_jvp)
    extra = (room - used) // per_ckpt
    cached = int(max(1, min(checkpoints, 1 + extra)))
    batch_rows = int(max(1, min(BATCH_ROWS, room // row_jvp)))   # never live with per-sample rows
    return MemoryPlan(budget, num_params, int(grad_chunk), int(jvp_chunk), cached, int(row_grad), int(row_jvp),
                      fixed_bytes=int(fixed - per_ckpt), checkpoint_bytes=int(per_ckpt), batch_rows=batch_rows)


def hessian_batch_for(requested: int, num_params: int, n: int, lanczos_steps: int) -> int:
    """The Hessian batch Diff-In's views use: ``requested`` unless requested x HVPs x P exceeds
    HESSIAN_FREE_WORK, then at most HESSIAN_SHARE * n / (HVPs + 1) rows (>= HESSIAN_MIN_BATCH).
    HVPs = lanczos_steps plus half as many for momentum's second start."""
    requested = int(requested)
    hvps = int(lanczos_steps) + int(lanczos_steps) // 2
    if requested * hvps * int(num_params) <= HESSIAN_FREE_WORK:
        return requested
    return int(min(requested, max(HESSIAN_MIN_BATCH, int(HESSIAN_SHARE * n) // (hvps + 1))))


_LIBC: list = []


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Chunk after chunk of activations (a few MB each, above glibc's dynamic mmap threshold once it
    has risen) fragments the heap: without this the influence walk over 1M rows crept from
    ~300 to ~570 MB of anonymous RSS during one checkpoint (the CNN of benchmarks/scale.py);
    trimmed every few chunks it stayed flat at ~250 MB."""
    if not _LIBC:
        try:
            import ctypes
            import ctypes.util
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.append(lib.malloc_trim if hasattr(lib, "malloc_trim") else None)
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)
