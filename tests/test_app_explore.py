"""Explore page: top-k grid, the map (from a cached file; the real UMAP fit only with DIFFIN_SLOW=1),
histograms, comparing two runs."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from app_fixtures import jobs, loss_run, new_app, scored, table_with, texts, workspace  # noqa: F401

import _common
from diffin_core.tasks import compare


def test_topk_grid_shows_label_score_prediction(scored, jobs):
    at = new_app(scored, "pages/3_Explore.py")
    at.number_input(key="explore_query").set_value(5).run()
    at.slider(key="explore_k").set_value(4).run()
    at.button(key="explore_topk").click().run()
    job = jobs.list()[0]                              # computed in the shared background worker
    assert job.kind == "topk" and jobs.wait(job.id, timeout=120).status == "done", job.error
    at.run()
    assert not at.error and not at.exception
    cards = [c for c in texts(at.caption) if c.startswith("#")]
    assert len(cards) == 8  # 4 helpful + 4 harmful
    infl = [float(c.rsplit("influence ", 1)[1]) for c in cards]
    assert infl[:4] == sorted(infl[:4], reverse=True) and infl[4:] == sorted(infl[4:])
    assert min(infl[:4]) > max(infl[4:])
    assert all(" · label " in c and " · pred " in c for c in cards)
    assert (scored / "runs/loss-1/topk/q5.npy").is_file()
    at.button(key="explore_pick_3").click().run()  # pick a query by clicking its picture
    assert at.number_input(key="explore_query").value == 3


def test_map_from_cache_and_histograms(scored):
    ids = np.load(scored / "data/train.npz")
    n = len(ids["y"])
    pd.DataFrame({"sample_id": np.arange(n), "umap_x": np.random.rand(n), "umap_y": np.random.rand(n)}).to_parquet(
        scored / "runs/loss-1/umap.parquet")
    at = new_app(scored, "pages/3_Explore.py")
    assert "explore_color" not in [s.key for s in at.selectbox]     # only the chosen view is drawn
    at.radio(key="explore_view").set_value("Map").run()
    assert at.selectbox(key="explore_color").options == ["influence", "self_influence", "label_issue", "label", "flag"]
    for colour in ("label", "flag"):
        at.selectbox(key="explore_color").set_value(colour).run()
        assert not at.exception
    assert "Draw a lasso" in " ".join(texts(at.caption))
    # the Preview map: plotly.js and the hover script in st.iframe (components.v1.html is deprecated)
    at.radio(key="explore_map_mode").set_value("Preview (thumbnails on hover)").run()
    assert not at.exception
    frames = [e for e in at.main if getattr(e, "type", None) == "iframe"]
    assert len(frames) == 1
    doc = frames[0].proto.srcdoc
    assert 'id="diffin-map"' in doc and 'gd.on("plotly_hover"' in doc and "data:image/png;base64," in doc
    at.radio(key="explore_map_mode").set_value("Select (lasso)").run()
    at.radio(key="explore_view").set_value("Histograms").run()
    assert not at.exception
    assert "influence" in at.selectbox(key="explore_hist_col").options


def test_no_deprecated_streamlit_api_in_the_app():
    """st.components.v1.html / iframe are removed after 2026-06-01: the app uses st.iframe / st.html."""
    root = Path(__file__).resolve().parent.parent
    sources = [root / "app.py", *sorted((root / "pages").rglob("*.py")), *sorted((root / "diffin_core").rglob("*.py"))]
    users = [str(p.relative_to(root)) for p in sources if re.search(r"components\.v1|components import v1",
                                                                     p.read_text(encoding="utf-8"))]
    assert users == []


def test_histograms_bin_per_group_on_shared_edges():
    from diffin_core.tasks.compare import histograms
    values = np.array([0.0, 0.1, 0.2, 0.9, 1.0, np.nan])
    groups = np.array(["a", "a", "b", "b", "b", "a"])
    h = histograms(values, groups, bins=2)
    assert set(h["group"]) == {"a", "b"} and len(h) == 4
    assert h.groupby("group")["count"].sum().to_dict() == {"a": 2, "b": 3}
    assert h[h.group == "b"]["count"].tolist() == [1, 2]


def test_lasso_ids_decode_both_shapes():
    assert _common.selected_ids({"selection": {"points": [{"customdata": {"0": 4}}, {"customdata": [9]}]}}) == [4, 9]
    assert _common.selected_ids({"selection": {"points": []}}) == []
    assert _common.selected_ids(None) == []


def test_compare_two_runs(scored):
    other = scored / "runs" / "loss-2"
    shutil.copytree(scored / "runs" / "loss-1", other)
    df = pd.read_parquet(other / "scores.parquet")
    df["label_issue"] = df["label_issue"].to_numpy()[::-1]  # a run that disagrees
    df.to_parquet(other / "scores.parquet")
    meta = json.loads((other / "meta.json").read_text())
    meta["run"] = "loss-2"
    (other / "meta.json").write_text(json.dumps(meta))
    at = new_app(scored, "pages/3_Explore.py")
    at.radio(key="explore_view").set_value("Compare runs").run()
    assert at.selectbox(key="explore_cmp_a").value != at.selectbox(key="explore_cmp_b").value
    r = float([m.value for m in at.metric if "Spearman" in m.label][0])
    a, b = pd.read_parquet(scored / "runs/loss-1/scores.parquet"), df
    assert r == pytest.approx(compare.rank_correlation(a, b, "label_issue"), abs=1e-3) and r < 0.5
    table = table_with(at, "gap")
    assert len(table) == 20 and table["gap"].is_monotonic_decreasing


def test_compare_helpers():
    a = pd.DataFrame({"sample_id": [0, 1, 2, 3], "label": [0, 0, 1, 1], "influence": [1.0, 2, 3, 4]})
    b = a.assign(influence=[4.0, 3, 2, 1])
    assert compare.rank_correlation(a, a) == pytest.approx(1.0)
    assert compare.rank_correlation(a, b) == pytest.approx(-1.0)
    assert compare.disagreements(a, b, "influence", n=2)["sample_id"].tolist() == [0, 3]


@pytest.mark.skipif(not os.environ.get("DIFFIN_SLOW"), reason="UMAP's first fit compiles for ~1 min; set DIFFIN_SLOW=1")
def test_map_computed_in_background(scored, jobs):
    at = new_app(scored, "pages/3_Explore.py")
    at.radio(key="explore_view").set_value("Map").run()
    at.button(key="explore_map_compute").click().run()
    job = jobs.list()[0]
    assert jobs.wait(job.id, timeout=600).status == "done"
    at.run()
    assert (scored / "runs/loss-1/umap.parquet").is_file()
    assert "explore_color" in [s.key for s in at.selectbox]
