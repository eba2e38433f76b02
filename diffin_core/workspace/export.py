"""Export cleaned training splits (review decisions applied) or engine-chosen subsets.

Faithful exports: given ``source`` (``project_source(project)``: the split's own file), the
export keeps the original arrays, dtypes, shapes, ids and column order, byte for byte except
for the decisions (excluded rows removed, relabels written into the label):

* ``.npz`` -> npz: every array of the file and no other, row arrays filtered, ``y`` relabelled
  in its own dtype; compressed iff the input was. uint8 (N, 784) stays uint8 (N, 784). The
  written rows' sample ids are in the decisions manifest (``written_ids``), not added to a file
  that had none.
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

Streaming: ``x`` may be a streamed split's lazy ``sources.RowArray``; then nothing of the size
of the split is materialised: rows are read, filtered and written ``CHUNK_BYTES`` at a time
(npz members written through the zip stream, csv appended, parquet row groups, PNGs one by
one), and a memory-mapped source (an uncompressed .npz member, a folder's x.npy) is read
through ``sources.ArraySource`` in its stored dtype. A faithful npz copy streams every member,
a faithful parquet copy goes row group by row group.

Without ``source`` the arrays given are written the same way. Next to the export, ``<stem>.decisions.json`` records every
sample's final state (with who decided it and when), the sample ids of the written rows in file
order (``written_ids``: ``written_ids(out_path)``), the counts and the caller's
``manifest_extra`` (run, method, score columns, settings). Both files are written atomically; an error leaves neither behind.
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

from diffin_core.project.atomic import atomic_path
from diffin_core.errors import DiffinError
from diffin_core.project.sources import ArraySource, RowArray

FORMATS = ("npz", "csv", "parquet", "imagefolder")
TEXT_FORMATS = ("csv", "tsv", "jsonl", "parquet")   # text splits (textexport.py)
IMAGES_SUFFIX = ".images.zip"      # an uploaded ImageFolder zip, kept beside its npz
CHUNK_BYTES = 64 * 2**20           # streamed exports: rows read and written per chunk


@dataclass(frozen=True)
class Source:
    """The file a split was read from, for faithful exports (rows in the split's order)."""
    path: Path
    label_column: str = "label"
    kind: str = ""                   # "text": a text split's file (textexport.py writes it)

    @property
    def images(self) -> Path | None:
        """The original ImageFolder zip of an uploaded image split, when kept."""
        p = self.path.with_name(self.path.stem + IMAGES_SUFFIX)
        return p if self.path.suffix.lower() == ".npz" and p.is_file() else None

    @property
    def format(self) -> str | None:
        """The export format that copies this source faithfully (None: convert)."""
        if self.kind == "text":
            from diffin_core.workspace.textexport import text_format
            return text_format(self.path)
        if self.images is not None:
            return "imagefolder"
        return {".npz": "npz", ".csv": "csv", ".parquet": "parquet"}.get(self.path.suffix.lower())


def project_source(project, split: str = "train") -> Source | None:
    """The ``Source`` of a project's split (``[data] train`` / ``query``): an .npz, .csv or
    .parquet file or a folder with x.npy (converted from x.npy's stored dtype); None for other
    sources (image folders: exports then write the arrays given)."""
    path = project.path(project.config["data"][split])
    if project.kind == "text":                               # the text file itself, row for row
        from diffin_core.workspace.textexport import text_format
        return Source(path, project.label_column, "text") if path.is_file() and text_format(path) else None
    if path.is_dir() and (path / "x.npy").is_file():        # a folder of .npy: x.npy's stored dtype
        return Source(path, project.label_column)
    if not path.is_file() or path.suffix.lower() not in (".npz", ".csv", ".parquet"):
        return None
    return Source(path, project.label_column)


def check_out_path(project, out_path: str | Path) -> Path:
    """Refuse (one line) an export path that would overwrite what the project reads: its
    diffin.toml, model files, data (the split files and their folders), checkpoints, tokenizer
    or runs, or the decisions manifest written beside the export landing on one of those.
    Returns the resolved path. (Inside the project, ``exports/`` is the place for exports.)"""
    out = Path(out_path).expanduser().resolve()
    if out.is_dir():
        raise DiffinError(f"is a folder: --out takes a file name (e.g. {out / 'clean.npz'})", out)
    root = project.root
    cfg = project.config
    files = {project.config_path, project.manifest_path, root / ".setup.json"}
    files |= {root / f"review.sqlite{end}" for end in ("", "-wal", "-shm", "-journal")}
    folders = {project.manifest_path.parent, root / "runs", root / "tokenized"}
    for key in ("factory", "program"):
        if key in cfg.get("model", {}):
            files.add(project.path(str(cfg["model"][key]).split(":")[0]))
    if cfg.get("train", {}).get("recipe"):
        files.add(project.path(str(cfg["train"]["recipe"]).split(":")[0]))
    # modules model.py may import: .py files and package folders at the project's top
    files |= set(root.glob("*.py"))
    folders |= {d for d in root.iterdir() if d.is_dir() and (d / "__init__.py").is_file()} if root.is_dir() else set()
    files = {f.resolve() for f in files}
    folders = {d.resolve() for d in folders}
    root = root.resolve()
    for split in ("train", "query"):
        if split in cfg.get("data", {}):
            p = project.path(cfg["data"][split])
            files.add(p)
            files.add(p.with_name(p.stem + IMAGES_SUFFIX))
            folders.add(p if p.is_dir() else p.parent)
    if cfg.get("data", {}).get("tokenizer"):
        tok = project.path(cfg["data"]["tokenizer"])
        (folders if tok.is_dir() else files).add(tok)
    for target in (out, manifest_path(out)):
        hit = next((f for f in files if target == f), None)
        where = next((d for d in folders if d != root and (target == d or d in target.parents)), None)
        if hit is not None or where is not None:
            what = f"the project's own {hit.name}" if hit is not None else \
                f"the project's {where.relative_to(root) if root in where.parents or where == root else where}/ folder"
            raise DiffinError(f"refusing to write the export into {what}: it would overwrite what the project "
                              f"reads; write it elsewhere (e.g. {root / 'exports' / out.name})", out)
    return out


def written_ids(out_path: str | Path) -> np.ndarray:
    """The sample ids of an export's rows, in file order, from its decisions manifest."""
    path = manifest_path(out_path)
    try:
        return np.asarray(json.loads(path.read_text(encoding="utf-8"))["written_ids"], dtype=np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise DiffinError(f"no readable decisions manifest with written_ids ({exc})", path) from exc


def manifest_path(out_path: str | Path) -> Path:
    """Where the decisions manifest of ``out_path`` goes: ``<stem>.decisions.json``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".decisions.json")


def _check_rows(x, y, sample_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y int64, ids int64); a lazy x (RowArray, ArraySource) stays lazy."""
    x = x if _lazy(x) else np.asarray(x)
    y, ids = np.asarray(y), np.asarray(sample_ids)
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
                 manifest_extra: dict, source: Source | None = None,
                 votes: pd.DataFrame | None = None, num_classes: int | None = None) -> Path:
    """Write the split with review ``state`` applied in ``fmt``; returns ``out_path``.
    With ``source`` the original data is written (module docstring), else ``x``.

    The manifest's row of each decided sample names who decided it and when (``decided_by``,
    ``decided_at``, ``how``: single / consensus / resolution, from ``ReviewLog.state()``) and,
    with ``votes`` (``ReviewLog.votes()``), every reviewer's vote on it. With ``num_classes`` a
    relabel to a label outside the classes is refused in one line."""
    x, y, ids = _check_rows(x, y, sample_ids)
    decision, final = _decide(y, ids, state)
    n_cls = num_classes
    bad = (decision == "relabel") & ((final < 0) | (final >= n_cls)) if n_cls else np.zeros(len(y), bool)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DiffinError(f"sample {int(ids[i])} is relabelled to {int(final[i])}, outside the {n_cls} classes "
                          "(0..{}); nothing was written".format(n_cls - 1), out_path)
    return _export(out_path, fmt, x, y, ids, final, decision, label_names, image_shape,
                   {"kind": "review", **manifest_extra}, source, _provenance(state, votes))


def _provenance(state: pd.DataFrame, votes: pd.DataFrame | None) -> dict[int, dict]:
    """{sample_id: {decided_by, decided_at, how, votes}} for the decisions manifest."""
    out: dict[int, dict] = {}
    if state is not None and len(state) and "user" in state.columns:
        for sid, r in state.iterrows():
            out[int(sid)] = {"decided_by": str(r["user"]),
                             "decided_at": None if pd.isna(r.get("ts")) else str(r.get("ts")),
                             **({"how": str(r["how"])} if "how" in state.columns else {})}
    if votes is not None and len(votes):
        for sid, g in votes.groupby("sample_id"):
            out.setdefault(int(sid), {})["votes"] = [
                {"user": str(u), "action": str(a), "label": None if pd.isna(lab) else int(lab), "at": str(t)}
                for u, a, lab, t in zip(g["user"], g["action"], g["label"], g["ts"])]
    return out


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
    if len(keep_mask) and not keep_mask.any():
        raise DiffinError(f"the selection keeps none of the {len(keep_mask)} training samples: nothing to export "
                          "(keep a larger fraction, or drop fewer)", out_path)
    decision = np.where(keep_mask, "keep", "exclude")
    return _export(out_path, fmt, x, y, ids, y.copy(), decision, label_names, image_shape,
                   {"kind": "subset", "reason": reason, **(manifest_extra or {})}, source)


def _export(out_path, fmt, x, y, ids, final, decision, label_names, image_shape, extra, source=None,
            provenance: dict | None = None) -> Path:
    out_path = Path(out_path)
    is_text = source is not None and source.kind == "text"
    allowed = TEXT_FORMATS if is_text else FORMATS
    if fmt not in allowed:
        raise DiffinError(f"unknown export format {fmt!r} (expected one of "
                          f"{', '.join(allowed)}{' for a text split' if is_text else ''})", out_path)
    keep = decision != "exclude"
    names, counts = np.unique(decision, return_counts=True)
    manifest = {
        "file": out_path.name, "format": fmt,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_samples": int(len(ids)), "n_written": int(keep.sum()),
        "written_ids": [int(i) for i in ids[keep]],      # the written rows' sample ids, in file order
        "counts": {str(k): int(v) for k, v in zip(names, counts)},
        "label_names": None if label_names is None else [str(n) for n in label_names],
        "source": None if source is None else str(source.path),
        "faithful": source is not None and source.format == fmt,
        **extra,
        "samples": [{"sample_id": int(s), "original_label": int(o), "final_label": int(f),
                     "decision": str(d), **(provenance or {}).get(int(s), {})}
                    for s, o, f, d in zip(ids, y, final, decision)],
    }
    try:
        text = json.dumps(manifest, indent=1, default=_json_default)
    except TypeError as exc:
        raise DiffinError(f"manifest_extra is not JSON-serialisable ({exc})", out_path) from exc
    if out_path.is_dir():
        raise DiffinError(f"is a folder: --out takes a file name (e.g. {out_path / 'clean.npz'})", out_path)
    try:
        with atomic_path(out_path) as tmp:
            if source is not None:
                _write_from_source(tmp, fmt, source, x, ids, y, final, decision, label_names, image_shape, out_path)
            else:
                _write_arrays(tmp, fmt, x, y, ids, final, decision, label_names, image_shape, out_path)
            with atomic_path(manifest_path(out_path)) as mtmp:
                mtmp.write_text(text, encoding="utf-8")
    except OSError as exc:     # a folder that cannot be made or written, a full disk: one line
        raise DiffinError(f"cannot write the export ({exc.strerror or str(exc) or type(exc).__name__})",
                          out_path) from None
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


def _write_imagefolder(tmp: Path, x, labels, ids, label_names, image_shape, out_path, keep=None) -> None:
    """PNGs of x's rows (only the ``keep`` ones when given: a lazy x is then read chunk by chunk,
    and float data is scaled to 0-255 when the whole split's max is <= 1)."""
    if keep is not None:
        return _write_imagefolder_stream(tmp, x, labels, ids, label_names, image_shape, out_path, keep)
    imgs = x.reshape(len(x), *_image_shape(x, image_shape, out_path))
    if np.issubdtype(imgs.dtype, np.floating) and len(imgs) and np.nanmax(imgs) <= 1.0:
        imgs = imgs * 255.0
    imgs = np.clip(np.nan_to_num(imgs), 0, 255).round().astype(np.uint8)
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:  # PNG is compressed
        for img, lab, sid in zip(imgs, labels, ids):
            if label_names is not None and not 0 <= lab < len(label_names):
                raise DiffinError(f"label {lab} of sample {sid} has no name", out_path)
            cls = _safe_name(label_names[lab] if label_names is not None else str(lab))
            zf.writestr(f"{cls}/{sid}.png", _png(img))


def _image_shape(x, image_shape, out_path):
    ndim = len(x.shape)
    if image_shape is None:
        image_shape = x.shape[1:] if ndim == 4 else (1, *x.shape[1:]) if ndim == 3 else None
    if image_shape is None or len(image_shape) != 3 or image_shape[0] not in (1, 3):
        raise DiffinError(f"imagefolder export needs image_shape (C, H, W) with C 1 or 3, "
                          f"got {image_shape}", out_path)
    if len(x) and int(np.prod(image_shape)) != int(np.prod(x.shape[1:])):
        raise DiffinError(f"samples of shape {tuple(x.shape[1:])} cannot be reshaped to {image_shape}",
                          out_path)
    return tuple(image_shape)


def _write_imagefolder_stream(tmp: Path, x, labels, ids, label_names, image_shape, out_path, keep) -> None:
    image_shape = _image_shape(x, image_shape, out_path)
    scale = False
    if np.issubdtype(np.dtype(x.dtype), np.floating) and keep.any():    # one pass for the max, as the whole-array writer
        top = max(float(np.nanmax(part)) if part.size else -np.inf for part in _row_chunks(x, keep))
        scale = top <= 1.0
    idx = np.flatnonzero(keep)
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:  # PNG is compressed
        at = 0
        for part in _row_chunks(x, keep):
            imgs = part.reshape(len(part), *image_shape)
            imgs = np.clip(np.nan_to_num(imgs * 255.0 if scale else imgs), 0, 255).round().astype(np.uint8)
            for img in imgs:
                i = idx[at]
                at += 1
                lab, sid = labels[i], ids[i]
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
    if source.kind == "text":
        from diffin_core.workspace.textexport import write_text_export
        return write_text_export(tmp, fmt, source.path, source.label_column, y, final, decision, label_names)
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
    _write_arrays(tmp, fmt, x, y, ids, final, decision, label_names, image_shape, out_path)


def _write_arrays(tmp: Path, fmt, x, y, ids, final, decision, label_names, image_shape, out_path) -> None:
    """The conversion writers (x given: in memory, or lazy and then streamed chunk by chunk)."""
    keep = decision != "exclude"
    if not _lazy(x):
        if fmt == "npz":
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
                np.savez(f, x=x[keep], y=final[keep], ids=ids[keep])
        elif fmt in ("csv", "parquet"):
            table = _table(x, y, ids, final, decision)
            table.to_csv(tmp, index=False) if fmt == "csv" else table.to_parquet(tmp, index=False)
        else:
            _write_imagefolder(tmp, x[keep], final[keep], ids[keep], label_names, image_shape, out_path)
        return
    if fmt == "npz":
        rows = int(keep.sum())
        _write_npz_stream(tmp, [("x", x.dtype, (rows, *x.shape[1:]), _row_chunks(x, keep)),
                                ("y", final.dtype, (rows,), [final[keep]]),
                                ("ids", ids.dtype, (rows,), [ids[keep]])], compressed=False)
    elif fmt == "csv":
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            for i, (a, b, part) in enumerate(_row_chunks(x, None, spans=True)):
                _table(part, y[a:b], ids[a:b], final[a:b], decision[a:b]).to_csv(f, index=False, header=i == 0)
        if len(ids) == 0:
            _table(np.empty((0, *x.shape[1:]), x.dtype), y, ids, final, decision).to_csv(tmp, index=False)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        writer = None
        try:
            for a, b, part in _row_chunks(x, None, spans=True):
                t = pa.Table.from_pandas(_table(part, y[a:b], ids[a:b], final[a:b], decision[a:b]), preserve_index=False)
                writer = writer or pq.ParquetWriter(tmp, t.schema)
                writer.write_table(t)
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            _table(np.empty((0, *x.shape[1:]), x.dtype), y, ids, final, decision).to_parquet(tmp, index=False)
    else:
        _write_imagefolder(tmp, x, final, ids, label_names, image_shape, out_path, keep=keep)


def _lazy(x) -> bool:
    """True for x read from disk on demand (a streamed split's RowArray, a mapped ArraySource)."""
    return isinstance(x, (RowArray, ArraySource))


def _chunk_rows(x) -> int:
    row = int(np.prod(x.shape[1:], dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return max(1, CHUNK_BYTES // max(row, 1))


def _row_chunks(x, keep: np.ndarray | None, spans: bool = False):
    """x's rows [a, b) CHUNK_BYTES at a time, only the ``keep`` ones (None: all); in the stored
    dtype for an ArraySource. ``spans``: yield (a, b, rows) instead of rows."""
    n, size = len(x), _chunk_rows(x)
    for a in range(0, n, size):
        b = min(n, a + size)
        k = None if keep is None else keep[a:b]
        if k is not None and not k.any():
            continue
        if isinstance(x, ArraySource):
            rows = np.arange(a, b) if k is None else np.arange(a, b)[k]
            part = x.read(rows)
        else:
            part = np.asarray(x[a:b])
            part = part if k is None else part[k]
        yield (a, b, part) if spans else part


def _write_npz_stream(tmp: Path, members, compressed: bool) -> None:
    """An .npz as np.savez / np.savez_compressed writes it, each member given as (name, dtype,
    shape, chunks): the .npy header, then the chunks' bytes in C order, through the zip stream."""
    fmt = np.lib.format
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED,
                         allowZip64=True) as zf:
        for name, dtype, shape, chunks in members:
            dtype = np.dtype(dtype)
            header = {"descr": fmt.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(int(v) for v in shape)}
            written = 0
            with zf.open(name + ".npy", "w", force_zip64=True) as fh:
                try:
                    fmt.write_array_header_1_0(fh, header)
                except ValueError:                       # a header too long for version 1.0
                    fmt.write_array_header_2_0(fh, header)
                for part in chunks:
                    part = np.ascontiguousarray(part, dtype=dtype)
                    fh.write(part.tobytes())
                    written += len(part) if part.ndim else 1
            expect = shape[0] if len(shape) else 1
            if written != expect:
                raise DiffinError(f"{name}: wrote {written} rows, expected {expect} (the source changed?)", tmp)


def _rows_mismatch(source: Source, found: int, n: int) -> DiffinError:
    return DiffinError(f"the file has {found} rows but the project's split has {n}: it changed since "
                       "the project was opened; reopen it", source.path)


def _raw_x(source: Source, n: int) -> np.ndarray | None:
    """The features as stored (dtype and shape of the file), rows in the split's order; None
    when the file's features are not plain numbers."""
    if source.path.is_dir():
        x = ArraySource.npy(source.path / "x.npy")            # mapped: read chunk by chunk
    elif source.path.suffix.lower() == ".npz":
        x = ArraySource.npz_member(source.path, "x")          # stored uncompressed: mapped
        if x is None:
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
    """Every member of the source npz, in order, streamed member by member and chunk by chunk
    (never a whole array in memory): row arrays filtered by ``keep``, ``y`` relabelled in its own
    dtype, no array added (the rows' ids are in the manifest); compressed iff it was."""
    from diffin_core.project.sources import _npy_header
    n = len(ids)
    with zipfile.ZipFile(source.path) as zf:
        infos = [i for i in zf.infolist() if i.filename.endswith(".npy")]
        compressed = any(i.compress_type != zipfile.ZIP_STORED for i in zf.infolist())
        heads = {}
        for info in infos:
            with zf.open(info) as fh:
                _off, dtype, shape, fortran = _npy_header(fh, source.path)
            heads[info.filename[:-4]] = (info, dtype, shape, fortran)
        if "y" not in heads:
            raise DiffinError("an .npz split needs arrays 'x' and 'y'", source.path)
        if len(heads["y"][2]) != 1 or heads["y"][2][0] != n:
            raise _rows_mismatch(source, heads["y"][2][0] if heads["y"][2] else 0, n)
        filtering = not keep.all()
        members = []
        for name, (info, dtype, shape, fortran) in heads.items():
            rows = len(shape) >= 1 and shape[0] == n
            out_shape = (int(keep.sum()), *shape[1:]) if filtering and rows else shape
            if name == "y" and relabel.any():
                y = final.astype(dtype)
                members.append((name, dtype, out_shape, [y[keep] if filtering else y]))
            else:
                members.append((name, dtype, out_shape,
                                _member_chunks(zf, info, dtype, shape, fortran, keep if filtering and rows else None)))
        _write_npz_stream(tmp, members, compressed)


def _member_chunks(zf: zipfile.ZipFile, info, dtype, shape, fortran: bool, keep: np.ndarray | None):
    """An npz member's rows read from its (possibly compressed) zip stream CHUNK_BYTES at a time,
    only the ``keep`` ones when given. Fortran-ordered members are read whole."""
    from diffin_core.project.sources import _npy_header
    with zf.open(info) as fh:
        _npy_header(fh, info.filename)
        if fortran or len(shape) == 0:
            arr = np.lib.format.read_array(zf.open(info), allow_pickle=False)
            yield arr if keep is None else arr[keep]
            return
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        size = max(1, CHUNK_BYTES // max(row, 1))
        for a in range(0, shape[0], size):
            b = min(shape[0], a + size)
            raw = fh.read((b - a) * row)
            if len(raw) != (b - a) * row:
                raise DiffinError(f"the member {info.filename!r} is truncated", zf.filename)
            part = np.frombuffer(raw, dtype=dtype).reshape((b - a, *shape[1:]))
            yield part if keep is None else part[keep[a:b]]


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
    """The source's Arrow table (relabel_parquet), the label column holding the final label ids."""
    import pyarrow as pa
    from diffin_core.workspace.parquetcopy import relabel_parquet
    relabel_parquet(tmp, source.path, source.label_column, keep, relabel,
                    lambda old, a, b: pa.array(final[a:b], type=pa.int64()).cast(old.type),
                    lambda found, n: _rows_mismatch(source, found, n))


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
