import io
import json
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffin_core import export as ex
from diffin_core.errors import DiffinError
from diffin_core.review import ReviewLog

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
    assert man["samples"][3] == {"sample_id": 103, "original_label": 1, "final_label": 2,
                                 "decision": "relabel"}
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
    with pytest.raises(OSError):
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
