"""User code runs in a spawned child: a hang is cancelled, a crash fails only its job, Setup's
model check has a time limit, nothing writes __pycache__, and the same JobManager keeps serving."""
from __future__ import annotations

import io
import multiprocessing
import shutil
import sys
import time
from pathlib import Path

import pytest

from diffin_core.workspace import usercode
from diffin_core.errors import DiffinError
from diffin_core.workspace.jobs import JobManager
from helpers import MODEL_PY, make_tiny_project

HANGS = "import time\nwhile True:\n    time.sleep(0.1)\n"
EXITS = ("import os, sys\nfrom diffin_core.engine.models import MLP\n\n\ndef build():\n"
         "    print('model.py: no GPU driver found', file=sys.stderr, flush=True)\n    os._exit(3)\n")
RAISES = "def build():\n    raise ValueError('weights file missing')\n"
SEGFAULTS = "import ctypes\n\n\ndef build():\n    return ctypes.string_at(0)\n"


@pytest.fixture(autouse=True)
def bytecode_allowed(monkeypatch):
    """Python may write bytecode here and in the children (some shells set PYTHONDONTWRITEBYTECODE,
    which would make the no-__pycache__ checks pass for the wrong reason)."""
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    monkeypatch.setattr(sys, "dont_write_bytecode", False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_tiny_project(tmp_path_factory.mktemp("tiny") / "proj")
    shutil.rmtree(root / "__pycache__", ignore_errors=True)  # written by the fixture's own import
    return root


@pytest.fixture
def jm():
    m = JobManager()
    yield m
    m.reset()


def _variant(tiny: Path, tmp_path: Path, model_py: str) -> Path:
    root = tmp_path / "bad"
    shutil.copytree(tiny, root, ignore=shutil.ignore_patterns("runs"))
    (root / "model.py").write_text(model_py)
    return root


def _score(jm, root, method="loss", label=None):
    return jm.submit_child("score", "diffin_core.run.scoring:score", (str(root), method),
                           label=label or method, project_dir=root)


def _no_children():
    end = time.time() + 10
    while multiprocessing.active_children():
        assert time.time() < end, f"child processes left: {multiprocessing.active_children()}"
        time.sleep(0.05)


def _until(cond, timeout=60.0):
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "condition not reached in time"
        time.sleep(0.02)


def test_scoring_job_in_child_succeeds_with_progress(jm, tiny, tmp_path):
    root = tmp_path / "good"
    shutil.copytree(tiny, root)
    seen = []
    out = usercode.run("diffin_core.run.scoring:score", str(root), "diffin", features=False,  # no feature store: faster
                       progress=lambda d, t, m: seen.append((d, t, m)))
    assert Path(out) == root / "runs" / "diffin-1" and (Path(out) / "scores.parquet").is_file()
    phase = [m for d, t, m in seen if d == 0 and "checkpoint" in m]
    assert len(phase) >= 2, seen  # the query phase reports each checkpoint from the child
    assert seen[-1][0] == seen[-1][1] == 96  # and the items phase ends at N
    jid = _score(jm, root)
    info = jm.wait(jid, 120)
    assert info.status == "done" and Path(info.result) == root / "runs" / "loss-1", info.error
    assert info.fraction == 1.0 and info.total == 96
    assert not list(root.rglob("__pycache__")), "importing model.py wrote bytecode into the project"
    _no_children()


def test_never_returning_model_is_cancelled_and_the_queue_moves_on(jm, tiny, tmp_path):
    hang = _variant(tiny, tmp_path, HANGS)
    good = tmp_path / "other-project"
    shutil.copytree(tiny, good)
    stuck = _score(jm, hang, label="hangs")
    after = _score(jm, good, label="other project")  # queued behind the stuck job
    _until(lambda: jm.get(stuck).status == "running")
    time.sleep(4)  # the child has imported torch and sits in model.py's loop
    assert jm.get(stuck).status == "running" and jm.get(after).status == "queued"
    t0 = time.time()
    assert jm.cancel(stuck)
    assert jm.wait(stuck, 5).status == "cancelled"
    assert time.time() - t0 < 3
    info = jm.wait(after, 120)
    assert info.status == "done", info.error
    assert (good / "runs" / "loss-1" / "scores.parquet").is_file()
    assert not (hang / "runs" / "loss-1").exists()
    _no_children()


@pytest.mark.parametrize("model_py, expect", [
    (EXITS, ["crashed (exit code 3)", "model.py: no GPU driver found"]),
    (RAISES, ["build() raised ValueError: weights file missing", "model.py"]),
    (SEGFAULTS, ["crashed (killed by signal SIGSEGV)", "Fatal Python error: Segmentation fault"]),
])
def test_crash_fails_only_its_job(jm, tiny, tmp_path, model_py, expect):
    bad = _variant(tiny, tmp_path, model_py)
    jid = _score(jm, bad, label="crashes")
    info = jm.wait(jid, 120)
    assert info.status == "failed"
    for part in expect:
        assert part in info.error, info.error
    assert "\n" not in info.error and "Traceback" not in info.error
    nxt = jm.wait(jm.submit("next", lambda p: "served"), 10)  # this process and its worker still serve
    assert nxt.status == "done" and nxt.result == "served"
    _no_children()


def test_setup_model_check_has_a_time_limit(tmp_path):
    folder = tmp_path / "ws" / "new-project"
    folder.mkdir(parents=True)
    t0 = time.time()
    with pytest.raises(DiffinError, match=r"^model.py: the model check did not finish within 4 s and was stopped$"):
        usercode.store_upload(folder, "model", "model.py", io.BytesIO(HANGS.encode()), timeout=4)
    assert time.time() - t0 < 12
    assert not (folder / "model.py").exists()
    with pytest.raises(DiffinError, match=r"^model.py: the model check crashed \(exit code 3\): model.py: no GPU driver found$"):
        usercode.store_upload(folder, "model", "model.py", io.BytesIO(EXITS.encode()), timeout=60)
    msg = usercode.store_upload(folder, "model", "model.py", io.BytesIO(MODEL_PY.encode()), timeout=60)
    assert msg.startswith("model.py: model OK (MLP")
    assert (folder / "model.py").read_text() == MODEL_PY
    assert not list(folder.parent.rglob("__pycache__")) and not list(folder.parent.glob(".diffin-upload-*"))
    _no_children()


def test_project_check_in_child(tiny, tmp_path):
    assert usercode.check_project(tiny) == []
    hang = _variant(tiny, tmp_path, HANGS)
    problems = usercode.check_project(hang, timeout=4)
    assert len(problems) == 1 and "did not finish within 4 s" in problems[0]
    assert not list(tiny.rglob("__pycache__"))


def test_in_process_import_writes_no_bytecode(tiny, tmp_path):
    import importlib.util
    from diffin_core.project.folder import Project
    control = tmp_path / "control"
    control.mkdir()
    (control / "model.py").write_text(MODEL_PY)
    spec = importlib.util.spec_from_file_location("control_model", control / "model.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert list(control.glob("__pycache__/*.pyc"))  # a plain import does write bytecode here
    model = Project(tiny).build_model()
    assert type(model).__name__ == "MLP"
    assert not list(tiny.rglob("__pycache__"))


def test_last_error_line():
    log = ("Fatal Python error: Segmentation fault\n\nCurrent thread 0x00007f (most recent call first):\n"
           "  File \"model.py\", line 5 in build\n\nExtension modules: numpy (total: 1)\n")
    assert usercode.last_error_line(log) == "Fatal Python error: Segmentation fault"
    tb = "Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'w'\n"
    assert usercode.last_error_line(tb) == "KeyError: 'w'"
    assert usercode.last_error_line("") == ""


def test_child_does_not_rerun_the_main_script(tmp_path, monkeypatch):
    """In a Streamlit server ``__main__`` is app.py: a spawned child must not run it again."""
    import sys
    import types
    marker = tmp_path / "ran"
    script = tmp_path / "app_like.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    fake = types.ModuleType("__main__")
    fake.__file__ = str(script)
    fake.__spec__ = None
    monkeypatch.setitem(sys.modules, "__main__", fake)
    pid = usercode.run("os:getpid")
    assert isinstance(pid, int) and not marker.exists()


def test_setup_page_model_that_never_returns_times_out(tmp_path, monkeypatch):
    """AppTest: Setup's model check stops a hanging model.py and says so; the app keeps serving."""
    from app_fixtures import job_manager, new_app
    monkeypatch.setenv("DIFFIN_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setattr(usercode, "MODEL_TIMEOUT_S", 4.0)
    job_manager().reset()
    at = new_app(page="pages/1_Setup.py")
    at.text_input(key="setup_name").set_value("hangs").run()
    t0 = time.time()
    at.file_uploader(key="setup_model").set_value(("model.py", HANGS.encode(), "text/x-python")).run()
    assert time.time() - t0 < 30
    assert [e.value for e in at.error] == ["model.py: the model check did not finish within 4 s and was stopped"]
    assert not (tmp_path / "ws" / "hangs" / "model.py").exists()
    monkeypatch.setattr(usercode, "MODEL_TIMEOUT_S", 120.0)  # a child's start alone can take 4 s here
    at.file_uploader(key="setup_model").set_value(("model_v2.py", EXITS.encode(), "text/x-python")).run()
    assert [e.value for e in at.error] == [
        "model_v2.py: the model check crashed (exit code 3): model.py: no GPU driver found"]
    home = new_app()  # this process (the server) is alive and serves a new session
    assert not home.exception and home.title[0].value.startswith("diffin:")
    _no_children()
