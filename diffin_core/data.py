"""Loading and checking a split: .npz (x, y, optional ids), .csv or .parquet (label column + features).

A loaded split is a ``Split``: ``x`` float32 (N, *feature_shape), ``y`` int64 (N,), ``ids`` int64
(N,) (the row index unless the file gives ids) and optional ``true_y`` (N,) when the file knows
the clean labels (the sample project does, to show recall). Images stored as uint8 are scaled
to [0, 1]. Every problem is a one-line DiffinError naming the file.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DiffinError


@dataclass
class Split:
    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    true_y: np.ndarray | None = None
    path: str = ""

    def __len__(self) -> int:
        return len(self.y)


def _labels(raw, path) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.ndim != 1:
        raise DiffinError(f"labels must be one-dimensional, got shape {raw.shape}", path)
    if raw.dtype.kind == "f":
        if np.isnan(raw).any():
            raise DiffinError("labels contain NaN", path)
        if not np.all(raw == np.round(raw)):
            raise DiffinError("labels must be whole numbers (class indices)", path)
    elif raw.dtype.kind not in "iub":
        raise DiffinError(f"labels must be class indices, got {raw.dtype} values", path)
    return raw.astype(np.int64)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files or "y" not in z.files:
                raise DiffinError(f"an .npz split needs arrays 'x' and 'y'; found {sorted(z.files)}", path)
            return (z["x"], z["y"], z["ids"] if "ids" in z.files else None,
                    z["true_y"] if "true_y" in z.files else None)
    except DiffinError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise DiffinError(f"not a readable .npz file ({type(e).__name__}: {e})", path) from None


def _read_table(path: Path, label_column: str):
    import pandas as pd
    try:
        df = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except Exception as e:  # pandas/pyarrow raise many types for a bad file
        raise DiffinError(f"not a readable {path.suffix} table ({type(e).__name__})", path) from None
    if label_column not in df.columns:
        raise DiffinError(f"no label column {label_column!r}; columns are {list(df.columns)[:8]}", path)
    ids = df.pop("sample_id").to_numpy() if "sample_id" in df.columns else None
    true_y = df.pop("true_label").to_numpy() if "true_label" in df.columns else None
    y = df.pop(label_column).to_numpy()
    bad = [c for c in df.columns if not np.issubdtype(df[c].dtype, np.number)]
    if bad:
        raise DiffinError(f"feature columns must be numeric; {bad[0]!r} is {df[bad[0]].dtype}", path)
    return df.to_numpy(dtype=np.float32), y, ids, true_y


def load_split(path: str | Path, *, label_column: str = "label", image_shape=None,
               num_classes: int | None = None, allow_empty: bool = False) -> Split:
    """Read and check one split; ``image_shape`` (C, H, W) reshapes flat image rows."""
    path = Path(path)
    if not path.is_file():
        raise DiffinError("file not found", path)
    if path.stat().st_size == 0:
        raise DiffinError("the file is empty (0 bytes)", path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        x, y, ids, true_y = _read_npz(path)
    elif suffix in (".csv", ".parquet"):
        x, y, ids, true_y = _read_table(path, label_column)
    else:
        raise DiffinError(f"unsupported data format {suffix!r}; use .npz, .csv or .parquet", path)
    y = _labels(y, path)
    x = np.asarray(x)
    if x.dtype.kind not in "fiub":
        raise DiffinError(f"features must be numeric, got {x.dtype}", path)
    if len(x) != len(y):
        raise DiffinError(f"x has {len(x)} rows but y has {len(y)}", path)
    if len(y) == 0 and not allow_empty:
        raise DiffinError("the split has no samples", path)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x.reshape(len(x), -1)))[0, 0])
        raise DiffinError(f"features contain NaN or infinite values (first at row {bad})", path)
    if image_shape is not None:
        shape = tuple(int(s) for s in image_shape)
        if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
            raise DiffinError(f"each sample has shape {tuple(x.shape[1:])}, which does not fit image_shape {list(shape)}", path)
        x = x.reshape((len(x), *shape))
    if num_classes is not None and len(y) and (y.min() < 0 or y.max() >= num_classes):
        bad = int(y[(y < 0) | (y >= num_classes)][0])
        raise DiffinError(f"label {bad} is out of range: the model has {num_classes} classes (0..{num_classes - 1})", path)
    ids = np.arange(len(y), dtype=np.int64) if ids is None else np.asarray(ids).astype(np.int64)
    if len(ids) != len(y) or len(np.unique(ids)) != len(ids):
        raise DiffinError("ids must be unique and one per sample", path)
    if true_y is not None:
        true_y = _labels(true_y, path)
    return Split(x, y, ids, true_y, str(path))


def save_split(path: str | Path, x: np.ndarray, y: np.ndarray, ids=None, true_y=None) -> Path:
    """Write an .npz split atomically (arrays x, y, ids, optional true_y)."""
    from .atomic import atomic_path
    arrays = {"x": x, "y": np.asarray(y, dtype=np.int64)}
    if ids is not None:
        arrays["ids"] = np.asarray(ids, dtype=np.int64)
    if true_y is not None:
        arrays["true_y"] = np.asarray(true_y, dtype=np.int64)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return Path(path)
