"""The feature store (diffin_core/run/features.py): the fold of the query plan into per-sample
effective gradients, the projection, the fast top-k and the views computed from the store."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch.nn import functional as F_

from diffin_core.run import features as F
from diffin_core.run import scoring as S
from diffin_core.project.checkpoints import Recorder
from diffin_core.errors import DiffinError
from diffin_core.methods import ScoreSettings
from diffin_core.project.folder import Project
from diffin_core.engine.projector import Projector, fold
from diffin_core.run.scoring import query_influence, score, top_k
from diffin_core.run.context import project_context

from helpers import MODEL_PY, TOML, make_tiny_project


def tiny_with(root, optimizer, batches: bool = False):
    """The tiny 3-class project trained with another optimiser (momentum, AdamW...); ``batches``:
    recorded with its batch order (rec.step(batch_ids=...))."""
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
    from diffin_core.engine.models import MLP
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
                rec.step(batch_ids=idx if batches else None)
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
        direct = F.view_rows(ctx, ViewsOnly(views), q.x[idx], q.y[idx], np.arange(ctx.n))
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
    F.build(ctx, project.query, run / "features", F.FeatureSettings(dim=2048, view_rank=83, rerank=0,
                                                                          checkpoint_dim=0))
    idx = [4, 9]
    exact = query_influence(project, "diffin", idx, settings)
    projected, label = F.fast_query_influence(project, "d", idx)
    assert "fast path" in label
    assert spearmanr(projected, exact)[0] > 0.97
    rescored, _ = F.fast_query_influence(project, "d", idx, rerank=len(exact))   # every row rescored
    np.testing.assert_allclose(rescored, exact, rtol=1e-3, atol=1e-4 * np.abs(exact).max())


def test_shortlist_is_rescored_by_the_exact_path(tmp_path):
    """With a coarse store (rank-4 views, d = 64) the shortlisted rows carry exactly the exact
    path's values (its own query plan, not the stored views), and the rest keep the store's."""
    root = make_tiny_project(tmp_path / "p")
    project = Project(root)
    run = score(project, "diffin", run="d", features=False)
    ctx = project_context(project)
    F.build(ctx, project.query, run / "features", F.FeatureSettings(dim=64, view_rank=4, rerank=10,
                                                                          checkpoint_dim=0))
    idx = [4, 9]
    exact = query_influence(project, "diffin", idx)
    store = F.FeatureStore.open(project, "d")
    alone, label0 = F.fast_query_influence(project, "d", idx, rerank=0)
    assert "approximate" in label0 and np.array_equal(alone, store.query_influence(idx))
    fast, label = F.fast_query_influence(project, "d", idx)
    assert "rescored by the exact path" in label and "top 10 per side" in label
    order = np.argsort(alone, kind="stable")
    helpful, harmful = order[-10:], order[:10]
    cand = np.union1d(helpful, harmful)
    np.testing.assert_allclose(fast[cand], exact[cand], rtol=1e-4, atol=1e-4 * np.abs(exact).max())
    # the other rows keep the store's order, strictly between the two shortlists' exact values
    rest = np.setdiff1d(np.arange(len(exact)), cand)
    assert np.all(np.diff(fast[rest][np.argsort(alone[rest], kind="stable")]) >= 0)
    assert fast[rest].max() < fast[helpful].min() and fast[rest].min() > fast[harmful].max()
    top = np.argsort(-fast, kind="stable")[:5]
    assert set(top) <= set(helpful) and set(top) == set(helpful[np.argsort(-exact[helpful])[:5]])
    # through the stored views the same rows differ (what the rescoring fixes)
    q = project.query
    via_views = F.view_rows(ctx, store, q.x[idx], q.y[idx], cand)
    assert np.abs(via_views - exact[cand]).max() > 1e-3 * np.abs(exact).max()
    # rescore_for (the app's job) caches the rescored influence; later calls read it, no model run
    path = S.rescore_for(str(root), "d", idx)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(F, "exact_plan", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model ran")))
    try:
        cached, label_c = F.fast_query_influence(project, "d", idx)
    finally:
        monkey.undo()
    from diffin_core.run import answers
    np.testing.assert_array_equal(cached, answers.load(project.run("d").path, idx).influence)
    assert path.endswith(".npz")
    np.testing.assert_allclose(cached, fast, rtol=1e-6, atol=1e-12)
    assert label_c == label
    # the default shortlist is a share of N with a floor
    store.meta["settings"]["rerank"] = -1
    assert store.shortlist() == min(96, F.SHORTLIST_MIN)


def test_score_writes_the_store_and_top_k_uses_it(tmp_path, capsys):
    project = Project(make_tiny_project(tmp_path / "p"))
    run = score(project, "diffin", run="d")
    meta = json.loads((run / "features" / "meta.json").read_text())
    assert meta["n_train"] == 96 and meta["settings"]["dim"] == F.FeatureSettings().dim
    store = F.FeatureStore(run / "features")
    assert store.train.dtype == np.float16 and store.train.shape == (96, meta["settings"]["dim"])
    helpful, harmful = top_k(project, "d", [3], k=5)
    assert helpful.attrs["path"].startswith("exact path: this query's own plan")   # certified (fast_answer)
    assert not (run / "topk").exists()                       # nothing computed the slow way
    exact_h, exact_m = top_k(project, "d", [3], k=5, exact=True)
    assert exact_h.attrs["path"] == "exact path"
    assert len(set(helpful["sample_id"]) & set(exact_h["sample_id"])) >= 3
    assert len(set(harmful["sample_id"]) & set(exact_m["sample_id"])) >= 3
    assert helpful["influence"].is_monotonic_decreasing and harmful["influence"].is_monotonic_increasing
    with pytest.raises(DiffinError, match="out of range"):
        top_k(project, "d", [30], k=5)
    # the CLI says which path answered; --shortlist 0: the store alone
    from diffin_core.cli import main
    main(["top", str(project.root), "--run", "d", "-q", "5", "--k", "2"])
    main(["top", str(project.root), "--run", "d", "-q", "5", "--k", "2", "--shortlist", "0"])
    out = capsys.readouterr().out
    assert "(exact path: this query's own plan; the " in out and "at 4 standard deviations were rescored exactly" in out
    assert "(fast path: projected features alone" in out
    # asked again: read from the run (answers.py), the same rows, without torch in the process
    main(["top", str(project.root), "--run", "d", "-q", "5", "--k", "2"])
    again = capsys.readouterr().out
    assert "answered before)" in again
    first = out.split("(fast path: projected features alone")[0]
    assert [ln.split()[0] for ln in again.splitlines()[3:5]] == [ln.split()[0] for ln in first.splitlines()[3:5]]
    import subprocess
    import sys
    code = ("import sys; from diffin_core.run.answers import print_cached; "
            f"ok = print_cached({str(project.root)!r}, 'd', [5], 2, echo=lambda s: None); "
            "print(ok, 'torch' in sys.modules, 'pandas' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["True", "False", "False"]
    # --no-features: no store, the exact path
    run2 = score(project, "diffin", run="n", features=False)
    assert not (run2 / "features").exists()
    assert top_k(project, "n", [3], k=5)[0].attrs["path"] == "exact path"
    # a non-diffin run gets no store (its method is not what the store approximates)
    assert not (score(project, "grad-dot", run="g") / "features").exists()


@pytest.mark.parametrize("opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.2),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01),
], ids=["sgd", "momentum-wd", "adamw"])
def test_certified_top_k_is_the_exact_top_k(tmp_path, opt):
    """Issue 23: with the per-checkpoint sketch, a new query's answer is the exact path's plan, its
    rows rescored exactly until no other row can reach the top CERTIFIED_K (4 sigma of the sketch's
    error): those rows and their values are `diffin top --exact`'s, on either side."""
    root = tiny_with(tmp_path / "p", opt)
    project = Project(root)
    run = score(project, "diffin", run="d", features=False)
    ctx = project_context(project)
    F.build(ctx, project.query, run / "features", F.FeatureSettings(dim=64, view_rank=4, checkpoint_dim=256,
                                                                    checkpoint_mb=1))
    store = F.FeatureStore.open(project, "d")
    assert store.checkpoint_dim == 256 and store.per_checkpoint.shape == (ctx.m, 80, 256)
    q = project.query
    for idx in ([3], [4, 9]):
        exact = query_influence(project, "diffin", idx)
        plan = F.exact_plan(ctx, q.x[idx], q.y[idx])
        est, sigma = store.plan_bounds(plan)
        assert np.all(np.abs(est - exact) <= 6 * sigma + 1e-6 * np.abs(exact).max())   # the bound holds
        fast, label = F.fast_query_influence(project, "d", idx)
        assert label.startswith("exact path: this query's own plan")
        k = min(F.CERTIFIED_K, 10)
        for sign in (1, -1):
            top = np.argsort(-sign * exact, kind="stable")[:k]
            got = np.argsort(-sign * fast, kind="stable")[:k]
            assert set(got) == set(top)
            np.testing.assert_allclose(fast[got], exact[got], rtol=1e-4, atol=1e-4 * np.abs(exact).max())
        # where its time went is kept with the answer (benchmarks/explore_query.py reports it)
        from diffin_core.run import answers
        steps = answers.timings(run, idx)
        assert set(steps) == {f"{s}_{u}" for s in ("context", "plan", "bounds", "rescore")
                              for u in ("s", "cpu_s")} | {"rescored_rows"}
        assert all(v >= 0 for v in steps.values())
        assert steps["rescored_rows"] == int(answers.load(run, idx).exact.sum()) > 0
        kept_est, kept_sigma = answers.bounds(run, idx)
        # (the fast path's plan is made in its own configured context: the same plan to rounding)
        np.testing.assert_allclose(kept_est, est, rtol=0, atol=1e-2 * np.abs(est).max())
        np.testing.assert_allclose(kept_sigma, sigma, rtol=1e-2)
    # the sketch's size follows checkpoint_mb: too small a budget keeps none
    assert F.checkpoint_sketch_dim(F.FeatureSettings(checkpoint_mb=1), 12, 100_000) == 0
    assert F.checkpoint_sketch_dim(F.FeatureSettings(), 12, 4000) == 1024


