"""Loading and checking a split: .npz, .csv, .parquet, a folder of .npy files or an image folder.

A loaded split is a ``Split``: ``x`` float32 (N, *feature_shape), ``y`` int64 (N,), ``ids`` int64
(N,) (the row index unless the file gives ids) and optional ``true_y`` (N,) when the file knows
the clean labels (the sample project does, to show recall). Images stored as uint8 are scaled
to [0, 1]. Every problem is a one-line DiffinError naming the file.

Sources (``[data] train/query`` point at one of them):

* ``*.npz``: arrays x, y, optional ids, true_y. Written with ``np.savez`` (uncompressed) its x
  is memory-mapped; ``np.savez_compressed`` files can only be read whole into memory.
* a folder holding ``x.npy`` and ``y.npy`` (optional ``ids.npy``, ``true_y.npy``): memory-mapped.
* ``*.csv`` / ``*.parquet``: a label column plus numeric feature columns (read into memory);
  with ``[data] image_column`` a parquet column of encoded images (Hugging Face datasets'
  ``{"bytes", "path"}`` struct or plain bytes), read by row group and decoded lazily.
* an image folder ``<dir>/<class>/<image>``: class index = position in ``label_names`` when
  given, else in the sorted folder names (the query split uses the train split's classes).

Streaming (``[data] stream``): labels and ids are always read at load time (small). ``x`` is
either a numpy array or, streamed, a ``sources.RowArray`` that reads only the rows asked for:
``len(x)``, ``x.shape``, ``x[i]``, ``x[a:b]``, ``x[int array]``, ``x[bool mask]`` and
``np.asarray(x)`` all give float32 numpy data, so every caller works on either.
``stream = "auto"`` (default) streams when the decoded float32 x would exceed
``STREAM_ABOVE_BYTES`` (1 GiB); ``true`` streams every source that can be (a compressed .npz,
a csv and a tabular parquet are always read into memory); ``false`` reads everything.
Engine code walks a split with ``split.iter_chunks(size, start, stop, workers)`` (a torch
DataLoader whose workers decode chunks in parallel; ``[data] workers`` sets the default) and
shards it with ``split.rows(a, b)``.
Image decoding: ``[data] image_shape`` (C, H, W) sets channels and size, ``resize`` allows other
sizes, ``max_pixels`` caps width x height per image (decompression bombs); see sources.py.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffin_core.errors import DiffinError
from diffin_core.project.sources import MAX_PIXELS, ArraySource, ImageFolderSource, ParquetImageSource, RowArray

STREAM_ABOVE_BYTES = 1 << 30       # stream = "auto": stream when float32 x is larger than this


@dataclass
class Split:
    x: np.ndarray | RowArray
    y: np.ndarray
    ids: np.ndarray
    true_y: np.ndarray | None = None
    path: str = ""
    classes: list[str] | None = None      # image folders, text label names: class names in label order
    workers: int = 0                      # iter_chunks' default DataLoader workers ([data] workers)
    kind: str = ""                        # "text" for a tokenised text split (text.py), else ""
    text_column: object = None            # text: the original texts (text.TextColumn), row for row
    pair_column: object = None            # text pairs: the second texts, or None
    offset: int = 0                       # first row of this view in text_column / pair_column
    meta: dict | None = None              # text: the tokenisation record (tokenized/<split>/meta.json)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def streamed(self) -> bool:
        """True when x is read from disk on demand (a ``RowArray``), not held in memory."""
        return isinstance(self.x, RowArray)

    def rows(self, start: int, stop: int) -> "Split":
        """Rows [start, stop) as a Split (a view: nothing is read; ids keep their values)."""
        sl = slice(start, stop)
        x = self.x.rows(start, stop) if self.streamed else self.x[sl]
        return Split(x, self.y[sl], self.ids[sl], None if self.true_y is None else self.true_y[sl],
                     self.path, self.classes, self.workers, self.kind, self.text_column, self.pair_column,
                     self.offset + slice(start, stop).indices(len(self))[0], self.meta)

    def texts(self, rows=None) -> list[str]:
        """The original texts of a text split at ``rows`` (positions in this split; all when None)."""
        return self._texts(self.text_column, rows)

    def text_pairs(self, rows=None) -> list[str] | None:
        """The second texts of a text-pair split at ``rows``; None for single texts."""
        return None if self.pair_column is None else self._texts(self.pair_column, rows)

    def _texts(self, column, rows) -> list[str]:
        if column is None:
            raise DiffinError("not a text split: it holds no texts", self.path)
        values = column.values()
        rows = range(len(self)) if rows is None else np.atleast_1d(np.asarray(rows, dtype=np.int64))
        return [values[self.offset + int(r)] for r in rows]

    def iter_chunks(self, size: int, start: int = 0, stop: int | None = None, workers: int | None = None):
        """Yield (chunk_start, x float32 (b, ...), y int64 (b,)) over rows [start, stop) in order,
        b <= size, through a torch DataLoader; ``workers`` > 0 reads/decodes chunks in that many
        worker processes (prefetching two chunks each); None = the split's ``workers``. A
        DiffinError raised while reading (a corrupt image...) is re-raised here, one line."""
        from torch.utils.data import DataLoader
        workers = self.workers if workers is None else workers
        stop = len(self) if stop is None else min(int(stop), len(self))
        size = max(1, int(size))
        loader = DataLoader(_Chunks(self, range(int(start), stop, size), size, stop), batch_size=None,
                            num_workers=int(workers), collate_fn=_as_is,
                            prefetch_factor=2 if workers else None, persistent_workers=False)
        for first, x, y in loader:
            if isinstance(x, DiffinError):
                raise DiffinError(x.problem, x.path)
            yield first, x, y


class _Chunks:
    """Map-style dataset: item i = rows [starts[i], starts[i] + size) of a split."""

    def __init__(self, split: Split, starts: range, size: int, stop: int):
        self.split, self.starts, self.size, self.stop = split, starts, size, stop

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int):
        a = self.starts[i]
        b = min(a + self.size, self.stop)
        try:
            return a, np.asarray(self.split.x[a:b], dtype=np.float32), self.split.y[a:b]
        except DiffinError as e:          # carried to the main process as a value: one line
            return a, e, None


def _as_is(item):
    return item


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


def _read_npz(path: Path):
    """(x, y, ids, true_y); x is an ``ArraySource`` when stored uncompressed, else in memory."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files or "y" not in z.files:
                raise DiffinError(f"an .npz split needs arrays 'x' and 'y'; found {sorted(z.files)}", path)
            mapped = ArraySource.npz_member(path, "x")
            return (mapped if mapped is not None else z["x"], z["y"], z["ids"] if "ids" in z.files else None,
                    z["true_y"] if "true_y" in z.files else None)
    except DiffinError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise DiffinError(f"not a readable .npz file ({type(e).__name__}: {e})", path) from None


