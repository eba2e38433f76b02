"""The ``diffin`` command line. Errors print as one line (no traceback) and exit with status 2.

    diffin score PROJECT --method diffin [--run NAME] [--device auto] [--ray [ADDRESS]]
    diffin top PROJECT --run NAME --query-index 3 [--k 10]
    diffin serve PROJECT --run NAME            (keeps the run warm for diffin top)
    diffin demo [--workspace ./workspace] [--sample mnist|text]
    diffin methods
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import typer

from diffin_core.errors import DiffinError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Find helpful, harmful and mislabelled training samples (Diff-In influence).")


THREADS_HELP = ("torch threads (default auto: the CPUs this process may use minus the load average; also "
                "DIFFIN_THREADS); OpenMP waits passively either way")


@app.callback()
def _root(threads: Optional[str] = typer.Option(None, "--threads", metavar="N|auto", help=THREADS_HELP)):
    """Find helpful, harmful and mislabelled training samples (Diff-In influence)."""
    if threads is not None:
        from diffin_core.engine.threads import configure
        configure(threads)


class Bar:
    """The engine's ``progress(done, total, message)`` reports as one tqdm bar per phase, each with
    its own rate and ETA (counted from the end of the phase before, not from the command's start).
    Which reports are steps, items or announcements: workspace/phases.py (the app's job progress
    reads them the same way). A step phase is one bar of m steps, an item phase one bar of its
    total (the description follows the latest message); an announcement is one line (no empty
    "0/4000" bar) and closes the bar before it.
    """

    def __init__(self, file=None):
        from diffin_core.workspace.phases import Phases
        self.file = file              # default: sys.stderr at the first report
        self.bar = None
        self.phases = Phases()

    def __call__(self, done: int, total: int | None = None, message: str = "") -> None:
        r = self.phases.report(done, total, message)
        if r.kind == "announce":
            if r.new:
                self.close()
                self._out().write(r.text + "\n")
                self._out().flush()
            return
        if r.new:
            self._open(r.total, "step" if r.kind == "steps" else "sample")
            if r.kind == "steps":   # the bar is the one counter: the message's own k is left out
                self.bar.set_description(r.text[:60], refresh=False)
        if r.kind == "items":
            self.bar.set_description(r.text[:60], refresh=False)
        self.bar.update(r.n - self.bar.n)

    def _out(self):
        if self.file is None:
            self.file = sys.stderr
        return self.file

    def _open(self, total: int, unit: str) -> None:
        """A new bar whose clock starts at the previous report (the end of the phase before)."""
        from tqdm import tqdm
        self.close()
        self.bar = tqdm(total=total, unit=unit, dynamic_ncols=True, file=self._out(), mininterval=0.5,
                        delay=1e-6)       # drawn at its first count, never as an empty bar
        # its clock starts at the previous report; "printed" just after that (tqdm's delay test), so
        # close() always draws the final state even when the whole phase took under mininterval
        since = self.phases.since
        self.bar.start_t, self.bar.last_print_t = since - 2e-6, since

    def close(self):
        if self.bar is not None:
            self.bar.close()
        self.bar = None


def _at_least(option: str, value, low) -> None:
    """A one-line refusal of a count below its minimum (--k -5, --shortlist -4)."""
    if value is not None and value < low:
        raise DiffinError(f"{option} must be at least {low}, not {value}")


def _fraction(option: str, value: float, zero_ok: bool = False, one_ok: bool = True) -> None:
    """A one-line refusal of a fraction outside (0, 1] (or the given ends)."""
    lo_ok = value >= 0 if zero_ok else value > 0
    hi_ok = value <= 1 if one_ok else value < 1
    if not (lo_ok and hi_ok) or value != value:
        lo, hi = ("[0" if zero_ok else "(0"), ("1]" if one_ok else "1)")
        raise DiffinError(f"{option} must be in {lo}, {hi}, not {value:g}")


def _settings(device: str = "auto", memory_budget: Optional[str] = None, batch_size: Optional[int] = None,
              precision: str = "float32", hvp: str = "auto"):
    """ScoreSettings from the CLI options (--memory-budget '4GB', --batch-size 64, --precision bfloat16)."""
    from diffin_core.engine.budget import parse_bytes
    from diffin_core.methods import ScoreSettings
    from diffin_core.engine.precision import dtype_of
    dtype_of(precision)                       # one-line error for an unknown precision
    from diffin_core.engine.hvp import check_mode
    from diffin_core.methods.base import pick_device
    pick_device(device)                       # one line for a bad or missing device, before any work
    budget = parse_bytes(memory_budget)
    from diffin_core.engine.budget import MIN_BUDGET
    if 0 < budget < MIN_BUDGET:               # plan_memory raises it: say so rather than silently
        typer.echo(f"warning: --memory-budget {memory_budget} is below the minimum of {MIN_BUDGET // 2**20} MiB; "
                   f"using {MIN_BUDGET // 2**20} MiB", err=True)
        budget = MIN_BUDGET
    s = ScoreSettings(device=device, memory_budget=budget, precision=precision, hvp=check_mode(hvp))
    if batch_size is not None:
        if batch_size < 1:
            from diffin_core.errors import DiffinError
            raise DiffinError(f"--batch-size must be at least 1, not {batch_size}")
        s.batch_size = int(batch_size)
    return s


def _score(project, method: str, run: Optional[str], device: str, ray: Optional[str] = None,
           features: bool | str = True, memory_budget: Optional[str] = None, batch_size: Optional[int] = None,
           precision: str = "float32", hvp: str = "auto", ray_timeout: Optional[float] = None) -> Path:
    from diffin_core.run.scoring import score
    settings = _settings(device, memory_budget, batch_size, precision, hvp)
    bar = Bar()
    try:
        if ray is not None:
            from diffin_core.run.distributed import score_on_ray
            return score_on_ray(project, method, run, settings,
                                address=None if ray == "local" else ray, progress=bar, timeout=ray_timeout)
        kept: list[Path] = []

        def published(path):
            kept.append(path)
            if features:           # the scores are final now; the feature pass (Explore's fast top-k) follows
                bar.close()
                typer.echo(f"{method}: wrote {path / 'scores.parquet'}; building its feature store...")
        try:
            return score(project, method, run, settings, progress=bar, features=features, on_published=published)
        except KeyboardInterrupt:
            if kept:               # Ctrl-C in the feature pass: the published scores stay, say so
                bar.close()
                typer.echo(f"diffin: Ctrl-C in the feature pass: {kept[0] / 'scores.parquet'} is kept, its "
                           f"feature store is not built (`diffin features {project} --run {kept[0].name}` "
                           "builds it; `diffin top` takes the exact path meanwhile)", err=True)
            raise
    finally:
        bar.close()


MEMORY_HELP = ("memory the engine may use, e.g. 4GB or 512MB (default: half the free RAM, 80 percent of the "
               "free VRAM); sets the chunk sizes, not the scores")
PRECISION_HELP = ("forward passes that score the training set in bfloat16/float16 (autocast), used only if "
                  "a check against float32 on 256 rows passes (else float32, with a warning); HVPs stay float32")
HVP_HELP = ("Hessian-vector products: exact (double backward), fd (finite differences, one gradient each) or "
            "auto: exact where fd is measured not accurate enough (Adam's replay; a Lanczos view whose first fd "
            "product misses the exact one by over 1%)")
BATCH_HELP = "at most this many training samples per chunk (default 256; the memory budget may use fewer)"


@app.command("score")
def score_cmd(project: Path = typer.Argument(..., help="project folder (holds diffin.toml)"),
              method: List[str] = typer.Option(["diffin"], "--method", "-m", help="estimator; repeat for several"),
              run: Optional[str] = typer.Option(None, help="run name (default: METHOD-N)"),
              device: str = typer.Option("auto", help="auto picks cuda, then mps, then cpu"),
              ray: Optional[str] = typer.Option(None, "--ray", metavar="[ADDRESS]",
                                                help="shard over Ray: --ray alone starts a local instance; "
                                                     "'auto' or host:6379 joins a cluster (docs/scale.md)"),
              ray_timeout: Optional[float] = typer.Option(None, "--ray-timeout", metavar="SECONDS",
                                                          help="give up reaching the Ray cluster (or starting the "
                                                               "local one) after this long (default: "
                                                               "$DIFFIN_RAY_TIMEOUT or 60)"),
              no_features: bool = typer.Option(False, "--no-features",
                                               help="skip the feature pass (then `diffin top` takes the exact path)"),
              sketch_features: bool = typer.Option(False, "--sketch-features",
                                                   help="the feature store from the scoring walk's own gradients, "
                                                        "without Hessian views: no pass after the scores; top-k "
                                                        "answers stay exact (certified), the store's own ranking "
                                                        "leaves the curvature out"),
              memory_budget: Optional[str] = typer.Option(None, "--memory-budget", metavar="SIZE",
                                                          help=MEMORY_HELP),
              batch_size: Optional[int] = typer.Option(None, "--batch-size", help=BATCH_HELP),
              precision: str = typer.Option("float32", "--precision", metavar="float32|bfloat16|float16",
                                            help=PRECISION_HELP),
              threads: Optional[str] = typer.Option(None, "--threads", metavar="N|auto", help=THREADS_HELP),
              hvp: str = typer.Option("auto", "--hvp", metavar="auto|exact|fd", help=HVP_HELP)):
    """Score every training sample; writes runs/<run>/scores.parquet and meta.json (and, for
    diffin, the feature store runs/<run>/features/ that makes `diffin top` answer at once)."""
    if ray_timeout is not None:             # else accepted and ignored, even a negative one
        from diffin_core.errors import DiffinError
        if not 0 < ray_timeout < float("inf"):
            raise DiffinError(f"--ray-timeout must be a positive number of seconds, not {ray_timeout:g}")
        if ray is None:
            raise DiffinError(f"--ray-timeout {ray_timeout:g} needs --ray: it limits reaching the Ray cluster")
    from diffin_core.engine.precision import summary
    from diffin_core.engine.threads import configure
    configure(threads)                      # before torch loads (a bad DIFFIN_THREADS: one line)
    import warnings
    from diffin_core.engine.recipe import RecipeWarning
    shown: set[str] = set()
    for m in method:
        with warnings.catch_warnings():     # the recipe's approximations: printed below, each once
            warnings.simplefilter("ignore", RecipeWarning)
            out = _score(project, m, run if len(method) == 1 else None, device, ray, features=False if no_features else ("sketch" if sketch_features else True),
                         memory_budget=memory_budget, batch_size=batch_size, precision=precision, hvp=hvp,
                         ray_timeout=ray_timeout)
        typer.echo(f"{m}: wrote {out / 'scores.parquet'}")
        meta = json.loads((out / "meta.json").read_text())
        from diffin_core.engine.adam_batches import check_text, meta_check
        from diffin_core.engine.hvp import text as hvp_text
        hv = meta.get("hvp") or {}
        for line in (summary(meta.get("precision")), check_text(meta_check(meta)),
                     hvp_text(hv) if len(hv) > 1 else ""):
            if line:
                typer.echo(f"{m}: {line}")
        for entry in meta.get("approximations") or []:
            if entry not in shown:
                shown.add(entry)
                typer.echo(f"approximated: {entry}")


@app.command("top")
def top_cmd(project: Path = typer.Argument(...), run: str = typer.Option(..., help="a finished run"),
            query_index: List[int] = typer.Option(..., "--query-index", "-q", help="query sample index; repeat for a set"),
            k: int = typer.Option(10, help="how many of each"),
            exact: bool = typer.Option(False, "--exact", help="the exact path even when the run has a feature store"),
            shortlist: Optional[int] = typer.Option(None, "--shortlist", help="with a feature store: rows per side "
                                                    "the exact path rescores (default 2% of N, at least 100; 0: the "
                                                    "store alone, approximate)"),
            memory_budget: Optional[str] = typer.Option(None, "--memory-budget", metavar="SIZE", help=MEMORY_HELP),
            batch_size: Optional[int] = typer.Option(None, "--batch-size", help=BATCH_HELP)):
    """Print the most helpful and most harmful training samples for query sample(s)."""
    _at_least("--k", k, 1)
    _at_least("--shortlist", shortlist, 0)
    from diffin_core.run import printed
    if shortlist is None and printed.print_kept(project, run, query_index, k, typer.echo, exact_only=exact):
        return                                    # asked before at this k: one text file read (stdlib only)
    from diffin_core.run.answers import keep_printout, print_cached
    lines: list[str] = []

    def echo(text: str) -> None:                  # what is printed, kept for asking again (answers.keep_printout)
        typer.echo(text)
        lines.append(text)
    if shortlist is None and print_cached(project, run, query_index, k, echo, exact_only=exact):
        keep_printout(project, run, query_index, k, lines, exact_only=exact)
        return                                    # answered before: read, no model (nor torch) loaded
    plain = not exact and shortlist is None and memory_budget is None and batch_size is None
    if plain and _print_span(project, run, query_index, k, echo):
        keep_printout(project, run, query_index, k, lines)
        return                                    # a batch-order Adam run's query-span store: numpy only
    if plain:                                     # a run served warm (diffin serve): answered there
        from diffin_core.run import serve
        said = serve.ask(project, run, query_index, k)
        if said is not None and said != "ok":
            raise DiffinError(said)
        if said == "ok" and _print_served(project, run, query_index, k, echo):
            keep_printout(project, run, query_index, k, lines)
            return
    if plain and _print_fast(project, run, query_index, k, echo):
        keep_printout(project, run, query_index, k, lines)
        return                                    # a new query on a run with a store: without pandas
    from diffin_core.run.scoring import top_k
    over = _settings("auto", memory_budget, batch_size)
    bar = Bar()
    try:
        helpful, harmful = top_k(project, run, query_index, k, progress=bar, exact=exact, rerank=shortlist,
                                 memory_budget=over.memory_budget if memory_budget else None,
                                 batch_size=batch_size)
    finally:
        bar.close()
    typer.echo(f"({helpful.attrs.get('path', 'exact path')})")
    for title, table in (("most helpful (removing them raises the query loss)", helpful),
                         ("most harmful (removing them lowers the query loss)", harmful)):
        typer.echo(f"\n{title}:")
        typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if shortlist is None:                         # its printout kept for asking again (answers.keep_printout)
        lines.clear()
        if print_cached(project, run, query_index, k, lines.append, exact_only=exact):
            keep_printout(project, run, query_index, k, lines, exact_only=exact)


def _print_served(project: Path, run: str, query_index, k: int, echo) -> bool:
    """Print the answer `diffin serve` just kept (numpy only, no torch); False when it cannot be
    read that way (the caller answers in process, which reads the kept answer)."""
    from diffin_core.run.answers import load, print_answer
    run_dir = Path(project) / "runs" / run
    ans = load(run_dir, query_index)
    return ans is not None and ans.covers(k) and print_answer(run_dir, ans, k, echo)


def _print_span(project: Path, run: str, query_index, k: int, echo=typer.echo) -> bool:
    """A new query on a run with a query-span store (run/span.py): its answer (exact where the
    query's gradient lies in the store's span, else labelled approximate), printed and kept with
    the run, with numpy alone (no torch, no pandas); False without such a store or kept columns."""
    from diffin_core.run.answers import load_columns, print_answer
    from diffin_core.run.span import answer_new
    run_dir = Path(project) / "runs" / run
    if load_columns(run_dir) is None:
        return False
    ans = answer_new(run_dir, query_index)
    return ans is not None and print_answer(run_dir, ans, k, echo)


def _print_fast(project: Path, run: str, query_index, k: int, echo=typer.echo) -> bool:
    """A new query's certified answer (features.fast_answer, the same answer `diffin top` keeps)
    printed from the run's kept columns, without importing pandas (about 0.4 s of CPU); False
    where that does not apply (no store, no kept columns yet, a deeper grid than certified): the
    caller then takes scoring.top_k, which reads the answer kept here."""
    from diffin_core.project.folder import Project
    from diffin_core.run.answers import load_columns, print_answer
    from diffin_core.run.features import fast_answer
    proj = Project(project)
    run_dir = proj.run(run).path
    if load_columns(run_dir) is None or not (run_dir / "features" / "meta.json").is_file():
        return False
    ans = fast_answer(proj, run, sorted(set(int(i) for i in query_index)), k=k)
    if ans is None or not (ans.covers(k) or ans.labelled):
        return False
    return print_answer(run_dir, ans, k, echo)


@app.command("serve")
def serve_cmd(project: Path = typer.Argument(..., help="project folder"),
              run: str = typer.Option(..., help="a finished diffin run with a feature store"),
              idle: float = typer.Option(1800.0, help="seconds without a query after which it stops")):
    """Keep a run's query worker warm: `diffin top` on this run then answers a new query without
    starting Python's torch or loading the run (stops on Ctrl-C or when idle)."""
    _at_least("--idle", idle, 1)
    from diffin_core.run.serve import serve
    serve(project, run, idle=idle, echo=typer.echo)


@app.command("features")
def features_cmd(project: Path = typer.Argument(..., help="project folder"),
                 run: str = typer.Option(..., help="a finished diffin run"),
                 dim: int = typer.Option(2048, help="sketch dimension d"),
                 rank: int = typer.Option(32, help="stored Hessian eigenpairs per checkpoint")):
    """(Re)build a run's feature store (part of `diffin score` unless --no-features)."""
    _at_least("--dim", dim, 1)
    _at_least("--rank", rank, 1)
    from diffin_core.run.features import FeatureSettings, build_for_run
    from diffin_core.project.folder import Project
    bar = Bar()
    try:
        out = build_for_run(Project(project), run, FeatureSettings(dim=dim, view_rank=rank), progress=bar)
    finally:
        bar.close()
    typer.echo(f"wrote {out}")


@app.command("methods")
def methods_cmd():
    """List the estimators: full description, and whether the numbers are calibrated loss changes."""
    from diffin_core.tasks.methodinfo import describe_all
    typer.echo(describe_all())


@app.command("demo")
def demo_cmd(workspace: Path = typer.Option(Path("workspace"), help="where the sample project is copied"),
             method: List[str] = typer.Option(["diffin", "tracin", "loss"], "--method", "-m"),
             device: str = typer.Option("auto"),
             sample: str = typer.Option("mnist", help="mnist (images, a small CNN) or text (SMS spam, "
                                        "a small transformer trained by the transformers Trainer)")):
    """Copy a sample project into the workspace (building it if missing) and score it."""
    from diffin_core.project.folder import Project
    from diffin_core.project.sample import SAMPLE_DIR, build_sample_project
    from diffin_core.methods.base import pick_device
    from diffin_core.workspace.appstate import workspace_dir
    pick_device(device)
    workspace = workspace_dir(["--workspace", str(workspace)])   # made here; one line when it cannot be
    if sample not in ("mnist", "text"):
        raise DiffinError(f"--sample must be mnist or text, not {sample!r}")
    if sample == "text":
        from diffin_core.workspace.appstate import copy_text_sample, text_sample_ready
        if not text_sample_ready(workspace):
            typer.echo("building the SMS spam sample (tokenizer + a Trainer run, about a minute)...")
            workspace.mkdir(parents=True, exist_ok=True)
        dest = Path(copy_text_sample(workspace)).resolve()
        typer.echo(f"sample project: {dest}")
    else:
        src = SAMPLE_DIR / "mnist"
        if not (src / "diffin.toml").is_file():
            typer.echo("building the sample project (about 10 s)...")
            build_sample_project(src)
        dest = (workspace / "mnist-sample").resolve()
        if not (dest / "diffin.toml").is_file():
            workspace.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns("runs", "review.sqlite*", "exports", "prebuilt"))
            typer.echo(f"copied the sample project to {dest}")
        else:
            typer.echo(f"sample project: {dest}")
    project = Project(dest)
    done = {r.method for r in project.runs()}
    for m in method:
        if m in done:
            typer.echo(f"{m}: already scored in {dest}/runs")
            continue
        out = _score(project, m, m, device)
        typer.echo(f"{m}: wrote {out / 'scores.parquet'}")
    typer.echo(f"sample project ready: {dest}\n"
               f"open it in the app: streamlit run app.py -- --workspace {dest.parent}")


