"""Scoring on a Ray cluster: ``diffin score PROJECT --ray [ADDRESS]``.

The training set is sharded over plain Ray tasks; the query side is computed once:

1. plan    one task opens the project, builds the scoring context on the full training split
           and runs the method's query-side ``prepare`` (query gradients, Ritz views...). Its
           result stays in Ray's object store (moved to the CPU); only references travel.
2. shards  one task per row range [a, b) (a multiple of ``batch_size``): it opens the project
           again, reads only its rows (``Split.iter_chunks``; streamed sources read nothing
           else) and scores them with the plan through the engine's ``runner.score_rows``. Tasks ask for one GPU each when the cluster has GPUs (``device = "auto"`` then
           picks cuda inside the task), else one CPU.
3. driver  concatenates the shards in row order, applies the method's ``label_issue`` to the
           whole set, and writes ``runs/<run>/scores.parquet`` + ``meta.json`` as a local run
           does (meta adds ``"ray": {"address", "shards", "gpus"}``).

Every node must see the project folder at the same absolute path (NFS or similar) and have
diffin (and the project's Python dependencies) installed. ``address``: None starts (or reuses)
a local Ray instance; ``"auto"`` joins the cluster this machine belongs to (``ray start``);
``"ray://host:10001"`` or ``"host:6379"`` a remote one.
"""
from __future__ import annotations

import dataclasses
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


def _plan(root: str, method: str, settings: dict):
    project, ctx = _context(root, settings)
    q = project.query
    return to_device(METHODS[method]().prepare(ctx, q.x, q.y), "cpu")


def _shard(root: str, method: str, settings: dict, plan, start: int, stop: int):
    from .runner import score_rows
    _, ctx = _context(root, settings)
    return score_rows(METHODS[method](), ctx, to_device(plan, ctx.device), start, stop)


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
    gpus = int(ray.cluster_resources().get("GPU", 0))
    workers = gpus or int(ray.cluster_resources().get("CPU", 1))
    opts = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
    root, cfg = str(project.root), settings.to_dict()
    n = len(project.train)
    bounds = shard_bounds(n, shards or 2 * workers, settings.batch_size)

    progress(0, n, f"{method}: preparing query vectors on Ray")
    plan = ray.remote(_plan).options(**opts).remote(root, method, cfg)
    task = ray.remote(_shard).options(**opts)
    pending = {task.remote(root, method, cfg, plan, a, b): i for i, (a, b) in enumerate(bounds)}
    parts, done = [None] * len(bounds), 0
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            parts[i] = ray.get(ready[0])
            done += bounds[i][1] - bounds[i][0]
            progress(done, n, f"{method}: scoring training samples on Ray ({len(bounds)} shards)")
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        for ref in pending:
            ray.cancel(ref)
        if isinstance(cause, DiffinError):
            raise DiffinError(cause.problem, cause.path) from None
        raise

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
        "ray": {"address": address or "local", "shards": len(bounds), "gpus": gpus},
    }
    return write_run(project, run, df, meta, started)
