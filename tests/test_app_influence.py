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
    rev, exact = F.reverse_influence(project, "diffin-1", 11, store)
    assert not exact.any()                                # nothing answered yet: all the store's (≈)
    order = np.argsort(-rev, kind="stable")
    cards = [t for t in texts(at.caption) if t.startswith("query #")]
    shown = [int(t.split()[1][1:]) for t in cards]
    assert all("influence ≈" in t for t in cards)
    values = [float(t.rsplit("influence ≈", 1)[1]) for t in cards]
    assert shown[:8] == order[:8].tolist() and shown[8:16] == order[::-1][:8].tolist()
    np.testing.assert_allclose(values[:8], rev[order[:8]], rtol=2e-3)
    assert values[:8] == sorted(values[:8], reverse=True) and min(values[:8]) >= max(values[8:16])
    assert any(t.startswith("≈: the feature store's projected value (approximate;") for t in texts(at.caption))
    # the per-checkpoint plot: one bar per checkpoint, from the exact path's plan for the whole
    # query set, in step order, summing to the run's own influence of the sample (issue 21)
    ctx = F._context(project, "diffin-1")
    q = project.query
    parts = F.checkpoint_contributions(ctx, F.exact_plan(ctx, q.x, q.y), 11)
    bars = [c for c in charts(at) if c["data"][0].get("type") == "bar"][0]["data"][0]
    assert arr(bars["x"]).tolist() == parts["step"].tolist()
    np.testing.assert_allclose(arr(bars["y"]), parts["contribution"], rtol=1e-5)   # cached as JSON (10 digits)
    total = [t for t in texts(at.caption) if t.startswith("Per-checkpoint contributions sum to")][0]
    run_value = float(project.scores("diffin-1").set_index("sample_id").loc[11, "influence"])
    assert float(total.split("sum to ")[1].split()[0]) == pytest.approx(run_value, rel=1e-3)
    assert "the run's influence of this sample on the whole query set, by the exact path" in total


def test_reverse_view_shows_the_top_k_value_for_an_answered_query(tiny, jobs):
    """Issue 21: the reverse view's value for (sample, query) is the query's own top-k value once
    that query is answered (shown without ≈); the others stay labelled approximate."""
    from diffin_core.run.scoring import top_k
    project = Project(tiny)
    store = F.FeatureStore.open(project, "diffin-1")
    rev, _ = F.reverse_influence(project, "diffin-1", 11, store)
    qi = int(np.argmax(rev))                               # the query the store says sample 11 helps most
    helpful, harmful = top_k(project, "diffin-1", [qi], k=len(project.train), exact=True)
    value = float(helpful.set_index("sample_id").loc[11, "influence"])
    at = new_app(tiny, "pages/3_Explore.py")
    at.radio(key="explore_view").set_value("Training sample").run()
    at.number_input(key="explore_sample").set_value(11).run()
    wait_jobs(at, jobs)
    cards = {int(t.split()[1][1:]): t for t in texts(at.caption) if t.startswith("query #")}
    exact_cards = [i for i, t in cards.items() if "influence ≈" not in t]
    assert exact_cards == [qi] or (qi not in cards and not exact_cards)
    if qi in cards:
        assert float(cards[qi].rsplit("influence ", 1)[1]) == pytest.approx(value, rel=2e-3)
    values, exact = F.reverse_influence(project, "diffin-1", 11, store)
    assert exact.sum() == 1 and exact[qi] and values[qi] == value


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
    ctx = F._context(project, "diffin-1")
    parts = F.checkpoint_contributions(ctx, F.exact_plan(ctx, project.query.x, project.query.y), sid)
    bars = [c for c in charts(at) if c["data"][0].get("type") == "bar"][0]["data"][0]
    np.testing.assert_allclose(arr(bars["y"]), parts["contribution"], rtol=1e-5)   # cached as JSON (10 digits)
    cards = [t for t in texts(at.caption) if t.startswith("query #")]
    assert len(cards) == 12 and int(cards[0].split()[1][1:]) == int(np.argmax(store.reverse(sid)))


