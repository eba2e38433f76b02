"""AppTest: the views drawn from a run's feature store, checked against the engine's numbers.
Explore's fast top-k (no background job), the reverse view of a training sample with its
per-checkpoint plot (Explore and the Review card), and the class-by-class heatmap."""
from __future__ import annotations

import json

import numpy as np
import pytest
from app_fixtures import jobs, new_app, texts, workspace  # noqa: F401

from diffin_core.run import features as F
from diffin_core.project.folder import Project
from diffin_core.run.scoring import score

from helpers import make_tiny_project


@pytest.fixture
def tiny(workspace):
    """The tiny 3-class project scored with diffin (its feature store written by `score`)."""
    root = make_tiny_project(workspace / "tiny")
    score(root, "diffin", run="diffin-1")
    assert (root / "runs/diffin-1/features/meta.json").is_file()
    return root


def charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def arr(v) -> np.ndarray:
    """A plotly JSON array: a list, or typed {"dtype", "bdata"[, "shape"]} (base64)."""
    if isinstance(v, dict) and "bdata" in v:
        import base64
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
        return a.reshape([int(n) for n in str(v["shape"]).split(",")]) if "shape" in v else a
    return np.asarray(v, dtype=float)


def test_fast_topk_needs_no_job(tiny, jobs):
    at = new_app(tiny, "pages/3_Explore.py")
    at.toggle(key="explore_auto_rescore").set_value(False).run()
    at.number_input(key="explore_query").set_value(4).run()
    at.slider(key="explore_k").set_value(5).run()
    at.button(key="explore_topk").click().run()
    assert not at.exception and jobs.list() == []              # answered in the script run
    assert any(t.startswith("Produced by the fast path") for t in texts(at.caption))
    tables = [d.value for d in at.dataframe if "influence" in d.value.columns]
    project = Project(tiny)
    infl, _ = F.fast_query_influence(project, "diffin-1", [4], rerank=0)     # the app: the store alone
    order = np.argsort(-infl, kind="stable")
    assert tables[0]["sample_id"].tolist() == project.train.ids[order[:5]].tolist()
    assert tables[1]["sample_id"].tolist() == project.train.ids[order[::-1][:5]].tolist()
    np.testing.assert_allclose(tables[0]["influence"], infl[order[:5]], rtol=1e-9)


def wait_jobs(at, jobs):
    """The per-checkpoint contributions run in the worker's child process: wait, then redraw."""
    for job in jobs.list():
        assert job.kind == "contributions"
        assert jobs.wait(job.id, timeout=300).status == "done", jobs.get(job.id).error
    at.run()
    assert not at.exception


def test_reverse_view_and_checkpoint_plot(tiny, jobs):
    project = Project(tiny)
    store = F.FeatureStore.open(project, "diffin-1")
    at = new_app(tiny, "pages/3_Explore.py")
    at.radio(key="explore_view").set_value("Training sample").run()
    at.number_input(key="explore_sample").set_value(11).run()
    assert not at.exception and any("sample 11 " in j.label for j in jobs.list())   # computed in the worker
    wait_jobs(at, jobs)
    rev = store.reverse(11)
    order = np.argsort(-rev, kind="stable")
    cards = [t for t in texts(at.caption) if t.startswith("query #")]
    shown = [int(t.split()[1][1:]) for t in cards]
    values = [float(t.rsplit("influence ", 1)[1]) for t in cards]
    assert shown[:8] == order[:8].tolist() and shown[8:16] == order[::-1][:8].tolist()
    np.testing.assert_allclose(values[:8], rev[order[:8]], rtol=2e-3)
    assert values[:8] == sorted(values[:8], reverse=True) and min(values[:8]) >= max(values[8:16])
    # the per-checkpoint plot: one bar per checkpoint, the engine's contributions, in step order
    ctx = F._context(project, "diffin-1")
    q = project.query
    parts = F.checkpoint_contributions(ctx, store, 11, q.x, q.y)
    bars = [c for c in charts(at) if c["data"][0].get("type") == "bar"][0]["data"][0]
    assert arr(bars["x"]).tolist() == parts["step"].tolist()
    np.testing.assert_allclose(arr(bars["y"]), parts["contribution"], rtol=1e-5)   # cached as JSON (10 digits)
    total = [t for t in texts(at.caption) if t.startswith("Per-checkpoint contributions sum to")][0]
    assert float(total.split("sum to ")[1].split()[0]) == pytest.approx(parts["contribution"].sum(), rel=1e-3)


def test_class_heatmap_and_its_cells(tiny):
    project = Project(tiny)
    store = F.FeatureStore.open(project, "diffin-1")
    at = new_app(tiny, "pages/3_Explore.py")
    at.radio(key="explore_view").set_value("Class heatmap").run()
    assert not at.exception
    heat = [c for c in charts(at) if c["data"][0].get("type") == "heatmap"][0]["data"][0]
    m = store.class_matrix(project.query.y)
    np.testing.assert_allclose(arr(heat["z"]), m, rtol=1e-6)
    # a cell (train class 2 on query class 0) lists its training samples ranked by that influence
    at.selectbox(key="explore_cls_train_class").set_value(2).run()
    at.selectbox(key="explore_cls_query_class").set_value(0).run()
    tables = [d.value for d in at.dataframe if "influence" in d.value.columns]
    rows = np.nonzero(project.train.y == 2)[0]
    infl = store.query_influence(np.nonzero(project.query.y == 0)[0])[rows]
    order = np.argsort(-infl, kind="stable")
    assert tables[0]["sample_id"].tolist() == project.train.ids[rows[order[:8]]].tolist()
    assert (tables[0]["label"] == 2).all() and tables[0]["influence"].is_monotonic_decreasing
    np.testing.assert_allclose(tables[0]["influence"], infl[order[:8]], rtol=1e-4)
    assert tables[1]["influence"].is_monotonic_increasing
    cell = [t.value for t in at.markdown if t.value.startswith("Cell (")][0]
    assert float(cell.split("**")[1]) == pytest.approx(m[2, 0], rel=1e-3)


