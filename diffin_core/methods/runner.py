"""The scorer: how one estimator's query plan meets the training set, in bounded memory.

Parts (TRAK-style, one job each):
  gradient computer  functional.FunctionalModel   per-sample gradients (vmap) or jvp
  store              store.CheckpointStore         theta_k loaded on demand (LRU of ``keep``)
                     stages.Stages / LazyPlan      plan entries and partial scores on disk
  memory             budget.MemoryPlan             chunk sizes from the budget, P and the method
  scorer             this module                   the two walks below

Stage 1, plan: the method's query-side ``prepare`` (latest checkpoint first for diffin). Methods
that split it into ``prepare_start`` / ``prepare_step`` save every checkpoint's entry (and the
query vector carried on) as it is made, so a killed job resumes at the next checkpoint and at
most ``keep`` entries are in memory; otherwise the finished plan is saved entry by entry.

Stage 2, scores:
  influence only (top-k, Ray shards of a plan per checkpoint): checkpoint by checkpoint. Each
      plan entry k scores the whole training set by directional derivatives (jvp) at theta_k;
      its (N,) contribution is saved (``scores/ckpt_k``) and the entries' sum is the influence.
  with self-influence (``diffin score``): row range by row range (``scores/rows_a_b``): each
      range is scored chunk by chunk with every plan entry, and saved.
Both walks skip the items already saved. Scores are sums of per-sample terms: any chunking,
budget, shard or resume order gives the same numbers up to float rounding.

``score_rows`` scores one row range with a prepared plan: Ray tasks call it
(``distributed.py``), and so does the local walk.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from diffin_core.engine import precision, threads
from diffin_core.engine.propagate import deferred_finite
from diffin_core.engine.budget import MemoryPlan, activation_bytes, hessian_batch_for, plan_memory, trim_heap
from diffin_core.project.stages import LazyPlan, Stages, StageSettings
from diffin_core.project.store import CheckpointStore

SHARD_CHUNKS = 16          # chunks per saved row range (resume granularity of the self path)
TRIM_CHUNKS = 8            # chunks between returning the C heap's free pages (budget.trim_heap)


# --- memory -----------------------------------------------------------------------------------
def plan_vectors(method, ctx) -> int:
    """P-sized vectors one plan entry holds (diffin: w_k and its Ritz vectors)."""
    name = getattr(method, "name", "")
    r = int(getattr(ctx.settings, "lanczos_steps", 10))
    # diffin: w_k and the Ritz vectors of two starts (u: r steps, momentum's v: r/2 more)
    return {"diffin": r + r // 2 + 2, "diffin-paper": r + 4, "influence-function": r + 5,
            "tracin-adam": 2}.get(name, 1)


def memory_plan(method, ctx, need_self: bool) -> MemoryPlan:
    """Chunk sizes for this method on this context (budget from ``settings.memory_budget``)."""
    s = ctx.settings
    dtype = _dtype(ctx)
    probe = torch.as_tensor(np.asarray(ctx.train.x[:1], dtype=np.float32), device=ctx.device, dtype=dtype)
    act = activation_bytes(ctx.fm.model, probe)
    key = method.memory_key(ctx) if hasattr(method, "memory_key") else getattr(method, "name", "")
    mem = plan_memory(ctx.fm.num_params, act, key, need_self,
                      budget=int(getattr(s, "memory_budget", 0) or 0), batch_size=int(s.batch_size),
                      checkpoints=len(ctx.thetas), plan_vectors=plan_vectors(method, ctx), device=ctx.device,
                      dtype_bytes=torch.tensor([], dtype=dtype).element_size())
    rows = int(getattr(ctx, "hessian_rows", s.hessian_batch))     # BatchNorm nets ask for more
    hb = hessian_batch_for(rows, ctx.fm.num_params, ctx.n, int(getattr(s, "lanczos_steps", 10)))
    return replace(mem, hessian_batch=hb if hb != rows else 0)


def configure(ctx, mem: MemoryPlan) -> None:
    """Set the context up for ``mem``: chunks, HVP slices, cached checkpoints and the Hessian
    batch (when the plan cut it: a copy of the settings with hessian_batch = the cut and the
    BatchNorm raise off; the caller's object is not touched)."""
    if hasattr(ctx, "memory"):
        ctx.memory = mem                                  # Context.chunks / mean_grad use it
    ctx.fm.max_rows = mem.batch_rows                      # batch gradients / HVPs sliced to fit
    if isinstance(ctx.thetas, CheckpointStore):
        ctx.thetas.keep = mem.cached_checkpoints
    if mem.hessian_batch and int(getattr(ctx, "hessian_rows", ctx.settings.hessian_batch)) != mem.hessian_batch:
        extra = {"bn_hessian_batch": 0} if hasattr(ctx.settings, "bn_hessian_batch") else {}
        ctx.settings = replace(ctx.settings, hessian_batch=mem.hessian_batch, **extra)


# --- stage 1: the plan --------------------------------------------------------------------------
def _fits(mem: MemoryPlan | None, entries: int) -> bool:
    return mem is None or mem.cached_checkpoints >= entries


def prepare(method, ctx, qx, qy, stages: Stages, mem: MemoryPlan | None = None):
    """The method's query plan: loaded when a finished plan stage exists, else computed
    (checkpoint by checkpoint, each entry saved as it is made when the method supports it)."""
    keep = mem.cached_checkpoints if mem else 1
    done = stages.plan_done()
    if done is not None:
        plan = _NonEmpty(stages.lazy_plan(done, ctx.device, keep))
        return plan if not _fits(mem, done) else list(plan)
    if hasattr(method, "prepare_step"):
        return _prepare_stepwise(method, ctx, qx, qy, stages, mem)
    state = method.prepare(ctx, qx, qy)
    if isinstance(state, list) and stages.enabled:
        if all(stages.save_plan_entry(i, e, carry=None) for i, e in enumerate(state)):
            stages.mark_plan_done(len(state))
            if not _fits(mem, len(state)):
                return stages.lazy_plan(len(state), ctx.device, keep)
    return state


def _prepare_stepwise(method, ctx, qx, qy, stages: Stages, mem):
    """prepare_start(ctx, qx, qy) -> carry; prepare_step(ctx, i, carry, qx, qy) -> (entry or None,
    carry) for i in range(method.plan_steps(ctx)); each entry and carry saved as made, and a
    resumed job starts at the first step not saved."""
    steps = method.plan_steps(ctx)
    entries: list = []
    saved = stages.saved_plan_entries() if stages.enabled else 0
    if saved:
        carry = stages.load_carry(saved - 1, ctx.device)
        entries = list(stages.lazy_plan(saved, ctx.device, 1)) if _fits(mem, steps) else []
        ctx.progress(0, ctx.n, f"{method.name}: resumed the query plan after {saved} of {steps} checkpoints")
    else:
        carry = method.prepare_start(ctx, qx, qy)
    storable = stages.enabled
    for i in range(saved, steps):
        entry, carry = method.prepare_step(ctx, i, carry, qx, qy)
        if storable:
            storable = stages.save_plan_entry(i, entry, carry)
        if not storable or _fits(mem, steps):
            entries.append(entry)
        ctx.progress(0, ctx.n, f"{method.name}: query plan: checkpoint {i + 1}/{steps} done")
    if storable:
        stages.mark_plan_done(steps)
        if not _fits(mem, steps):
            return _NonEmpty(stages.lazy_plan(steps, ctx.device, mem.cached_checkpoints))
    return [e for e in entries if e is not None]


class _NonEmpty(Sequence):
    """A lazy plan without its empty (None) entries (checkpoints with nothing to add)."""

    def __init__(self, plan: LazyPlan):
        self.plan = plan
        self.index = [i for i in range(len(plan)) if not _is_none_item(plan, i)]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(len(self))[j]]
        return self.plan[self.index[j]]

    def __iter__(self):
        for j in range(len(self)):
            yield self[j]


