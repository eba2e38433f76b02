"""Atomic writes: a temporary file (or folder) in the same folder, then a rename over the target.

A crash or an error half-way leaves the old file (or no file) in place, never a partial one.
Folders (a run) are published as a link to a version folder swapped with ``os.replace``; see
``replace_dir`` and ``recover_dirs``.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it onto ``target``.

    The temp file keeps the target's suffix (so writers that infer a format from it work).
    On any exception the temp file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or target.suffix or ".tmp",
                               dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; give the file the usual mode
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes(target: str | Path, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | Path, text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


# --- folders: runs/<run> published whole, replaced without a moment of "no run" ----------------
#
# A published folder ``<parent>/<name>`` is a symbolic link to a hidden version folder
# ``.<name>.v-<pid>-<ns>`` beside it. A new version is written into ``.<name>.tmp-<pid>-<ns>``,
# renamed to a version, and a fresh link is swapped in with ``os.replace`` (atomic on POSIX):
# readers always see the old version or the new one, never none. Every hidden helper carries
# the writer's pid, so ``recover_dirs`` (on start) can tell a crashed writer's leftovers from a
# live writer's work: it removes dead writers' temp folders, links and unused versions, and
# when a kill mid-swap left ``<name>`` missing, points it at the newest complete version; a
# ``<name>`` deleted by hand (its link removed) stays deleted, its versions are removed.

_HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|v|link|old)-(?P<stamp>[0-9]+(?:-[0-9]+)?)(?:-legacy)?$")
LEGACY_STALE_S = 15 * 60      # helpers without a pid (older diffin) are leftovers after this


def _stamp() -> str:
    return f"{os.getpid()}-{time.time_ns()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _age_key(path: Path) -> tuple[int, int]:
    """Creation order of a helper: the ns in its name, else its mtime (ns); on a tie a moved-
    aside "-legacy" folder counts as older than the version that replaced it."""
    m = _HIDDEN.match(path.name)
    newer = 0 if path.name.endswith("-legacy") else 1
    if m and "-" in m["stamp"]:
        return int(m["stamp"].split("-")[1]), newer
    return path.lstat().st_mtime_ns, newer


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty hidden temp folder beside ``final``; on success publish it as ``final``
    (``replace_dir``); on any exception remove it and leave ``final`` as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{_stamp()}"
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: str | Path, final: str | Path) -> Path:
    """Make ``final`` name the complete folder ``src`` (moved, not copied); the previous
    content of ``final`` (a version link or, from older diffin, a real folder) is removed after
    the swap. At no moment is ``final`` missing, except in the one-time move of a pre-existing
    real folder, which ``recover_dirs`` repairs."""
    src, final = Path(src), Path(final)
    parent, stamp = final.parent, _stamp()
    version = parent / f".{final.name}.v-{stamp}"
    os.rename(src, version)
    old = None
    if final.is_symlink():
        old = parent / os.readlink(final)
    elif final.exists():               # a real folder (written before versions existed)
        old = parent / f".{final.name}.v-{stamp}-legacy"
        os.rename(final, old)          # crash window: repaired by recover_dirs (newest version)
    link = parent / f".{final.name}.link-{stamp}"
    try:
        os.symlink(version.name, link, target_is_directory=True)
    except (OSError, NotImplementedError):   # no symlinks here: plain rename, repaired on start
        if final.exists():
            os.rename(final, parent / f".{final.name}.old-{stamp}")
            old = parent / f".{final.name}.old-{stamp}"
        os.rename(version, final)
    else:
        os.replace(link, final)
    if old is not None and old.resolve() != version.resolve():
        _remove(old)
    return final


def recover_dirs(parent: str | Path) -> list[str]:
    """Repair ``parent`` after a crash mid-write (safe while live writers work: only a dead
    process's helpers are touched). Returns what it did, one line per action. A folder it
    cannot write (read-only project) is left as it is."""
    try:
        return _recover(Path(parent))
    except OSError:
        return []


def _recover(parent: Path) -> list[str]:
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    done, versions = [], {}
    now = time.time()
    for p in entries:
        m = _HIDDEN.match(p.name)
        if not m:
            continue
        stamp = m["stamp"]
        pid = int(stamp.split("-")[0]) if "-" in stamp else None
        if pid is not None and _pid_alive(pid):
            # a live writer's version not linked any more, or with no <name> at all (deleted by
            # hand): its swap is instants long, so old after a minute
            named = parent / m["name"]
            if not (m["kind"] == "v" and time.time_ns() - _age_key(p)[0] > 60e9
                    and (not named.exists() or named.resolve() != p.resolve())):
                continue
        if pid is None:                # older diffin: no pid in the name; wait until clearly stale
            try:
                if now - p.lstat().st_mtime < LEGACY_STALE_S:
                    continue
            except OSError:
                continue
        if m["kind"] in ("v", "old"):
            versions.setdefault(m["name"], []).append(p)
        else:                          # a dead writer's temp folder or link
            _remove(p)
            done.append(f"removed leftover {p.name}")
    for name, found in versions.items():
        final = parent / name
        if not final.exists():                     # missing (or a dangling link)
            if final.is_symlink():
                final.unlink()
            # a swap leaves no <name> only while an older diffin's real folder is moved aside (a
            # "-legacy" version) or, without symlinks, the old one is (an ".old-"): a kill there is
            # repaired. Else <name> was deleted by hand (`rm -rf runs/<name>` removes the link only)
            # or a killed first write never published it: its versions go, nothing comes back.
            if not any(p.name.endswith("-legacy") or _HIDDEN.match(p.name)["kind"] == "old" for p in found):
                for p in found:
                    _remove(p)
                    done.append(f"removed {p.name}: {name} was deleted")
                continue
            newest = max(found, key=_age_key)
            if newest.name.startswith(f".{name}.v-") and not newest.name.endswith("-legacy"):
                link = parent / f".{name}.link-{_stamp()}"
                os.symlink(newest.name, link, target_is_directory=True)
                os.replace(link, final)
            else:
                os.rename(newest, final)
            done.append(f"restored {name} from {newest.name}")
        used = final.resolve()
        for p in found:
            if (p.exists() or p.is_symlink()) and p.resolve() != used:
                _remove(p)
                done.append(f"removed unused {p.name}")
    return done


def clean_staging(workspace: str | Path, prefix: str = ".diffin-upload-") -> list[str]:
    """Remove upload staging folders ``<prefix><pid>-...`` left by dead processes (and, from
    older diffin without a pid, those older than ``LEGACY_STALE_S``). Returns the names removed."""
    out, now = [], time.time()
    try:
        entries = [p for p in Path(workspace).iterdir() if p.name.startswith(prefix)]
    except OSError:
        return out
    for p in entries:
        m = re.match(r"^([0-9]+)-", p.name[len(prefix):])
        if m:
            if _pid_alive(int(m[1])):
                continue
        else:
            try:
                if now - p.lstat().st_mtime < LEGACY_STALE_S:
                    continue
            except OSError:
                continue
        _remove(p)
        out.append(p.name)
    return out


# --- default names: claimed atomically ---------------------------------------------------------
#
# Two processes naming a new run ``<prefix>-N`` at once must not both take N. A name is claimed by
# creating ``<parent>/.<name>.claim`` with O_EXCL (one creator wins) while the folder itself does
# not exist; the claim holds the writer's pid and is removed once the folder is published (or the
# write failed), so nothing is left behind. Claims of dead processes are removed under an
# exclusive lock on the parent folder (flock, where the OS has it), so no two processes judge
# the same claim at once.

@contextlib.contextmanager
def claimed_name(parent: str | Path, prefix: str) -> Iterator[str]:
    """Yield the first ``<prefix>-N`` (N = 1, 2, ...) that names no entry of ``parent`` and that
    no live process has claimed; the claim lasts until the ``with`` block ends (publish the
    folder inside it). A ``parent`` created here is removed again if it is left empty."""
    parent = Path(parent)
    created = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(parent) as locked:
        if locked:
            _drop_dead_claims(parent)
        i = 1
        while True:
            name = f"{prefix}-{i}"
            i += 1
            target, claim = parent / name, parent / f".{name}.claim"
            if target.exists() or target.is_symlink():
                continue
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:      # another live writer holds it
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            if target.exists() or target.is_symlink():     # published by a writer that released its claim
                claim.unlink(missing_ok=True)
                continue
            break
    try:
        yield name
    finally:
        claim.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                parent.rmdir()           # only when empty: a failed first run leaves no runs/ behind


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[bool]:
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):       # no flock (Windows): O_EXCL alone still keeps names unique
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)                     # closing releases the lock


def _drop_dead_claims(parent: Path) -> None:
    """Claims whose writer is gone (killed mid-run); called under the lock only."""
    for p in parent.glob(".*.claim"):
        try:
            pid = int(p.read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid and _pid_alive(pid):      # a live writer's (this process's included)
            continue
        p.unlink(missing_ok=True)