# --- data-centric tasks (issue 4): clean, delete, coreset, verify, bench ------------------------
def _subset_export(project_dir: Path, run: str, out: Path, fmt: Optional[str], keep, reason: str, extra: dict) -> None:
    from diffin_core.workspace.export import check_out_path, export_subset, project_source
    from diffin_core.project.folder import Project
    project = Project(project_dir)
    check_out_path(project, out)              # never over the project's own data or checkpoints
    info = project.run(run)
    train = project.train
    fmt = fmt or {".npz": "npz", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet",
                  ".zip": "imagefolder"}.get(out.suffix.lower(), "npz")
    export_subset(out, fmt, train.x, train.y, train.ids, keep, reason=reason,
                  label_names=project.label_names, image_shape=project.image_shape,
                  source=project_source(project),       # the input's own arrays and dtypes
                  manifest_extra={"project": str(project.root), "run": info.name, "method": info.method, **extra})
    typer.echo(f"kept {int(keep.sum())} of {len(keep)} samples ({len(keep) - int(keep.sum())} excluded): wrote {out}")


def _check_out(project_dir: Path, out: Path) -> None:
    """Refuse an --out over what the project reads (export.check_out_path) before any work."""
    from diffin_core.workspace.export import check_out_path
    from diffin_core.project.folder import Project
    check_out_path(Project(project_dir), out)


