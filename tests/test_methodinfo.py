"""Per-method scale (calibrated loss change vs ranking only) backed by the deletion benchmark;
`diffin methods` prints every description in full; CLI output starts without an empty bar."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from diffin_core import cli
from diffin_core.tasks import methodinfo
from diffin_core.methods import METHODS

DELETION = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "deletion.csv"


def test_calibration_claims_match_the_deletion_benchmark():
    d = pd.read_csv(DELETION)
    d = d[d.metric.isin(["predicted_query_loss_change", "actual_query_loss_change"])]
    table = d.pivot_table(index=["method", "setting"], columns="metric", values="mean").dropna()
    ratio = (table["predicted_query_loss_change"] / table["actual_query_loss_change"]).groupby(level=0)
    lo, hi = ratio.min(), ratio.max()
    measured = set(lo.index)
    assert {"diffin", "tracin", "influence-function"} <= measured
    for name in measured:
        within = lo[name] >= 1 / methodinfo.CAL_RATIO and hi[name] <= methodinfo.CAL_RATIO
        assert methodinfo.info(name).calibrated == within, (name, lo[name], hi[name])
    assert methodinfo.info("diffin").calibrated and not methodinfo.info("tracin").calibrated
    # a method the benchmark never measured is never called calibrated
    for name in METHODS:
        if name not in measured:
            assert not methodinfo.info(name).calibrated, name
    assert not methodinfo.info("some-new-method").calibrated


def test_diffin_methods_prints_full_descriptions(capsys):
    cli.main(["methods"])
    out, err = capsys.readouterr()
    assert err == ""  # no progress bar or anything else on stderr
    lines = out.splitlines()
    heads = [ln for ln in lines if ln and not ln.startswith(" ")]
    assert [h.split()[0] for h in heads] == list(METHODS)
    for name, cls in METHODS.items():
        start = lines.index(next(h for h in heads if h.split()[0] == name))
        body = []
        for ln in lines[start + 1:]:
            if not ln.startswith("    "):
                break
            body.append(ln.strip())
        text = " ".join(body)
        doc = " ".join((cls.__doc__ or "").split())
        assert text.startswith(methodinfo.description(name, cls)), name  # whole, not cut
        assert doc in text, name  # the whole docstring, not its first line
        assert len(methodinfo.description(name, cls)) > 40, name  # never blank
        assert "scale: " in text
        assert lines[start].endswith(("[calibrated: Δ query loss (nats)]", "[ranking only]"))
    for name in ("diffin", "diffin-paper", "influence-function"):
        assert len(methodinfo.description(name)) > 80


def test_bar_prints_nothing_until_work_reports(capsys):
    bar = cli.Bar()
    bar.close()
    assert capsys.readouterr().err == ""
    bar = cli.Bar()
    bar(5, 10, "scoring")
    bar.close()
    assert "5/10" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["loss"])
def test_demo_says_where_the_project_is(tmp_path, capsys, method):
    cli.main(["demo", "--workspace", str(tmp_path / "ws"), "-m", method])
    out = capsys.readouterr().out.splitlines()
    dest = (tmp_path / "ws" / "mnist-sample").resolve()
    assert out[0] == f"copied the sample project to {dest}"
    assert f"sample project ready: {dest}" in out
    assert any("streamlit run app.py -- --workspace" in ln for ln in out)
    cli.main(["demo", "--workspace", str(tmp_path / "ws"), "-m", method])
    again = capsys.readouterr().out.splitlines()
    assert again[0] == f"sample project: {dest}" and f"{method}: already scored in {dest}/runs" in again
