import io
import stat
import zipfile

import numpy as np
import pytest
from PIL import Image

from diffin_core.errors import DiffinError
from diffin_core.workspace.safezip import read_imagefolder_zip, safe_extract


def make_zip(path, members, compression=zipfile.ZIP_DEFLATED):
    """members: {name or ZipInfo: bytes}."""
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def assert_refused(zip_path, dest, match, **limits):
    with pytest.raises(DiffinError, match=match) as err:
        safe_extract(zip_path, dest, **limits)
    assert str(err.value).startswith(f"{zip_path}: ")
    assert not dest.exists() or not any(dest.iterdir())
    leftovers = [p for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")]
    assert leftovers == []


def test_extracts_a_normal_zip(tmp_path):
    z = make_zip(tmp_path / "ok.zip", {"a/b.txt": b"hello", "c.txt": b"x" * 5000, "d/": b""})
    dest = tmp_path / "out"
    dest.mkdir()  # an existing empty folder is fine
    assert safe_extract(z, dest) == dest
    assert (dest / "a" / "b.txt").read_bytes() == b"hello"
    assert (dest / "c.txt").read_bytes() == b"x" * 5000


@pytest.mark.parametrize("name,match", [
    ("../evil.txt", "escapes"),
    ("ok/../../evil.txt", "escapes"),
    ("..\\evil.txt", "escapes"),
    ("/tmp/evil.txt", "absolute"),
    ("C:/evil.txt", "absolute"),
])
def test_path_escape_refused(tmp_path, name, match):
    z = make_zip(tmp_path / "bad.zip", {"fine.txt": b"ok", zipfile.ZipInfo(name): b"evil"})
    assert_refused(z, tmp_path / "out", match)
    assert not (tmp_path / "evil.txt").exists()


def test_symlink_refused(tmp_path):
    link = zipfile.ZipInfo("link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    z = make_zip(tmp_path / "link.zip", {link: b"/etc/passwd"})
    assert_refused(z, tmp_path / "out", "symbolic link")


def test_zip_bomb_by_ratio_and_by_total(tmp_path):
    z = make_zip(tmp_path / "bomb.zip", {"zeros.bin": bytes(50_000_000)})
    assert z.stat().st_size < 1_000_000
    assert_refused(z, tmp_path / "out", "compression ratio")
    assert_refused(z, tmp_path / "out", "uncompressed size", max_total_bytes=10_000_000,
                   max_ratio=10**9)


def test_member_lying_about_its_size(tmp_path):
    z = make_zip(tmp_path / "liar.zip", {"zeros.bin": bytes(3_000_000)})
    raw = bytearray(z.read_bytes())
    declared = (3_000_000).to_bytes(4, "little")
    # Patch the uncompressed size in both the local and the central header to 1000 bytes.
    assert raw.count(declared) == 2
    z.write_bytes(bytes(raw).replace(declared, (1000).to_bytes(4, "little")))
    assert zipfile.ZipFile(z).getinfo("zeros.bin").file_size == 1000
    # zipfile stops at the declared size, so the CRC no longer matches: refused as corrupt.
    assert_refused(z, tmp_path / "out", "corrupt member 'zeros.bin'", max_ratio=10**9)


def test_counting_read_does_not_trust_the_reader(tmp_path, monkeypatch):
    z = make_zip(tmp_path / "more.zip", {"a.txt": b"abc"})
    # A reader that yields more than the header declares (as a buggy or hostile decoder might).
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, info: io.BytesIO(b"x" * 4000))
    assert_refused(z, tmp_path / "out", "'a.txt' holds more bytes than declared")


def test_too_many_files(tmp_path):
    z = make_zip(tmp_path / "many.zip", {f"f{i}.txt": b"x" for i in range(5)})
    assert_refused(z, tmp_path / "out", "too many members", max_files=4)


def test_empty_file_non_zip_and_corrupt(tmp_path):
    empty = tmp_path / "empty.zip"
    empty.write_bytes(b"")
    assert_refused(empty, tmp_path / "out", "empty")
    text = tmp_path / "notes.zip"
    text.write_text("just some text, not a zip\n")
    assert_refused(text, tmp_path / "out", "not a zip")
    truncated = make_zip(tmp_path / "trunc.zip", {"a.txt": b"a" * 10_000})
    truncated.write_bytes(truncated.read_bytes()[:-30])
    assert_refused(truncated, tmp_path / "out", "not a zip")


def test_corrupt_second_member_rolls_back_first(tmp_path):
    rng = np.random.default_rng(0)
    first, second = rng.bytes(20_000), rng.bytes(20_000)
    z = make_zip(tmp_path / "crc.zip", {"first.bin": first, "second.bin": second},
                 compression=zipfile.ZIP_STORED)
    raw = bytearray(z.read_bytes())
    at = raw.index(second[:64]) + 1000
    raw[at] ^= 0xFF  # corrupt the second member's data: CRC check fails while streaming
    z.write_bytes(bytes(raw))
    assert_refused(z, tmp_path / "out", "corrupt member 'second.bin'")


def test_nonempty_destination_refused(tmp_path):
    z = make_zip(tmp_path / "ok.zip", {"a.txt": b"a"})
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(DiffinError, match="not an empty folder"):
        safe_extract(z, dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


# ---- ImageFolder --------------------------------------------------------------------------

def png(arr, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_imagefolder_round_trip_mixed_modes(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (3, 5), dtype=np.uint8)   # H=3, W=5
    rgb = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    gray2 = rng.integers(0, 256, (3, 5), dtype=np.uint8)
    z = make_zip(tmp_path / "imgs.zip", {
        "data/zebra/b.bmp": png(rgb, "BMP"),
        "data/ant/2.png": png(gray2),
        "data/ant/1.PNG": png(gray),
        "data/ant/.hidden.png": b"not an image",
        "data/ant/notes.txt": b"ignored",
        "__MACOSX/data/ant/._1.PNG": b"resource fork",
    })
    x, y, names, files = read_imagefolder_zip(z)
    assert names == ["ant", "zebra"]
    assert files == ["data/ant/1.PNG", "data/ant/2.png", "data/zebra/b.bmp"]
    assert list(y) == [0, 0, 1] and y.dtype == np.int64
    assert x.shape == (3, 3, 3, 5) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], np.repeat(gray[None], 3, axis=0) / np.float32(255))
    np.testing.assert_array_equal(x[2], rgb.transpose(2, 0, 1) / np.float32(255))


def test_imagefolder_grayscale_without_top_folder(tmp_path):
    a, b = np.zeros((4, 4), np.uint8), np.full((4, 4), 255, np.uint8)
    z = make_zip(tmp_path / "g.zip", {"one/a.png": png(a), "two/b.png": png(b)})
    x, y, names, _ = read_imagefolder_zip(z)
    assert x.shape == (2, 1, 4, 4) and names == ["one", "two"] and list(y) == [0, 1]
    assert x[0].max() == 0.0 and x[1].min() == 1.0


def test_imagefolder_errors_name_the_member(tmp_path):
    ok = png(np.zeros((4, 4), np.uint8))
    z = make_zip(tmp_path / "size.zip", {"a/1.png": ok, "a/2.png": png(np.zeros((5, 4), np.uint8))})
    with pytest.raises(DiffinError, match=r"'a/2.png' is 4x5, others are 4x4") as err:
        read_imagefolder_zip(z)
    assert str(err.value).startswith(f"{z}: ")
    z = make_zip(tmp_path / "junk.zip", {"a/1.png": ok, "b/bad.jpg": b"\xff\xd8 not a jpeg"})
    with pytest.raises(DiffinError, match="'b/bad.jpg' cannot be read"):
        read_imagefolder_zip(z)
    z = make_zip(tmp_path / "flat.zip", {"1.png": ok})
    with pytest.raises(DiffinError, match="ImageFolder layout"):
        read_imagefolder_zip(z)


def test_imagefolder_uses_the_same_safety_checks(tmp_path):
    ok = png(np.zeros((4, 4), np.uint8))
    z = make_zip(tmp_path / "trav.zip", {"a/1.png": ok, zipfile.ZipInfo("../a/2.png"): ok})
    with pytest.raises(DiffinError, match="escapes"):
        read_imagefolder_zip(z)
    z = make_zip(tmp_path / "bomb.zip", {"a/1.png": ok, "a/zeros.bin": bytes(5_000_000)})
    with pytest.raises(DiffinError, match="compression ratio"):
        read_imagefolder_zip(z)
    big = png(np.zeros((1000, 1000), np.uint8))  # ~1 KB file, 4 MB decoded as float32
    z = make_zip(tmp_path / "px.zip", {"a/1.png": big})
    with pytest.raises(DiffinError, match="decoded images exceed"):
        read_imagefolder_zip(z, max_decoded_bytes=100_000)


# ---- the two bombs: refused before a byte is written or a pixel decoded ----------------

def bomb_zip(path, members=1000, size=1 << 20):
    """1,000 members of 1 MB of zeros in a 1.1 MB zip, written without compressing 1 GB."""
    import zlib
    raw = bytes(size)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = c.compress(raw) + c.flush()
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(members):
            zi = zipfile.ZipInfo(f"ckpt_{i:04d}.safetensors", (2020, 1, 1, 0, 0, 0))
            zi.compress_type, zi.file_size, zi.compress_size = zipfile.ZIP_DEFLATED, size, len(data)
            zi.CRC = zlib.crc32(raw)
            zi.header_offset = zf.fp.tell()
            zf.fp.write(zi.FileHeader())
            zf.fp.write(data)
            zf.filelist.append(zi)
            zf.NameToInfo[zi.filename] = zi
        zf.start_dir = zf.fp.tell()
    return path


def test_thousand_small_zero_members_refused_before_writing(tmp_path, monkeypatch):
    z = bomb_zip(tmp_path / "ckpts.zip")
    assert z.stat().st_size < 1_200_000 and len(zipfile.ZipFile(z).infolist()) == 1000
    opened = []
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, *a, **k: opened.append(a) or 1 / 0)
    assert_refused(z, tmp_path / "out", r"zip bomb: 1000 members expand to 1,048,576,000 bytes "
                                        r"from a 1,1\d\d,\d\d\d-byte zip")
    assert opened == []                                   # refused from the headers alone
    with pytest.raises(DiffinError, match="zip bomb"):
        read_imagefolder_zip(z)
    monkeypatch.undo()
    assert_refused(z, tmp_path / "out", "too many members", max_files=999, max_ratio=10**9)
    assert_refused(z, tmp_path / "out", "uncompressed size", max_total_bytes=10**9, max_ratio=10**9)