def _is_none_item(plan: LazyPlan, i: int) -> bool:
    import json
    return json.loads(plan.paths[i].with_suffix(".json").read_text()) == {"value": None}


def per_checkpoint(method, state) -> bool:
    """True when the plan is a sequence of per-checkpoint entries whose influence adds up."""
    return isinstance(state, Sequence) and not isinstance(state, (str, tuple)) \
        and getattr(method, "plan_adds_up", True) and len(state) > 0


# --- stage 2: scores ----------------------------------------------------------------------------
def _dtype(ctx) -> torch.dtype:
    """The parameters' dtype without loading a checkpoint (a store knows it)."""
    return ctx.thetas.dtype if isinstance(ctx.thetas, CheckpointStore) else ctx.thetas[0].dtype


def _chunks(ctx, start: int, stop: int, size: int, workers: int | None = None):
    """(x, y) tensors on the device over rows [start, stop) in chunks of ``size``."""
    split, dtype = ctx.train, _dtype(ctx)

    def tensors(x, y):
        return (torch.as_tensor(np.asarray(x), dtype=dtype).to(ctx.device),
                torch.as_tensor(np.asarray(y), dtype=torch.long).to(ctx.device))
    if hasattr(split, "iter_chunks"):
        for _, x, y in split.iter_chunks(size, start, stop, workers):
            yield tensors(x, y)
    else:
        for a in range(start, stop, size):
            b = min(a + size, stop)
            yield tensors(np.asarray(split.x[a:b], dtype=np.float32), split.y[a:b])


