"""Shared fixtures for the AppTest tests (imported by tests/test_app_*.py)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
PAGES = ROOT / "pages"
sys.path.insert(0, str(PAGES))

from diffin_core.project.sample import SAMPLE_DIR  # noqa: E402

TIMEOUT = 120


def job_manager():
    import _common
    return _common.job_manager()


@pytest.fixture
def jobs():
    """The app's shared JobManager, emptied before and after the test."""
    jm = job_manager()
    jm.reset()
    yield jm
    jm.reset()


@pytest.fixture
def workspace(tmp_path, monkeypatch, jobs):
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.setenv("DIFFIN_WORKSPACE", str(ws))
    return ws


@pytest.fixture(scope="session")
def loss_run(tmp_path_factory):
    """A "loss" run of the sample project, scored once per test session (about 10 s)."""
    from diffin_core.run.scoring import score
    proj = tmp_path_factory.mktemp("scored") / "mnist-sample"
    shutil.copytree(SAMPLE_DIR / "mnist", proj, ignore=shutil.ignore_patterns("runs", "review.sqlite*", "exports", "prebuilt"))
    return score(proj, "loss", run="loss-1")


@pytest.fixture
def scored(workspace, loss_run):
    """The sample project in the workspace with the "loss-1" run in place."""
    proj = workspace / "mnist-sample"
    shutil.copytree(SAMPLE_DIR / "mnist", proj, ignore=shutil.ignore_patterns("runs", "review.sqlite*", "exports"))
    shutil.copytree(loss_run, proj / "runs" / "loss-1")
    return proj


PASSWORD = "correct horse battery"


def add_users(ws: Path, **roles: str) -> None:
    """Accounts in the workspace (diffin users add NAME --role ROLE), all with PASSWORD."""
    from diffin_core.workspace.accounts import Accounts
    for name, role in roles.items():
        Accounts(ws).add(name, PASSWORD, role)


def sign_in(at, name: str, password: str = PASSWORD):
    """Fill the app's sign-in form and press Sign in."""
    at.text_input(key="signin_name").set_value(name)
    at.text_input(key="signin_password").set_value(password)
    at.button(key="signin").click().run()
    return at


def new_app(project: Path | None = None, page: str | None = None, user: str | None = None):
    """A fresh AppTest session; signed in as ``user`` (accounts: add_users) first; with
    ``project``, opened through the Home page's Open button."""
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    if user is not None:
        sign_in(at, user)
        assert at.session_state["auth_user"]["name"] == user, [e.value for e in at.error]
    if project is not None:
        at.selectbox(key="home_project").set_value(project.name)
        at.button(key="home_open").click().run()
        assert at.session_state["project_dir"] == str(project.resolve())
    if page:
        at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def metrics(at) -> dict:
    """{label: value} of the page's st.metric elements."""
    return {m.label: m.value for m in at.metric}


def current_sample(at) -> int:
    """The sample id on Review's card (its "Sample N" subheader)."""
    heads = [h for h in texts(at.subheader) if h.startswith("Sample ")]
    return int(heads[0].split()[1])


def table_with(at, column: str):
    """The first dataframe on the page that has ``column`` (AppTest does not key dataframes)."""
    for d in at.dataframe:
        if column in d.value.columns:
            return d.value
    raise AssertionError(f"no table with a {column!r} column")