def test_blank_6000px_pngs_refused_before_decoding(tmp_path, monkeypatch):
    blank = io.BytesIO()
    Image.new("L", (6000, 6000)).save(blank, format="PNG")
    blank = blank.getvalue()
    z = make_zip(tmp_path / "imgs.zip", {f"{c}/{i}.png": blank for c in ("a", "b") for i in (1, 2)})
    assert z.stat().st_size < 300_000
    decoded = []
    monkeypatch.setattr(Image.Image, "convert", lambda self, *a, **k: decoded.append(1) or 1 / 0)
    monkeypatch.setattr(Image.Image, "load", lambda self, *a, **k: decoded.append(1) or 1 / 0)
    with pytest.raises(DiffinError, match=r"'a/1.png' is 6000x6000 = 36,000,000 pixels, above the limit of "
                                          r"16,777,216 per image \(not decoded\)") as err:
        read_imagefolder_zip(z)
    assert str(err.value).startswith(f"{z}: ") and decoded == []
    # with the per-image cap raised, the total decoded size stops it, still before decoding
    with pytest.raises(DiffinError, match="decoded images exceed the size limit of 100,000,000 bytes at 'a/1.png'"):
        read_imagefolder_zip(z, max_image_pixels=10**8, max_decoded_bytes=100_000_000)
    assert decoded == []


