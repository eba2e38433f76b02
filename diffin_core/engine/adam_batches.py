"""Adam/AdamW with the recorded batch order: the per-step adjoint of Adam's whole state.

diffin takes this path when the manifest records the batch order and every checkpoint's
exp_avg and exp_avg_sq (the Recorder with ``rec.step(batch_ids=...)``). Removing z changes the
gradient of each step s whose batch B_s held z by -r_s, r_s = g_z / |B_s|. Linearised in Adam's
state (theta, m, v); m_s, v_s are the moments after step s's update, t = Adam's count at s,
c1 = 1 - b1^t, c2 = 1 - b2^t, D = 1 / (sqrt(v_s / c2) + eps), rho = 1 - lr lambda (AdamW):
    dg  = H dtheta (+ lambda dtheta, Adam's coupled decay) - r_s
    dm' = b1 dm + (1 - b1) dg            dv' = b2 dv + 2 (1 - b2) G_s * dg     (G_s: B_s's gradient)
    dtheta' = rho dtheta - lr / c1 D dm' + lr Gamma dv',   Gamma = (m_s / c1) D^2 / (2 sqrt(v_s / c2) c2)
Per-group lr and weight decay (ctx.groups) make lr and lambda per-coordinate vectors; gradient
clipping (ctx.clip, the recorded factor f of each step) makes the step's gradient f G_s, whose
adjoint is f (w - [f < 1] g^ <g^, w>), g^ = G_s / ||G_s|| (a clipped step's norm is fixed).
The adjoint (ut, um, uv) starts at (g_Q(theta_T), 0, 0) and goes back step by step:
    am = um - lr / c1 D ut      av = uv + lr Gamma ut      w_s = (1 - b1) am + 2 (1 - b2) G_s * av
    ut <- rho ut + H w_s (+ lambda w_s)      um <- b1 am      uv <- b2 av
    influence(z) = -sum_{s: z in B_s} <w_s, g_z> / |B_s|      (nats; > 0 helpful)
That is the linear response. Removal is not linear in Adam's own step: v holds z's own square
(g_z / |B_s|)^2 and 1 / sqrt(v) is far from linear where that is a sizeable part of v, so each
term above is replaced by z's exact removal from step s's m, v and update, carried on linearly by
the same adjoint (own_removal; OWN_TERM). On the AdamW rows of benchmarks/recipes.py (16 runs) that
moved sizes from 0.73-0.94x to 0.82-0.98x true leave-one-out (label smoothing: 0.74 / 0.73x ->
0.84 / 0.82x) and Spearman from 0.974-0.993 to 0.978-0.998, matching its float64 reference
(benchmarks/removal_nonlinearity.py --own); it costs 2.1x the linear replay's CPU there.

Where theta_s, m_s, v_s come from (the replay). Training is replayed forward from every recorded
checkpoint to the next one: from checkpoint j's (theta, exp_avg, exp_avg_sq), torch's own Adam
update with each step's recorded batch and lr gives theta_s, G_s, m_s and v_s of every step up to
the next checkpoint, where the replay is anchored again to the recorded state. H, G_s and g_z of
step s are then taken at the replayed theta_s (the model bound to checkpoint j's buffers).

The self-check, computed from recorded data alone before the plan (decide): at the end of each
interval the replayed theta, m and v are compared with the recorded ones,
    theta: ||theta_rep - theta_rec|| / ||theta_rec - theta_j||      (of the interval's movement)
    m, v:  ||m_rep - m_rec|| / ||m_rec||                             (relative)
and every interval must land within ``CHECK_TOL``. Measured (digits MLP 64-32-10, AdamW, one
checkpoint per epoch = 38 steps, a float64 run replayed in float32): misses of 1e-7 .. 2e-5, and
Spearman 0.983 / 0.989 (fd / exact HVPs) against true leave-one-out, where each step taken at its
owning checkpoint's weights (the previous path; its first moment misses the recorded one by 87%)
scored 0.786 (benchmarks/recipes.py, "adamw-one-group": 0.993 / 0.982 on seeds 0 / 1). A run the replay cannot follow (Dropout 0.2 recorded without the generator states: misses of 15-59%;
with them the masks are redrawn, engine/dropout.py, and the misses are 1e-7; also
train-mode BatchNorm, an unrecorded loss or clipping) fails the check, and diffin then scores
with the checkpoint estimator (propagate.py: v frozen, each sample spread over every step), which
measured better there (Spearman 0.74 vs 0.28), and says so in one RecipeWarning line; the check
is recorded in meta.json ("adam_check") and shown on the Score page.

Cost: the check, once per context (a query on a finished run adopts the run's: adopt_check), one
batch gradient per training step; per query, per step one batch gradient and one dropout-mask
draw (the replay; two where an interval's records exceed a quarter of the memory budget: the
replay to the block starts and the block's recompute), and one fused reverse-over-reverse pass
giving both the HVP (exact by default, hvp.py) and the per-sample jvps of its batch. Memory: the
whole interval's (theta, m, v, G, masks) when they fit that share, else the state at about
sqrt(L) block starts of an L-step interval and one block's records at a time. A query's top-k
(influence alone) needs nothing else: methods/diffin.replay_step skips the Lanczos views.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from diffin_core.errors import DiffinError
from diffin_core.engine.dropout import applied, flag, step_masks
from diffin_core.engine.functional import no_tf32
from diffin_core.engine.hvp import product

CHECK_TOL = 0.05            # an interval's replay passes when theta, m and v all land within 5%


def start(u: torch.Tensor):
    """The adjoint (ut, um, uv) at the final weights, float64 (float32 on MPS)."""
    ut = u.detach().to(torch.float32 if u.device.type == "mps" else torch.float64)
    return ut.clone(), torch.zeros_like(ut), torch.zeros_like(ut)


def _owner(ctx, s: int) -> int:
    return int(min(max(np.searchsorted(ctx.bounds, s, side="right") - 1, 0), ctx.m - 1))


def _offset(ctx) -> int:
    """Adam updates taken before the recording's step 0 (from the first checkpoint's count)."""
    _m, _v, count = ctx.moments[0]
    return max(int(count) - max(int(ctx.steps[0]), 1), 0)


def interval(ctx, k: int) -> tuple[int, int]:
    """Steps [a, b) replayed from checkpoint k: from its step to the next checkpoint's (the first
    checkpoint's interval also holds any steps before it)."""
    a = 0 if k == 0 else int(ctx.steps[k])
    b = int(ctx.steps[k + 1]) if k + 1 < ctx.m else int(ctx.bounds[-1])
    return a, max(a, b)


