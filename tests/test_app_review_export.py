"""Review decisions persist into a fresh session; exports contain exactly the reviewed result."""
from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pandas as pd
from app_fixtures import jobs, loss_run, new_app, scored, table_with, texts, workspace  # noqa: F401

from diffin_core.review import ReviewLog


def metrics(at) -> dict:
    return {m.label: m.value for m in at.metric}


def current_sample(at) -> int:
    heads = [h for h in texts(at.subheader) if h.startswith("Sample ")]
    return int(heads[0].split()[1])


def test_review_actions_persist_into_a_fresh_session(scored):
    scores = pd.read_parquet(scored / "runs/loss-1/scores.parquet")
    ranked = scores.sort_values("label_issue", ascending=False, kind="stable")["sample_id"].tolist()
    at = new_app(scored, "pages/4_Review.py")
    assert at.selectbox(key="review_run").value == "loss-1"
    assert current_sample(at) == ranked[0]
    assert metrics(at)["Remaining"] == "4000"
    at.button(key="review_exclude").click().run()
    assert current_sample(at) == ranked[1]  # the next sample appears at once
    at.selectbox(key="review_new_label").set_value(7).run()
    at.button(key="review_relabel").click().run()
    at.button(key="review_keep").click().run()
    assert current_sample(at) == ranked[3]
    m = metrics(at)
    assert (m["Reviewed"], m["Excluded"], m["Relabelled"], m["Remaining"]) == ("3", "1", "1", "3997")
    assert "Precision (truly mislabelled)" in m

    fresh = new_app(scored, "pages/4_Review.py")  # a second tab / a reload
    assert current_sample(fresh) == ranked[3]
    assert metrics(fresh)["Reviewed"] == "3"
    state = ReviewLog(scored).state()
    assert state.loc[ranked[0], "action"] == "exclude"
    assert state.loc[ranked[1], "action"] == "relabel" and state.loc[ranked[1], "label"] == 7
    assert state.loc[ranked[2], "action"] == "keep"
    fresh.button(key="review_undo").click().run()  # undo walks back the log
    assert current_sample(fresh) == ranked[2]
    assert ranked[2] not in ReviewLog(scored).state().index
    assert len(ReviewLog(scored).history()) == 4


def test_bulk_exclude_and_precision(scored):
    scores = pd.read_parquet(scored / "runs/loss-1/scores.parquet")
    top = scores.sort_values("label_issue", ascending=False, kind="stable").head(10)
    at = new_app(scored, "pages/4_Review.py")
    at.number_input(key="review_top_n").set_value(10).run()
    at.button(key="review_bulk_exclude").click().run()
    state = ReviewLog(scored).state()
    assert sorted(state.index) == sorted(top["sample_id"]) and set(state["action"]) == {"exclude"}
    truly = (top["label"] != top["true_label"]).mean()
    assert metrics(at)["Precision (truly mislabelled)"] == f"{truly:.0%}"
    assert at.number_input(key="review_top_n").value == 0  # the selection is cleared after acting


def test_default_run_prefers_diffin(scored):
    fake = scored / "runs" / "diffin-1"
    shutil.copytree(scored / "runs" / "loss-1", fake)
    meta = json.loads((fake / "meta.json").read_text())
    meta.update(method="diffin", run="diffin-1", finished=0)  # older than loss-1, still preferred
    (fake / "meta.json").write_text(json.dumps(meta))
    at = new_app(scored, "pages/4_Review.py")
    assert at.selectbox(key="review_run").value == "diffin-1"


def _decide(scored):
    scores = pd.read_parquet(scored / "runs/loss-1/scores.parquet")
    excluded, relabelled = [int(s) for s in scores["sample_id"][:5]], int(scores["sample_id"][10])
    log = ReviewLog(scored)
    log.decide_many(excluded, "exclude")
    log.decide(relabelled, "relabel", new_label=(int(scores["label"][10]) + 1) % 10)
    return scores, excluded, relabelled, (int(scores["label"][10]) + 1) % 10


def test_export_npz_has_decisions_applied(scored):
    scores, excluded, relabelled, new_label = _decide(scored)
    at = new_app(scored, "pages/5_Export.py")
    at.selectbox(key="export_format").set_value("npz").run()
    at.button(key="export_write").click().run()
    assert not at.error, texts(at.error)
    out = scored / "exports" / "mnist-sample-clean-npz.npz"
    with np.load(out) as z:
        ids, y, x = z["ids"], z["y"], z["x"]
    assert len(ids) == 4000 - 5 and not set(excluded) & set(ids.tolist())
    assert y[ids.tolist().index(relabelled)] == new_label
    train = np.load(scored / "data/train.npz")
    keep = np.setdiff1d(np.arange(4000), excluded)
    assert np.allclose(x.reshape(len(x), -1), train["x"][keep].reshape(len(keep), -1) / 255.0)
    manifest = json.loads((scored / "exports" / "mnist-sample-clean-npz.decisions.json").read_text())
    assert manifest["run"] == "loss-1" and manifest["counts"]["exclude"] == 5
    assert {s["sample_id"] for s in manifest["samples"] if s["decision"] == "exclude"} == set(excluded)
    assert at.download_button(key="export_download") is not None


def test_export_parquet_and_imagefolder(scored):
    scores, excluded, relabelled, new_label = _decide(scored)
    at = new_app(scored, "pages/5_Export.py")
    at.selectbox(key="export_format").set_value("parquet").run()
    at.button(key="export_write").click().run()
    df = pd.read_parquet(scored / "exports" / "mnist-sample-clean-parquet.parquet")
    assert len(df) == 4000 and set(df.loc[df["decision"] == "exclude", "sample_id"]) == set(excluded)
    assert df.set_index("sample_id").loc[relabelled, "label"] == new_label
    at.selectbox(key="export_format").set_value("imagefolder").run()
    at.button(key="export_write").click().run()
    with zipfile.ZipFile(scored / "exports" / "mnist-sample-clean-imagefolder.zip") as zf:
        names = zf.namelist()
    assert len(names) == 3995 and f"{new_label}/{relabelled}.png" in names
    assert not any(n.endswith(f"/{s}.png") for s in excluded for n in names)


def test_task_exports(scored):
    scores = pd.read_parquet(scored / "runs/loss-1/scores.parquet")
    at = new_app(scored, "pages/5_Export.py")
    at.radio(key="export_source").set_value("drop").run()
    at.number_input(key="export_k").set_value(25).run()
    at.button(key="export_write").click().run()
    with np.load(scored / "exports" / "mnist-sample-drop-harmful-npz.npz") as z:
        ids = set(z["ids"].tolist())
    worst = set(scores.nsmallest(25, "influence")["sample_id"])
    assert len(ids) == 3975 and not worst & ids
    at.radio(key="export_source").set_value("coreset").run()
    at.slider(key="export_pct").set_value(20).run()
    at.button(key="export_write").click().run()
    with np.load(scored / "exports" / "mnist-sample-coreset-npz.npz") as z:
        y = z["y"]
    counts = scores["label"].value_counts()
    assert abs(len(y) - 800) <= 10
    for label, n in pd.Series(y).value_counts().items():
        assert abs(n - round(0.2 * counts[label])) <= 1
