"""Scoring on a Ray cluster: ``diffin score PROJECT --ray [ADDRESS]``.

The training set is sharded over Ray tasks; the query side is computed once:

1. plan    one task opens the project, builds the scoring context on the full training split
           and runs the method's query-side ``prepare`` (query gradients, Ritz views...). The
           plan, moved to the CPU, stays in Ray's object store; only its reference travels.
2. shards  one task per row range [a, b) (multiples of ``batch_size``, about four per slot):
           it reads only those rows (``Split.iter_chunks``; streamed sources read nothing
           else) and scores them with the engine's ``runner.score_rows``, in chunks of the
           engine's memory plan (``runner.memory_plan``). Tasks take one GPU
           each when the cluster has GPUs (``device = "auto"`` then picks cuda inside the
           task), else one CPU. A worker process keeps its context and the fetched plan
           between tasks (``Scorer``), so the checkpoints are loaded once per worker, as an
           actor would, while Ray still balances shards over whichever workers are free.
3. driver  saves each shard's scores as it arrives in the run's resumable stages
           (``runs/.stages/``, as a local run's row ranges; the plan task saves the plan there
           too), so a killed run resumes with only the missing shards; then concatenates the
           shards in row order, applies the method's ``label_issue`` to the
           whole set, and writes ``runs/<run>/scores.parquet`` + ``meta.json`` through
           ``scoring.write_run``, as a local run does (meta adds ``"ray": {"address", "shards",
           "slots", "gpus"}``). A method whose ``run`` post-processes the pass (diffin's
           early-stopped label_issue, training dynamics, cleanlab-cv) still does so, on the
           driver: its ``run`` is called on a class whose base run returns the gathered shards.

Every node must see the project folder at the same absolute path (NFS or similar) and have
diffin (and the project's Python dependencies) installed. ``address``: None starts (or reuses)
a local Ray instance; ``"auto"`` joins the cluster this machine belongs to (``ray start``);
``"ray://host:10001"`` or ``"host:6379"`` a remote one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

from diffin_core.errors import DiffinError
from diffin_core.methods import METHODS, Attributor, ScoreSettings


def _ray():
    try:
        import ray
    except ImportError:
        raise DiffinError("--ray needs Ray: pip install ray") from None
    return ray


DEFAULT_TIMEOUT_S = 60.0


def ray_timeout(value: float | str | None = None) -> float:
    """Seconds to reach a Ray cluster: ``value``, else ``DIFFIN_RAY_TIMEOUT``, else 60."""
    raw = value if value is not None else os.environ.get("DIFFIN_RAY_TIMEOUT") or DEFAULT_TIMEOUT_S
    try:
        out = float(raw)
    except (TypeError, ValueError):
        out = float("nan")
    if not out > 0 or out == float("inf"):
        src = "--ray-timeout" if value is not None else "DIFFIN_RAY_TIMEOUT"
        raise DiffinError(f"{src} must be a positive number of seconds, not {raw!r}")
    return out


def _host_port(address: str) -> tuple[str, int]:
    rest = address.split("://", 1)[1] if "://" in address else address
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise DiffinError(f"--ray {address!r} is not an address like HOST:6379, ray://HOST:10001 or auto")
    return host.strip("[]"), int(port)


def _probe(address: str, timeout: float) -> None:
    """One TCP connection to the cluster's port, so that nothing listening is said at once
    (Ray itself retries for many minutes)."""
    import socket
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=min(timeout, 10.0)).close()
    except socket.timeout:
        raise DiffinError(f"the Ray cluster at {address} did not answer within {min(timeout, 10.0):g} s "
                          "(is the address right and the port open?)") from None
    except socket.gaierror as e:
        raise DiffinError(f"cannot reach the Ray cluster at {address}: unknown host {host!r} ({e.strerror})") from None
    except OSError as e:
        raise DiffinError(f"cannot reach the Ray cluster at {address}: nothing listens there "
                          f"({e.strerror or type(e).__name__}); start it with `ray start --head` "
                          "or check the address") from None


_ABANDONED = threading.Event()   # a ray.init thread was left behind (timeout or Ctrl-C)


def init_abandoned() -> bool:
    """True once ``connect`` left a ``ray.init`` thread behind: the process should then end
    with ``os._exit`` (Ray's teardown at interpreter exit can hang or abort with SIGABRT)."""
    return _ABANDONED.is_set()


def connect(ray, address: str | None, timeout: float | None = None) -> None:
    """``ray.init`` within ``timeout`` seconds, or one line: the port is probed first, then
    ``ray.init`` runs in a daemon thread while this one waits in short joins (Ctrl-C stops it at
    once; after a timeout the thread is left behind, the caller exits). A local instance that
    cannot start (e.g. ``RAY_TMPDIR`` not a folder) is one line too."""
    timeout = ray_timeout(timeout)
    where = address or "a new local instance"
    if address and address != "auto":
        _probe(address, timeout)
    box: dict = {}

    def init():
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        except BaseException as e:       # handed to the waiting thread
            box["error"] = e
    thread = threading.Thread(target=init, name="diffin-ray-init", daemon=True)
    deadline = time.monotonic() + timeout
    import logging                       # Ray warns that a thread other than the main one sets no SIGTERM handler
    logging.getLogger("ray._private.worker").addFilter(lambda r: "SIGTERM handler" not in r.getMessage())
    thread.start()
    try:
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(min(0.2, max(0.0, deadline - time.monotonic())))
    except BaseException:                # Ctrl-C: the thread is left inside ray.init
        _ABANDONED.set()
        raise
    if thread.is_alive():
        _ABANDONED.set()
        raise DiffinError(f"the Ray cluster at {where} did not answer within {timeout:g} s "
                          "(--ray-timeout or DIFFIN_RAY_TIMEOUT sets the limit)")
    e = box.get("error")
    if e is not None:
        what = f"reach the Ray cluster at {address}" if address else "start a local Ray instance"
        if isinstance(e, OSError) and e.filename and not address:     # e.g. RAY_TMPDIR is a file
            raise DiffinError(f"cannot {what}: {e.strerror} (RAY_TMPDIR must be a writable folder)",
                              e.filename) from None
        text = " ".join(str(e).split()) or type(e).__name__
        raise DiffinError(f"cannot {what} ({type(e).__name__}: {text[:200]})") from None


def to_device(obj, device):
    """``obj`` with every tensor inside (lists, tuples, dicts, dataclasses) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        moved = [to_device(o, device) for o in obj]
        return type(obj)(moved) if not hasattr(obj, "_fields") else type(obj)(*moved)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _open(root: str):
    """The project, opened on a Ray node."""
    from diffin_core.project.folder import Project
    try:
        return Project(root)
    except DiffinError as e:           # the driver opened it: this node does not see the same folder
        import platform
        raise DiffinError(f"{e.problem} on Ray node {platform.node()} (every node must see the project "
                          f"folder at the same path)", e.path) from None


def _context(root: str, settings: dict):
    from diffin_core.run.context import project_context
    project = _open(root)
    return project, project_context(project, ScoreSettings(**settings))


class Scorer:
    """What a Ray worker process keeps between tasks: the project and its scoring context
    (model, checkpoints), built once, and the last plan, fetched from the object store once."""

    def __init__(self, root: str, settings: dict):
        self.project, self.ctx = _context(root, settings)
        self.plan_id, self.plan_value, self.mem = None, None, {}

    def _configure(self, method: Attributor):
        """The context set up as ``runner.run`` sets it before a run (memory plan, batch-gradient
        slicing, cached checkpoints): the same rounding as a local run, hence the same scores."""
        from diffin_core.methods.runner import configure, memory_plan
        if method.name not in self.mem:
            self.mem[method.name] = memory_plan(method, self.ctx, True)
        mem = self.mem[method.name]
        configure(self.ctx, mem)
        return mem

    def plan(self, method: str):
        """The method's query plan on the full training split, tensors on the CPU; through the
        engine's resumable plan stage (runs/.stages/ of the shared project folder). Kept whole
        (mem=None): the plan travels through the object store, not as lazy files."""
        from diffin_core.methods.runner import prepare
        m = METHODS[method]()
        self._configure(m)
        q = self.project.query
        plan = prepare(m, self.ctx, np.asarray(q.x), q.y, _stages(self.project, method, self.ctx.settings))
        return to_device(plan, "cpu")

    def score(self, method: str, boxed_plan: list, start: int, stop: int) -> dict:
        """runner.score_rows on rows [start, stop) in chunks of the engine's memory plan;
        ``boxed_plan`` = [ObjectRef of the plan]."""
        import ray
        from diffin_core.methods.runner import score_rows
        m = METHODS[method]()
        mem = self._configure(m)
        ref = boxed_plan[0]
        if self.plan_id != ref.hex():
            self.plan_value, self.plan_id = to_device(ray.get(ref), self.ctx.device), ref.hex()
        return score_rows(m, self.ctx, self.plan_value, start, stop, True, mem.chunk(True))


_SCORERS: dict = {}     # per worker process, one entry: (root, settings, file stamps) -> Scorer


def _scorer(root: str, settings: dict) -> Scorer:
    project = _open(root)
    stamp = tuple(p.stat().st_mtime_ns if p.exists() else 0
                  for p in (project.config_path, project.manifest_path))
    key = (root, json.dumps(settings, sort_keys=True), stamp)
    if key not in _SCORERS:
        _SCORERS.clear()
        _SCORERS[key] = Scorer(root, settings)
    return _SCORERS[key]


def _stages(project, method: str, settings: ScoreSettings):
    """The run's resumable stages: the same folder a local run with these settings uses."""
    from diffin_core.run.scoring import stage_settings
    from diffin_core.project.stages import Stages
    q = project.query
    return Stages(project.runs_dir / ".stages", stage_settings(project, method, settings, np.asarray(q.x), q.y, True))


def _worker_threads() -> None:
    """A Ray task uses as many torch threads as the CPUs Ray gave it (tasks share the node's
    CPUs), with OpenMP's passive wait (threads.py)."""
    import ray
    from diffin_core.engine.threads import configure
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    configure(max(1, int(cpus)))


def _plan_task(root: str, settings: dict, method: str):
    """(the plan, what its context noted while planning: {"approximations", "check", "hvp"})."""
    _worker_threads()
    scorer = _scorer(root, settings)
    plan = scorer.plan(method)
    from diffin_core.engine.hvp import summary as hvp_summary
    ctx = scorer.ctx
    return plan, {"approximations": list(getattr(ctx.recipe, "approximations", None) or []),
                  "check": getattr(ctx, "adam_check", None), "hvp": hvp_summary(ctx)}


def _score_task(root: str, settings: dict, method: str, boxed_plan: list, start: int, stop: int) -> dict:
    _worker_threads()
    return _scorer(root, settings).score(method, boxed_plan, start, stop)


def shard_bounds(n: int, shards: int, batch: int) -> list[tuple[int, int]]:
    """Row ranges covering [0, n), at most ``shards`` of them, each starting at a multiple of
    ``batch`` (so the chunks are the ones a single-process run scores)."""
    chunks = max(1, -(-n // batch))
    per = max(1, -(-chunks // max(1, shards)))
    return [(a * batch, min(n, (a + per) * batch)) for a in range(0, chunks, per)]


def score_on_ray(project, method: str, run: str | None = None, settings: ScoreSettings | None = None,
                 address: str | None = None, shards: int | None = None, progress=None,
                 timeout: float | None = None) -> Path:
    """Score every training sample on Ray (stages in the module docstring); returns the run
    folder, the same files as ``scoring.score``. ``timeout``: seconds to reach the cluster or
    start the local instance (``connect``; default ``DIFFIN_RAY_TIMEOUT`` or 60)."""
    from diffin_core.project.folder import Project
    from diffin_core.run.scoring import run_name, scores_frame, write_run
    ray = _ray()
    project = project if isinstance(project, Project) else Project(project)
    settings = settings or ScoreSettings()
    if method not in METHODS:
        raise DiffinError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cls = METHODS[method]
    if cls.chunk is Attributor.chunk or cls.prepare is Attributor.prepare:
        raise DiffinError(f"method {method!r} does not score the training set row by row (no prepare/chunk), "
                          f"so it is not sharded on Ray; score it without --ray")
    if getattr(cls, "needs_recipe", False) and not project.recipe:
        raise DiffinError(f"{method} retrains the model on the driver: add "
                          "`[train] recipe = \"train.py:train\"` to diffin.toml", project.config_path)
    progress = progress or (lambda d, t, m: None)
    with run_name(project, method, run) as run:     # a default name is claimed until published
        started = time.time()
        if not ray.is_initialized():
            connect(ray, address, timeout)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        n = len(project.train)
        root, cfg = str(project.root), settings.to_dict()
        slots = gpus or max(1, int(resources.get("CPU", 1)))
        bounds = shard_bounds(n, shards or 4 * slots, settings.batch_size)
        # max_calls=0: GPU workers too stay alive between tasks, keeping their context and plan
        opts = {"num_gpus": 1, "num_cpus": 1, "max_calls": 0} if gpus else {"num_cpus": 1}
        stages = _stages(project, method, settings)
        try:
            noted: dict = {}                 # what the plan task's context noted (approximations, check)
            parts = _run_shards(ray, opts, root, cfg, method, bounds, n, progress, stages, noted)
        except BaseException:
            stages.remove_if_empty()         # failed before any shard or plan was saved: no leftover settings.json
            raise

        out = gather(cls(), parts, project.train.y)
        from diffin_core.run.context import project_context
        from diffin_core.run.scoring import approximations
        ctx = project_context(project, settings, progress)     # the recipe's approximations, as a local run
        if cls.run is not Attributor.run:
            # the method post-processes its run (diffin: label_issue at the checkpoint with the lowest
            # query loss): its own ``run`` does it on the driver, around the gathered shards
            q = project.query
            out = _around(cls, out).run(ctx, np.asarray(q.x), q.y, True)
        check = noted.get("check")
        if method == "diffin":               # the replay's self-check and its line (a resumed plan: made here)
            from diffin_core.engine.adam_batches import decide
            check = decide(ctx) if check is None else check
        df = scores_frame(project.train, out)
        from diffin_core.engine.precision import not_checked
        model = project.build_model()
        meta = {
            "run": run, "method": method, "settings": cfg, "device": "cuda" if gpus else "cpu",
            "checkpoints": len(project.manifest.checkpoints), "train_size": n, "query_size": len(project.query),
            "num_params": int(sum(t.numel() for t in model.parameters())),
            "seconds": round(time.time() - started, 3), "finished": time.time(),
            "ray": {"address": address or "local", "shards": len(bounds), "slots": slots, "gpus": gpus},
            "precision": not_checked(settings, "Ray shards score in float32 (the low-precision check runs on local runs only)"),
            "approximations": approximations(ctx, method, noted.get("approximations"),
                                             [check["message"]] if check and check.get("message") else []),
        }
        if noted.get("hvp"):
            meta["hvp"] = noted["hvp"]
        if check is not None:
            from diffin_core.engine.adam_batches import check_key
            meta[check_key(ctx)] = check
        final = write_run(project, run, df, meta, started)
    stages.remove()                      # complete: the resumable stages are not needed
    return final


def gather(method: Attributor, parts: list[dict], y) -> dict[str, np.ndarray]:
    """The shards' row-range results as one run's output, as ``Attributor.run`` returns it:
    influence, self_influence (summed over checkpoints; "self_by_checkpoint" (N, m) kept),
    label_issue by the method's rule, probs."""
    out = {"influence": np.concatenate([p["influence"] for p in parts])}
    probs = np.concatenate([p["probs"] for p in parts])
    self_infl = (np.concatenate([p["self_influence"] for p in parts])
                 if all("self_influence" in p for p in parts) else None)
    if self_infl is not None and self_infl.ndim == 2:          # (N, m): each checkpoint's share
        out["self_by_checkpoint"] = self_infl.astype(np.float32)
        self_infl = self_infl.sum(1)
    out["self_influence"] = self_infl if self_infl is not None else np.full(len(probs), np.nan)
    out["label_issue"] = np.asarray(method.label_issue(self_infl, probs, np.asarray(y)), dtype=np.float64)
    out["probs"] = probs
    return out


class _Gathered(Attributor):
    """Placed after a method class in a new class's MRO, so that the method's ``run`` override
    finds the gathered shards where it calls ``super().run``."""
    gathered: dict = {}

    def run(self, ctx, qx, qy, need_self: bool = True):
        return self.gathered


def _around(cls, out: dict) -> Attributor:
    """An instance of ``cls`` whose base run returns ``out`` (its own post-processing runs)."""
    # fold_label_issue off: the shards are scored, so label_issue takes its own pass
    return type(f"Gathered{cls.__name__}", (cls, _Gathered), {"gathered": out, "fold_label_issue": False})()


def _run_shards(ray, opts: dict, root: str, cfg: dict, method: str, bounds, n: int, progress,
                stages, noted: dict | None = None) -> list[dict]:
    """The plan task, then every shard not already in ``stages`` as a task (Ray spreads them
    over the free slots); each result is saved as it arrives (``rows_a_b``), so a killed run
    resumes with the missing shards. Results in row order. A DiffinError inside a task is
    raised here as itself. ``noted`` receives what the plan task's context noted (approximations,
    the replay's check, the HVPs used) when the plan task ran."""
    parts: list = [stages.load_scores(f"rows_{a}_{b}") for a, b in bounds]
    done = sum(b - a for (a, b), part in zip(bounds, parts) if part is not None)
    if done:
        progress(done, n, f"{method}: resumed: {done} of {n} rows already scored")
    todo = [i for i, part in enumerate(parts) if part is None]
    if not todo:
        return parts
    progress(done, n, f"{method}: preparing query vectors on Ray")
    plan, info = ray.remote(_plan_task).options(num_returns=2, **opts).remote(root, cfg, method)
    task = ray.remote(_score_task).options(**opts)
    running = {task.remote(root, cfg, method, [plan], *bounds[i]): i for i in todo}
    try:
        while running:
            # short waits: Ctrl-C is handled between them (a blocking wait held it for ~30 s)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            if not ready:
                continue
            i = running.pop(ready[0])
            parts[i] = ray.get(ready[0])
            stages.save_scores(f"rows_{bounds[i][0]}_{bounds[i][1]}", parts[i])
            done += bounds[i][1] - bounds[i][0]
            progress(done, n, f"{method}: scored {done} of {n} rows on Ray ({len(bounds)} shards)")
        if noted is not None:
            noted.update(ray.get(info))
    except ray.exceptions.RayError as e:
        cause = _diffin_cause(e)
        if cause is not None:
            raise DiffinError(cause.problem, cause.path) from None
        raise
    finally:
        for ref in running:              # an error or an interrupt: stop what is still queued
            # force: a worker process interrupted mid-task (e.g. inside a lazy import) is killed and
            # replaced, never reused half-initialised by the next run's tasks
            ray.cancel(ref, force=True)
    return parts


def _diffin_cause(err) -> DiffinError | None:
    """The DiffinError behind a (possibly nested) Ray task error, if one is."""
    for _ in range(8):
        cause = getattr(err, "cause", None)
        if cause is None:
            return err if isinstance(err, DiffinError) else None
        if isinstance(cause, DiffinError) and getattr(cause, "cause", None) is None:
            return cause
        err = cause
    return None
