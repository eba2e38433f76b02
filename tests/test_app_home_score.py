"""Home and Score pages: the sample project in one click, a scoring job seen to finish, cancel, failure;
navigation names Home; next-step links; runs table; job order; named selections in What-if."""
from __future__ import annotations

import time

from app_fixtures import ROOT, jobs, new_app, scored, loss_run, table_with, texts, workspace  # noqa: F401


def links(at) -> list[tuple[str, str]]:
    """(label, target page title) of every st.page_link on the page."""
    return [(p.proto.label, p.proto.page) for p in at.get("page_link")]


def test_home_sample_project_one_click(workspace, monkeypatch):
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)  # so the __pycache__ check means something
    monkeypatch.setattr(__import__("sys"), "dont_write_bytecode", False)
    at = new_app()
    assert "No projects" in " ".join(m.value for m in at.markdown)
    assert links(at) == [("…or set up a new project from uploads", "Setup")]  # nothing to score yet
    at.button(key="home_sample").click().run()
    assert not at.exception
    assert (workspace / "mnist-sample" / "diffin.toml").is_file()
    assert not (workspace / "mnist-sample" / "runs").exists()
    assert at.session_state["project_dir"] == str(workspace / "mnist-sample")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Training samples"] == "4,000" and metrics["Checkpoints"] == "12"
    # right after the copy the list has it (it said "No projects" in the same run before)
    assert "No projects" not in " ".join(m.value for m in at.markdown)
    assert at.selectbox(key="home_project").value == "mnist-sample"
    assert ("Next: score it", "Score") in links(at)
    assert not list((workspace / "mnist-sample").rglob("__pycache__"))  # checked in a child, no bytecode


def test_home_next_steps_once_runs_exist(scored):
    at = new_app(scored)
    assert {m.label: m.value for m in at.metric}["Finished runs"] == "1"
    labels = [label for label, _ in links(at)]
    assert "Next: score it" not in labels
    assert ("Next: explore the scores", "Explore") in links(at) and ("Next: review the suspects", "Review") in links(at)


def test_home_reports_a_broken_model_without_running_it_in_the_server(scored):
    (scored / "model.py").write_text("import os\nos._exit(3)\n")  # would end the server in-process
    at = new_app(scored)
    assert not at.exception
    errors = " ".join(texts(at.error))
    assert "crashed (exit code 3)" in errors
    again = new_app()  # the server (this process) still serves a new session
    assert again.selectbox(key="home_project").options == ["mnist-sample"]


def test_navigation_names_every_page_with_material_icons():
    import _common as ui
    registered = {p for p, _ in ui.PAGES}
    on_disk = {f"pages/{f.name}" for f in (ROOT / "pages").glob("*.py")}
    assert registered == on_disk  # st.navigation stops discovery: a page left out would vanish
    assert ui.PAGES[0] == ("pages/home.py", "Home")
    assert all(ui.ICONS[t].startswith(":material/") for _, t in ui.PAGES)
    src = (ROOT / "app.py").read_text()
    assert "st.navigation(" in src and "st.Page(" in src
    at = new_app()
    assert at.title[0].value.startswith("diffin:")  # app.py runs Home by default
    for path, title in ui.PAGES[1:]:
        at.switch_page(path).run()
        assert not at.exception, (path, at.exception)
    emoji = [f.name for f in [ROOT / "app.py", ROOT / "pages" / "home.py", ROOT / "pages" / "2_Score.py",
                              ROOT / "pages" / "_common" / "__init__.py"]
             if any(ord(c) > 0x2600 and c not in "→…“”·Δ←" for c in f.read_text())]
    assert emoji == []  # icons in the files this test owns are material icons, not emoji


def test_workspace_from_cli_flag(tmp_path):
    from diffin_core.workspace.appstate import workspace_dir
    assert workspace_dir(["--workspace", str(tmp_path / "w")]) == tmp_path / "w"
    assert (tmp_path / "w").is_dir()


