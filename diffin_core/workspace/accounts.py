"""Local accounts of a workspace: who may sign in to the app, and with which role.

Stored in ``<workspace>/users.json`` (mode 0600, written atomically): one entry per user with
its role and an Argon2id password hash (argon2-cffi's ``PasswordHasher``; the plain password is
never stored). Created with ``diffin users add NAME --role admin|reviewer``.

Roles (``PAGES``): an admin may use every page (Setup runs uploaded code, Score, Export) and
manage users; a reviewer may use Home, Explore, Review and What-if.

Serving policy (``check_serving``): a server listening on anything but the loopback address
refuses to start while the workspace has no account, unless the operator opened it on
purpose (``--insecure-open`` / ``DIFFIN_INSECURE_OPEN=1``). Without accounts on 127.0.0.1 the
app is single-user and unsigned, as before: the user is ``$USER`` with the admin role.
"""
from __future__ import annotations

import getpass
import json
import os
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from diffin_core.errors import DiffinError
from diffin_core.project.atomic import atomic_path

FILE_NAME = "users.json"
ROLES = ("admin", "reviewer")
ALL_PAGES = ("Home", "Setup", "Score", "Explore", "Review", "Export", "What-if")
PAGES = {"admin": ALL_PAGES, "reviewer": ("Home", "Explore", "Review", "What-if")}
MIN_PASSWORD = 8
INSECURE_ENV = "DIFFIN_INSECURE_OPEN"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$")
_LOCAL = ("127.0.0.1", "localhost", "::1", "[::1]")
_lock = threading.Lock()


@dataclass(frozen=True)
class User:
    name: str
    role: str
    source: str = "local"       # "local" (users.json), "oidc" (st.login) or "open" (no accounts)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_open(self, page: str) -> bool:
        return page in PAGES.get(self.role, ())


def _hasher():
    try:
        from argon2 import PasswordHasher
    except ImportError as exc:   # a dependency in pyproject.toml; say so rather than fail later
        raise DiffinError("sign-in needs the argon2-cffi package (pip install argon2-cffi)") from exc
    return PasswordHasher()


def check_name(name: str) -> str:
    name = str(name).strip()
    if not _NAME.match(name):
        raise DiffinError(f"user name {name!r} is not allowed: 1-64 letters, digits and _ . @ + - "
                          "(starting with a letter or digit)")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise DiffinError(f"unknown role {role!r} (expected admin or reviewer)")
    return role


def open_user() -> User:
    """The single user of an app without accounts on 127.0.0.1: $USER, admin."""
    return User(os.environ.get("USER") or getpass.getuser() or "local", "admin", "open")


