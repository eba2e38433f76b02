"""The query-span store of a batch-order Adam run: reading it (numpy only, no torch, no pandas).

Adam's batch-order replay (engine/adam_batches.py) is linear in the query gradient u = g_Q(theta_T):
with the replayed influence rows R_j (N,) of orthonormal directions b_j, a query whose gradient is
u = sum_j c_j b_j + e (e orthogonal to every b_j) has influence sum_j c_j R_j + <e-part>. The feature
pass (features.span_build) replays the top r principal directions of the query samples' own
gradients and keeps, under runs/<run>/features/:

    span_rows.npy   (r, N) float64   the replay's influence rows R_j
    span_coef.npy   (Nq, r) float64  each query sample's coefficients c = B^T u
    span_unorm.npy  (Nq,)            ||u_q||
    span_resid.npy  (Nq,)            ||u_q - B c_q|| (the part left out)
    span_gram.npy   (Nq, Nq)         <u_p, u_q> (query sets up to SPAN_GRAM_MAX: a set's exact residual)

A query set's answer is one (r,) x (r, N) product. When the set's gradient lies in the span (all
of them, when the query gradients span at most r directions, as on the digits AdamW project),
that is the exact path's answer, to float rounding. Else the answer is labelled approximate,
with the share of the gradient left out and its measured agreement with the full replay on this
run: the pass's own checks (features.span_build) and every query answered exactly since.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from diffin_core.errors import DiffinError

SPAN_EXACT_TOL = 1e-5   # a query set whose gradient lies this close to the span (relative) is answered exactly


def is_span(meta: dict | None) -> bool:
    return bool(meta) and meta.get("kind") == "query-span"


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean overlap of the k largest and the k smallest of a and b (the two sides of a grid)."""
    k = min(k, len(a))
    out = []
    for sign in (1.0, -1.0):
        out.append(len(set(np.argsort(-sign * a, kind="stable")[:k].tolist())
                       & set(np.argsort(-sign * b, kind="stable")[:k].tolist())) / k)
    return float(np.mean(out))


def set_residual(idx, unorm, resid, coef, gram) -> float:
    """Relative residual ||mean(u) - B B^T mean(u)|| / ||mean(u)|| of a query set: exact from the
    Gram matrix where kept, else an upper estimate (the mean residual over the mean coefficients'
    norm)."""
    idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
    c = coef[idx].mean(0)
    if gram is not None:
        u2 = float(gram[np.ix_(idx, idx)].mean())
        r2 = max(u2 - float(c @ c), 0.0)
        return float(np.sqrt(r2 / max(u2, 1e-300)))
    return float(resid[idx].mean() / max(np.sqrt(float(c @ c) + resid[idx].mean() ** 2), 1e-300))


