"""The feature store: one pass per run after which any query's Diff-In top-k is a few small products.

Diff-In scores a training sample z on a query set Q as (methods/diffin.py)
    influence(z, Q) = sum_k c_k <w_k, g_z(theta_k)>,   c_k = lr_k / N,
    w_k = phi_k(H_k) u_k,  u_{k-1} = a_k(H_k) u_k,  u_last = g_Q(theta_T).
Every operator is linear in the query gradient u = g_Q and symmetric, so the sum folds into one
query-independent vector per training sample, its *effective gradient*
    e_z = sum_k c_k a_last(H_last) ... a_{k+1}(H_{k+1}) phi_k(H_k) g_z(theta_k),
    influence(z, Q) = <e_z, g_Q(theta_T)>,
built forward in time, e <- a_k(H_k) e + c_k phi_k(H_k) g_z(theta_k). phi and a act through
query-independent Lanczos views of each checkpoint's Hessian (``view_rank`` matvecs from a seeded
random start, on the same fixed batch the exact path uses), stored once, so no query ever needs an
HVP. The store keeps, under runs/<run>/features/:

    train.npy        (N, d) float16  unit rows of S e_z    (S: a seeded CountSketch, projector.py)
    train_norm.npy   (N,)   float32  their lengths (influence units: nats per unit of g_Q)
    query.npy        (Nq, d) float16 unit rows of S g_q(theta_T), per query sample
    query_norm.npy   (Nq,)  float32
    class_sums.npy   (C, d) float32  sum of projected e_z per given training label
    views.safetensors               Ritz values_k (r,) and vectors_k (P, r) per checkpoint
    meta.json                        settings, per-checkpoint coefficients, timings, size

A query set's top-k is then one mean of query rows and one (N, d) matrix-vector product, which
shortlists candidates; the top ``rerank`` on each side are rescored by the exact path itself (the
query's own plan, as `diffin top --exact` builds it, whose HVPs cost the same at any N, then one
jvp per checkpoint on the shortlist only). Why (benchmarks/explore.py, MNIST MLP, 4,000 rows):
the stored views alone reach top-10 overlap 0.64 with the exact path even without projection
(Spearman 0.41; 0.73 at rank 128), because the exact path's Lanczos starts at each query's own
vector; ground truth prefers that (tests/test_ground_truth.py case, single queries: Spearman
0.89-0.98 vs 0.57-0.93 for rank-32 stored views), so the store ranks and the exact path decides.
Sign: influence > 0 helpful, < 0 harmful.
"""
from __future__ import annotations

import json
import shutil
import os
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from diffin_core.errors import DiffinError
from diffin_core.engine.lanczos import SpectralView
from diffin_core.engine.projector import Projector

DIRNAME = "features"
VERSION = 3                    # 3: one independent sketch per checkpoint ("independent_sketches") and a
                               # per-checkpoint gradient basis (2: one sketch shared by every checkpoint,
                               # as a view-less store still has; 1: dense Gaussian)
METHODS = ("diffin",)          # runs whose exact path this store approximates
SHORTLIST_FRACTION = 0.02      # default shortlist per side: 2% of N ...
SHORTLIST_MIN = 100            # ... and at least this many rows (benchmarks/explore.py)


@dataclass
class FeatureSettings:
    """Settings of the feature pass, saved in features/meta.json."""
    dim: int = 2048            # sketch dimension d (benchmarks/explore.py: with SHORTLIST_FRACTION, top-10
                               # overlap with the exact path 0.92 at N = 10k, 0.96 at 100k)
    view_rank: int = 32        # Lanczos steps (Ritz pairs) of each checkpoint's stored Hessian view
    chunk_size: int = 0        # training rows per chunk; 0: the run's memory plan (per-sample-
                               # gradient rows, budget.py), or 256 without one
    seed: int = 0              # projection and Lanczos start vectors
    rerank: int = -1           # candidates per side the exact path rescores (0: none; -1: a share
                               # of N, FeatureStore.shortlist; see benchmarks/explore.py)
    checkpoint_dim: int = 1024  # per-checkpoint sketch of every g_z(theta_k) (0: none): with the
                               # query's exact plan it bounds every row's influence (certified_rows)
    checkpoint_mb: int = 512   # ... kept only up to this size (m * N * d * 2 bytes): d shrinks to fit,
                               # and below 256 columns the store has none
    checkpoint_basis: int = 64  # per checkpoint, the top principal directions of the per-sample gradients
                               # (fitted on basis_rows seeded rows): each row's coordinates there are
                               # kept exactly, only the rest is sketched (a smaller error, so fewer rows
                               # to rescore: benchmarks/explore_profile.py); 0: none
    basis_rows: int = 512      # rows the basis is fitted on
    basis_mb: int = 64         # the bases (m * P * r * 4 bytes) kept only up to this size: r shrinks to
                               # fit, and below 8 directions the store has none

    def to_dict(self) -> dict:
        return asdict(self)


def checkpoint_sketch_dim(settings: FeatureSettings, m: int, n: int) -> int:
    """Columns of the per-checkpoint sketch: settings.checkpoint_dim, shrunk to fit checkpoint_mb
    (float16), 0 when that leaves fewer than 256 (their error would shortlist most rows)."""
    if settings.checkpoint_dim <= 0 or m * n == 0:
        return 0
    d = min(int(settings.checkpoint_dim), int(settings.checkpoint_mb * 2 ** 20 / (2 * m * n)))
    return d if d >= 256 else 0


