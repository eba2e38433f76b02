"""Low-precision (bfloat16 / float16) forward passes for scoring the training set, used only
after a measured check against float32.

Setting: ``ScoreSettings.precision`` ("float32", the default; "bfloat16"; "float16"), CLI
``diffin score --precision``. What runs in low precision: only the training-set passes of the
scoring walk, ``FunctionalModel.directional`` (jvp) and ``per_sample_grads``, under
``torch.autocast``, and only inside ``lowered(ctx)`` (runner.score_rows). Their outputs stay
float32 tensors (autocast computes matmuls and convolutions in the low dtype, losses in float32).
Never in low precision: the query plan (query gradient, finite-difference HVPs, Lanczos,
propagation: made before scoring), the products of per-sample gradients with w_k and the Ritz
vectors (outside autocast), the final predictions, and anything inside ``functional.no_tf32``
(finite differences switch autocast off).

The check (``decide``, run by runner.run before each scoring walk; meta.json keeps the main
walk's): ``SAMPLE_ROWS`` training rows drawn with
``settings.seed`` are scored with the run's plan in float32 and in the low precision. The low
precision is used only if, for the influence (and the self-influence when the run scores it):
  * relative L2 error ||s_low - s_32|| / ||s_32|| <= 0.05: bfloat16 rounds to 2^-8 (0.4%) per
    operation, float16 to 2^-11; a few layers compound that to ~1-2%, so 5% passes healthy
    rounding and rejects systematic damage (float16 overflow, saturated layers, a model whose
    logits lose their digits);
  * Spearman rank correlation >= 0.99, errors under delta = 1% of the float32 RMS score
    forgiven (ties): people read rankings (top-k tables, label-issue lists), but differences
    under 1% of the typical score are far below what the estimator resolves (Diff-In's rank agreement with
    leave-one-out retraining is ~0.95 on the digits benchmarks), so their order is noise in
    either precision (a small CNN's scores sit in tight per-class clusters whose inner order
    bf16 reshuffles: plain Spearman 0.98 at a 0.14% L2 error); 0.99 keeps the rounding's rank
    cost an order of magnitude under the estimator's own;
  * top-k agreement >= 0.8 at both ends (most helpful, most harmful), k = 10% of the sample rows:
    the share of the low-precision top-k whose float32 score is within delta of the float32 k-th
    score, i.e. the tables people act on hold no sample float32 clearly ranks outside them
    (2 in 10 allowed at the boundary).
Otherwise the run falls back to float32 with one warning line. Units: Spearman and overlap are
fractions in [0, 1]; the L2 error is a fraction of the float32 norm. The figures are recorded in
``ctx.precision`` (-> meta.json "precision").
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from diffin_core.errors import DiffinError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAMPLE_ROWS = 256

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("diffin_low_precision", default=None)


class PrecisionWarning(UserWarning):
    """The low precision failed its check (or is unsupported): the run scores in float32."""


@dataclass(frozen=True)
class Thresholds:
    spearman: float = 0.99        # minimum rank correlation with float32
    rel_l2: float = 0.05          # maximum ||s_low - s_32|| / ||s_32||
    topk_overlap: float = 0.8     # minimum overlap of the top-k (both ends)
    topk_fraction: float = 0.1    # k = this fraction of the sample rows (at least 1)
    tie: float = 0.01             # scores closer than this x RMS(float32 scores) are ties


THRESHOLDS = Thresholds()


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a precision setting; one-line error for anything else."""
    if name not in DTYPES:
        raise DiffinError(f"precision {name!r}: choose float32, bfloat16 or float16")
    return DTYPES[name]


# --- the scope: only the forward-derivative passes of the scoring walk -------------------------
@contextlib.contextmanager
def lowered(ctx):
    """Inside: ``autocast`` (entered by the passes below) uses the precision the check chose for
    this context (``ctx.precision["used"]``); float32 when there was no check."""
    used = (getattr(ctx, "precision", None) or {}).get("used", "float32")
    token = _ACTIVE.set(None if used == "float32" else (ctx.device.type, DTYPES[used]))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def full():
    """Inside: no low precision, even within ``lowered`` (finite differences, HVPs)."""
    off = _autocast_off()
    token = _ACTIVE.set(None)
    try:
        with off:
            yield
    finally:
        _ACTIVE.reset(token)


def autocast():
    """The autocast context for a scoring forward pass: active only inside ``lowered``."""
    active = _ACTIVE.get()
    return contextlib.nullcontext() if active is None else torch.autocast(active[0], dtype=active[1])


def _autocast_off():
    active = _ACTIVE.get()
    return contextlib.nullcontext() if active is None else torch.autocast(active[0], enabled=False)


