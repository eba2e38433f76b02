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
3. driver  concatenates the shards in row order, applies the method's ``label_issue`` to the
           whole set, and writes ``runs/<run>/scores.parquet`` + ``meta.json`` through
           ``scoring.write_run``, as a local run does (meta adds ``"ray": {"address", "shards",
           "slots", "gpus"}``).

Every node must see the project folder at the same absolute path (NFS or similar) and have
diffin (and the project's Python dependencies) installed. ``address``: None starts (or reuses)
a local Ray instance; ``"auto"`` joins the cluster this machine belongs to (``ray start``);
``"ray://host:10001"`` or ``"host:6379"`` a remote one.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from .errors import DiffinError
from .methods import METHODS, Attributor, ScoreSettings


def _ray():
    try:
        import ray
    except ImportError:
        raise DiffinError("--ray needs Ray: pip install ray") from None
    return ray


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


def _context(root: str, settings: dict):
    from .project import Project
    from .scoring import project_context
    project = Project(root)
    return project, project_context(project, ScoreSettings(**settings))


class Scorer:
    """What a Ray worker process keeps between tasks: the project and its scoring context
    (model, checkpoints), built once, and the last plan, fetched from the object store once."""

    def __init__(self, root: str, settings: dict):
        self.project, self.ctx = _context(root, settings)
        self.plan_id, self.plan_value = None, None

    def plan(self, method: str):
        """The method's query plan on the full training split, tensors on the CPU."""
        q = self.project.query
        return to_device(METHODS[method]().prepare(self.ctx, q.x, q.y), "cpu")

    def score(self, method: str, boxed_plan: list, start: int, stop: int) -> dict:
        """runner.score_rows on rows [start, stop) in chunks sized by the engine's memory plan;
        ``boxed_plan`` = [ObjectRef of the plan]."""
        import ray
        from .runner import memory_plan, score_rows
        ref = boxed_plan[0]
        if self.plan_id != ref.hex():
            self.plan_value, self.plan_id = to_device(ray.get(ref), self.ctx.device), ref.hex()
            self.chunk = memory_plan(METHODS[method](), self.ctx, True).chunk(True)
        return score_rows(METHODS[method](), self.ctx, self.plan_value, start, stop, True, self.chunk)


_SCORERS: dict = {}     # per worker process, one entry: (root, settings, file stamps) -> Scorer


def _scorer(root: str, settings: dict) -> Scorer:
    from .project import Project
    project = Project(root)
    stamp = tuple(p.stat().st_mtime_ns if p.exists() else 0
                  for p in (project.config_path, project.manifest_path))
    key = (root, json.dumps(settings, sort_keys=True), stamp)
    if key not in _SCORERS:
        _SCORERS.clear()
        _SCORERS[key] = Scorer(root, settings)
    return _SCORERS[key]


def _plan_task(root: str, settings: dict, method: str):
    return _scorer(root, settings).plan(method)


def _score_task(root: str, settings: dict, method: str, boxed_plan: list, start: int, stop: int) -> dict:
    return _scorer(root, settings).score(method, boxed_plan, start, stop)


def shard_bounds(n: int, shards: int, batch: int) -> list[tuple[int, int]]:
    """Row ranges covering [0, n), at most ``shards`` of them, each starting at a multiple of
    ``batch`` (so the chunks are the ones a single-process run scores)."""
    chunks = max(1, -(-n // batch))
    per = max(1, -(-chunks // max(1, shards)))
    return [(a * batch, min(n, (a + per) * batch)) for a in range(0, chunks, per)]


def score_on_ray(project, method: str, run: str | None = None, settings: ScoreSettings | None = None,
                 address: str | None = None, shards: int | None = None, progress=None) -> Path:
    """Score every training sample on Ray (stages in the module docstring); returns the run
    folder, the same files as ``scoring.score``."""
    from .project import Project
    from .scoring import next_run_name, scores_frame, write_run
    ray = _ray()
    project = project if isinstance(project, Project) else Project(project)
    settings = settings or ScoreSettings()
    if method not in METHODS:
        raise DiffinError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    attributor = METHODS[method]()
    if type(attributor).run is not Attributor.run:
        raise DiffinError(f"method {method!r} post-processes a whole run and is not sharded on Ray yet; "
                          f"score it without --ray")
    run = run or next_run_name(project, method)
    if "/" in run or run.startswith("."):
        raise DiffinError(f"run name {run!r} must be a plain folder name")
    progress = progress or (lambda d, t, m: None)
    started = time.time()
    if not ray.is_initialized():
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise DiffinError(f"cannot reach the Ray cluster at {address or 'a new local instance'} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    n = len(project.train)
    root, cfg = str(project.root), settings.to_dict()
    slots = gpus or max(1, int(resources.get("CPU", 1)))
    bounds = shard_bounds(n, shards or 4 * slots, settings.batch_size)
    # max_calls=0: GPU workers too stay alive between tasks, keeping their context and plan
    opts = {"num_gpus": 1, "num_cpus": 1, "max_calls": 0} if gpus else {"num_cpus": 1}
    parts = _run_shards(ray, opts, root, cfg, method, bounds, n, progress)

    out = {"influence": np.concatenate([p["influence"] for p in parts])}
    p = np.concatenate([p["probs"] for p in parts])
    has_self = all("self_influence" in q for q in parts)
    self_infl = np.concatenate([q["self_influence"] for q in parts]) if has_self else None
    if self_infl is not None and self_infl.ndim == 2:          # (N, m): each checkpoint's share
        out["self_by_checkpoint"] = self_infl.astype(np.float32)
        self_infl = self_infl.sum(1)
    out["self_influence"] = self_infl if self_infl is not None else np.full(n, np.nan)
    out["label_issue"] = np.asarray(attributor.label_issue(self_infl, p, project.train.y), dtype=np.float64)
    out["probs"] = p
    df = scores_frame(project.train, out)
    model = project.build_model()
    meta = {
        "run": run, "method": method, "settings": cfg, "device": "cuda" if gpus else "cpu",
        "checkpoints": len(project.manifest.checkpoints), "train_size": n, "query_size": len(project.query),
        "num_params": int(sum(t.numel() for t in model.parameters())),
        "seconds": round(time.time() - started, 3), "finished": time.time(),
        "ray": {"address": address or "local", "shards": len(bounds), "slots": slots, "gpus": gpus},
    }
    return write_run(project, run, df, meta, started)


def _run_shards(ray, opts: dict, root: str, cfg: dict, method: str, bounds, n: int, progress) -> list[dict]:
    """The plan task, then every shard as a task (Ray spreads them over the free slots);
    results in row order. A DiffinError inside a task is raised here as itself."""
    progress(0, n, f"{method}: preparing query vectors on Ray")
    plan = ray.remote(_plan_task).options(**opts).remote(root, cfg, method)
    task = ray.remote(_score_task).options(**opts)
    running = {task.remote(root, cfg, method, [plan], a, b): i for i, (a, b) in enumerate(bounds)}
    parts: list = [None] * len(bounds)
    done = 0
    try:
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            i = running.pop(ready[0])
            parts[i] = ray.get(ready[0])
            done += bounds[i][1] - bounds[i][0]
            progress(done, n, f"{method}: scored {done} of {n} rows on Ray ({len(bounds)} shards)")
    except ray.exceptions.RayError as e:
        for ref in running:
            ray.cancel(ref)
        cause = _diffin_cause(e)
        if cause is not None:
            raise DiffinError(cause.problem, cause.path) from None
        raise
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