def test_certified_rows_rules_out_only_what_cannot_reach_the_top():
    rng = np.random.default_rng(0)
    truth = rng.standard_t(3, 2000)
    sigma = np.full(2000, 0.3)
    est = truth + rng.normal(size=2000) * 0.3
    calls = []
    out, exact = F.certified_rows(est, sigma, lambda rows: (calls.append(len(rows)), truth[rows])[1], k=10, z=4.0,
                                  start=20)
    for sign in (1, -1):
        assert set(np.argsort(-sign * out)[:10]) == set(np.argsort(-sign * truth)[:10])
    assert np.array_equal(out[exact], truth[exact]) and 40 <= exact.sum() < 2000 and sum(calls) == exact.sum()


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


@pytest.mark.parametrize("opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.2),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01),
    "adamw-batches",
], ids=["sgd", "momentum-wd", "adamw", "adamw-batches"])
def test_checkpoint_contributions_sum_to_the_runs_value(tmp_path, opt):
    """Issue 21: the per-checkpoint plot of (sample, queries) adds up to the number the run shows
    for that pair: the run's own influence for the whole query set (scores.parquet) and the
    top-k's value for one query, exact path or fast. (It was computed through the stored views,
    which summed to another number, at times of the other sign.)"""
    batches = opt == "adamw-batches"
    if batches:
        opt = lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01)    # noqa: E731
    root = tiny_with(tmp_path / "p", opt, batches)
    project = Project(root)
    score(project, "diffin", run="d")
    store_meta = json.loads((project.run("d").path / "features" / "meta.json").read_text())
    assert (store_meta.get("kind") == "query-span") == batches     # batch order: the query-span store
    run_scores = project.scores("d")["influence"].to_numpy()
    q = project.query
    ctx = F._context(project, "d")
    whole = F.exact_plan(ctx, q.x, q.y)
    for row in (7, 31):
        parts = F.checkpoint_contributions(ctx, whole, row)
        assert parts["step"].is_monotonic_increasing and len(parts) == len(whole)
        # the run scored with self-influence (per-sample gradients, ritz_self) and the plot by jvp:
        # the same sum in float32, equal to far more digits than the 4 the pages print
        assert parts["contribution"].sum() == pytest.approx(run_scores[row], rel=2e-4, abs=1e-8 * np.abs(run_scores).max())
    # one query: the plot the app caches (contributions_for) sums to the top-k's value for the pair
    helpful, harmful = top_k(project, "d", [4], k=3, exact=True)
    fast_h, _ = top_k(project, "d", [5], k=3)
    rows = {int(s): i for i, s in enumerate(project.train.ids)}
    for qi, table in ((4, helpful), (4, harmful), (5, fast_h)):
        for sid, value in zip(table["sample_id"], table["influence"]):
            path = F.contributions_for(str(root), "d", int(sid), [qi])
            parts = json.loads(open(path).read())
            total = sum(p["contribution"] for p in parts)
            assert total == pytest.approx(value, rel=2e-4, abs=1e-9), (qi, sid)     # float32 jvp: 1 row vs a chunk
            assert rows[int(sid)] >= 0


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


