"""Review decisions persist into a fresh session; exports contain exactly the reviewed result."""
from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pandas as pd
from app_fixtures import (add_users, current_sample, jobs, loss_run, metrics, new_app, scored,  # noqa: F401
                          table_with, texts, workspace)

from diffin_core.workspace.review import ReviewLog


def test_review_actions_persist_into_a_fresh_session(scored):
    scores = pd.read_parquet(scored / "runs/loss-1/scores.parquet")
    ranked = scores.sort_values("label_issue", ascending=False, kind="stable")["sample_id"].tolist()
    at = new_app(scored, "pages/4_Review.py")
    assert at.selectbox(key="review_run").value == "loss-1"
    assert current_sample(at) == ranked[0]
    assert metrics(at)["Remaining"] == "4000"
    at.button(key="review_exclude").click().run()
    assert current_sample(at) == ranked[1]  # the next sample appears at once
    new_label = next(y for y in (7, 8) if y != int(scores.set_index("sample_id").loc[ranked[1], "label"]))
    at.selectbox(key=f"review_new_label_{ranked[1]}").set_value(new_label).run()
    at.button(key="review_relabel").click().run()
    at.button(key="review_keep").click().run()
    assert current_sample(at) == ranked[3]
    m = metrics(at)
    assert (m["Reviewed"], m["Excluded"], m["Relabelled"], m["Remaining"]) == ("3", "1", "1", "3997")
    assert "Precision" in m and "Recall" in m

    fresh = new_app(scored, "pages/4_Review.py")  # a second tab / a reload
    assert current_sample(fresh) == ranked[3]
    assert metrics(fresh)["Reviewed"] == "3"
    state = ReviewLog(scored).state()
    assert state.loc[ranked[0], "action"] == "exclude"
    assert state.loc[ranked[1], "action"] == "relabel" and state.loc[ranked[1], "label"] == new_label
    assert state.loc[ranked[2], "action"] == "keep"
    fresh.button(key="review_undo").click().run()  # the history undo walks back the log
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
    assert metrics(at)["Precision"] == f"{truly:.0%}" and metrics(at)["Recall"] == "100%"
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
    from diffin_core.workspace.export import written_ids
    with np.load(out) as z:
        y, x = z["y"], z["x"]
        assert z.files == np.load(scored / "data/train.npz").files       # no array the input did not have
    ids = written_ids(out)
    assert len(ids) == 4000 - 5 and not set(excluded) & set(ids.tolist())
    assert y[ids.tolist().index(relabelled)] == new_label
    train = np.load(scored / "data/train.npz")
    keep = np.setdiff1d(np.arange(4000), excluded)
    assert x.dtype == train["x"].dtype == np.uint8 and x.shape == (3995, 784)   # as stored, not float (N,1,28,28)
    np.testing.assert_array_equal(x, train["x"][keep])
    np.testing.assert_array_equal(z_true := np.load(scored / "exports" / "mnist-sample-clean-npz.npz")["true_y"],
                                  train["true_y"][keep])
    assert len(z_true) == 3995
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
    from diffin_core.workspace.export import written_ids
    ids = set(written_ids(scored / "exports" / "mnist-sample-drop-harmful-npz.npz").tolist())
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
    from diffin_core.tasks.curate import ccs_selection  # the benchmarked rule, as the CLI's
    kept = set(written_ids(scored / "exports" / "mnist-sample-coreset-npz.npz").tolist())
    expect = ccs_selection(scores.influence.to_numpy(), 0.2, scores.label.to_numpy(), prune_low=0.1, seed=0)
    assert kept == set(scores.sample_id[expect])


def _ranked(scored):
    scores = pd.read_parquet(scored / "runs/loss-1/scores.parquet")
    return scores.set_index("sample_id", drop=False), scores.sort_values(
        "label_issue", ascending=False, kind="stable")["sample_id"].tolist()


def _as(scored, user):
    """A Review tab signed in as ``user`` (reviewers ann and bob; the name comes from the
    sign-in, never from a text box)."""
    from diffin_core.workspace.accounts import Accounts
    if Accounts(scored.parent).get(user) is None:
        add_users(scored.parent, **{user: "reviewer"})
    return new_app(scored, "pages/4_Review.py", user=user)


