"""Row sources: training data read a few rows at a time instead of all at once.

A source knows its length, the raw shape of one sample and how to read a sorted set of rows;
``RowArray`` wraps one as the ``x`` of a ``Split`` (data.py), so callers index it like the
numpy array it stands for. Supported on disk (choose with the ``[data]`` keys, see data.py):

* ``ArraySource``  a memory-mapped array: ``x.npy`` in a folder of .npy files (x.npy, y.npy,
  optional ids.npy, true_y.npy), or the ``x`` member of an .npz written UNCOMPRESSED
  (``np.savez``): ``np.load(mmap_mode=...)`` does not map inside a zip, so the member's data
  offset is read from the zip headers and mapped directly. A compressed .npz
  (``np.savez_compressed``) cannot be mapped and is read into memory as before.
* ``ParquetImageSource``  a parquet file with a column of encoded images (PNG/JPEG...), either
  the struct ``{"bytes": binary, "path": string}`` that Hugging Face ``datasets`` exports or a
  plain binary column; read one row group at a time, each image decoded by Pillow when its row
  is asked for.
* ``ImageFolderSource``  a folder of class sub-folders (``<root>/<class>/<file>.png``); class
  index = position of the folder name in ``label_names`` when given, else in the sorted folder
  names; files sorted within a class; decoded lazily.

Images are decoded to uint8 (C, H, W) with C = image_shape[0] (1 = "L", 3 = "RGB", 4 = "RGBA")
and (H, W) = image_shape[1:]; an image of another size is an error unless ``resize`` (then
bilinear). An image above ``max_pixels`` (width x height, read from the header before decoding)
is refused: a decompression-bomb guard. ``RowArray`` returns float32, uint8 scaled to [0, 1].
Every problem is a one-line DiffinError naming the file (and the row for parquet).
"""
from __future__ import annotations

import io
import os
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np

from diffin_core.errors import DiffinError

MAX_PIXELS = 50_000_000            # default decompression-bomb cap (width x height per image)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


