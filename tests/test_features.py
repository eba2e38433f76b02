"""The feature store (diffin_core/features.py): the fold of the query plan into per-sample
effective gradients, the projection, the fast top-k and the views computed from the store."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch.nn import functional as F_

from diffin_core import features as F
from diffin_core.checkpoints import Recorder
from diffin_core.errors import DiffinError
from diffin_core.methods import ScoreSettings
from diffin_core.project import Project
from diffin_core.projector import Projector, prefix
from diffin_core.scoring import project_context, query_influence, score, top_k

from helpers import MODEL_PY, TOML, make_tiny_project


def tiny_with(root, optimizer):
    """The tiny 3-class project trained with another optimiser (momentum, AdamW...)."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 6)) * 2
    y = rng.integers(0, 3, 80)
    x = (centres[y] + rng.normal(size=(80, 6))).astype(np.float32)
    qy = rng.integers(0, 3, 20)
    qx = (centres[qy] + rng.normal(size=(20, 6))).astype(np.float32)
    (root / "data").mkdir(parents=True)
    np.savez(root / "data/train.npz", x=x, y=y)
    np.savez(root / "data/query.npz", x=qx, y=qy)
    (root / "model.py").write_text(MODEL_PY)
    (root / "diffin.toml").write_text(TOML)
    from diffin_core.models import MLP
    torch.manual_seed(1)
    model = MLP(6, (8,), 3)
    opt = optimizer(model.parameters())
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    with Recorder(root, model, opt, train_size=80, every=3) as rec:
        for _ in range(3):
            for idx in torch.randperm(80).split(16):
                opt.zero_grad()
                F_.cross_entropy(model(xt[idx]), yt[idx]).backward()
                opt.step()
                rec.step()
    return root


class ViewsOnly:
    def __init__(self, views):
        self.views = views


@pytest.mark.parametrize("opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.2),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01),
], ids=["sgd", "momentum+wd", "adamw"])
def test_fold_equals_the_query_plan(tmp_path, opt):
    """<e_z, g_Q> (one vector per sample, query-independent) == sum_k coef <w_k(g_Q), g_z(theta_k)>
    through the same stored views, for any query set and any recipe the engine models."""
    import warnings
    project = Project(tiny_with(tmp_path / "p", opt))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx = project_context(project)
    views = F.hessian_views(ctx, 12)
    e = F.effective_grads(ctx, F.segment_ops(ctx, views), *ctx.tensors(project.train.x, project.train.y))
    q = project.query
    for idx in ([0], [2, 5, 7], list(range(20))):
        u = ctx.mean_grad(ctx.m - 1, q.x[idx], q.y[idx])
        direct = F.exact_rows(ctx, ViewsOnly(views), q.x[idx], q.y[idx], np.arange(ctx.n))
        folded = (e @ u).double().numpy()
        assert np.abs(folded - direct).max() <= 1e-4 * np.abs(direct).max()
        assert np.abs(direct).max() > 0


def test_full_rank_store_is_the_exact_path(tmp_path):
    """With views of full rank (P = 83) on both sides, the fast path computes the same influence as
    the exact path; the stored projection only perturbs it (rescored rows are exact)."""
    root = make_tiny_project(tmp_path / "p")
    project = Project(root)
    settings = ScoreSettings(lanczos_steps=83)
    run = score(project, "diffin", run="d", settings=settings, features=False)
    ctx = project_context(project, settings)
    F.build(ctx, project.query, run / "features", F.FeatureSettings(dim=2048, view_rank=83, rerank=0))
    idx = [4, 9]
    exact = query_influence(project, "diffin", idx, settings)
    projected, label = F.fast_query_influence(project, "d", idx)
    assert "fast path" in label
    assert spearmanr(projected, exact)[0] > 0.97
    rescored, _ = F.fast_query_influence(project, "d", idx, rerank=len(exact))   # every row rescored
    np.testing.assert_allclose(rescored, exact, rtol=1e-3, atol=1e-4 * np.abs(exact).max())


