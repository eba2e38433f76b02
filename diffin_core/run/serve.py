"""`diffin serve PROJECT --run R`: a run's query worker kept warm for `diffin top` (issue 23).

A new query in a fresh `diffin top` pays Python's start, torch's import (about 1.5 s of CPU) and
loading the run's context (model, checkpoints, data, store, the Hessian batches' kept gradients)
before its plan. The app keeps these in a warm child; this is the same for the command line: while
`diffin serve` runs, `diffin top` on that run (a new query, the default shortlist, no budget
options) sends the query over a local socket, the server answers it with features.fast_answer
(the very answer `diffin top` computes in process: the query's exact plan, its certified rows) and
keeps it with the run, and `diffin top` prints the kept answer without importing torch. Without a
server, or when it cannot answer, `diffin top` answers in process as before.

The socket lives in a folder only this user can open (``$XDG_RUNTIME_DIR`` or the temp folder,
``diffin-<uid>``, mode 0700), named by a digest of the run's resolved folder. One query at a
time; the server reloads its context when the run is rescored, its store rebuilt or the model
changed (features.warm_key), and exits after ``idle`` seconds without a query.

This module imports the standard library only until the server starts.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path

IDLE_S = 1800.0


def socket_path(project_dir, run: str) -> Path:
    run_dir = (Path(project_dir) / "runs" / run).resolve()
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"diffin-{os.getuid()}"
    return base / (hashlib.sha1(str(run_dir).encode()).hexdigest()[:20] + ".sock")


def ask(project_dir, run: str, query_indices, k: int, timeout: float = 3600.0) -> str | None:
    """Have the run's server answer these queries (kept with the run). Returns None when no server
    answers (none running, a stale socket, a refused connection): the caller answers in process;
    'ok' when the answer is kept; else the server's one-line error."""
    if os.environ.get("DIFFIN_SERVE", "1").strip() in ("0", "no", "off", "false"):
        return None                                   # asked not to (benchmarks/explore_click.py)
    path = socket_path(project_dir, run)
    if not path.exists():
        return None
    req = json.dumps({"q": sorted(set(int(i) for i in query_indices)), "k": int(k)}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(req)
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    return None                       # the server went away: answer here
                reply += chunk
    except OSError:
        return None
    try:
        out = json.loads(reply)
    except ValueError:
        return None
    if out.get("ok"):
        return "ok"
    return out.get("error") or None


def serve(project_dir, run: str, idle: float = IDLE_S, echo=print) -> None:
    """Answer `diffin top`'s queries on ``run`` until ``idle`` seconds pass without one."""
    from diffin_core.errors import DiffinError
    from diffin_core.project.folder import Project
    from diffin_core.run import features as F
    project = Project(project_dir)
    info = project.run(run)
    if not (info.path / "features" / "meta.json").is_file():
        raise DiffinError(f"run {run!r} has no feature store (diffin features PROJECT --run {run} builds it): "
                          "diffin top answers it in process", info.path)
    state = {}

    def warm():
        state["key"] = F.warm_key(project, run)
        ctx = F._context(project, run)                # model, checkpoints, data, kept gradients
        F.with_twin(ctx)                              # a second core for its plans (engine/twin.py)
        F.FeatureStore.open(project, run)
    warm()
    path = socket_path(project_dir, run)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        if path.exists():
            try:                                      # another server already answers: leave it
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.connect(str(path))
                raise DiffinError(f"a server already answers run {run!r} ({path})", info.path)
            except OSError:
                path.unlink()                         # a stale socket
        try:
            srv.bind(str(path))
        except OSError as e:                          # another server bound it first
            raise DiffinError(f"cannot serve run {run!r} at {path}: {e.strerror or e}", info.path)
        mine = path.stat().st_ino
        srv.listen(8)
        srv.settimeout(idle)
        echo(f"serving run {run!r} of {project.root} for diffin top (socket {path}); "
             f"stops after {idle:g} s without a query or on Ctrl-C")
        try:
            while True:
                try:
                    conn, _ = srv.accept()
                except socket.timeout:
                    echo(f"no query for {idle:g} s: stopped")
                    return
                with conn:
                    _answer(conn, project, run, state, warm, F)
        finally:
            try:
                if path.stat().st_ino == mine:        # never another server's socket
                    path.unlink()
            except OSError:
                pass


def _answer(conn, project, run: str, state: dict, warm, F) -> None:
    from diffin_core.errors import DiffinError
    data = b""
    conn.settimeout(30)
    try:
        while not data.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        req = json.loads(data)
        q, k = [int(i) for i in req["q"]], int(req.get("k", 10))
    except (OSError, ValueError, KeyError, TypeError):
        return
    t = time.perf_counter()
    try:
        if F.warm_key(project, run) != state.get("key"):
            warm()                                    # rescored, new store or model: load again
        ans = F.fast_answer(project, run, q, k=k)
        reply = {"ok": bool(ans is not None and ans.covers(k))}
        if not reply["ok"]:
            reply["error"] = ""                       # not certified this deep: diffin top takes the exact path
    except DiffinError as e:
        reply = {"ok": False, "error": str(e)}
    except Exception as e:                            # a server bug must not stop the CLI: it answers in process
        reply = {"ok": False, "error": "", "bug": repr(e)}
    reply["seconds"] = round(time.perf_counter() - t, 4)
    try:
        conn.sendall(json.dumps(reply).encode() + b"\n")
    except OSError:
        pass                                          # the client left (Ctrl-C): the answer is kept anyway
