"""Diff-In's self-influence walk in Ritz coordinates: no P-sized adjoint per training row.

DiffIn.chunk's direct walk carries each row's own adjoints (u, v) back through the plan with
``SegmentOp.rows``: every checkpoint writes three new P-vectors per row and reads its Ritz
vectors Y_k (P, r) three times per chunk (at P = 11M, r = 15: 670 MB, and chunks of two rows).
Without Adam's preconditioner the adjoints never leave the span of the row's final gradient g_F
and the plan's Ritz vectors:
    u = a_u g_F + sum_j Y_j p_j,     v = a_v g_F + sum_j Y_j q_j
with a_u, a_v scalars shared by every row (the complement's maps are scalars) and p_j, q_j (b, r_j)
per row, j over the checkpoints already walked. One segment op f (fu, fv) = W or a column of C
maps the representation exactly:
    a'   = fu[-1] a_u + fv[-1] a_v,      p'_j = fu[-1] p_j + fv[-1] q_j,
    p'_k = (Y_k^T u) (fu[:-1] - fu[-1]) + (Y_k^T v) (fv[:-1] - fv[-1]),
    Y_k^T u = a_u Y_k^T g_F + sum_j (Y_k^T Y_j) p_j,
and checkpoint k's self-influence term coef <w, g_k> needs only <g_F, g_k>, Y_j^T g_k (j >= k)
and the small Gram matrices Y_k^T Y_j (computed once per plan). Per row: g_F and g_k (two
P-vectors, as TracIn's one gradient plus the final one); per chunk: one GEMM of the rows with
each Y_j per later checkpoint. Same numbers as the direct walk up to float rounding
(tests/test_ritz_self.py). With Adam (a per-checkpoint diagonal scale) the span does not close:
DiffIn keeps the direct walk there.
"""
from __future__ import annotations

import torch

from diffin_core.methods.base import tap_grads
from diffin_core.methods.first_order import rowdot
from diffin_core.engine.propagate import check_finite, has_momentum


def applies(ctx) -> bool:
    """True unless the recipe is Adam with a recorded preconditioner (then the span does not close)
    or has per-group hyper-parameters (a scaled operator with one complement value per group)."""
    return not (getattr(ctx.recipe, "adam", False) and getattr(ctx, "precond", None) is not None) \
        and getattr(ctx, "groups", None) is None


BLOCK_ROWS = 16384            # parameters per block of blocked_products (a block of 46 columns: 3 MB)
BLOCK_MIN_PARAMS = 1 << 20   # models this large take blocked_products on the CPU (the plan's stack
                             # aside): every product of a step is bound by reading memory


def blocked_products(g: torch.Tensor, g_final: torch.Tensor, w, ys: list):
    """(g @ w or None, [g @ Y for Y in ys], g_final @ ys[-1] or None where g is g_final,
    <g_final, g> per row) in one pass over the P parameters, blocks of BLOCK_ROWS: each block of
    g, g_final, w and every Y is read from memory once and the products of the block are one GEMM
    (the block's columns of w and the Ys side by side in a small buffer). Apart, the step's
    products read the (b, P) gradients 3 + i times and the last view's Ritz vectors twice; on a
    ResNet-18 (P = 11.2M, 5-row chunks, r = 15) they are bound by memory bandwidth, not flops.
    The blocks' partial sums add up in float64; the results in g's dtype (float rounding apart,
    the products made apart)."""
    b, p = g.shape
    widths = ([1] if w is not None else []) + [int(y.shape[1]) for y in ys]
    offs = [0]
    for c in widths:
        offs.append(offs[-1] + c)
    rows = min(BLOCK_ROWS, p)
    buf = torch.empty(rows, offs[-1], dtype=g.dtype, device=g.device)
    acc = torch.zeros(b, offs[-1], dtype=torch.float64, device=g.device)
    own = g is g_final
    last = slice(offs[-2], offs[-1])
    f_acc = None if own else torch.zeros(b, widths[-1], dtype=torch.float64, device=g.device)
    d_acc = torch.zeros(b, dtype=torch.float64, device=g.device)
    parts = ([w.reshape(-1, 1)] if w is not None else []) + list(ys)
    for a in range(0, p, rows):
        e = min(a + rows, p)
        n = e - a
        blk = buf[:n]
        for c, part in enumerate(parts):
            blk[:, offs[c]:offs[c + 1]] = part[a:e]
        gb = g[:, a:e]
        acc += (gb @ blk).double()
        if own:
            d_acc += (gb * gb).sum(1).double()
        else:
            fb = g_final[:, a:e]
            f_acc += (fb @ blk[:, last]).double()
            d_acc += (fb * gb).sum(1).double()
    out = acc.to(g.dtype)
    cols = [out[:, offs[c]:offs[c + 1]] for c in range(len(widths))]
    g_w = cols.pop(0)[:, 0] if w is not None else None
    return g_w, cols, (None if own else f_acc.to(g.dtype)), d_acc.to(g.dtype)


