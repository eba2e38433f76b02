"""SGD with the recorded batch order: the per-step adjoint over the replayed trajectory.

diffin takes this path for SGD when the manifest records the batch order (``rec.step(batch_ids=...)``
or ``rec.track(loader)``) and, with momentum, SGD's momentum buffer beside every checkpoint after
step 0 (the Recorder saves it). Two things the checkpoint walk (propagate.py) cannot model are
then exact:
- large steps. The walk takes every step's Hessian at its owning checkpoint's weights, which is
  wrong once lr x curvature is large (measured: Spearman 0.43-0.69 against leave-one-out at lr x
  lambda_max 0.3-0.47, a head at lr 0.5). Here the weights between checkpoints are rebuilt by
  torch's own SGD update, and each step's Hessian and gradients are taken at the replayed weights.
- z's membership. z enters exactly the steps whose batches held it (not g_z / N at every step).
- clipping. A clipped step's update uses c g / |g|: removing z changes it by f (I - g^ g^T) dg, not
  f dg (the walk holds the factor fixed: measured Spearman 0.50 with every step clipped). Beyond
  that linear part, z's removal through each clipped gradient is taken exactly,
  <w, clip(g - g_z / |B|) - clip(g)> (adam_batches.clip_removal: the clip keeps the norm, so it
  shortens the step whichever way g_z turns it, and steps near the max norm switch; linear alone
  the sizes were 0.65-0.77x true leave-one-out on two clipped digits runs, now 0.98-0.99x).

The replay (SGDReplay, on adam_batches' machinery): from checkpoint k's weights and momentum
buffer, torch's SGD update (per-group lrs, coupled weight decay added after clipping, momentum /
dampening / nesterov, a momentum schedule, the recorded clip factors; the first step's buffer is
its gradient) with each step's recorded batch gives theta_s and G_s up to the next checkpoint,
where the replay is anchored again to the recorded state. Its self-check compares the replayed
weights and buffer with the next checkpoint's (meta.json "sgd_check", Score page, the same
tolerance as Adam's); a failed check (dropout without recorded generator states, train-mode
BatchNorm, an unrecorded loss or clipping) falls back, in one line, to what ran before the replay:
the walk, or for clipped runs and recorded dropout masks this per-step path with the weights on
the line between the two checkpoints around each step. Recorded dropout masks (engine/dropout.py)
are redrawn for every step's gradients, HVPs and jvps, in the replay as in the adjoint.

Per step s (lr eta_s, per coordinate with per-group lrs; f_s the clip factor; P_s = I - g^ g^T
when f_s < 1, else I; torch's SGD order):
    dg  = f_s P_s (H dtheta - r_s) + lambda dtheta          r_s = g_z / |B_s| for z in B_s
(with class weights the step's loss is torch's sum_j w_j l_j / W_B, so r_s = w_z g_z / W_B:
adam_batches.step_loss scales every quantity of the step)
    dmu' = beta dmu + c_s dg           dtheta' = dtheta - eta (alpha dg + gamma dmu')
The adjoint (ut, um) starts at (g_Q(theta_T), 0) and goes back step by step:
    am = um - gamma eta ut      w = c_s am - alpha eta ut      wm = f_s P_s w
    ut <- ut + H wm + lambda w       um <- beta am
    influence(z) -= <wm, g_z> / |B_s|  for z in B_s                        (nats; > 0 helpful)
(on a clipped run, instead influence(z) += <w, clip(g - g_z / |B_s|) - clip(g)>: clip_removal)
H: under --hvp auto, the first product of each interval is made both ways and the interval keeps
finite differences when they agree within 1%, else exact products (hvp.py). Cost per query: per
training step two batch gradients (the replay to the block starts and the block's recompute),
one HVP and one jvp on its batch; once per context, the check's batch gradient per step.
"""
from __future__ import annotations

import torch

from diffin_core.engine.adam_batches import (CLIP_MATCH_TOL, _Replay, _clip, _clip_adjoint, _coupled, _lr, clip_removal,
                                             interval, step_loss)
from diffin_core.engine.dropout import applied, flag
from diffin_core.engine.functional import no_tf32
from diffin_core.errors import DiffinError


def applies(ctx) -> bool:
    """SGD (not Adam) with a recorded batch order: the weights replayed (ctx.moments: the
    momentum buffers are recorded), or at least one clipped step, or recorded dropout masks
    (engine/dropout.py: each step's train-mode network; weights on the line without the replay)."""
    clip = getattr(ctx, "clip", None)
    return (not ctx.recipe.adam and getattr(ctx, "batch_order", None) is not None
            and (ctx.moments is not None or (clip is not None and bool((clip < 1).any()))
                 or getattr(ctx, "rng", None) is not None))