def _run_scores(project_dir: Path, run: str):
    from diffin_core.project.folder import Project
    project = Project(project_dir)
    scores = project.scores(run)
    if len(scores) != len(project.train):
        from diffin_core.errors import DiffinError
        raise DiffinError(f"run {run!r} has {len(scores)} scores but the train split has {len(project.train)} samples")
    return scores


@app.command("clean")
def clean_cmd(project: Path = typer.Argument(..., help="project folder"),
              run: str = typer.Option(..., help="a finished run"),
              fraction: float = typer.Option(0.1, help="drop this fraction with the highest label_issue"),
              out: Path = typer.Option(..., help="export file (.npz, .csv, .parquet or .zip = imagefolder)"),
              fmt: Optional[str] = typer.Option(None, "--format", help="npz, csv, parquet or imagefolder; a text split: csv, tsv, jsonl or parquet")):
    """Export the training split without the top FRACTION most likely mislabelled samples."""
    _fraction("--fraction", fraction, one_ok=False)
    _check_out(project, out)
    from diffin_core.tasks.curate import cleaning_selection
    flagged = cleaning_selection(_run_scores(project, run), fraction)
    _subset_export(project, run, out, fmt, ~flagged, f"cleaning: dropped the top {fraction:g} by label_issue",
                   {"fraction": fraction, "column": "label_issue"})


