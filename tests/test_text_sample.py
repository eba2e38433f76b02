"""The text sample project: real SMS messages, flipped labels kept in true_label, a small
transformer trained by the project's [train] recipe (the Trainer + DiffinCallback); `diffin
score` accepts the folder."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from text_fixtures import text_sample  # noqa: F401

from diffin_core.project.checkpoints import load_batch_order, read_manifest
from diffin_core.project.folder import Project
from diffin_core.project.sample_text import RAW, read_raw

pytestmark = pytest.mark.slow


def test_sample_files_and_flips(text_sample):
    train = pd.read_csv(text_sample / "data/train.tsv", sep="\t", dtype=str, keep_default_na=False, quoting=3)
    assert list(train.columns) == ["sample_id", "label", "true_label", "text"] and len(train) == 160
    labels, texts = read_raw(RAW)
    for r in train.itertuples():                      # real messages, true_label = the collection's label
        assert texts[int(r.sample_id)] == r.text and labels[int(r.sample_id)] == r.true_label
    assert (train["label"] != train["true_label"]).sum() == 16          # 10% flipped
    project = Project(text_sample)
    assert project.kind == "text" and project.train.classes == ["ham", "spam"]
    assert project.train.texts([0])[0] == train["text"][0]
    assert project.train.true_y is not None and (project.train.true_y != project.train.y).sum() == 16
    assert (text_sample / "tokenizer/tokenizer.json").is_file()
    assert "SMS Spam Collection" in (text_sample / "README.md").read_text()


def test_trainer_run_is_recorded_for_diffin(text_sample):
    manifest = read_manifest(text_sample / "checkpoints/manifest.json")
    assert manifest.optimizer == "AdamW" and manifest.train_size == 160
    order = load_batch_order(manifest, 160)
    steps = len(order.offsets) - 1
    assert steps == 2 * 5 == manifest.checkpoints[-1].step           # 160 / 32 = 5 steps per epoch
    for e in range(2):                                                # each epoch a shuffled permutation
        rows = order.ids[order.offsets[5 * e]:order.offsets[5 * e + 5]]
        assert sorted(rows.tolist()) == list(range(160)) and rows.tolist() != list(range(160))
    info = json.loads((text_sample / "checkpoints/trainer.json").read_text())
    assert info["complete"] and info["max_grad_norm"] == 1.0 and info["batch_order"] == "batch_order.npz"


def test_diffin_score_accepts_the_folder(text_sample):
    project = Project(text_sample)
    assert project.validate() == []
    for run in ("loss-1", "tracin-1"):
        scores = project.scores(run)
        assert len(scores) == 160 and "true_label" in scores
        assert np.isfinite(scores["label_issue"]).all()
    assert np.isfinite(project.scores("tracin-1")["influence"]).all()


def test_diffin_demo_offers_the_text_sample(text_sample, tmp_path, capsys, monkeypatch):
    """`diffin demo --sample text` copies the SMS sample into the workspace (here the tiny build
    stands in for sample_data/sms-spam) and scores it; a second call scores nothing again."""
    import shutil

    from helpers import run_cli

    import diffin_core.project.sample_text as st
    shipped = tmp_path / "sample_data"
    shutil.copytree(text_sample, shipped / st.NAME)
    monkeypatch.setattr(st, "SAMPLE_DIR", shipped)
    ws = tmp_path / "ws"
    code, out, err = run_cli(["demo", "--workspace", ws, "--sample", "text", "-m", "loss"], capsys)
    dest = (ws / "sms-spam-sample").resolve()
    assert code in (None, 0), err
    assert f"sample project: {dest}" in out and "loss: wrote" in out and f"--workspace {dest.parent}" in out, out
    project = Project(dest)
    assert project.kind == "text" and [r.method for r in project.runs()] == ["loss"]
    assert len(project.scores(project.runs()[0].name)) == 160
    code, out, err = run_cli(["demo", "--workspace", ws, "--sample", "text", "-m", "loss"], capsys)
    assert code in (None, 0) and "loss: already scored" in out, (out, err)
    code, out, err = run_cli(["demo", "--workspace", ws, "--sample", "sms"], capsys)
    assert code == 2 and err.strip() == "error: --sample must be mnist or text, not 'sms'", err
