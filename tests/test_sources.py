"""Streaming sources: the same MNIST digits as an .npz, a memory-mapped .npy folder, an
uncompressed .npz, an ImageFolder of PNGs and a Hugging Face-style parquet of PNG bytes must give
the same arrays and the same scores; bad images give one-line errors naming the file."""
import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from diffin_core.project.checkpoints import Recorder
from diffin_core.cli import main
from diffin_core.project.data import load_split
from diffin_core.errors import DiffinError
from diffin_core.methods import ScoreSettings
from diffin_core.project.folder import Project
from diffin_core.run.scoring import score
from diffin_core.project.sources import RowArray

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist_5k.npz"
N_TRAIN, N_QUERY = 72, 12
MODEL_PY = '''from diffin_core.engine.models import SmallCNN


def build():
    return SmallCNN(in_channels=1, num_classes=10, image_size=28)
'''


def _digits():
    if MNIST.is_file():
        with np.load(MNIST) as z:
            x, y = z["X"][: N_TRAIN + N_QUERY].reshape(-1, 1, 28, 28), z["y"][: N_TRAIN + N_QUERY].astype(np.int64)
    else:  # generated digits-like images: a class-dependent bar, noise elsewhere
        rng = np.random.default_rng(0)
        y = rng.integers(0, 10, N_TRAIN + N_QUERY)
        x = rng.integers(0, 60, (len(y), 1, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):
            x[i, 0, 2 * c + 3:2 * c + 6, 4:24] = 255
    return x, y


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a[0]).save(buf, format="PNG")
    return buf.getvalue()


