"""What a reviewer working through many suspects needs beside the log (issue 21): filters over
a run's scores, the pace of the current review session, and the expected number of label
errors left. No Streamlit here: the Review and Explore pages are thin views over these.

Filters (``Filter`` / ``apply``): given class, predicted class, review state (undecided, keep,
exclude, relabel), a score range, sample ids ("12, 40-45") and a case-insensitive substring
of the sample's text where the data has text. Every part is optional; parts combine with AND.

Pace (``pace``): a reviewer's *session* is their run of decisions with no pause longer than
``SESSION_GAP_S``, ending with their newest one; decided per minute is (n - 1) decisions over
the time from the first to the last of them (n decisions span n - 1 intervals).

Expected label errors (``expected_errors``): for a run whose label_issue is a calibrated
estimated leave-one-out loss in nats (diffin: loss + Diff-In self-influence at the best
checkpoint), q = exp(-label_issue) is the held-out probability of the given label. With a label
noise rate e and flips spread evenly over the other K - 1 classes, Bayes gives

    P(label wrong | q) = (1 - q) e / (K - 1)  /  ( (1 - q) e / (K - 1) + q (1 - e) )

and e is fitted as the mean of that posterior (EM, a fixed point), the reviewer's own decisions
standing in for the posterior of the samples they decided (exclude / relabel = wrong, keep =
right). The sum over undecided samples is the expected number of errors left. What it assumes
(an uncalibrated LOO probability, class-dependent flips) is said beside the figure; how close it
came on the sample project is measured by benchmarks/review_estimate.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pandas as pd

from diffin_core.errors import DiffinError

STATES = ("undecided", "keep", "exclude", "relabel")
SESSION_GAP_S = 600.0          # a pause longer than this starts a new review session
# label_issue is an estimated leave-one-out loss in nats whose self-influence is calibrated
# (tasks/methodinfo: the deletion benchmark) only for these methods
LOO_LOSS_METHODS = ("diffin",)


@dataclass
class Filter:
    """A filter over a scores table; None / empty = that part does not filter."""
    given: list[int] = field(default_factory=list)      # given (training) label in these classes
    pred: list[int] = field(default_factory=list)       # model's prediction in these classes
    states: list[str] = field(default_factory=list)     # review state in these (STATES)
    score_col: str = "label_issue"
    score_range: tuple[float, float] | None = None      # inclusive
    ids: str = ""                                       # "12, 40-45"
    text: str = ""                                      # substring of the sample's text

    def active(self) -> bool:
        return bool(self.given or self.pred or self.states or self.score_range is not None
                    or self.ids.strip() or self.text.strip())

    def describe(self, label_name=str) -> str:
        """One line for a caption: 'given 3, 5 · state undecided · label_issue 1.2..4'."""
        parts = []
        if self.given:
            parts.append("given " + ", ".join(label_name(y) for y in self.given))
        if self.pred:
            parts.append("predicted " + ", ".join(label_name(y) for y in self.pred))
        if self.states:
            parts.append("state " + ", ".join(self.states))
        if self.score_range is not None:
            parts.append(f"{self.score_col} {self.score_range[0]:.3g}..{self.score_range[1]:.3g}")
        if self.ids.strip():
            parts.append(f"ids {self.ids.strip()}")
        if self.text.strip():
            parts.append(f"text contains “{self.text.strip()}”")
        return " · ".join(parts) or "no filter"


def parse_ids(text: str) -> set[int]:
    """Sample ids from '12, 40-45 #7' (commas, spaces, ranges, an optional #); a one-line
    DiffinError names a part that is not an id or a range."""
    out: set[int] = set()
    for part in re.split(r"[,\s]+", str(text).strip()):
        part = part.lstrip("#")
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise DiffinError(f"{part!r} is not a sample id or a range like 40-45")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        if b < a:
            raise DiffinError(f"the range {part!r} runs backwards")
        if b - a > 1_000_000:
            raise DiffinError(f"the range {part!r} is longer than a million ids")
        out.update(range(a, b + 1))
    return out


def review_state(sample_ids, state: pd.DataFrame, done=None) -> np.ndarray:
    """Each sample's review state (STATES) from ReviewLog.state() (index sample_id, column action).
    ``done`` (ReviewLog.queue_done(user), under consensus): a sample outside it is "undecided" for
    this reviewer; one inside it without a final decision (voted, waiting) is "" (no state)."""
    action = dict(zip(state.index.astype(int), state["action"])) if len(state) else {}
    ids = np.asarray(sample_ids, dtype=np.int64)
    out = np.array([action.get(int(i), "undecided") for i in ids], dtype=object)
    if done is not None:
        inside = np.isin(ids, np.fromiter((int(i) for i in done), dtype=np.int64))
        out[~inside] = "undecided"
        out[inside & (out == "undecided")] = ""
    return out


def mask(scores: pd.DataFrame, f: Filter, state: pd.DataFrame | None = None, texts=None, done=None) -> np.ndarray:
    """Boolean mask of the rows of ``scores`` that pass ``f``. ``state``: ReviewLog.state() (needed
    when f.states is set); ``texts``: a callable rows -> list of str (needed when f.text is set);
    ``done``: see review_state (a reviewer's own queue under consensus)."""
    keep = np.ones(len(scores), dtype=bool)
    if f.given:
        keep &= scores["label"].isin([int(y) for y in f.given]).to_numpy()
    if f.pred:
        keep &= scores["pred"].isin([int(y) for y in f.pred]).to_numpy()
    if f.states:
        bad = set(f.states) - set(STATES)
        if bad:
            raise DiffinError(f"unknown review state {sorted(bad)[0]!r} (expected one of {', '.join(STATES)})")
        if state is None:
            raise DiffinError("a filter by review state needs the review log's state")
        keep &= np.isin(review_state(scores["sample_id"], state, done), list(f.states))
    if f.score_range is not None:
        if f.score_col not in scores.columns:
            raise DiffinError(f"this run has no {f.score_col} column to filter by")
        lo, hi = f.score_range
        v = scores[f.score_col].to_numpy(dtype=float)
        keep &= (v >= lo) & (v <= hi)          # NaN never passes
    if f.ids.strip():
        keep &= scores["sample_id"].isin(parse_ids(f.ids)).to_numpy()
    needle = f.text.strip().casefold()
    if needle:
        if texts is None:
            raise DiffinError("this project's samples have no text to search")
        rows = np.flatnonzero(keep)
        hit = np.asarray([needle in t.casefold() for t in texts(rows)], dtype=bool)
        keep[rows[~hit]] = False
    return keep


def apply(scores: pd.DataFrame, f: Filter, state: pd.DataFrame | None = None, texts=None, done=None) -> pd.DataFrame:
    """The rows of ``scores`` that pass ``f`` (order kept)."""
    return scores[mask(scores, f, state, texts, done)]


def pace(history: pd.DataFrame, user: str, now: datetime | None = None, gap_s: float = SESSION_GAP_S) -> dict:
    """The pace of ``user``'s current review session from ReviewLog.history() (their keep /
    relabel / exclude events; an undo is not a decision). Returns {decisions, minutes,
    per_minute (None with fewer than 2 decisions), started (ISO ts or None), idle_s (since the
    last decision; None without one)}. A session ends after a pause longer than ``gap_s``."""
    ev = history[(history["user"] == user) & (history["action"] != "undo")] if len(history) else history
    none = {"decisions": 0, "minutes": 0.0, "per_minute": None, "started": None, "idle_s": None}
    if len(ev) == 0:
        return none
    ts = pd.to_datetime(ev["ts"], utc=True, format="ISO8601").dt.tz_convert(None).sort_values().to_numpy()
    gaps = np.diff(ts) / np.timedelta64(1, "s")
    breaks = np.flatnonzero(gaps > gap_s)
    start = int(breaks[-1]) + 1 if len(breaks) else 0
    sess = ts[start:]
    now = pd.Timestamp.now(tz="UTC") if now is None else pd.Timestamp(now)
    now = now.tz_localize("UTC") if now.tzinfo is None else now.tz_convert("UTC")
    idle = (now.tz_localize(None).to_datetime64() - sess[-1]) / np.timedelta64(1, "s")
    if idle > gap_s:                       # the last session is over: a new one has not begun
        return {**none, "idle_s": float(idle)}
    minutes = float((sess[-1] - sess[0]) / np.timedelta64(1, "s")) / 60.0
    n = len(sess)
    return {"decisions": n, "minutes": minutes,
            "per_minute": (n - 1) / minutes if n >= 2 and minutes > 0 else None,
            "started": pd.Timestamp(sess[0]).tz_localize("UTC").isoformat(), "idle_s": float(idle)}


def error_posterior(label_issue, num_classes: int, known=None, iters: int = 1000, tol: float = 1e-10):
    """(P(label wrong) per sample, fitted noise rate e) under the model of the module docstring.
    ``known``: per sample 1.0 (decided wrong), 0.0 (decided right) or NaN (undecided)."""
    if num_classes < 2:
        raise DiffinError("expected label errors need at least 2 classes")
    li = np.asarray(label_issue, dtype=np.float64)
    q = np.exp(-np.clip(np.nan_to_num(li, nan=0.0), 0.0, None))   # held-out P(given label)
    fixed = None if known is None else np.asarray(known, dtype=np.float64)
    has = None if fixed is None else ~np.isnan(fixed)
    e = 0.1
    post = np.zeros_like(q)
    for _ in range(iters):
        a = (1.0 - q) * e / (num_classes - 1)
        b = q * (1.0 - e)
        post = np.divide(a, a + b, out=np.zeros_like(a), where=(a + b) > 0)
        if has is not None:
            post[has] = fixed[has]
        new = float(np.clip(post.mean(), 1e-6, 1 - 1e-6)) if len(post) else e
        if abs(new - e) < tol:
            e = new
            break
        e = new
    return post, e


def applies(method: str) -> bool:
    """Whether a run of ``method`` has a label_issue the expected-errors model can read."""
    return method in LOO_LOSS_METHODS


def expected_errors(scores: pd.DataFrame, state: pd.DataFrame, num_classes: int, method: str,
                    among=None) -> dict | None:
    """The expected number of label errors among the undecided samples, the same among the sample
    ids ``among`` (e.g. the filtered queue), and the model's own check on what was decided.

    Returns None when the run's label_issue is not a calibrated leave-one-out loss (``applies``);
    else {left, undecided, left_among (None without ``among``), noise_rate, total, decided, found
    (decided wrong), predicted (the model's expected count over the decided samples, without
    their decisions)}."""
    if not applies(method) or "label_issue" not in scores.columns:
        return None
    ids = scores["sample_id"].to_numpy()
    st = review_state(ids, state)
    known = np.full(len(ids), np.nan)
    known[np.isin(st, ("exclude", "relabel"))] = 1.0
    known[st == "keep"] = 0.0
    li = scores["label_issue"].to_numpy()
    post, e = error_posterior(li, num_classes, known)
    undecided = st == "undecided"
    decided = ~undecided
    prior = error_posterior(li, num_classes)[0] if decided.any() else post
    left_among = None
    if among is not None:
        left_among = float(post[undecided & np.isin(ids, np.fromiter((int(i) for i in among), dtype=np.int64))].sum())
    return {"left": float(post[undecided].sum()), "undecided": int(undecided.sum()), "left_among": left_among,
            "noise_rate": e, "total": float(post.sum()), "decided": int(decided.sum()),
            "found": int(np.nansum(known)), "predicted": float(prior[decided].sum())}