@app.command("delete")
def delete_cmd(project: Path = typer.Argument(..., help="project folder"),
               run: str = typer.Option(..., help="a finished run"),
               k: int = typer.Option(50, help="drop the k most harmful samples (lowest influence)"),
               out: Path = typer.Option(..., help="export file (.npz, .csv, .parquet or .zip = imagefolder)"),
               fmt: Optional[str] = typer.Option(None, "--format", help="npz, csv, parquet or imagefolder; a text split: csv, tsv, jsonl or parquet")):
    """Export the training split without the K samples most harmful for the query set."""
    _at_least("--k", k, 1)
    _check_out(project, out)
    from diffin_core.tasks.curate import drop_most_harmful, predicted_loss_change
    scores = _run_scores(project, run)
    removed = drop_most_harmful(scores, k)
    predicted = predicted_loss_change(scores, scores["sample_id"].to_numpy()[removed])
    typer.echo(f"predicted change of the mean query loss: {predicted:+.4g} nats")
    _subset_export(project, run, out, fmt, ~removed, f"deletion: dropped the {k} most harmful (lowest influence)",
                   {"k": k, "column": "influence", "predicted_query_loss_change": predicted})


@app.command("coreset")
def coreset_cmd(project: Path = typer.Argument(..., help="project folder"),
                run: str = typer.Option(..., help="a finished run"),
                fraction: float = typer.Option(0.5, help="keep this fraction of the training set"),
                rule: str = typer.Option("ccs", help="ccs: coverage-centric sampling over the value, its lowest "
                                                     "10% per class pruned (the benchmarked rule); top: the "
                                                     "highest value per class; random"),
                value: str = typer.Option("influence", help="score column the rule reads ('random' = rule random)"),
                balanced: bool = typer.Option(True, help="rule top only: keep the same fraction of every class"),
                seed: int = typer.Option(0, help="seed of ccs's draw within a stratum and of random"),
                out: Path = typer.Option(..., help="export file (.npz, .csv, .parquet or .zip = imagefolder)"),
                fmt: Optional[str] = typer.Option(None, "--format", help="npz, csv, parquet or imagefolder; a text split: csv, tsv, jsonl or parquet")):
    """Export a coreset of FRACTION of the samples, class-balanced: by default coverage-centric
    sampling (CCS) over the run's influence (tasks.coreset_keep)."""
    _fraction("--fraction", fraction)
    _check_out(project, out)
    from diffin_core.tasks.curate import coreset_keep, coreset_selection
    scores = _run_scores(project, run)
    rule = "random" if value == "random" else rule
    if rule == "top" and not balanced:
        keep = coreset_selection(scores, fraction, value=value, balanced=False)
    else:
        keep = coreset_keep(scores, fraction, rule=rule, value=value, seed=seed)
    how = {"ccs": f"coverage-centric sampling over {value} (lowest 10% per class pruned)",
           "top": f"the top by {value}" + (" per class" if balanced else ""), "random": "a random subset per class"}
    _subset_export(project, run, out, fmt, keep, f"coreset: kept {fraction:g} by {how.get(rule, rule)}",
                   {"fraction": fraction, "rule": rule, "column": value, "balanced": balanced, "seed": seed})


