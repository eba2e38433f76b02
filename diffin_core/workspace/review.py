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

Stale clicks: the *version* of a sample is the id of its newest event (0 when it has none). A
page reads ``versions(ids)`` when it draws a sample and passes them back as ``seen=``; inside the
write transaction every write compares them with the log and, when another tab (or person)
changed a sample meanwhile, writes nothing and raises ``ReviewConflict`` naming who and when.
"""
from __future__ import annotations

import operator
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping

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


def _when(ts: str | None) -> str:
    """An event's ISO timestamp as "2026-11-26 17:52:03 UTC"."""
    return (ts or "?")[:19].replace("T", " ") + " UTC" if ts else "?"


class ReviewConflict(DiffinError):
    """A write refused because a sample changed after the page showed it; nothing was written.

    ``changes``: one dict per changed sample (sample_id, action, user, ts, id) of its newest event.
    """

    def __init__(self, changes: list[dict], total: int, path):
        self.changes = changes
        c = changes[0]
        what = "undid a decision" if c["action"] == "undo" else f"set it to {c['action']}"
        first = f"sample {c['sample_id']} was changed by {c['user']} at {_when(c['ts'])} ({what})"
        if total == 1:
            msg = f"{first} after this page showed it; nothing was written. The page now shows the current state."
        else:
            msg = (f"{len(changes)} of the {total} selected samples changed after this page showed them "
                   f"({first}{', ...' if len(changes) > 1 else ''}); nothing was written. "
                   "The page now shows the current state.")
        super().__init__(msg, path)


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

    @staticmethod
    def _version(conn, sample_id: int) -> tuple[int, dict | None]:
        """(newest event id of the sample or 0, that event as a dict or None)."""
        row = conn.execute("SELECT id, sample_id, action, user, ts FROM events WHERE sample_id = ? "
                           "ORDER BY id DESC LIMIT 1", (sample_id,)).fetchone()
        if row is None:
            return 0, None
        return row[0], dict(zip(("id", "sample_id", "action", "user", "ts"), row))

    def _check_seen(self, conn, sids: list[int], seen: Mapping[int, int] | None) -> None:
        """Raise ReviewConflict (inside the write transaction) when a sample's version moved."""
        if seen is None:
            return
        changes = []
        for sid in sids:
            version, event = self._version(conn, sid)
            if version != int(seen.get(sid, 0) or 0):
                changes.append(event or {"id": 0, "sample_id": sid, "action": "undo", "user": "?", "ts": None})
        if changes:
            raise ReviewConflict(changes, len(sids), self.path)

    def _check(self, sample_id, action: str, new_label) -> tuple[int, int | None]:
        if action not in DECISIONS:
            raise DiffinError(f"unknown review action {action!r} (expected one of "
                              f"{', '.join(DECISIONS)})", self.path)
        sid = self._index(sample_id, "sample id")
        if isinstance(new_label, Mapping):
            new_label = new_label.get(sid, new_label.get(sample_id))
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
               note: str | None = None, seen: int | None = None,
               given_label: int | None = None) -> int:
        """Record one decision; returns its event id. ``seen``: the sample's version when the
        page showed it (None: no check); ``given_label``: its label in the data (a relabel to
        the label it already has is refused)."""
        sid = self._index(sample_id, "sample id")
        return self.decide_many([sid], action, new_label=new_label, user=user, run=run, method=method,
                                note=note, seen=None if seen is None else {sid: seen},
                                given_labels=None if given_label is None else {sid: given_label})[0]

    def decide_many(self, sample_ids: Iterable[int], action: str, *,
                    new_label: int | Mapping[int, int] | None = None,
                    user: str = "local", run: str | None = None, method: str | None = None,
                    note: str | None = None, seen: Mapping[int, int] | None = None,
                    given_labels: Mapping[int, int] | None = None) -> list[int]:
        """Record a decision for many samples in one transaction (all or nothing); returns event
        ids. ``new_label``: one label, or {sample_id: label} for per-sample relabels.
        ``seen`` {sample_id: version} and ``given_labels`` {sample_id: label}: see ``decide``."""
        checked = [self._check(s, action, new_label) for s in sample_ids]

        def insert(conn):
            self._check_seen(conn, [sid for sid, _ in checked], seen)
            ids, ts = [], _now()
            for sid, lab in checked:
                prev_action, prev_label = self._current(conn, sid)
                if action == "relabel":
                    current = prev_label if prev_action == "relabel" else (given_labels or {}).get(sid)
                    if current is not None and int(current) == lab:
                        raise DiffinError(f"sample {sid} already has label {lab}: choose a different "
                                          "label to relabel it; nothing was written", self.path)
                cur = conn.execute(
                    "INSERT INTO events (ts, user, sample_id, action, new_label, prev_action, "
                    "prev_label, run, method, note) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (ts, user, sid, action, lab, prev_action, prev_label, run, method, note))
                ids.append(cur.lastrowid)
            return ids

        return self._write(insert) if checked else []

    def undo(self, user: str | None = None, *, expect: int | None = None) -> int | None:
        """History undo: revert the most recent not-yet-reverted decision (of ``user``, or of
        anyone), whatever sample it was on.

        Appends an "undo" event whose prev_action/prev_label are the restored state. Calling it
        again walks further back. Returns the affected sample id, or None if nothing is left.
        ``expect``: the event id the page offered to undo; when the newest decision is another
        one now (or its sample changed since), raises ReviewConflict and writes nothing.
        """
        def revert(conn):
            sql = f"SELECT id, sample_id, user FROM ({_LIVE})"
            row = conn.execute(sql + (" WHERE user = ?" if user is not None else "")
                               + " ORDER BY id DESC LIMIT 1",
                               (user,) if user is not None else ()).fetchone()
            if expect is not None:
                if row is None or row[0] != expect:
                    sid = conn.execute("SELECT sample_id FROM events WHERE id = ?", (expect,)).fetchone()
                    if sid is not None:
                        self._check_seen(conn, [sid[0]], {sid[0]: expect})
                    raise DiffinError("the decision this page offered to undo is no longer the latest; "
                                      "nothing was written", self.path)
                self._check_seen(conn, [row[1]], {row[1]: expect})
            return self._revert(conn, row, user)

        return self._write(revert)

    def undo_sample(self, sample_id: int, *, user: str = "local", seen: int | None = None) -> str | None:
        """Per-sample undo: revert the decision now in force on ``sample_id`` (whoever made it).

        Returns the reverted action, or None when the sample has no decision. ``seen``: the
        sample's version when the page showed it (ReviewConflict when it moved)."""
        sid = self._index(sample_id, "sample id")

        def revert(conn):
            self._check_seen(conn, [sid], None if seen is None else {sid: seen})
            row = conn.execute(f"SELECT id, sample_id, user, action FROM ({_LIVE}) WHERE sample_id = ? "
                               "ORDER BY id DESC LIMIT 1", (sid,)).fetchone()
            self._revert(conn, row and row[:3], user)
            return row and row[3]

        return self._write(revert)

    def _revert(self, conn, row, user) -> int | None:
        """Append the undo event of decision ``row`` = (id, sample_id, user); returns sample id."""
        if row is None:
            return None
        event_id, sid, who = row
        cur = conn.execute("INSERT INTO events (ts, user, sample_id, action, undoes) "
                           "VALUES (?,?,?,'undo',?)", (_now(), user or who, sid, event_id))
        restored = self._current(conn, sid)  # computed with the revert in place
        conn.execute("UPDATE events SET prev_action = ?, prev_label = ? WHERE id = ?",
                     (*restored, cur.lastrowid))
        return sid

    # -- reads --------------------------------------------------------------------------
    def state(self) -> pd.DataFrame:
        """Current decision per decided sample: index sample_id; columns action, label
        (new label for "relabel", else NA; dtype Int64), user, ts."""
        df = self._read(_STATE + " ORDER BY live.sample_id")
        df = df.rename(columns={"new_label": "label"}).set_index("sample_id")
        df["label"] = df["label"].astype("Int64")
        return df[["action", "label", "user", "ts"]]

    def versions(self, sample_ids: Iterable[int]) -> dict[int, int]:
        """{sample_id: version} (newest event id, 0 for a sample with no event): what a page
        passes back as ``seen`` when the person acts on what it showed."""
        ids = [int(s) for s in sample_ids]
        if not ids:
            return {}
        out = dict.fromkeys(ids, 0)
        with self._lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                rows = self._conn.execute(
                    f"SELECT sample_id, MAX(id) FROM events WHERE sample_id IN ({','.join('?' * len(chunk))}) "
                    "GROUP BY sample_id", chunk).fetchall()
                out.update({int(s): int(v) for s, v in rows})
        return out

    def last_decision(self, user: str | None = None) -> dict | None:
        """The decision ``undo(user)`` would revert now: {id, sample_id, action, new_label, user,
        ts}, or None."""
        sql = f"SELECT id, sample_id, action, new_label, user, ts FROM ({_LIVE})"
        with self._lock:
            row = self._conn.execute(sql + (" WHERE user = ?" if user is not None else "")
                                     + " ORDER BY id DESC LIMIT 1",
                                     (user,) if user is not None else ()).fetchone()
        return None if row is None else dict(zip(("id", "sample_id", "action", "new_label", "user", "ts"), row))

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

    def quality(self, noisy_ids: set[int]) -> dict:
        """Precision and recall of the reviewed set against the truly mislabelled ``noisy_ids``.

        flagged = samples now excluded or relabelled; caught = flagged and noisy; noisy_reviewed
        = noisy samples with any decision (a "keep" on one is a miss). precision = caught /
        flagged, recall = caught / noisy_reviewed (None when the denominator is 0)."""
        st = self.state()
        noisy = {int(i) for i in noisy_ids}
        reviewed = {int(s) for s in st.index}
        flagged = {int(s) for s in st.index[st["action"].isin(["exclude", "relabel"])]}
        caught, noisy_reviewed = len(flagged & noisy), len(reviewed & noisy)
        return {"precision": caught / len(flagged) if flagged else None,
                "recall": caught / noisy_reviewed if noisy_reviewed else None,
                "flagged": len(flagged), "caught": caught, "noisy_reviewed": noisy_reviewed,
                "missed": noisy_reviewed - caught}

    def precision(self, noisy_ids: set[int]) -> float | None:
        """Fraction of samples currently excluded or relabelled that are in ``noisy_ids``;
        None when no sample is excluded or relabelled."""
        st = self.state()
        flagged = st.index[st["action"].isin(["exclude", "relabel"])]
        if len(flagged) == 0:
            return None
        noisy = {int(i) for i in noisy_ids}
        return sum(int(s) in noisy for s in flagged) / len(flagged)
