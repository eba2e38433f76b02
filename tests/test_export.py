import io
import json
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffin_core.workspace import export as ex
from diffin_core.errors import DiffinError
from diffin_core.workspace.review import ReviewLog

N = 6


@pytest.fixture
def data(tmp_path):
    """6 RGB 2x2 images in [0, 1], labels 0/1/2, ids 100..105; 101 excluded, 103 -> label 2."""
    rng = np.random.default_rng(0)
    x = rng.random((N, 3, 2, 2)).astype(np.float32)
    y = np.array([0, 1, 0, 1, 2, 2])
    ids = np.arange(100, 100 + N)
    log = ReviewLog(tmp_path / "proj")
    log.decide(101, "exclude")
    log.decide(103, "relabel", new_label=2)
    log.decide(104, "keep")
    log.decide(999, "exclude")  # not in this split: ignored
    return x, y, ids, log.state()


EXTRA = {"run": "run-1", "method": "diffin", "score_columns": ["self_influence"],
         "settings": {"k": np.int64(3)}}


def test_apply_decisions(data):
    x, y, ids, state = data
    xc, yc, idc, decision = ex.apply_decisions(x, y, ids, state)
    assert list(decision) == ["undecided", "exclude", "undecided", "relabel", "keep", "undecided"]
    assert list(idc) == [100, 102, 103, 104, 105]
    assert list(yc) == [0, 0, 2, 2, 2]
    np.testing.assert_array_equal(xc, x[[0, 2, 3, 4, 5]])


def test_npz_and_manifest(tmp_path, data):
    x, y, ids, state = data
    out = ex.export_split(tmp_path / "out" / "clean.npz", "npz", x, y, ids, state,
                          manifest_extra=EXTRA)
    with np.load(out) as z:
        assert list(z["ids"]) == [100, 102, 103, 104, 105]
        assert list(z["y"]) == [0, 0, 2, 2, 2]
        np.testing.assert_array_equal(z["x"], x[[0, 2, 3, 4, 5]])
    man = json.loads((tmp_path / "out" / "clean.decisions.json").read_text())
    assert man["run"] == "run-1" and man["settings"] == {"k": 3} and man["kind"] == "review"
    assert man["counts"] == {"exclude": 1, "keep": 1, "relabel": 1, "undecided": 3}
    assert man["n_written"] == 5 and man["format"] == "npz"
    decided_at = man["samples"][3].pop("decided_at")          # who decided what and when (issue 20)
    assert decided_at == str(state.loc[103, "ts"]) and decided_at.startswith("20")
    assert man["samples"][3] == {"sample_id": 103, "original_label": 1, "final_label": 2,
                                 "decision": "relabel", "decided_by": "local", "how": "single"}
    assert man["samples"][0] == {"sample_id": 100, "original_label": 0, "final_label": 0, "decision": "undecided"}
    assert [s["sample_id"] for s in man["samples"]] == list(ids)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clean.decisions.json",
                                                                     "clean.npz"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_tables_keep_every_row(tmp_path, data, fmt):
    x, y, ids, state = data
    out = ex.export_split(tmp_path / f"clean.{fmt}", fmt, x, y, ids, state, manifest_extra=EXTRA)
    df = pd.read_csv(out) if fmt == "csv" else pd.read_parquet(out)
    assert list(df.columns[:4]) == ["sample_id", "label", "original_label", "decision"]
    assert list(df.columns[4:]) == [f"f{i}" for i in range(12)]
    assert list(df["sample_id"]) == list(ids)
    assert list(df["decision"]) == ["undecided", "exclude", "undecided", "relabel", "keep",
                                    "undecided"]
    assert list(df["label"]) == [0, 1, 0, 2, 2, 2]
    assert list(df["original_label"]) == list(y)
    np.testing.assert_allclose(df.iloc[:, 4:].to_numpy(), x.reshape(N, -1), rtol=1e-6)
    assert (tmp_path / "clean.decisions.json").exists()


def test_imagefolder(tmp_path, data):
    x, y, ids, state = data
    out = ex.export_split(tmp_path / "clean.zip", "imagefolder", x, y, ids, state,
                          label_names=["cat", "dog", "emu"], manifest_extra=EXTRA)
    with zipfile.ZipFile(out) as zf:
        names = sorted(zf.namelist())
        assert names == ["cat/100.png", "cat/102.png", "emu/103.png", "emu/104.png",
                         "emu/105.png"]
        img = np.asarray(Image.open(io.BytesIO(zf.read("emu/103.png"))))
    assert img.shape == (2, 2, 3)
    np.testing.assert_array_equal(img, np.round(x[3].transpose(1, 2, 0) * 255).astype(np.uint8))


