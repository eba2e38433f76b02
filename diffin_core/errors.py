"""The one error type users see: a single line naming the file and the problem."""
from __future__ import annotations

from pathlib import Path


class DiffinError(Exception):
    """A user-facing problem with an input.

    ``str(err)`` is one line: ``"<file>: <problem>"`` (or just the problem when no file is
    involved). The CLI prints it without a traceback; the app shows it on the page.
    """

    def __init__(self, problem: str, path: str | Path | None = None):
        self.problem = " ".join(str(problem).split())
        self.path = None if path is None else str(path)
        super().__init__(self.problem if self.path is None else f"{self.path}: {self.problem}")

    def brief(self) -> str:
        """What the app shows: the problem, after the file's name only (never the server's folders)."""
        return self.problem if self.path is None else f"{Path(self.path).name}: {self.problem}"


class DecisionError(DiffinError):
    """A refused review decision (bad id or label, a stale page, another reviewer's decision).
    ``str()`` names the review log like any input error (the CLI prints it); ``brief()``, what
    the app shows a reviewer, is the problem alone: the log's file says nothing to them."""

    def brief(self) -> str:
        return self.problem


class JobCancelled(Exception):
    """Raised inside a background job (workspace.jobs) once cancel was requested."""


_cancel_check = None        # set in a warm child (workspace.usercode): true once its call was cancelled


def check_cancelled() -> None:
    """Raise JobCancelled when the warm child's current call was cancelled (a no-op elsewhere):
    long computations call it between their steps (the query plan, once per checkpoint)."""
    if _cancel_check is not None and _cancel_check():
        raise JobCancelled()
