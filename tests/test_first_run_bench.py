"""benchmarks/first_run.py's own logic (the benchmark itself takes 30 min): the newcomer's shell
it gives `bash scripts/run.sh` carries none of this environment's Python, and a partial rerun
keeps the earlier rows of the cases it did not run."""
import os
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import first_run  # noqa: E402


def test_install_env_drops_this_venv_and_sets_the_port():
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {"PATH": os.pathsep.join([venv_bin, "/usr/local/bin", "/usr/bin"]), "VIRTUAL_ENV": sys.prefix,
           "PYTHONPATH": "/somewhere", "DIFFIN_AUTOSCORE": "diffin,tracin,loss", "HOME": "/root"}
    out = first_run.install_env(env, 51234)
    assert out["PATH"].split(os.pathsep) == ["/usr/local/bin", "/usr/bin"]
    assert "VIRTUAL_ENV" not in out and "PYTHONPATH" not in out
    assert out["DIFFIN_PORT"] == "51234" and out["DIFFIN_ADDRESS"] == "127.0.0.1"
    assert out["DIFFIN_AUTOSCORE"] == "diffin,tracin,loss" and out["HOME"] == "/root"
    assert env["PYTHONPATH"] == "/somewhere"            # the caller's dict is left as it was


def test_a_partial_rerun_keeps_the_rows_it_did_not_run():
    old = pd.DataFrame({"case": ["shipped", "scored", "shipped", "scored"],
                        "condition": ["quiet", "quiet", "loaded", "loaded"], "diffin_s": [43.0, 251.0, 45.0, 155.0]})
    new = pd.DataFrame({"case": ["install", "shipped"], "condition": ["quiet", "quiet"],
                        "date": ["2026-12-07 19:20"] * 2, "diffin_s": [158.4, 20.0]})
    got = first_run.merge_rows(new, old)
    assert list(zip(got["case"], got["condition"], got["diffin_s"])) == [
        ("install", "quiet", 158.4), ("shipped", "quiet", 20.0),
        ("scored", "quiet", 251.0), ("shipped", "loaded", 45.0), ("scored", "loaded", 155.0)]
    assert got["date"].isna().tolist() == [False, False, True, True, True]
