"""Scoring a project: one front over the estimators (TRAK-style), writing runs/<run>/.

    score(project, "diffin")          -> runs/<run>/scores.parquet + meta.json
    top_k(project, run, [query idx])  -> most helpful and most harmful training samples

scores.parquet columns: sample_id, label, influence, self_influence, label_issue, pred,
confidence (final-model probability of pred), loss (final per-sample loss, nats), and
true_label when the train split knows it. Sign: influence > 0 helpful, < 0 harmful.
"""
from __future__ import annotations

import contextlib
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diffin_core.engine import threads
from diffin_core.errors import DiffinError
from diffin_core.methods import METHODS, Context, ScoreSettings
from diffin_core.project.data import Split
from diffin_core.project.folder import Project
from diffin_core.project.stages import Stages, StageSettings, array_digest
from diffin_core.run.context import project_context
from diffin_core.engine.hvp import summary as hvp_summary




def stage_settings(project: Project, method: str, settings: ScoreSettings, qx, qy, need_self: bool) -> StageSettings:
    """What decides a scoring job's saved stages: method, result-changing settings, the query,
    the training split and the checkpoint files (size, mtime)."""
    fields = {k: v for k, v in settings.to_dict().items() if k not in ("batch_size", "memory_budget", "device")}
    train = project.train
    ckpts = []
    for c in project.manifest.checkpoints:
        st = (project.manifest_path.parent / c.file).stat()
        ckpts.append([c.file, st.st_size, st.st_mtime_ns, c.step, c.lr])
    order = project.manifest.batch_order            # Adam's batch-order path changes the scores
    if order and (project.manifest_path.parent / order).is_file():
        st = (project.manifest_path.parent / order).stat()
        ckpts.append([order, st.st_size, st.st_mtime_ns])
    return StageSettings(method, fields, array_digest(np.asarray(qx), qy), array_digest(train.ids, train.y),
                         ckpts, need_self)



def approximations(ctx: Context, method: str, *more: list) -> list[str]:
    """meta.json "approximations": what of the training recipe the method's estimate approximates,
    one line each, in order, each once (empty: modelled exactly, or a method that does not use
    the recipe). ``more``: lines noted elsewhere (a Ray plan task's context)."""
    if not getattr(METHODS[method], "uses_recipe", False):
        return []
    lines = list(getattr(ctx.recipe, "approximations", None) or [])
    for extra in more:
        lines += list(extra or [])
    return list(dict.fromkeys(lines))


def run_method(ctx: Context, method: str, qx: np.ndarray, qy: np.ndarray, need_self: bool = True) -> dict:
    if method not in METHODS:
        raise DiffinError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return METHODS[method]().run(ctx, qx, qy, need_self)


def scores_frame(train: Split, out: dict) -> pd.DataFrame:
    probs = out["probs"]
    pred = probs.argmax(1)
    df = pd.DataFrame({
        "sample_id": train.ids, "label": train.y,
        "influence": out["influence"], "self_influence": out["self_influence"],
        "label_issue": out["label_issue"], "pred": pred,
        "confidence": probs[np.arange(len(pred)), pred],
        "loss": -np.log(np.clip(probs[np.arange(len(pred)), train.y], 1e-12, None)),
    })
    if train.true_y is not None:
        df["true_label"] = train.true_y
    return df


@contextlib.contextmanager
def run_name(project: Project, method: str, run: str | None):
    """``run`` when given (checked: a plain folder name), else the first free ``<method>-N``,
    claimed atomically for the ``with`` block (two processes scoring at once never take the same
    default name; atomic.claimed_name). Publish the run inside the block."""
    if run:
        if "/" in run or run.startswith("."):
            raise DiffinError(f"run name {run!r} must be a plain folder name")
        yield run
        return
    from diffin_core.project.atomic import claimed_name
    with claimed_name(project.runs_dir, method) as name:
        yield name