def test_projector_is_seeded_unbiased_and_folds():
    g = torch.randn(6, 1000)
    a, b = Projector(1000, 512, seed=3), Projector(1000, 512, seed=3)
    assert torch.equal(a(g), b(g)) and torch.equal(a(g[2]), a(g)[2])      # seeded; one row alike
    assert not torch.equal(Projector(1000, 512, seed=4)(g), a(g))
    f = Projector(1000, 4096, seed=0)(g)
    exact, approx = (g @ g.T).numpy(), (f @ f.T).numpy()
    assert np.abs(approx - exact).max() < 0.15 * np.abs(exact).max()
    # unbiased: over many seeds the mean inner product converges to the exact one
    x, y = torch.randn(1000), torch.randn(1000)
    est = np.array([float(Projector(1000, 64, seed=s)(x) @ Projector(1000, 64, seed=s)(y)) for s in range(400)])
    assert abs(est.mean() - float(x @ y)) < 4 * est.std() / 20
    assert est.std() < 1.5 * float(torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y)) * (2 / 64) ** 0.5
    # folding a 4096-dim sketch gives the 1024-dim sketch of the same seed exactly
    small = fold(f, 4096, 1024)
    p = Projector(1000, 4096, seed=0)
    direct = torch.zeros(6, 1024).index_add_(1, p.bucket % 1024, g * p.sign)
    np.testing.assert_allclose(small.numpy(), direct.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        fold(f, 4096, 1000)


def test_projector_blocks_equal_one_scatter(tmp_path, monkeypatch):
    """Issue 19: the projection scatters column blocks (no (B, P) temporary) and a diagonal scale
    is applied per block (Adam's rows); on a small model's per-sample gradients it equals the one
    scatter it replaced, out.index_add_(1, bucket, g * sign), to float rounding, for one row, for
    blocks of any width (one block, blocks not dividing P: the tiny model's 83 parameters in blocks
    of 4 to 13 columns) and with the scale."""
    from diffin_core.engine import projector as PR
    project = Project(make_tiny_project(tmp_path / "p"))
    ctx = project_context(project)
    x, y = ctx.tensors(project.train.x[:7], project.train.y[:7])
    g = ctx.fm_at(ctx.m - 1).per_sample_grads(ctx.thetas[ctx.m - 1], x, y)
    scale = torch.rand(g.shape[1], dtype=g.dtype) * 3
    p = Projector(g.shape[1], 256, seed=5)

    def one_scatter(rows):
        return torch.zeros(rows.shape[0], 256).index_add_(1, p.bucket, rows.to(torch.float32) * p.sign)
    assert g.shape[1] > 64
    monkeypatch.setattr(PR, "MIN_COLUMNS", 4)
    for elements in (PR.CHUNK_ELEMENTS, 7 * 13, 7 * 4 + 3, 1):   # one block, blocks not dividing P, the floor
        monkeypatch.setattr(PR, "CHUNK_ELEMENTS", elements)
        for got, want in ((p(g), one_scatter(g)), (p(g[3]), one_scatter(g[3:4])[0]),
                          (p(g, scale=scale), one_scatter(g * scale))):
            assert got.shape == want.shape and got.dtype == torch.float32
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    with pytest.raises(ValueError, match="scale"):
        p(g, scale=scale[:-1])


@pytest.mark.parametrize("opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.2),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01),
], ids=["sgd", "momentum-wd", "adamw"])
def test_view_less_store_from_the_scoring_walk(tmp_path, monkeypatch, opt):
    """Issues 19/23: where the Hessian views exceed the memory budget (a ResNet-18 at 3.5 GB) the
    scoring walk's own per-sample gradients feed the store (SketchSink, none computed twice): each
    per-checkpoint row is the sketch of g_z(theta_k) with its exact norm, the same as a separate
    pass (`diffin features`) computes; the train rows are the zero-curvature propagation
    sum_k c_k a_k g_z(theta_k) (the plan through empty views); and a new query's certified top-k
    is `diffin top --exact`'s. AdamW's plan at zero curvature is diagonal (its preconditioner),
    not scalar: its train rows are sum_k S (c_k d_k * g_z(theta_k)) (issue 18: the Trainer's AdamW)."""
    import warnings
    from diffin_core.engine.lanczos import SpectralView
    from diffin_core.engine.propagate import build_plan
    root = tiny_with(tmp_path / "p", opt)
    project = Project(root)
    monkeypatch.setattr(F, "views_fit", lambda ctx, settings=None, memory=None: False)
    monkeypatch.setattr(F, "SKETCH_DIM", 512)
    messages = []
    run = score(project, "diffin", run="d", progress=lambda d, t, m: messages.append(m))
    store = F.FeatureStore.open(project, "d")
    adam = "adamw" in str(opt(torch.nn.Linear(1, 1).parameters())).lower()
    assert store is not None and not store.has_views and store.meta["rows_filled"] == 0   # all from the walk
    assert any("checkpoint sketches from the scoring walk" in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx = F.configured(project_context(project))
    ks = sorted(c["k"] for c in store.meta["checkpoints"])
    assert all(c["diagonal"] == adam for c in store.meta["checkpoints"])
    maps = F.zero_curvature_maps(ctx)
    assert sorted(maps) == ks
    proj = Projector(ctx.fm.num_params, 512, store.meta["settings"]["seed"] + 1)
    x, y = ctx.tensors(project.train.x, project.train.y)
    grads = {k: ctx.fm_at(k).per_sample_grads(ctx.thetas[k], x, y) for k in ks}
    effective = torch.zeros(ctx.n, 512, dtype=torch.float64)
    for c in store.meta["checkpoints"]:
        k, sk = c["k"], proj(grads[c["k"]]).double()
        rows = store.per_checkpoint[k].astype(np.float64) * store.ck_snorm[k][:, None]
        np.testing.assert_allclose(rows, sk.numpy(), atol=2e-3 * float(sk.abs().max()))
        np.testing.assert_allclose(store.ck_norm2[k], (grads[k].double() ** 2).sum(1).numpy(), rtol=1e-5)
        effective += proj(maps[k] * grads[k]).double() if adam else c["coef"] * sk
    np.testing.assert_allclose(store.train_rows(np.arange(ctx.n)), effective.numpy(),
                               atol=2e-3 * float(effective.abs().max()))
    # the maps are the plan's at zero curvature: for a query gradient u (not a probe),
    # sum_k <c_k d_k g_k, u> = sum_k coef <w_k(u; no views), g_k>
    empty = SpectralView(torch.zeros(0), torch.zeros(ctx.fm.num_params, 0))
    q = project.query
    u = ctx.mean_grad(ctx.m - 1, q.x[[1, 2]], q.y[[1, 2]])
    direct = sum(it.coef * (grads[it.k] @ it.w).double() for it in build_plan(ctx, u, view_fn=lambda k, s: empty))
    folded = sum(((maps[k] * grads[k]) @ u).double() for k in ks)
    np.testing.assert_allclose(folded.numpy(), direct.numpy(), rtol=1e-4, atol=1e-6 * float(direct.abs().max()))
    # a separate pass (`diffin features`) builds the same store
    F.build_for_run(project, "d")
    again = F.FeatureStore.open(project, "d")
    assert again.meta["rows_filled"] == ctx.n
    np.testing.assert_allclose(again.per_checkpoint.astype(np.float32), store.per_checkpoint.astype(np.float32),
                               atol=2e-3)
    # a new query: the exact path's plan, bounded through the sketches, its top-k rescored exactly
    for idx in ([3], [4, 9]):
        exact = query_influence(project, "diffin", idx)
        fast, label = F.fast_query_influence(project, "d", idx)
        assert label.startswith("exact path: this query's own plan")
        for sign in (1, -1):
            top = np.argsort(-sign * exact, kind="stable")[:10]
            got = np.argsort(-sign * fast, kind="stable")[:10]
            assert set(got) == set(top)
            np.testing.assert_allclose(fast[got], exact[got], rtol=1e-4, atol=1e-4 * np.abs(exact).max())
    assert run.is_dir() and not list(project.runs_dir.glob(".features.tmp-*"))


def test_per_checkpoint_sketches_are_independent_and_the_basis_shrinks_sigma(tmp_path):
    """Issue 23: the store keeps each row's coordinates in a per-checkpoint gradient basis exactly
    and sketches only the rest, with one independent CountSketch per checkpoint, so sigma (summed
    variances) bounds the estimate's error: no row strays beyond 4 sigma (a shared sketch put rows
    at 4.8-5 sigma on the sample CNN), and sigma is smaller than without the basis."""
    project = Project(make_tiny_project(tmp_path / "p", n=160))
    run = score(project, "diffin", run="d", features=False)
    ctx = project_context(project)
    stores = {}
    for r in (0, 24):
        out = tmp_path / f"store{r}"
        F.build(ctx, project.query, out, F.FeatureSettings(dim=64, view_rank=4, checkpoint_dim=256, checkpoint_mb=8,
                                                           checkpoint_basis=r))
        stores[r] = F.FeatureStore(out)
    s0, s24 = stores[0], stores[24]
    assert s24.meta["version"] == 3 and s24.basis_rank == 24 and s0.basis_rank == 0
    assert set(s24.bases) == {it.k for it in F.segment_ops(ctx, s24.views)}
    b = next(iter(s24.bases.values()))
    assert torch.allclose(b.T @ b, torch.eye(24), atol=1e-5)                        # orthonormal
    seeds = {F.sketch_seed(0, k) for k in range(ctx.m)}
    assert len(seeds) == ctx.m and F.sketch_seed(0, 5, independent=False) == F.sketch_seed(0, 0, independent=False)
    q = project.query
    ratios = []
    for idx in ([2], [5], [7, 11]):
        plan = F.exact_plan(ctx, q.x[idx], q.y[idx])
        exact = F.rescore_rows(ctx, plan, np.arange(ctx.n))
        for store in (s0, s24):
            est, sigma = store.plan_bounds(plan)
            assert np.all(np.abs(est - exact) <= 4 * sigma + 1e-7 * np.abs(exact).max())
        ratios.append(np.median(s24.plan_bounds(plan)[1] / s0.plan_bounds(plan)[1]))
    assert max(ratios) < 0.9
    # a store with one sketch for every checkpoint (version 2, view-less): sigma is the sum of the
    # per-checkpoint deviations, which bounds the error for any correlation between them
    meta = json.loads((tmp_path / "store0/meta.json").read_text())
    (tmp_path / "store0/meta.json").write_text(json.dumps({**meta, "independent_sketches": False}))
    est2, dev = F.FeatureStore(tmp_path / "store0").plan_bounds(plan)
    assert np.all(dev >= s0.plan_bounds(plan)[1] * (1 - 1e-9))


def test_query_plans_adopt_the_runs_hvp_decisions(tmp_path, monkeypatch):
    """Issue 23: `--hvp auto` probes each Lanczos view's first product both ways. A run records its
    decision and error per checkpoint; a query on that run (fast path and `--exact` alike) takes
    finite differences without a new probe where the run measured them within ADOPT_TOL, and its
    plan is the same as with probing (the view uses the chosen kind's products throughout)."""
    from diffin_core.engine import hvp
    from diffin_core.engine.functional import FunctionalModel
    from diffin_core.methods.diffin import DiffIn
    project = Project(make_tiny_project(tmp_path / "p"))
    score(project, "diffin", run="d", features=False)
    views = project.run("d").meta["hvp"]["views"]
    assert views and all(v["used"] == "fd" and v["fd_error"] <= hvp.ADOPT_TOL for v in views.values())
    calls = []                                  # exact products, either kind (a view keeps its graph: hvp_retained)
    real, real_kept = FunctionalModel.hvp_exact, FunctionalModel.hvp_retained
    monkeypatch.setattr(FunctionalModel, "hvp_exact", lambda self, *a, **kw: (calls.append(1), real(self, *a, **kw))[1])

    def kept(self, *a):
        hv = real_kept(self, *a)
        return None if hv is None else (lambda v: (calls.append(1), hv(v))[1])
    monkeypatch.setattr(FunctionalModel, "hvp_retained", kept)
    q = project.query
    probed = DiffIn().prepare(F.configured(project_context(project)), q.x[[3]], q.y[[3]])   # without the run's log
    assert calls
    calls.clear()
    ctx = F._context(project, "d")
    assert set(ctx.hvp_views) == {int(k) for k in views}
    adopted = DiffIn().prepare(ctx, q.x[[3]], q.y[[3]])
    assert not calls                                                                # no probe
    for a, b in zip(adopted, probed):
        torch.testing.assert_close(a.w, b.w, rtol=1e-6, atol=1e-9)
    assert all(e.get("adopted") for e in ctx.hvp_log if e["where"] == "lanczos")
    # a run that measured a larger error, or chose exact products, is probed again there
    fresh = project_context(project)
    hvp.adopt(fresh, {"setting": "auto", "views": {"0": {"used": "fd", "fd_error": 0.009},
                                                   "1": {"used": "exact", "fd_error": 0.2},
                                                   "2": {"used": "fd", "fd_error": 0.001}}})
    assert fresh.hvp_views == {2: "fd"}
    hvp.adopt(fresh2 := project_context(project), {"setting": "fd", "views": {"2": {"used": "fd", "fd_error": 0.0}}})
    assert getattr(fresh2, "hvp_views", None) is None


def test_sketch_features_asked_where_views_fit(tmp_path, monkeypatch):
    """`diffin score --sketch-features` (score(features="sketch")): the view-less store from the
    scoring walk even where the Hessian views fit the budget, so no feature pass follows the
    scores (the views pass is not called); its meta says why it has no views, and a new query's
    certified top-k is still the exact path's."""
    root = tiny_with(tmp_path / "p", lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01))
    project = Project(root)
    monkeypatch.setattr(F, "SKETCH_DIM", 512)
    monkeypatch.setattr(F, "build", lambda *a, **k: pytest.fail("the views pass ran"))
    assert F.views_fit(F.configured(project_context(project)))
    messages = []
    score(project, "diffin", run="s", features="sketch", progress=lambda d, t, m: messages.append(m))
    store = F.FeatureStore.open(project, "s")
    assert store is not None and not store.has_views and store.meta["rows_filled"] == 0
    assert "left out as asked" in store.meta["approximations"][0]
    assert any("left out as asked" in m for m in messages)
    exact = query_influence(project, "diffin", [5])
    fast, label = F.fast_query_influence(project, "s", [5])
    assert label.startswith("exact path: this query's own plan")
    for sign in (1, -1):
        top = np.argsort(-sign * exact, kind="stable")[:10]
        assert set(np.argsort(-sign * fast, kind="stable")[:10]) == set(top)


