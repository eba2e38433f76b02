"""Setup page: a project built from real uploads, and bad uploads that leave the folder unchanged."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from app_fixtures import jobs, new_app, texts, workspace  # noqa: F401

from diffin_core import uploads
from diffin_core.checkpoints import read_manifest, read_state
from diffin_core.project import Project
from diffin_core.sample import SAMPLE_DIR

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
BAD = {
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
    at = new_app(page="pages/1_Setup.py")
    folder = workspace / "my-project"
    upload(at, "model", ("model.py", MODEL_PY, "text/x-python"))  # a project that already has a model
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