def test_imagefolder_grayscale_from_flat_rows(tmp_path):
    x = np.arange(2 * 16, dtype=np.uint8).reshape(2, 16) * 7  # (N, D) uint8, reshaped (1, 4, 4)
    out = ex.export_subset(tmp_path / "s.zip", "imagefolder", x, np.array([0, 1]),
                           np.array([5, 6]), np.array([False, True]), reason="drop harmful",
                           image_shape=(1, 4, 4))
    with zipfile.ZipFile(out) as zf:
        assert zf.namelist() == ["1/6.png"]
        img = Image.open(io.BytesIO(zf.read("1/6.png")))
        assert img.mode == "L"
        np.testing.assert_array_equal(np.asarray(img), x[1].reshape(4, 4))


def test_subset_shares_writers(tmp_path, data):
    x, y, ids, _ = data
    mask = np.array([True, False, True, True, False, True])
    out = ex.export_subset(tmp_path / "core.csv", "csv", x, y, ids, mask, reason="coreset 4/6",
                           manifest_extra={"run": "run-1"})
    df = pd.read_csv(out)
    assert list(df["decision"]) == ["keep", "exclude", "keep", "keep", "exclude", "keep"]
    assert list(df["label"]) == list(y)
    man = json.loads((tmp_path / "core.decisions.json").read_text())
    assert man["kind"] == "subset" and man["reason"] == "coreset 4/6" and man["run"] == "run-1"
    assert man["counts"] == {"exclude": 2, "keep": 4}


def test_error_mid_export_leaves_no_file(tmp_path, data, monkeypatch):
    x, y, ids, state = data
    calls = []

    def failing_png(img):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return b"png"

    monkeypatch.setattr(ex, "_png", failing_png)
    with pytest.raises(DiffinError, match=r"clean.zip: cannot write the export \(disk full\)"):   # one line
        ex.export_split(tmp_path / "clean.zip", "imagefolder", x, y, ids, state,
                        manifest_extra=EXTRA)
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == [tmp_path / "proj"]


def test_bad_manifest_leaves_no_file(tmp_path, data):
    x, y, ids, state = data
    with pytest.raises(DiffinError, match="JSON"):
        ex.export_split(tmp_path / "clean.npz", "npz", x, y, ids, state,
                        manifest_extra={"model": object()})
    assert list(tmp_path.iterdir()) == [tmp_path / "proj"]


def test_bad_inputs(tmp_path, data):
    x, y, ids, state = data
    with pytest.raises(DiffinError, match="unknown export format") as err:
        ex.export_split(tmp_path / "c.xlsx", "xlsx", x, y, ids, state, manifest_extra={})
    assert "c.xlsx" in str(err.value)
    with pytest.raises(DiffinError, match="disagree"):
        ex.apply_decisions(x, y[:3], ids, state)
    with pytest.raises(DiffinError, match="image_shape"):
        ex.export_split(tmp_path / "c.zip", "imagefolder", x.reshape(N, -1), y, ids, state,
                        manifest_extra={})
    with pytest.raises(DiffinError, match="no name"):
        ex.export_split(tmp_path / "c.zip", "imagefolder", x, y, ids, state,
                        label_names=["a", "b"], manifest_extra={})
    assert list(tmp_path.iterdir()) == [tmp_path / "proj"]


# --- faithful exports: the input's own arrays, dtypes, shapes, ids and column order -------------

from diffin_core.project.data import load_split  # noqa: E402


def _state(tmp_path, decisions):
    log = ReviewLog(tmp_path / "log")
    for sid, action, lab in decisions:
        log.decide(sid, action, new_label=lab)
    return log.state()


def _export_source(tmp_path, src, fmt, decisions, name="out", **kw):
    split = load_split(src)
    state = _state(tmp_path / name, decisions)
    out = tmp_path / f"{name}.{ {'imagefolder': 'zip'}.get(fmt, fmt)}"
    return ex.export_split(out, fmt, split.x, split.y, split.ids, state, manifest_extra={},
                           source=ex.Source(src), **kw), split


@pytest.fixture
def mnist_like(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 784), dtype=np.uint8)
    y = rng.integers(0, 10, 40).astype(np.int64)
    true_y = y.copy()
    true_y[:4] = (y[:4] + 1) % 10
    src = tmp_path / "train.npz"
    np.savez_compressed(src, x=x, y=y, true_y=true_y)
    return src