def test_rescore_button_runs_the_exact_path_in_a_job_then_the_grid_says_so(tiny, jobs):
    """The grid from the store alone offers 'Rescore with the exact path': a background job (the
    model runs in the worker's child) caches the rescored influence; the grid then shows it,
    labelled, equal to the fast path's answer computed afresh (its plan's certified top k)."""
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
    assert any(t.startswith("Produced by the exact path: this query's own plan") and "rescored exactly" in t
               for t in texts(at.caption))
    project = Project(tiny)
    from diffin_core.run import answers
    kept = answers.load(project.run("diffin-1").path, [6])
    cached = kept.influence
    assert kept.certified >= 5
    F._PLANS.clear()
    for p in (answers.answer_path(project.run("diffin-1").path, [6]), answers.plan_path(project.run("diffin-1").path, [6])):
        p.unlink()
    fresh, _ = F.fast_query_influence(project, "diffin-1", [6])
    np.testing.assert_allclose(cached, fresh, rtol=1e-6, atol=1e-12)
    tables = [d.value for d in at.dataframe if "influence" in d.value.columns]
    order = np.argsort(-cached, kind="stable")
    assert tables[0]["sample_id"].tolist() == project.train.ids[order[:5]].tolist()
    assert not any(b.key == "explore_rescore" for b in at.button)       # done: no second button


def test_auto_rescore_shows_a_progress_state_then_the_exact_grid(tiny, jobs):
    """Issue 21: by default a new query's grid is the exact path's rescoring, computed in the
    background; while this run has not measured the store's grid to agree with the exact one, no
    store grid is drawn first (a progress state instead). A newer query cancels the older query's
    unfinished job; when the job is done the grid shows the kept answer."""
    from diffin_core.run import answers
    at = new_app(tiny, "pages/3_Explore.py")
    assert at.toggle(key="explore_auto_rescore").value is True
    at.number_input(key="explore_query").set_value(3).run()
    at.slider(key="explore_k").set_value(5).run()
    at.button(key="explore_topk").click().run()
    assert not at.exception
    assert not [d for d in at.dataframe if "influence" in d.value.columns]         # no store grid first
    assert any("not yet measured on this run" in i.value for i in at.info)
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
    assert any(t.startswith("Produced by the exact path: this query's own plan") for t in texts(at.caption))
    project = Project(tiny)
    cached = answers.load(project.run("diffin-1").path, [5]).influence
    tables = [d.value for d in at.dataframe if "influence" in d.value.columns]
    assert tables[0]["sample_id"].tolist() == project.train.ids[np.argsort(-cached, kind="stable")[:5]].tolist()
    assert answers.load(project.run("diffin-1").path, [3]) is None


def test_store_grid_first_only_where_measured_to_agree(tiny, jobs):
    """Where this run's answered queries show the store agreeing with the exact grid (top-10 overlap
    >= AGREEMENT_MIN_OVERLAP over AGREEMENT_MIN_QUERIES queries), the store's grid is drawn at once,
    labelled approximate with that measurement, while the exact rescoring runs."""
    from diffin_core.run import answers
    project = Project(tiny)
    store = F.FeatureStore.open(project, "diffin-1")
    d = project.run("diffin-1").path
    for qi in range(F.AGREEMENT_MIN_QUERIES):          # answers equal to the store's values: agreement 1.0
        infl = store.query_influence([qi])
        answers.save(d, [qi], infl, np.ones(len(infl), dtype=bool), "test", uses_store=True)
    a = F.store_agreement(project, "diffin-1")
    assert a["queries"] == F.AGREEMENT_MIN_QUERIES and a["overlap"] == 1.0 and F.store_grid_trusted(a)
    at = new_app(tiny, "pages/3_Explore.py")
    at.number_input(key="explore_query").set_value(7).run()
    at.slider(key="explore_k").set_value(5).run()
    at.button(key="explore_topk").click().run()
    assert not at.exception
    assert any("approximate, not rescored" in t and "top-10 overlap with the exact grid 1.00" in t
               for t in texts(at.caption))
    tables = [d_.value for d_ in at.dataframe if "influence" in d_.value.columns]
    order = np.argsort(-store.query_influence([7]), kind="stable")
    assert tables[0]["sample_id"].tolist() == project.train.ids[order[:5]].tolist()
    (job,) = jobs.list()
    assert job.kind == "rescore" and "query 7" in job.label
    jobs.wait(job.id, timeout=300)


def first_grid(tiny, jobs):
    """Explore with query 0's exact top-5 asked and its job done: the next run draws the grid
    and plans ahead."""
    at = new_app(tiny, "pages/3_Explore.py")
    at.number_input(key="explore_query").set_value(0).run()
    at.slider(key="explore_k").set_value(5).run()
    at.button(key="explore_topk").click().run()
    (first,) = jobs.list()
    assert jobs.wait(first.id, timeout=300).status == "done", jobs.get(first.id).error
    return at


