"""Export cleaned training splits (review decisions applied) or engine-chosen subsets.

Faithful exports: given ``source`` (``project_source(project)``: the split's own file), the
export keeps the original arrays, dtypes, shapes, ids and column order, byte for byte except
for the decisions (excluded rows removed, relabels written into the label):

* ``.npz`` -> npz: every array of the file, row arrays filtered, ``y`` relabelled in its own
  dtype; compressed iff the input was; ``ids`` added only when rows are removed and the input
  had none (so the rows keep their identity). uint8 (N, 784) stays uint8 (N, 784).
* ``.csv`` -> csv: the input's lines, minus excluded rows; a relabelled row's label field is
  the only field rewritten.
* ``.parquet`` -> parquet: the input's Arrow table (schema, column order, metadata), filtered,
  label column replaced in its own type.
* an uploaded ImageFolder zip (kept as ``<split>.images.zip`` with a ``files`` array in the
  npz) -> imagefolder: the original image files copied into ``<final class>/<file name>``.

Other combinations convert from the original arrays (never the engine's float32 view):

* ``npz``: arrays ``x`` (M, ...) in its stored dtype, ``y`` (M,), ``ids`` (M,) of the kept rows.
* ``csv`` / ``parquet``: one row per ORIGINAL sample: sample_id, label (final), original_label,
  decision, then f0..f{D-1} in the stored dtype. Excluded rows stay, marked "exclude".
* ``imagefolder``: a zip of ``<class_name>/<sample_id>.png``; x is reshaped to image_shape
  (C, H, W), C in {1, 3}; float data with max <= 1 is scaled to 0-255, uint8 is kept.

Without ``source`` the arrays given are written the same way. Next to the export, ``<stem>.decisions.json`` records every
sample's final state, the counts and the caller's ``manifest_extra`` (run, method, score
columns, settings). Both files are written atomically; an error leaves neither behind.
"""
from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from diffin_core.atomic import atomic_path
from diffin_core.errors import DiffinError

FORMATS = ("npz", "csv", "parquet", "imagefolder")
IMAGES_SUFFIX = ".images.zip"      # an uploaded ImageFolder zip, kept beside its npz


@dataclass(frozen=True)
class Source:
    """The file a split was read from, for faithful exports (rows in the split's order)."""
    path: Path
    label_column: str = "label"

    @property
    def images(self) -> Path | None:
        """The original ImageFolder zip of an uploaded image split, when kept."""
        p = self.path.with_name(self.path.stem + IMAGES_SUFFIX)
        return p if self.path.suffix.lower() == ".npz" and p.is_file() else None

    @property
    def format(self) -> str | None:
        """The export format that copies this source faithfully (None: convert)."""
        if self.images is not None:
            return "imagefolder"
        return {".npz": "npz", ".csv": "csv", ".parquet": "parquet"}.get(self.path.suffix.lower())


def project_source(project, split: str = "train") -> Source | None:
    """The ``Source`` of a project's split (``[data] train`` / ``query``): an .npz, .csv or
    .parquet file; None for other sources (folders: exports then write the arrays given)."""
    path = project.path(project.config["data"][split])
    if not path.is_file() or path.suffix.lower() not in (".npz", ".csv", ".parquet"):
        return None
    return Source(path, project.label_column)


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
                 manifest_extra: dict, source: Source | None = None) -> Path:
    """Write the split with review ``state`` applied in ``fmt``; returns ``out_path``.
    With ``source`` the original data is written (module docstring), else ``x``."""
    x, y, ids = _check_rows(x, y, sample_ids)
    decision, final = _decide(y, ids, state)
    return _export(out_path, fmt, x, y, ids, final, decision, label_names, image_shape,
                   {"kind": "review", **manifest_extra}, source)