def score_rows(method, ctx, state, start: int, stop: int, need_self: bool = True,
               chunk: int | None = None, workers: int | None = None,   # None: the split's [data] workers
               progress_base: int | None = None, progress_total: int | None = None) -> dict[str, np.ndarray]:
    """Scores of training rows [start, stop) with a prepared plan ``state``.

    Returns float64 numpy arrays of length stop - start: "influence", and when ``need_self``
    "probs" (b, C) at the final checkpoint plus "self_influence" ((b,), or (b, m) per checkpoint)
    when the method has one.
    ``chunk`` rows are live at a time (default: the memory plan's, else settings.batch_size).
    Ray tasks call this with the plan from the object store (see distributed.py).
    """
    chunk = int(chunk or ctx.settings.batch_size)
    infl, selfs, probs = [], [], []
    extras: dict[str, list] = {}          # per-row outputs a method adds (DiffIn's folded label_issue)
    done = start
    acc = getattr(ctx, "acc_dtype", torch.float64)
    # results stay on the device until the range is done, and the finite checks are made once
    # at its end: no device-to-host round trip per chunk (a GPU walk never waits on the host)
    with deferred_finite(ctx):
        for j, (x, y) in enumerate(_chunks(ctx, start, stop, chunk, workers)):
            if j % TRIM_CHUNKS == TRIM_CHUNKS - 1:
                trim_heap()                                   # RSS flat in N (budget.trim_heap)
            tap = getattr(ctx, "grad_tap", None)
            if tap is not None:                 # which rows the walk's gradients belong to (base.tap_grads)
                tap.rows = slice(done, done + len(y))
            try:
                with precision.lowered(ctx):    # bf16/fp16 forward passes when the check chose them
                    res = method.chunk(ctx, state, x, y, need_self)
            finally:
                if tap is not None:
                    tap.rows = None
            i, s = res[0], res[1]
            for key, value in (res[2] if len(res) > 2 else {}).items():
                extras.setdefault(key, []).append(value.detach().to(acc))
            infl.append(i.detach().to(acc))
            if s is not None:
                selfs.append(s.detach().to(acc))
            if need_self:
                last = len(ctx.thetas) - 1
                fm = ctx.fm_at(last) if hasattr(ctx, "fm_at") else ctx.fm
                with torch.no_grad():
                    probs.append(torch.softmax(fm.logits(ctx.thetas[last], x), -1).to(acc))
            done += len(y)
            if progress_base is not None:
                ctx.progress(progress_base + done - start, progress_total or ctx.n,
                             f"{method.name}: scoring training samples")

    def host(parts):                      # one transfer per output for the whole range
        return torch.cat(parts).cpu().double().numpy()
    out = {"influence": host(infl) if infl else np.zeros(0)}
    terms = method.row_terms(ctx, state, start, stop) if hasattr(method, "row_terms") else None
    if terms is not None:              # per-sample terms the plan holds (diffin: Adam's batch order)
        out["influence"] = out["influence"] + terms
    if selfs:
        out["self_influence"] = host(selfs)
    for key, parts in extras.items():
        out[key] = host(parts)
    if need_self:
        out["probs"] = host(probs) if probs else np.zeros((0, 0))
    return out