def score(project: Project | str | Path, method: str, run: str | None = None,
          settings: ScoreSettings | None = None, progress=None, features: bool | str = True,
          on_published=None) -> Path:
    """Score every training sample on the mean query loss; returns the run folder.

    The run folder appears only when complete (written to a temp folder, then renamed).
    ``features``: then the feature pass (features.py) for methods it serves, written atomically
    to runs/<run>/features/, after which any query's top-k takes a fraction of a second. It runs
    after the scores are published (``on_published(run folder)`` is called between the two;
    the app's pages show the run at once and say that its feature store is being built).
    ``features="sketch"``: the view-less store, fed by the scoring walk itself (sketch_sink).
    """
    project = project if isinstance(project, Project) else Project(project)
    settings = settings or ScoreSettings()
    if method not in METHODS:
        raise DiffinError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    with run_name(project, method, run) as run:     # a default name is claimed until published
        started = time.time()
        ctx = project_context(project, settings, progress)
        keep_base_grads(ctx)
        q = project.query
        qx = np.asarray(q.x)
        # per-checkpoint plan entries and scored row ranges land in runs/.stages/<method>-<digest>/:
        # a killed job with the same settings resumes from them (stages.py)
        ctx.stages = Stages(project.runs_dir / ".stages", stage_settings(project, method, settings, qx, q.y, True))
        from diffin_core.run import features as feature_store
        sink = None
        try:
            if features and method in feature_store.METHODS:
                sink = sketch_sink(project, ctx, method, feature_store, prefer=features == "sketch")
            ctx.grad_tap = sink              # the walk hands its per-sample gradients to the store's sketch
            out = run_method(ctx, method, qx, q.y)
            if method == "diffin":          # the replay's self-check (already made unless the plan was resumed)
                from diffin_core.engine.adam_batches import decide
                decide(ctx)
        except BaseException:
            ctx.stages.remove_if_empty()     # failed before saving any stage: no leftover settings.json
            if sink is not None:
                sink.close()
            raise
        finally:
            ctx.grad_tap = None
        df = scores_frame(project.train, out)
        meta = {
            "run": run, "method": method, "settings": settings.to_dict(), "device": str(ctx.device),
            "checkpoints": len(ctx.thetas), "train_size": ctx.n, "query_size": len(q),
            "num_params": ctx.fm.num_params, "seconds": round(time.time() - started, 3),
            "finished": time.time(), "versions": {"torch": torch.__version__, "python": platform.python_version(),
                                                   "diffin": "0.1.0"},
            "memory": ctx.memory.to_dict() if ctx.memory is not None else None,
            "timings": getattr(ctx, "timings", None),        # plan_s (query side), scores_s (training set)
            "precision": ctx.precision,      # precision.decide: the precision used and its check against float32
            # what of the training recipe the estimate approximates, one line each (empty: modelled exactly)
            "approximations": approximations(ctx, method),
            "threads": threads.record(),     # torch threads, their source, the CPUs and load seen (threads.py)
            "hvp": hvp_summary(ctx),         # hvp.py: which Hessian-vector products were used (auto: where, why)
        }
        if getattr(ctx, "adam_check", None) is not None:     # Adam's / SGD's replay: its self-check (adam_batches.py)
            from diffin_core.engine.adam_batches import check_key
            meta[check_key(ctx)] = ctx.adam_check
        final = write_run(project, run, df, meta, started)
    ctx.stages.remove()                  # the run is complete: its resumable stages are not needed
    if on_published is not None:         # the scores are usable now; the feature pass follows
        on_published(final)
    if features and method == "diffin" and getattr(ctx, "batch_order", None) is not None:
        features = False            # the views' store approximates the checkpoint estimator, not the replay
        if feature_store.span_applies(ctx):     # Adam's replay: its store replays the query gradients' span
            feature_store.span_build(ctx, q, final / feature_store.DIRNAME, progress=progress,
                                     num_classes=project.num_classes, reference=out["influence"], run_dir=final)
        elif progress:
            progress(0, ctx.n, "features: skipped (SGD's batch-order replay has no feature store, and Adam's "
                     "replayed directions must fit half the memory budget; `diffin top` takes the exact path)")
    if sink is not None:
        if progress:
            progress(0, ctx.n, "features: checkpoint sketches from the scoring walk's gradients (Hessian "
                     f"views: {sink.reason})")
        sink.finish(q, final / feature_store.DIRNAME, project.num_classes, progress)
    elif features and method in feature_store.METHODS and not feature_store.views_fit(ctx):
        if progress:
            progress(0, ctx.n, "features: skipped (its Hessian views exceed the memory budget and this recipe "
                     "has no view-less store; `diffin top` takes the exact path)")
    elif features and method in feature_store.METHODS:
        feature_store.build(ctx, q, final / feature_store.DIRNAME, progress=progress,
                            num_classes=project.num_classes)
    return final


BASE_GRADS_SHARE = 16     # the kept Hessian-batch gradients may take this fraction of the memory budget


