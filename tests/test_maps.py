"""Map features: penultimate activations and projected gradients (UMAP itself runs in the app's job)."""
import numpy as np
import torch

from diffin_core import maps
from diffin_core.functional import FunctionalModel
from diffin_core.project import Project
from diffin_core.scoring import score

from helpers import make_tiny_project


def test_projected_gradients_keep_inner_products(tmp_path):
    root = make_tiny_project(tmp_path / "p")
    project = Project(root)
    acts = maps.features(project, "activations")
    assert acts.shape == (96, 8)                               # MLP 6-8-3: the hidden layer
    feats = maps.features(project, "gradients", batch=40)
    assert feats.shape == (96, maps.PROJECTED_DIM)
    assert np.array_equal(feats, maps.features(project, "gradients"))   # fixed projection
    model = project.final_model()
    fm = FunctionalModel(model)
    g = fm.per_sample_grads(fm.theta_of(model), torch.as_tensor(project.train.x),
                            torch.as_tensor(project.train.y)).numpy()
    exact, approx = (g @ g.T).ravel(), (feats @ feats.T).ravel()
    assert np.corrcoef(exact, approx)[0, 1] > 0.9


def test_map_cache_is_per_feature_kind(tmp_path):
    root = make_tiny_project(tmp_path / "p")
    project = Project(root)
    score(project, "grad-dot", run="g")
    assert maps.load(project, "g", "gradients") is None
    assert maps.cache_path(project, "g", "gradients").name == "umap-gradients.parquet"
    assert maps.cache_path(project, "g").name == "umap.parquet"