@app.command("verify")
def verify_cmd(project: Path = typer.Argument(..., help="project folder (needs its \\[train] recipe)"),
               run: str = typer.Option(..., help="a finished run"),
               k: int = typer.Option(20, help="remove the k most harmful samples"),
               seed: int = typer.Option(0, help="training seed for both retrains")):
    """Retrain without the K most harmful samples; print predicted vs actual query-loss change."""
    _at_least("--k", k, 1)
    from diffin_core.tasks.curate import drop_most_harmful, verify_by_retraining
    scores = _run_scores(project, run)
    ids = scores["sample_id"].to_numpy()[drop_most_harmful(scores, k)]
    bar = Bar()
    try:
        res = verify_by_retraining(project, ids, seed=seed, progress=bar, run=run)
    finally:
        bar.close()
    b, a = res["before"], res["after"]
    typer.echo(f"removed {res['n_removed']} samples (the most harmful by {res['method']})")
    typer.echo(f"query loss      predicted change {res['predicted_loss_change']:+.4f}   "
               f"actual change {res['actual_loss_change']:+.4f}   ({b['loss']:.4f} -> {a['loss']:.4f})")
    typer.echo(f"query accuracy  actual change {res['actual_accuracy_change']:+.4f}   "
               f"({b['accuracy']:.4f} -> {a['accuracy']:.4f})")
    typer.echo(res["verdict_text"])
    typer.echo(f"stored {res['path']}")