class SpanStore:
    """The float64 side of a query-span store (features.span_build)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "meta.json").read_text())
            self.rows = np.load(self.path / "span_rows.npy", mmap_mode="r")
            self.coef = np.load(self.path / "span_coef.npy")
            self.unorm = np.load(self.path / "span_unorm.npy")
            self.resid = np.load(self.path / "span_resid.npy")
            g = self.path / "span_gram.npy"
            self.gram = np.load(g) if g.is_file() else None
        except (OSError, ValueError, KeyError) as e:
            raise DiffinError(f"the feature store is unreadable ({e}); rebuild it with `diffin features`",
                              self.path) from e

    @classmethod
    def open(cls, run_dir: Path) -> "SpanStore | None":
        """The run's query-span store, or None (no store, another kind, or not this run's data)."""
        run_dir = Path(run_dir)
        p = run_dir / "features" / "meta.json"
        try:
            meta = json.loads(p.read_text())
            run = json.loads((run_dir / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if not is_span(meta) or meta.get("n_train") != run.get("train_size") or meta.get("n_query") != run.get("query_size"):
            return None
        return cls(p.parent)

    def influence(self, idx) -> np.ndarray:
        """(N,) the store's influence on the mean loss of query samples ``idx``."""
        idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        return self.coef[idx].mean(0) @ np.asarray(self.rows)

    def residual(self, idx) -> float:
        return set_residual(idx, self.unorm, self.resid, self.coef, self.gram)

    def agreement(self, run_dir: Path, k: int = 10) -> dict | None:
        """This store against the full replay on the run's exactly answered single queries
        (runs/<run>/topk/q<i>.npy, the pass's checks among them): {"queries", "overlap" (mean top-k
        overlap, both sides), "min_overlap", "max_error" (largest |store - exact| over the exact top
        value)}, or None when none is answered."""
        overlaps, errors = [], []
        for p in sorted((Path(run_dir) / "topk").glob("q*.npy")):
            name = p.name[1:-4]
            if not name.isdigit() or int(name) >= len(self.coef):
                continue
            try:
                ex = np.load(p, allow_pickle=False).astype(np.float64)
            except (OSError, ValueError):
                continue
            if len(ex) != self.rows.shape[1]:
                continue
            est = self.influence([int(name)])
            overlaps.append(top_overlap(est, ex, k))
            errors.append(float(np.abs(est - ex).max() / max(np.abs(ex).max(), 1e-300)))
        if not overlaps:
            return None
        return {"queries": len(overlaps), "overlap": float(np.mean(overlaps)), "min_overlap": float(np.min(overlaps)),
                "max_error": float(np.max(errors))}

    def answer(self, idx, run_dir: Path | None = None):
        """answers.Answer for the mean loss of query samples ``idx``: every row exact when the set's
        gradient lies in the span (relative residual at most SPAN_EXACT_TOL), else labelled with
        what was left out and the measured agreement (on ``run_dir``'s exact answers)."""
        from diffin_core.run import answers
        idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        nq = len(self.coef)
        if len(idx) == 0:
            raise DiffinError("choose at least one query sample")
        if idx.min() < 0 or idx.max() >= nq:
            raise DiffinError(f"query index out of range: the query set has {nq} samples (0..{nq - 1})")
        infl = self.influence(idx)
        res = self.residual(idx)
        r = int(self.meta["rank"])
        if res <= SPAN_EXACT_TOL:
            return answers.Answer(infl, np.ones(len(infl), dtype=bool),
                                  f"exact path: Adam's batch-order replay, read from the store (this query's gradient "
                                  f"lies in the span of the {r} query directions replayed there; residual {res:.1g})")
        agreement = self.agreement(run_dir) if run_dir is not None else None
        return answers.Answer(infl, np.zeros(len(infl), dtype=bool), label(res, r, agreement), labelled=True)


def label(res: float, r: int, agreement: dict | None) -> str:
    """The approximate span answer's label: what was left out, and how far the store was measured."""
    if agreement:
        measured = (f"on {agreement['queries']} queries answered exactly on this run, top-10 overlap "
                    f"{agreement['overlap']:.2f} on average ({agreement['min_overlap']:.2f} at worst), largest error "
                    f"{100 * agreement['max_error']:.1f}% of the top value")
    else:
        measured = "not yet measured on this run"
    return (f"approximate (query-span store, not the exact path): {100 * res:.2g}% of this query's gradient lies "
            f"outside the {r} query directions whose batch-order replay the store holds, and is left out; against "
            f"the full replay: {measured}. `diffin top --exact` replays it in full")


def answer_new(run_dir: Path, query_indices):
    """The answer a new query gets from the run's query-span store, kept with the run (answers.save),
    or None without such a store. Numpy only."""
    from diffin_core.run import answers
    store = SpanStore.open(run_dir)
    if store is None:
        return None
    idx = sorted(set(int(i) for i in np.atleast_1d(query_indices)))
    ans = store.answer(idx, run_dir)
    answers.save(run_dir, idx, ans.influence, ans.exact, ans.path, uses_store=True, labelled=ans.labelled)
    return ans