def test_views_after_a_far_off_probe_take_exact_products_unprobed(tmp_path, monkeypatch):
    """Issue 19: `--hvp auto` probes a view's first product both ways. Once a view of the plan
    measured finite differences FAR_TOL or more off (a ResNet-18: 7-10x at every checkpoint), the
    later views take exact products without the probe, and no view of exact products computes the
    batch gradient (finite differences' base). The plan is the same as with --hvp exact."""
    from diffin_core.engine import hvp
    from diffin_core.engine.functional import FunctionalModel
    from diffin_core.methods import ScoreSettings
    from diffin_core.methods.diffin import DiffIn
    project = Project(make_tiny_project(tmp_path / "p"))
    q = project.query
    real_exact, real_grad = FunctionalModel.hvp_exact, FunctionalModel.batch_grad
    fd_calls, hessian_grads = [], []
    monkeypatch.setattr(FunctionalModel, "hvp_fd",          # finite differences 100% off
                        lambda self, theta, x, y, v, **kw: (fd_calls.append(1), 2 * real_exact(self, theta, x, y, v))[1])
    monkeypatch.setattr(FunctionalModel, "batch_grad",
                        lambda self, theta, x, y: (hessian_grads.append(len(y)), real_grad(self, theta, x, y))[1])
    ctx = F.configured(project_context(project, ScoreSettings(hvp="auto")))
    rows = min(ctx.hessian_rows, ctx.n)
    auto = DiffIn().prepare(ctx, q.x, q.y)
    views = [e for e in ctx.hvp_log if e["where"] == "lanczos"]
    assert len(views) == len(auto) > 2 and len(fd_calls) == 1
    assert views[0]["used"] == "exact" and views[0]["fd_error"] >= hvp.FAR_TOL
    assert all(e["used"] == "exact" and e["inherited"] == views[0]["checkpoint"] for e in views[1:])
    assert hessian_grads.count(rows) == 1                  # only the probe's finite difference needed it
    s = hvp.summary(ctx)
    assert s["lanczos_views"] == {"exact": len(auto), "fd": 0} and list(s["views"]) == [str(views[0]["checkpoint"])]
    assert s["view_products"] == {str(it.k): it.op.view.values.numel() for it in auto}   # products per view
    hessian_grads.clear()
    ctx_e = F.configured(project_context(project, ScoreSettings(hvp="exact")))
    exact = DiffIn().prepare(ctx_e, q.x, q.y)
    assert hessian_grads.count(rows) == 0
    for a, b in zip(auto, exact):
        assert a.k == b.k and torch.equal(a.w, b.w)


