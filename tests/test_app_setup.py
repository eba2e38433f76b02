"""Setup page: a project built from real uploads, and bad uploads that leave the folder unchanged."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from app_fixtures import jobs, new_app, texts, workspace  # noqa: F401

from diffin_core.workspace import uploads
from diffin_core.project.checkpoints import read_manifest, read_state
from diffin_core.project.folder import Project
from diffin_core.project.sample import SAMPLE_DIR

SRC = SAMPLE_DIR / "mnist"
MODEL_PY = (SRC / "model.py").read_bytes()
CKPTS = ["ckpt_000000.safetensors", "ckpt_000250.safetensors", "ckpt_000504.safetensors"]


def upload(at, role, files):
    at.file_uploader(key=f"setup_{role}").set_value(files).run()
    assert not at.exception, at.exception


def snapshot(folder):
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def pt_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_project_from_uploads(workspace):
    at = new_app(page="pages/1_Setup.py")
    at.text_input(key="setup_name").set_value("digits").run()
    folder = workspace / "digits"
    upload(at, "model", ("model.py", MODEL_PY, "text/x-python"))
    state, _ = read_state(SRC / "checkpoints" / CKPTS[0])
    # two safetensors that carry step/lr, and a .pt dict with step and an optimiser state
    files = [(n, (SRC / "checkpoints" / n).read_bytes(), "application/octet-stream") for n in CKPTS[1:]]
    files.append(("first.pt", pt_bytes({"model": state, "step": 0,
                                        "optimizer": {"param_groups": [{"lr": 0.05}], "state": {}}}), "application/octet-stream"))
    upload(at, "checkpoint", files)
    upload(at, "train", ("train.npz", (SRC / "data/train.npz").read_bytes(), "application/octet-stream"))
    upload(at, "query", ("query.npz", (SRC / "data/query.npz").read_bytes(), "application/octet-stream"))
    ok = " ".join(texts(at.success))
    assert "model OK" in ok and "step and lr read from 1 of them" in ok and "4,000 samples" in ok, ok
    assert not at.error
    assert (folder / "checkpoints" / "first.pt").is_file() and (folder / "data" / "train.npz").is_file()
    table = uploads.checkpoint_table(folder)
    assert list(table["step"]) == [0, 250, 504] and list(table["lr"])[0] == 0.05
    at.button(key="setup_finish").click().run()
    assert not at.error, texts(at.error)
    assert at.session_state["project_dir"] == str(folder)
    project = Project(folder)
    assert project.validate() == []
    assert [c.step for c in read_manifest(folder / "checkpoints/manifest.json").checkpoints] == [0, 250, 504]
    assert len(project.train) == 4000 and project.image_shape == (1, 28, 28)


def test_missing_step_is_asked_for_and_nothing_written(workspace):
    at = new_app(page="pages/1_Setup.py")
    folder = workspace / "my-project"
    state, _ = read_state(SRC / "checkpoints" / CKPTS[-1])
    upload(at, "model", ("model.py", MODEL_PY, "text/x-python"))
    upload(at, "checkpoint", [("bare.pt", pt_bytes(state), "application/octet-stream")])
    upload(at, "train", ("train.npz", (SRC / "data/train.npz").read_bytes(), "application/octet-stream"))
    upload(at, "query", ("query.npz", (SRC / "data/query.npz").read_bytes(), "application/octet-stream"))
    assert "fill in the rest" in " ".join(texts(at.success))
    at.button(key="setup_finish").click().run()
    assert any("fill in its step and learning rate" in e for e in texts(at.error))
    assert not (folder / "diffin.toml").exists()
    # the table as a person would fill it in
    table = uploads.checkpoint_table(folder)
    table.loc[0, ["step", "lr"]] = [504, 0.05]
    assert uploads.finish(folder, table) == []
    assert Project(folder).manifest.checkpoints[0].step == 504


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


CKPT = (SRC / "checkpoints" / CKPTS[-1]).read_bytes()


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _bomb_zip() -> bytes:
    """The issue's zip: 1,000 members of 1 MB of zeros, 1.1 MB compressed."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from test_safezip import bomb_zip
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        return bomb_zip(Path(d) / "b.zip").read_bytes()


