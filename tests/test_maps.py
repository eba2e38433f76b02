"""Map features: penultimate activations and projected gradients (UMAP itself runs in the app's job)."""
import numpy as np
import pytest
import torch

from diffin_core.tasks import maps
from diffin_core.errors import DiffinError
from diffin_core.engine.functional import FunctionalModel
from diffin_core.project.folder import Project
from diffin_core.run.scoring import score

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


def test_stored_map_is_built_from_the_store_alone(tmp_path, monkeypatch):
    """The "stored" map reads the run's feature store (PCA of its unit rows, then UMAP): no model
    is built and no gradient is computed; its coordinates keep the rows' geometry."""
    import sys
    import types

    from diffin_core.run import features as F
    project = Project(make_tiny_project(tmp_path / "p"))
    score(project, "diffin", run="d")
    store = F.FeatureStore.open(project, "d")

    def boom(*a, **k):
        raise AssertionError("the stored map ran the model")
    monkeypatch.setattr(FunctionalModel, "per_sample_grads", boom)
    monkeypatch.setattr(FunctionalModel, "directional", boom)
    monkeypatch.setattr(Project, "build_model", boom)
    monkeypatch.setattr(Project, "final_model", boom)
    feats = maps.stored_features(project, "d")
    assert feats.shape == (96, maps.PCA_DIM) and feats.dtype == np.float32
    assert np.array_equal(feats, maps.stored_features(project, "d"))     # seeded: the same map
    rows = np.asarray(store.train, dtype=np.float64)
    rows -= rows.mean(0)
    exact, kept = (rows @ rows.T).ravel(), (feats @ feats.T).astype(np.float64).ravel()
    assert np.corrcoef(exact, kept)[0, 1] > 0.95                       # the store's geometry
    # compute(kind="stored") writes umap-stored.parquet from those features (UMAP faked: its
    # numba compile takes a minute; the app runs the real one in a job)
    seen = {}

    class FakeUMAP:
        def __init__(self, **kw):
            pass

        def fit_transform(self, x):
            seen["x"] = x
            return x[:, :2]
    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    path = maps.compute(project, "d", kind="stored")
    assert path.name == "umap-stored.parquet"
    np.testing.assert_allclose(seen["x"], feats, rtol=1e-4, atol=1e-5)
    df = maps.load(project, "d", "stored")
    assert list(df["sample_id"]) == list(project.train.ids)
    np.testing.assert_allclose(df[["umap_x", "umap_y"]].to_numpy(), feats[:, :2], rtol=1e-5)
    monkeypatch.undo()
    score(project, "grad-dot", run="g")                              # a run without a store
    with pytest.raises(DiffinError, match="no feature store"):
        maps.stored_features(project, "g")