def test_gradient_basis_gram_route_spans_the_svds_subspace(tmp_path):
    """Issue 19: fit_basis takes the top-r right singular vectors of the per-sample gradients from
    the Gram matrix's eigendecomposition where its error bound allows (features.basis_of): on a
    small real model's gradients (first, middle and last checkpoints) it spans the float64 SVD's subspace to float
    rounding (the largest principal angle's sine under 1e-10 in float64, 1e-6 as stored in float32),
    and the store built with it is orthonormal. Where the gap at r is closed (repeated singular
    values, or fewer than r directions) the rule keeps the SVD."""
    project = Project(make_tiny_project(tmp_path / "p", n=160))
    ctx = project_context(project)
    settings = F.FeatureSettings()
    r = F.checkpoint_basis_rank(settings, ctx.m, ctx.n, ctx.fm.num_params)
    assert r >= 8
    fit = np.sort(np.random.default_rng([0, 4409]).choice(ctx.n, min(ctx.n, settings.basis_rows), replace=False))

    def sin(q1, q2):
        q1, q2 = q1.double(), q2.double()
        return float(torch.linalg.matrix_norm(q2 - q1 @ (q1.T @ q2), ord=2))

    routes = []
    for k in sorted({0, ctx.m // 2, ctx.m - 1}):
        x, y = ctx.tensors(ctx.train.x[fit], ctx.train.y[fit])
        a = ctx.fm_at(k).per_sample_grads(ctx.thetas[k], x, y).double()
        svd64, _ = F.basis64(a, r, "svd")
        gram64, route = F.basis64(a, r, "auto")
        routes.append(route)
        assert sin(svd64, gram64) < 1e-10
        b = F.fit_basis(ctx, k, fit, r)
        assert b.dtype == torch.float32 and b.shape == (ctx.fm.num_params, r)
        assert torch.allclose(b.double().T @ b.double(), torch.eye(r, dtype=torch.float64), atol=1e-6)
        assert sin(svd64, b) < 1e-6
    assert "gram" in routes                      # the rule takes the Gram route on these gradients
    # a closed gap at r: the top r + 1 singular values equal (an orthonormal set of rows), and a
    # matrix of rank < r; both keep the SVD
    q, _ = torch.linalg.qr(torch.randn(ctx.fm.num_params, r + 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert F.basis_of(q.T.contiguous(), r)[1] == "svd"
    low = torch.randn(2 * r, r - 2, dtype=torch.float64) @ torch.randn(r - 2, ctx.fm.num_params, dtype=torch.float64)
    assert F.basis_of(low, r)[1] == "svd"


def test_feature_pass_views_reuse_the_scores_batch_gradients_and_probes(tmp_path, monkeypatch):
    """Issue 19: the feature pass after publishing runs on the score's own context, whose plans
    already made each checkpoint's Hessian-batch gradient (kept: scoring.keep_base_grads) and
    probed each view's finite differences (hvp auto). hessian_views reuses both (propagate.base_grad,
    label_issue.share_probes): no batch gradient and no exact probe product of its own where the
    score had them, and the same views bit for bit as on a fresh context that computes them all."""
    from diffin_core.engine.functional import FunctionalModel
    from diffin_core.methods import runner
    from diffin_core.methods.diffin import DiffIn
    project = Project(make_tiny_project(tmp_path / "p", n=160))
    captured = {}
    real_build = F.build
    monkeypatch.setattr(F, "build", lambda ctx, *a, **kw: captured.setdefault("ctx", ctx))
    score(project, "diffin", run="d")
    monkeypatch.setattr(F, "build", real_build)
    scored = captured["ctx"]
    assert scored.settings.hvp == "auto" and scored.base_grads
    fresh = project_context(project)
    runner.configure(fresh, runner.memory_plan(DiffIn(), fresh, True))
    assert fresh.hessian_rows == scored.hessian_rows and getattr(fresh, "base_grads", None) is None
    calls = {"grad": 0, "exact": 0}
    real_grad, real_kept, real_exact = FunctionalModel.batch_grad, FunctionalModel.hvp_retained, FunctionalModel.hvp_exact

    def counted(name, fn):
        def wrapped(self, *a, **kw):
            calls[name] += 1
            return fn(self, *a, **kw)
        return wrapped
    monkeypatch.setattr(FunctionalModel, "batch_grad", counted("grad", real_grad))
    monkeypatch.setattr(FunctionalModel, "hvp_retained", counted("exact", real_kept))
    monkeypatch.setattr(FunctionalModel, "hvp_exact", counted("exact", real_exact))
    owned = [k for k in range(scored.m) if scored.bounds is None or scored.bounds[k + 1] > scored.bounds[k]]
    out = {}
    for name, ctx in (("fresh", fresh), ("scored", scored)):
        calls.update(grad=0, exact=0)
        out[name] = (F.hessian_views(ctx, 6), dict(calls))
    (v0, c0), (v1, c1) = out["fresh"], out["scored"]
    # batch_grad also makes every finite-difference product: the views differ by their bases only
    assert c0["grad"] - c1["grad"] == len(owned), (c0, c1)
    adopted = [k for k in owned if (scored.hvp_views or {}).get(k) == "fd"]
    assert c0["exact"] == len(owned), c0                                 # a probe per view
    assert len(adopted) == len(owned) and c1["exact"] == 0, (adopted, c1)   # the score's probes
    assert set(v0) == set(v1) == set(owned)
    for k in owned:
        assert torch.equal(v0[k].values, v1[k].values) and torch.equal(v0[k].vectors, v1[k].vectors), k
