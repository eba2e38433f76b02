"""Threads that fit the machine (threads.py): the rule as a pure function of CPUs, load and
environment; what it writes for child processes; that a spawned child and a run's meta.json
get it."""
import json

import pytest

from diffin_core.engine import threads
from diffin_core.errors import DiffinError
from tests.helpers import make_tiny_project


@pytest.mark.parametrize("cpus,load,expected", [
    (2, 0.0, 2), (2, 0.3, 2), (2, 0.6, 1), (2, 1.4, 1), (2, 8.0, 1), (2, 13.0, 1),
    (16, 0.0, 16), (16, 3.6, 12), (16, 40.0, 1), (1, 0.0, 1), (4, -1.0, 4)])
def test_auto_count_is_the_cpus_the_load_leaves(cpus, load, expected):
    assert threads.choose(cpus, load, {}) == (expected, "auto")


def test_explicit_choices_win_in_order():
    env = {"DIFFIN_THREADS": "3", "OMP_NUM_THREADS": "5"}
    assert threads.choose(2, 9.0, env, requested=4) == (4, "--threads")
    assert threads.choose(2, 9.0, env) == (3, "DIFFIN_THREADS")          # beats the machine's load
    assert threads.choose(2, 9.0, {"OMP_NUM_THREADS": "5"}) == (5, "OMP_NUM_THREADS")
    assert threads.choose(2, 0.0, {"DIFFIN_THREADS": "auto", "OMP_NUM_THREADS": "1"}) == (1, "OMP_NUM_THREADS")
    assert threads.choose(2, 0.0, {"DIFFIN_THREADS": ""}, requested="auto") == (2, "auto")


def test_the_count_diffin_wrote_is_not_taken_for_the_users():
    # a child sees OMP_NUM_THREADS=2 written by its parent's automatic choice: it recomputes
    env = {"OMP_NUM_THREADS": "2", "DIFFIN_THREADS_AUTO": "2"}
    assert threads.choose(2, 9.0, env) == (1, "auto")
    env = {"OMP_NUM_THREADS": "2", "DIFFIN_THREADS_AUTO": "1"}         # the user changed it since
    assert threads.choose(2, 9.0, env) == (2, "OMP_NUM_THREADS")


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
def test_bad_values_are_one_line_errors(bad):
    with pytest.raises(DiffinError, match="DIFFIN_THREADS"):
        threads.choose(2, 0.0, {"DIFFIN_THREADS": bad})
    with pytest.raises(DiffinError, match="--threads"):
        threads.choose(2, 0.0, {}, requested=bad)
    assert threads.choose(2, 0.0, {"DIFFIN_THREADS": bad}, strict=False) == (2, "auto")


def test_configure_writes_the_policy_for_children(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(threads, "current_load", lambda: 9.0)
    env = {}
    rec = threads.configure(environ=env)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OMP_NUM_THREADS"] == "1" == env["DIFFIN_THREADS_AUTO"]
    assert rec["threads"] == 1 and rec["source"] == "auto" and rec["load_1min"] == 9.0 and rec["cpus"] == 2
    env = {"OMP_WAIT_POLICY": "ACTIVE"}                       # the user's own policy is kept
    rec = threads.configure(3, environ=env)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE" and env["DIFFIN_THREADS"] == "3" == env["OMP_NUM_THREADS"]
    assert "DIFFIN_THREADS_AUTO" not in env and rec["source"] == "--threads"
    env = {"OMP_NUM_THREADS": "1"}                            # the user's count is not rewritten
    assert threads.configure(environ=env)["source"] == "OMP_NUM_THREADS" and env["OMP_NUM_THREADS"] == "1"


def test_cgroup_quota_caps_the_cpus(monkeypatch):
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 1.5)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert threads.usable_cpus() == 2


def test_a_spawned_child_gets_the_policy_and_the_count(monkeypatch):
    from diffin_core.workspace import usercode
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setenv("DIFFIN_THREADS", "2")
    rep = usercode.run("diffin_core.engine.threads:report", timeout=120, what="thread check")
    assert rep["env_wait_policy"] == "PASSIVE"                # set in the child before torch loaded
    assert rep["torch_threads"] == 2 and rep["source"] == "DIFFIN_THREADS"
    # an automatic count written by a parent is recomputed from the child's own CPUs and load
    monkeypatch.delenv("DIFFIN_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setenv("DIFFIN_THREADS_AUTO", "7")
    rep = usercode.run("diffin_core.engine.threads:report", timeout=120, what="thread check")
    assert rep["source"] == "auto" and 1 <= rep["torch_threads"] <= rep["cpus"]


def test_a_run_records_its_threads(tmp_path):
    from diffin_core.run.scoring import score
    root = make_tiny_project(tmp_path / "p")
    run = score(root, "loss", features=False)
    rec = json.loads((run / "meta.json").read_text())["threads"]
    assert rec["threads"] >= 1 and rec["source"] in ("auto", "DIFFIN_THREADS", "OMP_NUM_THREADS", "--threads")
    assert rec["torch_threads"] >= 1 and rec["cpus"] >= 1 and "load_1min" in rec


@pytest.mark.parametrize("cpus,load,own,expected", [
    (2, 2.0, 2, 2),      # only our two threads are busy: keep both
    (2, 4.0, 2, 1),      # two others appeared beside our two: one
    (2, 2.0, 1, 1),      # one other beside our one: stay at one
    (2, 1.0, 1, 2),      # the others left: back to two
    (16, 9.0, 8, 15)])
def test_a_running_walk_follows_the_load_without_counting_itself(cpus, load, own, expected):
    assert threads.readjusted(cpus, load, own) == expected


def test_adapt_changes_only_an_automatic_count(monkeypatch):
    import torch
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
        monkeypatch.setattr(threads, "current_load", lambda: 0.0)
        threads.configure(environ={})
        torch.set_num_threads(1)
        assert threads.adapt() == 2 and torch.get_num_threads() == 2 and threads.record()["readjusted"] == 1
        monkeypatch.setattr(threads, "current_load", lambda: 6.0)
        assert threads.adapt() == 1 and torch.get_num_threads() == 1
        threads.configure(2, environ={})                      # --threads 2: never changed
        assert threads.adapt() is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        threads.configure(environ={"OMP_NUM_THREADS": str(before)})
