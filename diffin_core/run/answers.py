"""A run's answered queries, kept with the run: asking again costs a read (issue 23).

Every top-k answer (`diffin top`, the app's grids, its background jobs) is saved under the run:

    runs/<run>/answers/<key>.npz        influence (N,) float64 on the query set's mean loss;
                                        exact (N,) bool, the rows that carry the exact path's own
                                        value; path, how it was computed; store, the feature
                                        store's build stamp it used (0: none)
    runs/<run>/topk/<key>.npy           the exact path's answer (`diffin top --exact`, runs
                                        without a store): every row exact
    runs/<run>/answers/<key>.plan.npz   the query's plan: per checkpoint k its w_k (P,) (kept
                                        when small, PLAN_MAX_BYTES): rescoring more rows or a
                                        per-checkpoint plot then needs no HVP

``key`` names the query samples (sorted indices, or a digest for long sets). A rescored run
(runs/<run> is swapped whole) drops its answers; a rebuilt store drops the answers that used it.

This module imports numpy only (no torch, no pandas): the CLI prints an answered query in about
0.1 s beyond its start-up (``print_cached``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DIRNAME = "answers"
PLAN_MAX_BYTES = 64 << 20          # plans larger than this (m * P * 4 bytes) are not kept


def query_key(query_indices) -> str:
    """'q3_17' for query samples {3, 17}; a digest beyond 100 characters (never a truncation)."""
    from diffin_core.run.printed import query_key as key_of     # one rule, stdlib only (printed.py)
    return key_of(np.atleast_1d(query_indices).tolist())


def store_stamp(run_dir: Path) -> float:
    """The feature store's build stamp (meta.json 'finished'), 0.0 without a store."""
    meta = Path(run_dir) / "features" / "meta.json"
    try:
        return float(json.loads(meta.read_text()).get("finished", 0.0))
    except (OSError, ValueError):
        return 0.0


@dataclass
class Answer:
    influence: np.ndarray          # (N,) float64
    exact: np.ndarray              # (N,) bool: rows with the exact path's value
    path: str                      # how it was computed (shown beside the grid)
    certified: int = 0             # the top k per side proven to be the exact path's (0: not proven;
                                   # an all-exact answer needs none)
    labelled: bool = False         # an approximate answer shown as such, its path saying what it left out and
                                   # its measured error (a batch-order run's query-span store, features.SpanStore)

    def covers(self, k: int) -> bool:
        """Whether its top k per side are the exact path's top k (every row exact, or certified)."""
        return self.all_exact or self.certified >= k

    @property
    def all_exact(self) -> bool:
        return bool(self.exact.all())

    def shown(self, k: int) -> bool:
        """Whether `diffin top` may print its top ``k`` as they are: the exact path's top k (covers),
        its top k rows rescored exactly (uncertified store answers), or a labelled approximation."""
        return self.covers(k) or (not self.certified and self.top_exact(k)) or self.labelled

    def top_exact(self, k: int) -> bool:
        """Whether the k most helpful and k most harmful rows all carry exact values."""
        order = np.argsort(-self.influence, kind="stable")
        return bool(self.exact[order[:k]].all() and self.exact[order[::-1][:k]].all())


def answer_path(run_dir: Path, query_indices) -> Path:
    return Path(run_dir) / DIRNAME / f"{query_key(query_indices)}.npz"


def exact_path(run_dir: Path, query_indices) -> Path:
    """Where the exact path's answer is kept (every row exact): runs/<run>/topk/<key>.npy."""
    return Path(run_dir) / "topk" / f"{query_key(query_indices)}.npy"


def load(run_dir: Path, query_indices, exact_only: bool = False) -> Answer | None:
    """The saved answer for these query samples, or None (never asked, or its store was rebuilt).
    The exact path's answer first; ``exact_only``: only that one."""
    run_dir = Path(run_dir)
    ex = exact_path(run_dir, query_indices)
    if ex.is_file():
        try:
            infl = np.load(ex, allow_pickle=False).astype(np.float64)
            return Answer(infl, np.ones(len(infl), dtype=bool), "exact path (cached)")
        except (OSError, ValueError):
            pass                                    # unreadable: answered again (and rewritten)
    p = answer_path(run_dir, query_indices)
    if exact_only or not p.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            if float(z["store"]) and float(z["store"]) != store_stamp(run_dir):
                return None                         # made with an older store: not this store's answer
            return Answer(np.asarray(z["influence"], dtype=np.float64), np.asarray(z["exact"], dtype=bool),
                          str(z["path"]), int(z["certified"]) if "certified" in z.files else 0,
                          bool(z["labelled"]) if "labelled" in z.files else False)
    except (OSError, ValueError, KeyError):
        return None


