"""The app's dependency bounds: streamlit is bounded above (a new release can remove an API the app
uses, as st.components.v1.html goes after 2026-06-01), and the streamlit under test is one the
bound admits (scripts/test.sh upgrades to the newest allowed before the tests)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _requirement(name: str) -> Requirement:
    tomllib = pytest.importorskip("tomllib")          # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = [Requirement(s) for s in project["dependencies"]]
    found = [r for r in specs if r.name == name]
    assert len(found) == 1, f"{name} is listed {len(found)} times in pyproject.toml"
    return found[0]


def test_streamlit_is_bounded_and_the_installed_release_is_allowed():
    import streamlit
    req = _requirement("streamlit")
    assert any(s.operator in ("<", "<=", "~=", "==") for s in req.specifier), f"no upper bound: {req}"
    assert req.specifier.contains(streamlit.__version__), (
        f"streamlit {streamlit.__version__} is outside {req} (bash scripts/test.sh installs the newest allowed)")
    assert hasattr(streamlit, "iframe"), "st.iframe (the Preview map) needs streamlit >= 1.56"


def test_test_script_upgrades_streamlit_within_the_bound():
    script = (ROOT / "scripts/test.sh").read_text(encoding="utf-8")
    upgrade = script.index("pip install -q --upgrade")
    assert upgrade < script.index("python -m pytest"), "the upgrade must come before the tests"
    spec = re.search(r"grep -o '(.*?)' pyproject.toml", script).group(1)
    found = Requirement(re.search(spec, (ROOT / "pyproject.toml").read_text()).group(0).strip('"'))
    assert (found.name, found.specifier) == (_requirement("streamlit").name, _requirement("streamlit").specifier)


@pytest.mark.parametrize("option, value", [("toolbarMode", "viewer")])
def test_streamlit_config_hides_the_deploy_button(option, value):
    """client.toolbarMode = "viewer" hides Deploy, Rerun and Clear cache from reviewers (issue 21);
    tests/test_browser_e2e.py checks the toolbar in chromium."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / ".streamlit/config.toml").read_text(encoding="utf-8"))
    assert config["client"][option] == value