def start(u: torch.Tensor):
    """The adjoint (ut, um) at the final weights, float64 (float32 on MPS)."""
    ut = u.detach().to(torch.float32 if u.device.type == "mps" else torch.float64)
    return ut.clone(), torch.zeros_like(ut)


def constants(recipe):
    """(beta, c, alpha, gamma) of torch's SGD (as propagate.step_constants)."""
    if recipe.momentum > 0:
        beta = recipe.momentum
        return (beta, 1.0 - recipe.dampening) + ((1.0, beta) if recipe.nesterov else (0.0, 1.0))
    return 0.0, 1.0, 0.0, 1.0


def _momentum(ctx, s: int, beta: float) -> float:
    """Step s's momentum: the recorded schedule's (OneCycleLR's cycle_momentum), else beta."""
    momenta = getattr(ctx, "momenta", None)
    return float(momenta[s]) if momenta is not None and beta > 0 else beta


class SGDReplay(_Replay):
    """SGD's forward replay of one interval [a, b) from checkpoint k: states (theta, buffer)
    before a step, in the accumulation dtype (buffer None before torch's first step).

    ``held``: the weights of step s on the line between the interval's two recorded checkpoints
    (the path for clipped runs whose weights cannot be replayed: no momentum buffers recorded, or
    a failed check), with no check; before the first checkpoint (a recording that began late),
    the first checkpoint's weights."""
    name = "SGD"
    keys = ("theta", "buf")
    what = {"theta": "weight vector", "buf": "momentum buffer"}

    @staticmethod
    def fallback(ctx) -> str:
        return fallback_text(ctx)

    @staticmethod
    def fall_back(ctx) -> str:
        return fall_back(ctx)

    def __init__(self, ctx, k: int, held: bool):
        self.ctx, self.k, self.held = ctx, k, held
        self.a, self.b = interval(ctx, k)
        self.beta, self.c, self.alpha, self.gamma = constants(ctx.recipe)
        moments = ctx.moments
        self.acc = torch.float32 if ctx.thetas[k].device.type == "mps" else torch.float64
        theta = ctx.thetas[k].to(self.acc)
        t_k = int(ctx.steps[k])
        self.late = k == 0 and t_k > 0                # no weights before the first checkpoint
        buf = None
        if moments is None:
            self.held = True
        elif self.beta > 0 and t_k > 0 and not self.late:
            rec = moments[k][0]
            buf = None if rec is None else rec.clone()
        self.entry = (theta, buf)

    def theta_at(self, s: int, theta: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(checkpoint whose buffers apply, theta used at step s)."""
        ctx, k = self.ctx, self.k
        if self.late and s < int(ctx.steps[0]):
            return 0, ctx.thetas[0].to(self.acc)
        if not self.held:
            return k, theta
        t0 = int(ctx.steps[k])
        if k + 1 >= ctx.m or s <= t0:
            return k, ctx.thetas[k].to(self.acc)
        span = int(ctx.steps[k + 1]) - t0
        a, b = ctx.thetas[k].to(self.acc), ctx.thetas[k + 1].to(self.acc)
        return k, a + ((s - t0) / span) * (b - a)

    def advance(self, state, s: int, g: torch.Tensor):
        """The state before step s + 1: torch's SGD step with gradient ``g`` (at theta_at(s))."""
        ctx = self.ctx
        theta, buf = state
        _j, th = self.theta_at(s, theta)
        d = _clip(ctx, s) * g.to(self.acc) + _coupled(ctx, th) * th
        if self.beta > 0:
            bs = _momentum(ctx, s, self.beta)
            buf = d.clone() if buf is None else bs * buf + self.c * d
            d = d + bs * buf if ctx.recipe.nesterov else buf
        if self.late and s < int(ctx.steps[0]):     # before the first checkpoint: held at its weights,
            if s + 1 < int(ctx.steps[0]) or ctx.moments is None:    # then replayed from its recorded state
                return theta, None
            rec = ctx.moments[0][0] if self.beta > 0 else None
            return ctx.thetas[0].to(self.acc), (None if rec is None else rec.clone())
        return theta - _lr(ctx, s, theta) * d, buf

    def check(self, end) -> dict | None:
        """The replay's miss at the next checkpoint: weights (of the interval's movement) and
        momentum buffer (relative), or None (no next checkpoint, or the weights are held)."""
        ctx, k = self.ctx, self.k
        if self.held or k + 1 >= ctx.m or self.b <= self.a or int(ctx.steps[k + 1]) != self.b:
            return None
        theta, buf = end
        rec_theta = ctx.thetas[k + 1].to(self.acc)

        def rel(a, b, scale):
            return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(scale).clamp_min(1e-300))
        out = {"theta": rel(theta, rec_theta, rec_theta - ctx.thetas[k].to(self.acc))}
        rec_buf = ctx.moments[k + 1][0]
        if self.beta > 0 and rec_buf is not None and buf is not None:
            out["buf"] = rel(buf, rec_buf, rec_buf)
        return out


