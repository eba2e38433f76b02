"""Setup from uploads accepts text: .tsv/.jsonl/.csv splits with a text column, and a tokenizer
as a .zip of its folder or its tokenizer.json (diffin_core/workspace/uploads.py)."""
from __future__ import annotations

import io
import json
import zipfile

import pytest
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
