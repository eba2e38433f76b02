"""Carrying a query back through training, one checkpoint segment at a time (Diff-In's core).

Linearise training around the recorded trajectory. Removing z changes each step's gradient by
-e with e = g_z / N (expected over batches). Per step s (lr eta_s) the state (x, mu) - the
weight change and the momentum-buffer change - evolves per eigenvalue l of the segment's
symmetric operator M as (torch's update order; z = l x - e):
    mu' = beta mu + c z                      x' = rho x - eta (alpha z + gamma mu')
    A(l) = [[rho - kappa l, -eta gamma beta], [c l, beta]],   injection e [kappa, -c],
    kappa = eta (alpha + gamma c).
  plain SGD        beta = 0, c = 1 (alpha = 0, gamma = 1)
  heavy ball       beta = momentum, c = 1 - dampening (1 at step 0: torch's first buffer = g)
  Nesterov         as heavy ball with alpha = 1, gamma = beta
  coupled wd       l -> l + lambda (M = H + lambda I)
  decoupled wd     rho = 1 - eta lambda (AdamW; 1 otherwise)
  Adam/AdamW       D = 1/(sqrt(v_hat) + eps) frozen per checkpoint: the lr-weighted mean of Adam's
                   per-step D over the steps the checkpoint owns, v interpolated between its own
                   and its neighbours' recorded exp_avg_sq (recipe.segment_adam_scale);
                   in x = D^-1/2 delta, y = D^1/2 mu the step is heavy ball with beta = beta1,
                   c = 1 - beta1, eta -> eta / (1 - beta1^(s+1)) and M = D^1/2 H D^1/2 (+ lambda D
                   when coupled): a symmetric operator whose matvec is an HVP along D^1/2 v.
The adjoint (u, v) of (x, mu) starts at (g_Q(theta_T), 0) and goes back by U_s = A_s^T U_{s+1};
influence(z) = sum_s <U_{s+1}, injection_s>. Within a segment the operator is fixed, so on each
Ritz value the segment is a 2x2 product over the segment's own lrs (exact, any schedule, lr = 0
steps included): W(l) (2,) sums the injections' weights, C(l) (2, 2) carries (u, v) to the
segment's start. Eigenvalues are clipped to [0, 1/kappa_s] per step (every step contracting).

Not modelled: Adam's second moment v responds to the removal too (v' = beta2 v + (1-beta2) g^2).
Measured on the digits AdamW benchmark (800 samples, 200 steps, float64, every step stored,
exact per-step Hessians; seeds 0 / 1; benchmarks/adam_study.py -> results/adam_study.csv): the full linearisation in (theta, m, v) with z in the
batches it was really in agrees with true leave-one-out at Spearman 0.995 / 0.994, with v frozen
0.85 / 0.85. The v term is -2 (1-beta2) g_B(s) * g_z / B at each step s whose batch held z, and
what it carries is the gradient of *that batch*: replacing it by the full-data gradient gives
0.79 / 0.84. A checkpoint estimator knows neither the batch nor when z was in it: it injects
g_z / N at every step (expected membership). With expected membership the per-step reference
reaches 0.83 / 0.71 with v frozen, and linearising v with the full-data gradient (g_B at a
checkpoint) *lowers* it to -0.09 / 0.41 (0.78 / 0.76 with each step's realised batch gradient).
(The checkpoint estimator, Ritz values clipped, reaches 0.84 / 0.84 at 5 checkpoints: these
per-step references are not bounds, but the v channel without the batch lowered every one.)
So v is left frozen here. With the batch order recorded (and exp_avg), diffin's influence takes
the per-step path of adam_batches.py instead (Adam's moments replayed step by step from the
checkpoints with the real batches; the state held per checkpoint was not enough: -0.05 / 0.72,
replayed 0.91 / 0.99 at 5 / 20 checkpoints, seed 0, results/adam_study.csv); this walk then
still gives the segment operators that self-influence uses.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from diffin_core.errors import DiffinError
from diffin_core.engine.functional import no_tf32, single_threaded
from diffin_core.engine.lanczos import SpectralView, lanczos
from diffin_core.engine.recipe import Recipe, bias_correction1

ViewFn = Callable[[int, Sequence[torch.Tensor]], SpectralView]


def step_constants(recipe: Recipe) -> tuple[float, float, float, float]:
    """(beta, c, alpha, gamma) of the 2x2 step (see module doc)."""
    if recipe.adam:
        b1 = recipe.betas[0]
        return b1, 1.0 - b1, 0.0, 1.0
    if recipe.optimizer == "SGD" and recipe.momentum > 0:
        beta = recipe.momentum
        return (beta, 1.0 - recipe.dampening) + ((1.0, beta) if recipe.nesterov else (0.0, 1.0))
    return 0.0, 1.0, 0.0, 1.0


def has_momentum(recipe: Recipe) -> bool:
    return step_constants(recipe)[0] > 0


def segment_coefficients(values: np.ndarray, lrs: np.ndarray, first_step: int, recipe: Recipe, *,
                         complement=(0.0,), gscale: np.ndarray | None = None, decay: np.ndarray | None = None,
                         coupled_in_matvec: bool = False, shift: np.ndarray | None = None,
                         momenta: np.ndarray | None = None):
    """Per-eigenvalue maps of one segment, evaluated on ``values`` (r,) and on ``complement``
    (q values: the curvature of the rest of the space; one 0 by default, or one per param group).

    lrs (n,): the lr of each step of the segment, in order, the first being global step
    ``first_step``. ``gscale`` (n,): each step's gradient scale f (gradient clipping's factor):
    the loss gradient is scaled, coupled weight decay is not (torch adds it after clipping), so
    the step sees curvature f l + (1 - f) shift and the injection f e; ``shift`` (r+q,) is the
    coupled weight decay contained in each value (Rayleigh quotients with per-group decay; the
    scalar lambda on the SGD path). ``decay`` (r+q,): decoupled weight decay per value
    (rho = 1 - lr decay; per-group weight decay) instead of the recipe's scalar one.
    ``coupled_in_matvec``: coupled weight decay is already in the operator (per-group lambda),
    not added to the values. ``momenta`` (n,): SGD's momentum of each step (a momentum schedule,
    e.g. OneCycleLR's cycle_momentum) instead of the recipe's one.
    Returns W (r+q, 2) and C (r+q, 2, 2) in float64 (module doc).
    """
    beta, c, alpha, gamma = step_constants(recipe)
    betas = (np.full(len(lrs), beta) if momenta is None or recipe.adam or beta <= 0
             else np.asarray(momenta, dtype=np.float64))
    l = np.maximum(np.concatenate([np.asarray(values, dtype=np.float64),
                                   np.asarray(complement, dtype=np.float64).reshape(-1)]), 0.0)
    lam = recipe.weight_decay
    sh = np.zeros_like(l) if shift is None else np.asarray(shift, dtype=np.float64)
    if lam and not recipe.decoupled and not recipe.adam and not coupled_in_matvec:
        l = l + lam                                     # coupled: H + lambda I (Adam: in the matvec)
        sh = sh + lam
    lrs = np.asarray(lrs, dtype=np.float64)
    f = np.ones_like(lrs) if gscale is None else np.asarray(gscale, dtype=np.float64)
    idx = first_step + np.arange(len(lrs))
    eta = lrs * bias_correction1(idx, recipe.betas[0]) if recipe.adam else lrs
    if decay is not None:
        decay = np.asarray(decay, dtype=np.float64)
        rho = 1.0 - lrs[:, None] * decay[None, :]
    else:
        rho = (1.0 - lrs * lam if (lam and recipe.decoupled) else np.ones_like(lrs))[:, None] * np.ones((1, len(l)))
    one, zero = np.ones_like(l), np.zeros_like(l)
    t11, t12, t21, t22 = one, zero, zero, one            # U_{s+1} = T U_end
    w1, w2 = zero.copy(), zero.copy()
    for j in range(len(lrs) - 1, -1, -1):
        bj = betas[j]
        gj = bj if (recipe.nesterov and not recipe.adam and beta > 0) else gamma
        cs = 1.0 if (idx[j] == 0 and beta > 0 and not recipe.adam) else c
        kappa = eta[j] * (alpha + gj * cs)
        lj = l if f[j] == 1.0 else f[j] * l + (1.0 - f[j]) * sh
        ls = np.minimum(lj, 1.0 / kappa) if kappa > 0 else lj
        a11, a12, a21, a22 = rho[j] - kappa * ls, -eta[j] * gj * bj, cs * ls, bj
        w1 = w1 + f[j] * (kappa * t11 - cs * t21)
        w2 = w2 + f[j] * (kappa * t12 - cs * t22)
        t11, t12, t21, t22 = a11 * t11 + a21 * t21, a11 * t12 + a21 * t22, a12 * t11 + a22 * t21, a12 * t12 + a22 * t22
    W = np.stack([w1, w2], -1)
    C = np.stack([np.stack([t11, t12], -1), np.stack([t21, t22], -1)], -2)
    return W, C


def safe_inverse(S: torch.Tensor) -> torch.Tensor:
    """1 / S, 0 where S = 0 (a frozen parameter: it never moves, its adjoints are 0)."""
    return torch.where(S > 0, 1.0 / torch.where(S > 0, S, torch.ones_like(S)), torch.zeros_like(S))


@dataclass
class SegmentOp:
    """One checkpoint's segment as operators on adjoints in the symmetrised space.

    f(M) x = f(0) x + Y (f(Theta) - f(0)) Y^T x on the Lanczos view (complement: curvature 0).
    With ``expand`` (per-group hyper-parameters) the complement has one value per param group:
    f(M) x = Y f(Theta) Y^T x + f_c (x - Y Y^T x), f_c = expand(f(complement values)) (P,).
    """
    view: SpectralView
    W: torch.Tensor                 # (r+q, 2), the last q rows = the complement
    C: torch.Tensor                 # (r+q, 2, 2)
    scale: torch.Tensor | None      # S (P,): D^1/2 for Adam, times the per-group lr scale^1/2, else None
    expand: Callable | None = None  # per-group complement values (q,) -> (P,)

    @property
    def inv_scale(self) -> torch.Tensor | None:
        S = self.scale
        if S is None:
            return None
        inv = getattr(self, "_inv", None)
        if inv is None:
            inv = self._inv = safe_inverse(S)
        return inv

    def _f(self, fu: torch.Tensor, fv: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None):
        return self._fs([(fu, fv)], u, v)[0]

    def _fs(self, maps, u: torch.Tensor, v: torch.Tensor | None) -> list[torch.Tensor]:
        """[_f(fu, fv, u, v) for fu, fv in maps] reading the Ritz vectors Y (P, r) three times in
        all instead of three times per map (at P = 11M, Y is ~700 MB: the self-influence walk of
        a ResNet is bound by reading it)."""
        Y = self.view.vectors
        r = Y.shape[1]
        cu = u @ Y
        cv = None if v is None else v @ Y
        if self.expand is not None:
            uperp = u - cu @ Y.T
            vperp = None if v is None else v - cv @ Y.T
            coefs = torch.stack([cu * fu[:r] + (0 if cv is None else cv * fv[:r]) for fu, fv in maps])
            outs = list((coefs @ Y.T).unbind(0))
            for out, (fu, fv) in zip(outs, maps):
                out.add_(uperp * self.expand(fu[r:]))
                if v is not None:
                    out.add_(vperp * self.expand(fv[r:]))
            return outs
        coefs = torch.stack([cu * (fu[:-1] - fu[-1]) + (0 if cv is None else cv * (fv[:-1] - fv[-1]))
                             for fu, fv in maps])
        outs = list((coefs @ Y.T).unbind(0))
        for out, (fu, fv) in zip(outs, maps):
            out.add_(u * fu[-1])
            if v is not None:
                out.add_(v * fv[-1])
        return outs

    def rows(self, u: torch.Tensor, v: torch.Tensor | None):
        """Adjoints at the segment's end (delta space, (P,) or (B, P)) -> (w, u, v) where
        influence += <w, g_z>/N and (u, v) are the adjoints at the segment's start."""
        S, inv = self.scale, self.inv_scale
        if S is not None:
            u, v = u * S, (None if v is None else v * inv)
        maps = [(self.W[:, 0], self.W[:, 1]), (self.C[:, 0, 0], self.C[:, 0, 1])]
        if v is not None:
            maps.append((self.C[:, 1, 0], self.C[:, 1, 1]))
        w, nu, *rest = self._fs(maps, u, v)
        nv = rest[0] if rest else None
        if S is not None:
            w, nu, nv = w * S, nu * inv, (None if nv is None else nv * S)
        return w, nu, nv