def test_scoring_job_runs_to_the_end(workspace, jobs):
    at = new_app()
    at.button(key="home_sample").click().run()
    at.switch_page("pages/2_Score.py").run()
    at.multiselect(key="score_methods").set_value(["loss"]).run()
    at.button(key="score_start").click().run()
    assert not at.exception
    job_id = at.query_params["jobs"][0] if isinstance(at.query_params["jobs"], list) else at.query_params["jobs"]
    info = jobs.get(job_id)
    assert info is not None and info.label == "loss"
    assert len(at.get("progress")) == 1  # drawn while it runs
    info = jobs.wait(job_id, timeout=120)
    assert info.status == "done", info.error
    at.run()
    assert any("loss: done" in s for s in texts(at.success))
    runs = table_with(at, "run")
    assert list(runs["run"]) == ["loss-1"] and runs.loc[0, "method"] == "loss"
    assert runs.loc[0, "scores published after"].endswith(" s") and runs.loc[0, "scale"] == "ranking only"
    assert runs.loc[0, "features ready after"] == "no store"        # loss has no feature pass
    assert runs.loc[0, "settings"] == "batch 256"  # only what "loss" reads, not Hessian or CG knobs
    assert (workspace / "mnist-sample" / "runs" / "loss-1" / "scores.parquet").is_file()
    assert len(at.get("progress")) == 0


def test_reloaded_page_finds_running_job_and_cancels_it(workspace, jobs):
    at = new_app()
    at.button(key="home_sample").click().run()
    at.switch_page("pages/2_Score.py").run()
    at.multiselect(key="score_methods").set_value(["loss"]).run()
    at.button(key="score_start").click().run()
    job_id = jobs.list()[0].id
    # a second tab: fresh session, only the project in the URL
    again = new_app(workspace / "mnist-sample", "pages/2_Score.py")
    assert len(again.get("progress")) == 1
    again.button(key=f"score_cancel_{job_id}").click().run()
    assert jobs.wait(job_id, timeout=60).status == "cancelled"
    again.run()
    assert any("cancelled" in w for w in texts(again.warning))
    assert not (workspace / "mnist-sample" / "runs" / "loss-1").exists()


def test_failed_job_shows_plain_error(scored, jobs):
    at = new_app(scored, "pages/2_Score.py")
    (scored / "checkpoints" / "ckpt_000504.safetensors").write_bytes(b"garbage")
    at.multiselect(key="score_methods").set_value(["grad-dot"]).run()
    at.button(key="score_start").click().run()
    assert jobs.wait(jobs.list()[0].id, timeout=60).status == "failed"
    at.run()
    errors = " ".join(texts(at.error))
    assert "scoring failed" in errors and "ckpt_000504.safetensors" in errors and "Traceback" not in errors
    assert [r for r in table_with(at, "run")["run"]] == ["loss-1"]


def test_a_job_stopped_at_its_time_limit_says_so(scored, jobs):
    jid = jobs.submit_child("score", "time:sleep", (120,), label="tracin", project_dir=scored,
                            with_progress=False, timeout=2)     # a scoring job that hangs
    info = jobs.wait(jid, timeout=60)
    assert info.status == "failed" and info.timed_out
    at = new_app(scored, "pages/2_Score.py")
    errors = [e for e in texts(at.error) if e.startswith("tracin:")]
    assert errors == [f"tracin: stopped at its time limit: {info.error}"], texts(at.error)
    assert "its time limit is 2 s" in errors[0]
    assert [e.proto.icon for e in at.error if e.value.startswith("tracin:")] == [":material/timer_off:"]