def _blank_pngs_zip() -> bytes:
    """The issue's ImageFolder zip: four blank 6000x6000 PNGs (0.14 MB)."""
    from PIL import Image
    img = io.BytesIO()
    Image.new("L", (6000, 6000)).save(img, format="PNG")
    return _zip({f"{c}/{i}.png": img.getvalue() for c in ("cat", "dog") for i in (1, 2)})


TRAIN = np.load(SRC / "data/train.npz")
BAD_LABELS = dict(x=TRAIN["x"][:50], y=np.where(np.arange(50) == 7, 12, TRAIN["y"][:50]))
BAD = {
    "1,000 x 1 MB zeros zip": ("checkpoint", ("ckpts.zip", _bomb_zip(), "application/zip"),
                               "zip bomb: 1000 members expand to 1,048,576,000 bytes"),
    "blank 6000x6000 PNGs": ("train", ("images.zip", _blank_pngs_zip(), "application/zip"),
                             "6000x6000 = 36,000,000 pixels, above the limit"),
    "label out of range": ("train", ("train.npz", _npz(**BAD_LABELS), "application/octet-stream"),
                           "label 12 is out of range: the model has 10 classes (0..9)"),
    "wrong kind": ("checkpoint", ("train.npz", (SRC / "data/train.npz").read_bytes(), "application/octet-stream"),
                   "wrong kind of file"),
    "truncated checkpoint": ("checkpoint", ("ckpt.safetensors", CKPT[: len(CKPT) // 2], "application/octet-stream"),
                             "corrupt or truncated"),
    "corrupt .pt": ("checkpoint", ("ckpt.pt", b"PK\x03\x04 not really a zip", "application/octet-stream"), "corrupt"),
    "zip with ../": ("checkpoint", ("ckpts.zip", _zip({"../evil.safetensors": CKPT}), "application/zip"),
                     "escapes"),
    "zip bomb": ("train", ("images.zip", _zip({"0/a.png": b"\0" * (30 << 20)}), "application/zip"), "zip bomb"),
    "0-byte file": ("train", ("train.npz", b"", "application/octet-stream"), "empty (0 bytes)"),
    "model.py that raises": ("model", ("model.py", b"raise RuntimeError('boom at import')\n", "text/x-python"),
                             "RuntimeError: boom at import"),
    "build() that raises": ("model", ("model.py", b"def build():\n    raise ValueError('no weights')\n", "text/x-python"),
                            "build() raised ValueError"),
    "checkpoint for another model": ("checkpoint", ("other.pt", pt_bytes({"w": torch.zeros(3)}), "application/octet-stream"),
                                     "don't fit the model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_upload_shows_message_and_changes_nothing(workspace, case):
    folder = workspace / "my-project"
    uploads.store_upload(folder, "model", "model.py", io.BytesIO(MODEL_PY))  # a project that already has a model
    at = new_app(page="pages/1_Setup.py")
    before, ws_before = snapshot(folder), sorted(p.name for p in workspace.iterdir())
    role, file, expected = BAD[case]
    upload(at, role, file if role != "checkpoint" else [file])
    errors = texts(at.error)
    assert len(errors) == 1 and expected in errors[0] and file[0] in errors[0], errors
    assert snapshot(folder) == before
    assert sorted(p.name for p in workspace.iterdir()) == ws_before  # no staging leftovers
    # the app keeps working: a good file after the bad one is accepted
    upload(at, "query", ("query.npz", (SRC / "data/query.npz").read_bytes(), "application/octet-stream"))
    assert any("query data OK" in s for s in texts(at.success))


def test_query_shape_mismatch_caught_at_upload_once(workspace):
    at = new_app(page="pages/1_Setup.py")
    folder = workspace / "my-project"
    upload(at, "model", ("model.py", MODEL_PY, "text/x-python"))
    upload(at, "train", ("train.npz", (SRC / "data/train.npz").read_bytes(), "application/octet-stream"))
    before = snapshot(folder)
    q = np.load(SRC / "data/query.npz")
    upload(at, "query", ("query.npz", _npz(x=q["x"][:, :100], y=q["y"]), "application/octet-stream"))
    at.run()                                             # a rerun does not repeat it
    errors = texts(at.error)
    assert errors == [f"query.npz: query samples have shape [100] but the train data has [784]"], errors
    assert snapshot(folder) == before and "query" not in uploads.read_draft(folder)


def test_model_with_too_few_outputs_for_the_labels_refused(workspace):
    at = new_app(page="pages/1_Setup.py")
    upload(at, "train", ("train.npz", (SRC / "data/train.npz").read_bytes(), "application/octet-stream"))
    small = MODEL_PY.replace(b"10", b"5") if b"10" in MODEL_PY else None
    if small is None:
        pytest.skip("the sample model.py does not spell its 10 outputs")
    upload(at, "model", ("model.py", small, "text/x-python"))
    errors = texts(at.error)
    assert len(errors) == 1 and "the model has 5 outputs but the train data has label 9" in errors[0], errors


def test_create_reports_each_problem_once(workspace):
    folder = workspace / "p"
    for role, name, data in [("model", "model.py", MODEL_PY),
                             ("train", "train.npz", (SRC / "data/train.npz").read_bytes()),
                             ("query", "query.npz", (SRC / "data/query.npz").read_bytes())]:
        uploads.store_upload(folder, role, name, io.BytesIO(data))
    uploads.store_upload(folder, "checkpoint", CKPTS[-1], io.BytesIO(CKPT))
    d = dict(np.load(folder / "data/train.npz"))           # broken after its upload check
    d["y"][3] = 11
    np.savez(folder / "data/train.npz", **d)
    table = uploads.checkpoint_table(folder)
    problems = uploads.finish(folder, table)
    assert len(problems) == 1 and "label 11 is out of range" in problems[0], problems
    shown = uploads.finish(folder, table, brief=True)          # what the Setup page shows: no server folders
    assert len(shown) == 1 and shown[0].startswith("train.npz: ") and "label 11 is out of range" in shown[0], shown
    assert str(workspace) not in shown[0]


def test_setup_page_takes_the_modules_model_py_imports(workspace):
    """Issue 20: a model.py with `from nets import Net` failed at Setup; the page takes the modules
    first (several .py files, or a .zip of them), then model.py builds in a child, no bytecode."""
    folder = workspace / "my-project"
    at = new_app(page="pages/1_Setup.py")
    model = (b"from nets import make\nfrom blocks.width import WIDTH\n\n\ndef build():\n"
             b"    return make(WIDTH)\n")
    upload(at, "model", ("model.py", model, "text/x-python"))
    assert any("No module named 'nets'" in e for e in texts(at.error)), texts(at.error)
    nets = (b"import torch\n\n\ndef make(width):\n    return torch.nn.Sequential(torch.nn.Flatten(), "
            b"torch.nn.Linear(784, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))\n")
    upload(at, "modules", [("nets.py", nets, "text/x-python"),
                           ("blocks.zip", _zip({"blocks/__init__.py": b"", "blocks/width.py": b"WIDTH = 16\n"}),
                            "application/zip")])
    assert any("nets.py: module saved beside model.py" in s for s in texts(at.success)), texts(at.success)
    assert any("blocks.zip: 2 module file(s) saved" in s for s in texts(at.success)), texts(at.success)
    at = new_app(page="pages/1_Setup.py")                   # a fresh session: model.py again
    upload(at, "model", ("model.py", model, "text/x-python"))
    assert not at.error, texts(at.error)
    assert any("model OK (Sequential" in s for s in texts(at.success)), texts(at.success)
    assert (folder / "nets.py").is_file() and (folder / "blocks" / "width.py").is_file()
    assert not list(folder.rglob("__pycache__"))