@dataclass
class PlanItem:
    """One checkpoint of a query's plan: influence(z) += coef * <w, g_z(theta_k)>."""
    k: int
    coef: float                     # 1 / N
    w: torch.Tensor                 # (P,) delta space
    op: SegmentOp                   # the segment, for self-influence (propagate rows with op.rows)
    rows: torch.Tensor | None = None    # (N,) float64: the influence of every training sample from
                                        # this segment's real batches (adam_batches.py); when set it
                                        # replaces coef * <w, g_z> for influence (w: self-influence)
    check: dict | None = None           # the Adam replay's self-check of this checkpoint's interval


def preconditioner_scale(ctx, k: int) -> torch.Tensor | None:
    """S (P,) at checkpoint k: D^1/2 for Adam recipes with a recorded exp_avg_sq, times R^1/2
    with per-group hyper-parameters (R: the per-coordinate lr scale of the segment, 0 frozen);
    None for one-group SGD (S = I)."""
    D = None
    if ctx.recipe.adam and ctx.precond is not None:
        D = ctx.precond[k]
    groups = getattr(ctx, "groups", None)
    if groups is None:
        return None if D is None else D.sqrt()
    R = groups.lr_scale(k, ctx.device, ctx.thetas[k].dtype)
    return (R if D is None else D * R).sqrt()


