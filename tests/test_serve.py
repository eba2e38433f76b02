"""Issue 23: `diffin serve` keeps a run's query worker warm; `diffin top` asks it a new query and
prints the kept answer, the same rows and values as answering in process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from diffin_core import cli
from diffin_core.errors import DiffinError
from diffin_core.project.folder import Project
from diffin_core.run import serve
from diffin_core.run.scoring import score, top_k

from helpers import make_tiny_project

ROOT = Path(__file__).resolve().parent.parent


def test_top_asks_the_runs_server_and_prints_its_kept_answer(tmp_path, capsys, monkeypatch):
    project = Project(make_tiny_project(tmp_path / "p"))
    score(project, "diffin", run="d")
    score(project, "diffin", run="n", features=False)
    root = str(project.root)
    with pytest.raises(DiffinError, match="no feature store"):
        serve.serve(root, "n", idle=1)
    cli.main(["top", root, "--run", "d", "-q", "4", "--k", "3"])       # in process (keeps the columns)
    capsys.readouterr()
    assert serve.ask(root, "d", [5], 3) is None                         # no server: answered here
    proc = subprocess.Popen([sys.executable, "-m", "diffin_core.cli", "serve", root, "--run", "d", "--idle", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            # Ctrl-C as a terminal delivers it: a suite started in the background
                            # (`pytest &`) has SIGINT ignored, and its children would inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline().startswith("serving run 'd'")
        sock = serve.socket_path(root, "d")
        assert sock.exists() and (sock.parent.stat().st_mode & 0o777) == 0o700
        monkeypatch.setattr(cli, "_print_fast", lambda *a, **k: pytest.fail("answered in process"))
        cli.main(["top", root, "--run", "d", "-q", "5", "--k", "3"])
        out = capsys.readouterr().out
        assert out.startswith("(exact path: this query's own plan") and "answered before" not in out
        with pytest.raises(SystemExit) as exc:                          # the server's one-line error
            cli.main(["top", root, "--run", "d", "-q", "300", "--k", "3"])
        assert exc.value.code == 2 and "query index out of range" in capsys.readouterr().err
        monkeypatch.setenv("DIFFIN_SERVE", "0")
        assert serve.ask(root, "d", [6], 3) is None
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert not serve.socket_path(root, "d").exists()
    monkeypatch.undo()
    helpful, harmful = top_k(project, "d", [5], k=3, exact=True)
    shown = [ln.split() for ln in out.splitlines() if ln.split() and ln.split()[0].isdigit()]
    assert [int(r[0]) for r in shown] == list(helpful["sample_id"]) + list(harmful["sample_id"])
    assert [float(r[4]) for r in shown] == [float(f"{v:.4g}") for v in list(helpful["influence"]) + list(harmful["influence"])]