# ---- issue 20: sixteen blank 4096 x 4096 PNGs (4 KB) cost 3.5 GB in the server ------------------

def blank_4096_zip(path, count=16):
    """The issue's zip: ``count`` blank 4096 x 4096 greyscale PNGs in two classes (a few KB)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("L", (4096, 4096)).save(buf, format="PNG", optimize=True)
    return make_zip(path, {f"{'ab'[i % 2]}/{i:02d}.png": buf.getvalue() for i in range(count)})


UPLOAD = """
import resource, sys
from diffin_core.workspace import usercode
with open(sys.argv[2], "rb") as f:
    print(usercode.store_upload(sys.argv[1], "train", "images.zip", f))
print("peak", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _upload_in_a_fresh_process(project, zip_path):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = {**__import__("os").environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", UPLOAD, str(project), str(zip_path)], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    message, peak = r.stdout.strip().splitlines()[-2:]
    return message, int(peak.split()[1])


@pytest.mark.slow
def test_blank_4096px_pngs_decode_in_a_child_not_in_the_server(tmp_path):
    from diffin_core.workspace.safezip import decode_limit
    each = 4096 * 4096 * 4                          # 64 MiB per image as float32
    count = next((c for c in (16, 8) if c * each * 1.3 < decode_limit()), None)
    if count is None:                               # the budget is half the free RAM: this machine is short
        pytest.skip(f"too little free memory to decode 8 images (limit {decode_limit():,} bytes)")
    big = blank_4096_zip(tmp_path / "big.zip", count=count)
    small = blank_4096_zip(tmp_path / "small.zip", count=2)
    assert big.stat().st_size < 100_000
    msg, peak_big = _upload_in_a_fresh_process(tmp_path / "ws" / "p1", big)
    assert msg == f"images.zip: train data OK ({count} samples, images [1, 4096, 4096])", msg
    _, peak_small = _upload_in_a_fresh_process(tmp_path / "ws" / "p2", small)
    # decoded, the images are 0.5-1 GiB of float32: none of it in the calling (server) process
    assert peak_big - peak_small < 150 * 2**20, (peak_big, peak_small)
    assert (tmp_path / "ws" / "p1" / "data" / "train.npz").is_file()


def test_decoded_total_capped_by_the_memory_budget(tmp_path, monkeypatch):
    from diffin_core.engine import budget
    from diffin_core.workspace import safezip
    z = blank_4096_zip(tmp_path / "imgs.zip")
    decoded = []
    monkeypatch.setattr(Image.Image, "convert", lambda self, *a, **k: decoded.append(1) or 1 / 0)
    monkeypatch.setattr(budget, "free_memory", lambda device="cpu": 1 << 30)     # 1 GiB free: a 512 MiB budget
    assert safezip.decode_limit() == 512 * 2**20
    with pytest.raises(DiffinError) as err:
        read_imagefolder_zip(z)
    assert str(err.value) == (f"{z}: decoded images exceed the size limit of 536,870,912 bytes at 'b/01.png' (not "
                              "decoded: 16 images of 4096x4096 are 1,024 MiB or more as float32; the limit is the "
                              "memory budget, half the free RAM, at most 2 GiB)")
    assert decoded == []
    monkeypatch.setattr(budget, "free_memory", lambda device="cpu": 64 << 30)
    assert safezip.decode_limit() == safezip.MAX_DECODED_BYTES            # never above 2 GiB


def test_only_png_jpeg_and_bmp_decoders_are_used(tmp_path):
    from PIL import Image as PILImage
    buf = io.BytesIO()
    PILImage.new("L", (4, 4)).save(buf, format="TIFF")                   # a TIFF named .png
    z = make_zip(tmp_path / "tiff.zip", {"a/1.png": buf.getvalue()})
    with pytest.raises(DiffinError, match=r"image 'a/1.png' cannot be read"):
        read_imagefolder_zip(z)