def _toml(train: str, extra: str = "") -> str:
    return (f'[model]\nfactory = "model.py:build"\n\n[data]\ntrain = "{train}"\nquery = "data/query.npz"\n'
            f'kind = "image"\nimage_shape = [1, 28, 28]\n{extra}\n[checkpoints]\nmanifest = "checkpoints/manifest.json"\n')


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A project on an .npz (train sorted by label, so an ImageFolder lists it in the same order)."""
    root = tmp_path_factory.mktemp("src") / "npz"
    x, y = _digits()
    order = np.argsort(y[:N_TRAIN], kind="stable")
    tx, ty, qx, qy = x[:N_TRAIN][order], y[:N_TRAIN][order], x[N_TRAIN:], y[N_TRAIN:]
    (root / "data").mkdir(parents=True)
    np.savez_compressed(root / "data/train.npz", x=tx, y=ty)
    np.savez_compressed(root / "data/query.npz", x=qx, y=qy)
    (root / "model.py").write_text(MODEL_PY)
    (root / "diffin.toml").write_text(_toml("data/train.npz"))
    torch.manual_seed(0)
    model = Project(root).build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xt, yt = torch.as_tensor(tx, dtype=torch.float32) / 255, torch.as_tensor(ty)
    with Recorder(root, model, opt, train_size=N_TRAIN, every=3) as rec:
        for _ in range(2):
            for idx in torch.randperm(N_TRAIN).split(12):
                opt.zero_grad()
                F.cross_entropy(model(xt[idx]), yt[idx]).backward()
                opt.step()
                rec.step()
    return root, tx, ty


def _variant(base, name: str, train: str, extra: str = "") -> Path:
    root = base[0].parent / name
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(base[0], root, ignore=shutil.ignore_patterns("runs"))
    (root / "diffin.toml").write_text(_toml(train, extra))
    return root


def _image_folder(root: Path, x, y, corrupt: int | None = None) -> Path:
    for i, (a, c) in enumerate(zip(x, y)):
        d = root / str(int(c))
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:05d}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image" if i == corrupt else _png(a))
    return root


def _hf_parquet(path: Path, x, y, row_group_size: int = 16) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    images = pa.array([{"bytes": _png(a), "path": f"{i}.png"} for i, a in enumerate(x)],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": images, "label": pa.array(y, pa.int64())}), path,
                   row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def variants(base):
    root, tx, ty = base
    out = {"npz": root}
    r = _variant(base, "npy", "data/train_npy", "stream = true\n")
    (r / "data/train_npy").mkdir()
    np.save(r / "data/train_npy/x.npy", tx)
    np.save(r / "data/train_npy/y.npy", ty)
    out["npy"] = r
    r = _variant(base, "npz_mapped", "data/train_raw.npz", "stream = true\n")
    np.savez(r / "data/train_raw.npz", x=tx, y=ty)
    out["npz_mapped"] = r
    r = _variant(base, "folder", "data/train", "stream = true\n")
    _image_folder(r / "data/train", tx, ty)
    out["folder"] = r
    r = _variant(base, "parquet", "data/train.parquet", 'stream = true\nimage_column = "image"\n')
    _hf_parquet(r / "data/train.parquet", tx, ty)
    out["parquet"] = r
    return out


@pytest.mark.parametrize("kind", ["npy", "npz_mapped", "folder", "parquet"])
def test_streamed_source_reads_the_same_pixels_and_labels(base, variants, kind):
    _, tx, ty = base
    split = Project(variants[kind]).train
    assert isinstance(split.x, RowArray) and split.streamed
    want = tx.astype(np.float32) / 255
    assert split.x.shape == want.shape and len(split.x) == N_TRAIN and split.x.dtype == np.float32
    np.testing.assert_array_equal(split.y, ty)
    np.testing.assert_array_equal(np.asarray(split.x), want)
    idx = np.array([40, 3, 3, -1, 17])
    np.testing.assert_array_equal(split.x[idx], want[idx])                  # unsorted, repeated, negative
    np.testing.assert_array_equal(split.x[5:50:7], want[5:50:7])
    np.testing.assert_array_equal(split.x[-2], want[-2])
    mask = np.arange(N_TRAIN) % 5 == 0
    np.testing.assert_array_equal(split.x[mask], want[mask])
    chunks = list(split.iter_chunks(16, start=8, stop=60))
    assert [c[0] for c in chunks] == [8, 24, 40, 56]
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), want[8:60])
    np.testing.assert_array_equal(np.concatenate([c[2] for c in chunks]), ty[8:60])
    sub = split.rows(10, 30)
    assert sub.streamed and len(sub) == 20 and sub.ids[0] == 10
    np.testing.assert_array_equal(sub.x[[0, 19]], want[[10, 29]])


def test_memmapped_npy_equals_in_memory(base, variants, tmp_path):
    _, tx, ty = base
    mapped = load_split(variants["npy"] / "data/train_npy", image_shape=(1, 28, 28), stream=True)
    whole = load_split(variants["npy"] / "data/train_npy", image_shape=(1, 28, 28), stream=False)
    assert mapped.streamed and isinstance(whole.x, np.ndarray)
    np.testing.assert_array_equal(np.asarray(mapped.x), whole.x)
    np.testing.assert_array_equal(mapped.x[np.arange(N_TRAIN)], whole.x)
    # the uncompressed .npz member is mapped at its offset, Fortran order included
    f = np.asfortranarray(np.random.default_rng(0).normal(size=(9, 4)).astype(np.float32))
    np.savez(tmp_path / "f.npz", x=f, y=np.zeros(9, np.int64))
    s = load_split(tmp_path / "f.npz", stream=True)
    assert s.streamed and s.x.source.offset > 0
    np.testing.assert_array_equal(np.asarray(s.x), f)
    # auto: a small source is read into memory, same values
    auto = load_split(variants["npy"] / "data/train_npy", image_shape=(1, 28, 28))
    assert isinstance(auto.x, np.ndarray) and np.array_equal(auto.x, whole.x)


def test_chunks_through_dataloader_workers(variants, base):
    _, tx, _ = base
    root = _variant(base, "workers", "data/train", "stream = true\nworkers = 2\n")
    shutil.copytree(variants["folder"] / "data/train", root / "data/train")
    split = Project(root).train
    assert split.workers == 2 and split.rows(0, 10).workers == 2
    got = list(split.iter_chunks(10))                             # the project's 2 workers
    assert [c[0] for c in got] == list(range(0, N_TRAIN, 10))
    np.testing.assert_array_equal(np.concatenate([c[1] for c in got]), tx.astype(np.float32) / 255)


@pytest.mark.parametrize("method", ["tracin", "diffin"])
def test_streamed_sources_score_like_the_npz(variants, method):
    settings = ScoreSettings(batch_size=16, hessian_batch=32)
    ref = pd.read_parquet(score(variants["npz"], method, run="ref", settings=settings) / "scores.parquet")
    for kind in ("npy", "npz_mapped", "folder", "parquet"):
        got = pd.read_parquet(score(variants[kind], method, run="s", settings=settings) / "scores.parquet")
        assert list(got.columns) == list(ref.columns)
        np.testing.assert_array_equal(got["label"], ref["label"])
        for col in ("influence", "self_influence", "label_issue", "confidence", "loss"):
            np.testing.assert_allclose(got[col], ref[col], rtol=1e-5, atol=1e-9, err_msg=f"{kind} {col}")
        assert got["influence"].std() > 0


# --- bad input: one line, naming the file -----------------------------------------------------
def _one_line(err: DiffinError, name: str, *words):
    msg = str(err)
    assert "\n" not in msg and name in msg, msg
    for w in words:
        assert w in msg, msg


def test_corrupt_image_in_folder_names_the_file(base, tmp_path, capsys):
    _, tx, ty = base
    folder = _image_folder(tmp_path / "bad", tx[:20], ty[:20], corrupt=7)
    bad_file = next(folder.rglob("00007.png"))
    with pytest.raises(DiffinError) as e:                      # read whole: fails at load
        load_split(folder, image_shape=(1, 28, 28), stream=False)
    _one_line(e.value, str(bad_file), "not a readable image")
    split = load_split(folder, image_shape=(1, 28, 28), stream=True)   # streamed: fails when read
    assert split.x[:7].shape == (7, 1, 28, 28)
    for workers in (0, 1):
        with pytest.raises(DiffinError) as e:
            list(split.iter_chunks(4, workers=workers))
        _one_line(e.value, str(bad_file), "not a readable image")
    # through the CLI: one line on stderr, exit status 2, no run written
    root = _variant(base, "corrupt", "data/train", "stream = true\n")
    _image_folder(root / "data/train", tx, ty, corrupt=7)
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        main(["score", str(root), "-m", "tracin"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert ex.value.code == 2 and len(err) == 1 and "00007.png" in err[0] and "not a readable image" in err[0]
    assert Project(root).runs() == []                          # no run (resumable stages may stay)


def test_parquet_without_the_image_column(base, tmp_path):
    _, tx, ty = base
    path = _hf_parquet(tmp_path / "t.parquet", tx[:8], ty[:8])
    with pytest.raises(DiffinError) as e:
        load_split(path, image_shape=(1, 28, 28), image_column="img")
    _one_line(e.value, str(path), "no image column 'img'", "image")
    with pytest.raises(DiffinError) as e:
        load_split(path, image_shape=(1, 28, 28), image_column="label")
    _one_line(e.value, str(path), "encoded image bytes")
    with pytest.raises(DiffinError) as e:
        load_split(path, image_shape=(1, 28, 28), image_column="image", label_column="target")
    _one_line(e.value, str(path), "no label column 'target'")


def test_image_above_the_pixel_cap(base, tmp_path):
    _, tx, ty = base
    folder = _image_folder(tmp_path / "big", tx[:4], ty[:4])
    with pytest.raises(DiffinError) as e:
        load_split(folder, image_shape=(1, 28, 28), max_pixels=500)
    _one_line(e.value, str(folder), "28x28 = 784 pixels, above max_pixels = 500")
    path = _hf_parquet(tmp_path / "big.parquet", tx[:4], ty[:4])
    with pytest.raises(DiffinError) as e:
        load_split(path, image_shape=(1, 28, 28), image_column="image", max_pixels=500)
    _one_line(e.value, str(path), "row 0", "above max_pixels")
    # bomb-sized headers (a few bytes on disk): the default cap, then Pillow's own guard
    for side, words in ((8000, "8000x8000 = 64,000,000 pixels, above max_pixels = 50,000,000"),
                        (30000, "decompression bomb")):
        bomb = tmp_path / f"bomb{side}" / "0" / "x.png"
        bomb.parent.mkdir(parents=True)
        bomb.write_bytes(_png_header(side, side))
        with pytest.raises(DiffinError) as e:
            load_split(bomb.parents[1], image_shape=(1, 28, 28), stream=False)
        _one_line(e.value, str(bomb), words)


def _png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels, with a few bytes of image data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_truncated_npy_and_npz(base, tmp_path):
    _, tx, ty = base
    (tmp_path / "cut").mkdir()
    np.save(tmp_path / "cut/x.npy", tx)
    np.save(tmp_path / "cut/y.npy", ty)
    data = (tmp_path / "cut/x.npy").read_bytes()
    (tmp_path / "cut/x.npy").write_bytes(data[:len(data) // 2])
    with pytest.raises(DiffinError) as e:
        load_split(tmp_path / "cut", image_shape=(1, 28, 28), stream=True)
    _one_line(e.value, str(tmp_path / "cut/x.npy"), "truncated")
    np.savez(tmp_path / "cut.npz", x=tx, y=ty)
    data = (tmp_path / "cut.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(DiffinError) as e:
        load_split(tmp_path / "cut.npz", stream=True)
    _one_line(e.value, str(tmp_path / "cut.npz"), "not a readable .npz")


def test_wrong_size_needs_resize(base, tmp_path):
    _, tx, ty = base
    folder = _image_folder(tmp_path / "small", tx[:4], ty[:4])
    with pytest.raises(DiffinError) as e:
        load_split(folder, image_shape=(1, 14, 14))
    _one_line(e.value, str(folder), "28x28", "resize = true")
    s = load_split(folder, image_shape=(3, 14, 14), resize=True)
    assert s.x.shape == (4, 3, 14, 14) and np.allclose(s.x[:, 0], s.x[:, 2])


def test_query_folder_uses_the_train_classes(base, tmp_path):
    _, tx, ty = base
    root = _variant(base, "qfolder", "data/train")
    _image_folder(root / "data/train", tx, ty)
    only = ty == ty.max()                                        # the query has one class folder
    _image_folder(root / "data/query", tx[only], ty[only])
    (root / "diffin.toml").write_text(_toml("data/train").replace("data/query.npz", "data/query"))
    q = Project(root).query
    assert set(q.y.tolist()) == {int(ty.max())}
    # label_names fix the class order: folder "d" gets index label_names.index("d")
    names = [str(d) for d in range(9, -1, -1)]
    toml = _toml("data/train").replace("data/query.npz", "data/query")
    (root / "diffin.toml").write_text(toml.replace("image_shape", f"label_names = {names}\nimage_shape"))
    p = Project(root)
    np.testing.assert_array_equal(p.train.y, 9 - ty)
    assert set(p.query.y.tolist()) == {9 - int(ty.max())}
    (root / "data/train/extra").mkdir()
    with pytest.raises(DiffinError) as e:
        Project(root).train
    _one_line(e.value, str(root / "data/train"), "class folder 'extra' is not one of the classes")


@pytest.mark.parametrize("line, words", [
    ('stream = "yes"', "stream must be true, false"),
    ("max_pixels = 0", "max_pixels must be a positive integer"),
    ("resize = 1", "resize must be true or false"),
    ("image_column = 3", "image_column must be a column name"),
    ("workers = -1", "workers must be a whole number >= 0"),
])
def test_bad_data_keys_name_diffin_toml(base, line, words):
    root = _variant(base, "badkey", "data/train.npz", line + "\n")
    with pytest.raises(DiffinError) as e:
        Project(root)
    _one_line(e.value, str(root / "diffin.toml"), words)
