"""usercode.run(..., warm=KEY): the app's warm child for a run's queries (issue 23: no start-up per
query). Calls with one key run in one kept process; a cancel asks the call to stop and keeps the
child; a crash, a time limit or a cancel ignored past the grace retires it; other keys get their own."""
from __future__ import annotations

import threading
import time

import pytest

from diffin_core.errors import DiffinError, JobCancelled
from diffin_core.workspace import usercode


@pytest.fixture(autouse=True)
def _close():
    usercode.close_warm()                   # none left by other tests in this process
    yield
    usercode.close_warm()


def test_calls_with_one_key_share_a_kept_child():
    a = usercode.run("warm_targets:pid", warm="k1")
    assert usercode.run("warm_targets:pid", warm="k1") == a
    assert usercode.warm_pids() == {"k1": a}
    assert usercode.run("warm_targets:pid") != a                   # without a key: a child of its own
    assert usercode.run("warm_targets:pid", warm="k2") not in (a, None)
    assert set(usercode.warm_pids()) == {"k1", "k2"}
    with pytest.raises(DiffinError, match="no such query"):         # an input error keeps the child
        usercode.run("warm_targets:refuse", warm="k1")
    assert usercode.run("warm_targets:pid", warm="k1") == a


def test_a_cancelled_call_stops_and_the_child_stays():
    a = usercode.run("warm_targets:pid", warm="k")
    flag = threading.Event()
    threading.Timer(0.5, flag.set).start()
    t = time.monotonic()
    with pytest.raises(JobCancelled):
        usercode.run("warm_targets:until_cancelled", 60.0, warm="k", cancelled=flag.is_set)
    assert time.monotonic() - t < 10
    assert usercode.run("warm_targets:pid", warm="k") == a


def test_crash_time_limit_and_ignored_cancel_retire_the_child(monkeypatch):
    a = usercode.run("warm_targets:pid", warm="k")
    with pytest.raises(usercode.ChildFailed, match="crashed"):
        usercode.run("warm_targets:die", warm="k")
    b = usercode.run("warm_targets:pid", warm="k")
    assert b != a
    with pytest.raises(usercode.ChildFailed, match="within 1 s"):
        usercode.run("warm_targets:ignores_cancel", 30.0, warm="k", timeout=1.0)
    c = usercode.run("warm_targets:pid", warm="k")
    assert c not in (a, b)
    monkeypatch.setattr(usercode, "CANCEL_GRACE_S", 0.5)
    flag = threading.Event()
    threading.Timer(0.3, flag.set).start()
    with pytest.raises(JobCancelled):
        usercode.run("warm_targets:ignores_cancel", 30.0, warm="k", cancelled=flag.is_set)
    assert usercode.run("warm_targets:pid", warm="k") not in (a, b, c)


def test_the_runs_warm_child_answers_queries_as_the_exact_path(tmp_path):
    """The Explore page's jobs (scoring.rescore_for, scoring.answer_ahead) in the run's warm child: one
    process for every query of the run, each answer's top-k values those of `diffin top --exact`."""
    import numpy as np
    from diffin_core.project.folder import Project
    from diffin_core.run import answers, features as F
    from diffin_core.run.scoring import score, top_k
    from helpers import make_tiny_project
    project = Project(make_tiny_project(tmp_path / "p"))
    score(project, "diffin", run="d")
    key = F.warm_key(project, "d")
    usercode.run("diffin_core.run.scoring:rescore_for", str(project.root), "d", [3], warm=key)
    pid = usercode.warm_pids()[key]
    assert usercode.run("diffin_core.run.scoring:answer_ahead", str(project.root), "d", [4, 5], warm=key) == 2
    assert usercode.warm_pids()[key] == pid
    run_dir = project.run("d").path
    assert (run_dir / answers.DIRNAME / F.BaseGrads.NAME).is_file()
    for qi in (3, 4, 5):
        ans = answers.load(run_dir, [qi])
        assert ans is not None and ans.covers(10)
        eh, em = top_k(project, "d", [qi], k=5, exact=True)
        for table, sign in ((eh, 1), (em, -1)):
            got = np.argsort(-sign * ans.influence, kind="stable")[:5]
            rows = {int(s): i for i, s in enumerate(project.train.ids)}
            want = [rows[int(s)] for s in table["sample_id"]]
            assert list(got) == want
            np.testing.assert_allclose(ans.influence[got], table["influence"], rtol=1e-6, atol=0)
    # a rescored run (its meta.json rewritten) gets a new key, so a fresh child
    meta = run_dir / "meta.json"
    meta.write_text(meta.read_text())
    import os
    os.utime(meta, ns=(meta.stat().st_atime_ns, meta.stat().st_mtime_ns + 10**9))
    assert F.warm_key(project, "d") != key