def test_plan_ahead_answers_the_class_then_its_grids_draw_at_once(tiny, jobs):
    """Issue 23: once a query's exact grid is drawn, the background job answers the next queries
    of its class (bounded, visible as ready / queued); opening one of them then draws its exact
    grid in the script run, with no job, equal to `diffin top`'s kept answer. A query the user asks
    cancels planning ahead first."""
    from diffin_core.run import answers
    project = Project(tiny)
    y = project.query.y
    at = first_grid(tiny, jobs)
    at.run()
    assert not at.exception
    ahead = [j for j in jobs.list() if j.kind == "plan-ahead"]
    assert len(ahead) == 1
    queue = F.plan_ahead_queue(project, "diffin-1", 0)
    assert queue and all(y[i] == y[0] for i in queue) and len(queue) <= F.AHEAD
    assert any(t.startswith("Planning ahead") and f"0 ready, {len(queue)} queued" in t for t in texts(at.caption))
    assert jobs.wait(ahead[0].id, timeout=600).status == "done", jobs.get(ahead[0].id).error
    nxt = queue[0]
    n_jobs = len(jobs.list())
    at.number_input(key="explore_query").set_value(nxt).run()
    at.button(key="explore_topk").click().run()
    assert not at.exception and len([j for j in jobs.list() if j.kind == "rescore"]) == 1   # no new job
    assert any(t.startswith("Produced by the exact path: this query's own plan") for t in texts(at.caption))
    kept = answers.load(project.run("diffin-1").path, [nxt]).influence
    tables = [d.value for d in at.dataframe if "influence" in d.value.columns]
    order = np.argsort(-kept, kind="stable")
    assert tables[0]["sample_id"].tolist() == project.train.ids[order[:5]].tolist()
    np.testing.assert_allclose(tables[0]["influence"], kept[order[:5]], rtol=1e-12)
    assert len(jobs.list()) >= n_jobs


def test_the_training_sample_view_goes_before_planning_ahead(tiny, jobs):
    """A project runs one job at a time: opening a training sample's per-checkpoint plot while the
    next queries are planned ahead cancels planning ahead (the plot would wait behind up to
    features.AHEAD queries); back on the grid, planning ahead is queued again. A job holding the
    project's slot keeps planning ahead queued, so the order does not depend on the machine's pace."""
    import threading
    release = threading.Event()
    at = first_grid(tiny, jobs)
    blocker = jobs.submit("hold", lambda p: release.wait(120), label="holds the project's slot",
                          project_dir=str(tiny))
    try:
        at.run()                                   # the grid queues planning ahead behind the holder
        (ahead,) = [j for j in jobs.list() if j.kind == "plan-ahead"]
        assert jobs.get(ahead.id).status == "queued"
        at.radio(key="explore_view").set_value("Training sample").run()
        assert not at.exception
        (plot,) = [j for j in jobs.list() if j.kind == "contributions"]
        assert jobs.get(ahead.id).status == "cancelled"
    finally:
        release.set()
    assert jobs.wait(blocker, timeout=60).status == "done"
    assert jobs.wait(plot.id, timeout=300).status == "done", jobs.get(plot.id).error
    at.radio(key="explore_view").set_value("Top-k for a query").run()
    assert not at.exception
    again = [j for j in jobs.list() if j.kind == "plan-ahead" and j.id != ahead.id]
    assert len(again) == 1 and again[0].status in ("queued", "running", "done")


def test_class_heatmap_cells_follow_the_explore_filter_and_say_they_are_approximate(tiny):
    """Issue 21: the Filter shown above the Class heatmap filtered nothing there (its cells listed
    the class's top 8 whatever the filter said), and the cell's values, the feature store's
    projection, were not labelled approximate. A cell's two grids are now its top rows among the
    samples the filter passes, and the view says how its values were computed, with the error the
    run measured."""
    project = Project(tiny)
    store = F.FeatureStore.open(project, "diffin-1")
    rows = np.nonzero(project.train.y == 2)[0]
    infl = store.query_influence(np.nonzero(project.query.y == 0)[0])[rows]
    order = np.argsort(-infl, kind="stable")
    chosen = rows[order[-4:]]                        # the class's 4 least helpful: never in an unfiltered top 8
    ids = project.train.ids[chosen]
    at = new_app(tiny, "pages/3_Explore.py")
    at.radio(key="explore_view").set_value("Class heatmap").run()
    at.selectbox(key="explore_cls_train_class").set_value(2).run()
    at.selectbox(key="explore_cls_query_class").set_value(0).run()
    assert any("approximate" in t and "feature store" in t for t in texts(at.caption))
    at.text_input(key="explore_filter_ids").set_value(", ".join(str(int(s)) for s in ids)).run()
    assert not at.exception
    tables = [d.value for d in at.dataframe if "influence" in d.value.columns]
    by_value = ids[np.argsort(-store.query_influence(np.nonzero(project.query.y == 0)[0])[chosen], kind="stable")]
    assert tables[0]["sample_id"].tolist() == by_value.tolist()
    assert tables[1]["sample_id"].tolist() == by_value[::-1].tolist()
    # the score range (label_issue, the filter's score) applies to the cell's rows too
    at.text_input(key="explore_filter_ids").set_value("").run()
    lo, hi = at.slider(key="explore_filter_score").value
    cut = float(np.median(project.scores("diffin-1")["label_issue"]))
    at.slider(key="explore_filter_score").set_value((lo, cut)).run()
    assert not at.exception and not at.error
    tables = [d.value for d in at.dataframe if "influence" in d.value.columns]
    assert len(tables[0]) > 0 and (tables[0]["label_issue"] <= cut + 1e-9).all()
    assert (tables[1]["label_issue"] <= cut + 1e-9).all()