def _coupled(ctx, like: torch.Tensor | None = None):
    """Adam's coupled weight decay: a scalar, or (P,) per coordinate with per-group hyper-parameters."""
    if ctx.recipe.decoupled:
        return 0.0
    groups = getattr(ctx, "groups", None)
    if groups is not None:
        return groups.decay_vector(None if like is None else like.device, None if like is None else like.dtype)
    return ctx.recipe.weight_decay


def _decoupled(ctx, like: torch.Tensor):
    """AdamW's decoupled weight decay lambda: a scalar, or (P,) per coordinate (per-group)."""
    if not ctx.recipe.decoupled:
        return 0.0
    groups = getattr(ctx, "groups", None)
    return groups.decay_vector(like.device, like.dtype) if groups is not None else ctx.recipe.weight_decay


def _lr(ctx, s: int, like: torch.Tensor):
    """Step s's lr: the scalar, or (P,) per coordinate with per-group lrs (0 where frozen)."""
    groups = getattr(ctx, "groups", None)
    return groups.step_lr_vector(s, like.device, like.dtype) if groups is not None else float(ctx.step_lrs[s])


def _clip(ctx, s: int) -> float:
    """Gradient clipping's recorded factor of step s (1 without clipping): the step uses f g_s."""
    clip = getattr(ctx, "clip", None)
    return 1.0 if clip is None else float(clip[s])


def _clip_adjoint(w: torch.Tensor, g: torch.Tensor, f: float, ctx=None) -> torch.Tensor:
    """The adjoint of clipping's map g -> f(g) g at a step: f w, and when the step was clipped
    (f < 1: f g has norm max_norm whatever g's norm) minus its component along g^ = g / ||g||,
    f (w - g^ <g^, w>) (the norm's dependence on z); g over the coordinates the clip's norm saw
    (``ctx``: _clip_norm_mask)."""
    if f >= 1.0:
        return w
    g = g.to(w.dtype)
    mask = None if ctx is None else _clip_norm_mask(ctx)
    if mask is not None:
        g = g * mask.to(g.dtype)
    gh = g / torch.linalg.vector_norm(g).clamp_min(1e-300)
    return f * (w - gh * torch.dot(gh, w))


CLIP_MATCH_TOL = 1e-3       # the replay's own clip factor must reproduce the recorded one this closely (relative)
CLIP_ROWS_BYTES = 256 << 20  # per-sample gradients of a step's batch are taken in slices of at most this size


def _clip_norm_mask(ctx):
    """(P,) 1 on the coordinates clip_grad_norm_ saw (0 on parameters of a group frozen by
    requires_grad False: torch skips their missing gradients), or None when that is every one."""
    cache = ctx.clip_stats
    if "mask" not in cache:
        fm = ctx.fm
        frozen = {n for grp in (getattr(ctx.recipe, "groups", None) or []) if grp.frozen for n in grp.params}
        cache["mask"] = None
        if frozen & set(fm.names):
            parts = [torch.full((size,), 0.0 if n in frozen else 1.0, dtype=torch.float64)
                     for n, size in zip(fm.names, fm.sizes)]
            cache["mask"] = torch.cat(parts).to(ctx.thetas[0].device)
    return cache["mask"]