def coupled_decay(ctx):
    """Coupled weight decay inside the operator: (P,) per coordinate with per-group
    hyper-parameters, the scalar for Adam's coupled decay, or 0 (SGD adds it to the values)."""
    recipe, groups = ctx.recipe, getattr(ctx, "groups", None)
    if recipe.decoupled:
        return 0.0
    if groups is not None:
        return groups.decay_vector(ctx.device)          # float64; hessian_matvec casts it
    return recipe.weight_decay if recipe.adam else 0.0


def hessian_matvec(ctx, k: int, batch, scaled: bool = True, g0=None):
    """(matvec, g0): the segment operator M of checkpoint k on a fixed batch, and a function giving
    the batch gradient, computed at most once and only when asked (finite differences: views of
    exact products never need it). ``g0``: that gradient when the caller has it, or a function
    giving it (base_grad's cache). M = H (SGD), D^1/2 H D^1/2 (+ lambda D, Adam with coupled weight decay);
    S (H + Lambda) S with per-group hyper-parameters (S = preconditioner_scale).
    HVPs per settings.hvp (hvp.py; finite differences with TF32 off); a non-finite product raises a one-line DiffinError
    naming the checkpoint."""
    x, y = batch
    fm, theta = ctx.fm_at(k), ctx.thetas[k]
    base: list = [] if g0 is None or callable(g0) else [g0]
    given = g0 if callable(g0) else None

    def g0():
        if not base:
            if given is not None:
                base.append(given())
            else:
                with no_tf32():
                    base.append(fm.batch_grad(theta, x, y))
        return base[0]
    from .hvp import product
    hv = product(ctx, k, fm, theta, x, y, g0)          # settings.hvp: fd, exact or auto (hvp.py)
    S = preconditioner_scale(ctx, k) if scaled else None
    lam = coupled_decay(ctx) if S is not None else 0.0
    if isinstance(lam, torch.Tensor):
        lam = lam.to(device=theta.device, dtype=theta.dtype)

    def matvec(v):
        with no_tf32():
            out = hv(v) if S is None else S * hv(S * v) + lam * (S * S) * v
        if not torch.isfinite(out).all():
            raise DiffinError(f"non-finite Hessian-vector product at {ctx.label(k)}: the weights or "
                              "the data overflow there (try --hvp exact or float64)")
        return out
    return matvec, g0