def run(method, ctx, qx, qy, need_self: bool = True, stages: Stages | None = None,
        mem: MemoryPlan | None = None) -> dict[str, np.ndarray]:
    """Score every training sample (stages saved in ``stages`` when it has a folder).

    Returns {"influence" (N,)} and, when ``need_self``, "self_influence" (N,) (NaN when the
    method has none), "label_issue" (N,) and "probs" (N, C), float64, plus "self_by_checkpoint"
    (N, m) float32 when the method reports self-influence per checkpoint. Without a stage folder
    a plan larger than the budget's cached checkpoints spills to a temporary one (deleted after).
    """
    stages = stages or Stages(None, StageSettings(method.name, {}, "", ""))
    mem = mem or memory_plan(method, ctx, need_self)
    spill = None
    if not stages.enabled and mem.cached_checkpoints < len(ctx.thetas) and hasattr(method, "prepare_step"):
        spill = Path(tempfile.mkdtemp(prefix="diffin-plan-"))
        stages = Stages(spill, StageSettings(method.name, {}, "", "", need_self=need_self))
    try:
        return _run(method, ctx, qx, qy, need_self, stages, mem)
    finally:
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)


def _run(method, ctx, qx, qy, need_self: bool, stages: Stages, mem: MemoryPlan) -> dict[str, np.ndarray]:
    configure(ctx, mem)
    ctx.progress(0, ctx.n, f"{method.name}: preparing query vectors")
    started, cpu0 = time.perf_counter(), time.process_time()
    state = prepare(method, ctx, qx, qy, stages, mem)
    ctx.timings = {"plan_s": round(time.perf_counter() - started, 3),     # meta.json: where time went
                   "plan_cpu_s": round(time.process_time() - cpu0, 3)}   # (CPU: the work, whatever the load)
    ctx.precision = precision.decide(method, ctx, state, need_self, mem.chunk(need_self))   # float32 or checked
    n = ctx.n
    if not need_self and per_checkpoint(method, state):
        infl = np.zeros(n)
        total = len(state)
        for i in range(total):
            part = stages.load_scores(f"ckpt_{i:03d}")
            if part is None:
                threads.adapt()
                part = score_rows(method, ctx, [state[i]], 0, n, False, mem.jvp_chunk, progress_base=i * n,
                                  progress_total=total * n)
                stages.save_scores(f"ckpt_{i:03d}", part)
            infl += part["influence"]
            ctx.progress((i + 1) * n, total * n, f"{method.name}: checkpoint {i + 1}/{total} scored")
        ctx.timings["scores_s"] = round(time.perf_counter() - started - ctx.timings["plan_s"], 3)
        ctx.timings["scores_cpu_s"] = round(time.process_time() - cpu0 - ctx.timings["plan_cpu_s"], 3)
        return {"influence": infl}
    size = mem.chunk(need_self)
    shard = size * SHARD_CHUNKS
    parts = []
    for a in range(0, n, shard):
        b = min(n, a + shard)
        threads.adapt()                  # an automatic thread count follows the machine's load
        part = stages.load_scores(f"rows_{a}_{b}")
        if part is None:
            part = score_rows(method, ctx, state, a, b, need_self, size, progress_base=a)
            stages.save_scores(f"rows_{a}_{b}", part)
        parts.append(part)
        ctx.progress(b, n, f"{method.name}: rows {a}-{b} scored")
    ctx.timings["scores_s"] = round(time.perf_counter() - started - ctx.timings["plan_s"], 3)
    ctx.timings["scores_cpu_s"] = round(time.process_time() - cpu0 - ctx.timings["plan_cpu_s"], 3)
    out = {"influence": np.concatenate([p["influence"] for p in parts])}
    if need_self:
        p = np.concatenate([q["probs"] for q in parts])
        has_self = all("self_influence" in q for q in parts)
        self_infl = np.concatenate([q["self_influence"] for q in parts]) if has_self else None
        if self_infl is not None and self_infl.ndim == 2:      # (N, m): each checkpoint's share
            out["self_by_checkpoint"] = self_infl.astype(np.float32)
            self_infl = self_infl.sum(1)
        out["self_influence"] = self_infl if self_infl is not None else np.full(n, np.nan)
        for key in set(parts[0]) - {"influence", "self_influence", "probs"} if parts else ():
            if all(key in q for q in parts):          # a method's extra per-row outputs
                out[key] = np.concatenate([q[key] for q in parts])
        out["label_issue"] = np.asarray(method.label_issue(self_infl, p, np.asarray(ctx.train.y)), dtype=np.float64)
        out["probs"] = p
    return out