def keep_base_grads(ctx: Context) -> None:
    """Keep each checkpoint's Hessian-batch gradient (propagate.base_grad: the base of its
    finite-difference HVPs) for the whole score: diffin's label_issue plan at k* (built first) and
    its query plan view the same batch at the same checkpoints 0..k*, and the query plan computed
    it again (the sample: 10 batch gradients of 256 rows, 22 -> 12). The same bits (the same
    computation, keyed by propagate.base_grad_key). Only where one gradient per checkpoint fits
    1/BASE_GRADS_SHARE of the memory budget, and only where the context keeps none already."""
    from diffin_core.engine.budget import default_budget
    if getattr(ctx, "base_grads", None) is not None:
        return
    budget = int(getattr(ctx.settings, "memory_budget", 0) or 0) or default_budget(ctx.device)
    dtype = getattr(ctx.thetas, "dtype", None) or torch.float32     # a lazy store's (not a checkpoint loaded)
    need = len(ctx.thetas) * ctx.fm.num_params * torch.tensor([], dtype=dtype).element_size()
    if need <= budget // BASE_GRADS_SHARE:
        ctx.base_grads = {}


def sketch_sink(project: Project, ctx: Context, method: str, feature_store, prefer: bool = False):
    """The view-less feature store fed by the scoring walk (features.SketchSink) when the Hessian
    views exceed the memory budget or ``prefer`` (`diffin score --sketch-features`: no pass after
    the scores), else None (the feature pass after publishing, or none).
    The budget is the runner's memory plan, made here as runner.run will make it (the context is
    not configured here: runner.run does that, and records the Hessian batch it cuts)."""
    if method != "diffin":
        return None
    from diffin_core.methods import runner
    from diffin_core.methods.diffin import DiffIn
    fit = feature_store.views_fit(ctx, memory=runner.memory_plan(DiffIn(), ctx, True))
    if getattr(ctx, "batch_order", None) is not None or (fit and not prefer):
        return None
    reason = "left out as asked (--sketch-features)" if fit else "they exceed the memory budget"
    return feature_store.SketchSink.create(ctx, project.runs_dir, reason=reason)


def write_run(project: Project, run: str, df: pd.DataFrame, meta: dict, started: float) -> Path:
    """Write runs/<run>/scores.parquet + meta.json (+ answers/columns.npz, the columns `diffin top`
    prints): a temp folder renamed into place, so the run appears only when complete (local and Ray
    runs both end here)."""
    meta.setdefault("versions", {"torch": torch.__version__, "python": platform.python_version(), "diffin": "0.1.0"})
    meta.setdefault("threads", threads.record())
    from diffin_core.project.atomic import staged_dir
    final = project.runs_dir / run
    from diffin_core.run.answers import save_columns
    with staged_dir(final) as tmp:      # runs/<run> swaps whole to the new version (never missing)
        df.to_parquet(tmp / "scores.parquet", index=False)
        # the columns `diffin top` prints (answers/columns.npz, numpy only): written with the run, so
        # the first query pays a read, not pandas' import and the parquet read (top_k keeps the lazy
        # write for runs scored before)
        save_columns(tmp, df)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return final


def query_influence(project: Project, method: str, query_indices, settings: ScoreSettings | None = None,
                    progress=None, ctx: Context | None = None) -> np.ndarray:
    """Influence (N,) of every training sample on the mean loss of the chosen query samples."""
    idx = np.atleast_1d(np.asarray(query_indices, dtype=np.int64))
    q = project.query
    if len(idx) == 0:
        raise DiffinError("choose at least one query sample")
    if idx.min() < 0 or idx.max() >= len(q):
        raise DiffinError(f"query index out of range: the query set has {len(q)} samples (0..{len(q) - 1})")
    ctx = ctx or project_context(project, settings, progress)
    return run_method(ctx, method, q.x[idx], q.y[idx], need_self=False)["influence"]


def topk_cache_path(project: Project, run: str, query_indices) -> Path:
    """Where the exact path's influence (N,) of ``run`` for these query samples is kept (.npy)."""
    from diffin_core.run.answers import exact_path
    return exact_path(project.run(run).path, query_indices)


def exact_context(project: Project, run: str, progress=None, memory_budget: int | None = None,
                  batch_size: int | None = None) -> Context:
    """The scoring context of a finished run's exact path: the run's settings (``memory_budget``,
    ``batch_size``: chunking only, the scores stay the run's), its measured HVP decisions and its
    replay self-check adopted (hvp.adopt, adam_batches.adopt_check). One context serves many
    queries (answer_ahead)."""
    from diffin_core.engine.adam_batches import adopt_check
    from diffin_core.engine.hvp import adopt
    info = project.run(run)
    settings = replace(ScoreSettings(), **info.meta.get("settings", {}))
    if memory_budget is not None:
        settings.memory_budget = int(memory_budget)
    if batch_size is not None:
        settings.batch_size = int(batch_size)
    ctx = project_context(project, settings, progress)
    adopt(ctx, info.meta.get("hvp"))            # the run's measured HVP decisions, as the fast path
    adopt_check(ctx, info.meta)                 # and its replay self-check (a batch-order run)
    return ctx