def export_subset(out_path: str | Path, fmt: str, x: np.ndarray, y: np.ndarray,
                  sample_ids: np.ndarray, keep_mask: np.ndarray, *, reason: str,
                  label_names: list[str] | None = None,
                  image_shape: tuple[int, int, int] | None = None,
                  manifest_extra: dict | None = None, source: Source | None = None) -> Path:
    """Write an engine-chosen subset (``keep_mask`` (N,) bool; others marked "exclude")."""
    x, y, ids = _check_rows(x, y, sample_ids)
    keep_mask = np.asarray(keep_mask, dtype=bool)
    if keep_mask.shape != y.shape:
        raise DiffinError(f"keep_mask has shape {keep_mask.shape}, expected {y.shape}", out_path)
    decision = np.where(keep_mask, "keep", "exclude")
    return _export(out_path, fmt, x, y, ids, y.copy(), decision, label_names, image_shape,
                   {"kind": "subset", "reason": reason, **(manifest_extra or {})}, source)


def _export(out_path, fmt, x, y, ids, final, decision, label_names, image_shape, extra, source=None) -> Path:
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
        "source": None if source is None else str(source.path),
        "faithful": source is not None and source.format == fmt,
        **extra,
        "samples": [{"sample_id": int(s), "original_label": int(o), "final_label": int(f),
                     "decision": str(d)} for s, o, f, d in zip(ids, y, final, decision)],
    }
    try:
        text = json.dumps(manifest, indent=1, default=_json_default)
    except TypeError as exc:
        raise DiffinError(f"manifest_extra is not JSON-serialisable ({exc})", out_path) from exc
    with atomic_path(out_path) as tmp:
        if source is not None:
            _write_from_source(tmp, fmt, source, x, ids, y, final, decision, label_names, image_shape, out_path)
        elif fmt == "npz":
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


# --- faithful writers: from the split's own file ------------------------------------------------

def _write_from_source(tmp: Path, fmt, source: Source, x_view, ids, y, final, decision, label_names,
                       image_shape, out_path) -> None:
    """Write ``fmt`` from ``source``: a faithful copy when it is the source's own format, else a
    conversion of its original (stored-dtype) arrays (of ``x_view`` when the file has no plain
    numeric features, e.g. a parquet of encoded images)."""
    relabel, keep = final != y, decision != "exclude"
    if fmt == source.format:
        if fmt == "npz":
            return _npz_faithful(tmp, source, ids, final, keep, relabel)
        if fmt == "csv":
            return _csv_faithful(tmp, source, y, final, keep, relabel)
        if fmt == "parquet":
            return _parquet_faithful(tmp, source, y, final, keep, relabel)
        return _imagefolder_copy(tmp, source, ids, final, keep, label_names)
    x = _raw_x(source, len(ids))
    if x is None:
        x = x_view
    if fmt == "npz":
        with open(tmp, "wb") as f:
            np.savez(f, x=x[keep], y=final[keep], ids=ids[keep])
    elif fmt in ("csv", "parquet"):
        table = _table(np.asarray(x), y, ids, final, decision)
        table.to_csv(tmp, index=False) if fmt == "csv" else table.to_parquet(tmp, index=False)
    else:
        _write_imagefolder(tmp, x[keep], final[keep], ids[keep], label_names, image_shape, out_path)


def _rows_mismatch(source: Source, found: int, n: int) -> DiffinError:
    return DiffinError(f"the file has {found} rows but the project's split has {n}: it changed since "
                       "the project was opened; reopen it", source.path)


def _raw_x(source: Source, n: int) -> np.ndarray | None:
    """The features as stored (dtype and shape of the file), rows in the split's order; None
    when the file's features are not plain numbers."""
    if source.path.suffix.lower() == ".npz":
        with np.load(source.path, allow_pickle=False) as z:
            x = z["x"]
    else:
        df = pd.read_csv(source.path) if source.path.suffix.lower() == ".csv" else pd.read_parquet(source.path)
        feats = df.drop(columns=[c for c in (source.label_column, "sample_id", "true_label") if c in df])
        if not all(np.issubdtype(t, np.number) for t in feats.dtypes):
            return None
        x = feats.to_numpy()
    if len(x) != n:
        raise _rows_mismatch(source, len(x), n)
    return x


