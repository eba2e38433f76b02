"""The ``diffin`` command line. Errors print as one line (no traceback) and exit with status 2.

    diffin score PROJECT --method diffin [--run NAME] [--device auto]
    diffin top PROJECT --run NAME --query-index 3 [--k 10]
    diffin demo [--workspace ./workspace]
    diffin methods
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import DiffinError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Find helpful, harmful and mislabelled training samples (Diff-In influence).")


class Bar:
    """tqdm progress bar driven by the engine's progress(done, total, message) callback."""

    def __init__(self):
        from tqdm import tqdm
        self.bar = tqdm(total=0, unit="sample", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if total and self.bar.total != total:
            self.bar.reset(total=total)
        self.bar.set_description(message[:60], refresh=False)
        self.bar.n = done
        self.bar.refresh()

    def close(self):
        self.bar.close()


def _score(project, method: str, run: Optional[str], device: str) -> Path:
    from .methods import ScoreSettings
    from .scoring import score
    bar = Bar()
    try:
        return score(project, method, run, ScoreSettings(device=device), progress=bar)
    finally:
        bar.close()


@app.command("score")
def score_cmd(project: Path = typer.Argument(..., help="project folder (holds diffin.toml)"),
              method: List[str] = typer.Option(["diffin"], "--method", "-m", help="estimator; repeat for several"),
              run: Optional[str] = typer.Option(None, help="run name (default: METHOD-N)"),
              device: str = typer.Option("auto", help="auto picks cuda, then mps, then cpu")):
    """Score every training sample; writes runs/<run>/scores.parquet and meta.json."""
    for m in method:
        out = _score(project, m, run if len(method) == 1 else None, device)
        typer.echo(f"{m}: wrote {out / 'scores.parquet'}")


@app.command("top")
def top_cmd(project: Path = typer.Argument(...), run: str = typer.Option(..., help="a finished run"),
            query_index: List[int] = typer.Option(..., "--query-index", "-q", help="query sample index; repeat for a set"),
            k: int = typer.Option(10, help="how many of each")):
    """Print the most helpful and most harmful training samples for query sample(s)."""
    from .scoring import top_k
    bar = Bar()
    try:
        helpful, harmful = top_k(project, run, query_index, k, progress=bar)
    finally:
        bar.close()
    for title, table in (("most helpful (removing them raises the query loss)", helpful),
                         ("most harmful (removing them lowers the query loss)", harmful)):
        typer.echo(f"\n{title}:")
        typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


@app.command("methods")
def methods_cmd():
    """List the estimators."""
    from .methods import METHODS
    for name, cls in METHODS.items():
        typer.echo(f"{name:20s} {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")


@app.command("demo")
def demo_cmd(workspace: Path = typer.Option(Path("workspace"), help="where the sample project is copied"),
             method: List[str] = typer.Option(["diffin", "tracin", "loss"], "--method", "-m"),
             device: str = typer.Option("auto")):
    """Copy the sample MNIST project into the workspace (building it if missing) and score it."""
    from .project import Project
    from .sample import SAMPLE_DIR, build_sample_project
    src = SAMPLE_DIR / "mnist"
    if not (src / "diffin.toml").is_file():
        typer.echo("building the sample project (about 10 s)...")
        build_sample_project(src)
    dest = workspace / "mnist-sample"
    if not (dest / "diffin.toml").is_file():
        workspace.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("runs", "review.sqlite*", "exports"))
    project = Project(dest)
    done = {r.method for r in project.runs()}
    for m in method:
        if m in done:
            typer.echo(f"{m}: already scored in {dest}/runs")
            continue
        out = _score(project, m, m, device)
        typer.echo(f"{m}: wrote {out / 'scores.parquet'}")
    typer.echo(f"sample project ready: {dest}")


def main(argv=None) -> None:
    try:
        app(args=argv, prog_name="diffin", standalone_mode=False)
    except DiffinError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # click usage errors
        import click
        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
