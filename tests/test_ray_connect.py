"""diffin score --ray when no cluster answers (issue 20): nothing listening, a port that accepts
and never answers, a local instance that cannot start, and Ctrl-C while connecting. Each is one
line (exit 2, or 130 for Ctrl-C) within the time limit; no real cluster is needed."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="ray is not installed (pip install ray): the --ray path is untested")


from helpers import make_tiny_project, run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    return make_tiny_project(tmp_path_factory.mktemp("rayc") / "p")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]            # closed again: nothing listens there now


@pytest.fixture
def silent_port():
    """A port that completes TCP handshakes (the kernel's backlog) and never says a word."""
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    s.listen(64)
    yield s.getsockname()[1]
    s.close()


def _spawn(args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    # a test run started in the background (`pytest &` in a non-interactive shell) ignores SIGINT,
    # and a child inherits that: Python then installs no KeyboardInterrupt handler and the Ctrl-C
    # test's SIGINT is dropped (a 30 s timeout). Restore the default, as a terminal's Ctrl-C finds it.
    return subprocess.Popen([sys.executable, "-m", "diffin_core.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def test_nothing_listening_is_one_line_at_once(proj, capsys):
    port = _closed_port()
    t0 = time.monotonic()
    code, out, err = run_cli(["score", proj, "-m", "tracin", "--ray", f"127.0.0.1:{port}"], capsys)
    assert code == 2, (code, out, err)
    assert time.monotonic() - t0 < 30
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in out + err, err
    assert lines[0] == (f"error: cannot reach the Ray cluster at 127.0.0.1:{port}: nothing listens there "
                        "(Connection refused); start it with `ray start --head` or check the address"), lines[0]
    assert not (proj / "runs" / ".stages").exists() or not any((proj / "runs" / ".stages").iterdir())


@pytest.mark.parametrize("args,message", [
    (["--ray", "nowhere"], r"--ray 'nowhere' is not an address like HOST:6379"),
    (["--ray", "127.0.0.1:1", "--ray-timeout", "0"], r"--ray-timeout must be a positive number of seconds, not 0"),
])
def test_a_bad_address_or_timeout_is_one_line(proj, capsys, args, message):
    import re
    code, out, err = run_cli(["score", proj, "-m", "tracin", *args], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and re.search(message, lines[0]), err


def test_a_cluster_that_never_answers_times_out_in_one_line(proj, silent_port):
    t0 = time.monotonic()
    p = _spawn(["score", proj, "-m", "tracin", "--ray", f"127.0.0.1:{silent_port}", "--ray-timeout", "4"])
    try:
        out, err = p.communicate(timeout=240)
    finally:
        p.kill()
    took = time.monotonic() - t0
    assert p.returncode == 2, (p.returncode, err)
    assert "Traceback" not in out + err
    errors = _error_lines(err)
    assert errors == [f"error: the Ray cluster at 127.0.0.1:{silent_port} did not answer within 4 s "
                      "(--ray-timeout or DIFFIN_RAY_TIMEOUT sets the limit)"], err
    assert "SIGTERM handler" not in err      # Ray's warning about the connecting thread is filtered
    assert took < 120, took                  # was: over 10 minutes (imports take most of this under load)


def test_ctrl_c_while_connecting_is_prompt(proj, silent_port):
    p = _spawn(["score", proj, "-m", "tracin", "--ray", f"127.0.0.1:{silent_port}", "--ray-timeout", "600"])
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not any("Connecting to existing Ray cluster" in ln for ln in lines):
        if p.poll() is not None:
            break
        time.sleep(0.2)
    assert p.poll() is None, "".join(lines)
    time.sleep(1.0)                          # inside ray.init now
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=30)
    finally:
        p.kill()
    took = time.monotonic() - t0
    reader.join(5)
    assert p.returncode == 130, (p.returncode, "".join(lines))
    assert "error: interrupted (Ctrl-C)" in "".join(lines) and "Traceback" not in "".join(lines)
    assert took < 5, took                    # was: about 30 s (then seconds and SIGABRT in Ray's teardown)


def test_a_local_instance_that_cannot_start_is_one_line(proj, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    p = _spawn(["score", proj, "-m", "tracin", "--ray"], {"RAY_TMPDIR": str(not_a_dir)})
    try:
        out, err = p.communicate(timeout=240)
    finally:
        p.kill()
    assert p.returncode == 2, (p.returncode, err)
    assert "Traceback" not in out + err
    assert _error_lines(err) == [f"error: {not_a_dir / 'ray'}: cannot start a local Ray instance: Not a directory "
                                 "(RAY_TMPDIR must be a writable folder)"], err