def test_running_job_listed_above_the_queued(scored, jobs):
    at = new_app(scored, "pages/2_Score.py")
    at.multiselect(key="score_methods").set_value(["loss", "margin", "grad-dot"]).run()
    at.button(key="score_start").click().run()
    order = {i.label: i.id for i in jobs.list()}
    end = time.time() + 60
    while jobs.get(order["loss"]).status != "running":
        assert time.time() < end
        time.sleep(0.05)
    at.run()
    shown = [p.proto.text.split(":")[0] for p in at.get("progress")]
    assert shown == ["loss", "margin", "grad-dot"]  # running, then the queue in the order it runs
    assert "margin: queued" in [p.proto.text for p in at.get("progress")]
    for jid in order.values():
        jobs.cancel(jid)


def test_score_page_says_which_numbers_are_calibrated(scored):
    at = new_app(scored, "pages/2_Score.py")
    at.multiselect(key="score_methods").set_value(["diffin", "tracin"]).run()
    caps = " ".join(texts(at.caption))
    assert "**diffin** · calibrated: Δ query loss (nats)" in caps and "1.08-1.37" in caps
    assert "**tracin** · ranking only" in caps and "63-80x" in caps


def test_whatif_uses_a_named_selection(scored):
    from diffin_core.workspace import selections
    at = new_app(scored, "pages/6_What-if.py")
    at.radio(key="whatif_source").set_value("a saved selection (Explore's lasso)").run()
    assert "No saved selections yet" in " ".join(texts(at.info))
    assert ("Go to Explore", "Explore") in links(at)
    selections.save(scored, "odd sevens", [5, 3, 9], "test")
    at.run()
    assert at.selectbox(key="whatif_selection").value == "odd sevens"
    assert {m.label: m.value for m in at.metric}["Samples to remove"] == "3"


def test_autoscore_serves_first_and_scores_in_the_background(workspace, jobs, monkeypatch):
    from diffin_core.project.folder import Project
    monkeypatch.setenv("DIFFIN_AUTOSCORE", "loss")  # scripts/run.sh sets diffin,tracin,loss
    at = new_app()
    assert not at.exception
    queued = jobs.list()
    assert [j.label for j in queued] == ["loss"]
    assert queued[0].project_dir == str((workspace / "mnist-sample").resolve())
    # the page is drawn while the job runs; the sample project, the only one, is open by itself
    assert any("Scoring in the background" in i for i in texts(at.info))
    assert ("Watch it on the Score page", "Score") in links(at)
    assert jobs.wait(queued[0].id, timeout=180).status == "done"
    new_app()  # another session of the same server does not queue the work again
    assert len(jobs.list()) == 1
    assert [r.name for r in Project(workspace / "mnist-sample").runs()] == ["loss-1"]


def test_score_page_shows_the_checkpoint_phase_as_progress(scored, jobs):
    import threading
    gate = threading.Event()

    def fake_diffin(p):  # what the engine reports while it carries the query back
        for k in (12, 11, 10):
            p.update(0, 4000, f"diffin: propagated the query through checkpoint {k}/12")
        gate.wait(300)   # released by the test below; long enough for a slow, loaded AppTest run

    jid = jobs.submit("score", fake_diffin, label="diffin", project_dir=scored)
    end = time.time() + 10
    while jobs.get(jid).step != 3:
        assert time.time() < end
        time.sleep(0.02)
    at = new_app(scored, "pages/2_Score.py")
    bars = at.get("progress")
    assert [b.proto.text for b in bars] == ["diffin: propagated the query through checkpoint (3 of 12 done)"]
    assert bars[0].proto.value == 25  # 3/12, not 0/4,000
    gate.set()


def test_autoscore_shows_the_shipped_diffin_run_at_once_and_checks_it(workspace, jobs, monkeypatch):
    """First run (issue 19): the sample's shipped diffin run is on Home in the first page view;
    the background job checks it first (run/prebuilt.py), then scores the other methods; Home
    says what is being computed."""
    from diffin_core.project.folder import Project
    monkeypatch.setenv("DIFFIN_AUTOSCORE", "diffin,loss")
    at = new_app()
    assert not at.exception
    runs = Project(workspace / "mnist-sample").runs()
    assert [(r.name, r.method, r.meta["prebuilt"]["status"]) for r in runs] == [("diffin-1", "diffin", "unverified")]
    assert {m.label: m.value for m in at.metric}["Finished runs"] == "1"
    assert [j.label for j in jobs.list()][::-1] == ["diffin (checking the shipped run)", "loss"]
    info = " ".join(texts(at.info))
    assert "was shipped with diffin" in info and "checks it now" in info
    assert "Scoring in the background: diffin (checking the shipped run) (" in info and "loss (queued" in info
    assert ("Next: review the suspects", "Review") in links(at)      # usable before the check ends
    for j in jobs.list():
        jobs.cancel(j.id)