def test_review_card_shows_the_reverse_view(tiny, jobs):
    at = new_app(tiny, "pages/4_Review.py")
    assert not at.get("plotly_chart")
    at.toggle(key="review_influence").set_value(True).run()
    wait_jobs(at, jobs)
    sid = int([h.value for h in at.subheader if h.value.startswith("Sample ")][0].split()[1])
    project = Project(tiny)
    store = F.FeatureStore.open(project, "diffin-1")
    parts = F.checkpoint_contributions(F._context(project, "diffin-1"), store, sid, project.query.x, project.query.y)
    bars = [c for c in charts(at) if c["data"][0].get("type") == "bar"][0]["data"][0]
    np.testing.assert_allclose(arr(bars["y"]), parts["contribution"], rtol=1e-5)   # cached as JSON (10 digits)
    cards = [t for t in texts(at.caption) if t.startswith("query #")]
    assert len(cards) == 12 and int(cards[0].split()[1][1:]) == int(np.argmax(store.reverse(sid)))


def test_rescore_button_runs_the_exact_path_in_a_job_then_the_grid_says_so(tiny, jobs):
    """The grid from the store alone offers 'Rescore with the exact path': a background job (the
    model runs in the worker's child) caches the rescored influence; the grid then shows it,
    labelled, equal to features.fast_query_influence with the store's shortlist."""
    at = new_app(tiny, "pages/3_Explore.py")
    at.toggle(key="explore_auto_rescore").set_value(False).run()
    at.number_input(key="explore_query").set_value(6).run()
    at.slider(key="explore_k").set_value(5).run()
    at.button(key="explore_topk").click().run()
    assert any("approximate, not rescored" in t for t in texts(at.caption)) and jobs.list() == []
    at.button(key="explore_rescore").click().run()
    assert not at.exception
    (job,) = jobs.list()
    assert job.kind == "rescore"
    assert jobs.wait(job.id, timeout=300).status == "done", jobs.get(job.id).error
    at.run()
    assert not at.exception
    assert any(t.startswith("Produced by the fast path") and "rescored by the exact path" in t
               for t in texts(at.caption))
    project = Project(tiny)
    cached = np.load(F.rescored_path(project, "diffin-1", [6]))
    F._PLANS.clear()
    fresh, _ = F.fast_query_influence(project, "diffin-1", [6], rerank=F.FeatureStore.open(project, "diffin-1").shortlist())
    np.testing.assert_allclose(cached, fresh, rtol=1e-6, atol=1e-12)
    tables = [d.value for d in at.dataframe if "influence" in d.value.columns]
    order = np.argsort(-cached, kind="stable")
    assert tables[0]["sample_id"].tolist() == project.train.ids[order[:5]].tolist()
    assert not any(b.key == "explore_rescore" for b in at.button)       # done: no second button


def test_auto_rescore_shows_the_store_grid_at_once_then_the_exact_one(tiny, jobs):
    """By default the store's grid is drawn in the script run and the exact path's rescoring starts
    by itself; a newer query cancels the older query's unfinished rescore; when the job is done the
    grid shows the exact path's values."""
    at = new_app(tiny, "pages/3_Explore.py")
    assert at.toggle(key="explore_auto_rescore").value is True
    at.number_input(key="explore_query").set_value(3).run()
    at.slider(key="explore_k").set_value(5).run()
    at.button(key="explore_topk").click().run()
    assert not at.exception
    assert any("approximate, not rescored" in t for t in texts(at.caption))   # drawn before any job ended
    project = Project(tiny)
    store_only, _ = F.fast_query_influence(project, "diffin-1", [3], rerank=0)
    tables = [d.value for d in at.dataframe if "influence" in d.value.columns]
    assert tables[0]["sample_id"].tolist() == project.train.ids[np.argsort(-store_only, kind="stable")[:5]].tolist()
    (first,) = jobs.list()
    assert first.kind == "rescore" and "query 3" in first.label
    at.number_input(key="explore_query").set_value(5).run()
    at.button(key="explore_topk").click().run()
    assert not at.exception
    second = [j for j in jobs.list() if j.id != first.id]
    assert len(second) == 1 and "query 5" in second[0].label
    assert jobs.wait(first.id, timeout=60).status == "cancelled"          # the stale query's job
    assert jobs.wait(second[0].id, timeout=300).status == "done", jobs.get(second[0].id).error
    at.run()
    assert any("rescored by the exact path" in t for t in texts(at.caption))
    cached = np.load(F.rescored_path(project, "diffin-1", [5]))
    tables = [d.value for d in at.dataframe if "influence" in d.value.columns]
    assert tables[0]["sample_id"].tolist() == project.train.ids[np.argsort(-cached, kind="stable")[:5]].tolist()
    assert not F.rescored_path(project, "diffin-1", [3]).is_file()
