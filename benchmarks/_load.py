"""The speed benchmarks' shared runner (threads.py, score_parts.py, first_run.py): CPU burners
for the "loaded" condition, a frozen copy of the scored code, and one case in a fresh process
with its wall time, CPU seconds and the load average around it.

Light on purpose (no torch, no diffin_core): the driver only starts processes.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BURNER = "while True: pass"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "DIFFIN_THREADS", "DIFFIN_THREADS_AUTO")


def load() -> float:
    """The 1-minute load average, rounded (the CSVs record it beside every timing)."""
    return round(os.getloadavg()[0], 2)


@contextlib.contextmanager
def burners(count: int = 2, warmup: float = 45.0):
    """``count`` busy processes (``while True: pass``) running inside the block; the first
    ``warmup`` seconds let the load average see them. Stopped on leaving, whatever happens."""
    procs = []
    try:
        procs = [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(int(count))]
        if procs:
            time.sleep(warmup)
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def frozen_code(tmp: Path) -> Path:
    """A copy of diffin_core under ``tmp``/code: every case imports the same code, whatever
    changes in the worktree meanwhile. Returns the folder to put first on PYTHONPATH."""
    code = Path(tmp) / "code"
    shutil.copytree(ROOT / "diffin_core", code / "diffin_core", ignore=shutil.ignore_patterns("__pycache__"))
    return code


def code_env(code: Path, clean_threads: bool = False) -> dict:
    """The environment of a case: ``code`` first on PYTHONPATH; ``clean_threads`` drops every
    thread setting (OMP_NUM_THREADS, DIFFIN_THREADS, ...) so the case picks its own."""
    env = {k: v for k, v in os.environ.items() if not (clean_threads and k in THREAD_VARS)}
    env["PYTHONPATH"] = str(code) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_case(args: list, env: dict, timeout: float | None = None, stdout=subprocess.PIPE) -> dict:
    """Run ``args`` in a fresh process; stopped (killed) past ``timeout`` seconds. Returns
    finished, returncode, stdout, stderr, wall_s, cpu_s (the child's CPU seconds), load_start,
    load_end."""
    load0 = load()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        finished = proc.returncode == 0
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        finished = False
    finally:
        if proc.poll() is None:            # stopped from outside (SIGTERM): no orphan left behind
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"finished": finished, "returncode": proc.returncode, "stdout": out or "", "stderr": err or "",
            "wall_s": round(wall, 1),
            "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
            "load_start": load0, "load_end": load()}


def result_line(stdout: str) -> dict | None:
    """The ``RESULT {json}`` line a ``--one`` child prints, or None."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else None
