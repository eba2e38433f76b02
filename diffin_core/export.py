"""Export cleaned training splits (review decisions applied) or engine-chosen subsets.

Formats (one writer each, shared by ``export_split`` and ``export_subset``):

* ``npz``: arrays ``x`` (M, ...), ``y`` (M,) int64, ``ids`` (M,) int64 of the kept rows.
* ``csv`` / ``parquet``: one row per ORIGINAL sample: sample_id, label (final), original_label,
  decision, then f0..f{D-1} (x flattened to D features). Excluded rows stay, marked "exclude".
* ``imagefolder``: a zip of ``<class_name>/<sample_id>.png`` for the kept rows; x is reshaped
  to image_shape (C, H, W), C in {1, 3}; float data with max <= 1 is scaled to 0-255.

Next to the export, ``<stem>.decisions.json`` records every sample's final state, the counts
and the caller's ``manifest_extra`` (run, method, score columns, settings). Both files are
written atomically; an error leaves neither behind.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from diffin_core.atomic import atomic_path
from diffin_core.errors import DiffinError

FORMATS = ("npz", "csv", "parquet", "imagefolder")


def manifest_path(out_path: str | Path) -> Path:
    """Where the decisions manifest of ``out_path`` goes: ``<stem>.decisions.json``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".decisions.json")


