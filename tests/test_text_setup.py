"""Setup from uploads accepts text: .tsv/.jsonl/.csv splits with a text column, and a tokenizer
as a .zip of its folder, its tokenizer.json or the folder itself (diffin_core/workspace/uploads.py,
pages/1_Setup.py)."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from app_fixtures import jobs, new_app, texts, workspace  # noqa: F401
from text_fixtures import text_sample  # noqa: F401

from diffin_core.errors import DiffinError
from diffin_core.project.folder import Project
from diffin_core.workspace import uploads

pytestmark = pytest.mark.slow


def upload(folder, role, path, name=None):
    with open(path, "rb") as fh:
        return uploads.store_upload(folder, role, name or path.name, fh)


def zipped_tokenizer(src) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in (src / "tokenizer").iterdir():
            z.write(f, f"my-tokenizer/{f.name}")
    buf.seek(0)
    return buf


def test_text_project_from_uploads(text_sample, tmp_path):
    folder = tmp_path / "ws" / "uploaded"
    assert "model OK" in upload(folder, "model", text_sample / "model.py")
    msg = uploads.store_upload(folder, "tokenizer", "tok.zip", zipped_tokenizer(text_sample))
    assert "tokenizer OK" in msg and (folder / "tokenizer/tokenizer.json").is_file()
    for f in sorted((text_sample / "checkpoints").glob("ckpt_*.safetensors")):
        if ".exp_avg" not in f.name:
            upload(folder, "checkpoint", f)
    msg = upload(folder, "train", text_sample / "data/train.tsv")
    assert "160 samples" in msg and "texts in column 'text'" in msg and "['ham', 'spam']" in msg
    upload(folder, "query", text_sample / "data/query.tsv")
    table = uploads.checkpoint_table(folder)
    assert table["step"].notna().all() and table["lr"].notna().all()     # read from the Recorder's files
    assert uploads.finish(folder, table, max_length=32) == []
    project = Project(folder)
    assert project.kind == "text" and project.config["data"]["text_column"] == "text"
    assert project.label_names == ["ham", "spam"] and len(project.train) == 160
    assert project.train.texts([0])[0] == Project(text_sample).train.texts([0])[0]


def test_text_upload_problems_are_one_line(text_sample, tmp_path):
    folder = tmp_path / "ws" / "bad"
    bad = tmp_path / "train.tsv"
    bad.write_text("label\ttext\nham\thello\nspam\t   \n")
    with pytest.raises(DiffinError, match=r"train.tsv: row 1 \(line 3\): the text in column 'text' is empty"):
        upload(folder, "train", bad)
    nolabel = tmp_path / "t.jsonl"
    nolabel.write_text(json.dumps({"text": "hi", "y": 1}) + "\n")
    with pytest.raises(DiffinError, match="needs a 'label' column"):
        upload(folder, "train", nolabel)
    with pytest.raises(DiffinError, match="tok.zip: the zip holds no tokenizer"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("readme.txt", "no tokenizer here")
        uploads.store_upload(folder, "tokenizer", "tok.zip", buf)
    assert not (folder / "data").exists() and not (folder / "tokenizer").exists()


def test_setup_page_takes_a_tokenizer_folder_and_text_uploads(text_sample, workspace):
    """The Setup page as a user clicks it: model.py, the checkpoints, the .tsv splits, and the
    tokenizer as its folder (the folder picker names each file by its path inside the folder);
    then Create project. A folder with no tokenizer in it is one line and writes nothing."""
    at = new_app(page="pages/1_Setup.py")
    at.text_input(key="setup_name").set_value("sms").run()
    folder = workspace / "sms"

    def put(key, files):
        at.file_uploader(key=key).set_value(files).run()
        assert not at.exception, at.exception

    put("setup_tokenizer_dir", [("notes/readme.txt", b"no tokenizer here", "text/plain")])
    assert any(e == "notes: the folder holds no tokenizer (tokenizer.json, tokenizer_config.json or vocab.txt)"
               for e in texts(at.error)), texts(at.error)
    assert not (folder / "tokenizer").exists()
    tok = sorted((text_sample / "tokenizer").iterdir())
    put("setup_tokenizer_dir", [(f"my-tokenizer/{f.name}", f.read_bytes(), "application/octet-stream") for f in tok])
    assert any(s.startswith("my-tokenizer: tokenizer OK") for s in texts(at.success)), texts(at.success)
    assert sorted(p.name for p in (folder / "tokenizer").iterdir()) == [f.name for f in tok]
    put("setup_checkpoint", [(f.name, f.read_bytes(), "application/octet-stream")     # before model.py: in-process
                             for f in sorted((text_sample / "checkpoints").glob("ckpt_*.safetensors"))
                             if ".exp_avg" not in f.name])
    put("setup_model", ("model.py", (text_sample / "model.py").read_bytes(), "text/x-python"))
    for role in ("train", "query"):
        put(f"setup_{role}", (f"{role}.tsv", (text_sample / f"data/{role}.tsv").read_bytes(), "text/tab-separated-values"))
    assert not [e for e in texts(at.error) if "notes:" not in e], texts(at.error)
    at.number_input(key="setup_max_length").set_value(32).run()      # the sample's max_length
    at.button(key="setup_finish").click().run()
    assert not at.exception, at.exception
    assert any("Project ready" in s for s in texts(at.success)), (texts(at.success), texts(at.error))
    project = Project(folder)
    assert project.kind == "text" and len(project.train) == 160
    assert project.train.texts([5]) == Project(text_sample).train.texts([5])
    assert np.array_equal(project.train.x[:8], Project(text_sample).train.x[:8])     # the same tokenizer's ids
