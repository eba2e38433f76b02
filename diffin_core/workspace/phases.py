"""The engine's ``progress(done, total, message)`` reports read as phases, one rule for the CLI's
bars (cli.Bar) and the app's job progress (jobs.Progress), so both count the same steps.

* A step report: ``done == 0`` and the message ends with "k/m" (or "k/m done"), e.g. one
  query-plan checkpoint. Consecutive step reports with the same text (k/m left out) and m are one
  phase of m steps; the steps are counted, so a k that counts down still fills it forwards. A k/m
  elsewhere in the text ("label issues at checkpoint 9/12 (step 504)") is no step.
* An item report: ``done > 0`` of ``total`` (samples scored). They are one phase while the total
  stays and done does not fall back.
* Anything else with ``done == 0`` announces a phase: no counter (and no ETA) until the next.

Each phase's clock starts at the report before its first (the end of the phase before), so its
rate and ETA are its own, not counted from the start of the command or job.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

_STEP_AT_END = re.compile(r"(\d+)\s*/\s*(\d+)(?:\s+done)?$")    # "... checkpoint 3/12 (done)"


def step_text(message: str) -> str:
    """A step report's description: its message without the trailing "k/m (done)"."""
    return _STEP_AT_END.sub("", message).rstrip(" :")


@dataclass
class Report:
    """How one report reads: ``kind`` "steps", "items" or "announce"; ``new``: it starts a phase
    (for "announce": a message not said just before)."""
    kind: str
    new: bool
    n: int = 0                 # steps or items done in this phase
    total: int | None = None   # the phase's steps (m) or items
    text: str = ""             # the message (a step's without its k/m)


class Phases:
    """Reads a stream of reports as phases (module docstring); ``since``: when the current phase's
    clock started."""

    def __init__(self, now: float | None = None):
        self.key = None
        self.n = 0
        self.said = None                                   # the last announcement (said once)
        self.last = time.time() if now is None else now   # when the last report came
        self.since = self.last

    def report(self, done: int, total: int | None = None, message: str = "",
               now: float | None = None) -> Report:
        now = time.time() if now is None else now
        message = " ".join(str(message).split())
        try:
            step = _STEP_AT_END.search(message) if not done else None
            if step and int(step[2]) > 0:
                m = int(step[2])
                key = ("steps", _STEP_AT_END.sub("#", message), m)
                new = key != self.key or self.n >= m       # a new phase, or the same one again
                if new:
                    self._start(key)
                self.n += min(1, m - self.n)  # the count, not the message's k (which may count down)
                return Report("steps", new, self.n, m, step_text(message))
            if not done or not total:
                new = bool(message) and message != self.said
                if new:
                    self.key, self.n, self.said = None, 0, message
                return Report("announce", new, 0, total, message)
            key = ("items", int(total))
            new = key != self.key or int(done) < self.n
            if new:
                self._start(key)
            self.n = int(done)
            return Report("items", new, self.n, int(total), message)
        finally:
            self.last = now

    def _start(self, key) -> None:
        self.key, self.n, self.said, self.since = key, 0, None, self.last
