"""A shipped run: the sample project's diffin scores, installed at once and verified in the background.

A newcomer's first `bash scripts/run.sh` should reach a Home page whose sample project has a
diffin run in seconds, not after the minutes a CPU needs to score it. The repository therefore
ships the sample's diffin run (``sample_data/mnist/prebuilt/diffin-1``: scores.parquet and
meta.json, no feature store), made by ``python -m diffin_core.run.prebuilt`` with this code.
Its meta.json carries ``prebuilt``: the digest of everything the scores depend on (``inputs_digest``:
diffin.toml, model.py, the manifest, every checkpoint, the train and query data, the score
settings) and ``status``. The app installs it into the workspace copy (``install``) marked
``unverified`` and queues ``verify`` in its background job, which
  1. recomputes the digest (a mismatch: the run is removed and the project is scored afresh),
  2. recomputes ``SPOT_ROWS`` rows (seeded) with the engine: the query plan, the label_issue plan
     at k*, and the walk over those rows only; influence, self_influence, label_issue, loss and
     pred must agree with the shipped values (relative to each column's RMS: ``tolerance``, at
     least ``TOLERANCE``, wider by the run's own measured finite-difference HVP error),
and writes the outcome into the run's meta.json (``prebuilt.status``: verified | failed, with the
figures). A failed check says so on Home and the background job rescores the project.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from diffin_core.errors import DiffinError

SPOT_ROWS = 12
TOLERANCE = 1e-3           # |recomputed - shipped| <= TOLERANCE * RMS(shipped column), per column


def tolerance(meta: dict) -> float:
    """The check's relative tolerance for a run: ``TOLERANCE``, or twice the largest error its
    finite-difference HVPs measured (meta.json ``hvp.views``), whichever is larger. FD products
    in float32 carry rounding noise of that size, and it moves with the thread count and the
    CPU's kernels, so a recomputation cannot be held closer than that."""
    views = ((meta.get("hvp") or {}).get("views") or {}).values()
    fd = [float(v.get("fd_error") or 0.0) for v in views if isinstance(v, dict) and v.get("used") == "fd"]
    return max([TOLERANCE] + [2.0 * e for e in fd])
RUN = "diffin-1"


def prebuilt_dir(src: Path) -> Path:
    return Path(src) / "prebuilt" / RUN