# --- decoding ---------------------------------------------------------------------------------
def decode_image(data: bytes | str | Path, shape: tuple[int, int, int], where: str, *,
                 resize: bool = False, max_pixels: int = MAX_PIXELS, row: int | None = None) -> np.ndarray:
    """One encoded image (bytes or a file path) -> uint8 (C, H, W) of ``shape``.

    ``where`` names the file in errors; ``row`` adds the row (parquet)."""
    from PIL import Image
    at = "" if row is None else f"row {row}: "
    c, h, w = (int(s) for s in shape)
    if c not in _MODES:
        raise DiffinError(f"image_shape must have 1, 3 or 4 channels, not {c}", where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise DiffinError(f"{at}image is {width}x{height} = {width * height:,} pixels, above "
                                      f"max_pixels = {max_pixels:,} (raise [data] max_pixels if it is genuine)", where)
                im = im.convert(_MODES[c])
                if (height, width) != (h, w):
                    if not resize:
                        raise DiffinError(f"{at}image is {width}x{height}, but image_shape says {w}x{h} "
                                          f"(set [data] resize = true to resize)", where)
                    im = im.resize((w, h), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
    except DiffinError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DiffinError(f"{at}image refused as a decompression bomb ({e})", where) from None
    except Image.UnidentifiedImageError:
        raise DiffinError(f"{at}not a readable image (unrecognised or corrupt image data)", where) from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
        raise DiffinError(f"{at}not a readable image ({type(e).__name__}: {str(e)[:80]})", where) from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _contiguous(rows: np.ndarray) -> bool:
    return len(rows) > 0 and int(rows[-1]) - int(rows[0]) == len(rows) - 1


# --- sources ----------------------------------------------------------------------------------
class ArraySource:
    """A memory-mapped .npy array (whole file, or a member stored uncompressed inside an .npz).

    Picklable without its data (DataLoader workers, Ray tasks): the map is reopened per process."""

    def __init__(self, path: str | Path, offset: int, dtype: np.dtype, shape: tuple, fortran: bool = False):
        self.path, self.offset, self.dtype, self.shape, self.fortran = str(path), int(offset), np.dtype(dtype), tuple(shape), fortran
        self._map = None
        need = self.offset + int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        if os.path.getsize(self.path) < need:
            raise DiffinError(f"the array is truncated: its header says {self.shape} {self.dtype} "
                              f"({need:,} bytes) but the file has {os.path.getsize(self.path):,}", path)

    @property
    def sample_shape(self) -> tuple:
        return self.shape[1:]

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self):
        return {**self.__dict__, "_map": None}

    def _array(self) -> np.ndarray:
        if self._map is None:
            if len(self) == 0:
                self._map = np.empty(self.shape, self.dtype)
            else:
                self._map = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset,
                                      shape=self.shape, order="F" if self.fortran else "C")
        return self._map

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The rows (sorted, unique) in the stored dtype, read with plain file reads (one per run
        of consecutive rows), never through a map: mapped pages count towards the process's
        resident memory and stay there while the map lives, and on file systems with large page
        cache folios (ext4 on Linux >= 6.x) one touched row maps a whole 2 MB folio, so 256
        random rows (a Hessian batch) had put ~600 MB of the file into RSS."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.fortran or not len(self) or not len(rows):
            a = self._array()                      # Fortran order: rows are not contiguous on disk
            out = np.array(a[rows])
            self._map = None                       # unmapped: its pages leave the RSS
            return out
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        flat = out.reshape(-1).view(np.uint8)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        with open(self.path, "rb", buffering=0) as fh:
            for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
                view = memoryview(flat[a * row:b * row])
                pos, done = self.offset + int(rows[a]) * row, 0
                while done < len(view):
                    got = os.preadv(fh.fileno(), [view[done:]], pos + done)
                    if got <= 0:
                        raise DiffinError(f"the array is truncated near row {int(rows[a])}", self.path)
                    done += got
        return out

    @classmethod
    def npy(cls, path: Path) -> "ArraySource":
        with open(path, "rb") as f:
            return cls(path, *_npy_header(f, path))

    @classmethod
    def npz_member(cls, path: Path, name: str) -> "ArraySource | None":
        """The member ``name`` of an .npz, mapped in place; None when it is compressed."""
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(name + ".npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            head = f.read(30)
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                raise DiffinError(f"not a readable .npz file (bad zip header of {name!r})", path)
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            offset, dtype, shape, fortran = _npy_header(f, path)
        return cls(path, offset, dtype, shape, fortran)


def _npy_header(f, path) -> tuple[int, np.dtype, tuple, bool]:
    """(data offset, dtype, shape, fortran order) of the .npy stream at f's position."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, dtype = read(f)
    except ValueError as e:
        raise DiffinError(f"not a readable .npy array ({e})", path) from None
    if dtype.hasobject:
        raise DiffinError("arrays of Python objects are not supported (allow_pickle is off)", path)
    if len(shape) == 0:
        raise DiffinError("x must have one row per sample, got a scalar", path)
    return f.tell(), dtype, tuple(shape), bool(fortran)


class ParquetImageSource:
    """Encoded images in one column of a parquet file, read by row group, decoded per row."""

    def __init__(self, path: str | Path, column: str, shape: tuple[int, int, int], *,
                 resize: bool = False, max_pixels: int = MAX_PIXELS):
        import pyarrow.parquet as pq
        self.path, self.column, self.shape = str(path), column, tuple(int(s) for s in shape)
        self.resize, self.max_pixels = resize, max_pixels
        try:
            pf = pq.ParquetFile(self.path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DiffinError(f"not a readable .parquet table ({type(e).__name__})", path) from None
        names = pf.schema_arrow.names
        if column not in names:
            raise DiffinError(f"no image column {column!r} (set [data] image_column); columns are {names[:8]}", path)
        import pyarrow as pa
        t = pf.schema_arrow.field(column).type
        ok = pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
            pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)
        if not ok:
            raise DiffinError(f"image column {column!r} must hold encoded image bytes (binary, or a struct "
                              f"with 'bytes' as Hugging Face datasets writes), not {t}", path)
        meta = pf.metadata
        self.group_starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self._file, self._pid, self._cache = None, None, (None, None)

    @property
    def sample_shape(self) -> tuple:
        return self.shape

    def __len__(self) -> int:
        return int(self.group_starts[-1])

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None, "_cache": (None, None)}

    def _group(self, g: int):
        if self._cache[0] != g:
            import pyarrow as pa
            import pyarrow.parquet as pq
            if self._file is None or self._pid != os.getpid():
                self._file, self._pid = pq.ParquetFile(self.path), os.getpid()
            col = self._file.read_row_group(g, columns=[self.column]).column(0).combine_chunks()
            if pa.types.is_struct(col.type):
                col = col.field("bytes")
            self._cache = (g, col)
        return self._cache[1]

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape), np.uint8)
        groups = np.searchsorted(self.group_starts, rows, side="right") - 1
        for i, (r, g) in enumerate(zip(rows, groups)):
            value = self._group(int(g))[int(r - self.group_starts[g])].as_py()
            if value is None:
                raise DiffinError(f"row {int(r)}: the image column {self.column!r} is empty", self.path)
            out[i] = decode_image(value, self.shape, self.path, resize=self.resize,
                                  max_pixels=self.max_pixels, row=int(r))
        return out


class ImageFolderSource:
    """``root/<class>/<image file>``, one sample per file, decoded when read."""

    def __init__(self, files: list[str], shape: tuple[int, int, int], *, resize: bool = False,
                 max_pixels: int = MAX_PIXELS):
        self.files, self.shape = files, tuple(int(s) for s in shape)
        self.resize, self.max_pixels = resize, max_pixels

    @property
    def sample_shape(self) -> tuple:
        return self.shape

    def __len__(self) -> int:
        return len(self.files)

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape), np.uint8)
        for i, r in enumerate(rows):
            out[i] = decode_image(self.files[int(r)], self.shape, self.files[int(r)],
                                  resize=self.resize, max_pixels=self.max_pixels)
        return out

    @staticmethod
    def scan(root: Path, classes: list[str] | None = None) -> tuple[list[str], np.ndarray, list[str]]:
        """(files, labels (N,) int64, class names) of an ImageFolder; ``classes`` fixes the
        class order (label_names, or the train split's folders for the query split)."""
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DiffinError("an image folder needs one sub-folder per class (root/<class>/<image>); found none", root)
        names = list(classes) if classes is not None else folders
        unknown = [f for f in folders if f not in names]
        if unknown:
            raise DiffinError(f"class folder {unknown[0]!r} is not one of the classes {names[:10]}", root)
        files, labels = [], []
        for name in folders:
            found = sorted(str(p) for p in (root / name).iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            labels += [names.index(name)] * len(found)
        return files, np.asarray(labels, dtype=np.int64), names


# --- the lazy x -------------------------------------------------------------------------------
class RowArray:
    """A read-only, numpy-like view of a source: ``x[i]``, ``x[a:b]``, ``x[int array]``,
    ``x[bool mask]`` and ``np.asarray(x)`` give float32 arrays (uint8 scaled to [0, 1]),
    reshaped to ``sample_shape``. Only the rows asked for are read."""

    ndim = property(lambda self: len(self.shape))
    dtype = np.dtype(np.float32)

    def __init__(self, source, path: str, sample_shape: tuple | None = None, start: int = 0, stop: int | None = None):
        self.source, self.path = source, str(path)
        self.start, self.stop = int(start), len(source) if stop is None else int(stop)
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else tuple(source.sample_shape)

    @property
    def shape(self) -> tuple:
        return (len(self), *self.sample_shape)

    @property
    def nbytes(self) -> int:
        return len(self) * int(np.prod(self.sample_shape, dtype=np.int64)) * 4

    def __len__(self) -> int:
        return self.stop - self.start

    def __repr__(self) -> str:
        return f"RowArray({type(self.source).__name__}, shape={self.shape}, path={self.path!r})"

    def rows(self, start: int, stop: int) -> "RowArray":
        """The rows [start, stop) as another lazy view (no data read)."""
        start, stop, _ = slice(start, stop).indices(len(self))
        return RowArray(self.source, self.path, self.sample_shape, self.start + start, self.start + max(start, stop))

    def take(self, idx) -> np.ndarray:
        """float32 (len(idx), *sample_shape) for row indices into this view."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        if len(idx) == 0:
            return np.empty((0, *self.sample_shape), np.float32)
        rows, inverse = np.unique(idx, return_inverse=True)
        raw = self.source.read(rows + self.start)
        out = self._float(raw, rows)
        return out if len(rows) == len(idx) and np.array_equal(rows, idx) else out[inverse]

    def _float(self, raw: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if raw.dtype.kind not in "fiub":
            raise DiffinError(f"features must be numeric, got {raw.dtype}", self.path)
        x = raw.astype(np.float32) / 255.0 if raw.dtype == np.uint8 else raw.astype(np.float32)
        if raw.dtype.kind == "f" and not np.isfinite(x).all():
            bad = int(rows[np.argwhere(~np.isfinite(x.reshape(len(x), -1)))[0, 0]]) + self.start
            raise DiffinError(f"features contain NaN or infinite values (first at row {bad})", self.path)
        return x.reshape((len(rows), *self.sample_shape))

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            out = self.take([int(key)])[0]
        elif isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            out = self.take(np.arange(start, stop, step))
        else:
            key = np.asarray(key)
            if key.dtype == bool:
                if key.shape != (len(self),):
                    raise IndexError(f"boolean index of shape {key.shape} for {len(self)} rows")
                key = np.flatnonzero(key)
            out = self.take(key)
        return out[(slice(None),) * (out.ndim - len(self.sample_shape)) + rest] if rest else out

    def __iter__(self):
        for start in range(0, len(self), 1024):
            yield from self[start:start + 1024]

    def __array__(self, dtype=None, copy=None):
        """Read every row (chunk by chunk into one float32 array)."""
        out = np.empty(self.shape, np.float32)
        for start in range(0, len(self), 1024):
            out[start:start + 1024] = self[start:start + 1024]
        return out if dtype is None else out.astype(dtype)