def test_two_tabs_on_one_sample_the_stale_click_is_refused(scored):
    rows, ranked = _ranked(scored)
    tab_a = _as(scored, "ann")
    tab_b = _as(scored, "bob")
    assert current_sample(tab_a) == current_sample(tab_b) == ranked[0]
    tab_a.button(key="review_exclude").click().run()
    assert metrics(tab_a)["Excluded"] == "1"
    tab_b.button(key="review_keep").click().run()          # tab B still showed ranked[0] undecided
    errors = texts(tab_b.error)
    assert len(errors) == 1, errors
    assert f"sample {ranked[0]} was changed by ann at" in errors[0] and "nothing was written" in errors[0]
    # the reviewer reads the problem, not the server's path of the review log (issue 21)
    assert errors[0].startswith(f"sample {ranked[0]} was changed") and "review.sqlite" not in errors[0], errors
    assert str(scored) not in errors[0] and "/" not in errors[0].split(" was changed")[0]
    state = ReviewLog(scored).state()
    assert state.loc[ranked[0], "action"] == "exclude" and state.loc[ranked[0], "user"] == "ann"
    assert len(ReviewLog(scored).history()) == 1
    assert metrics(tab_b)["Excluded"] == "1" and current_sample(tab_b) == ranked[1]  # redrawn as it is now

    # bulk: tab B selects the top 3; tab A decides one of them meanwhile; B's bulk click is refused
    tab_b.number_input(key="review_top_n").set_value(3).run()
    tab_a.run()
    tab_a.button(key="review_keep").click().run()           # ranked[1]
    tab_b.button(key="review_bulk_exclude").click().run()
    errors = texts(tab_b.error)
    assert len(errors) == 1 and "1 of the 3 selected samples changed" in errors[0], errors
    assert f"sample {ranked[1]} was changed by ann" in errors[0]
    state = ReviewLog(scored).state()
    assert list(state.index) == sorted(ranked[:2]) and state.loc[ranked[1], "action"] == "keep"
    # once redrawn, the same bulk action goes through
    tab_b.number_input(key="review_top_n").set_value(2).run()
    tab_b.button(key="review_bulk_exclude").click().run()
    assert not tab_b.error
    assert set(ReviewLog(scored).state().index) == set(ranked[:4])


def test_relabel_dropdown_is_keyed_by_sample_and_never_offers_the_given_label(scored):
    rows, ranked = _ranked(scored)
    at = new_app(scored, "pages/4_Review.py")
    first, second = ranked[0], ranked[1]
    given2 = int(rows.loc[second, "label"])
    # the case: on the first card, pick the label the NEXT sample already has
    box = at.selectbox(key=f"review_new_label_{first}")
    if given2 in box.options or str(given2) in box.options:
        box.set_value(given2).run()
    at.button(key="review_exclude").click().run()
    assert current_sample(at) == second
    box = at.selectbox(key=f"review_new_label_{second}")
    assert str(given2) not in [str(o) for o in box.options]
    pred2 = int(rows.loc[second, "pred"])
    assert box.value == (pred2 if pred2 != given2 else box.options and int(box.options[0]))
    assert at.button(key="review_relabel").label != f"Relabel to {given2}"
    at.button(key="review_relabel").click().run()
    state = ReviewLog(scored).state()
    assert state.loc[second, "action"] == "relabel" and int(state.loc[second, "label"]) != given2


def test_undo_on_a_sample_versus_history_undo(scored):
    rows, ranked = _ranked(scored)
    at = _as(scored, "ann")
    at.button(key="review_exclude").click().run()            # ranked[0]
    at.button(key="review_keep").click().run()               # ranked[1]
    # the card names the sample its undo button acts on
    assert at.button(key="review_undo_sample_last").label.startswith(f"Undo the decision on sample {ranked[1]}")
    assert at.button(key="review_undo").label.endswith(f"(sample {ranked[1]}, keep)")
    ReviewLog(scored).decide(ranked[5], "exclude", user="bob")   # another reviewer, elsewhere
    at.run()
    at.button(key="review_undo_sample_last").click().run()   # per sample: ranked[1] only
    state = ReviewLog(scored).state()
    assert ranked[1] not in state.index and {ranked[0], ranked[5]} <= set(state.index)
    assert current_sample(at) == ranked[1]                   # the undone sample is back on the card
    assert "review_undo_sample" not in [b.key for b in at.button]
    at.button(key="review_undo").click().run()               # history: ann's newest left = ranked[0]
    state = ReviewLog(scored).state()
    assert list(state.index) == [ranked[5]]                  # bob's decision untouched
    assert current_sample(at) == ranked[0]


def test_export_without_decisions_equals_the_input(scored):
    at = new_app(scored, "pages/5_Export.py")
    assert at.selectbox(key="export_format").value == "npz"       # the input's own format first
    at.button(key="export_write").click().run()
    assert not at.error, texts(at.error)
    with np.load(scored / "data/train.npz") as a, np.load(scored / "exports/mnist-sample-clean-npz.npz") as b:
        assert a.files == b.files
        for k in a.files:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
            np.testing.assert_array_equal(a[k], b[k])