# --- the check ----------------------------------------------------------------------------------
def compare(ref: np.ndarray, low: np.ndarray, th: Thresholds | None = None) -> dict:
    """Agreement of low-precision scores with float32 ones (both (n,)), against ``th`` (default
    THRESHOLDS). Differences under ``delta`` = ``th.tie`` x RMS(float32 scores) are ties:
    "spearman" ranks the low-precision scores with each error shrunk by delta (an error under
    delta leaves the float32 score, so only larger errors move ranks), "topk_overlap" counts a
    low-precision top-k member as agreeing when its float32 score is within delta of the float32
    k-th score (lower of the two ends). "spearman_raw" and "topk_raw" are the plain figures
    (reported, not gated). Returns those, rel_l2, k and passed."""
    th = th or THRESHOLDS
    ref, low = np.asarray(ref, dtype=np.float64).ravel(), np.asarray(low, dtype=np.float64).ravel()
    k = max(1, int(round(th.topk_fraction * len(ref))))
    if not (np.isfinite(low).all() and np.isfinite(ref).all()):
        return {"spearman": float("nan"), "spearman_raw": float("nan"), "rel_l2": float("inf"),
                "topk_overlap": 0.0, "topk_raw": 0.0, "k": k, "passed": False}
    norm = float(np.linalg.norm(ref))
    err = float(np.linalg.norm(low - ref) / norm) if norm > 0 else float(np.linalg.norm(low) > 0)
    delta = th.tie * norm / np.sqrt(max(len(ref), 1))
    d = low - ref
    beyond = ref + np.sign(d) * np.maximum(np.abs(d) - delta, 0.0)    # errors up to delta forgiven
    rho, rho_raw = _spearman(ref, beyond), _spearman(ref, low)
    raw, tied = [], []
    for sign in (-1, 1):                                  # -1: most helpful, +1: most harmful
        top_ref = np.argsort(sign * ref, kind="stable")[:k]
        top_low = np.argsort(sign * low, kind="stable")[:k]
        kth = sign * ref[top_ref[-1]]
        raw.append(len(set(top_ref) & set(top_low)) / k)
        tied.append(float(np.mean(sign * ref[top_low] <= kth + delta)))
    passed = rho >= th.spearman and err <= th.rel_l2 and min(tied) >= th.topk_overlap
    return {"spearman": round(rho, 6), "spearman_raw": round(rho_raw, 6), "rel_l2": round(err, 6),
            "topk_overlap": round(min(tied), 4), "topk_raw": round(min(raw), 4), "k": k, "passed": bool(passed)}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation, ties given their average rank (1.0 when a side is constant)."""
    import pandas as pd
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    sd = ra.std() * rb.std()
    return float(((ra - ra.mean()) * (rb - rb.mean())).mean() / sd) if sd > 0 else 1.0


def not_checked(settings, reason: str) -> dict:
    """The record of a run that scored in float32 without a check (e.g. a Ray run)."""
    return {"requested": getattr(settings, "precision", "float32"), "used": "float32", "reason": reason}


def decide(method, ctx, state, need_self: bool, chunk: int) -> dict:
    """The check above, on ``SAMPLE_ROWS`` seeded rows scored in chunks of ``chunk``; returns the
    record (requested, used, rows, and per score: spearman, rel_l2, topk_overlap, k, passed)."""
    name = getattr(ctx.settings, "precision", "float32")
    dtype_of(name)
    if name == "float32":
        return {"requested": name, "used": name}
    n = min(SAMPLE_ROWS, ctx.n)
    rows = np.sort(np.random.default_rng([int(ctx.settings.seed), 7011]).choice(ctx.n, n, replace=False))
    record = {"requested": name, "used": "float32", "rows": int(n)}
    try:
        ref = _sample_scores(method, ctx, state, rows, need_self, chunk, {"used": "float32"})
        low = _sample_scores(method, ctx, state, rows, need_self, chunk, {"used": name})
    except RuntimeError as e:           # e.g. an autocast dtype this device does not support
        record["reason"] = f"{name} unsupported on {ctx.device.type}: {str(e).splitlines()[0][:120]}"
        warnings.warn(PrecisionWarning(f"precision: {record['reason']}; scoring in float32"), stacklevel=2)
        return record
    for key in ref:
        record[key] = compare(ref[key], low[key])
    passed = all(record[key]["passed"] for key in ref)
    if passed:
        record["used"] = name
    else:
        figs = "; ".join(f"{key}: Spearman {r['spearman']:.4f}, rel. L2 {r['rel_l2']:.3g}, top-{r['k']} "
                         f"{r['topk_overlap']:.2f}" for key, r in ((k_, record[k_]) for k_ in ref))
        record["reason"] = f"failed the check against float32 on {n} rows ({figs})"
        warnings.warn(PrecisionWarning(f"precision: {name} {record['reason']}; scoring in float32"),
                      stacklevel=2)
    return record


def _sample_scores(method, ctx, state, rows, need_self, chunk, choice) -> dict[str, np.ndarray]:
    saved = getattr(ctx, "precision", None)
    ctx.precision = choice
    out: dict[str, list] = {"influence": [], "self_influence": []}
    try:
        for a in range(0, len(rows), chunk):
            idx = rows[a:a + chunk]
            x, y = ctx.tensors(np.asarray(ctx.train.x[idx], dtype=np.float32), np.asarray(ctx.train.y)[idx])
            with lowered(ctx):
                res = method.chunk(ctx, state, x, y, need_self)      # (+ a method's extra outputs)
            i, s = res[0], res[1]
            out["influence"].append(i.double().cpu().numpy())
            if s is not None:
                out["self_influence"].append(s.double().cpu().numpy().reshape(len(idx), -1).sum(1))
    finally:
        ctx.precision = saved
    return {k: np.concatenate(v) for k, v in out.items() if v}


def summary(record: dict | None) -> str:
    """One line for the CLI and the runs table: 'bfloat16 (checked on 256 rows: Spearman 0.999,
    rel. L2 0.6%)' or 'float32 (bfloat16 failed the check ...)'; '' for plain float32 runs."""
    if not record or record.get("requested", "float32") == "float32":
        return ""
    inf = record.get("influence")
    figs = f"Spearman {inf['spearman']:.4f}, rel. L2 {100 * inf['rel_l2']:.2g}%" if inf else ""
    if record.get("used") == record.get("requested"):
        return f"precision {record['used']} (checked on {record.get('rows')} rows: {figs})"
    return f"precision float32 ({record['requested']}: {record.get('reason', 'not used')})"