def segment_op(ctx, k: int, view: SpectralView, lo: int, hi: int) -> SegmentOp:
    """Checkpoint k's segment operator over steps lo..hi-1 on ``view`` (a view of hessian_matvec's
    M): the recipe, the step lrs, the clip factors and per-group hyper-parameters."""
    values = view.values.double().cpu().numpy()
    recipe, groups = ctx.recipe, getattr(ctx, "groups", None)
    clip = getattr(ctx, "clip", None)
    gscale = None if clip is None else clip[lo:hi]
    mom = getattr(ctx, "momenta", None)
    momenta = None if mom is None else mom[lo:hi]
    S = preconditioner_scale(ctx, k)
    dev, dt = view.vectors.device, view.vectors.dtype
    expand = None
    if groups is None:
        shift = None
        if gscale is not None and recipe.adam and not recipe.decoupled and recipe.weight_decay and S is not None:
            Y = view.vectors.double()                     # Adam's coupled decay S lambda S along each direction
            d2 = (S.double() ** 2) * recipe.weight_decay
            shift = np.concatenate([((Y * Y) * d2[:, None]).sum(0).cpu().numpy(), [0.0]])
        W, C = segment_coefficients(values, ctx.step_lrs[lo:hi], lo, recipe, gscale=gscale, shift=shift,
                                    momenta=momenta)
    else:
        G = groups.num_groups
        wd = groups.wd
        decay = comp = shift = None
        if recipe.decoupled:                                # rho = 1 - lr_g lambda_g = 1 - lr r_g lambda_g
            Y = view.vectors.double()
            ratios = groups.segment_ratios(int(ctx.bounds[k]), int(ctx.bounds[k + 1]))
            lamv = groups.expand(wd * ratios, Y.device, Y.dtype)
            ritz = ((Y * Y) * lamv[:, None]).sum(0).cpu().numpy() if Y.shape[1] else np.zeros(0)
            decay = np.concatenate([ritz, wd * ratios])     # Ritz directions: their mean decay
            comp = np.zeros(G)
        else:                                               # complement: S^2 lambda per group
            S2 = (S * S).double().cpu()
            comp = np.zeros(G)
            idx = groups.expand(np.arange(G, dtype=np.float64) + 1).cpu()   # group + 1 per coordinate, 0 none
            for g in range(G):
                sel = idx == g + 1
                if bool(sel.any()):
                    comp[g] = float(S2[sel].mean()) * wd[g]
            if gscale is not None:                        # the decay part of each value (not clipped)
                Y = view.vectors.double()
                d2 = (S2 * groups.decay_vector(dtype=torch.float64).cpu()).to(Y.device)
                shift = np.concatenate([((Y * Y) * d2[:, None]).sum(0).cpu().numpy(), comp])
        W, C = segment_coefficients(values, ctx.step_lrs[lo:hi], lo, recipe, complement=comp, gscale=gscale,
                                    decay=decay, coupled_in_matvec=True, shift=shift, momenta=momenta)
        expand = lambda f: groups.expand(f, dev, dt)      # noqa: E731
    return SegmentOp(view, torch.as_tensor(W, dtype=dt, device=dev), torch.as_tensor(C, dtype=dt, device=dev), S,
                     expand)