def save_exact(run_dir: Path, query_indices, influence: np.ndarray) -> Path:
    """Keep the exact path's answer (every row) with the run (atomic)."""
    from diffin_core.project.atomic import atomic_path
    out = exact_path(run_dir, query_indices)
    with atomic_path(out) as tmp:
        np.save(tmp, np.asarray(influence))
    return out


def save(run_dir: Path, query_indices, influence: np.ndarray, exact: np.ndarray, path: str,
         uses_store: bool = False, certified: int = 0, labelled: bool = False,
         timings: dict | None = None, bounds: tuple | None = None) -> Path:
    """Keep an answer with the run (atomic: temp file + rename). ``timings``: where the answer's
    time went ({"plan_s": ..., "plan_cpu_s": ...}, features.fast_answer), kept beside it (timings());
    ``bounds``: a certified answer's inputs, the store's (estimate (N,), sigma (N,)), kept as float32
    (est, sigma: how far the sketch was from ruling rows out; benchmarks/explore_query.py)."""
    from diffin_core.project.atomic import atomic_path
    out = answer_path(run_dir, query_indices)
    with atomic_path(out, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, influence=np.asarray(influence, dtype=np.float64), exact=np.asarray(exact, dtype=bool),
                     path=np.asarray(str(path)), store=np.asarray(store_stamp(run_dir) if uses_store else 0.0),
                     certified=np.asarray(int(certified)), labelled=np.asarray(bool(labelled)),
                     timings=np.asarray(json.dumps(timings or {})),
                     **({} if bounds is None else {"est": np.asarray(bounds[0], dtype=np.float32),
                                                    "sigma": np.asarray(bounds[1], dtype=np.float32)}))
    return out


def bounds(run_dir: Path, query_indices) -> tuple[np.ndarray, np.ndarray] | None:
    """A certified answer's kept (estimate, sigma) from the store (save(bounds=...)), or None."""
    try:
        with np.load(answer_path(run_dir, query_indices), allow_pickle=False) as z:
            return (np.array(z["est"]), np.array(z["sigma"])) if "sigma" in z.files else None
    except (OSError, ValueError, KeyError):
        return None


def timings(run_dir: Path, query_indices) -> dict:
    """The saved answer's timings (save(timings=...)), {} when it has none."""
    try:
        with np.load(answer_path(run_dir, query_indices), allow_pickle=False) as z:
            return json.loads(str(z["timings"])) if "timings" in z.files else {}
    except (OSError, ValueError, KeyError):
        return {}


def plan_path(run_dir: Path, query_indices) -> Path:
    return Path(run_dir) / DIRNAME / f"{query_key(query_indices)}.plan.npz"


def save_plan(run_dir: Path, query_indices, vectors: dict[str, np.ndarray]) -> Path | None:
    """Keep a query's plan arrays ({'w<k>': w_k (P,)}, Adam's {'r<k>': rows (N,)}) when they are
    small enough (PLAN_MAX_BYTES)."""
    from diffin_core.project.atomic import atomic_path
    if sum(v.nbytes for v in vectors.values()) > PLAN_MAX_BYTES:
        return None
    out = plan_path(run_dir, query_indices)
    with atomic_path(out, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{str(k): np.asarray(v) for k, v in vectors.items()})
    return out


def load_plan(run_dir: Path, query_indices) -> dict[str, np.ndarray] | None:
    p = plan_path(run_dir, query_indices)
    if not p.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            return {name: np.array(z[name]) for name in z.files}
    except (OSError, ValueError):
        return None


# --- the CLI's read path: no torch, no pandas ---------------------------------------------------

COLUMNS = ("sample_id", "label", "pred", "label_issue", "influence")


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    return str(v)


def columns_path(run_dir: Path) -> Path:
    return Path(run_dir) / DIRNAME / "columns.npz"