def fallback_text(ctx) -> str:
    clip = getattr(ctx, "clip", None)
    if clip is not None and bool((clip < 1).any()) or getattr(ctx, "rng", None) is not None:
        return "the weights on the line between checkpoints (the per-step path of clipping and dropout masks)"
    return "the checkpoint walk (each step at its checkpoint's weights, each sample spread over every step)"


def fall_back(ctx) -> str:
    """After a failed self-check: clipped runs keep the per-step path with the weights on the
    line between checkpoints (ctx.moments = None), others take the checkpoint walk
    (ctx.batch_order = None). Returns the fallback's name for the check's record."""
    clip = getattr(ctx, "clip", None)
    ctx.moments = None
    if clip is not None and bool((clip < 1).any()) or getattr(ctx, "rng", None) is not None:
        return "line"
    ctx.batch_order = None
    return "checkpoint walk"


CLIP_MISMATCH_LINE = "gradient clipping's removal linearised on"


def note_clip_mismatch(ctx) -> None:
    """One approximation line (RecipeWarning, and the recipe's approximations for meta.json), once
    per run, when steps of a clipped run were left linearised because the replay's gradient norm did
    not reproduce the recorded clip factor (adam_batches.clip_removal)."""
    n = int(ctx.clip_stats.get("mismatched", 0)) if getattr(ctx, "clip_stats", None) else 0
    approx = getattr(ctx.recipe, "approximations", None)
    if not n or ctx.clip_stats.get("noted") or (isinstance(approx, list)
                                                 and any(a.startswith(CLIP_MISMATCH_LINE) for a in approx)):
        return
    ctx.clip_stats["noted"] = True
    import warnings
    from diffin_core.engine.recipe import RecipeWarning
    line = (f"{CLIP_MISMATCH_LINE} {n} steps whose replayed gradient norm did not give the recorded clip factor "
            f"(within {CLIP_MATCH_TOL:g}; was the clip over other parameters?): their removal through the clip linearised "
            "(measured on the clipped digits runs: sizes 0.65-1.15x true leave-one-out linearised, 0.98-1.00x exact; "
            "docs/recipes.md#clipping)")
    if isinstance(approx, list):
        approx.append(line)
    warnings.warn(RecipeWarning(line), stacklevel=4)


def segment(ctx, k: int, carry):
    """Checkpoint k's interval, latest step first: (influence (N,) float64 on the CPU from the
    samples of its batches, the adjoint carried to the interval's start, the check's record)."""
    from diffin_core.engine.hvp import product
    ut, um = carry
    rows_out = torch.zeros(ctx.n, dtype=torch.float64)
    rep = SGDReplay(ctx, k, held=False)
    record = ctx.adam_checks.get(k) if not rep.held else None
    if rep.b <= rep.a:
        return rows_out, carry, record
    beta, c, alpha, gamma = rep.beta, rep.c, rep.alpha, rep.gamma
    dt = ctx.thetas[k].dtype
    hvp_state: dict = {}
    for s, rows, x, y, j, theta, g, _buf, masks in rep.latest_first():
        fm = ctx.fm_at(j)
        eta, f = _lr(ctx, s, ut), _clip(ctx, s)
        lam = _coupled(ctx, ut)
        cs = 1.0 if (s == 0 and beta > 0) else c
        bs = _momentum(ctx, s, beta)
        gs = bs if (ctx.recipe.nesterov and beta > 0) else gamma
        am = um - gs * eta * ut
        w = cs * am - alpha * eta * ut
        wm, th = _clip_adjoint(w, g, f, ctx).to(dt), theta.to(dt)
        with no_tf32(), applied(masks), step_loss(ctx, rows):
            dz = fm.directional(th, x, y, wm)
            hw = product(ctx, k, fm, th, x, y, g, "sgd", hvp_state)(wm)
            exact = clip_removal(ctx, s, fm, th, x, y, g, w, dz, rep.held, masks)   # clipping's higher orders
        dz = dz.cpu().to(torch.float64)
        rows_out.index_add_(0, torch.as_tensor(rows), -dz / len(rows) if exact is None else exact)
        ut = ut + hw.to(ut.dtype) + lam * w
        um = bs * am
    flag(ctx)
    note_clip_mismatch(ctx)
    if not (torch.isfinite(ut).all() and torch.isfinite(rows_out).all()):
        raise DiffinError(f"non-finite SGD replay at {ctx.label(k)}: refusing to write NaN scores")
    return rows_out, (ut, um), record
