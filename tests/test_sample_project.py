"""The shipped sample project: its contract, and every method's label_issue finds its flipped labels."""
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from diffin_core.methods import METHODS
from diffin_core.project.folder import Project
from diffin_core.project.sample import SAMPLE_DIR
from diffin_core.run.scoring import run_method
from diffin_core.run.context import project_context

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project():
    return Project(SAMPLE_DIR / "mnist")


def test_sample_project_contract(project):
    assert len(project.train) == 4000 and len(project.query) == 1000
    flipped = project.train.true_y != project.train.y
    assert flipped.sum() == 400
    manifest = json.loads(project.manifest_path.read_text())
    assert len(manifest["checkpoints"]) >= 10 and manifest["optimizer"] == "SGD"
    assert all("step" in c and c["lr"] > 0 for c in manifest["checkpoints"])


@pytest.fixture(scope="module")
def ctx(project):
    return project_context(project)


# cleanlab-cv retrains the sample CNN 5 times (minutes on CPU): tested on a small model in test_dynamics.py
@pytest.mark.parametrize("method", sorted(m for m in METHODS if not getattr(METHODS[m], "needs_recipe", False)))
def test_every_label_issue_finds_the_flipped_labels(project, ctx, method):
    flipped = project.train.true_y != project.train.y
    li = run_method(ctx, method, project.query.x, project.query.y)["label_issue"]
    top = np.argsort(-li)[: len(li) // 10]
    assert roc_auc_score(flipped, li) > 0.9, method
    assert flipped[top].mean() > 0.5, method            # most of the top 10% are real flips (base rate 10%)
