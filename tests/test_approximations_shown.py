"""Issue 17, items 5 and 7: a run's meta.json `approximations` are printed by `diffin score` once
each (two methods carrying the same line print it once) and shown beside the run on the Score and
Explore pages; the replay's self-check (meta.json adam_check) is shown on the Score page; the Score
page's "Hessian-vector products" choice reaches the run's meta.json."""
from __future__ import annotations

import json

from app_fixtures import jobs, new_app, table_with, texts, workspace  # noqa: F401

from diffin_core.cli import main

from helpers import make_tiny_project


def _without_step_lrs(root):
    """An older manifest (no per-step lrs): the recipe is approximated in one line."""
    raw = json.loads((root / "checkpoints/manifest.json").read_text())
    raw.pop("step_lrs"), raw.pop("group_steps", None)
    (root / "checkpoints/manifest.json").write_text(json.dumps(raw))
    return root


def test_cli_prints_each_approximation_once_and_the_pages_show_them(workspace, capsys):
    root = _without_step_lrs(make_tiny_project(workspace / "tiny"))
    main(["score", str(root), "-m", "diffin", "-m", "tracin", "--no-features"])
    out = capsys.readouterr().out
    metas = {m: json.loads((root / f"runs/{m}-1/meta.json").read_text()) for m in ("diffin", "tracin")}
    lines = [a for meta in metas.values() for a in meta["approximations"]]
    assert any("no per-step lrs" in a for a in metas["diffin"]["approximations"]), metas["diffin"]
    assert any("no per-step lrs" in a for a in metas["tracin"]["approximations"]), metas["tracin"]
    for entry in set(lines):                       # the same line in both runs: printed once
        assert out.count(f"approximated: {entry}\n") == 1, out
    assert out.count("approximated: ") == len(set(lines)), out

    at = new_app(root, "pages/2_Score.py")
    assert not at.exception
    captions = texts(at.caption)
    for run, meta in (("diffin-1", metas["diffin"]), ("tracin-1", metas["tracin"])):
        for entry in meta["approximations"]:
            assert f"{run} approximates: {entry}" in captions, (entry, captions)

    # the replay's self-check (meta.json adam_check, as a batch-order AdamW run writes it): passed in
    # the runs table's checks column; failed as a warning line under the table, not also a caption
    path = root / "runs/diffin-1/meta.json"
    meta = dict(metas["diffin"])
    meta["adam_check"] = {"passed": True, "intervals": 10, "failed": 0, "worst": {"theta": 2e-6, "m": 3e-7, "v": 1e-7}}
    path.write_text(json.dumps(meta))
    at.run()
    row = table_with(at, "run").set_index("run").loc["diffin-1"]
    assert "Adam replay check: passed, 10 intervals" in row["checks"], row["checks"]
    failed = "Adam replay self-check failed at 10 of 10 checkpoint intervals (...): scored with the checkpoint estimator"
    meta["adam_check"] = {"passed": False, "intervals": 10, "failed": 10, "worst": {"m": 0.59},
                          "fallback": "the checkpoint estimator", "message": failed}
    meta["approximations"] = list(metas["diffin"]["approximations"]) + [failed]
    path.write_text(json.dumps(meta))
    at.run()
    assert not at.exception
    row = table_with(at, "run").set_index("run").loc["diffin-1"]
    assert "Adam replay check: FAILED at 10 of 10 intervals (worst miss 59%)" in row["checks"], row["checks"]
    assert f"diffin-1: {failed}" in texts(at.warning), texts(at.warning)
    assert f"diffin-1 approximates: {failed}" not in texts(at.caption)
    path.write_text(json.dumps(metas["diffin"]))

    for run, meta in (("diffin-1", metas["diffin"]), ("tracin-1", metas["tracin"])):
        ex = new_app(root, "pages/3_Explore.py")
        ex.selectbox(key="explore_run").set_value(run).run()
        assert not ex.exception
        captions = texts(ex.caption)
        for entry in meta["approximations"]:
            assert f"{run} approximates: {entry}" in captions, (run, entry, captions)


def test_score_pages_hvp_choice_reaches_the_runs_meta(workspace, jobs):
    root = make_tiny_project(workspace / "tiny")
    at = new_app(root, "pages/2_Score.py")
    at.multiselect(key="score_methods").set_value(["diffin"]).run()
    at.selectbox(key="score_hvp").set_value("exact").run()
    at.button(key="score_start").click().run()
    assert not at.exception
    (info,) = jobs.list()
    assert jobs.wait(info.id, timeout=300).status == "done", jobs.get(info.id).error
    meta = json.loads((root / "runs/diffin-1/meta.json").read_text())
    assert meta["settings"]["hvp"] == "exact" and meta["hvp"]["setting"] == "exact", meta.get("hvp")