def test_npz_without_decisions_equals_the_input(tmp_path, mnist_like):
    out, _ = _export_source(tmp_path, mnist_like, "npz", [])
    with np.load(mnist_like) as a, np.load(out) as b:
        assert a.files == b.files == ["x", "y", "true_y"]
        for k in a.files:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
            np.testing.assert_array_equal(a[k], b[k])
    with zipfile.ZipFile(out) as zf:        # compressed, like the input
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
    man = json.loads(ex.manifest_path(out).read_text())
    assert man["faithful"] is True and man["source"] == str(mnist_like)


def test_npz_with_decisions_keeps_dtypes_and_every_row_array(tmp_path, mnist_like):
    out, split = _export_source(tmp_path, mnist_like, "npz", [(3, "exclude", None), (5, "relabel", 9),
                                                               (6, "keep", None)])
    with np.load(mnist_like) as a, np.load(out) as b:
        assert b.files == ["x", "y", "true_y"]          # the input's arrays and no other (no added ids)
        keep = np.ones(40, bool)
        keep[3] = False
        assert b["x"].dtype == np.uint8 and b["x"].shape == (39, 784)   # not float32 (N, 1, 28, 28)
        np.testing.assert_array_equal(b["x"], a["x"][keep])
        np.testing.assert_array_equal(b["true_y"], a["true_y"][keep])
        expected = a["y"].copy()
        expected[5] = 9
        np.testing.assert_array_equal(b["y"], expected[keep])
        assert b["y"].dtype == a["y"].dtype
    # the written rows' ids are in the decisions manifest, with who decided each sample and when
    np.testing.assert_array_equal(ex.written_ids(out), np.arange(40)[keep])
    man = json.loads(ex.manifest_path(out).read_text())
    assert man["written_ids"] == [i for i in range(40) if i != 3] and man["n_written"] == 39
    decided = {s["sample_id"]: s for s in man["samples"] if s["decision"] != "undecided"}
    assert sorted(decided) == [3, 5, 6]
    for s in decided.values():
        assert s["decided_by"] and s["decided_at"].startswith("20") and s["how"] == "single"
    assert len(load_split(out).y) == 39


CSV = ("sample_id,feat_b,label,feat_a,note\n"
       "10,0.5,1,7,3\n"
       "11,1.25,0,8,4\n"
       "12,2e-3,2,9,5\n"
       "13,3.0,1,10,6\n")


def test_csv_without_decisions_is_byte_identical(tmp_path):
    src = tmp_path / "train.csv"
    src.write_bytes(CSV.encode())
    out, _ = _export_source(tmp_path, src, "csv", [])
    assert out.read_bytes() == src.read_bytes()
    crlf = tmp_path / "crlf.csv"                 # Windows line ends stay too
    crlf.write_bytes(CSV.replace("\n", "\r\n").encode())
    out, _ = _export_source(tmp_path, crlf, "csv", [], name="crlf-out")
    assert out.read_bytes() == crlf.read_bytes()


def test_csv_with_decisions_changes_only_those_rows(tmp_path):
    src = tmp_path / "train.csv"
    src.write_bytes(CSV.encode())
    out, _ = _export_source(tmp_path, src, "csv", [(11, "exclude", None), (12, "relabel", 0)])
    lines = CSV.splitlines(keepends=True)
    assert out.read_text().splitlines(keepends=True) == [lines[0], lines[1], "12,2e-3,0,9,5\n", lines[4]]
    df = pd.read_csv(out)
    assert list(df.columns) == ["sample_id", "feat_b", "label", "feat_a", "note"]


def test_csv_with_quoted_fields_round_trips_the_values(tmp_path):
    src = tmp_path / "q.csv"
    src.write_text('label,"v w",x\n1,"2",3\n0,"4",5\n')
    out, _ = _export_source(tmp_path, src, "csv", [], name="q-out")
    assert pd.read_csv(out).equals(pd.read_csv(src))
    out, _ = _export_source(tmp_path, src, "csv", [(0, "relabel", 0)], name="q-rel")
    got = pd.read_csv(out)
    assert list(got["label"]) == [0, 0] and list(got.columns) == ["label", "v w", "x"]
    assert list(got["v w"]) == [2, 4]