class Grams:
    """Y_i^T Y_j (r_i, r_j) for plan entries j < i (j walked first), made once per plan object.
    Two entries' Ritz vectors are live only while one product is made (before any gradient)."""

    def __init__(self):
        self.plan, self.mats, self.tails, self._stack = None, {}, {}, None

    def tail(self, plan, i: int) -> tuple[list, list]:
        """(W[-1, :], C[-1, :, :]) of entry i as Python floats: the complement's scalars, read to
        the host once per plan (not once per chunk: no device round trip in the walk)."""
        if self.plan is not plan:
            self.get(plan)
        if i not in self.tails:
            op = plan[i].op
            self.tails[i] = (op.W[-1].tolist(), op.C[-1].tolist())
        return self.tails[i]

    def stacked(self, plan, ctx):
        """(Y_0 | Y_1 | ... (P, R), column offsets) of an in-memory plan, made once per plan: a
        chunk's Y_j^T g_k for every j <= k is then one GEMM that reads the gradients once (per
        entry, thin GEMMs re-read the (b, P) gradients m^2/2 times). None for a lazy plan or
        when the stack would take more than an eighth of the memory budget."""
        if self.plan is not plan:
            self.get(plan)
        if self._stack is None:
            self._stack = False
            if isinstance(plan, list) and plan:
                cols = sum(int(it.op.view.vectors.shape[1]) for it in plan)
                y0 = plan[0].op.view.vectors
                need = cols * y0.shape[0] * y0.element_size()
                mem = getattr(ctx, "memory", None)
                if mem is None or need <= mem.budget // 8:
                    offs = [0]
                    for it in plan:
                        offs.append(offs[-1] + int(it.op.view.vectors.shape[1]))
                    self._stack = (torch.cat([it.op.view.vectors for it in plan], 1), offs)
        return self._stack or None

    def get(self, plan) -> dict:
        if self.plan is not plan:                # a new plan (a new query or shard): start again
            self.plan, self.mats, self.tails, self._stack = plan, {}, {}, None
        if not self.mats and len(plan) > 1:
            for i in range(1, len(plan)):
                yi = plan[i].op.view.vectors
                for j in range(i):
                    self.mats[i, j] = yi.T @ plan[j].op.view.vectors
                del yi
        return self.mats


def walk(ctx, plan, x, y, grams: Grams):
    """(influence (b, m), self-influence (b, m)) of one chunk, each checkpoint's own term."""
    last = ctx.m - 1
    g_final = ctx.fm_at(last).per_sample_grads(ctx.thetas[last], x, y)
    w = Walk(ctx, plan, grams, g_final)
    for i in range(len(plan)):
        k = plan[i].k
        g = g_final if k == last else ctx.fm_at(k).per_sample_grads(ctx.thetas[k], x, y)
        tap_grads(ctx, k, g)             # the feature store's sketch from the same gradients (base.py)
        w.step(i, g)
        del g
    return w.finish()