def checkpoint_basis_rank(settings: FeatureSettings, m: int, n: int, num_params: int) -> int:
    """Directions of the per-checkpoint gradient basis: settings.checkpoint_basis, shrunk to fit
    basis_mb (float32) and to half the fitted rows; 0 when fewer than 8 are left."""
    if settings.checkpoint_basis <= 0 or m * num_params == 0:
        return 0
    fit = min(int(settings.basis_rows), int(n))
    r = min(int(settings.checkpoint_basis), int(settings.basis_mb * 2 ** 20 / (4 * m * num_params)), fit // 2,
            int(num_params) // 2)
    return r if r >= 8 else 0


def sketch_seed(seed: int, k: int, independent: bool = True) -> int:
    """The per-checkpoint sketch's seed: one independent CountSketch per checkpoint (meta.json
    "independent_sketches"), so the checkpoints' sketching errors are independent and their
    variances add; otherwise one sketch for every checkpoint (a version-2 store, a view-less store:
    errors correlated across checkpoints)."""
    return int(seed) + 1 + 1009 * (int(k) + 1) if independent else int(seed) + 1


GRAM_TOL = 1e-8     # fit_basis takes the Gram route where its subspace error bound is below this


def fit_basis(ctx, k: int, rows: np.ndarray, r: int, chunk: int = 256) -> torch.Tensor:
    """(P, r) orthonormal: the top ``r`` right singular vectors of checkpoint k's per-sample
    gradients on ``rows`` (its uncentred principal directions). ``basis_of`` computes them."""
    fm, theta = ctx.fm_at(k), ctx.thetas[k]
    parts = []
    for a in range(0, len(rows), chunk):
        x, y = ctx.tensors(ctx.train.x[rows[a:a + chunk]], ctx.train.y[rows[a:a + chunk]])
        parts.append(fm.per_sample_grads(theta, x, y).double())
    return basis_of(torch.cat(parts), r)[0]


def basis_of(a: torch.Tensor, r: int, route: str = "auto") -> tuple[torch.Tensor, str]:
    """(a float32 (P, r) orthonormal basis of the top ``r`` right singular vectors of ``a``, an
    (n, P) float64 matrix; the route taken: "gram" or "svd").

    The Gram route: the eigendecomposition of the (n, n) Gram matrix G = a a^T (lambda_i = s_i^2,
    eigenvectors u_i), then v_i = a^T u_i / s_i, re-orthonormalised by QR. It costs n^2 P for G and
    n^3 for the eigh, against the thin SVD's few n^2 P with a large constant (the sample CNN, n = 512,
    P = 11,978: 0.2 s against 1.8 s a checkpoint). It squares the condition: G's rounding
    (about eps ||G|| = eps s_1^2) moves the top-r eigenspace by up to eps s_1^2 / (lambda_r -
    lambda_{r+1}) (Davis-Kahan), where the SVD's moves by eps s_1 / (s_r - s_{r+1}).
    The rule (route "auto"): the Gram route where n eps lambda_1 / (lambda_r - lambda_{r+1}) is below
    GRAM_TOL (1e-8, under float32's rounding of the returned basis, 6e-8) and lambda_r is above
    n eps lambda_1 (the r directions are resolved, not rounding); otherwise, and always for a
    gap at r that rounding could close, the float64 SVD as before."""
    q, taken = basis64(a, r, route)
    return q.to(dtype=torch.float32), taken


def basis64(a: torch.Tensor, r: int, route: str = "auto") -> tuple[torch.Tensor, str]:
    """basis_of's float64 basis, before the float32 cast (benchmarks/fit_basis.py compares them)."""
    n = a.shape[0]
    eps = torch.finfo(torch.float64).eps
    if route in ("auto", "gram") and 0 < r < n:
        lam, u = torch.linalg.eigh(a @ a.T)
        lam, u = lam.flip(0), u.flip(1)                       # descending
        top, gap = float(lam[0]), float(lam[r - 1] - lam[r])
        floor = n * eps * max(top, 0.0)
        resolved = top > 0 and float(lam[r - 1]) > floor and gap > 0 and floor / gap < GRAM_TOL
        if resolved or route == "gram":
            v = a.T @ (u[:, :r] / lam[:r].clamp_min(floor if floor > 0 else 1e-300).sqrt())
            q, _ = torch.linalg.qr(v)
            return q, "gram"
    _, _, vt = torch.linalg.svd(a, full_matrices=False)
    q, _ = torch.linalg.qr(vt[:r].T)                          # orthonormal to float64 rounding
    return q, "svd"


# --- the propagation, shared by the pass and the queries -------------------------------------

def hessian_views(ctx, rank: int, seed: int = 0, progress=None) -> dict[int, SpectralView]:
    """Query-independent Lanczos view of each checkpoint's segment operator (the exact path's
    fixed batch, HVP kind and preconditioning), ``rank`` matvecs from a seeded random start.
    On the score's own context (the pass after publishing) it reuses the score's work on the same
    Hessian batches: the batch gradients it kept (propagate.base_grad, ``ctx.base_grads``:
    scoring.keep_base_grads) and, with ``--hvp auto``, the probes its plans made (finite
    differences measured within hvp.ADOPT_TOL are taken without a new probe, as a query on the
    finished run does: label_issue.share_probes). The same bits wherever the probe would have
    chosen finite differences too (the same computations); on a fresh context nothing changes."""
    from diffin_core.engine.propagate import base_grad, hessian_view, random_start
    from diffin_core.methods.label_issue import share_probes
    share_probes(ctx, ctx)                 # the score's measured views (its hvp_log), if any
    views = {}
    for k in range(ctx.m):
        if ctx.bounds is not None and ctx.bounds[k + 1] <= ctx.bounds[k]:
            continue                                   # owns no step: not in any plan
        start = random_start(ctx, k, salt=1000 + seed)
        batch = ctx.sample_batch(ctx.hessian_rows, k)
        views[k], _ = hessian_view(ctx, k, start, batch, steps=int(rank),
                                   g0=lambda k=k, batch=batch: base_grad(ctx, k, batch))   # only if fd
        if progress:
            progress(0, ctx.n, f"features: Hessian view of checkpoint {k + 1}/{ctx.m}")
    return views


def propagate(ctx, views: dict[int, SpectralView], u: torch.Tensor):
    """The engine's query plan (propagate.build_plan) through the stored views: no HVP.
    Items (k, coef, w, op), latest checkpoint first; influence(z) = sum coef <w, g_z(theta_k)>."""
    from diffin_core.engine.propagate import build_plan
    return build_plan(ctx, u, view_fn=lambda k, starts: views[k])


def segment_ops(ctx, views: dict[int, SpectralView]):
    """The plan's per-checkpoint operators, in step order. They depend on the views, the recipe
    and the lrs only (not on the query), so one probe plan gives them."""
    from diffin_core.engine.propagate import random_start
    return list(reversed(propagate(ctx, views, random_start(ctx, ctx.m - 1, salt=2000))))


def effective_grads(ctx, items, x: torch.Tensor, y: torch.Tensor, on_grads=None) -> torch.Tensor:
    """e_z (B, P) for a chunk: the adjoint of the query plan run forward in time, so that
    <e_z, g_Q> = sum_k coef_k <w_k(g_Q), g_z(theta_k)> for every query gradient g_Q.
    Per segment op (w = S W(M) (S u, v/S), (u, v) <- S^-1 C (S u, v/S) in propagate.SegmentOp):
        e_u <- S [C00 e_u/S + C10 S e_v + coef W0 S g],  e_v <- S^-1 [C01 e_u/S + C11 S e_v + coef W1 S g].
    ``items`` from ``segment_ops``; ``on_grads(k, g)`` sees each per-sample gradient (B, P)."""
    from diffin_core.engine.propagate import has_momentum
    momentum = has_momentum(ctx.recipe)          # without it the plan carries no v adjoint
    eu = ev = None
    for it in items:
        op, S = it.op, it.op.scale
        g = ctx.fm_at(it.k).per_sample_grads(ctx.thetas[it.k], x, y)
        if on_grads is not None:
            on_grads(it.k, g)
        gs = g if S is None else g * S
        nu = it.coef * op._f(op.W[:, 0], None, gs, None)
        nv = it.coef * op._f(op.W[:, 1], None, gs, None) if momentum else None
        if eu is not None:
            a = eu if S is None else eu * op.inv_scale
            b = None if ev is None else (ev if S is None else ev * S)
            nu = nu + op._f(op.C[:, 0, 0], op.C[:, 1, 0], a, b)
            nv = nv + op._f(op.C[:, 0, 1], op.C[:, 1, 1], a, b) if momentum else None
        eu, ev = (nu, nv) if S is None else (nu * S, None if nv is None else nv * op.inv_scale)
    return eu if eu is not None else torch.zeros(len(y), ctx.fm.num_params, device=ctx.device)


def check_fold(folded: torch.Tensor, direct: torch.Tensor) -> None:
    """The folded features must reproduce the per-query plan (a guard against a recipe whose
    propagation the fold does not mirror): relative error below 1e-3."""
    err = float(torch.linalg.vector_norm(folded.double() - direct) / torch.linalg.vector_norm(direct).clamp_min(1e-30))
    if not err < 1e-3:
        raise DiffinError(f"feature pass: the folded features disagree with the query plan "
                          f"(relative error {err:.2g}); use `--no-features` (exact path) for this run")


def row_sq_norms(g: torch.Tensor) -> np.ndarray:
    """||g_i||^2 per row (B,) float64, one float32 BLAS dot per row: no (B, P) temporary (the
    float64 square of a ResNet-18's 22-row chunk was a 2 GB copy and cost as much as the gradients:
    0.11 s per row; the dots 0.009 s, 1e-5 relative)."""
    return np.array([float(torch.dot(r, r)) for r in g.float()], dtype=np.float64).reshape(-1)


def _unit_rows(f: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    norm = torch.linalg.vector_norm(f, dim=1)
    unit = f / norm.clamp_min(1e-30)[:, None]
    return unit.cpu().numpy().astype(np.float16), norm.cpu().numpy().astype(np.float32)


# --- the pass --------------------------------------------------------------------------------

def build(ctx, query, out: Path, settings: FeatureSettings | None = None, progress=None,
          on_grads=None, num_classes: int | None = None) -> dict:
    """Write the store for ``ctx`` (training split) and the ``query`` split into ``out`` (a new
    folder: written as out.tmp-*, renamed when complete). Returns its meta."""
    from safetensors.torch import save_file
    settings = settings or FeatureSettings()
    progress = progress or (lambda d, t, m: None)
    out = Path(out)
    started = time.time()
    from diffin_core.project.atomic import recover_dirs
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_dirs(out.parent)       # a feature pass killed earlier: its dead pid's temp folder goes
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.time_ns()}"   # the pid: recover_dirs knows it
    tmp.mkdir(parents=True)
    try:
        views = hessian_views(ctx, settings.view_rank, settings.seed, progress)
        t_views = time.time() - started
        save_file({f"{kind}_{k}": (v.values if kind == "values" else v.vectors).contiguous().cpu().float()
                   for k, v in views.items() for kind in ("values", "vectors")}, str(tmp / "views.safetensors"))
        items = segment_ops(ctx, views)
        probe = items[-1].w if items else None          # check the fold on the first chunk (below)
        proj = Projector(ctx.fm.num_params, settings.dim, settings.seed, device=ctx.device)
        n, d = ctx.n, settings.dim
        train = np.lib.format.open_memmap(tmp / "train.npy", mode="w+", dtype=np.float16, shape=(n, d))
        norms = np.zeros(n, dtype=np.float32)
        labels = np.asarray(ctx.train.y, dtype=np.int64)
        c = int(num_classes or (labels.max() + 1 if n else 0))
        sums = np.zeros((c, d), dtype=np.float64)
        rows = settings.chunk_size or (ctx.chunk_rows(True) if getattr(ctx, "memory", None) is not None else 256)
        dk = checkpoint_sketch_dim(settings, ctx.m, n)
        rb = checkpoint_basis_rank(settings, ctx.m, n, ctx.fm.num_params) if dk else 0
        if dk:
            proj_k = {it.k: Projector(ctx.fm.num_params, dk, sketch_seed(settings.seed, it.k), device=ctx.device)
                      for it in items}
            per_ck = np.lib.format.open_memmap(tmp / "train_ck.npy", mode="w+", dtype=np.float16, shape=(ctx.m, n, dk))
            ck_norm2 = np.zeros((ctx.m, n), dtype=np.float64)          # ||sketched part of g_z(theta_k)||^2, exact
            ck_snorm = np.zeros((ctx.m, n), dtype=np.float32)          # lengths of the sketched rows
        bases = {}
        if rb:
            fit = np.sort(np.random.default_rng([settings.seed, 4409]).choice(n, min(n, settings.basis_rows),
                                                                               replace=False))
            for it in items:
                bases[it.k] = fit_basis(ctx, it.k, fit, rb).to(ctx.device)
                progress(0, n, f"features: gradient basis of checkpoint {it.k + 1}/{ctx.m}")
            save_file({f"basis_{k}": b.contiguous().cpu() for k, b in bases.items()}, str(tmp / "ck_basis.safetensors"))
            ck_coef = np.lib.format.open_memmap(tmp / "train_ck_coef.npy", mode="w+", dtype=np.float32,
                                                shape=(ctx.m, n, rb))
        for sl, x, y in ctx.chunks(size=rows):
            direct = torch.zeros(len(y), dtype=torch.float64, device=ctx.device)

            def hook(k, g, sl=sl, direct=direct, first=sl.start == 0):
                if on_grads is not None:
                    on_grads(k, sl, g)
                if dk:
                    rest = g
                    if k in bases:                 # exact coordinates in the basis, the rest sketched
                        c = g.float() @ bases[k]
                        ck_coef[k, sl] = c.cpu().numpy()
                        rest = g.double() - c.double() @ bases[k].double().T
                    per_ck[k, sl], ck_snorm[k, sl] = _unit_rows(proj_k[k](rest))
                    ck_norm2[k, sl] = (rest.double() ** 2).sum(1).cpu().numpy()
                if first and probe is not None:
                    direct.add_(plan_w[k][0] * (g @ plan_w[k][1]).double())
            if sl.start == 0 and probe is not None:
                plan_w = {it.k: (it.coef, it.w) for it in propagate(ctx, views, probe)}
            e = effective_grads(ctx, items, x, y, hook)
            if sl.start == 0 and probe is not None:
                check_fold(e @ probe, direct)
            f = proj(e)
            train[sl], norms[sl] = _unit_rows(f)
            # per-class sums of the rows as stored (float16 units x lengths): the heatmap then
            # adds up exactly what the grid ranks
            np.add.at(sums, labels[sl], train[sl].astype(np.float64) * norms[sl, None])
            progress(sl.stop, n, "features: projected effective gradients")
        train.flush()
        del train
        if dk:
            per_ck.flush()
            del per_ck
            np.save(tmp / "train_ck_norm2.npy", ck_norm2)
            np.save(tmp / "train_ck_snorm.npy", ck_snorm)
        if rb:
            ck_coef.flush()
            del ck_coef
        np.save(tmp / "train_norm.npy", norms)
        np.save(tmp / "class_sums.npy", sums.astype(np.float32))
        q_rows, q_norm = [], []
        for sl, x, y in ctx.chunks(query, size=rows):
            last = ctx.m - 1
            qf = proj(ctx.fm_at(last).per_sample_grads(ctx.thetas[last], x, y))
            r, nn_ = _unit_rows(qf)
            q_rows.append(r)
            q_norm.append(nn_)
        d_ = settings.dim
        np.save(tmp / "query.npy", np.concatenate(q_rows) if q_rows else np.zeros((0, d_), np.float16))
        np.save(tmp / "query_norm.npy", np.concatenate(q_norm) if q_norm else np.zeros(0, np.float32))
        size = sum(p.stat().st_size for p in tmp.iterdir())
        meta = {"version": VERSION, "settings": settings.to_dict(), "n_train": n, "n_query": len(query),
                "checkpoint_basis": rb, "independent_sketches": True,
                "checkpoint_dim": dk,
                "num_params": ctx.fm.num_params, "num_classes": c,
                "checkpoints": [{"k": it.k, "step": int(ctx.steps[it.k]), "coef": float(it.coef),
                                 "lr": float(ctx.lrs[it.k]), "segment": float(ctx.segments[it.k])} for it in items],
                "hessian_batch": ctx.settings.hessian_batch, "score_seed": ctx.settings.seed,
                "views_s": round(t_views, 3), "seconds": round(time.time() - started, 3),
                "store_mb": round(size / 2 ** 20, 3), "finished": time.time()}
        _publish(tmp, out, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _publish(tmp: Path, out: Path, meta: dict) -> None:
    """A store built in ``tmp`` becomes ``out``: meta.json written last, then the rename (a
    reader sees the old store or the whole new one)."""
    from diffin_core.project.atomic import write_text
    write_text(tmp / "meta.json", json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


SEPARATE_GAP_S = 60.0     # a store finished this long after the scores' pass was built by its own command


def pass_times(run_dir, meta: dict) -> dict:
    """How long a run took, pass by pass: {"scores_s": seconds until the scores were published,
    "features_s": seconds until the feature store was ready (the scores' time plus the feature
    pass, when the pass followed the scoring in the same command), "features_own_s": the feature
    pass alone, "separate": True when the store was built later by its own command}. Missing
    parts are None (no store: a method without one, or skipped)."""
    scores_s = meta.get("seconds")
    out = {"scores_s": scores_s, "features_s": None, "features_own_s": None, "separate": False}
    p = Path(run_dir) / DIRNAME / "meta.json"
    try:
        store = json.loads(p.read_text()) if p.is_file() else None
    except (OSError, json.JSONDecodeError):
        store = None
    if not store or store.get("seconds") is None:
        return out
    own = float(store["seconds"])
    out["features_own_s"] = own
    began = (store.get("finished") or 0) - own
    if meta.get("finished") is not None and began - float(meta["finished"]) > SEPARATE_GAP_S:
        out["separate"] = True
    elif scores_s is not None:
        out["features_s"] = float(scores_s) + own
    return out


# --- the store without Hessian views: checkpoint sketches from the scoring walk's own gradients ---

SKETCH_DIM = 4096       # columns of a view-less store's per-checkpoint sketch (capped by checkpoint_mb)


def views_fit(ctx, settings: FeatureSettings | None = None, memory=None) -> bool:
    """Whether the feature pass's Hessian views (view_rank Ritz vectors of P floats per
    checkpoint) take at most half the memory budget (``memory``, else the context's memory plan);
    without a memory plan, yes."""
    settings = settings or FeatureSettings()
    mem = memory if memory is not None else getattr(ctx, "memory", None)
    return mem is None or ctx.m * settings.view_rank * ctx.fm.num_params * 4 <= mem.budget // 2


def zero_curvature_maps(ctx, tol: float = 1e-5) -> dict | None:
    """{k: c_k d_k}: with the curvature left out (empty Hessian views) the query plan maps a query
    gradient u to w_k = d_k * u at each of its checkpoints, d_k a scalar (SGD with one parameter
    group: a float here) or a diagonal (Adam's preconditioner, per-group lrs or decay: a (P,)
    tensor of the parameters' dtype). Read off one seeded probe and checked on a second (relative
    error below ``tol``), so influence(z) = <u, sum_k c_k d_k g_z(theta_k)> at zero curvature.
    None where the plan is not diagonal (Adam's batch-order rows) or the diagonals would take
    more than a quarter of the memory budget."""
    from diffin_core.engine.propagate import build_plan, random_start
    p = ctx.fm.num_params
    empty = SpectralView(torch.zeros(0, dtype=ctx.dtype, device=ctx.device),
                         torch.zeros(p, 0, dtype=ctx.dtype, device=ctx.device))
    probes = [random_start(ctx, ctx.m - 1, salt=2000 + i) for i in range(2)]
    plans = [build_plan(ctx, u, view_fn=lambda k, starts: empty) for u in probes]
    second = {it.k: it for it in plans[1]}
    u1, u2 = probes[0].double(), probes[1].double()
    out, diagonals = {}, 0
    for it in plans[0]:
        if getattr(it, "rows", None) is not None or it.k not in second:
            return None
        w1, w2 = it.w.double(), second[it.k].w.double()
        room = tol * float(torch.linalg.vector_norm(w2)) + 1e-30
        a = float(w1 @ u1 / (u1 @ u1))
        if float(torch.linalg.vector_norm(w2 - a * u2)) <= room:
            out[it.k] = it.coef * a
            continue
        d = torch.where(u1 != 0, w1 / torch.where(u1 != 0, u1, torch.ones_like(u1)), torch.zeros_like(u1))
        if float(torch.linalg.vector_norm(w2 - d * u2)) > room:
            return None                                  # not diagonal at zero curvature
        out[it.k] = (it.coef * d).to(ctx.dtype)
        diagonals += 1
    mem = getattr(ctx, "memory", None)
    if mem is not None and diagonals * p * torch.tensor([], dtype=ctx.dtype).element_size() > mem.budget // 4:
        return None
    return out


class SketchSink:
    """The feature store of a run whose Hessian views exceed the memory budget (a ResNet-18 at
    3.5 GB), built from the per-sample gradients the scoring walk computes anyway (the walk hands
    them over: methods/base.tap_grads), so no gradient is computed twice. Everything of size N
    lives in memory-mapped files; in memory only the projection (12 bytes per parameter) and one
    chunk's sketch. It keeps:

    - the per-checkpoint CountSketch S g_z(theta_k) (m, N, d) and the exact ||g_z(theta_k)||^2:
      with a query's exact plan they bound every row's influence (FeatureStore.plan_bounds), and
      the rows that could reach the top k are rescored exactly (certified_rows);
    - train rows S e_z with e_z = sum_k c_k d_k g_z(theta_k): the plan's propagation with the
      curvature left out (no views: each segment acts as at Hessian 0, a scalar or diagonal d_k per
      checkpoint). Approximate (the store's own grid, the class heatmap and the reverse view;
      store_agreement measures it per run), never an exact answer.
    Applies to plans whose segments act as diagonals at zero curvature (zero_curvature_maps: SGD,
    Adam's preconditioner, per-group hyper-parameters); ``create`` returns None otherwise (Adam's
    batch-order rows: the exact path answers, as before)."""

    def __init__(self, ctx, tmp: Path, settings: FeatureSettings, dim: int, alphas: dict):
        self.ctx, self.tmp, self.settings, self.dim = ctx, Path(tmp), settings, int(dim)
        self.alphas = alphas                                 # zero_curvature_maps: the plan's checkpoints
        self.reason = "they exceed the memory budget"
        n, m = ctx.n, ctx.m
        self.proj = Projector(ctx.fm.num_params, self.dim, settings.seed + 1, device=ctx.device)
        self.per_ck = np.lib.format.open_memmap(self.tmp / "train_ck.npy", mode="w+", dtype=np.float16,
                                                shape=(m, n, self.dim))
        self.acc = np.lib.format.open_memmap(self.tmp / ".effective.npy", mode="w+", dtype=np.float32,
                                             shape=(n, self.dim))
        self.ck_norm2 = np.zeros((m, n), dtype=np.float64)
        self.ck_snorm = np.zeros((m, n), dtype=np.float32)
        self.seen = np.zeros((m, n), dtype=bool)
        self.rows = None                                     # set by runner.score_rows per chunk
        self.seconds = self.cpu_seconds = 0.0                # time spent sketching (meta.json)

    @classmethod
    def create(cls, ctx, parent: Path, settings: FeatureSettings | None = None,
               reason: str = "they exceed the memory budget") -> "SketchSink | None":
        """The sink for ``ctx``, or None where the plan is not diagonal at zero curvature or its
        sketch would be too small. ``reason``: why the store has no Hessian views (meta.json)."""
        from diffin_core.project.atomic import recover_dirs
        settings = settings or FeatureSettings()
        alphas = zero_curvature_maps(ctx)
        n = ctx.n
        dim = min(SKETCH_DIM, int(settings.checkpoint_mb * 2 ** 20 / (2 * max(ctx.m * n, 1))))
        if dim < 256 or not alphas:
            return None
        parent = Path(parent)
        parent.mkdir(parents=True, exist_ok=True)
        recover_dirs(parent)
        tmp = parent / f".{DIRNAME}.tmp-{os.getpid()}-{time.time_ns()}"     # the pid: recover_dirs knows it
        tmp.mkdir(parents=True)
        sink = cls(ctx, tmp, settings, dim, alphas)
        sink.reason = reason
        return sink

    def __call__(self, k: int, g: torch.Tensor) -> None:
        """One chunk's per-sample gradients (B, P) at checkpoint k, rows ``self.rows``."""
        sl = self.rows
        if sl is None or k not in self.alphas:
            return
        t, c = time.perf_counter(), time.process_time()
        f = self.proj(g)
        unit, norm = _unit_rows(f)
        self.per_ck[k, sl], self.ck_snorm[k, sl] = unit, norm
        self.ck_norm2[k, sl] = row_sq_norms(g)
        a = self.alphas[k]                   # c_k a_k, or c_k d_k (P,): Adam's D, per-group lrs
        self.acc[sl] += (a * f if isinstance(a, float) else self.proj(g, scale=a)).cpu().numpy()
        self.seen[k, sl] = True
        self.seconds += time.perf_counter() - t
        self.cpu_seconds += time.process_time() - c

    def fill(self, progress=None) -> int:
        """Sketch the rows the walk did not hand over (rows resumed from saved stages, a Ray
        run): their per-sample gradients are computed here. Returns how many rows."""
        ctx = self.ctx
        ks = sorted(self.alphas)
        missing = np.flatnonzero(~self.seen[ks].all(0))
        size = ctx.chunk_rows(True) if getattr(ctx, "memory", None) is not None else 256
        for a in range(0, len(missing), size):
            r = missing[a:a + size]
            x, y = ctx.tensors(ctx.train.x[r], ctx.train.y[r])
            for k in ks:
                todo = ~self.seen[k, r]
                if todo.any():
                    rr = r[todo]
                    g = ctx.fm_at(k).per_sample_grads(ctx.thetas[k], x[torch.as_tensor(todo)], y[torch.as_tensor(todo)])
                    for i, row in enumerate(rr):         # rows need not be contiguous
                        self.rows = slice(int(row), int(row) + 1)
                        self(k, g[i:i + 1])
                    self.rows = None
            if progress:
                progress(a + len(r), len(missing), "features: sketching rows the walk did not see")
        return int(len(missing))

    def finish(self, query, out: Path, num_classes: int | None = None, progress=None) -> dict:
        """Complete the store (query rows, class sums, meta) and move it to ``out``."""
        from diffin_core.project.atomic import write_text
        ctx, tmp, n, d = self.ctx, self.tmp, self.ctx.n, self.dim
        started = time.time()
        try:
            filled = self.fill(progress)
            self.per_ck.flush()
            del self.per_ck
            labels = np.asarray(ctx.train.y, dtype=np.int64)
            c = int(num_classes or (labels.max() + 1 if n else 0))
            sums = np.zeros((c, d), dtype=np.float64)
            train = np.lib.format.open_memmap(tmp / "train.npy", mode="w+", dtype=np.float16, shape=(n, d))
            norms = np.zeros(n, dtype=np.float32)
            for a in range(0, n, 16384):
                f = torch.from_numpy(np.asarray(self.acc[a:a + 16384]))
                train[a:a + 16384], norms[a:a + 16384] = _unit_rows(f)
                np.add.at(sums, labels[a:a + 16384], train[a:a + 16384].astype(np.float64) * norms[a:a + 16384, None])
            train.flush()
            del train, self.acc
            (tmp / ".effective.npy").unlink()
            np.save(tmp / "train_ck_norm2.npy", self.ck_norm2)
            np.save(tmp / "train_ck_snorm.npy", self.ck_snorm)
            np.save(tmp / "train_norm.npy", norms)
            np.save(tmp / "class_sums.npy", sums.astype(np.float32))
            q_rows, q_norm = [], []
            last = ctx.m - 1
            size = ctx.chunk_rows(True) if getattr(ctx, "memory", None) is not None else 256
            for _sl, x, y in ctx.chunks(query, size=size):
                r, nn_ = _unit_rows(self.proj(ctx.fm_at(last).per_sample_grads(ctx.thetas[last], x, y)))
                q_rows.append(r)
                q_norm.append(nn_)
            np.save(tmp / "query.npy", np.concatenate(q_rows) if q_rows else np.zeros((0, d), np.float16))
            np.save(tmp / "query_norm.npy", np.concatenate(q_norm) if q_norm else np.zeros(0, np.float32))
            size_b = sum(f.stat().st_size for f in tmp.iterdir())
            settings = replace(self.settings, dim=d, view_rank=0, checkpoint_dim=d, seed=self.settings.seed)
            ks = sorted(self.alphas, reverse=True)
            meta = {"version": VERSION, "kind": "checkpoint-sketch", "settings": settings.to_dict(),
                    "projection_seed": self.settings.seed + 1, "n_train": n, "n_query": len(query),
                    "checkpoint_dim": d, "num_params": ctx.fm.num_params, "num_classes": c,
                    "checkpoints": [{"k": k, "step": int(ctx.steps[k]),
                                     "coef": self.alphas[k] if isinstance(self.alphas[k], float) else None,
                                     "diagonal": not isinstance(self.alphas[k], float),
                                     "lr": float(ctx.lrs[k]), "segment": float(ctx.segments[k])} for k in ks],
                    "hessian_batch": ctx.settings.hessian_batch, "score_seed": ctx.settings.seed,
                    "views_s": 0.0, "sketch_s": round(self.seconds, 3), "sketch_cpu_s": round(self.cpu_seconds, 3),
                    "rows_filled": filled,
                    "seconds": round(time.time() - started, 3),     # after the walk (its sketching: sketch_s)
                    "store_mb": round(size_b / 2 ** 20, 3), "finished": time.time(),
                    "approximations": [f"the store's own ranking (train rows) leaves the curvature out (no Hessian "
                                       f"views: {self.reason}); exact answers come from the query's "
                                       "own plan, bounded through the per-checkpoint sketches and rescored"]}
            write_text(tmp / "meta.json", json.dumps(meta, indent=1))
            out = Path(out)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            self.close()
        return meta

    def close(self) -> None:
        """Drop the temp folder (after finish it is gone already)."""
        self.per_ck = self.acc = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def sketch_pass(ctx, query, out: Path, settings: FeatureSettings | None = None, progress=None,
                num_classes: int | None = None) -> dict | None:
    """The view-less store (SketchSink) by its own pass over the training set, for a run scored
    before (`diffin features`); None where it does not apply."""
    sink = SketchSink.create(ctx, Path(out).parent, settings)
    if sink is None:
        return None
    return sink.finish(query, out, num_classes, progress)


# --- the store of a batch-order Adam run: its replay through the span of the query gradients -------

from diffin_core.run.span import SPAN_EXACT_TOL, SpanStore, is_span, set_residual as _set_residual, top_overlap  # noqa: E402

SPAN_RANK = 64          # directions replayed at most (the text sample: 99.98% of the query gradients' energy) ...
SPAN_WORK = 1 << 23     # ... or more for small models: up to SPAN_WORK / P directions (the second backwards of a
                        # step cost about directions x P: the digits MLP's 2,410 parameters take every query's)
SPAN_ENERGY = 1 - 1e-12  # ... and no more than the query gradients' span needs (then every query is exact)
SPAN_CHECKS = 1         # queries the pass replays in full to measure the store against (saved as answers)
SPAN_GRAM_MAX = 2048    # query sets up to this size keep their gradients' Gram matrix (a set's exact residual)


def span_applies(ctx) -> bool:
    """Whether a run's store is the query-span store: Adam's batch-order replay (its self-check
    passed), where one replayed direction (about ten float64 P-vectors) and the gradients of at
    least 8 query samples fit half the memory budget."""
    if getattr(ctx, "batch_order", None) is None or not ctx.recipe.adam or ctx.moments is None:
        return False
    budget = int(getattr(getattr(ctx, "memory", None), "budget", 0) or 0)
    return budget <= 0 or 18 * 8 * ctx.fm.num_params <= budget // 2


def _query_grads(ctx, query, rows=None, chunk: int = 64) -> torch.Tensor:
    """(len(rows), P) float64: each query sample's loss gradient at the final weights."""
    last = ctx.m - 1
    rows = np.arange(len(query)) if rows is None else np.asarray(rows, dtype=np.int64)
    parts = []
    for a in range(0, len(rows), chunk):
        r = rows[a:a + chunk]
        x, y = ctx.tensors(query.x[r], np.asarray(query.y)[r])
        parts.append(ctx.fm_at(last).per_sample_grads(ctx.thetas[last], x, y).double())
    return torch.cat(parts) if parts else torch.zeros(0, ctx.fm.num_params, dtype=torch.float64)


def span_replay(ctx, basis: torch.Tensor, progress=None, block: int | None = None) -> np.ndarray:
    """(r, N) float64: row j is Adam's batch-order replay influence (adam_batches.segment, every
    interval latest first) with the query gradient ``basis[j]`` (P,). The directions go back
    together (adam_batches.segment_many), ``block`` at a time (default: as many as a quarter of
    the memory budget holds, about ten P-vectors of float64 each)."""
    from diffin_core.engine.adam_batches import segment_many
    r, p = basis.shape
    if block is None:
        budget = int(getattr(getattr(ctx, "memory", None), "budget", 0) or 0) // 4
        block = r if budget <= 0 else max(1, min(r, budget // (10 * p * 8)))
    out = np.zeros((r, ctx.n))
    ks = [k for k in range(ctx.m - 1, -1, -1) if ctx.bounds[k + 1] > ctx.bounds[k]]
    for a in range(0, r, block):
        B = basis[a:a + block].to(device=ctx.device, dtype=torch.float64)
        carry = (B.clone(), torch.zeros_like(B), torch.zeros_like(B))
        for i, k in enumerate(ks):
            rows, carry = segment_many(ctx, k, carry)
            out[a:a + block] += rows.numpy()
            if progress:
                progress(a * len(ks) + (i + 1) * min(block, r - a), r * len(ks),
                         f"features: replaying {r} query directions, checkpoint {k + 1}/{ctx.m}")
        del carry
    return out


def span_build(ctx, query, out: Path, settings: FeatureSettings | None = None, progress=None,
               num_classes: int | None = None, reference: np.ndarray | None = None,
               run_dir: Path | None = None, rank: int | None = None, checks: int | None = None) -> dict:
    """The store of a batch-order Adam run ("query-span"). Adam's replay (adam_batches.py) is
    linear in the query gradient u = g_Q(theta_T): influence(z, u) = sum_j c_j influence(z, b_j)
    for u = sum_j c_j b_j. So the pass replays the top ``rank`` principal directions b_j of the
    query samples' own gradients (all of them when the query set spans fewer: then every query,
    and every set of queries, is answered as the exact path answers it, to float rounding), and a
    query's answer is one (r,) x (r, N) product of its coefficients c = B^T u with the stored rows.
    The part of u outside the span is left out: such an answer is approximate, and says by how
    much (the residual's share of u) and how far the store was measured from the full replay.

    Measured here: ``reference`` (the run's own influence, the whole query set's replay) against
    the store's answer for the whole set, and ``checks`` single queries (those with the largest
    residual) replayed in full (their exact answers are kept with the run when ``run_dir``).
    Written in the FeatureStore layout (train.npy: the N rows of R^T, query.npy: the coefficients)
    so the class heatmap, the reverse view and the map read it as any store; the float64 rows
    and coefficients beside them give the answers."""
    from diffin_core.project.atomic import recover_dirs
    settings = settings or FeatureSettings()
    progress = progress or (lambda d, t, m: None)
    rank = max(SPAN_RANK, SPAN_WORK // max(ctx.fm.num_params, 1)) if rank is None else int(rank)
    checks = SPAN_CHECKS if checks is None else int(checks)
    out = Path(out)
    started, cpu0 = time.time(), time.process_time()
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_dirs(out.parent)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir(parents=True)
    try:
        nq, n, p = len(query), ctx.n, ctx.fm.num_params
        budget = int(getattr(getattr(ctx, "memory", None), "budget", 0) or 0)
        fit = nq if budget <= 0 else max(1, min(nq, budget // 4 // (8 * p)))
        held = np.arange(nq) if fit >= nq else np.sort(
            np.random.default_rng([settings.seed, 7919]).choice(nq, fit, replace=False))
        progress(0, n, f"features: the gradients of {nq} query samples")
        U = _query_grads(ctx, query, held)
        _, sv, vt = torch.linalg.svd(U, full_matrices=False)
        energy = torch.cumsum(sv ** 2, 0) / (sv ** 2).sum().clamp_min(1e-300)
        numerical = int((sv > sv[0] * 1e-10).sum()) if len(sv) else 0
        need = int(torch.searchsorted(energy, torch.tensor(SPAN_ENERGY, dtype=energy.dtype)).item()) + 1 if len(sv) else 0
        r = max(1, min(rank, numerical, need, len(sv)))
        basis = vt[:r].contiguous()                                   # (r, P) orthonormal rows
        # every query's coefficients and residual (the held rows are in U already)
        coef = np.zeros((nq, r))
        unorm = np.zeros(nq)
        resid = np.zeros(nq)
        gram = np.zeros((nq, nq)) if nq <= SPAN_GRAM_MAX else None
        pos = {int(q): i for i, q in enumerate(held)}
        for a in range(0, nq, 256):
            rows = np.arange(a, min(nq, a + 256))
            G = U[[pos[int(q)] for q in rows]] if all(int(q) in pos for q in rows) else _query_grads(ctx, query, rows)
            c = G @ basis.T
            coef[rows] = c.numpy()
            unorm[rows] = torch.linalg.vector_norm(G, dim=1).numpy()
            resid[rows] = torch.linalg.vector_norm(G - c @ basis, dim=1).numpy()
            if gram is not None:
                for b in range(0, nq, 256):
                    cols = np.arange(b, min(nq, b + 256))
                    H = U[[pos[int(q)] for q in cols]] if all(int(q) in pos for q in cols) else _query_grads(ctx, query, cols)
                    gram[np.ix_(rows, cols)] = (G @ H.T).numpy()
        del U
        t_grads = time.time() - started
        R = span_replay(ctx, basis, progress)                           # (r, N)
        t_replay = time.time() - started - t_grads
        # the FeatureStore layout: train rows R^T, query rows the coefficients
        train_u, train_n = _unit_rows(torch.from_numpy(R.T.copy()))
        np.save(tmp / "train.npy", train_u)
        np.save(tmp / "train_norm.npy", train_n)
        q_u, q_n = _unit_rows(torch.from_numpy(coef))
        np.save(tmp / "query.npy", q_u)
        np.save(tmp / "query_norm.npy", q_n)
        labels = np.asarray(ctx.train.y, dtype=np.int64)
        c_ = int(num_classes or (labels.max() + 1 if n else 0))
        sums = np.zeros((c_, r))
        np.add.at(sums, labels, train_u.astype(np.float64) * train_n[:, None])
        np.save(tmp / "class_sums.npy", sums.astype(np.float32))
        np.save(tmp / "span_rows.npy", R)
        np.save(tmp / "span_coef.npy", coef)
        np.save(tmp / "span_unorm.npy", unorm)
        np.save(tmp / "span_resid.npy", resid)
        if gram is not None:
            np.save(tmp / "span_gram.npy", gram)
        measured = []
        if reference is not None and len(reference) == n and nq:
            est = coef.mean(0) @ R
            ref = np.asarray(reference, dtype=np.float64)
            measured.append({"query": "all", "top10": top_overlap(est, ref),
                             "max_error": float(np.abs(est - ref).max() / max(np.abs(ref).max(), 1e-300)),
                             "residual": _set_residual(np.arange(nq), unorm, resid, coef, gram)})
        if checks > 0 and nq:
            from diffin_core.methods.diffin import DiffIn
            rel = resid / np.maximum(unorm, 1e-300)
            for qi in np.argsort(-rel, kind="stable")[:checks]:
                progress(0, n, f"features: query {int(qi)} replayed in full (the store's check)")
                t = time.process_time()
                ex = DiffIn().run(ctx, query.x[[int(qi)]], np.asarray(query.y)[[int(qi)]], need_self=False)["influence"]
                cpu = time.process_time() - t
                est = coef[int(qi)] @ R
                measured.append({"query": int(qi), "top10": top_overlap(est, ex),
                                 "max_error": float(np.abs(est - ex).max() / max(np.abs(ex).max(), 1e-300)),
                                 "residual": float(rel[int(qi)]), "replay_cpu_s": round(cpu, 3)})
                if run_dir is not None:
                    from diffin_core.run import answers
                    answers.save_exact(run_dir, [int(qi)], ex)
        size = sum(f.stat().st_size for f in tmp.iterdir())
        meta = {"version": VERSION, "kind": "query-span",
                "settings": replace(settings, dim=r, view_rank=0, checkpoint_dim=0, checkpoint_basis=0,
                                    rerank=0).to_dict(),
                "n_train": n, "n_query": nq, "num_params": p, "num_classes": c_, "checkpoint_dim": 0,
                "rank": r, "rank_cap": rank, "span_energy": float(energy[r - 1]) if len(sv) else 1.0,
                "basis_queries": int(len(held)), "numerical_rank": numerical,
                "residual_median": float(np.median(resid / np.maximum(unorm, 1e-300))) if nq else 0.0,
                "residual_max": float(np.max(resid / np.maximum(unorm, 1e-300))) if nq else 0.0,
                "exact_queries": int(np.sum(resid <= SPAN_EXACT_TOL * np.maximum(unorm, 1e-300))),
                "measured": measured, "checkpoints": [],
                "hessian_batch": ctx.settings.hessian_batch, "score_seed": ctx.settings.seed,
                "grads_s": round(t_grads, 3), "replay_s": round(t_replay, 3),
                "cpu_s": round(time.process_time() - cpu0, 3),
                "seconds": round(time.time() - started, 3), "store_mb": round(size / 2 ** 20, 3),
                "finished": time.time(),
                "approximations": [] if r >= numerical else
                [f"a query's answer from the store leaves out the part of its gradient outside the {r} replayed "
                 "directions (its share and the measured agreement are shown with it); `diffin top --exact` replays it"]}
        _publish(tmp, out, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def build_for_run(project, run: str, settings: FeatureSettings | None = None, progress=None) -> Path:
    """The feature pass for an existing diffin run (same score settings as the run)."""
    from diffin_core.methods import ScoreSettings
    from diffin_core.run.context import project_context
    info = project.run(run)
    if info.method not in METHODS:
        raise DiffinError(f"run {run!r} used {info.method!r}: the feature store approximates "
                          f"{', '.join(METHODS)} runs only", info.path)
    from diffin_core.methods import runner
    from diffin_core.methods.diffin import DiffIn
    ctx = project_context(project, replace(ScoreSettings(), **info.meta.get("settings", {})), progress)
    runner.configure(ctx, runner.memory_plan(DiffIn(), ctx, True))      # the run's chunks and Hessian batch
    if getattr(ctx, "batch_order", None) is not None:
        from diffin_core.engine.adam_batches import adopt_check, decide
        from diffin_core.engine.hvp import adopt
        adopt(ctx, info.meta.get("hvp"))
        adopt_check(ctx, info.meta)
        decide(ctx)
        if span_applies(ctx):
            reference = project.scores(run)["influence"].to_numpy() if (info.path / "scores.parquet").is_file() else None
            span_build(ctx, project.query, info.path / DIRNAME, settings, progress, num_classes=project.num_classes,
                       reference=reference, run_dir=info.path)
            return info.path / DIRNAME
        raise DiffinError(f"run {run!r} scored with a recorded batch order: SGD's replay (sgd_batches.py) has no "
                          "feature store, and Adam's replayed directions must fit half the memory budget: `diffin top` "
                          "takes the exact path", info.path)
    out = info.path / DIRNAME
    if not views_fit(ctx, settings):
        if sketch_pass(ctx, project.query, out, settings, progress, num_classes=project.num_classes) is None:
            raise DiffinError(f"run {run!r}: the feature store's Hessian views exceed the memory budget and this "
                              "recipe has no view-less store: `diffin top` takes the exact path", info.path)
        return out
    build(ctx, project.query, out, settings, progress, num_classes=project.num_classes)
    return out


# --- the store -------------------------------------------------------------------------------

class FeatureStore:
    """A run's stored features (memory-mapped; opening costs milliseconds)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "meta.json").read_text())
            self.train = np.load(self.path / "train.npy", mmap_mode="r")
            self.train_norm = np.load(self.path / "train_norm.npy")
            self.query = np.load(self.path / "query.npy")
            self.query_norm = np.load(self.path / "query_norm.npy")
            self.class_sums = np.load(self.path / "class_sums.npy")
        except (OSError, ValueError, KeyError) as e:
            raise DiffinError(f"the feature store is unreadable ({e}); rebuild it with `diffin features`",
                              self.path) from e
        self.dim = int(self.meta["settings"]["dim"])
        self._views = self._bases = None
        self.basis_rank = 0
        self.checkpoint_dim = int(self.meta.get("checkpoint_dim", 0) or 0)
        self.per_checkpoint = self.ck_norm2 = None
        if self.checkpoint_dim:
            try:
                self.per_checkpoint = np.load(self.path / "train_ck.npy", mmap_mode="r")     # (m, N, dk)
                self.ck_norm2 = np.load(self.path / "train_ck_norm2.npy")                     # (m, N)
                self.ck_snorm = np.load(self.path / "train_ck_snorm.npy")                     # (m, N)
                self.basis_rank = int(self.meta.get("checkpoint_basis", 0) or 0)
                self.ck_coef = (np.load(self.path / "train_ck_coef.npy", mmap_mode="r")           # (m, N, r)
                                if self.basis_rank else None)
            except (OSError, ValueError) as e:
                raise DiffinError(f"the feature store is unreadable ({e}); rebuild it with `diffin features`",
                                  self.path) from e

    @classmethod
    def open(cls, project, run: str) -> "FeatureStore | None":
        p = project.run(run).path / DIRNAME
        if not (p / "meta.json").is_file():
            return None
        store = cls(p)
        if store.meta["n_train"] != len(project.train) or store.meta["n_query"] != len(project.query):
            return None       # the data changed since the pass: not this data's features
        return store

    @property
    def has_views(self) -> bool:
        """False for a view-less store (SketchSink: checkpoint sketches only; a query-span store)."""
        return self.meta.get("kind") not in ("checkpoint-sketch", "query-span")

    @property
    def views(self) -> dict[int, SpectralView]:
        if not self.has_views:
            raise DiffinError("this feature store has no Hessian views (they exceed the memory budget)", self.path)
        if self._views is None:
            from safetensors.torch import load_file
            t = load_file(str(self.path / "views.safetensors"))
            self._views = {c["k"]: SpectralView(t[f"values_{c['k']}"], t[f"vectors_{c['k']}"])
                           for c in self.meta["checkpoints"]}
        return self._views

    @property
    def bases(self) -> dict[int, torch.Tensor]:
        """Per checkpoint k the (P, r) gradient basis whose coordinates are kept exactly ({} without)."""
        if self._bases is None:
            self._bases = {}
            if self.basis_rank:
                from safetensors.torch import load_file
                t = load_file(str(self.path / "ck_basis.safetensors"))
                self._bases = {int(name.split("_")[1]): v for name, v in t.items()}
        return self._bases

    def shortlist(self) -> int:
        """Candidates per side the exact path rescores by default: settings.rerank, or when that
        is -1, SHORTLIST_FRACTION of the training set (at least SHORTLIST_MIN)."""
        r = int(self.meta["settings"]["rerank"])
        n = int(self.meta["n_train"])
        return min(n, max(SHORTLIST_MIN, int(np.ceil(SHORTLIST_FRACTION * n)))) if r < 0 else r

    def label(self, rerank: int | None = None) -> str:
        s = self.meta["settings"]
        r = self.shortlist() if rerank is None else rerank
        if r:
            return (f"fast path: projected features (d = {self.dim}) shortlisted the top {r} per side, "
                    f"rescored by the exact path (this query's own plan)")
        if not self.has_views:
            return (f"fast path: projected features alone (d = {self.dim}, no Hessian views: curvature left out; "
                    f"approximate, not rescored)")
        return (f"fast path: projected features alone (d = {self.dim}, {s['view_rank']} stored Hessian "
                f"eigenpairs per checkpoint; approximate, not rescored)")

    # --- products --------------------------------------------------------------------------
    def plan_bounds(self, plan, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
        """(estimate (N,), sigma (N,)) of every row's influence under a query's exact ``plan``:
        sum_k coef_k <w_k, g_z(theta_k)> with, per checkpoint, the coordinates in its gradient basis
        B_k exact (<B_k^T w_k, B_k^T g_z>) and the rest through its CountSketch S_k (unbiased):
        <S_k P w_k, S_k P g_z>, P = I - B_k B_k^T. sigma bounds the estimate's standard deviation:
        each sketched term's variance is at most 2 ||P w_k||^2 ||P g_z||^2 / d (projector.py; the
        exact norms are stored); the checkpoints' sketches are independent ("independent_sketches",
        version 3), so their variances add. A store with one sketch for every checkpoint (version 2,
        a view-less store) has errors that may be correlated across checkpoints: its sigma is the sum
        of the per-checkpoint deviations (a bound for any correlation). A plan item that holds its rows (Adam's batch order) adds them exactly."""
        n, dk = int(self.meta["n_train"]), self.checkpoint_dim
        independent, seed = bool(self.meta.get("independent_sketches")), int(self.meta["settings"]["seed"])
        est, var, dev = np.zeros(n), np.zeros(n), np.zeros(n)
        for it in plan:
            if getattr(it, "rows", None) is not None:
                est += it.rows.double().cpu().numpy()
                continue
            w = it.w.detach().float().cpu()
            basis = self.bases.get(it.k)
            cw = None
            if basis is not None:
                cw = (basis.T @ w).numpy()
                w = (w.double() - basis.double() @ torch.from_numpy(cw).double()).float()
            sw = Projector(int(self.meta["num_params"]), dk, sketch_seed(seed, it.k, independent))(w)
            for a in range(0, n, chunk):
                with warnings.catch_warnings():           # a read-only memmap: only read here
                    warnings.simplefilter("ignore", UserWarning)
                    block = torch.from_numpy(np.asarray(self.per_checkpoint[it.k, a:a + chunk])).float()
                est[a:a + chunk] += it.coef * (block @ sw).double().numpy() * self.ck_snorm[it.k, a:a + chunk]
                if cw is not None:
                    est[a:a + chunk] += it.coef * (np.asarray(self.ck_coef[it.k, a:a + chunk]) @ cw).astype(np.float64)
            term = it.coef ** 2 * 2.0 * float(w.double().square().sum()) * self.ck_norm2[it.k] / dk
            var += term
            dev += np.sqrt(term)
        return est, (np.sqrt(var) if independent else dev)

    def query_rows(self, idx) -> np.ndarray:
        """Projected per-query gradients (len(idx), d) float32, in influence units."""
        idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        return self.query[idx].astype(np.float32) * self.query_norm[idx, None]

    def train_rows(self, rows) -> np.ndarray:
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        return self.train[rows].astype(np.float32) * self.train_norm[rows, None]

    def influence(self, vectors: np.ndarray, chunk: int = 16384) -> np.ndarray:
        """Projected influence of every training sample on each projected query vector:
        vectors (d,) or (B, d) -> (N,) or (N, B) float64. The float16 rows are widened block by
        block into one reused float32 buffer (3x faster than a fresh conversion per block here)."""
        v = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        one = v.dim() == 1
        v = v.reshape(-1, self.dim).T.contiguous()
        n = len(self.train_norm)
        out = np.empty((n, v.shape[1]), dtype=np.float64)
        buf = torch.empty(min(chunk, n), self.dim)
        for s in range(0, n, chunk):
            with warnings.catch_warnings():           # a read-only memmap: only read here
                warnings.simplefilter("ignore", UserWarning)
                block = torch.from_numpy(np.asarray(self.train[s:s + chunk]))
            wide = buf[:len(block)].copy_(block)
            out[s:s + chunk] = (wide @ v).double().numpy()
        out *= self.train_norm[:, None]
        return out[:, 0] if one else out

    def query_influence(self, idx) -> np.ndarray:
        """(N,) projected influence on the mean loss of the query samples ``idx``."""
        return self.influence(self.query_rows(idx).mean(0))

    def reverse(self, row: int) -> np.ndarray:
        """(Nq,) influence of training row ``row`` on each query sample's loss (projected)."""
        return (self.query.astype(np.float32) @ self.train_rows(row)[0]).astype(np.float64) * self.query_norm

    def class_matrix(self, query_labels: np.ndarray) -> np.ndarray:
        """(C_train, C_query) total influence of each given training class on the mean loss of the
        query samples of each class (sum over the class's samples; > 0 helpful). NaN where a
        query class is absent."""
        ql = np.asarray(query_labels, dtype=np.int64)
        c = max(self.class_sums.shape[0], int(ql.max()) + 1 if len(ql) else 0)
        q = self.query.astype(np.float32) * self.query_norm[:, None]
        means = np.full((c, self.dim), np.nan, dtype=np.float64)
        for b in np.unique(ql):
            means[b] = q[ql == b].mean(0)
        sums = np.zeros((c, self.dim))
        sums[: self.class_sums.shape[0]] = self.class_sums
        return sums @ means.T


# --- queries that need the model (no HVPs) ----------------------------------------------------

_CTX: dict = {}


def _context(project, run: str):
    """The run's scoring context, cached per (project, run, manifest) for repeated queries."""
    from diffin_core.methods import ScoreSettings
    from diffin_core.run.context import project_context
    man = project.manifest_path
    meta = project.run(run).path / "meta.json"
    key = (str(project.root), run, man.stat().st_mtime if man.exists() else 0,
           meta.stat().st_mtime if meta.exists() else 0)      # a rescored run: a new context
    if key not in _CTX:
        _CTX.clear()
        from diffin_core.engine.functional import stop_twin
        stop_twin()                                   # a twin forked for the previous context
        info = project.run(run)
        _CTX[key] = ctx = configured(project_context(project, replace(ScoreSettings(), **info.meta.get("settings", {}))))
        from diffin_core.engine.hvp import adopt
        adopt(ctx, info.meta.get("hvp"))        # the run's measured HVP decisions (hvp.py)
        ctx.base_grads = BaseGrads(info.path, ctx)   # the Hessian batches' gradients, once per run
        ctx.progress = _check_cancelled               # a warm child's cancelled call stops at the next checkpoint
    return _CTX[key]


def _check_cancelled(done=0, total=None, message: str = "") -> None:
    from diffin_core.errors import check_cancelled
    check_cancelled()


def warm_key(project, run: str) -> str:
    """The key of the app's warm child for a run's queries (usercode.run ``warm``): the project,
    the run and the modification times of what a kept context depends on (the run's meta.json and
    store, the project's manifest, config and model files), so that a rescored run, a rebuilt store
    or a new model starts a fresh child."""
    root = Path(project.root)
    parts = [str(root.resolve()), run]
    for p in (project.run(run).path / "meta.json", project.run(run).path / DIRNAME / "meta.json",
              project.manifest_path, root / "diffin.toml", *sorted(root.glob("*.py")), *sorted(root.glob("*.pt2"))):
        try:
            parts.append(f"{p.stat().st_mtime_ns}")
        except OSError:
            parts.append("-")
    return "explore:" + ":".join(parts)


class BaseGrads(dict):
    """The base of every query plan's finite-difference HVPs: per checkpoint, the gradient of its
    fixed Hessian batch at theta_k (propagate.base_grad, keyed by propagate.base_grad_key), the
    same for every query. Kept in memory for the context's life and with the run
    (``runs/<run>/answers/hessian_base.npz``, when at most answers.PLAN_MAX_BYTES), so that a new
    query's plan, in any process, skips one batch gradient per checkpoint (12 of the sample's 133).
    A rescored run (its folder is swapped whole) drops it; a key that does not match (other
    settings, threads) is computed again."""

    NAME = "hessian_base.npz"

    def __init__(self, run_dir, ctx):
        super().__init__()
        from diffin_core.run import answers
        self.path = Path(run_dir) / answers.DIRNAME / self.NAME
        self.saved = 0
        self._like = (ctx.fm.num_params, ctx.device, ctx.thetas[ctx.m - 1].dtype) if ctx.m else None
        try:
            with np.load(self.path, allow_pickle=False) as z:
                keys = json.loads(str(z["keys"]))
                for i, key in enumerate(keys):
                    g = torch.from_numpy(np.array(z[f"g{i}"]))
                    if self._like and g.numel() == self._like[0]:
                        self[tuple(key)] = g.to(device=self._like[1], dtype=self._like[2])
        except (OSError, ValueError, KeyError):
            self.clear()                        # none kept, or unreadable: computed again
        self.saved = len(self)

    def save(self) -> None:
        """Write the kept gradients when some were added since (atomic; skipped above the plan cap)."""
        from diffin_core.project.atomic import atomic_path
        from diffin_core.run import answers
        if len(self) <= self.saved:
            return
        items = list(self.items())
        if sum(g.numel() * g.element_size() for _, g in items) > answers.PLAN_MAX_BYTES:
            return
        try:
            with atomic_path(self.path, suffix=".npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, keys=np.asarray(json.dumps([list(k) for k, _ in items])),
                             **{f"g{i}": g.detach().cpu().numpy() for i, (_, g) in enumerate(items)})
            self.saved = len(self)
        except OSError:
            pass                                # a read-only run folder: kept in memory only


def configured(ctx):
    """``ctx`` set up as the runner sets up `diffin top --exact` (runner.configure with diffin's
    influence-only memory plan): the same Hessian batch (budget.hessian_batch_for cuts it for large
    models, e.g. 32 rows for a ResNet-18 on 1,000 samples), chunks and HVP slices, so that a plan
    made here is the exact path's plan."""
    from diffin_core.methods import runner
    from diffin_core.methods.diffin import DiffIn
    runner.configure(ctx, runner.memory_plan(DiffIn(), ctx, False))
    return ctx


def view_rows(ctx, store: FeatureStore, qx, qy, rows) -> np.ndarray:
    """Influence of training rows on the query set's mean loss in full parameter space through
    the STORED views (what the fold approximates): sum_k c_k <g_z(theta_k), w_k> (B,)."""
    rows = np.asarray(rows, dtype=np.int64)
    u = ctx.mean_grad(ctx.m - 1, qx, qy)
    x, y = ctx.tensors(ctx.train.x[rows], ctx.train.y[rows])
    total = torch.zeros(len(rows), dtype=torch.float64, device=ctx.device)
    for it in propagate(ctx, store.views, u):
        total += it.coef * ctx.fm_at(it.k).directional(ctx.thetas[it.k], x, y, it.w).double()
    return total.cpu().numpy()


_PLANS: dict = {}


def exact_plan(ctx, qx, qy, key=None, run_dir=None, query_indices=None):
    """The exact path's own plan for a query set (methods/diffin.DiffIn.prepare: Lanczos started at
    the query's gradient, ``lanczos_steps`` finite-difference HVPs per checkpoint), the same w_k as
    `diffin top --exact`; cost independent of N. Cached in memory per ``key`` (a few queries) and,
    with ``run_dir`` and ``query_indices``, on disk with the run (answers.save_plan): a query
    planned once is never planned again, in any process."""
    from diffin_core.methods.diffin import DiffIn
    if key is not None and key in _PLANS:
        return _PLANS[key]
    plan = None
    if run_dir is not None and query_indices is not None:
        plan = cached_plan(ctx, run_dir, query_indices)
    if plan is None:
        with_twin(ctx)
        plan = DiffIn().prepare(ctx, qx, qy)
        if run_dir is not None and query_indices is not None:
            keep_plan(run_dir, query_indices, plan)
        if isinstance(getattr(ctx, "base_grads", None), BaseGrads):
            ctx.base_grads.save()
    if key is not None:
        if len(_PLANS) >= 8:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = plan
    return plan


def keep_plan(run_dir, query_indices, plan) -> None:
    """Save a plan's influence side (w_k, and Adam's per-sample batch-order rows) with the run."""
    from diffin_core.run import answers
    vecs = {}
    for it in plan:
        vecs[f"w{it.k}"] = it.w.detach().cpu().numpy()
        if getattr(it, "rows", None) is not None:
            vecs[f"r{it.k}"] = it.rows.detach().cpu().numpy()
    answers.save_plan(run_dir, query_indices, vecs)


def cached_plan(ctx, run_dir, query_indices):
    """The saved plan (influence side only: no segment operators, so no self-influence) or None."""
    from diffin_core.run import answers
    from diffin_core.engine.propagate import PlanItem
    vecs = answers.load_plan(run_dir, query_indices)
    if not vecs:
        return None
    items = []
    for name in sorted((n for n in vecs if n.startswith("w")), key=lambda n: -int(n[1:])):
        k = int(name[1:])
        w = torch.as_tensor(vecs[name]).to(device=ctx.device, dtype=ctx.thetas[k].dtype)
        rows = torch.as_tensor(vecs[f"r{k}"]) if f"r{k}" in vecs else None
        items.append(PlanItem(k, 1.0 / ctx.n, w, None, rows))
    return items


TWIN_ROWS = 64          # rescorings of at least this many rows give the twin half of them


def with_twin(ctx):
    """This process's twin (engine/twin.py), forked now for ``ctx`` if there is none: it takes half
    of each batch gradient's slices in a plan (the same bits) and half of the rows rescore_rows
    rescores. Only for contexts whose plans run single-threaded (plan_step: small slices, the
    sample CNN); None elsewhere (a ResNet's plan keeps its intra-op threads)."""
    from diffin_core.engine import functional
    if ctx.fm.threads_round(min(int(ctx.hessian_rows), int(ctx.n))) or ctx.device.type != "cpu" \
            or getattr(ctx, "batch_order", None) is not None:
        return None
    if functional._TWIN is not None and functional._TWIN.alive and getattr(ctx, "twin", None) is functional._TWIN:
        return ctx.twin
    models = [ctx.fm] + [ctx.fm_at(k) for k in range(ctx.m)]
    ctx.twin = functional.start_twin(list({id(m): m for m in models}.values()),
                                     {"rescore": lambda ks, coefs, rows, *ws: [_rescore_here(ctx, ks, coefs, rows, ws)]})
    return ctx.twin


def _rescore_here(ctx, ks, coefs, rows, ws):
    """In the twin: rescore_rows on its half of the rows, under the plan's (k, coef, w_k)."""
    from diffin_core.engine.propagate import PlanItem
    plan = [PlanItem(int(k), float(c), w, None, None) for k, c, w in zip(ks, coefs, ws)]
    return torch.from_numpy(_rescore_rows(ctx, plan, rows.numpy()))


def rescore_rows(ctx, plan, rows, chunk: int = 1024) -> np.ndarray:
    """The exact path's influence (B,) of training ``rows`` under ``plan``: DiffIn.chunk (one jvp
    per checkpoint) on just those rows, so each value equals the exact path's score of that row.
    At most ``chunk`` rows at a time, fewer when the context's memory plan says so (jvp rows).
    Where the process has a twin for ``ctx`` (with_twin), it rescores the later half of the rows
    (each row's value does not depend on the rows beside it in a chunk: tested)."""
    rows = np.asarray(rows, dtype=np.int64)
    twin = getattr(ctx, "twin", None)
    if (twin is None or not twin.alive or len(rows) < TWIN_ROWS
            or any(getattr(it, "rows", None) is not None for it in plan)):
        return _rescore_rows(ctx, plan, rows, chunk)
    order = np.argsort(rows, kind="stable")
    h = (len(rows) + 1) // 2
    mine, theirs = rows[order[:h]], rows[order[h:]]
    pending = twin.submit("rescore", ([it.k for it in plan], [float(it.coef) for it in plan]),
                          [torch.from_numpy(theirs)] + [it.w for it in plan])
    if pending is None:
        return _rescore_rows(ctx, plan, rows, chunk)
    out = np.empty(len(rows))
    try:
        out[order[:h]] = _rescore_rows(ctx, plan, mine, chunk)
    finally:
        got = pending.result()
    out[order[h:]] = got[0].numpy() if got is not None else _rescore_rows(ctx, plan, theirs, chunk)
    return out


def _rescore_rows(ctx, plan, rows, chunk: int = 1024) -> np.ndarray:
    from diffin_core.methods.diffin import DiffIn
    if getattr(ctx, "memory", None) is not None:
        chunk = max(1, min(chunk, ctx.memory.jvp_chunk))
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty(len(rows))
    order = np.argsort(rows)                              # ascending reads from a memmapped split
    from diffin_core.errors import check_cancelled
    for a in range(0, len(rows), chunk):
        check_cancelled()                                 # a warm child's cancelled call stops here
        r = rows[order[a:a + chunk]]
        x, y = ctx.tensors(ctx.train.x[r], ctx.train.y[r])
        out[order[a:a + chunk]] = DiffIn().chunk(ctx, plan, x, y, need_self=False)[0].double().cpu().numpy()
    return out


def checkpoint_contributions(ctx, plan, row: int) -> "pd.DataFrame":
    """Per-checkpoint terms of one training row's influence under ``plan`` (the exact path's own
    plan: exact_plan), in step order. They are the columns DiffIn.chunk sums (coef_k <w_k,
    g_z(theta_k)> by one jvp; with a recorded Adam batch order the segment's per-sample rows), so
    their sum is the exact path's value for the pair: the run's own influence for the whole query
    set, the top-k's value for a query."""
    from diffin_core.methods.diffin import DiffIn
    x, y = ctx.tensors(ctx.train.x[row:row + 1], ctx.train.y[row:row + 1])
    parts = DiffIn().chunk_parts(ctx, plan, x, y)[0][0].double().cpu().numpy()    # (m,)
    recs = []
    for k in sorted(it.k for it in plan):
        rows = next(it.rows for it in plan if it.k == k)
        value = float(rows[row]) if rows is not None else float(parts[k])
        recs.append({"checkpoint": k, "step": int(ctx.steps[k]), "contribution": value})
    import pandas as pd             # here only: a new query's fast path runs without pandas (~0.4 s CPU)
    return pd.DataFrame(recs)


def contributions_path(project, run: str, sample_id: int, query_indices=None) -> Path:
    """Where one sample's per-checkpoint contributions are cached (JSON, under the store)."""
    key = "all" if query_indices is None else "q" + "_".join(map(str, sorted(set(int(i) for i in np.atleast_1d(query_indices)))))
    if len(key) > 100:
        import hashlib
        key = "qset-" + hashlib.sha1(key.encode()).hexdigest()
    return project.run(run).path / "answers" / "contributions" / f"{int(sample_id)}-{key}.json"


def contributions_for(root: str, run: str, sample_id: int, query_indices=None, progress=None) -> str:
    """Compute and cache (atomically) one training sample's per-checkpoint contributions on the
    mean loss of the query samples (all when None: the run's own query set), from the exact path's
    plan for those queries (kept with the run), so they sum to the run's value. Runs the model: the
    app calls it in a child process (usercode). Returns the cache path."""
    from diffin_core.project.atomic import write_text
    from diffin_core.project.folder import Project
    project = Project(root)
    rows = {int(s): i for i, s in enumerate(project.train.ids)}
    if int(sample_id) not in rows:
        raise DiffinError(f"no training sample has id {sample_id}", project.train.path)
    q = project.query
    idx = np.arange(len(q)) if query_indices is None else np.atleast_1d(np.asarray(query_indices, dtype=np.int64))
    ctx = _context(project, run)
    plan = exact_plan(ctx, q.x[idx], q.y[idx], run_dir=project.run(run).path, query_indices=idx)
    df = checkpoint_contributions(ctx, plan, rows[int(sample_id)])
    out = contributions_path(project, run, sample_id, query_indices)
    write_text(out, df.to_json(orient="records"))
    return str(out)


def fast_answer(project, run: str, query_indices, rerank: int | None = None,
                store: FeatureStore | None = None, k: int = 10):
    """The fast path's answers.Answer (influence (N,), which rows are exact, label), or None when
    the run has no store.

    The store ranks every training row (one (N, d) product); the top ``rerank`` per side are then
    rescored by the exact path itself (its own query plan, whose HVPs cost the same at any N, and
    one jvp per checkpoint per candidate), so those rows carry exactly the exact path's values and
    the top-k equals the exact top-k whenever the store's shortlist holds it (benchmarks/explore.py
    measures how often). ``rerank=0``: the store alone (approximate; no model code runs).
    With the default shortlist (``rerank`` None) the answer and the query's plan are kept with the
    run (answers.py): asking again, from any process, reads them."""
    from diffin_core.run import answers
    store = store or FeatureStore.open(project, run)
    if store is None:
        return None
    idx = np.atleast_1d(np.asarray(query_indices, dtype=np.int64))
    nq = store.meta["n_query"]
    if len(idx) == 0:
        raise DiffinError("choose at least one query sample")
    if idx.min() < 0 or idx.max() >= nq:
        raise DiffinError(f"query index out of range: the query set has {nq} samples (0..{nq - 1})")
    run_dir = project.run(run).path
    if is_span(store.meta):                        # a batch-order Adam run: its replay through the query span
        saved = answers.load(run_dir, idx) if rerank is None else None
        if saved is not None:
            return saved
        if rerank is None:
            from diffin_core.run.span import answer_new
            return answer_new(run_dir, idx)
        return SpanStore(store.path).answer(idx, run_dir)
    certify = rerank is None and store.per_checkpoint is not None and store.meta["n_train"] > 0
    k = max(int(k), CERTIFIED_K)
    saved = answers.load(run_dir, idx) if rerank is None else None
    if saved is not None and (not certify or saved.covers(k)):
        return saved                                   # answered before (any process): no model run
    if certify:
        clock = _Clock()
        ctx = _context(project, run)
        clock.mark("context")
        q = project.query
        key = (str(project.root), run, tuple(sorted(set(int(i) for i in idx))))
        plan = exact_plan(ctx, q.x[idx], q.y[idx], key, run_dir=run_dir, query_indices=idx)
        clock.mark("plan")
        est, sigma = store.plan_bounds(plan)
        clock.mark("bounds")
        known = None if saved is None else (saved.influence, saved.exact)     # rows rescored before
        infl, exact = certified_rows(est, sigma, lambda rows: rescore_rows(ctx, plan, rows), k, known=known)
        clock.mark("rescore")
        ans = answers.Answer(infl, exact, certified_label(store, int(exact.sum()), k), certified=k)
        answers.save(run_dir, idx, infl, exact, ans.path, uses_store=True, certified=k,
                     timings={**clock.parts, "rescored_rows": int(exact.sum())}, bounds=(est, sigma))
        return ans
    infl = store.query_influence(idx)
    exact = np.zeros(len(infl), dtype=bool)
    r = store.shortlist() if rerank is None else int(rerank)
    if r > 0 and len(infl):
        helpful, harmful = shortlists(infl, r)
        cand = np.union1d(helpful, harmful)
        ctx = _context(project, run)
        q = project.query
        key = (str(project.root), run, tuple(sorted(set(int(i) for i in idx))))
        plan = exact_plan(ctx, q.x[idx], q.y[idx], key, run_dir=run_dir, query_indices=idx)
        infl = merge_rescored(infl, helpful, harmful, cand, rescore_rows(ctx, plan, cand))
        exact[cand] = True
    ans = answers.Answer(infl, exact, store.label(r))
    if rerank is None and r > 0:
        answers.save(run_dir, idx, infl, exact, ans.path, uses_store=True)
    return ans


class _Clock:
    """Wall and this process's CPU seconds of a fast answer's steps (kept with the answer:
    answers.timings; benchmarks/explore_query.py reports them)."""

    def __init__(self):
        self.parts: dict = {}
        self._t, self._c = time.perf_counter(), time.process_time()

    def mark(self, name: str) -> None:
        t, c = time.perf_counter(), time.process_time()
        self.parts[f"{name}_s"], self.parts[f"{name}_cpu_s"] = round(t - self._t, 4), round(c - self._c, 4)
        self._t, self._c = t, c


CERTIFIED_K = 10        # the top k per side certified at least (a deeper grid certifies deeper)
CERTIFIED_Z = 4.0       # standard deviations of the sketch's error a row must be below to be ruled out
CERTIFIED_START = 64    # rows per side rescored first


def certified_rows(est: np.ndarray, sigma: np.ndarray, rescore, k: int = CERTIFIED_K,
                   z: float = CERTIFIED_Z, start: int = CERTIFIED_START, known=None) -> tuple[np.ndarray, np.ndarray]:
    """(influence (N,), exact (N,) bool): rows rescored exactly (``rescore(rows) -> values``) until
    no other row can reach the top ``k`` of either side: a row is ruled out when its estimate plus
    ``z`` sigma stays below the k-th exact value of that side (k-th lowest: minus). The others keep
    their estimate, which then ranks below every certified row of the top k. ``known``: (values,
    exact mask) of rows rescored before (kept, not rescored again)."""
    n = len(est)
    out = est.astype(np.float64).copy()
    exact = np.zeros(n, dtype=bool)
    if known is not None:
        exact[:] = known[1]
        out[exact] = known[0][exact]

    def take(rows):
        rows = np.setdiff1d(rows, np.flatnonzero(exact))
        if len(rows):
            out[rows] = rescore(rows)
            exact[rows] = True
    k = min(k, n)
    for sign in (1.0, -1.0):
        e = sign * est
        take(np.argsort(-e, kind="stable")[:max(k, start)])
        while True:
            tau = np.sort(sign * out[exact])[-k]
            cand = np.flatnonzero(~exact & (e + z * sigma >= tau))
            if not len(cand):
                break
            take(cand)
    return out, exact


def certified_label(store, rows: int, k: int) -> str:
    old = store.has_views and not store.meta.get("independent_sketches")
    return (f"exact path: this query's own plan; the {rows} rows that a per-checkpoint sketch "
            f"(d = {store.checkpoint_dim}) could not rule out of the top {k} at "
            f"{CERTIFIED_Z:g} standard deviations were rescored exactly"
            + ("; an older store (one sketch for every checkpoint): `diffin features` rebuilds it with a "
               "tighter bound, so fewer rows" if old else ""))


def fast_query_influence(project, run: str, query_indices, rerank: int | None = None,
                         store: FeatureStore | None = None) -> tuple[np.ndarray, str] | None:
    """(influence (N,), path label) of fast_answer, or None when the run has no store."""
    ans = fast_answer(project, run, query_indices, rerank, store)
    return None if ans is None else (ans.influence, ans.path)


def rescored_path(project, run: str, query_indices) -> Path:
    """Where a query set's fast answer is kept (answers.answer_path: .npz, dropped with a rebuilt
    store)."""
    from diffin_core.run import answers
    return answers.answer_path(project.run(run).path, query_indices)


# --- how far the store's own numbers are from the exact path, measured on this run ----------------

AGREEMENT_MIN_QUERIES = 5      # answered queries before the store's first grid may be trusted
AGREEMENT_MIN_OVERLAP = 0.9    # mean top-10 overlap (store alone vs exact) it must reach


def answered_queries(project, run: str) -> list[int]:
    """Single query samples with a saved answer for this run (answers.py), ascending."""
    from diffin_core.run import answers
    d = project.run(run).path
    out = set()
    for sub, pattern in ((answers.DIRNAME, "q*.npz"), ("topk", "q*.npy")):
        for p in (d / sub).glob(pattern):
            name = p.name.split(".")[0]
            if name[1:].isdigit() and not p.name.endswith(".plan.npz"):
                out.add(int(name[1:]))
    return sorted(out)


def store_agreement(project, run: str, k: int = 10, store: FeatureStore | None = None) -> dict | None:
    """The store alone against the exact path, measured on this run's answered single queries:
    ``overlap`` the mean top-k overlap (helpful and harmful sides) over the answers whose top k
    is proven the exact path's (every row exact, or certified); ``rel_error`` the median |store - exact| / |exact| and ``sign_flips`` the
    share of opposite signs over every exact row of every answer (the pairs a page could show);
    ``queries`` how many answers each used. None without a store."""
    from diffin_core.run import answers
    store = store or FeatureStore.open(project, run)
    if store is None:
        return None
    d = project.run(run).path
    overlaps, errs, flips, n_err = [], [], 0, 0
    for qi in answered_queries(project, run):
        ans = answers.load(d, [qi])
        if ans is None or len(ans.influence) != store.meta["n_train"]:
            continue
        approx = store.query_influence([qi])
        rows = np.flatnonzero(ans.exact)
        ex = ans.influence[rows]
        big = np.abs(ex) > 0
        errs.append(np.abs(approx[rows][big] - ex[big]) / np.abs(ex[big]))
        flips += int(np.sum(np.sign(approx[rows][big]) != np.sign(ex[big])))
        n_err += int(big.sum())
        if ans.covers(k):                              # its top k proven the exact path's
            for largest in (True, False):
                a = np.argsort(-approx if largest else approx, kind="stable")[:k]
                b = np.argsort(-ans.influence if largest else ans.influence, kind="stable")[:k]
                overlaps.append(len(set(a.tolist()) & set(b.tolist())) / k)
    return {"queries": len(overlaps) // 2, "overlap": float(np.mean(overlaps)) if overlaps else float("nan"),
            "error_queries": len(errs), "rel_error": float(np.median(np.concatenate(errs))) if n_err else float("nan"),
            "sign_flips": flips / n_err if n_err else float("nan")}


def store_grid_trusted(agreement: dict | None) -> bool:
    """Whether the store's first grid may be drawn before the exact one (issue 21): only where
    it has been measured on this run to agree with the exact grid (AGREEMENT_MIN_QUERIES answered
    queries, mean top-10 overlap at least AGREEMENT_MIN_OVERLAP)."""
    return bool(agreement and agreement["queries"] >= AGREEMENT_MIN_QUERIES
                and agreement["overlap"] >= AGREEMENT_MIN_OVERLAP)


def reverse_influence(project, run: str, row: int, store: FeatureStore | None = None):
    """(values (Nq,), exact (Nq,) bool): training row ``row``'s influence on each query sample's
    loss. The exact path's value wherever a saved answer for that query holds this row exactly
    (the number its top-k grid shows), else the store's projected value (approximate: see
    store_agreement for its measured error on this run)."""
    from diffin_core.run import answers
    store = store or FeatureStore.open(project, run)
    values = store.reverse(row).astype(np.float64)
    exact = np.zeros(len(values), dtype=bool)
    d = project.run(run).path
    for qi in answered_queries(project, run):
        if qi >= len(values):
            continue
        ans = answers.load(d, [qi])
        if ans is not None and row < len(ans.exact) and ans.exact[row]:
            values[qi], exact[qi] = ans.influence[row], True
    return values, exact


# --- planning ahead: the app's background job answers the queries a reviewer opens next -----------

AHEAD = 12      # queries planned ahead per opened query


def plan_ahead_queue(project, run: str, qi: int, size: int = AHEAD) -> list[int]:
    """The ``size`` query samples of ``qi``'s given class that follow it (by index, wrapping): those
    a reviewer walking a class opens next. Answered ones included (the page counts them ready)."""
    y = np.asarray(project.query.y)
    same = np.flatnonzero(y == y[int(qi)])
    after = np.concatenate([same[same > int(qi)], same[same < int(qi)]])
    return [int(i) for i in after[:size]]


def shortlists(approx: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the ``r`` largest and the ``r`` smallest values (the helpful and harmful
    shortlists)."""
    order = np.argsort(approx, kind="stable")
    return order[::-1][:r], order[:r]


def merge_rescored(approx: np.ndarray, helpful: np.ndarray, harmful: np.ndarray, cand: np.ndarray,
                   exact: np.ndarray) -> np.ndarray:
    """(N,) influence: the exact values on the shortlisted rows ``cand`` (sorted), and elsewhere the
    store's estimate, rescaled by the least-squares slope exact ~ slope * approx on the shortlist
    and kept strictly inside the shortlists' exact range (above the harmful shortlist's largest,
    below the helpful shortlist's smallest): the store's values are a different approximation on
    another scale, so a row it did not shortlist never outranks one the exact path scored."""
    a = approx[cand]
    slope = float(a @ exact / (a @ a)) if float(a @ a) > 0 else 1.0
    out = approx * (slope if slope > 0 else 1.0)
    rest = np.ones(len(out), dtype=bool)
    rest[cand] = False
    hi = exact[np.searchsorted(cand, helpful)].min()
    lo = exact[np.searchsorted(cand, harmful)].max()
    if rest.any():
        if lo < hi:
            pad = 1e-6 * (hi - lo)
            out[rest] = np.clip(out[rest], lo + pad, hi - pad)
        else:                                     # the shortlists' exact ranges overlap
            out[rest] = 0.5 * (lo + hi)
    out[cand] = exact
    return out