def test_parquet_without_decisions_equals_the_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"sample_id": pa.array([5, 6, 7], pa.int32()), "z": pa.array([1.5, 2.5, 3.5], pa.float32()),
                      "label": pa.array([0, 1, 1], pa.int16()), "a": pa.array([9, 8, 7], pa.uint8())},
                     metadata={b"owner": b"me"})
    src = tmp_path / "train.parquet"
    pq.write_table(table, src)
    out, _ = _export_source(tmp_path, src, "parquet", [])
    assert pq.read_table(out).equals(pq.read_table(src), check_metadata=True)
    out, _ = _export_source(tmp_path, src, "parquet", [(6, "exclude", None), (7, "relabel", 0)], name="p2")
    got = pq.read_table(out)
    assert got.schema.equals(table.schema, check_metadata=True)
    assert got.column("sample_id").to_pylist() == [5, 7] and got.column("label").to_pylist() == [0, 0]
    assert got.column("z").to_pylist() == [1.5, 3.5]


def test_imagefolder_upload_exported_by_copying_its_files(tmp_path):
    from diffin_core.workspace import uploads
    rng = np.random.default_rng(2)
    members = {}
    for cls in ("cat", "dog"):
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(buf, format="PNG")
            members[f"pets/{cls}/img{i}.png"] = buf.getvalue()
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        for k, v in members.items():
            zf.writestr(k, v)
    proj = tmp_path / "proj"
    uploads.store_upload(proj, "train", "pets.zip", io.BytesIO(zbuf.getvalue()))
    src = proj / "data" / "train.npz"
    assert (proj / "data" / "train.images.zip").is_file() and ex.Source(src).format == "imagefolder"
    split = load_split(src)
    files = list(np.load(src)["files"])
    cat1 = files.index("pets/cat/img1.png")
    dog0 = files.index("pets/dog/img0.png")
    state = _state(tmp_path, [(int(split.ids[cat1]), "exclude", None), (int(split.ids[dog0]), "relabel", 0)])
    out = ex.export_split(tmp_path / "clean.zip", "imagefolder", split.x, split.y, split.ids, state,
                          label_names=["cat", "dog"], manifest_extra={}, source=ex.Source(src))
    with zipfile.ZipFile(out) as zf:
        names = sorted(zf.namelist())
        moved = f"cat/{int(split.ids[dog0])}-img0.png"       # dog/img0 relabelled to cat; the name was taken
        assert names == sorted(["cat/img0.png", "cat/img2.png", moved, "dog/img1.png", "dog/img2.png"])
        assert zf.read(moved) == members["pets/dog/img0.png"]  # the same file, byte for byte
        assert zf.read("cat/img0.png") == members["pets/cat/img0.png"]
        assert zf.read("dog/img2.png") == members["pets/dog/img2.png"]   # byte for byte


def test_converting_keeps_the_stored_dtype(tmp_path, mnist_like):
    out, _ = _export_source(tmp_path, mnist_like, "csv", [(0, "exclude", None)])
    df = pd.read_csv(out)
    assert len(df) == 40 and list(df.columns[:4]) == ["sample_id", "label", "original_label", "decision"]
    assert df["decision"][0] == "exclude" and (df["decision"][1:] == "undecided").all()
    with np.load(mnist_like) as z:
        np.testing.assert_array_equal(df.iloc[:, 4:].to_numpy(), z["x"])   # 0-255 integers, not 0-1
    out, _ = _export_source(tmp_path, mnist_like, "imagefolder", [], name="img", image_shape=(1, 28, 28))
    with zipfile.ZipFile(out) as zf, np.load(mnist_like) as z:
        img = np.asarray(Image.open(io.BytesIO(zf.read(zf.namelist()[0]))))
        sid = int(zf.namelist()[0].split("/")[1].split(".")[0])
        np.testing.assert_array_equal(img, z["x"][sid].reshape(28, 28))


# --- streamed splits: exported chunk by chunk, never materialised ----------------------------------

@pytest.fixture
def big_images(tmp_path):
    """5,000 uint8 (3, 64, 64) images (61 MB; the float32 view would be 246 MB) as a folder of
    .npy files and as an uncompressed .npz, both memory-mapped when loaded streamed."""
    rng = np.random.default_rng(3)
    n = 5000
    folder = tmp_path / "train"
    folder.mkdir()
    x = np.lib.format.open_memmap(folder / "x.npy", mode="w+", dtype=np.uint8, shape=(n, 3, 64, 64))
    for a in range(0, n, 1000):
        x[a:a + 1000] = rng.integers(0, 256, (1000, 3, 64, 64), dtype=np.uint8)
    x.flush()
    y = rng.integers(0, 10, n)
    np.save(folder / "y.npy", y)
    npz = tmp_path / "train.npz"
    np.savez(npz, x=np.load(folder / "x.npy"), y=y, true_y=y)
    del x
    return folder, npz, n