class Walk:
    """One chunk's walk through ``plan`` (latest checkpoint first), one entry per ``step``, so
    that two plans over the same checkpoints can share each per-sample gradient (DiffIn's fold of
    the label_issue pass). ``g_final``: the rows' gradients at ``ctx``'s last checkpoint."""

    def __init__(self, ctx, plan, grams: Grams, g_final: torch.Tensor):
        self.ctx, self.plan, self.grams = ctx, plan, grams.get(plan)
        self._owner = grams
        self.g_final = g_final
        b = len(g_final)
        self.infl = torch.zeros(b, ctx.m, dtype=ctx.acc_dtype, device=ctx.device)
        self.selfs = torch.zeros_like(self.infl)
        self.momentum = has_momentum(ctx.recipe)
        self.a_u, self.a_v = 1.0, 0.0
        self.pu: list[torch.Tensor] = []             # p_j (b, r_j), j = plan entries walked so far
        self.pv: list[torch.Tensor] = []             # q_j (momentum only)
        self.f_all = None                            # Y_j^T g_F of every entry (b, R): the stack's one GEMM

    def step(self, i: int, g: torch.Tensor) -> None:
        """Plan entry i with g = the rows' per-sample gradients at its checkpoint."""
        plan, grams, momentum, g_final = self.plan, self.grams, self.momentum, self.g_final
        a_u, a_v, pu, pv = self.a_u, self.a_v, self.pu, self.pv
        (w0, w1), ((c00, c01), (c10, c11)) = self._owner.tail(plan, i)
        it = plan[i]
        k, Y, W, C = it.k, it.op.view.vectors, it.op.W, it.op.C
        own_infl = getattr(it, "rows", None) is None            # else: DiffIn.row_terms adds it
        stack = self._owner.stacked(plan, self.ctx)
        on_prev = d_f = None
        if stack is None and g.device.type == "cpu" and g.shape[1] >= BLOCK_MIN_PARAMS:
            g_w, ons, f_on, d_f = blocked_products(g, g_final, it.w if own_infl else None,
                                                   [plan[j].op.view.vectors for j in range(i)] + [Y])
            on_prev, g_on = ons[:-1], ons[-1]                   # every product in one pass over P
            f_on = g_on if f_on is None else f_on
        else:
            g_w = g @ it.w if own_infl else None
            if stack is not None:                               # Y_j^T g_k for j <= k in one GEMM
                ys, offs = stack
                if self.f_all is None:     # Y_j^T g_F for every entry at once: one (b, P) x (P, R) GEMM per chunk
                    self.f_all = g_final @ ys   # instead of a thin (P, r) one per checkpoint (9x slower on CPU)
                on_all = self.f_all[:, :offs[i + 1]] if g is g_final else g @ ys[:, :offs[i + 1]]
                on_prev = [on_all[:, offs[j]:offs[j + 1]] for j in range(i)]
                g_on = on_all[:, offs[i]:offs[i + 1]]              # Y_k^T g_k (b, r)
                f_on = self.f_all[:, offs[i]:offs[i + 1]]          # Y_k^T g_F
            else:
                g_on = g @ Y
                f_on = g_on if g is g_final else g_final @ Y    # Y_k^T g_F
        if own_infl:
            self.infl[:, k] = it.coef * g_w.to(self.infl.dtype)
        coef = it.coef
        del it, Y                                               # (a lazy plan may now drop entry i)
        if on_prev is None:
            on_prev = [g @ plan[j].op.view.vectors for j in range(i)]   # Y_j^T g_k, j walked before
        if d_f is None:
            d_f = rowdot(g_final, g)                            # <g_F, g_k>
        del g
        yu = a_u * f_on + sum((p @ grams[i, j].T for j, p in enumerate(pu)), torch.zeros_like(f_on))
        yv = (a_v * f_on + sum((q @ grams[i, j].T for j, q in enumerate(pv)), torch.zeros_like(f_on))
              if momentum else None)
        u_g = a_u * d_f + sum((rowdot(p, o) for p, o in zip(pu, on_prev)), torch.zeros_like(d_f))
        v_g = (a_v * d_f + sum((rowdot(q, o) for q, o in zip(pv, on_prev)), torch.zeros_like(d_f))
               if momentum else None)

        def mapped(fu, fv, su, sv):
            """(a', [p'_j], p'_k) of one op (fu, fv) on (u, v) (see module doc); su, sv = fu[-1],
            fv[-1] as host floats."""
            new = yu * (fu[:-1] - fu[-1])
            if not momentum:
                return su * a_u, [su * p for p in pu], new
            new = new + yv * (fv[:-1] - fv[-1])
            return su * a_u + sv * a_v, [su * p + sv * q for p, q in zip(pu, pv)], new

        w_g = w0 * u_g + rowdot(mapped(W[:, 0], W[:, 1], w0, w1)[2], g_on)    # <w, g_k>
        if momentum:
            w_g = w_g + w1 * v_g
        self.selfs[:, k] = coef * w_g.to(self.selfs.dtype)
        nu = mapped(C[:, 0, 0], C[:, 0, 1], c00, c01)
        nv = mapped(C[:, 1, 0], C[:, 1, 1], c10, c11) if momentum else None
        self.a_u, self.pu = nu[0], nu[1] + [nu[2]]
        if momentum:
            self.a_v, self.pv = nv[0], nv[1] + [nv[2]]

    def finish(self):
        """(influence (b, m), self-influence (b, m)), checked finite."""
        check_finite(self.ctx, self.infl, "influence")
        check_finite(self.ctx, self.selfs, "self-influence")
        self.g_final = self.f_all = None
        return self.infl, self.selfs
