"""A query's printed top-k, kept beside its answer: `diffin top` asked again with the same k reads
one small text file (issue 23: an asked-before query under 0.2 s beyond the CLI's start-up).

This module imports the standard library only: no numpy (about 0.1 s of the asked-before path
when it read the answer's .npz), torch or pandas.

    runs/<run>/answers/<key>.k<k>.txt   the printout of answers/<key>.npz (the fast path's answer)
    runs/<run>/topk/<key>.k<k>.txt      the printout of topk/<key>.npy (the exact path's answer)

The text's first line names the answer file it was printed from (its inode, size and
modification time) and the feature store's build stamp that answer used (0: none). It is printed
only while that very file is the answer `answers.load` would read: the exact path's answer first, a
fast answer only while no exact one is kept and only from the store it used (a rebuilt store, a
rewritten answer or a rescored run, whose folder is swapped whole, make the text stale, and the
caller reads the answer itself).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

HEADER = "#diffin-printed"


def query_key(query_indices) -> str:
    """'q3_17' for query samples {3, 17}; a digest beyond 100 characters (never a truncation)."""
    idx = sorted(set(int(i) for i in (query_indices if hasattr(query_indices, "__iter__") else [query_indices])))
    key = "q" + "_".join(map(str, idx))
    return key if len(key) <= 100 else "qset-" + hashlib.sha1(key.encode()).hexdigest()


def _store_stamp(run_dir: Path) -> float:
    try:
        return float(json.loads((run_dir / "features" / "meta.json").read_text()).get("finished", 0.0))
    except (OSError, ValueError):
        return 0.0


def _source(run_dir: Path, key: str, exact_only: bool) -> Path | None:
    """The answer file answers.load reads first for ``key``: the exact path's, else the fast one's."""
    ex = run_dir / "topk" / f"{key}.npy"
    if ex.is_file():
        return ex
    if exact_only:
        return None
    fast = run_dir / "answers" / f"{key}.npz"
    return fast if fast.is_file() else None


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_ino} {st.st_size} {st.st_mtime_ns}"


def text_path(source: Path, k: int) -> Path:
    return source.with_name(f"{source.name.rsplit('.', 1)[0]}.k{int(k)}.txt")


def print_kept(project_dir, run: str, query_indices, k: int, echo=print, exact_only: bool = False) -> bool:
    """Print the kept printout of this query's answer at this k; False when there is none or it is
    stale (the caller then reads the answer, and keeps its printout: answers.keep_printout)."""
    run_dir = Path(project_dir) / "runs" / run
    try:
        if not (run_dir / "meta.json").is_file() or not (run_dir / "scores.parquet").is_file():
            return False
        src = _source(run_dir, query_key(query_indices), exact_only)
        if src is None:
            return False
        text = text_path(src, k).read_text()
        first, _, body = text.partition("\n")
        tag, ino, size, mtime, store = first.split(" ")
        if tag != HEADER or f"{ino} {size} {mtime}" != _stamp(src):
            return False
        if src.suffix == ".npz" and float(store) and float(store) != _store_stamp(run_dir):
            return False                              # made with an older store
    except (OSError, ValueError):
        return False
    echo(body.rstrip("\n"))
    return True