def _traced_export(monkeypatch, *args, **kw):
    import tracemalloc
    monkeypatch.setattr(ex, "CHUNK_BYTES", 1 << 20)
    tracemalloc.start()
    try:
        out = ex.export_split(*args, **kw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, peak


@pytest.mark.parametrize("kind", ["folder", "npz"])
def test_memmapped_source_is_exported_without_materialising_it(tmp_path, monkeypatch, big_images, kind):
    folder, npz, n = big_images
    src = folder if kind == "folder" else npz
    split = load_split(src, stream=True)
    assert split.streamed
    state = _state(tmp_path / kind, [(3, "exclude", None), (4000, "exclude", None), (7, "relabel", 9)])
    out, peak = _traced_export(monkeypatch, tmp_path / f"{kind}.npz", "npz", split.x, split.y, split.ids, state,
                               manifest_extra={}, source=ex.Source(src))
    raw = np.load(folder / "x.npy", mmap_mode="r")
    assert peak < raw.nbytes / 8, f"{peak / 2**20:.1f} MB traced for a {raw.nbytes / 2**20:.0f} MB array"
    keep = np.ones(n, bool)
    keep[[3, 4000]] = False
    with np.load(out) as z:
        assert z["x"].dtype == np.uint8 and z["x"].shape == (n - 2, 3, 64, 64)   # the stored dtype
        np.testing.assert_array_equal(z["x"], raw[keep])
        expected = split.y.copy()
        expected[7] = 9
        np.testing.assert_array_equal(z["y"], expected[keep])
        ids = ex.written_ids(out) if kind == "npz" else z["ids"]    # a conversion writes x, y, ids
        np.testing.assert_array_equal(ids, np.arange(n)[keep])
        np.testing.assert_array_equal(ex.written_ids(out), np.arange(n)[keep])
        if kind == "npz":                      # a faithful copy: every member, in order, uncompressed
            assert z.files == ["x", "y", "true_y"]
            np.testing.assert_array_equal(z["true_y"], split.y[keep])
    if kind == "npz":
        with zipfile.ZipFile(out) as zf:
            assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    # the same decisions on the in-memory split give the same file contents
    mem = load_split(src, stream=False)
    out2 = ex.export_split(tmp_path / f"{kind}-mem.npz", "npz", np.asarray(raw), mem.y, mem.ids, state,
                           manifest_extra={}, source=ex.Source(src))
    with np.load(out) as a, np.load(out2) as b:
        assert a.files == b.files
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])


def test_streamed_split_converts_to_tables_and_images_in_chunks(tmp_path, monkeypatch):
    """csv, parquet and imagefolder conversions of a streamed split, written a few rows at a time,
    equal the in-memory conversion (csv byte for byte)."""
    rng = np.random.default_rng(4)
    folder = tmp_path / "small"
    folder.mkdir()
    np.save(folder / "x.npy", rng.integers(0, 256, (300, 1, 8, 8), dtype=np.uint8))
    np.save(folder / "y.npy", rng.integers(0, 3, 300))
    split = load_split(folder, stream=True)
    assert split.streamed
    state = _state(tmp_path / "t", [(1, "exclude", None), (2, "relabel", 0)])
    monkeypatch.setattr(ex, "CHUNK_BYTES", 2048)          # 8 float32 rows per chunk
    for fmt in ("csv", "parquet", "imagefolder"):
        name = {"imagefolder": "zip"}.get(fmt, fmt)
        out = ex.export_split(tmp_path / f"t.{name}", fmt, split.x, split.y, split.ids, state, manifest_extra={})
        ref = ex.export_split(tmp_path / f"ref.{name}", fmt, np.asarray(split.x), split.y, split.ids, state,
                              manifest_extra={})
        if fmt == "csv":
            assert out.read_bytes() == ref.read_bytes()
        elif fmt == "parquet":
            pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(ref))
        else:
            with zipfile.ZipFile(out) as a, zipfile.ZipFile(ref) as b:
                assert a.namelist() == b.namelist() and len(a.namelist()) == 299
                assert all(a.read(m) == b.read(m) for m in a.namelist())