def top_k(project: Project | str | Path, run: str, query_indices, k: int = 10,
          progress=None, exact: bool = False, memory_budget: int | None = None, rerank: int | None = None,
          batch_size: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(most helpful, most harmful) training samples for the query samples, with the run's
    method and settings. From the run's feature store when it has one (fast path, unless
    ``exact``; ``rerank=0``: from the store alone, no model code run), else exact. Every answer
    is kept with the run (answers.py): asked again, it is read. Both tables carry
    ``attrs["path"]``: which path produced them."""
    from diffin_core.run import answers
    from diffin_core.run.features import fast_answer
    project = project if isinstance(project, Project) else Project(project)
    info = project.run(run)
    idx = sorted(set(int(i) for i in np.atleast_1d(query_indices)))
    ans = answers.load(info.path, idx, exact_only=exact) if rerank is None else None
    if not exact and (ans is None or (ans.certified and not ans.covers(k))):
        ans = fast_answer(project, run, idx, rerank=rerank, k=k)
    if ans is not None and rerank is None and not ans.shown(k):
        ans = answers.load(info.path, idx, exact_only=True)   # a deeper grid than the fast path certified:
    if ans is None:                                            # the exact path (every row)
        ctx = exact_context(project, run, progress, memory_budget, batch_size)
        infl = query_influence(project, info.method, idx, ctx.settings, progress, ctx=ctx)
        answers.save_exact(info.path, idx, infl)
        ans = answers.Answer(infl, np.ones(len(infl), dtype=bool), "exact path")
    infl, path = ans.influence, ans.path
    scores = project.scores(run)
    answers.save_columns(info.path, scores)     # kept at score time (write_run); this writes them for older runs
    table = scores[["sample_id", "label", "pred", "label_issue"]].copy()
    table["influence"] = infl
    order = np.argsort(-infl, kind="stable")
    helpful = table.iloc[order[:k]].reset_index(drop=True)
    harmful = table.iloc[order[::-1][:k]].reset_index(drop=True)
    helpful.attrs["path"] = harmful.attrs["path"] = path
    return helpful, harmful


def answer_ahead(root: str, run: str, queries, progress=None, k: int | None = None) -> int:
    """The app's planning-ahead job (a usercode child; cancelled when the user asks a query of
    their own): the fast path's answer for each query not answered yet, each kept with the run as
    it finishes; on a run without a feature store (Adam's batch-order replay, `--no-features`)
    the exact path's, every query through one scoring context (exact_context). Returns
    how many it answered."""
    from diffin_core.errors import check_cancelled
    from diffin_core.run import answers
    from diffin_core.run import features
    k = features.CERTIFIED_K if k is None else k
    project = Project(root)
    d, made = project.run(run).path, 0
    store, ctx = features.FeatureStore.open(project, run), None
    for i, qi in enumerate(queries):
        check_cancelled()
        a = answers.load(d, [int(qi)])
        if a is None or not a.covers(k):
            if store is not None:
                a = features.fast_answer(project, run, [int(qi)], store=store, k=k)
            if a is None or a.labelled:     # no store, or a query-span store's approximation: the exact replay
                ctx = ctx or exact_context(project, run)
                infl = query_influence(project, project.run(run).method, [int(qi)], ctx.settings, ctx=ctx)
                answers.save_exact(d, [int(qi)], infl)
            made += 1
        if progress:
            progress(i + 1, len(queries), f"planned ahead: query {int(qi)}")
    return made


def rescore_for(root: str, run: str, query_indices, progress=None, k: int | None = None) -> str:
    """The app's background job (usercode child: it runs the model): the fast path's answer for
    a top-``k`` grid (features.fast_answer), kept with the run. Returns the answer's path."""
    from diffin_core.run import answers, features
    k = features.CERTIFIED_K if k is None else k
    project = Project(root)
    ans = features.fast_answer(project, run, query_indices, k=k)
    if ans is not None and ans.labelled:   # a query-span store's approximation: rescored exactly, i.e. the
        # whole replay (every row's terms need its adjoints)
        ctx = exact_context(project, run, progress)
        infl = query_influence(project, project.run(run).method, query_indices, ctx.settings, progress, ctx=ctx)
        return str(answers.save_exact(project.run(run).path, query_indices, infl))
    return str(features.rescored_path(project, run, query_indices))