def test_score_page_shows_when_scores_and_features_were_ready(scored):
    """Issue 21: "took 14 min 54 s" hid the feature pass that followed (29 min in all): both are shown."""
    import json
    from diffin_core.run.features import pass_times
    run = scored / "runs/loss-1"
    meta = json.loads((run / "meta.json").read_text())
    meta["seconds"] = 894.0                                   # scores published after 14 min 54 s
    (run / "meta.json").write_text(json.dumps(meta))
    (run / "features").mkdir()
    (run / "features/meta.json").write_text(json.dumps({"seconds": 846.0, "finished": meta["finished"] + 2 + 846.0}))
    t = pass_times(run, meta)
    assert (t["scores_s"], t["features_s"], t["features_own_s"], t["separate"]) == (894.0, 1740.0, 846.0, False)
    at = new_app(scored, "pages/2_Score.py")
    assert not at.exception
    row = table_with(at, "run").set_index("run").loc["loss-1"]
    assert row["scores published after"] == "14 min 54 s" and row["features ready after"] == "29 min 00 s"
    # a store built by its own command a day later: its own time, not a sum
    (run / "features/meta.json").write_text(json.dumps({"seconds": 846.0, "finished": meta["finished"] + 86400}))
    assert pass_times(run, meta)["separate"] and pass_times(run, meta)["features_s"] is None
    at.run()
    row = table_with(at, "run").set_index("run").loc["loss-1"]
    assert row["features ready after"] == "14 min 06 s (built separately)"


import pytest  # noqa: E402


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_a_text_column_declared_tabular_is_one_line_on_every_page_without_server_folders(workspace, ext):
    """Issue 20: a CSV or parquet with a string column under kind = "tabular" was a traceback with
    the server's paths in the browser (Home listed the full path, Score raised)."""
    import shutil

    import numpy as np
    import pandas as pd
    from helpers import make_tiny_project
    proj = make_tiny_project(workspace / "tab")
    for split in ("train", "query"):
        with np.load(proj / f"data/{split}.npz") as z:
            df = pd.DataFrame(z["x"], columns=[f"f{i}" for i in range(z["x"].shape[1])])
            df["note"] = [f"row {i}" for i in range(len(df))]          # a text column
            df["label"] = z["y"]
        getattr(df, "to_csv" if ext == "csv" else "to_parquet")(proj / f"data/{split}.{ext}",
                                                              **({"index": False} if ext == "csv" else {}))
    toml = (proj / "diffin.toml").read_text().replace("train.npz", f"train.{ext}").replace("query.npz", f"query.{ext}")
    (proj / "diffin.toml").write_text(toml)
    shutil.rmtree(proj / "runs", ignore_errors=True)
    want = (f"train.{ext}: column 'note' holds text, not numbers: for a text classifier set [data] kind = \"text\" "
            "and text_column = 'note' in diffin.toml")
    at = new_app(proj)
    assert not at.exception, at.exception
    assert texts(at.error) == [want], texts(at.error)
    for page in ("pages/2_Score.py", "pages/3_Explore.py", "pages/4_Review.py", "pages/5_Export.py", "pages/6_What-if.py"):
        at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert want in texts(at.error) or (page != "pages/2_Score.py" and not at.error), (page, texts(at.error))
        assert not any(str(workspace) in e for e in texts(at.error)), (page, texts(at.error))