def test_checkpoint_plot_names_the_runs_value_and_warns_where_they_differ(tiny, jobs):
    """Issue 21: the plot's caption said its sum was the run's influence without comparing the two
    (that is how +0.0003933 stood beside the run's -7.976e-05). It now prints the run's value
    beside the sum, and a plot that does not add up to it (a stale cache, a rescored run) is a
    warning naming both numbers, never a silent claim."""
    import pandas as pd
    project = Project(tiny)
    at = new_app(tiny, "pages/3_Explore.py")
    at.radio(key="explore_view").set_value("Training sample").run()
    at.number_input(key="explore_sample").set_value(11).run()
    wait_jobs(at, jobs)
    run_value = float(project.scores("diffin-1").set_index("sample_id").loc[11, "influence"])
    total = [t for t in texts(at.caption) if t.startswith("Per-checkpoint contributions sum to")][0]
    assert f"the run's value {run_value:+.4g}" in total and not at.warning
    path = F.contributions_path(project, "diffin-1", 11)
    df = pd.read_json(path, orient="records")
    df["contribution"] = -df["contribution"] * 3 - 1e-3          # no longer the run's value
    path.write_text(df.to_json(orient="records"))
    at.run()
    assert not [t for t in texts(at.caption) if t.startswith("Per-checkpoint contributions sum to")]
    (warning,) = [w.value for w in at.warning]
    assert f"{float(df['contribution'].sum()):+.4g}" in warning and f"{run_value:+.4g}" in warning
    assert "do not add up" in warning


def test_topk_filter_ranks_the_top_k_within_the_filter(tiny, jobs):
    """Issue 21 (filters in Explore's grids): a class filter over a query's top-k used to hide the
    rows of the overall top k that were of other classes (often leaving one or none: "raise k");
    the grids are now the top k among the samples the filter passes, read from the query's kept
    answer, each value the exact path's or marked ≈ (the store's, not rescored) and said so."""
    from diffin_core.run import answers
    project = Project(tiny)
    at = new_app(tiny, "pages/3_Explore.py")
    at.number_input(key="explore_query").set_value(6).run()
    at.slider(key="explore_k").set_value(5).run()
    at.button(key="explore_topk").click().run()
    (job,) = jobs.list()
    assert jobs.wait(job.id, timeout=300).status == "done", jobs.get(job.id).error
    at.run()
    a = answers.load(project.run("diffin-1").path, [6])
    top = np.argsort(-a.influence, kind="stable")[:5]
    y = project.train.y
    cls = min(range(3), key=lambda c: int(np.sum(y[top] == c)))      # the class least present in the top 5
    at.multiselect(key="explore_filter_given").set_value([cls]).run()
    assert not at.exception
    tables = [d.value for d in at.dataframe if "influence" in d.value.columns]
    rows = np.flatnonzero(y == cls)
    best = rows[np.argsort(-a.influence[rows], kind="stable")]
    for table, want in ((tables[0], best[:5]), (tables[1], best[::-1][:5])):
        assert table["sample_id"].tolist() == project.train.ids[want].tolist()
        assert (table["label"] == cls).all()
        np.testing.assert_allclose(table["influence"], a.influence[want], rtol=1e-12)
        assert table["exact"].tolist() == a.exact[want].tolist()
    shown = set(np.concatenate([best[:5], best[::-1][:5]]).tolist())
    said = " ".join(texts(at.caption))
    assert "top 5 among" in said
    assert ("≈" in said) == (not a.exact[list(shown)].all())