def save_columns(run_dir: Path, scores) -> None:
    """The run's table columns the answers print (sample_id, label, pred, label_issue), once: reading
    them back needs numpy only (pyarrow's parquet reader imports pandas, ~0.5 s)."""
    from diffin_core.project.atomic import atomic_path
    out = columns_path(run_dir)
    if out.is_file():
        return
    with atomic_path(out, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{c: np.asarray(scores[c].to_numpy()) for c in COLUMNS[:-1]})


def load_columns(run_dir: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(columns_path(run_dir), allow_pickle=False) as z:
            return {c: np.array(z[c]) for c in COLUMNS[:-1]}
    except (OSError, ValueError, KeyError):
        return None


def format_table(cols: dict[str, np.ndarray], rows: np.ndarray, infl: np.ndarray) -> str:
    """Right-aligned columns as pandas' to_string(index=False) prints them."""
    table = [[_fmt(cols[c][r]) for c in COLUMNS[:-1]] + [_fmt(infl[r])] for r in rows]
    widths = [max([len(c)] + [len(t[i]) for t in table]) for i, c in enumerate(COLUMNS)]
    lines = [" " + " ".join(c.rjust(w) for c, w in zip(COLUMNS, widths))]
    lines += [" " + " ".join(v.rjust(w) for v, w in zip(t, widths)) for t in table]
    return "\n".join(lines)


HELPFUL_TITLE = "most helpful (removing them raises the query loss)"
HARMFUL_TITLE = "most harmful (removing them lowers the query loss)"


def print_cached(project_dir: Path, run: str, query_indices, k: int, echo=print, exact_only: bool = False) -> bool:
    """Print a saved answer as `diffin top` does; False when there is none (or it cannot be read
    without the project: the caller then takes the full path, which reports any problem)."""
    run_dir = Path(project_dir) / "runs" / run
    if not (run_dir / "meta.json").is_file() or not (run_dir / "scores.parquet").is_file():
        return False
    ans = load(run_dir, query_indices, exact_only)
    if ans is None or not ans.shown(k):
        return False
    return print_answer(run_dir, ans, k, echo,
                        f"({ans.path})" if "cached" in ans.path else f"({ans.path}; answered before)")


def print_answer(run_dir: Path, ans: Answer, k: int, echo=print, header: str | None = None) -> bool:
    """Print ``ans``'s top ``k`` of each side as `diffin top` does, from the run's kept columns
    (numpy only); False when they are not kept yet (the caller prints through pandas, which keeps
    them)."""
    cols = load_columns(run_dir)
    if cols is None or len(cols["sample_id"]) != len(ans.influence):
        return False
    order = np.argsort(-ans.influence, kind="stable")
    echo(header if header is not None else f"({ans.path})")
    for title, rows in ((HELPFUL_TITLE, order[:k]), (HARMFUL_TITLE, order[::-1][:k])):
        echo(f"\n{title}:")
        echo(format_table(cols, rows, ans.influence))
    return True


def keep_printout(project_dir, run: str, query_indices, k: int, lines: list[str], exact_only: bool = False) -> Path | None:
    """Keep ``lines`` (what print_cached / print_answer just printed for this query and k) as the
    printout an asked-again `diffin top` shows (printed.print_kept reads it, stdlib only): its
    first line as print_cached prints it (the answer's path, 'answered before'). None when there
    is no kept answer to tie it to."""
    from diffin_core.project.atomic import atomic_path
    from diffin_core.run import printed
    run_dir = Path(project_dir) / "runs" / run
    src = printed._source(run_dir, printed.query_key(query_indices), exact_only)
    if src is None or len(lines) < 2:
        return None
    ans = load(run_dir, query_indices, exact_only)
    if ans is None:
        return None
    store = 0.0
    if src.suffix == ".npz":
        import numpy as np
        try:
            with np.load(src, allow_pickle=False) as z:
                store = float(z["store"])
        except (OSError, ValueError, KeyError):
            return None
    header = f"({ans.path})" if "cached" in ans.path else f"({ans.path}; answered before)"
    out = printed.text_path(src, k)
    try:
        with atomic_path(out, suffix=".txt") as tmp:
            tmp.write_text("\n".join([f"{printed.HEADER} {printed._stamp(src)} {store!r}", header, *lines[1:]]) + "\n")
    except OSError:
        return None                                   # a read-only run folder: printed, not kept
    return out