def hessian_view(ctx, k: int, starts, batch, steps: int | None = None, scaled: bool = True, g0=None):
    """(Lanczos view of M_k, g0: a function giving the batch gradient). ``starts``: one (P,)
    vector or a list (the first gets ``steps`` = settings.lanczos_steps iterations, each further
    one half as many); ``g0``: the batch's gradient at theta_k, or a function giving it (base_grad)."""
    steps = steps or ctx.settings.lanczos_steps
    starts = [starts] if isinstance(starts, torch.Tensor) else list(starts)
    matvec, g0 = hessian_matvec(ctx, k, batch, scaled, g0)
    counts = [steps] + [max(2, steps // 2)] * (len(starts) - 1)
    return lanczos(matvec, starts, counts), g0


def base_grad_key(ctx, k: int) -> tuple:
    """What checkpoint k's Hessian batch gradient depends on besides the run: the checkpoint, the
    batch (rows, seed), the slices and, where they round by it (FunctionalModel.threads_round: one
    large slice), torch's threads."""
    rows = min(int(ctx.hessian_rows), int(ctx.n))
    fm = ctx.fm_at(k)
    return (int(k), rows, int(ctx.settings.seed), int(fm.max_rows or rows),
            torch.get_num_threads() if fm.threads_round(rows) else 0)


def base_grad(ctx, k: int, batch) -> torch.Tensor:
    """The gradient of checkpoint k's fixed Hessian batch at theta_k: the base of its
    finite-difference HVPs, the same for every query. Kept in ``ctx.base_grads`` (a dict, or
    None: not kept) under base_grad_key, so that a context answering several queries (the app's
    worker, planning ahead, `diffin top` with the run's kept ones, features.BaseGrads) computes it
    once per checkpoint; the same bits as a fresh one (the same computation)."""
    cache = getattr(ctx, "base_grads", None)
    key = base_grad_key(ctx, k)
    if cache is not None and key in cache:
        return cache[key]
    x, y = batch
    with no_tf32():
        g0 = ctx.fm_at(k).batch_grad(ctx.thetas[k], x, y)
    if cache is not None:
        cache[key] = g0
    return g0


def random_start(ctx, k: int, salt: int = 0) -> torch.Tensor:
    """A seeded random start vector (P,) for checkpoint k: same settings, same vector."""
    gen = torch.Generator().manual_seed(int(np.random.default_rng([ctx.settings.seed, k, salt, 7]).integers(2**62)))
    return torch.randn(ctx.fm.num_params, generator=gen, dtype=torch.float64).to(
        device=ctx.device, dtype=ctx.thetas[k].dtype)


_DEFERRED = contextvars.ContextVar("diffin_deferred_finite", default=None)


def check_finite(ctx, per_checkpoint: torch.Tensor, what: str) -> None:
    """Raise a one-line DiffinError naming the first checkpoint whose column (b, m) is not finite.
    Inside ``deferred_finite()`` (runner.score_rows' walk) the check is noted on the device and
    made once when the block ends: no device-to-host round trip per chunk on a GPU."""
    pending = _DEFERRED.get()
    if pending is not None:
        bad = ~torch.isfinite(per_checkpoint)
        pending.append((bad.any(0) if per_checkpoint.ndim == 2 else bad.any().reshape(1), what))
        return
    bad = ~torch.isfinite(per_checkpoint)
    if bool(bad.any()):
        k = int(bad.any(0).nonzero()[0, 0]) if per_checkpoint.ndim == 2 else ctx.m - 1
        raise DiffinError(f"non-finite {what} at {ctx.label(k)}: refusing to write NaN scores")


@contextlib.contextmanager
def deferred_finite(ctx):
    """check_finite calls inside are checked together at the end (one sync), with the same message."""
    pending: list = []
    token = _DEFERRED.set(pending)
    try:
        yield
    finally:
        _DEFERRED.reset(token)
    by_what: dict = {}
    for flags, what in pending:                      # OR the flags per kind on the device
        by_what[what] = flags if what not in by_what or by_what[what].shape != flags.shape \
            else by_what[what] | flags
    for what, flags in by_what.items():
        if bool(flags.any()):
            k = int(flags.nonzero()[0, 0]) if len(flags) > 1 else ctx.m - 1
            raise DiffinError(f"non-finite {what} at {ctx.label(k)}: refusing to write NaN scores")


def build_plan(ctx, u: torch.Tensor, view_fn: ViewFn | None = None, batches: bool = False) -> list[PlanItem]:
    """The query plan: the query gradient ``u`` (P,) = g_Q(theta_T) carried back through every
    checkpoint's segment, latest checkpoint first.

    Returns one PlanItem per checkpoint that owns at least one step: influence(z) =
    sum_items coef * <w, g_z(theta_k)> (k = item.k, gradient at that checkpoint with its own
    buffers). Self-influence propagates each sample's own g_z(theta_T) with ``item.op.rows``
    through the same items, in the same order (see DiffIn.chunk).

    ``view_fn(k, starts) -> SpectralView`` replaces the per-query Lanczos run: it must view the
    segment operator of ``hessian_matvec(ctx, k, ...)`` (the symmetrised D^1/2 H D^1/2 for Adam);
    ``starts`` are the query's adjoints in that space ((P,) tensors), which a precomputed,
    query-independent view may ignore. Without it the view is Lanczos from those starts on
    ``ctx.hessian_rows`` samples (settings.hessian_batch; more for BatchNorm nets; seeded).
    ``batches``: also the per-step Adam walk over the recorded batch order (items' ``rows``)
    when the context has one (ctx.batch_order).
    """
    carry = plan_start(ctx, u, batches)
    plan: list[PlanItem] = []
    for i in range(ctx.m):
        item, carry = plan_step(ctx, i, carry, view_fn)
        if item is not None:
            plan.append(item)
        if view_fn is None:         # a Lanczos view per step (seconds): one report per step, counting up
            ctx.progress(0, ctx.n, f"diffin: query plan: checkpoint {i + 1}/{ctx.m} done")
    return plan


def plan_start(ctx, u: torch.Tensor, batches: bool = False):
    """The carried adjoints before the latest checkpoint: (u, v), v = None without momentum;
    with ``batches`` and a recorded batch order also Adam's per-step adjoint (adam_batches.start)."""
    carry = (u.clone(), (torch.zeros_like(u) if has_momentum(ctx.recipe) else None))
    if batches and getattr(ctx, "batch_order", None) is not None:
        if ctx.recipe.adam:
            from diffin_core.engine.adam_batches import start
        else:                                   # SGD (sgd_batches.applies)
            from diffin_core.engine.sgd_batches import start
        carry = carry + (start(u),)
    return carry


SHARP_LIMIT = 0.25      # lr x the segment's largest Ritz value above which SGD's checkpoint walk is unvalidated
SHARP_LINE = "SGD steps large against the loss curvature"     # how note_sharpness's line begins


def note_sharpness(ctx, k: int, view: SpectralView, lo: int, hi: int, replayed: bool = False) -> None:
    """SGD's checkpoint walk: one approximation line (RecipeWarning, and the recipe's
    approximations for meta.json) the first time a segment's largest step lr times its largest
    Ritz value (the operator M: per-group lr scale included) exceeds SHARP_LIMIT. Measured on the
    digits MLP, SGD momentum 0.9, one checkpoint per epoch (benchmarks/recipes.py, docs/recipes.md
    "The recipe table"): at 0.12 (lr 0.05) Spearman 0.90 / 0.95 against leave-one-out; at
    0.46-0.47 (one lr 0.2; the head at lr 0.5) 0.10 (seed 1) and 0.69 / 0.43, while leave-one-out
    there is linear in the sample's weight (0.99) and denser checkpoints (every 12 or 4 steps) do
    not help (0.48, 0.52): the walk's linearisation is not validated at such steps. ``replayed``:
    the influence came from SGD's replay (sgd_batches.py, exact there); only self-influence and
    label_issue take the walk, and the line says so.

    Once per run: label_issue's plan walks a truncated copy of the context (label_issue.
    truncate_context) that shares the recipe, so the note is kept on the recipe's approximations
    (one line of this kind) as well as on the context."""
    approx = getattr(ctx.recipe, "approximations", None)
    if getattr(ctx, "sharpness_noted", False) or hi <= lo or view.values.numel() == 0:
        return
    if isinstance(approx, list) and any(a.startswith(SHARP_LINE) for a in approx):
        ctx.sharpness_noted = True          # the run already states it (its other walk noted first)
        return
    value = float(np.max(ctx.step_lrs[lo:hi])) * float(view.values.max())
    if not value > SHARP_LIMIT:
        return
    ctx.sharpness_noted = True
    import warnings
    from diffin_core.engine.recipe import RecipeWarning
    line = (f"{SHARP_LINE} (lr x the largest Hessian Ritz value {value:.2f} at "
            f"{ctx.label(k)}, above {SHARP_LIMIT}): "
            + ("influence is replayed step by step, but self-influence and label_issue take the checkpoint walk, "
               "which is not validated there" if replayed else
               "the checkpoint walk is not validated there (record the batch order, rec.step(batch_ids=...), and "
               "diffin replays the steps)")
            + " (measured Spearman vs leave-one-out 0.90-0.95 at 0.12, 0.10-0.69 at 0.46-0.47; docs/recipes.md "
            "\"The recipe table\")")
    if isinstance(approx, list) and line not in approx:
        approx.append(line)
    warnings.warn(RecipeWarning(line), stacklevel=4)


def plan_step(ctx, i: int, carry, view_fn: ViewFn | None = None):
    """Step i of build_plan (checkpoint k = m-1-i): (PlanItem or None, carry for step i+1).
    One checkpoint's Lanczos view and vectors; runner saves each step's item and carry, so a
    killed job resumes at the next checkpoint. Where the model's batch gradients round the same at
    any thread count (FunctionalModel.threads_round false: the sample CNN), the whole step runs
    single-threaded (functional.single_threaded), so the plan is the same bits on any machine load."""
    with single_threaded(not ctx.fm.threads_round(min(int(ctx.hessian_rows), int(ctx.n)))):
        return _plan_step(ctx, i, carry, view_fn)


def _plan_step(ctx, i: int, carry, view_fn: ViewFn | None = None):
    u, v, *replay = carry
    k = ctx.m - 1 - i
    lo, hi = int(ctx.bounds[k]), int(ctx.bounds[k + 1])
    if hi <= lo:
        return None, carry
    rows = check = None
    if replay:
        if ctx.recipe.adam:
            from diffin_core.engine.adam_batches import segment
        else:
            from diffin_core.engine.sgd_batches import segment
        rows, state, check = segment(ctx, k, replay[0])
        replay = [state]
    S = preconditioner_scale(ctx, k)
    starts = [u if S is None else u * S] + ([] if v is None else [v if S is None else v * safe_inverse(S)])
    if not any(bool(torch.any(s != 0)) for s in starts):
        starts = [random_start(ctx, k)]
    if view_fn is not None:
        view = view_fn(k, starts)
    else:
        batch = ctx.sample_batch(ctx.hessian_rows, k)
        view, _ = hessian_view(ctx, k, starts, batch, g0=lambda: base_grad(ctx, k, batch))   # only if fd
        from diffin_core.engine.hvp import _log          # the products this view took (meta.json hvp.view_products)
        _log(ctx).append({"checkpoint": int(k), "where": "view", "products": int(view.values.numel())})
    op = segment_op(ctx, k, view, lo, hi)
    if not ctx.recipe.adam and (rows is None or ctx.moments is not None):
        note_sharpness(ctx, k, view, lo, hi, replayed=rows is not None)
    w, u, v = op.rows(u, v)
    if not (torch.isfinite(w).all() and torch.isfinite(u).all()):
        raise DiffinError(f"non-finite query propagation at {ctx.label(k)}: refusing to write NaN scores")
    return PlanItem(k, 1.0 / ctx.n, w, op, rows, check), (u, v, *replay)
