"""Reading untrusted zip files uploaded by users.

Every member goes through the same checks before a byte is written or decoded: no path that
escapes the destination (``..``, absolute paths, drive letters, symlinks), no encrypted
members, at most ``max_files`` members, declared uncompressed total at most
``max_total_bytes`` (bytes) and at most ``max_ratio`` times the zip's own size (the
1,000 x 1 MB of zeros in 1.1 MB case), no member over 1 MB with compression ratio above
``max_ratio``, and while streaming, no member yielding more bytes than it declares (headers
are not trusted). Images are measured from their headers before they are decoded: at most
``max_image_pixels`` (width x height) each and ``max_decoded_bytes`` (the memory budget, at most
2 GiB) for the decoded float32 array. Any refusal is a ``DiffinError`` naming the zip file.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from diffin_core.errors import DiffinError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
_FORMATS = ("PNG", "JPEG", "BMP")    # the only decoders an ImageFolder zip's images may use
_CHUNK = 1 << 20
_RATIO_MIN_SIZE = 1 << 20  # the ratio limits apply to members (and archives) above 1 MB
MAX_IMAGE_PIXELS = 4096 * 4096      # per image (width x height), checked before decoding
MAX_DECODED_BYTES = 2 << 30         # the decoded float32 (N, C, H, W) array of an ImageFolder zip
# zipfile/zlib errors that mean "corrupt or unsupported archive".
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError,
               NotImplementedError, RuntimeError, ValueError)


class _Limits:
    def __init__(self, max_total_bytes: int, max_files: int, max_ratio: float):
        self.max_total_bytes, self.max_files, self.max_ratio = max_total_bytes, max_files, max_ratio


def _member_parts(info: zipfile.ZipInfo, zip_path: Path) -> tuple[str, ...]:
    """The member's path components, refusing anything that could land outside the dest."""
    name = info.filename
    bad = lambda why: DiffinError(f"refusing member {name!r}: {why}", zip_path)  # noqa: E731
    if stat.S_ISLNK(info.external_attr >> 16):
        raise bad("symbolic link")
    if "\x00" in name:
        raise bad("NUL in name")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise bad("absolute path")
    parts = tuple(p for p in norm.split("/") if p not in ("", "."))
    if ".." in parts:
        raise bad("path escapes the destination")
    if info.flag_bits & 0x1:
        raise bad("encrypted")
    return parts


def _open_checked(zip_path: Path, limits: _Limits) -> tuple[zipfile.ZipFile, list]:
    """Open the zip and check every header; returns (zipfile, [(info, parts) for files])."""
    try:
        size = zip_path.stat().st_size
    except OSError as exc:
        raise DiffinError(f"cannot read the file ({exc.strerror})", zip_path) from exc
    if size == 0:
        raise DiffinError("the file is empty (0 bytes)", zip_path)
    try:
        zf = zipfile.ZipFile(zip_path)
        infos = zf.infolist()
    except (*_ZIP_ERRORS, OSError) as exc:
        raise DiffinError(f"not a zip file or corrupt ({exc})", zip_path) from exc
    try:
        if len(infos) > limits.max_files:
            raise DiffinError(f"too many members ({len(infos)} > {limits.max_files})", zip_path)
        members = [(info, _member_parts(info, zip_path)) for info in infos]
        total = sum(info.file_size for info in infos)
        if total > limits.max_total_bytes:
            raise DiffinError(f"zip bomb: uncompressed size {total} bytes exceeds the limit "
                              f"{limits.max_total_bytes}", zip_path)
        for info, _ in members:
            if (info.file_size > _RATIO_MIN_SIZE
                    and info.file_size > limits.max_ratio * max(info.compress_size, 1)):
                raise DiffinError(f"zip bomb: member {info.filename!r} has compression ratio "
                                  f"above {limits.max_ratio}", zip_path)
        if total > _RATIO_MIN_SIZE and total > limits.max_ratio * size:
            raise DiffinError(f"zip bomb: {len(infos)} members expand to {total:,} bytes from a "
                              f"{size:,}-byte zip (ratio above {limits.max_ratio:g})", zip_path)
    except BaseException:
        zf.close()
        raise
    return zf, [(i, p) for i, p in members if not i.is_dir() and p]


def _stream(zf: zipfile.ZipFile, info: zipfile.ZipInfo, zip_path: Path, budget: list[int]
            ) -> Iterator[bytes]:
    """Yield a member's bytes in chunks, counting them against its declared size and the
    remaining total ``budget[0]`` (bytes)."""
    seen = 0
    try:
        with zf.open(info) as src:
            while chunk := src.read(_CHUNK):
                seen += len(chunk)
                budget[0] -= len(chunk)
                if seen > info.file_size or budget[0] < 0:
                    raise DiffinError(f"zip bomb: member {info.filename!r} holds more bytes "
                                      "than declared", zip_path)
                yield chunk
    except _ZIP_ERRORS as exc:
        raise DiffinError(f"corrupt member {info.filename!r} ({exc})", zip_path) from exc


