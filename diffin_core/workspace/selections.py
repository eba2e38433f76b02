"""Named selections of training samples, kept in the project: ``<project>/selections.json``.

A selection is a name and a list of sample ids (e.g. the Explore map's lasso), saved so it
survives a reload or a server restart and other pages (What-if) can use it:

    {"version": 1, "selections": {"odd cluster": {"ids": [3, 17], "created": 1764000000.0,
                                                   "source": "explore lasso (run diffin-1)"}}}

Every write replaces the whole file atomically (temp file, then rename); a lock serialises
writers in this process, so two sessions saving at once both land.
"""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

from diffin_core.project.atomic import write_text
from diffin_core.errors import DiffinError

FILE = "selections.json"
MAX_NAME = 60
_LOCK = threading.Lock()


def _path(project_dir: str | Path) -> Path:
    return Path(project_dir) / FILE


def load(project_dir: str | Path) -> dict[str, dict]:
    """name -> {"ids": [...], "created": epoch seconds, "source": str}, newest first.
    A missing file is no selections; an unreadable one is a DiffinError naming it."""
    p = _path(project_dir)
    if not p.is_file():
        return {}
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
        sel = raw["selections"]
        out = {str(k): {"ids": [int(i) for i in v["ids"]], "created": float(v.get("created", 0)),
                        "source": str(v.get("source", ""))} for k, v in sel.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DiffinError(f"not a readable selections file ({type(e).__name__}); delete or fix it", p) from None
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["created"]))


def clean_name(name: str) -> str:
    """The name as stored: whitespace collapsed; DiffinError when empty or too long."""
    name = re.sub(r"\s+", " ", str(name)).strip()
    if not name:
        raise DiffinError("give the selection a name")
    if len(name) > MAX_NAME:
        raise DiffinError(f"a selection name has at most {MAX_NAME} characters")
    return name


def save(project_dir: str | Path, name: str, ids, source: str = "") -> str:
    """Store (or replace) selection ``name``; returns the stored name."""
    name = clean_name(name)
    ids = sorted({int(i) for i in ids})
    if not ids:
        raise DiffinError("the selection is empty: select samples first")
    with _LOCK:
        sel = load(project_dir)
        sel[name] = {"ids": ids, "created": time.time(), "source": source}
        _write(project_dir, sel)
    return name


def delete(project_dir: str | Path, name: str) -> bool:
    """Remove selection ``name``; False when there was none."""
    with _LOCK:
        sel = load(project_dir)
        if sel.pop(name, None) is None:
            return False
        _write(project_dir, sel)
    return True


def _write(project_dir: str | Path, sel: dict) -> None:
    write_text(_path(project_dir), json.dumps({"version": 1, "selections": sel}, indent=1))