@app.command("bench")
def bench_cmd(quick: bool = typer.Option(False, "--quick", help="smoke version (a few minutes)"),
              workers: int = typer.Option(2, help="parallel worker processes"),
              out: Optional[Path] = typer.Option(None, help="results folder")):
    """Regenerate the benchmark tables and plots (benchmarks/run.py)."""
    _at_least("--workers", workers, 1)
    import importlib.util
    from diffin_core.errors import DiffinError
    src = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
    if not src.is_file():
        raise DiffinError("the benchmarks are not part of this installation (run from a source checkout)", src)
    spec = importlib.util.spec_from_file_location("diffin_benchmarks_run", src)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = (["--quick"] if quick else []) + ["--workers", str(workers)] + (["--out", str(out)] if out else [])
    raise typer.Exit(module.main(argv) or 0)


# --- accounts (issue 20): who may sign in to the app, with which role ------------------------
users_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Local accounts of a workspace (sign-in to the app; users.json, Argon2 hashes).")
app.add_typer(users_app, name="users")
WORKSPACE_HELP = "the app's workspace (default: $DIFFIN_WORKSPACE, else ./workspace)"


def _accounts(workspace: Optional[Path]):
    from diffin_core.workspace.accounts import Accounts
    from diffin_core.workspace.appstate import workspace_dir
    return Accounts(workspace_dir(["--workspace", str(workspace)] if workspace else []))


