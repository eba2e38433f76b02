"""A tiny build of the text sample (project/sample_text.py), scored once per test session."""
from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def text_sample(tmp_path_factory):
    """The SMS spam sample, cut down (160 train / 40 query messages, 2 epochs), trained by the
    Trainer + DiffinCallback and scored with "loss" and "tracin" (about a minute in all)."""
    from diffin_core.project.sample_text import build_text_sample
    from diffin_core.run.scoring import score
    root = build_text_sample(tmp_path_factory.mktemp("text") / "sms-spam-sample", n_train=160, n_query=40, epochs=2)
    score(root, "loss", run="loss-1")
    score(root, "tracin", run="tracin-1")
    return root


@pytest.fixture
def text_project(text_sample, tmp_path):
    """A private copy of the scored text sample (tests may write review decisions, exports)."""
    dest = tmp_path / "ws" / "sms-spam-sample"
    shutil.copytree(text_sample, dest, ignore=shutil.ignore_patterns("review.sqlite*", "exports"))
    return dest
