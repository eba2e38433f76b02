"""Review decisions log: an append-only SQLite event log at ``<project>/review.sqlite``.

Every decision a person makes on a training sample (keep / relabel / exclude) is one row in
``events``, committed at once. ``undo`` never deletes: it appends an "undo" event naming the
decision it reverts (``undoes``). The current state of a sample is its most recent decision
that has not been reverted; a sample with none is "undecided" and absent from ``state()``.

Columns of ``events``: id (autoincrement), ts (ISO 8601 UTC), user, sample_id (int >= 0),
action ("keep"|"relabel"|"exclude"|"undo"), new_label (int, relabel only), prev_action and
prev_label (the sample's state before this event; for an "undo" event, the state it restores),
run, method, note (nullable strings), undoes (id of the reverted decision, undo only).

Concurrency: one connection per ``ReviewLog`` (``check_same_thread=False``) guarded by a lock,
WAL journal, and ``BEGIN IMMEDIATE`` write transactions, so several Streamlit sessions, threads
and processes can share one file.
"""
from __future__ import annotations

import operator
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import pandas as pd

from diffin_core.errors import DiffinError

DECISIONS = ("keep", "relabel", "exclude")
DB_NAME = "review.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    ts          TEXT    NOT NULL,
    user        TEXT    NOT NULL,
    sample_id   INTEGER NOT NULL CHECK (sample_id >= 0),
    action      TEXT    NOT NULL CHECK (action IN ('keep', 'relabel', 'exclude', 'undo')),
    new_label   INTEGER,
    prev_action TEXT,
    prev_label  INTEGER,
    run         TEXT,
    method      TEXT,
    note        TEXT,
    undoes      INTEGER REFERENCES events(id)
);
CREATE INDEX IF NOT EXISTS events_sample ON events(sample_id);
CREATE INDEX IF NOT EXISTS events_undoes ON events(undoes);
"""

# Decisions that are still in force (not reverted by an undo event).
_LIVE = ("SELECT * FROM events WHERE action != 'undo' "
         "AND id NOT IN (SELECT undoes FROM events WHERE undoes IS NOT NULL)")
# The latest live decision of each sample = its current state.
_STATE = (f"WITH live AS ({_LIVE}) SELECT live.sample_id, live.action, live.new_label, live.user, "
          "live.ts FROM live JOIN (SELECT MAX(id) AS id FROM live GROUP BY sample_id) last "
          "ON live.id = last.id")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class ReviewLog:
    """The decisions log of one project folder (created on first use)."""

    def __init__(self, project_dir: str | Path):
        self.path = Path(project_dir) / DB_NAME
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._conn.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise DiffinError(f"cannot open the review log ({exc})", self.path) from exc
        self._lock = threading.RLock()

    # -- plumbing -----------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "ReviewLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, fn):
        """Run ``fn(conn)`` in one immediate (write-locked) transaction; commit or roll back."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise DiffinError(f"cannot write the review log ({exc})", self.path) from exc
            try:
                result = fn(self._conn)
                self._conn.execute("COMMIT")
                return result
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: tuple = ()) -> pd.DataFrame:
        with self._lock:
            return pd.read_sql_query(sql, self._conn, params=params)

    @staticmethod
    def _current(conn, sample_id: int) -> tuple[str | None, int | None]:
        row = conn.execute(f"WITH live AS ({_LIVE}) SELECT action, new_label FROM live "
                           "WHERE sample_id = ? ORDER BY id DESC LIMIT 1", (sample_id,)).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def _index(self, value, what: str) -> int:
        """A non-negative integer (sample id or label), or a one-line DiffinError."""
        try:
            i = operator.index(value)
        except TypeError:
            raise DiffinError(f"{what} {value!r} is not an integer", self.path) from None
        if i < 0:
            raise DiffinError(f"{what} {i} is negative", self.path)
        return i

    def _check(self, sample_id, action: str, new_label) -> tuple[int, int | None]:
        if action not in DECISIONS:
            raise DiffinError(f"unknown review action {action!r} (expected one of "
                              f"{', '.join(DECISIONS)})", self.path)
        sid = self._index(sample_id, "sample id")
        if action == "relabel":
            if new_label is None:
                raise DiffinError(f"relabel of sample {sid} needs a new label", self.path)
            return sid, self._index(new_label, "label")
        if new_label is not None:
            raise DiffinError(f"action {action!r} takes no new label", self.path)
        return sid, None

    # -- writes -------------------------------------------------------------------------
    def decide(self, sample_id: int, action: str, *, new_label: int | None = None,
               user: str = "local", run: str | None = None, method: str | None = None,
               note: str | None = None) -> int:
        """Record one decision; returns its event id."""
        return self.decide_many([sample_id], action, new_label=new_label, user=user, run=run,
                                method=method, note=note)[0]

    def decide_many(self, sample_ids: Iterable[int], action: str, *, new_label: int | None = None,
                    user: str = "local", run: str | None = None, method: str | None = None,
                    note: str | None = None) -> list[int]:
        """Record the same decision for many samples in one transaction; returns event ids."""
        checked = [self._check(s, action, new_label) for s in sample_ids]

        def insert(conn):
            ids, ts = [], _now()
            for sid, lab in checked:
                prev_action, prev_label = self._current(conn, sid)
                cur = conn.execute(
                    "INSERT INTO events (ts, user, sample_id, action, new_label, prev_action, "
                    "prev_label, run, method, note) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (ts, user, sid, action, lab, prev_action, prev_label, run, method, note))
                ids.append(cur.lastrowid)
            return ids

        return self._write(insert) if checked else []

    def undo(self, user: str | None = None) -> int | None:
        """Revert the most recent not-yet-reverted decision (of ``user``, or of anyone).

        Appends an "undo" event whose prev_action/prev_label are the restored state. Calling it
        again walks further back. Returns the affected sample id, or None if nothing is left.
        """
        def revert(conn):
            sql = f"SELECT id, sample_id, user FROM ({_LIVE})"
            row = conn.execute(sql + (" WHERE user = ?" if user is not None else "")
                               + " ORDER BY id DESC LIMIT 1",
                               (user,) if user is not None else ()).fetchone()
            if row is None:
                return None
            event_id, sid, who = row
            cur = conn.execute("INSERT INTO events (ts, user, sample_id, action, undoes) "
                               "VALUES (?,?,?,'undo',?)", (_now(), user or who, sid, event_id))
            restored = self._current(conn, sid)  # computed with the revert in place
            conn.execute("UPDATE events SET prev_action = ?, prev_label = ? WHERE id = ?",
                         (*restored, cur.lastrowid))
            return sid

        return self._write(revert)

    # -- reads --------------------------------------------------------------------------
    def state(self) -> pd.DataFrame:
        """Current decision per decided sample: index sample_id; columns action, label
        (new label for "relabel", else NA; dtype Int64), user, ts."""
        df = self._read(_STATE + " ORDER BY live.sample_id")
        df = df.rename(columns={"new_label": "label"}).set_index("sample_id")
        df["label"] = df["label"].astype("Int64")
        return df[["action", "label", "user", "ts"]]

    def history(self, sample_id: int | None = None) -> pd.DataFrame:
        """All events in order (or those of one sample), one row per event."""
        if sample_id is None:
            return self._read("SELECT * FROM events ORDER BY id")
        return self._read("SELECT * FROM events WHERE sample_id = ? ORDER BY id",
                          (int(sample_id),))

    def counts(self, total: int) -> dict[str, int]:
        """Progress over ``total`` samples: reviewed, remaining, excluded, relabelled, kept."""
        actions = self.state()["action"].value_counts()
        reviewed = int(actions.sum())
        return {"reviewed": reviewed, "remaining": max(int(total) - reviewed, 0),
                "excluded": int(actions.get("exclude", 0)),
                "relabelled": int(actions.get("relabel", 0)),
                "kept": int(actions.get("keep", 0))}

    def precision(self, noisy_ids: set[int]) -> float | None:
        """Fraction of samples currently excluded or relabelled that are in ``noisy_ids``;
        None when no sample is excluded or relabelled."""
        st = self.state()
        flagged = st.index[st["action"].isin(["exclude", "relabel"])]
        if len(flagged) == 0:
            return None
        noisy = {int(i) for i in noisy_ids}
        return sum(int(s) in noisy for s in flagged) / len(flagged)