def _check_rows(x, y, sample_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y, ids = np.asarray(x), np.asarray(y), np.asarray(sample_ids)
    if not (len(x) == len(y) == len(ids)) or y.ndim != 1 or ids.ndim != 1:
        raise DiffinError(f"x, y and sample_ids disagree in length ({len(x)}, {len(y)}, "
                          f"{len(ids)})")
    return x, y.astype(np.int64), ids.astype(np.int64)


def apply_decisions(x: np.ndarray, y: np.ndarray, sample_ids: np.ndarray, state: pd.DataFrame
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Apply ``ReviewLog.state()`` to a split of N rows.

    Returns (x_clean, y_clean, ids_clean, decision): excluded rows removed, relabels applied;
    ``decision`` (N,) str is "keep"/"relabel"/"exclude"/"undecided" per original row.
    Decisions on sample ids not in this split are ignored.
    """
    x, y, ids = _check_rows(x, y, sample_ids)
    decision, final = _decide(y, ids, state)
    keep = decision != "exclude"
    return x[keep], final[keep], ids[keep], decision


def _decide(y: np.ndarray, ids: np.ndarray, state: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(decision (N,) str, final label (N,) int64) for each row."""
    st = state.reindex(ids)
    decision = st["action"].fillna("undecided").to_numpy(dtype=object).astype(str)
    final = y.copy()
    relabel = decision == "relabel"
    final[relabel] = st["label"].to_numpy()[relabel].astype(np.int64)
    return decision, final


def export_split(out_path: str | Path, fmt: str, x: np.ndarray, y: np.ndarray,
                 sample_ids: np.ndarray, state: pd.DataFrame, *,
                 label_names: list[str] | None = None,
                 image_shape: tuple[int, int, int] | None = None,
                 manifest_extra: dict) -> Path:
    """Write the split with review ``state`` applied in ``fmt``; returns ``out_path``."""
    x, y, ids = _check_rows(x, y, sample_ids)
    decision, final = _decide(y, ids, state)
    return _export(out_path, fmt, x, y, ids, final, decision, label_names, image_shape,
                   {"kind": "review", **manifest_extra})


def export_subset(out_path: str | Path, fmt: str, x: np.ndarray, y: np.ndarray,
                  sample_ids: np.ndarray, keep_mask: np.ndarray, *, reason: str,
                  label_names: list[str] | None = None,
                  image_shape: tuple[int, int, int] | None = None,
                  manifest_extra: dict | None = None) -> Path:
    """Write an engine-chosen subset (``keep_mask`` (N,) bool; others marked "exclude")."""
    x, y, ids = _check_rows(x, y, sample_ids)
    keep_mask = np.asarray(keep_mask, dtype=bool)
    if keep_mask.shape != y.shape:
        raise DiffinError(f"keep_mask has shape {keep_mask.shape}, expected {y.shape}", out_path)
    decision = np.where(keep_mask, "keep", "exclude")
    return _export(out_path, fmt, x, y, ids, y.copy(), decision, label_names, image_shape,
                   {"kind": "subset", "reason": reason, **(manifest_extra or {})})


def _export(out_path, fmt, x, y, ids, final, decision, label_names, image_shape, extra) -> Path:
    out_path = Path(out_path)
    if fmt not in FORMATS:
        raise DiffinError(f"unknown export format {fmt!r} (expected one of "
                          f"{', '.join(FORMATS)})", out_path)
    keep = decision != "exclude"
    names, counts = np.unique(decision, return_counts=True)
    manifest = {
        "file": out_path.name, "format": fmt,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_samples": int(len(ids)), "n_written": int(keep.sum()),
        "counts": {str(k): int(v) for k, v in zip(names, counts)},
        "label_names": None if label_names is None else [str(n) for n in label_names],
        **extra,
        "samples": [{"sample_id": int(s), "original_label": int(o), "final_label": int(f),
                     "decision": str(d)} for s, o, f, d in zip(ids, y, final, decision)],
    }
    try:
        text = json.dumps(manifest, indent=1, default=_json_default)
    except TypeError as exc:
        raise DiffinError(f"manifest_extra is not JSON-serialisable ({exc})", out_path) from exc
    with atomic_path(out_path) as tmp:
        if fmt == "npz":
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
                np.savez(f, x=x[keep], y=final[keep], ids=ids[keep])
        elif fmt in ("csv", "parquet"):
            table = _table(x, y, ids, final, decision)
            table.to_csv(tmp, index=False) if fmt == "csv" else table.to_parquet(tmp, index=False)
        else:
            _write_imagefolder(tmp, x[keep], final[keep], ids[keep], label_names, image_shape,
                               out_path)
        with atomic_path(manifest_path(out_path)) as mtmp:
            mtmp.write_text(text, encoding="utf-8")
    return out_path


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} object")


def _table(x, y, ids, final, decision) -> pd.DataFrame:
    flat = x.reshape(len(x), -1)
    head = pd.DataFrame({"sample_id": ids, "label": final, "original_label": y,
                         "decision": decision})
    feats = pd.DataFrame(flat, columns=[f"f{i}" for i in range(flat.shape[1])])
    return pd.concat([head, feats], axis=1)


def _write_imagefolder(tmp: Path, x, labels, ids, label_names, image_shape, out_path) -> None:
    if image_shape is None:
        image_shape = x.shape[1:] if x.ndim == 4 else (1, *x.shape[1:]) if x.ndim == 3 else None
    if image_shape is None or len(image_shape) != 3 or image_shape[0] not in (1, 3):
        raise DiffinError(f"imagefolder export needs image_shape (C, H, W) with C 1 or 3, "
                          f"got {image_shape}", out_path)
    if len(x) and int(np.prod(image_shape)) != int(np.prod(x.shape[1:])):
        raise DiffinError(f"samples of shape {x.shape[1:]} cannot be reshaped to {image_shape}",
                          out_path)
    imgs = x.reshape(len(x), *image_shape)
    if np.issubdtype(imgs.dtype, np.floating) and len(imgs) and np.nanmax(imgs) <= 1.0:
        imgs = imgs * 255.0
    imgs = np.clip(np.nan_to_num(imgs), 0, 255).round().astype(np.uint8)
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:  # PNG is compressed
        for img, lab, sid in zip(imgs, labels, ids):
            if label_names is not None and not 0 <= lab < len(label_names):
                raise DiffinError(f"label {lab} of sample {sid} has no name", out_path)
            cls = _safe_name(label_names[lab] if label_names is not None else str(lab))
            zf.writestr(f"{cls}/{sid}.png", _png(img))


def _safe_name(name: str) -> str:
    name = re.sub(r"[/\\:\x00]", "_", str(name)).strip()
    return name if name not in ("", ".", "..") else f"_{name}_"


def _png(img: np.ndarray) -> bytes:
    """(C, H, W) uint8 -> PNG bytes (L for C=1, RGB for C=3)."""
    from PIL import Image

    arr = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()