def _clip_stats(ctx, s: int, fm, th, x, y, g, held: bool, masks):
    """Step s's query-independent clipping record, once per context: (||g||, <g, g_i> (B,),
    ||g_i||^2 (B,)) in float64 on the CPU (g the replayed batch gradient, g_i the per-sample
    gradients of its batch, over the coordinates clip_grad_norm_ saw), or None where the replay's
    own factor min(1, max_norm / (||g|| + 1e-6)) does not reproduce the recorded one within
    CLIP_MATCH_TOL (a clip over other parameters or another norm: the step stays linearised)."""
    key = (int(s), bool(held))
    cache = ctx.clip_stats
    if key in cache:
        return cache[key]
    mask = _clip_norm_mask(ctx)
    g64 = g.to(torch.float64)
    if mask is not None:
        g64 = g64 * mask
    gn = float(torch.linalg.vector_norm(g64))
    f_rec, f_rep = _clip(ctx, s), min(1.0, float(ctx.clip_max_norm) / (gn + 1e-6))
    if abs(f_rep - f_rec) > CLIP_MATCH_TOL * f_rec:
        cache[key] = None
        cache["mismatched"] = cache.get("mismatched", 0) + 1
        return None
    n = len(y)
    step = max(1, min(n, CLIP_ROWS_BYTES // max(1, 8 * int(g.numel()))))
    gg, nn = [], []
    for a in range(0, n, step):
        b = min(n, a + step)
        with (masks.rows(masks.window[0] + a, masks.window[0] + b) if masks is not None
              else contextlib.nullcontext()):
            rows = fm.per_sample_grads(th, x[a:b], y[a:b]).to(torch.float64)
        if mask is not None:
            rows = rows * mask
        gg.append((rows @ g64).cpu())
        nn.append(rows.pow(2).sum(1).cpu())
        del rows
    cache[key] = (gn, torch.cat(gg), torch.cat(nn))
    return cache[key]


def clip_removal(ctx, s: int, fm, th, x, y, g, w: torch.Tensor, dz: torch.Tensor, held: bool = False,
                 masks=None) -> torch.Tensor | None:
    """The removal of each sample of step s's batch through the step's clipped gradient, exactly:
    (B,) float64 on the CPU, <w, clip(g - g_i / B) - clip(g)>, clip(v) = min(1, C / (||v|| + 1e-6)) v
    (torch's clip_grad_norm_, max norm C, 2-norm), where w is the adjoint of the step's clipped
    gradient and ``dz`` the per-sample <g_i, f P w> the linearised step already took (f the recorded
    factor, P = I - g^ g^T on a clipped step, else I). The linearisation, -<g_i, f P w> / B, drops
    the clip's second and higher orders in g_i / B: with every step clipped they add about
    (f / ||g||) (-<g^, r> <w, P r> - |P r|^2 <w, g^> / 2), r = g_i / B, whose sign does not follow
    the sample (the norm kept fixed shortens the step along g^ whichever way r turns it), and a
    step near the max norm changes between clipped and not (measured: linear responses 0.65-0.77x
    true leave-one-out on the clipped digits runs, this 0.98-1.00x; docs/recipes.md#clipping).
    None when the step is not modelled this way (no max norm recorded, or the replay's norm does
    not reproduce the recorded factor): the caller keeps -dz / B."""
    if getattr(ctx, "clip_max_norm", None) is None or getattr(ctx, "clip", None) is None:
        return None
    st = _clip_stats(ctx, s, fm, th, x, y, g, held, masks)
    if st is None:
        return None
    gn, gg, nn = st
    n, C, f = len(y), float(ctx.clip_max_norm), _clip(ctx, s)
    mask = _clip_norm_mask(ctx)
    g64 = g.to(torch.float64)
    wg = float(w.to(torch.float64) @ (g64 if mask is None else g64 * mask))    # <w, g> (g over the norm's coordinates)
    wgn = wg / max(gn, 1e-300)                                                 # <w, g^>
    dz = dz.cpu().to(torch.float64)
    w_gi = dz / f + wgn * gg / max(gn, 1e-300) if f < 1.0 else dz          # <w, g_i>
    f0 = min(1.0, C / (gn + 1e-6))
    after = (gn * gn - 2.0 * gg / n + nn / (n * n)).clamp_min(0).sqrt()    # ||g - g_i / B||
    f1 = torch.clamp(C / (after + 1e-6), max=1.0)
    return f1 * (wg - w_gi / n) - f0 * wg


OWN_TERM = True             # each sample's own term of m and v removed exactly at its steps (own_removal)


def own_removal(ctx, s: int, fm, th, x, y, g, gd, m, v, lr, c1: float, c2: float, masks=None):
    """The removal of each sample of step s's batch from the step's own Adam update, exactly
    (query-independent parts, in slices of the batch): yields (lo, hi, DM, DV, NL), each (b, P)
    float64, such that sample i's contribution to influence is
        <am, DM_i> + <av, DV_i> + <ut, NL_i>
    with (ut, am, av) the step's adjoints (segment's). Removing z changes step s's gradient gd by
    delta = -f P g_z / |B_s| (f the recorded clip factor, P clipping's projection on a clipped step),
    so the step's moments by DM = (1 - b1) delta and DV = (1 - b2) ((gd + delta)^2 - gd^2) =
    (1 - b2) delta (2 gd + delta) (the linearisation drops delta^2), and its update
    u = -lr / c1 m / (sqrt(v / c2) + eps) by exactly u(m + DM, v + DV) - u(m, v); NL is that change
    minus its linear part (-lr / c1 D DM + lr Gamma DV, which the adjoint already carries). Then the
    step's changed state (theta, m, v) goes on linearly (the adjoint). With delta linear this is
    -<w, g_z> / |B_s|, the linear response.
    Why: Adam's v holds the sample's own square, (g_z / B)^2, which removal takes away whatever the
    batch's other samples do; the linear response keeps only 2 gd delta. Where the batch gradient is
    small but the per-sample ones are not (label smoothing keeps them from vanishing; a rarely
    active input) that square is a sizeable part of v, and 1 / sqrt(v) is far from linear in it.
    Measured (float64, the digits AdamW + label smoothing 0.1 run of benchmarks/recipes.py, 45
    samples): the linear response is 0.743 / 0.726x true leave-one-out, this 0.842 / 0.822x with
    Spearman 0.994 / 0.998 (benchmarks/removal_nonlinearity.py --own). Where it does not help: the
    first Adam step (t = 1, v / c2 = g^2: the update is nearly sign(g), and one sample can hold a
    coordinate's whole v), whose samples stay off either way (a 12-step run: relative error 0.73
    against the linear response's 0.64 on them, 0.16 against 0.59 on the others).
    Cost: the batch's per-sample gradients at every step (one vmap pass) and about 20 elementwise
    (b, P) float64 passes plus three (b, P) products per query direction (2.1x the linear replay's
    CPU on the digits label-smoothing run: 3.13 vs 1.49 s, load 13)."""
    b1, b2 = ctx.recipe.betas
    eps = ctx.recipe.eps
    f = _clip(ctx, s)
    acc = torch.float64 if th.device.type != "mps" else torch.float32
    gd, m, v = gd.to(acc), m.to(acc), v.to(acc)
    lrv = lr.to(acc) if isinstance(lr, torch.Tensor) else float(lr)
    gh = None
    if f < 1.0:
        gm = g.to(acc)
        mask = _clip_norm_mask(ctx)
        if mask is not None:
            gm = gm * mask.to(acc)
        gh = gm / torch.linalg.vector_norm(gm).clamp_min(1e-300)
    sq0 = (v / c2).clamp_min(0).sqrt()
    D0 = 1.0 / (sq0 + eps)
    gam = torch.where(sq0 > 0, (m / c1) * D0 * D0 / (2 * sq0.clamp_min(1e-300) * c2), torch.zeros_like(sq0))
    n = len(y)
    P = int(gd.numel())
    step = max(1, min(n, CLIP_ROWS_BYTES // max(1, 8 * 6 * P)))
    for a in range(0, n, step):
        b = min(n, a + step)
        with (masks.rows(masks.window[0] + a, masks.window[0] + b) if masks is not None
              else contextlib.nullcontext()):
            rows = fm.per_sample_grads(th, x[a:b], y[a:b]).to(acc)
        delta = rows.mul_(-f / n)                                   # -f g_i / B
        if gh is not None:                                          # clipping's projection
            delta.addr_(delta @ gh, gh, alpha=-1.0)
        DM = (1 - b1) * delta
        DV = (1 - b2) * delta * (2 * gd + delta)
        sq1 = ((v + DV) / c2).clamp_min(0).sqrt()
        D1 = 1.0 / (sq1 + eps)
        den = sq0 + sq1
        # u(m + DM, v + DV) - u(m, v) = -lr / c1 [DM D1 - m D0 D1 DV / (c2 (sq0 + sq1))]
        cross = torch.where(den > 0, D0 * D1 / (c2 * den.clamp_min(1e-300)), torch.zeros_like(den))
        exact = -(lrv / c1) * (DM * D1 - m * cross * DV)
        NL = exact.sub_(-(lrv / c1) * D0 * DM + lrv * gam * DV)
        yield a, b, DM, DV, NL
        del rows, delta, DM, DV, NL, sq1, D1, den, cross, exact


def _batch(ctx, s: int):
    rows = ctx.batch_order.batch(s)
    x, y = ctx.tensors(np.asarray(ctx.train.x[rows], dtype=np.float32), np.asarray(ctx.train.y)[rows])
    return rows, x, y


def _grad(ctx, k: int, theta: torch.Tensor, x, y) -> torch.Tensor:
    """The batch gradient at ``theta`` (the model bound to checkpoint k's buffers), model dtype."""
    with no_tf32():
        return ctx.fm_at(k).batch_grad(theta.to(ctx.thetas[k].dtype), x, y)


def _unequal(ctx) -> bool:
    """unequal_class_weights(ctx), once per context."""
    key = "_unequal_class_weights"
    if key not in ctx.__dict__:
        ctx.__dict__[key] = unequal_class_weights(ctx)
    return ctx.__dict__[key]


@contextlib.contextmanager
def step_loss(ctx, rows):
    """Inside: the per-sample loss of step s's batch (rows) scaled so that its batch mean is torch's
    weighted mean over that batch, sum_j w_j l_j / W_B with W_B = sum_{j in B_s} w_j (class weights,
    0 for ignore_index), not the training set's mean weight (LossSpec.scale = 1 / mean w, the walk's
    model): LossSpec.scale = |B_s| / W_B for the batch gradient, HVPs, per-sample terms and clip
    statistics alike. Removal keeps the batch's denominator, as the unweighted replay keeps |B_s|:
    z's term at a step holding it is -(w_z / W_B) g_z. Nothing changes where every training sample
    weighs the same (the same bits)."""
    if not _unequal(ctx):
        yield
        return
    spec = ctx.fm.loss                                   # shared by fm_at's and the replicas' copies
    w = spec.class_weights(np.asarray(ctx.train.y)[np.asarray(rows)])
    total = float(w.sum())
    old = spec.scale
    spec.scale = len(w) / total if total > 0 else 0.0   # a batch of ignored rows only: no gradient
    try:
        yield
    finally:
        spec.scale = old


class _Replay:
    """Adam's forward replay of one interval [a, b) from checkpoint k (see the module doc).

    ``held``: every step at the recorded weights of the checkpoint that owns it (only before the
    first checkpoint, where no weights are recorded); else theta is replayed with torch's Adam update. States are (theta, m, v) before a step, in
    the accumulation dtype. (sgd_batches.SGDReplay: the same for SGD, states (theta, buffer).)"""
    name = "Adam"
    keys = ("theta", "m", "v")                  # what the self-check compares at the next checkpoint
    what = {"theta": "weight vector", "m": "exp_avg", "v": "exp_avg_sq"}
    fallback = "the checkpoint estimator (Adam's v frozen per checkpoint, each sample spread over every step)"

    @staticmethod
    def fall_back(ctx) -> str:
        """After a failed self-check: the checkpoint estimator scores (no batch-order path)."""
        ctx.batch_order = None
        return "checkpoint estimator"

    def __init__(self, ctx, k: int, held: bool):
        self.ctx, self.k, self.held = ctx, k, held
        self.a, self.b = interval(ctx, k)
        self.offset = _offset(ctx)
        self.b1, self.b2 = ctx.recipe.betas
        acc = ctx.moments[0][0].dtype
        self.acc = acc
        theta = ctx.thetas[k].to(acc)
        t_k = int(ctx.steps[k])
        self.first_recorded = None             # the step-0 checkpoint holds the moments after step 0
        if k == 0 and t_k > 0:
            if self.offset:
                raise DiffinError(f"{ctx.label(0)}: Adam's moments before the first recorded checkpoint are "
                                  "unknown (the recording began after training did)")
            self.held = True                   # no weights before the first checkpoint: held there
            m = v = torch.zeros_like(theta)
        elif t_k == 0:
            m = v = torch.zeros_like(theta)
            self.first_recorded = 0            # (so a count offset needs no moments before step 0)
        else:
            m, v, _ = ctx.moments[k]
            m, v = m.clone(), v.clone()
        self.entry = (theta, m, v)

    def theta_at(self, s: int, theta: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(checkpoint whose buffers apply, theta used at step s)."""
        if self.held:
            j = _owner(self.ctx, s)
            return j, self.ctx.thetas[j].to(self.acc)
        return self.k, theta

    def advance(self, state, s: int, g: torch.Tensor):
        """The state before step s + 1 from the one before step s and step s's gradient ``g``
        (at theta_at(s)): torch's Adam/AdamW update (single group, no amsgrad)."""
        ctx = self.ctx
        theta, m, v = state
        _j, th = self.theta_at(s, theta)
        gd = _clip(ctx, s) * g.to(self.acc) + _coupled(ctx, th) * th
        if self.first_recorded is not None and s == self.first_recorded:
            m, v, _ = ctx.moments[self.k]
            m, v = m.clone(), v.clone()
        else:
            m = self.b1 * m + (1 - self.b1) * gd
            v = self.b2 * v + (1 - self.b2) * gd * gd
        if self.held:
            return theta, m, v
        lr, lam = _lr(ctx, s, theta), _decoupled(ctx, theta)
        t = s + 1 + self.offset
        c1, c2 = 1.0 - self.b1 ** t, 1.0 - self.b2 ** t
        theta = theta * (1.0 - lr * lam)
        theta = theta - (lr / c1) * m / ((v / c2).clamp_min(0).sqrt() + ctx.recipe.eps)
        return theta, m, v

    def run(self, lo: int, hi: int, state, keep: bool = False):
        """Replay steps [lo, hi) from ``state``; returns (state before hi, per-step records
        (s, rows, x, y, j, theta_s, G_s, *the state after step s but theta: Adam's m_s, v_s; SGD's
        buffer) when ``keep``)."""
        out = []
        for s in range(lo, hi):
            rows, x, y = _batch(self.ctx, s)
            j, th = self.theta_at(s, state[0])
            masks = step_masks(self.ctx, s, self.ctx.fm_at(j), th.to(self.ctx.thetas[j].dtype), x)
            with applied(masks), step_loss(self.ctx, rows):   # step s's dropout masks (dropout.py), its loss
                g = _grad(self.ctx, j, th, x, y)
            state = self.advance(state, s, g)
            if keep:
                out.append((s, rows, x, y, j, th, g, *state[1:], masks))
        return state, out

    def latest_first(self):
        """Every step of the interval as ``run(keep=True)`` records, latest first. When the whole
        interval's records fit a quarter of the run's memory budget (ctx.memory; measured on the
        first step's record: weights, moments, gradient, dropout masks) the interval is replayed
        once and its records handed out latest first, each dropped as it is handed out. Else the
        state at about sqrt(L) block starts of the L steps is kept and each block replayed again
        when its turn comes (memory: one block's records; about two replays of every step)."""
        lo, hi = self.a, self.b
        if hi <= lo:
            return
        budget = int(getattr(getattr(self.ctx, "memory", None), "budget", 0) or 0) // 4
        if budget > 0:
            state, steps = self.run(lo, lo + 1, self.entry, keep=True)
            if _record_bytes(steps[0]) * (hi - lo) <= budget:
                _end, rest = self.run(lo + 1, hi, state, keep=True)
                steps += rest
                del rest
                while steps:
                    yield steps.pop()
                return
            del steps, state
        block = max(1, int(math.ceil(math.sqrt(hi - lo))))
        entry: dict[int, tuple] = {}             # the state entering each block start in [lo, hi)
        state = self.entry
        for b in range(lo, hi, block):
            entry[b] = state
            if b + block < hi:
                state, _ = self.run(b, b + block, state)
        for b in sorted(entry, reverse=True):
            _end, steps = self.run(b, min(b + block, hi), entry[b], keep=True)
            yield from reversed(steps)

    def check(self, end) -> dict | None:
        """The replay's miss at the next checkpoint (module doc), or None (no next checkpoint)."""
        ctx, k = self.ctx, self.k
        if k + 1 >= ctx.m or self.b <= self.a or int(ctx.steps[k + 1]) != self.b:
            return None
        theta, m, v = end
        rec_theta = ctx.thetas[k + 1].to(self.acc)
        rm, rv, _ = ctx.moments[k + 1]

        def rel(a, b, scale):
            return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(scale).clamp_min(1e-300))
        out = {"m": rel(m, rm, rm), "v": rel(v, rv, rv)}
        if not self.held:
            out["theta"] = rel(theta, rec_theta, rec_theta - ctx.thetas[k].to(self.acc))
        return out


def _record_bytes(record) -> int:
    """Bytes a replayed step's record holds (its tensors and its dropout masks)."""
    total = 0
    for item in record:
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif hasattr(item, "parts"):                    # dropout.StepMasks
            for _n, calls in item.parts:
                for a, b in calls:
                    total += sum(t.numel() * t.element_size() for t in (a, b) if t is not None)
    return total


def _hvp_and_directional(ctx, k: int, fm, th, x, y, g, wm, state: dict):
    """(H wm, the step's per-sample <g_i, wm>) of the batch: one fused reverse-over-reverse pass
    (functional.hvp_directional) where the replay's products are exact (settings.hvp "exact", or
    "auto", which takes exact ones here: hvp.py), else the directional jvp and hvp.product apart.
    ``state``: the interval's HVP decision (hvp.product's); a model whose fused pass fails (an op
    without a double backward) goes the separate way, where product() records its fallback."""
    mode = getattr(ctx.settings, "hvp", "fd")
    if mode == "exact" or (mode == "auto" and state.get("fn", "exact") == "exact" and not state.get("apart")):
        try:
            hw, dz = fm.hvp_directional(th, x, y, wm)
        except (RuntimeError, NotImplementedError):
            state["apart"] = True
        else:
            if mode == "auto" and "fn" not in state:       # the log entry product() makes
                from diffin_core.engine.hvp import _log
                state["fn"] = "exact"
                _log(ctx).append({"checkpoint": int(k), "where": "adam", "used": "exact"})
            return hw, dz
    dz = fm.directional(th, x, y, wm)
    return product(ctx, k, fm, th, x, y, g, "adam", state)(wm), dz


def _passes(check: dict | None) -> bool:
    return check is None or all(v <= CHECK_TOL for v in check.values())


def replay_class(ctx):
    """The forward replay of the context's optimiser: ctx.replay (sgd_batches.SGDReplay for SGD,
    set by the scoring context), else Adam's (_Replay)."""
    return getattr(ctx, "replay", None) or _Replay


def interval_check(ctx, k: int) -> dict | None:
    """The self-check of checkpoint k's interval: {"interval": [a, b], "theta", "m", "v"} (the
    replay's relative misses at the next checkpoint), or None (no next checkpoint; the weights
    before the first checkpoint are held, not replayed). Computed once per context."""
    cache = ctx.adam_checks
    if k not in cache:
        rep = replay_class(ctx)(ctx, k, held=False)
        rec = None
        if rep.b > rep.a:
            end, _ = rep.run(rep.a, rep.b, rep.entry)
            chk = rep.check(end)
            rec = None if chk is None else {"interval": [rep.a, rep.b], **chk}
        cache[k] = rec
    return cache[k]


def segment(ctx, k: int, carry):
    """Checkpoint k's interval (its replayed steps, latest first): (influence (N,) float64 on the
    CPU from the samples of its batches, the adjoint carried to the interval's start, the check)."""
    ut, um, uv = carry
    rows_out = torch.zeros(ctx.n, dtype=torch.float64)
    rep, record = _Replay(ctx, k, held=False), ctx.adam_checks.get(k)
    if rep.b <= rep.a:
        return rows_out, carry, record
    b1, b2 = rep.b1, rep.b2
    eps = ctx.recipe.eps
    dt = ctx.thetas[k].dtype
    hvp_state: dict = {}                         # one HVP decision for the interval (hvp.py)
    for s, rows, x, y, j, theta, g, m, v, masks in rep.latest_first():
        fm = ctx.fm_at(j)
        lr, f = _lr(ctx, s, ut), _clip(ctx, s)
        lam_c, lam_d = _coupled(ctx, ut), _decoupled(ctx, ut)
        t = s + 1 + rep.offset
        c1, c2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        sq = (v / c2).clamp_min(0).sqrt()
        D = 1.0 / (sq + eps)
        gam = torch.where(sq > 0, (m / c1) * D * D / (2 * sq.clamp_min(1e-300) * c2), torch.zeros_like(sq))
        gd = f * g.to(ut.dtype) + lam_c * theta.to(ut.dtype)
        am = um - (lr / c1) * D * ut
        av = uv + lr * gam * ut
        w = (1 - b1) * am + 2 * (1 - b2) * gd * av       # the adjoint of the step's gradient
        wg = _clip_adjoint(w, g, f, ctx)                   # ... of the raw batch gradient (clipping)
        wm, th = wg.to(dt), theta.to(dt)
        with no_tf32(), applied(masks), step_loss(ctx, rows):
            hw, dz = _hvp_and_directional(ctx, k, fm, th, x, y, g, wm, hvp_state)
            if OWN_TERM:                                    # each sample's own term of m and v, exactly
                own = torch.empty(len(rows), dtype=torch.float64)
                vecs = [t.to(torch.float64) for t in (am, av, ut)]
                for a, b, DM, DV, NL in own_removal(ctx, s, fm, th, x, y, g, gd, m, v, lr, c1, c2, masks):
                    own[a:b] = (DM @ vecs[0] + DV @ vecs[1] + NL @ vecs[2]).cpu()
        # (clipping's higher orders, clip_removal, are SGD's only: under AdamW + clipping every step
        # they moved sizes from 0.83x to 0.71x true leave-one-out when v's own term stayed linear,
        # benchmarks/results/clip_nonlinearity.csv; own_removal keeps the clip linear, f P g_z / B,
        # and with it clip-every-step's sizes are 0.95 / 0.94x, benchmarks/results/recipes.csv)
        dz = dz.cpu().to(torch.float64)
        rows_out.index_add_(0, torch.as_tensor(rows), own if OWN_TERM else -dz / len(rows))
        ut = (1.0 - lr * lam_d) * ut + hw.to(ut.dtype) + lam_c * w
        um, uv = b1 * am, b2 * av
    if not (torch.isfinite(ut).all() and torch.isfinite(rows_out).all()):
        raise DiffinError(f"non-finite Adam replay at {ctx.label(k)}: refusing to write NaN scores")
    return rows_out, (ut, um, uv), record


def _hvp_and_directional_many(ctx, k: int, fm, th, x, y, g, Wm, state: dict, out=None):
    """_hvp_and_directional for the K rows of ``Wm``: (H Wm^T (K, P), <g_i, wm_j> (K, B)), one
    shared first backward where the products are exact (functional.hvp_directional_many), else
    row by row the way the single-direction replay goes (the same products)."""
    mode = getattr(ctx.settings, "hvp", "fd")
    if mode == "exact" or (mode == "auto" and state.get("fn", "exact") == "exact" and not state.get("apart")):
        try:
            res = fm.hvp_directional_many(th, x, y, Wm, out=out)
        except (RuntimeError, NotImplementedError):
            state["apart"] = True
        else:
            state.setdefault("fn", "exact")
            return res
    parts = [_hvp_and_directional(ctx, k, fm, th, x, y, g, w, state) for w in Wm]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


def segment_many(ctx, k: int, carry):
    """``segment`` for K query directions at once (the rows of carry's (K, P) adjoints): the
    forward replay of the interval is made once and each step's HVPs share one first backward.
    Returns (influence (K, N) float64, the carry at the interval's start; the carry's tensors are
    updated in place). Linear in the directions, so row j is ``segment``'s influence for direction
    j (float rounding aside: tests/test_span_store.py). The step's algebra runs in place on (K, P)
    buffers made once per interval: fresh ones (70 MB each at K = 64 on the text sample) were
    page-faulted in at every step. features.span_build uses it for a batch-order run's store."""
    UT, UM, UV = carry
    K = UT.shape[0]
    rows_out = torch.zeros(K, ctx.n, dtype=torch.float64)
    rep = _Replay(ctx, k, held=False)
    if rep.b <= rep.a:
        return rows_out, carry
    b1, b2 = rep.b1, rep.b2
    eps = ctx.recipe.eps
    dt = ctx.thetas[k].dtype
    hvp_state: dict = {}
    W, Wg = torch.empty_like(UT), None
    Wm = torch.empty(UT.shape, dtype=dt, device=UT.device)
    HWbuf = torch.empty_like(Wm)                        # the products, written in place where the batch is one slice
    for s, rows, x, y, j, theta, g, m, v, masks in rep.latest_first():
        fm = ctx.fm_at(j)
        lr, f = _lr(ctx, s, UT[0]), _clip(ctx, s)
        lam_c, lam_d = _coupled(ctx, UT[0]), _decoupled(ctx, UT[0])
        t = s + 1 + rep.offset
        c1, c2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        sq = (v / c2).clamp_min(0).sqrt()
        D = 1.0 / (sq + eps)
        gam = torch.where(sq > 0, (m / c1) * D * D / (2 * sq.clamp_min(1e-300) * c2), torch.zeros_like(sq))
        gd = f * g.to(UT.dtype) + lam_c * theta.to(UT.dtype)
        UM.addcmul_(UT, -(lr / c1) * D)                 # UM holds am = um - lr / c1 D ut
        UV.addcmul_(UT, lr * gam)                       # UV holds av = uv + lr Gamma ut
        torch.mul(UM, 1 - b1, out=W)                    # w = (1 - b1) am + 2 (1 - b2) gd av
        W.addcmul_(UV, 2 * (1 - b2) * gd)
        if f < 1.0:                                     # _clip_adjoint, row by row
            gh = g.to(W.dtype) / torch.linalg.vector_norm(g.to(W.dtype)).clamp_min(1e-300)
            Wg = torch.mul(W, f, out=Wg if Wg is not None else torch.empty_like(W))
            Wg.addr_(W @ gh, gh, alpha=-f)
            Wm.copy_(Wg)
        else:
            Wm.copy_(W)
        th = theta.to(dt)
        with no_tf32(), applied(masks), step_loss(ctx, rows):
            HW, DZ = _hvp_and_directional_many(ctx, k, fm, th, x, y, g, Wm, hvp_state, out=HWbuf)
            if OWN_TERM:                                    # as segment: each sample's own term exactly
                own = torch.empty(K, len(rows), dtype=torch.float64)
                mats = [t.to(torch.float64) for t in (UM, UV, UT)]          # am, av, ut (K, P)
                for a, b, DM, DV, NL in own_removal(ctx, s, fm, th, x, y, g, gd, m, v, lr, c1, c2, masks):
                    own[:, a:b] = (mats[0] @ DM.T + mats[1] @ DV.T + mats[2] @ NL.T).cpu()
                del mats
        rows_out.index_add_(1, torch.as_tensor(rows), own if OWN_TERM else -DZ.cpu().to(torch.float64) / len(rows))
        decay = 1.0 - lr * lam_d
        if isinstance(decay, torch.Tensor) or decay != 1.0:
            UT.mul_(decay)
        UT.add_(HW)
        del HW
        if isinstance(lam_c, torch.Tensor):
            UT.addcmul_(W, lam_c)
        elif lam_c:
            UT.add_(W, alpha=lam_c)
        UM.mul_(b1)
        UV.mul_(b2)
    if not (torch.isfinite(UT).all() and torch.isfinite(rows_out).all()):
        raise DiffinError(f"non-finite Adam replay at {ctx.label(k)}: refusing to write NaN scores")
    return rows_out, (UT, UM, UV)


WEIGHTS_FALLBACK = ("; the fallback models the loss's class weights by the training set's mean weight, not each "
                    "batch's own weight sum (measured on tests/test_loss_weights.py's run: Spearman 0.18, sizes 0.75x "
                    "true leave-one-out)")


def unequal_class_weights(ctx) -> bool:
    """Whether the context's loss weighs training samples unequally (class weights, ignore_index)."""
    spec = getattr(getattr(ctx, "fm", None), "loss", None)
    if spec is None or not hasattr(spec, "class_weights"):
        return False
    w = spec.class_weights(np.asarray(ctx.train.y))
    return w is not None and float(w.max() - w.min()) > 0


def check_summary(ctx) -> dict | None:
    """meta.json "adam_check" ("sgd_check" for SGD's replay, sgd_batches.py): the replay's
    self-check over every checkpoint interval, or None when the batch-order path is not on offer.
    ``passed``: every interval's theta and optimiser state (Adam: m and v; SGD: the momentum
    buffer) land within CHECK_TOL of the recorded ones; else ``message`` is the one warning line."""
    if getattr(ctx, "batch_order", None) is None or ctx.moments is None:
        return None
    rep = replay_class(ctx)
    per = [{"checkpoint": k, **{kk: (round(v, 8) if isinstance(v, float) else v) for kk, v in rec.items()}}
           for k in range(ctx.m) if (rec := interval_check(ctx, k)) is not None]
    keys = rep.keys
    worst = {key: max((r.get(key, 0.0) for r in per), default=0.0) for key in keys}
    failed = [r for r in per if not _passes({key: r[key] for key in keys if key in r})]
    out = {"replay": rep.name, "tolerance": CHECK_TOL, "passed": not failed, "intervals": len(per),
           "failed": len(failed), "worst": worst, "per_checkpoint": per}
    if failed:
        bad = max(failed, key=lambda r: max(r.get(key, 0.0) for key in keys))
        key = max((key for key in keys if key in bad), key=bad.get)
        out["message"] = (
            f"{rep.name} replay self-check failed at {len(failed)} of {len(per)} checkpoint intervals (worst: the "
            f"replayed {rep.what[key]} misses the recorded one by {100 * bad[key]:.0f}% at "
            f"{ctx.label(bad['checkpoint'] + 1)}): "
            + (f"no weights are recorded before {ctx.label(0)}, so steps 0..{bad['interval'][1] - 1} are taken at "
               "the nearest checkpoint's weights (save one at step 0)" if "theta" not in bad else
               "training did something the replay does not (dropout without recorded generator states, other "
               "train-mode randomness, train-mode "
               "BatchNorm, an unrecorded loss or clipping)" + (WEIGHTS_FALLBACK if unequal_class_weights(ctx) else ""))
            + f"; scored with {rep.fallback(ctx) if callable(rep.fallback) else rep.fallback} instead")
    return out


def decide(ctx) -> dict | None:
    """Run the self-check before the plan; a failed check turns the replay off for this context
    (Adam: ctx.batch_order = None, the checkpoint estimator scores; SGD: sgd_batches.fall_back)
    and warns in one line. Sets and returns ctx.adam_check (None when the path was not on offer)."""
    if getattr(ctx, "adam_check", None) is not None or getattr(ctx, "batch_order", None) is None \
            or ctx.moments is None:
        return getattr(ctx, "adam_check", None)
    summary = check_summary(ctx)
    ctx.adam_check = summary
    flag(ctx)                                       # dropout masks the check could not redraw exactly
    if summary is not None and not summary["passed"]:
        import warnings
        from diffin_core.engine.recipe import RecipeWarning
        summary["fallback"] = replay_class(ctx).fall_back(ctx)
        approx = getattr(ctx.recipe, "approximations", None)
        if isinstance(approx, list) and summary["message"] not in approx:
            approx.append(summary["message"])          # meta.json "approximations": the run's own line
        warnings.warn(RecipeWarning(summary["message"]), stacklevel=3)
    return summary


def adopt_check(ctx, meta: dict | None) -> dict | None:
    """A query on a finished run (``diffin top``, Explore's exact path) takes the run's own replay
    self-check from its meta.json instead of replaying every interval again (one batch gradient
    and one dropout-mask draw per training step: 3.9 s of CPU on the text sample). The check is a
    function of the recorded data alone (checkpoints, moments, batch order, generator states), which
    the run was scored on, so its verdict is the one a new check would reach; a failed one turns the
    replay off as decide() does. Adopted only when it is complete (every interval of this context)
    and of this context's replay; returns the adopted summary, else None (then decide() checks)."""
    summary = meta_check(meta or {})
    if not isinstance(summary, dict) or getattr(ctx, "adam_check", None) is not None \
            or getattr(ctx, "batch_order", None) is None or ctx.moments is None:
        return None
    rep = replay_class(ctx)
    per = summary.get("per_checkpoint")
    if summary.get("replay") != rep.name or not isinstance(per, list) or "passed" not in summary:
        return None
    records: dict = {}
    for r in per:
        try:
            k = int(r["checkpoint"])
            a, b = (int(v) for v in r["interval"])
        except (KeyError, TypeError, ValueError):
            return None
        if not 0 <= k < ctx.m or (a, b) != interval(ctx, k):
            return None                               # another trajectory than this context's
        records[k] = {kk: v for kk, v in r.items() if kk != "checkpoint"}
    if len(records) != int(summary.get("intervals", -1)):
        return None
    summary = {kk: v for kk, v in summary.items() if kk != "fallback"}
    ctx.adam_checks.update({k: records.get(k) for k in range(ctx.m)})     # None: no next checkpoint
    ctx.adam_check = summary
    if not summary["passed"]:
        summary["fallback"] = rep.fall_back(ctx)
        approx = getattr(ctx.recipe, "approximations", None)
        if isinstance(approx, list) and summary.get("message") and summary["message"] not in approx:
            approx.append(summary["message"])
    return summary


def check_key(ctx) -> str:
    """meta.json's key for the replay's self-check: "adam_check" or "sgd_check"."""
    return "adam_check" if ctx.recipe.adam else "sgd_check"


def meta_check(meta: dict) -> dict | None:
    """A run's replay self-check from its meta.json (Adam's or SGD's), or None."""
    return meta.get("adam_check") or meta.get("sgd_check")


def check_text(summary: dict | None) -> str:
    """One short line for the Score page: 'Adam replay check: passed (worst miss 0.0003%)'."""
    if not summary:
        return ""
    worst = max(summary.get("worst", {}).values(), default=0.0)
    name = summary.get("replay", "Adam")
    if summary.get("passed"):
        return f"{name} replay check: passed, {summary.get('intervals', 0)} intervals (worst miss {100 * worst:.2g}%)"
    return (f"{name} replay check: FAILED at {summary.get('failed')} of {summary.get('intervals')} intervals "
            f"(worst miss {100 * worst:.0f}%): scored with {summary.get('fallback', 'the checkpoint estimator')}")