class Accounts:
    """The accounts file of one workspace (absent file = no accounts)."""

    def __init__(self, workspace: str | Path):
        self.path = Path(workspace) / FILE_NAME

    # -- storage ------------------------------------------------------------------------
    def _load(self) -> dict:
        if not self.path.is_file():
            return {"version": 1, "users": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DiffinError(f"cannot read the accounts file ({exc})", self.path) from None
        if not isinstance(data, dict) or not isinstance(data.get("users"), dict):
            raise DiffinError("the accounts file has no 'users' table", self.path)
        return data

    def _save(self, data: dict) -> None:
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
            os.chmod(tmp, 0o600)            # hashes only, but nobody else needs to read them

    # -- reads --------------------------------------------------------------------------
    def users(self) -> list[User]:
        return [User(n, u.get("role", "reviewer")) for n, u in sorted(self._load()["users"].items())]

    def any(self) -> bool:
        return bool(self._load()["users"])

    def get(self, name: str) -> User | None:
        u = self._load()["users"].get(str(name).strip())
        return None if u is None else User(str(name).strip(), u.get("role", "reviewer"))

    def verify(self, name: str, password: str) -> User | None:
        """The user when ``password`` is theirs, else None (unknown names cost the same time)."""
        from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
        ph = _hasher()
        name = str(name).strip()
        data = self._load()
        entry = data["users"].get(name)
        stored = entry.get("hash") if entry else None
        try:
            ph.verify(stored or _dummy_hash(), password or "")
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if not stored:
            return None
        if ph.check_needs_rehash(stored):          # parameters moved on: upgrade quietly
            with _lock:
                data = self._load()
                if name in data["users"]:
                    data["users"][name]["hash"] = ph.hash(password)
                    self._save(data)
        return User(name, entry.get("role", "reviewer"))

    # -- writes -------------------------------------------------------------------------
    def add(self, name: str, password: str, role: str) -> User:
        name, role = check_name(name), check_role(role)
        _check_password(password)
        with _lock:
            data = self._load()
            if name in data["users"]:
                raise DiffinError(f"user {name!r} already exists (diffin users passwd / role change it)", self.path)
            data["users"][name] = {"role": role, "hash": _hasher().hash(password),
                                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            self._save(data)
        return User(name, role)

    def set_password(self, name: str, password: str) -> None:
        _check_password(password)
        self._change(name, lambda u: u.update(hash=_hasher().hash(password)))

    def set_role(self, name: str, role: str) -> None:
        role = check_role(role)
        self._change(name, lambda u: u.update(role=role))

    def remove(self, name: str) -> None:
        with _lock:
            data = self._load()
            if name not in data["users"]:
                raise DiffinError(f"no user {name!r}", self.path)
            del data["users"][name]
            self._save(data)

    def _change(self, name: str, fn) -> None:
        with _lock:
            data = self._load()
            if name not in data["users"]:
                raise DiffinError(f"no user {name!r}", self.path)
            fn(data["users"][name])
            self._save(data)


_DUMMY: list[str] = []


def _dummy_hash() -> str:
    if not _DUMMY:
        _DUMMY.append(_hasher().hash("not a password of anyone"))
    return _DUMMY[0]


def _check_password(password: str) -> None:
    if password is None or len(password) < MIN_PASSWORD:
        raise DiffinError(f"the password must have at least {MIN_PASSWORD} characters")


def is_local(address: str | None) -> bool:
    """True for a loopback address (and for None: Streamlit's test harness serves nothing)."""
    if address is None or address == "":
        return True
    a = str(address).strip().lower()
    if a in _LOCAL or a.startswith("127."):
        return True
    import ipaddress
    try:
        ip = ipaddress.ip_address(a.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)           # ::ffff:127.0.0.1, a dual-stack socket's view
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def insecure_open_flag() -> bool:
    return os.environ.get(INSECURE_ENV, "").strip().lower() in ("1", "true", "yes")


def oidc_configured(folders: tuple[str | Path, ...] = (".streamlit", Path.home() / ".streamlit")) -> bool:
    """Streamlit's OIDC sign-in (st.login) set up: an [auth] table in a secrets.toml."""
    import tomllib
    for folder in folders:
        f = Path(folder) / "secrets.toml"
        try:
            if f.is_file() and "auth" in tomllib.loads(f.read_text(encoding="utf-8")):
                return True
        except (OSError, ValueError):
            continue
    return False


def check_serving(address: str | None, workspace: str | Path, insecure_open: bool = False,
                  oidc: bool = False, client: str | None = None) -> str:
    """Refuse (DiffinError) to serve beyond 127.0.0.1 without accounts unless opened on purpose.

    ``client``: the address a session's connection comes from (the app passes it; None = this
    machine). A client that is not loopback is refused like a non-loopback ``address``: Streamlit
    started without ``server.address`` listens on every interface while the app reads no address.

    Returns the mode: "local" (loopback, no accounts: one unsigned user), "accounts" (sign-in
    required: local accounts or ``oidc``) or "open" (no sign-in beyond loopback, chosen with
    --insecure-open)."""
    if oidc or Accounts(workspace).any():
        return "accounts"
    remote_client = client is not None and not is_local(client)
    if is_local(address) and not remote_client:
        return "local"
    if insecure_open or insecure_open_flag():
        return "open"
    if remote_client:
        raise DiffinError(
            f"refusing to serve {client} without accounts: this server is reachable from other machines, and "
            f"anyone who can reach it could upload a model.py that runs on it. Add an account with `diffin users "
            f"add NAME --role admin`, or pass --insecure-open ({INSECURE_ENV}=1) to serve without sign-in on purpose",
            Path(workspace) / FILE_NAME)
    raise DiffinError(
        f"refusing to serve on {address} without accounts: anyone who can reach it could upload a "
        f"model.py that runs on this server. Add one with `diffin users add NAME --role admin "
        f"--workspace {workspace}`, or pass --insecure-open ({INSECURE_ENV}=1) to serve without sign-in on purpose",
        Path(workspace) / FILE_NAME)