def _password(stdin: bool) -> str:
    if stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    return typer.prompt("Password", hide_input=True, confirmation_prompt=True)


@users_app.command("add")
def users_add(name: str = typer.Argument(..., help="user name (what the review log records)"),
              role: str = typer.Option(..., "--role", metavar="admin|reviewer",
                                       help="admin: Setup, Score, Export, users; reviewer: Explore, Review, What-if"),
              workspace: Optional[Path] = typer.Option(None, help=WORKSPACE_HELP),
              password_stdin: bool = typer.Option(False, "--password-stdin",
                                                  help="read the password from the first line of stdin")):
    """Add an account (asks for its password twice unless --password-stdin)."""
    from diffin_core.workspace.accounts import check_name, check_role
    acc = _accounts(workspace)
    check_name(name), check_role(role)          # before asking for a password
    user = acc.add(name, _password(password_stdin), role)
    typer.echo(f"added {user.name} ({user.role}) to {acc.path}")


@users_app.command("list")
def users_list(workspace: Optional[Path] = typer.Option(None, help=WORKSPACE_HELP)):
    """List the accounts and their roles."""
    acc = _accounts(workspace)
    users = acc.users()
    if not users:
        typer.echo(f"no accounts in {acc.path} (the app is single-user on 127.0.0.1)")
    for u in users:
        typer.echo(f"{u.name}\t{u.role}")


@users_app.command("remove")
def users_remove(name: str = typer.Argument(...), workspace: Optional[Path] = typer.Option(None, help=WORKSPACE_HELP)):
    """Remove an account (its decisions stay in the review logs under its name)."""
    acc = _accounts(workspace)
    acc.remove(name)
    typer.echo(f"removed {name} from {acc.path}")


@users_app.command("passwd")
def users_passwd(name: str = typer.Argument(...), workspace: Optional[Path] = typer.Option(None, help=WORKSPACE_HELP),
                 password_stdin: bool = typer.Option(False, "--password-stdin",
                                                     help="read the password from the first line of stdin")):
    """Set a new password."""
    acc = _accounts(workspace)
    if acc.get(name) is None:
        raise DiffinError(f"no user {name!r}", acc.path)
    acc.set_password(name, _password(password_stdin))
    typer.echo(f"changed the password of {name}")


@users_app.command("role")
def users_role(name: str = typer.Argument(...), role: str = typer.Argument(..., metavar="admin|reviewer"),
               workspace: Optional[Path] = typer.Option(None, help=WORKSPACE_HELP)):
    """Change a user's role."""
    acc = _accounts(workspace)
    acc.set_role(name, role)
    typer.echo(f"{name} is now {role}")


@app.command("serve-check", hidden=True)
def serve_check_cmd(address: str = typer.Option("127.0.0.1", help="the address the server will listen on"),
                    workspace: Optional[Path] = typer.Option(None, help=WORKSPACE_HELP),
                    insecure_open: bool = typer.Option(False, "--insecure-open",
                                                       help="serve beyond 127.0.0.1 without sign-in, on purpose")):
    """scripts/run.sh asks this before serving: refuses a non-loopback address without accounts."""
    from diffin_core.workspace.accounts import check_serving, oidc_configured
    from diffin_core.workspace.appstate import workspace_dir
    ws = workspace_dir(["--workspace", str(workspace)] if workspace else [])
    mode = check_serving(address, ws, insecure_open, oidc=oidc_configured())
    if mode == "open":
        typer.echo(f"warning: serving on {address} WITHOUT sign-in (--insecure-open): anyone who can reach it "
                   "may upload code that runs on this server", err=True)
    elif mode == "accounts":
        users = _accounts(ws).users()
        typer.echo(f"sign-in required ({len(users)} local accounts in {ws}"
                   f"{', and OIDC from secrets.toml' if oidc_configured() else ''})", err=True)
        if users and not any(u.role == "admin" for u in users):
            typer.echo("warning: no account is an admin: nobody can set up, score or export "
                       "(diffin users role NAME admin)", err=True)


