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


class JobCancelled(Exception):
    """Raised inside a background job (workspace.jobs) once cancel was requested."""