def inputs_digest(root: Path, settings: dict | None = None) -> str:
    """sha256 over the files a diffin run of the project depends on, and the score settings."""
    from diffin_core.project.folder import Project
    project = Project(root)
    files = [project.config_path, project.manifest_path]
    model_file = project.config.get("model", {}).get("factory", "").split(":")[0]
    if model_file:
        files.append(project.root / model_file)
    files += [project.manifest_path.parent / c.file for c in project.manifest.checkpoints]
    for extra in ("step_lrs", "batch_order"):
        name = json.loads(project.manifest_path.read_text()).get(extra)
        if name:
            files.append(project.manifest_path.parent / name)
    files += [project.root / project.config["data"][k] for k in ("train", "query")]
    h = hashlib.sha256()
    for f in files:
        h.update(str(Path(f).relative_to(project.root)).encode() + b"\0")
        p = Path(f)
        items = sorted(p.rglob("*")) if p.is_dir() else [p]
        for item in items:
            if item.is_file():
                with open(item, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
    h.update(json.dumps(settings or {}, sort_keys=True).encode())
    return h.hexdigest()


def build(src: Path, progress=None) -> Path:
    """Score ``src`` with diffin (no feature store) into src/prebuilt/diffin-1 with its digest."""
    from diffin_core.run.scoring import score
    src = Path(src)
    out = score(src, "diffin", RUN, progress=progress, features=False)
    meta = json.loads((out / "meta.json").read_text())
    tm = meta.get("timings") or {}
    estimates = {"diffin": meta["seconds"], "check": round((tm.get("plan_s") or 0) + (tm.get("label_issue_s") or 0), 2)}
    for other in ("tracin", "loss"):           # what the background job scores next, timed here
        t = time.time()
        extra = score(src, other, f"{other}-prebuilt-timing", features=False)
        estimates[other] = round(time.time() - t, 2)      # seconds (a tiny project takes < 0.05)
        _drop_run(extra)
    meta["prebuilt"] = {"inputs_digest": inputs_digest(src, meta["settings"]), "status": "shipped",
                        "built": time.time(), "estimates_s": estimates,
                        "estimates_note": "seconds on the machine that built it (threads: " +
                                          str((meta.get("threads") or {}).get("torch_threads")) + ")"}
    dest = prebuilt_dir(src)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    shutil.copy2(out / "scores.parquet", dest / "scores.parquet")
    (dest / "meta.json").write_text(json.dumps(meta, indent=1))
    _drop_run(out)
    return dest


def _drop_run(path: Path) -> None:
    """Remove a run folder written by scoring.write_run (a link to a version folder, or a folder)."""
    path = Path(path)
    if path.is_symlink():
        target = path.resolve()
        path.unlink()
        shutil.rmtree(target, ignore_errors=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def install(src: Path, dest: Path) -> bool:
    """Copy the shipped run of ``src`` into project ``dest`` as runs/diffin-1, marked
    unverified, unless the project has runs already. True when installed."""
    shipped = prebuilt_dir(src)
    runs = Path(dest) / "runs"
    if not (shipped / "meta.json").is_file() or (runs.is_dir() and any(runs.iterdir())):
        return False
    meta = json.loads((shipped / "meta.json").read_text())
    meta["prebuilt"]["status"] = "unverified"
    meta["finished"] = time.time()
    from diffin_core.project.atomic import staged_dir
    with staged_dir(runs / RUN) as tmp:             # appears whole, as a scored run does
        shutil.copy2(shipped / "scores.parquet", tmp / "scores.parquet")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return True


def status(meta: dict) -> str | None:
    """'unverified' / 'verified' / 'failed' for a shipped run's meta, None for any other run."""
    return (meta.get("prebuilt") or {}).get("status")


def _set_status(run_dir: Path, **fields) -> dict:
    from diffin_core.project.atomic import write_text
    meta = json.loads((run_dir / "meta.json").read_text())
    meta.setdefault("prebuilt", {}).update(fields)
    write_text(run_dir / "meta.json", json.dumps(meta, indent=1))
    return meta


def spot_rows(n: int, count: int = SPOT_ROWS, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, 19])
    return np.sort(rng.choice(n, size=min(count, n), replace=False))


def recompute(root: Path, rows: np.ndarray, settings: dict, progress=None) -> dict[str, np.ndarray]:
    """influence, self_influence, label_issue, loss and pred of training ``rows``, by the engine
    as a full diffin score computes them (query plan, label_issue's plan at k*, the walk)."""
    from dataclasses import replace
    from diffin_core.methods import ScoreSettings
    from diffin_core.methods import runner
    from diffin_core.methods.base import loo_loss
    from diffin_core.methods.diffin import DiffIn
    from diffin_core.methods.label_issue import best_checkpoint, query_loss_by_checkpoint
    from diffin_core.project.folder import Project
    from diffin_core.run.scoring import project_context
    project = Project(root)
    ctx = project_context(project, replace(ScoreSettings(), **settings), progress)
    q = project.query
    qx, qy = np.asarray(q.x), q.y
    method = DiffIn()
    k = best_checkpoint(query_loss_by_checkpoint(ctx, qx, qy), ctx.steps)
    fold = method._make_fold(ctx, qx, qy, k) if k < ctx.m - 1 else None
    method._fold = fold
    mem = runner.memory_plan(method, ctx, True)
    runner.configure(ctx, mem)
    plan = runner.prepare(method, ctx, qx, qy, runner.Stages(None, runner.StageSettings(method.name, {}, "", "")), mem)
    y = np.asarray(ctx.train.y)
    out = {key: [] for key in ("influence", "self_influence", "label_issue", "loss", "pred")}
    for r in rows:                         # one row at a time: any rows, the same per-row numbers
        part = runner.score_rows(method, ctx, plan, int(r), int(r) + 1, True, 1)
        s = part["self_influence"].sum(1) if part["self_influence"].ndim == 2 else part["self_influence"]
        probs = part["probs"]
        out["influence"].append(part["influence"][0])
        out["self_influence"].append(s[0])
        li = (loo_loss(part["fold_self"], part["fold_probs"], y[r:r + 1]) if fold is not None
              else loo_loss(s, probs, y[r:r + 1]))
        out["label_issue"].append(li[0])
        out["loss"].append(-np.log(max(probs[0, y[r]], 1e-12)))
        out["pred"].append(int(probs[0].argmax()))
    return {key: np.asarray(v) for key, v in out.items()}


def verify(root: str, run: str = RUN, progress=None) -> dict:
    """The background check of a shipped run (module docstring). Returns the prebuilt record
    (status verified or failed, the worst relative error per column, seconds)."""
    import pandas as pd
    progress = progress or (lambda d, t=None, m="": None)
    root = Path(root)
    run_dir = root / "runs" / run
    meta = json.loads((run_dir / "meta.json").read_text())
    record = meta.get("prebuilt") or {}
    if not record:
        raise DiffinError(f"run {run!r} is not a shipped run", run_dir)
    started = time.time()
    progress(0, 3, "shipped run: checksum of the inputs")
    digest = inputs_digest(root, meta.get("settings"))
    if digest != record.get("inputs_digest"):
        return _set_status(run_dir, status="failed", reason="the project's inputs differ from the ones it was scored on",
                           checked=time.time())["prebuilt"]
    progress(1, 3, f"shipped run: recomputing {SPOT_ROWS} rows (query plan, label plan, walk)")
    scores = pd.read_parquet(run_dir / "scores.parquet")
    rows = spot_rows(len(scores))
    got = recompute(root, rows, meta.get("settings") or {},
                    progress=lambda d, t=None, m="": progress(1, 3, f"shipped run check: {m}"[:80]))
    errors = {}
    for col in ("influence", "self_influence", "label_issue", "loss"):
        ref = scores[col].to_numpy(dtype=np.float64)
        rms = float(np.sqrt(np.mean(ref ** 2))) or 1.0
        errors[col] = float(np.max(np.abs(got[col] - ref[rows])) / rms)
    pred_ok = bool(np.array_equal(got["pred"], scores["pred"].to_numpy()[rows]))
    tol = tolerance(meta)
    ok = pred_ok and all(e <= tol for e in errors.values())
    fields = {"status": "verified" if ok else "failed", "checked": time.time(), "rows": [int(r) for r in rows],
              "max_rel_error": {k: float(f"{v:.3g}") for k, v in errors.items()}, "pred_equal": pred_ok,
              "tolerance": tol, "check_s": round(time.time() - started, 1)}
    if not ok:
        fields["reason"] = (f"recomputed rows differ (worst relative error "
                            f"{max(errors.values()):.2g}{'' if pred_ok else ', predictions differ'})")
    progress(3, 3, f"shipped run: {fields['status']}")
    return _set_status(run_dir, **fields)["prebuilt"]


def verify_then_rescore(root: str, run: str = RUN, progress=None) -> dict:
    """``verify``; on failure the shipped run is removed and the project scored afresh with diffin
    (the same run name). Then the run's feature store is built (Explore's fast top-k)."""
    from diffin_core.run import features as feature_store
    from diffin_core.project.folder import Project
    from diffin_core.run.scoring import score
    record = verify(root, run, progress)
    if record.get("status") != "verified":      # the fresh run replaces the shipped one when complete
        score(root, "diffin", run, progress=progress, features=True)
        record = {**record, "rescored": True}
    else:
        feature_store.build_for_run(Project(root), run, progress=progress)
    return record


if __name__ == "__main__":
    from diffin_core.project.sample import SAMPLE_DIR
    print(build(SAMPLE_DIR / "mnist"))