@app.command("review-settings")
def review_settings_cmd(project: Path = typer.Argument(..., help="project folder"),
                        reviewers_per_sample: Optional[int] = typer.Option(
                            None, "--reviewers-per-sample", "-k",
                            help="how many reviewers decide each sample (consensus review; default 1)"),
                        user: Optional[str] = typer.Option(None, help="who changes it (recorded; default $USER)")):
    """Show or set a project's review settings (kept in its review log)."""
    from diffin_core.project.folder import Project
    from diffin_core.workspace.accounts import open_user
    from diffin_core.workspace.review import ReviewLog
    root = Project(project).root
    with ReviewLog(root) as log:
        if reviewers_per_sample is not None:
            log.set_reviewers_per_sample(reviewers_per_sample, user=user or open_user().name)
        typer.echo(f"reviewers per sample: {log.reviewers_per_sample()}")


def _bare_ray(argv: list[str]) -> list[str]:
    """``--ray`` given without an address (last, or before another option) means "local"."""
    out = list(argv)
    for i in range(len(out) - 1, -1, -1):
        if out[i] == "--ray" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out.insert(i + 1, "local")
    return out


def _guard_os_exit() -> None:
    """A project's own code (model.py) calling ``os._exit`` ends the process with no traceback
    and no message; in the CLI's process such a call says where it came from in one line and
    exits with status 2. Calls from Python's and installed packages' code (and in forked
    children) go through unchanged."""
    import os
    real, pid = os._exit, os.getpid()
    if getattr(real, "_diffin_guard", False):
        return
    roots = tuple({str(Path(p).resolve()) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
                  | {str(Path(__file__).resolve().parent)})

    def _exit(code=0):
        if os.getpid() == pid:
            frame = sys._getframe(1)
            src = str(Path(frame.f_code.co_filename).resolve())
            if not src.startswith(roots):
                sys.stderr.write(f"error: {src}: line {frame.f_lineno} called os._exit({code}), which ended diffin "
                                 "mid-run (the run was not written)\n")
                sys.stderr.flush()
                real(2)
        real(code)

    _exit._diffin_guard = True
    os._exit = _exit


def _exit(code: int) -> None:
    """sys.exit, or os._exit after a Ray connection was abandoned mid-``ray.init`` (its C++
    threads abort the interpreter's teardown: exit status -6 after seconds, not ``code``)."""
    ray_mod = sys.modules.get("diffin_core.run.distributed")
    if ray_mod is not None and ray_mod.init_abandoned():
        import os
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _click_kinds() -> dict[str, tuple[type, ...]]:
    """click's exception classes, from click itself and from typer's vendored copy (typer >= 0.2x
    raises ``typer._click.exceptions.*``, which are not click's: an ``except click...`` misses them)."""
    import importlib
    found = {"exit": [], "abort": [], "usage": [], "click": []}
    for mod, names in (("click.exceptions", {"exit": "Exit", "abort": "Abort", "usage": "UsageError",
                                             "click": "ClickException"}),
                       ("typer._click.exceptions", {"usage": "UsageError", "click": "ClickException"}),
                       ("typer.exceptions", {"exit": "Exit", "abort": "Abort"})):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        for kind, name in names.items():
            cls = getattr(m, name, None)
            if isinstance(cls, type):
                found[kind].append(cls)
    return {k: tuple(v) for k, v in found.items()}


def _usage_error(e) -> None:
    """A usage error (a word for a number, an unknown option or command, a missing argument) as
    one line, ``error: ... (see diffin VERB --help)``, exit status 2 (click's own for usage)."""
    message = " ".join(str(e.format_message()).split())
    ctx = getattr(e, "ctx", None)
    path = getattr(ctx, "command_path", None) or "diffin"
    hint = f" (see {path} --help)" if isinstance(e, _click_kinds()["usage"]) else ""
    typer.echo(f"error: {message}{hint}", err=True)
    code = getattr(e, "exit_code", 2)
    sys.exit(code if isinstance(code, int) and code else 2)


def main(argv=None) -> None:
    _guard_os_exit()
    try:
        rc = app(args=_bare_ray(sys.argv[1:] if argv is None else argv), prog_name="diffin", standalone_mode=False)
    except DiffinError as e:
        typer.echo(f"error: {e}", err=True)
        _exit(2)
    except KeyboardInterrupt:
        rc = 130
    except Exception as e:  # click usage errors (click's own, or the click that newer typer vendors)
        kinds = _click_kinds()
        if isinstance(e, kinds["exit"]):
            sys.exit(getattr(e, "exit_code", 0))
        if isinstance(e, kinds["abort"]):
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        if isinstance(e, kinds["usage"]) or isinstance(e, kinds["click"]):
            _usage_error(e)
        raise
    # standalone_mode=False: typer turns Ctrl-C into a returned 130 and typer.Exit(n) into n
    if rc == 130:
        typer.echo("\nerror: interrupted (Ctrl-C)", err=True)
        _exit(130)
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
