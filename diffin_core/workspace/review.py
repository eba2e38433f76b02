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

Consensus (issue 20): the setting ``reviewers_per_sample`` (k, default 1; table ``settings``)
asks for k reviewers per sample. With k = 1 the state is the newest decision, as above. With
k > 1 each reviewer's newest live decision on a sample is their *vote*; the sample is decided
when k reviewers voted and all agree (the same action and label), and it is a *disagreement*
when k or more voted and they differ. An admin's *resolution* (a decision written with
``resolution=True``; column ``resolution`` = 1) overrides the votes. ``queue_done(user)`` is what
a reviewer no longer needs to see; ``disagreements()`` is the admin's queue. With k > 1 a vote's
stale check looks only at the voter's own events and at resolutions: two reviewers voting on
one sample at once is the point, not a conflict.

Bounds: in a project folder, sample ids must be the training split's and labels below its
number of classes (read from the project on the first write); a bad one is a one-line error.
"""
from __future__ import annotations

import operator
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

from diffin_core.errors import DecisionError, DiffinError

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
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    user  TEXT,
    ts    TEXT
);
"""
MAX_REVIEWERS = 20

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


class ReviewConflict(DecisionError):
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

    def __init__(self, project_dir: str | Path, *, num_classes: int | None = None,
                 sample_ids: Iterable[int] | None = None):
        """``num_classes`` / ``sample_ids``: the bounds writes are checked against (default:
        read from the project in ``project_dir`` when it is one; none otherwise)."""
        self.root = Path(project_dir)
        self.path = self.root / DB_NAME
        self._bounds = None if num_classes is None and sample_ids is None else (
            num_classes, None if sample_ids is None else {int(s) for s in sample_ids})
        self._stamp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._conn.executescript(_SCHEMA)
            cols = {r[1] for r in self._conn.execute("PRAGMA table_info(events)")}
            if "resolution" not in cols:          # logs written before consensus review
                try:
                    self._conn.execute("ALTER TABLE events ADD COLUMN resolution INTEGER NOT NULL DEFAULT 0")
                except sqlite3.OperationalError as exc:   # another process added it meanwhile
                    if "duplicate column" not in str(exc):
                        raise
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
    def _current(conn, sample_id: int, voter: str | None = None) -> tuple[str | None, int | None]:
        """The sample's newest live decision (under consensus: ``voter``'s own vote)."""
        extra, params = ("", (sample_id,)) if voter is None else (" AND user = ? AND resolution = 0",
                                                                  (sample_id, voter))
        row = conn.execute(f"WITH live AS ({_LIVE}) SELECT action, new_label FROM live "
                           f"WHERE sample_id = ?{extra} ORDER BY id DESC LIMIT 1", params).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def _index(self, value, what: str) -> int:
        """A non-negative integer (sample id or label), or a one-line DiffinError."""
        try:
            i = operator.index(value)
        except TypeError:
            raise DecisionError(f"{what} {value!r} is not an integer", self.path) from None
        if i < 0:
            raise DecisionError(f"{what} {i} is negative", self.path)
        return i

    @staticmethod
    def _version(conn, sample_id: int, scope: str | None = None) -> tuple[int, dict | None]:
        """(newest event id of the sample or 0, that event as a dict or None); with ``scope`` (a
        voter under consensus) only that user's events and resolutions count."""
        where, params = "sample_id = ?", (sample_id,)
        if scope is not None:
            where, params = where + " AND (user = ? OR resolution = 1)", (sample_id, scope)
        row = conn.execute(f"SELECT id, sample_id, action, user, ts FROM events WHERE {where} "
                           "ORDER BY id DESC LIMIT 1", params).fetchone()
        if row is None:
            return 0, None
        return row[0], dict(zip(("id", "sample_id", "action", "user", "ts"), row))

    def _scope(self, conn, user: str | None, resolution: bool = False) -> str | None:
        """Whose events a stale check compares: everyone's, or under consensus a voter's own."""
        if user is None or resolution:
            return None
        row = conn.execute("SELECT value FROM settings WHERE key = 'reviewers_per_sample'").fetchone()
        return user if row and int(row[0]) > 1 else None

    def _check_seen(self, conn, sids: list[int], seen: Mapping[int, int] | None, scope: str | None = None) -> None:
        """Raise ReviewConflict (inside the write transaction) when a sample's version moved."""
        if seen is None:
            return
        changes = []
        for sid in sids:
            version, event = self._version(conn, sid, scope)
            if version != int(seen.get(sid, 0) or 0):
                changes.append(event or {"id": 0, "sample_id": sid, "action": "undo", "user": "?", "ts": None})
        if changes:
            raise ReviewConflict(changes, len(sids), self.path)

    def bounds(self) -> tuple[int | None, set[int] | None]:
        """(number of classes, training sample ids) of the project, or Nones outside a project;
        read again when diffin.toml or the training data changed (a new upload)."""
        if self._bounds is not None and self._stamp is None:
            return self._bounds                     # given to the constructor
        if not (self.root / "diffin.toml").is_file():
            return None, None
        try:
            from diffin_core.project.folder import Project
            project = Project(self.root)
            files = [project.config_path, project.path(project.config["data"]["train"])]
            stamp = tuple(f.stat().st_mtime_ns if f.exists() else None for f in files)
            if self._bounds is None or stamp != self._stamp:
                self._bounds = (int(project.num_classes), {int(s) for s in project.train.ids})
                self._stamp = stamp
        except (DiffinError, OSError, KeyError):
            return None, None                       # a broken project: its own pages say why
        return self._bounds

    def _check(self, sample_id, action: str, new_label) -> tuple[int, int | None]:
        if action not in DECISIONS:
            raise DecisionError(f"unknown review action {action!r} (expected one of "
                              f"{', '.join(DECISIONS)})", self.path)
        sid = self._index(sample_id, "sample id")
        num_classes, ids = self.bounds()
        if ids is not None and sid not in ids:
            raise DecisionError(f"sample id {sid} is not in the training split ({len(ids):,} samples, ids "
                              f"{min(ids, default=0)}..{max(ids, default=0)}); nothing was written", self.path)
        if isinstance(new_label, Mapping):
            new_label = new_label.get(sid, new_label.get(sample_id))
        if action == "relabel":
            if new_label is None:
                raise DecisionError(f"relabel of sample {sid} needs a new label", self.path)
            lab = self._index(new_label, "label")
            if num_classes is not None and lab >= num_classes:
                raise DecisionError(f"label {lab} is out of range: the project has {num_classes} classes "
                                  f"(0..{num_classes - 1}); nothing was written", self.path)
            return sid, lab
        if new_label is not None:
            raise DecisionError(f"action {action!r} takes no new label", self.path)
        return sid, None

    # -- settings -----------------------------------------------------------------------
    def reviewers_per_sample(self) -> int:
        """k: how many reviewers decide each sample (1 unless set)."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM settings WHERE key = 'reviewers_per_sample'").fetchone()
        return int(row[0]) if row else 1

    def set_reviewers_per_sample(self, k: int, *, user: str = "local") -> None:
        try:
            k = operator.index(k)
        except TypeError:
            raise DecisionError(f"reviewers per sample {k!r} is not an integer", self.path) from None
        if not 1 <= k <= MAX_REVIEWERS:
            raise DecisionError(f"reviewers per sample must be 1 to {MAX_REVIEWERS}, not {k}", self.path)
        self._write(lambda conn: conn.execute(
            "INSERT INTO settings (key, value, user, ts) VALUES ('reviewers_per_sample', ?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, user = excluded.user, ts = excluded.ts",
            (str(k), user, _now())))

    # -- writes -------------------------------------------------------------------------
    def decide(self, sample_id: int, action: str, *, new_label: int | None = None,
               user: str = "local", run: str | None = None, method: str | None = None,
               note: str | None = None, seen: int | None = None,
               given_label: int | None = None, resolution: bool = False) -> int:
        """Record one decision; returns its event id. ``seen``: the sample's version when the
        page showed it (None: no check); ``given_label``: its label in the data (a relabel to
        the label it already has is refused); ``resolution``: an admin settling the sample
        (overrides the reviewers' votes under consensus; the caller checks the role)."""
        sid = self._index(sample_id, "sample id")
        return self.decide_many([sid], action, new_label=new_label, user=user, run=run, method=method,
                                note=note, seen=None if seen is None else {sid: seen},
                                given_labels=None if given_label is None else {sid: given_label},
                                resolution=resolution)[0]

    def decide_many(self, sample_ids: Iterable[int], action: str, *,
                    new_label: int | Mapping[int, int] | None = None,
                    user: str = "local", run: str | None = None, method: str | None = None,
                    note: str | None = None, seen: Mapping[int, int] | None = None,
                    given_labels: Mapping[int, int] | None = None, resolution: bool = False) -> list[int]:
        """Record a decision for many samples in one transaction (all or nothing); returns event
        ids. ``new_label``: one label, or {sample_id: label} for per-sample relabels.
        ``seen`` {sample_id: version} and ``given_labels`` {sample_id: label}: see ``decide``."""
        checked = [self._check(s, action, new_label) for s in sample_ids]

        def insert(conn):
            scope = self._scope(conn, user, resolution)
            self._check_seen(conn, [sid for sid, _ in checked], seen, scope)
            ids, ts = [], _now()
            for sid, lab in checked:
                prev_action, prev_label = self._current(conn, sid, scope)
                if action == "relabel":
                    current = prev_label if prev_action == "relabel" else (given_labels or {}).get(sid)
                    if current is not None and int(current) == lab:
                        raise DecisionError(f"sample {sid} already has label {lab}: choose a different "
                                          "label to relabel it; nothing was written", self.path)
                cur = conn.execute(
                    "INSERT INTO events (ts, user, sample_id, action, new_label, prev_action, "
                    "prev_label, run, method, note, resolution) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (ts, user, sid, action, lab, prev_action, prev_label, run, method, note, int(bool(resolution))))
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
                        self._check_seen(conn, [sid[0]], {sid[0]: expect}, self._scope(conn, user))
                    raise DecisionError("the decision this page offered to undo is no longer the latest; "
                                      "nothing was written", self.path)
                self._check_seen(conn, [row[1]], {row[1]: expect}, self._scope(conn, user))
            return self._revert(conn, row, user)

        return self._write(revert)

    def undo_sample(self, sample_id: int, *, user: str = "local", seen: int | None = None,
                    any_user: bool = True) -> str | None:
        """Per-sample undo: revert the decision now in force on ``sample_id``.

        ``any_user=False`` (a reviewer): only ``user``'s own newest live decision on it; when the
        decision in force is someone else's, a one-line DiffinError says whose and writes
        nothing. ``any_user=True`` (an admin): the newest live decision, whoever made it (a
        resolution first). Returns the reverted action, or None when there is nothing to undo.
        ``seen``: the sample's version when the page showed it (ReviewConflict when it moved)."""
        sid = self._index(sample_id, "sample id")

        def revert(conn):
            self._check_seen(conn, [sid], None if seen is None else {sid: seen},
                             None if any_user else self._scope(conn, user))
            live = f"SELECT id, sample_id, user, action FROM ({_LIVE}) WHERE sample_id = ?"
            if any_user:
                row = conn.execute(live + " ORDER BY resolution DESC, id DESC LIMIT 1", (sid,)).fetchone()
            else:
                row = conn.execute(live + " AND user = ? AND resolution = 0 ORDER BY id DESC LIMIT 1",
                                   (sid, user)).fetchone()
                if row is None:
                    other = conn.execute(live + " ORDER BY id DESC LIMIT 1", (sid,)).fetchone()
                    if other is not None:
                        raise DecisionError(f"the decision on sample {sid} is {other[2]}'s ({other[3]}): only "
                                          f"{other[2]} or an admin can undo it; nothing was written", self.path)
            self._revert(conn, row and row[:3], user)
            return row and row[3]

        return self._write(revert)

    def _revert(self, conn, row, user) -> int | None:
        """Append the undo event of decision ``row`` = (id, sample_id, user); returns sample id."""
        if row is None:
            return None
        event_id, sid, who = row
        res = conn.execute("SELECT resolution FROM events WHERE id = ?", (event_id,)).fetchone()[0]
        cur = conn.execute("INSERT INTO events (ts, user, sample_id, action, undoes, resolution) "
                           "VALUES (?,?,?,'undo',?,?)", (_now(), user or who, sid, event_id, res))
        restored = self._current(conn, sid)  # computed with the revert in place
        conn.execute("UPDATE events SET prev_action = ?, prev_label = ? WHERE id = ?",
                     (*restored, cur.lastrowid))
        return sid

    # -- reads --------------------------------------------------------------------------
    def state(self) -> pd.DataFrame:
        """Current (final) decision per decided sample: index sample_id; columns action, label
        (new label for "relabel", else NA; dtype Int64), user, ts, how ("single", "consensus"
        or "resolution"), voters (the users whose decisions made it, comma-separated).

        With k = 1: each sample's newest live decision. With k > 1: an admin's newest live
        resolution, else the reviewers' votes when k or more voted and all agree (user =
        the voters joined by "+", ts = the last vote); other samples are absent (undecided)."""
        k = self.reviewers_per_sample()
        if k <= 1:
            df = self._read(_STATE + " ORDER BY live.sample_id")
            df = df.rename(columns={"new_label": "label"}).set_index("sample_id")
            df["label"] = df["label"].astype("Int64")
            df["how"] = "single"
            df["voters"] = df["user"]
            return df[["action", "label", "user", "ts", "how", "voters"]]
        return self._consensus(k)[0]

    def _live(self) -> pd.DataFrame:
        df = self._read(f"SELECT id, sample_id, user, action, new_label AS label, ts, resolution "
                        f"FROM ({_LIVE}) ORDER BY id")
        df["label"] = df["label"].astype("Int64")
        return df

    def votes(self) -> pd.DataFrame:
        """Each reviewer's newest live decision per sample (resolutions excluded): columns
        sample_id, user, action, label, ts, id."""
        live = self._live()
        votes = live[live["resolution"] == 0]
        votes = votes.loc[votes.groupby(["sample_id", "user"])["id"].idxmax()] if len(votes) else votes
        return votes.sort_values("id")[["sample_id", "user", "action", "label", "ts", "id"]].reset_index(drop=True)

    def _consensus(self, k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(state, disagreements) under k reviewers per sample."""
        from diffin_core.workspace.agreement import category
        live = self._live()
        res = live[live["resolution"] == 1]
        res = res.loc[res.groupby("sample_id")["id"].idxmax()] if len(res) else res
        votes = self.votes()
        rows, disagree = [], []
        resolved = set(res["sample_id"].astype(int))
        for r in res.itertuples():
            voters = votes.loc[votes["sample_id"] == r.sample_id, "user"].tolist()
            rows.append((int(r.sample_id), r.action, r.label, r.user, r.ts, "resolution", ",".join(voters)))
        for sid, g in votes.groupby("sample_id"):
            sid = int(sid)
            if sid in resolved or len(g) < k:
                continue
            cats = {category(a, lab) for a, lab in zip(g["action"], g["label"])}
            if len(cats) == 1:
                last = g.iloc[-1]
                rows.append((sid, last["action"], last["label"], "+".join(g["user"]), last["ts"], "consensus",
                             ",".join(g["user"])))
            else:
                disagree.append({"sample_id": sid, "voters": len(g),
                                 "votes": "; ".join(f"{u}: {category(a, lab)}" for u, a, lab in
                                                    zip(g["user"], g["action"], g["label"])),
                                 "last_ts": g["ts"].iloc[-1]})
        state = pd.DataFrame(rows, columns=["sample_id", "action", "label", "user", "ts", "how", "voters"])
        state["label"] = state["label"].astype("Int64")
        state = state.set_index("sample_id").sort_index()
        cols = ["sample_id", "voters", "votes", "last_ts"]
        return state, pd.DataFrame(disagree, columns=cols).sort_values("sample_id").reset_index(drop=True)

    def disagreements(self) -> pd.DataFrame:
        """The admin's queue: samples where k or more reviewers voted and they differ, with no
        resolution yet (columns sample_id, voters, votes "ann: keep; bob: exclude", last_ts)."""
        k = self.reviewers_per_sample()
        if k <= 1:
            return pd.DataFrame(columns=["sample_id", "voters", "votes", "last_ts"])
        return self._consensus(k)[1]

    def queue_done(self, user: str) -> set[int]:
        """Samples ``user``'s review queue skips: decided ones, and under consensus also those
        they voted on and those with k votes already (waiting for agreement or an admin)."""
        k = self.reviewers_per_sample()
        state = self.state()
        done = {int(s) for s in state.index}
        if k > 1:
            votes = self.votes()
            done |= {int(s) for s in votes.loc[votes["user"] == user, "sample_id"]}
            n = votes.groupby("sample_id")["user"].count()
            done |= {int(s) for s in n.index[n >= k]}
        return done

    def reviewer_counts(self) -> pd.DataFrame:
        """Per reviewer: their live decisions (votes) by action, and resolutions written."""
        live = self._live()
        votes = self.votes()
        cols = ["keep", "exclude", "relabel"]
        if live.empty:
            return pd.DataFrame(columns=["user", "decided", *cols, "resolutions"])
        t = pd.crosstab(votes["user"], votes["action"]).reindex(columns=cols, fill_value=0) if len(votes) else \
            pd.DataFrame(columns=cols)
        res = live[live["resolution"] == 1].groupby("user")["id"].count()
        users = sorted(set(t.index) | set(res.index))
        t = t.reindex(users, fill_value=0)
        out = pd.DataFrame({"user": users, "decided": t[cols].sum(axis=1).astype(int).to_numpy()})
        for c in cols:
            out[c] = t[c].astype(int).to_numpy()
        out["resolutions"] = [int(res.get(u, 0)) for u in users]
        return out

    def agreement(self) -> dict:
        """Agreement between reviewers over the samples two or more of them decided:
        {"fleiss": kappa or None, "samples": n, "pairs": [{a, b, n, cohen}] for each pair with
        a shared sample}. Categories: keep / exclude / relabel:<label>."""
        from itertools import combinations
        from diffin_core.workspace.agreement import category, cohen_kappa, fleiss_kappa
        votes = self.votes()
        if votes.empty:
            return {"fleiss": None, "samples": 0, "pairs": []}
        votes = votes.assign(cat=[category(a, lab) for a, lab in zip(votes["action"], votes["label"])])
        by_sample = votes.groupby("sample_id")["cat"].apply(list)
        multi = by_sample[by_sample.map(len) >= 2]
        wide = votes.pivot(index="sample_id", columns="user", values="cat")
        pairs = []
        for a, b in combinations(sorted(wide.columns), 2):
            both = wide[[a, b]].dropna()
            if len(both):
                pairs.append({"a": a, "b": b, "n": int(len(both)), "cohen": cohen_kappa(both[a], both[b])})
        return {"fleiss": fleiss_kappa(multi.tolist()), "samples": int(len(multi)), "pairs": pairs}

    def versions(self, sample_ids: Iterable[int], user: str | None = None) -> dict[int, int]:
        """{sample_id: version} (newest event id, 0 for a sample with no event): what a page
        passes back as ``seen`` when the person acts on what it showed. ``user``: the voter
        under consensus (k > 1), whose own events and resolutions are all that count."""
        ids = [int(s) for s in sample_ids]
        if not ids:
            return {}
        out = dict.fromkeys(ids, 0)
        with self._lock:
            scope = self._scope(self._conn, user)
            extra, params = ("", []) if scope is None else (" AND (user = ? OR resolution = 1)", [scope])
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                rows = self._conn.execute(
                    f"SELECT sample_id, MAX(id) FROM events WHERE sample_id IN ({','.join('?' * len(chunk))})"
                    f"{extra} GROUP BY sample_id", chunk + params).fetchall()
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