def safe_extract(zip_path: str | Path, dest_dir: str | Path, *,
                 max_total_bytes: int = 2_000_000_000, max_files: int = 200_000,
                 max_ratio: float = 200) -> Path:
    """Extract ``zip_path`` into ``dest_dir`` (must be absent or empty); returns ``dest_dir``.

    Extraction happens in a temp folder beside ``dest_dir`` that is renamed into place only
    when every member passed, so a refused zip leaves ``dest_dir`` untouched.
    """
    zip_path, dest = Path(zip_path), Path(dest_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DiffinError("destination exists and is not an empty folder", dest)
    limits = _Limits(max_total_bytes, max_files, max_ratio)
    zf, members = _open_checked(zip_path, limits)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with zf:
            budget = [max_total_bytes]
            for info, parts in members:
                target = tmp.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as out:
                    for chunk in _stream(zf, info, zip_path, budget):
                        out.write(chunk)
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DiffinError(f"cannot extract ({exc})", zip_path) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def decode_limit() -> int:
    """The decoded float32 total an ImageFolder zip may have: the memory budget (half the free
    RAM, engine/budget.py) and at most ``MAX_DECODED_BYTES``."""
    from diffin_core.engine.budget import default_budget
    return min(MAX_DECODED_BYTES, default_budget("cpu"))


def read_imagefolder_zip(zip_path: str | Path, *, max_total_bytes: int = 2_000_000_000,
                         max_files: int = 200_000, max_ratio: float = 200,
                         max_image_pixels: int = MAX_IMAGE_PIXELS,
                         max_decoded_bytes: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Read an ImageFolder zip (``class/img.png|jpg|jpeg|bmp``, optionally under one top folder).

    Returns x float32 (N, C, H, W) in [0, 1], y int64 (N,) class indices, label_names (classes
    sorted by name) and files (member names, in row order). C is 3 if any image is colour,
    else 1. ``__MACOSX/``, dotfiles and non-image files are ignored. Members are read in
    memory through the same checks as ``safe_extract``. Every image's header is read first (no
    pixel decoded): one over ``max_image_pixels`` (width x height), or a decoded float32 total
    over ``max_decoded_bytes`` (default ``decode_limit()``: the memory budget, at most 2 GiB),
    is refused. Then x is allocated once and each image decoded into its row (the peak is x
    plus one image). Only PNG, JPEG and BMP decoders are used, whatever a file's name says. PIL's
    own decompression-bomb check (a warning above ``Image.MAX_IMAGE_PIXELS``, 89,478,485 by
    default, an error above twice that) stays as a backstop behind the stricter per-image cap.
    """
    from PIL import Image

    zip_path = Path(zip_path)
    limit = decode_limit() if max_decoded_bytes is None else int(max_decoded_bytes)
    zf, members = _open_checked(zip_path, _Limits(max_total_bytes, max_files, max_ratio))
    images = [(i, p) for i, p in members
              if p[0] != "__MACOSX" and not any(s.startswith(".") for s in p)
              and p[-1].lower().endswith(IMAGE_EXTS)]
    depths = {len(p) for _, p in images}
    if depths == {3} and len({p[0] for _, p in images}) == 1:
        images = [(i, p[1:]) for i, p in images]
    elif depths != {2}:
        zf.close()
        raise DiffinError("expected an ImageFolder layout class_name/image.png (optionally "
                          "inside one top folder)" + ("" if images else "; found no images"),
                          zip_path)
    images.sort(key=lambda ip: ip[1])
    label_names = sorted({p[0] for _, p in images})
    budget, size, modes = [max_total_bytes], None, []

    def open_image(info):
        data = b"".join(_stream(zf, info, zip_path, budget))
        return Image.open(io.BytesIO(data), formats=_FORMATS)      # reads the header only

    with zf:
        for info, parts in images:               # 1: headers only, nothing decoded
            try:
                img = open_image(info)
            except DiffinError:
                raise
            except Exception as exc:  # PIL raises many types for bad data
                raise DiffinError(f"image {info.filename!r} cannot be read ({exc})", zip_path) from exc
            w, h = img.size
            if w * h > max_image_pixels:
                raise DiffinError(f"image {info.filename!r} is {w}x{h} = {w * h:,} pixels, above the "
                                  f"limit of {max_image_pixels:,} per image (not decoded)", zip_path)
            if size is not None and img.size != size:
                raise DiffinError(f"image {info.filename!r} is {img.size[0]}x{img.size[1]}, "
                                  f"others are {size[0]}x{size[1]}", zip_path)
            size = img.size
            modes.append("L" if Image.getmodebase(img.mode) == "L" else "RGB")
            decoded = len(modes) * w * h * (3 if "RGB" in modes else 1) * 4   # float32 result so far
            if decoded > limit:
                raise DiffinError(
                    f"decoded images exceed the size limit of {limit:,} bytes at {info.filename!r} (not "
                    f"decoded: {len(images):,} images of {w}x{h} are {_mib(len(images) * w * h * 4)} MiB "
                    f"or more as float32; the limit is the memory budget, half the free RAM, at most "
                    f"{MAX_DECODED_BYTES >> 30} GiB)", zip_path)
        channels = 3 if "RGB" in modes else 1
        x = np.empty((len(images), channels, size[1], size[0]), dtype=np.float32)
        budget = [max_total_bytes]
        for row, ((info, _), mode) in enumerate(zip(images, modes)):      # 2: one image at a time
            try:
                arr = np.asarray(open_image(info).convert(mode), dtype=np.uint8)
            except DiffinError:
                raise
            except Exception as exc:
                raise DiffinError(f"image {info.filename!r} cannot be read ({exc})", zip_path) from exc
            x[row] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)   # grey broadcasts to C
            x[row] /= 255.0
    index = {name: k for k, name in enumerate(label_names)}
    y = np.array([index[p[0]] for _, p in images], dtype=np.int64)
    return x, y, label_names, [i.filename for i, _ in images]