def _read_npy_dir(path: Path):
    """A folder of .npy files: x.npy memory-mapped; y.npy, ids.npy, true_y.npy read."""
    if not (path / "y.npy").is_file():
        raise DiffinError("a folder of .npy arrays needs x.npy and y.npy; y.npy is missing", path)

    def small(name):
        f = path / f"{name}.npy"
        if not f.is_file():
            return None
        try:
            return np.load(f, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DiffinError(f"not a readable .npy array ({type(e).__name__}: {e})", f) from None
    return ArraySource.npy(path / "x.npy"), small("y"), small("ids"), small("true_y")


def _read_parquet_images(path: Path, label_column: str, image_column: str, shape, resize, max_pixels):
    """A parquet file with an encoded-image column: (source, y, ids, true_y); labels read now."""
    src = ParquetImageSource(path, image_column, shape, resize=resize, max_pixels=max_pixels)
    import pyarrow.parquet as pq
    names = pq.ParquetFile(path).schema_arrow.names
    if label_column not in names:
        raise DiffinError(f"no label column {label_column!r}; columns are {names[:8]}", path)
    cols = [c for c in (label_column, "sample_id", "true_label") if c in names]
    t = pq.read_table(path, columns=cols)
    col = lambda c: t.column(c).to_numpy() if c in cols else None    # noqa: E731
    return src, col(label_column), col("sample_id"), col("true_label")


def _read_image_folder(path: Path, shape, classes, resize, max_pixels):
    files, y, names = ImageFolderSource.scan(path, classes)
    return ImageFolderSource(files, shape, resize=resize, max_pixels=max_pixels), y, None, None, names


def _read_table(path: Path, label_column: str):
    import pandas as pd
    try:
        df = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except UnicodeDecodeError:
        from diffin_core.project.text import _utf8
        _utf8(path.read_bytes(), path)          # names the row (line) holding the bytes
        raise DiffinError("bytes that are not UTF-8; save the file as UTF-8", path) from None
    except Exception as e:  # pandas/pyarrow raise many types for a bad file
        raise DiffinError(f"not a readable {path.suffix} table ({type(e).__name__})", path) from None
    if label_column not in df.columns:
        raise DiffinError(f"no label column {label_column!r}; columns are {list(df.columns)[:8]}", path)
    ids = df.pop("sample_id").to_numpy() if "sample_id" in df.columns else None
    true_y = df.pop("true_label").to_numpy() if "true_label" in df.columns else None
    y = df.pop(label_column).to_numpy()
    from pandas.api.types import is_bool_dtype, is_numeric_dtype, is_object_dtype, is_string_dtype
    bad = [c for c in df.columns if not is_numeric_dtype(df[c].dtype) or is_bool_dtype(df[c].dtype)]
    if bad:
        c = bad[0]
        if is_string_dtype(df[c].dtype) or is_object_dtype(df[c].dtype):
            raise DiffinError(f"column {c!r} holds text, not numbers: for a text classifier set [data] kind = "
                              f"\"text\" and text_column = {str(c)!r} in diffin.toml", path)
        raise DiffinError(f"feature columns must be numeric; {c!r} is {df[c].dtype}", path)
    return df.to_numpy(dtype=np.float32), y, ids, true_y


def load_split(path: str | Path, *, label_column: str = "label", image_shape=None,
               num_classes: int | None = None, allow_empty: bool = False, stream: bool | str = "auto",
               image_column: str | None = None, resize: bool = False, max_pixels: int = MAX_PIXELS,
               classes: list[str] | None = None, workers: int = 0, text=None) -> Split:
    """Read and check one split; ``image_shape`` (C, H, W) reshapes flat image rows and sets the
    decoded size of encoded images. ``stream``, ``image_column``, ``resize``, ``max_pixels``:
    the ``[data]`` keys (module docstring); ``classes`` fixes an image folder's class order.
    ``text`` (a ``text.TextOptions``): a text split, tokenised (and cached) by text.py."""
    path = Path(path)
    if text is not None:
        return _load_text(path, text, num_classes, allow_empty, stream, workers)
    shape = None if image_shape is None else tuple(int(s) for s in image_shape)
    names = None
    if path.is_dir():
        if (path / "x.npy").is_file():
            x, y, ids, true_y = _read_npy_dir(path)
        elif shape is None or len(shape) != 3:
            raise DiffinError("a data folder needs x.npy and y.npy, or one sub-folder of images per class "
                              "with [data] image_shape = [C, H, W]", path)
        else:
            x, y, ids, true_y, names = _read_image_folder(path, shape, classes, resize, max_pixels)
    elif not path.is_file():
        raise DiffinError("file not found", path)
    elif path.stat().st_size == 0:
        raise DiffinError("the file is empty (0 bytes)", path)
    else:
        suffix = path.suffix.lower()
        if suffix == ".npz":
            x, y, ids, true_y = _read_npz(path)
        elif suffix == ".parquet" and image_column:
            if shape is None or len(shape) != 3:
                raise DiffinError("an image column needs [data] image_shape = [C, H, W]", path)
            x, y, ids, true_y = _read_parquet_images(path, label_column, image_column, shape, resize, max_pixels)
        elif suffix in (".csv", ".parquet"):
            x, y, ids, true_y = _read_table(path, label_column)
        else:
            raise DiffinError(f"unsupported data format {suffix!r}; use .npz, .csv, .parquet, a folder of "
                              f".npy files or an image folder", path)
    if y is None:
        raise DiffinError("no labels (y.npy) found", path)
    y = _labels(y, path)
    lazy = not isinstance(x, np.ndarray)
    if not lazy:
        x = np.asarray(x)
    dtype = x.dtype if not lazy else getattr(x, "dtype", np.dtype(np.uint8))
    if dtype.kind not in "fiub":
        raise DiffinError(f"features must be numeric, got {dtype}", path)
    if len(x) != len(y):
        raise DiffinError(f"x has {len(x)} rows but y has {len(y)}", path)
    if len(y) == 0 and not allow_empty:
        raise DiffinError("the split has no samples", path)
    feature_shape = tuple(x.shape[1:]) if not lazy else tuple(x.sample_shape)
    if shape is not None and int(np.prod(feature_shape)) != int(np.prod(shape)):
        raise DiffinError(f"each sample has shape {feature_shape}, which does not fit image_shape {list(shape)}", path)
    if lazy:
        x = RowArray(x, getattr(x, "path", str(path)), shape or feature_shape)   # errors name x.npy
        if stream is False or (stream == "auto" and x.nbytes <= STREAM_ABOVE_BYTES):
            x = np.asarray(x)                      # float32, finite-checked chunk by chunk
    else:
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        if not np.isfinite(x).all():
            bad = int(np.argwhere(~np.isfinite(x.reshape(len(x), -1)))[0, 0])
            raise DiffinError(f"features contain NaN or infinite values (first at row {bad})", path)
        if shape is not None:
            x = x.reshape((len(x), *shape))
    if num_classes is not None and len(y) and (y.min() < 0 or y.max() >= num_classes):
        bad = int(y[(y < 0) | (y >= num_classes)][0])
        raise DiffinError(f"label {bad} is out of range: the model has {num_classes} classes (0..{num_classes - 1})", path)
    ids = np.arange(len(y), dtype=np.int64) if ids is None else np.asarray(ids).astype(np.int64)
    if len(ids) != len(y) or len(np.unique(ids)) != len(ids):
        raise DiffinError("ids must be unique and one per sample", path)
    if true_y is not None:
        true_y = _labels(true_y, path)
    return Split(x, y, ids, true_y, str(path), names, int(workers))


def _load_text(path: Path, opts, num_classes, allow_empty, stream, workers) -> Split:
    from diffin_core.project.text import TEXT_SUFFIXES, tokenize_split
    if not path.is_file():
        raise DiffinError("file not found" if not path.is_dir() else
                          "a text split is one .csv, .tsv, .jsonl or .parquet file, not a folder", path)
    if path.stat().st_size == 0:
        raise DiffinError("the file is empty (0 bytes)", path)
    if path.suffix.lower() not in TEXT_SUFFIXES:
        raise DiffinError(f"unsupported text data format {path.suffix!r}; use .csv, .tsv, .jsonl or .parquet", path)
    tok = tokenize_split(path, opts)
    y, ids = np.asarray(tok.arrays["labels"]), np.asarray(tok.arrays["ids"])
    if len(y) == 0 and not allow_empty:
        raise DiffinError("the split has no samples", path)
    if len(np.unique(ids)) != len(ids):
        raise DiffinError("ids must be unique and one per sample", path)
    if num_classes is not None and len(y) and (y.min() < 0 or y.max() >= num_classes):
        bad = int(np.flatnonzero((y < 0) | (y >= num_classes))[0])
        raise DiffinError(f"row {bad}: label {int(y[bad])} is out of range: the model has {num_classes} classes "
                          f"(0..{num_classes - 1})", path)
    x = RowArray(tok.source_x(), str(path))
    if stream is False or (stream == "auto" and x.nbytes <= STREAM_ABOVE_BYTES):
        x = np.asarray(x)
    true_y = tok.arrays.get("true_labels")
    return Split(x, y, ids, None if true_y is None else np.asarray(true_y), str(path), tok.meta["classes"],
                 int(workers), "text", tok.texts(), tok.pairs(), 0, tok.meta)


def save_split(path: str | Path, x: np.ndarray, y: np.ndarray, ids=None, true_y=None) -> Path:
    """Write an .npz split atomically (arrays x, y, ids, optional true_y)."""
    from diffin_core.project.atomic import atomic_path
    arrays = {"x": x, "y": np.asarray(y, dtype=np.int64)}
    if ids is not None:
        arrays["ids"] = np.asarray(ids, dtype=np.int64)
    if true_y is not None:
        arrays["true_y"] = np.asarray(true_y, dtype=np.int64)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return Path(path)