def _npz_faithful(tmp, source: Source, ids, final, keep, relabel) -> None:
    with np.load(source.path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    with zipfile.ZipFile(source.path) as zf:
        compressed = any(i.compress_type != zipfile.ZIP_STORED for i in zf.infolist())
    n = len(ids)
    if len(arrays["y"]) != n:
        raise _rows_mismatch(source, len(arrays["y"]), n)
    if relabel.any():
        arrays["y"] = final.astype(arrays["y"].dtype)
    if not keep.all():
        arrays = {k: a[keep] if a.ndim >= 1 and len(a) == n else a for k, a in arrays.items()}
        if "ids" not in arrays:       # rows removed: keep their identity (the row index)
            arrays["ids"] = ids[keep]
    with open(tmp, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)


def _newline(text: str) -> str:
    return "\r\n" if "\r\n" in text[:65536] else "\n"


def _label_text(old: str, new: int) -> str:
    """A label written like the field it replaces ("3" or "3.0")."""
    return f"{float(new)!r}" if "." in old or "e" in old.lower() else str(int(new))


def _csv_faithful(tmp, source: Source, y, final, keep, relabel) -> None:
    raw = source.path.read_bytes()
    text = raw.decode("utf-8")
    header = next(csv.reader([text.splitlines()[0]]))
    if source.label_column not in header:
        raise DiffinError(f"no label column {source.label_column!r}", source.path)
    col, nl, n = header.index(source.label_column), _newline(text), len(y)
    lines = text.splitlines(keepends=True)
    body = [ln for ln in lines[1:] if ln.strip()]
    if len(body) == n and '"' not in text:      # one line per row: copy lines, edit only relabels
        out = [lines[0]]
        for i, ln in enumerate(body):
            if not keep[i]:
                continue
            if relabel[i]:
                eol = ln[len(ln.rstrip("\r\n")):]
                fields = ln.rstrip("\r\n").split(",")
                fields[col] = _label_text(fields[col], final[i])
                ln = ",".join(fields) + eol
            out.append(ln)
        tmp.write_bytes("".join(out).encode("utf-8"))
        return
    records = [r for r in csv.reader(io.StringIO(text, newline="")) if r]   # quoted fields, newlines in fields
    if len(records) - 1 != n:
        raise _rows_mismatch(source, len(records) - 1, n)
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator=nl)
        w.writerow(records[0])
        for i, r in enumerate(records[1:]):
            if keep[i]:
                if relabel[i]:
                    r[col] = _label_text(r[col], final[i])
                w.writerow(r)


def _parquet_faithful(tmp, source: Source, y, final, keep, relabel) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pq.read_table(source.path)
    if table.num_rows != len(y):
        raise _rows_mismatch(source, table.num_rows, len(y))
    if relabel.any():
        i = table.schema.get_field_index(source.label_column)
        field = table.schema.field(i)
        table = table.set_column(i, field, pa.array(final, type=pa.int64()).cast(field.type))
    if not keep.all():
        table = table.filter(pa.array(keep))
    pq.write_table(table, tmp)


def _imagefolder_copy(tmp, source: Source, ids, final, keep, label_names) -> None:
    with np.load(source.path, allow_pickle=False) as z:
        files = [str(f) for f in z["files"]] if "files" in z.files else None
    if files is None or len(files) != len(ids):
        raise DiffinError("the npz has no 'files' array naming each row's image in the zip", source.path)
    used = set()
    with zipfile.ZipFile(source.images) as src, zipfile.ZipFile(tmp, "w") as dst:
        for i in np.flatnonzero(keep):
            info = src.getinfo(files[i])
            lab = int(final[i])
            cls = _safe_name(label_names[lab] if label_names is not None and 0 <= lab < len(label_names) else str(lab))
            name = f"{cls}/{Path(files[i]).name}"
            if name in used:
                name = f"{cls}/{int(ids[i])}-{Path(files[i]).name}"
            used.add(name)
            dst.writestr(zipfile.ZipInfo(name, info.date_time), src.read(info), compress_type=info.compress_type)
