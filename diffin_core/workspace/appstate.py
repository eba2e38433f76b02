"""Workspace helpers for the app: where projects live, listing them, copying the sample project.

No Streamlit here: the pages call these and show the results.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from diffin_core.errors import DiffinError
from diffin_core.project.folder import CONFIG_NAME, Project

ENV_VAR = "DIFFIN_WORKSPACE"
SAMPLE_NAME = "mnist-sample"


def workspace_dir(argv: list[str] | None = None) -> Path:
    """``--workspace DIR`` from argv, else $DIFFIN_WORKSPACE, else ./workspace (made if absent)."""
    argv = list(argv or [])
    path = None
    for i, a in enumerate(argv):
        if a == "--workspace" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--workspace="):
            path = a.split("=", 1)[1]
    path = Path(path or os.environ.get(ENV_VAR) or "workspace").expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiffinError(f"cannot use it as the workspace folder ({e.strerror or e})", path) from None
    return path


def list_projects(workspace: str | Path) -> list[Path]:
    """Project folders (holding diffin.toml) directly inside the workspace, by name."""
    ws = Path(workspace)
    return sorted(p for p in ws.iterdir() if (p / CONFIG_NAME).is_file()) if ws.is_dir() else []


def open_project(folder: str | Path) -> Project:
    """Open a project; a DiffinError names what is wrong."""
    return Project(folder)


def copy_sample(workspace: str | Path) -> Path:
    """Copy the shipped MNIST sample project into the workspace (once) and return its folder."""
    from diffin_core.project.sample import SAMPLE_DIR
    src, dest = SAMPLE_DIR / "mnist", Path(workspace) / SAMPLE_NAME
    if not (src / CONFIG_NAME).is_file():
        raise DiffinError("the sample project is missing; run `python -m diffin_core.project.sample`", src)
    if not (dest / CONFIG_NAME).is_file():
        tmp = dest.with_name(f".{dest.name}.copying")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("runs", "review.sqlite*", "exports", "prebuilt"))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return dest


TEXT_SAMPLE_NAME = "sms-spam-sample"


def text_sample_dir(workspace: str | Path) -> Path:
    """Where the text sample project lives in a workspace (built there or copied, once)."""
    return Path(workspace) / TEXT_SAMPLE_NAME


def text_sample_ready(workspace: str | Path) -> bool:
    return (text_sample_dir(workspace) / CONFIG_NAME).is_file()


def copy_text_sample(workspace: str | Path, progress=None) -> str:
    """The text sample (SMS spam, project/sample_text.py) in the workspace: copied from
    sample_data/sms-spam when that was built, else built there (tokenizer + the Trainer run,
    about a minute on 2 CPU cores). Runs the sample's training code: call it in a child process
    from the app (JobManager.submit_child). Returns the folder."""
    from diffin_core.project.sample_text import NAME, SAMPLE_DIR, build_text_sample
    dest = text_sample_dir(workspace)
    if text_sample_ready(workspace):
        return str(dest)
    if progress:
        progress(0, 1, "building the SMS spam sample: tokenizer, then the Trainer run")
    src = SAMPLE_DIR / NAME
    if (src / CONFIG_NAME).is_file():
        tmp = dest.with_name(f".{dest.name}.copying")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("runs", "review.sqlite*", "exports", "tokenized"))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    else:
        build_text_sample(dest)
    if progress:
        progress(1, 1, "built")
    return str(dest)


def install_prebuilt(project_dir: str | Path) -> bool:
    """The sample's shipped diffin run into the workspace copy (run/prebuilt.py), when it has no
    runs yet; True when installed (the caller queues its check)."""
    from diffin_core.project.sample import SAMPLE_DIR
    from diffin_core.run.prebuilt import install
    return install(SAMPLE_DIR / "mnist", Path(project_dir))


def safe_name(name: str) -> str:
    """A plain folder name from user text (letters, digits, - _ .), or a DiffinError."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", name.strip()).strip("-.")
    if not clean:
        raise DiffinError(f"{name!r} is not usable as a folder name")
    return clean


def noisy_ids(scores) -> set[int] | None:
    """Sample ids whose given label differs from the known true label (None when unknown)."""
    if "true_label" not in scores.columns:
        return None
    bad = scores["label"] != scores["true_label"]
    return set(int(i) for i in scores.loc[bad, "sample_id"])


def preferred_run(runs) -> str | None:
    """The default run for review: the newest "diffin" run, else the newest run."""
    for r in runs:
        if r.method == "diffin":
            return r.name
    return runs[0].name if runs else None


LAST = ".diffin-last-project"


def remember(workspace: str | Path, project_dir: str | Path) -> None:
    """Note the last opened project, so a page opened by URL finds it."""
    try:
        (Path(workspace) / LAST).write_text(str(Path(project_dir).resolve()))
    except OSError:
        pass


def last_project(workspace: str | Path) -> str | None:
    """The last opened project of this workspace (if it still exists), else its only project."""
    p = Path(workspace) / LAST
    try:
        last = p.read_text().strip() if p.is_file() else ""
    except OSError:
        last = ""
    if last and (Path(last) / CONFIG_NAME).is_file():
        return last
    projects = list_projects(workspace)
    return str(projects[0]) if len(projects) == 1 else None