def test_score_writes_the_store_and_top_k_uses_it(tmp_path):
    project = Project(make_tiny_project(tmp_path / "p"))
    run = score(project, "diffin", run="d")
    meta = json.loads((run / "features" / "meta.json").read_text())
    assert meta["n_train"] == 96 and meta["settings"]["dim"] == F.FeatureSettings().dim
    store = F.FeatureStore(run / "features")
    assert store.train.dtype == np.float16 and store.train.shape == (96, meta["settings"]["dim"])
    helpful, harmful = top_k(project, "d", [3], k=5)
    assert helpful.attrs["path"].startswith("fast path")
    assert not (run / "topk").exists()                       # nothing computed the slow way
    exact_h, exact_m = top_k(project, "d", [3], k=5, exact=True)
    assert exact_h.attrs["path"] == "exact path"
    assert len(set(helpful["sample_id"]) & set(exact_h["sample_id"])) >= 3
    assert len(set(harmful["sample_id"]) & set(exact_m["sample_id"])) >= 3
    assert helpful["influence"].is_monotonic_decreasing and harmful["influence"].is_monotonic_increasing
    with pytest.raises(DiffinError, match="out of range"):
        top_k(project, "d", [30], k=5)
    # --no-features: no store, the exact path
    run2 = score(project, "diffin", run="n", features=False)
    assert not (run2 / "features").exists()
    assert top_k(project, "n", [3], k=5)[0].attrs["path"] == "exact path"
    # a non-diffin run gets no store (its method is not what the store approximates)
    assert not (score(project, "grad-dot", run="g") / "features").exists()


def test_views_from_the_store_are_its_products(tmp_path):
    project = Project(make_tiny_project(tmp_path / "p"))
    run = score(project, "diffin", run="d")
    store = F.FeatureStore.open(project, "d")
    q = project.query
    # reverse view: row z's influence on each query sample = that query's top-k scores at row z
    rev = store.reverse(7)
    per_query = np.stack([store.query_influence([j]) for j in range(len(q))], 1)
    np.testing.assert_allclose(rev, per_query[7], rtol=1e-5, atol=1e-12)
    # class matrix: sum over training class a of the influence on query class b's mean loss
    m = store.class_matrix(q.y)
    y = project.train.y
    for a in range(3):
        for b in range(3):
            direct = store.query_influence(np.nonzero(q.y == b)[0])[y == a].sum()
            assert m[a, b] == pytest.approx(direct, rel=1e-3, abs=1e-9)
    # per-checkpoint contributions sum to the sample's influence through the stored views
    ctx = F._context(project, "d")
    parts = F.checkpoint_contributions(ctx, store, 7, q.x, q.y)
    assert len(parts) == len(store.meta["checkpoints"]) and parts["step"].is_monotonic_increasing
    whole = F.exact_rows(ctx, store, q.x, q.y, [7])[0]
    assert parts["contribution"].sum() == pytest.approx(whole, rel=1e-6)


def test_stale_or_broken_store(tmp_path):
    project = Project(make_tiny_project(tmp_path / "p"))
    run = score(project, "diffin", run="d")
    meta = json.loads((run / "features/meta.json").read_text())
    (run / "features/meta.json").write_text(json.dumps({**meta, "n_train": 95}))
    assert F.FeatureStore.open(project, "d") is None          # other data: not used
    (run / "features/train.npy").write_bytes(b"junk")
    (run / "features/meta.json").write_text(json.dumps(meta))
    with pytest.raises(DiffinError, match="feature store is unreadable"):
        F.FeatureStore.open(project, "d")


def test_projector_is_seeded_blockwise_and_keeps_inner_products():
    g = torch.randn(6, 1000)
    whole = Projector(1000, 512, seed=3, block=64)                     # R built once and cached
    blocks = Projector(1000, 512, seed=3, block=64, cache_mb=0)        # never materialised
    assert blocks._whole is None and whole._whole is not None
    np.testing.assert_allclose(whole(g).numpy(), blocks(g).numpy(), rtol=1e-5, atol=1e-5)
    assert not torch.equal(Projector(1000, 512, seed=4)(g), whole(g))
    f = Projector(1000, 4096, seed=0)(g)                             # R is defined by (seed, block)
    exact, approx = (g @ g.T).numpy(), (f @ f.T).numpy()
    assert np.abs(approx - exact).max() < 0.15 * np.abs(exact).max()
    small = prefix(f, 4096, 1024)                                    # a 1024-dim projection too
    assert np.corrcoef((small @ small.T).numpy().ravel(), exact.ravel())[0, 1] > 0.9
