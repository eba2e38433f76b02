"""Home and Score pages: the sample project in one click, a scoring job seen to finish, cancel, failure."""
from __future__ import annotations

from app_fixtures import jobs, new_app, scored, loss_run, table_with, texts, workspace  # noqa: F401


def test_home_sample_project_one_click(workspace):
    at = new_app()
    assert "No projects" in " ".join(m.value for m in at.markdown)
    at.button(key="home_sample").click().run()
    assert not at.exception
    assert (workspace / "mnist-sample" / "diffin.toml").is_file()
    assert not (workspace / "mnist-sample" / "runs").exists()
    assert at.session_state["project_dir"] == str(workspace / "mnist-sample")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Training samples"] == "4,000" and metrics["Checkpoints"] == "12"


def test_workspace_from_cli_flag(tmp_path):
    from diffin_core.appstate import workspace_dir
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
    assert runs.loc[0, "seconds"] > 0
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
