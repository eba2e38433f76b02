"""The CLI's progress bars (issue 21): one tqdm bar per phase, each with its own ETA, no empty
"0/4000" bar while another phase runs, and one counter per phase (the query plan's checkpoints
once counted down in the message while the bar counted up)."""
from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import make_tiny_project  # noqa: E402

from diffin_core.cli import Bar, main  # noqa: E402

FRAME = re.compile(r"^(?P<desc>.*?):?\s*(?P<pct>\d+)%\|[^|]*\| (?P<n>\d+)/(?P<total>\d+) "
                   r"\[(?P<elapsed>[\d:]+)<(?P<eta>[\d:?]+)")


def frames(text: str) -> list[dict]:
    """Every drawn state of every bar, in order (tqdm redraws with \\r, ends a bar with \\n)."""
    out = []
    for part in re.split(r"[\r\n]", text):
        m = FRAME.match(part.strip())
        if m:
            out.append({k: (int(v) if k in ("pct", "n", "total") else v) for k, v in m.groupdict().items()})
    return out


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_one_bar_per_phase_with_its_own_eta(monkeypatch):
    """The sample project's shape: 12 query-plan checkpoints of 10 s, then 4,000 samples at 64/s."""
    import time as time_module

    import tqdm.std
    clock = Clock()
    monkeypatch.setattr(tqdm.std, "time", clock)           # tqdm's clock
    monkeypatch.setattr(time_module, "time", clock)        # Bar's clock
    out = io.StringIO()
    bar = Bar(file=out)
    bar(0, 4000, "diffin: preparing query vectors")
    for i in range(12):
        clock.t += 10
        bar(0, 4000, f"diffin: query plan: checkpoint {i + 1}/12 done")
    clock.t += 1
    bar(0, 4000, "diffin: label issues at checkpoint 9/12 (step 504, ckpt_000504.safetensors) (the lowest query loss)")
    for done in range(256, 4001, 256):
        clock.t += 4
        bar(min(done, 4000), 4000, "diffin: scoring training samples")
    clock.t += 4
    bar(4000, 4000, "diffin: scoring training samples")
    bar.close()                               # the scores are published (the CLI closes the bar)
    bar(0, 4000, "features: skipped (its Hessian views exceed the memory budget)")
    bar.close()
    text = out.getvalue()
    drawn = frames(text)
    # no empty bar: nothing is drawn at 0 while a phase runs
    assert drawn and all(f["n"] > 0 for f in drawn), text
    plan = [f for f in drawn if f["total"] == 12]
    rows = [f for f in drawn if f["total"] == 4000]
    assert len(plan) + len(rows) == len(drawn)
    # the plan's bar counts forwards and its text carries no second counter
    assert [f["n"] for f in plan] == sorted(f["n"] for f in plan) and plan[-1]["n"] == 12
    assert all("/" not in f["desc"] for f in plan) and plan[0]["desc"] == "diffin: query plan: checkpoint"
    # each phase's clock starts where the phase began: 10 s per checkpoint, 4 s per 256 samples
    assert (plan[0]["n"], plan[0]["elapsed"], plan[0]["eta"]) == (1, "00:10", "01:50")
    assert (rows[0]["n"], rows[0]["elapsed"], rows[0]["eta"]) == (256, "00:04", "00:58")   # not [02:05<...]
    assert rows[-1]["n"] == 4000
    # the announcements are lines of their own, each once
    assert text.count("diffin: preparing query vectors\n") == 1
    assert text.count("label issues at checkpoint 9/12") == 1
    assert text.endswith("features: skipped (its Hessian views exceed the memory budget)\n")   # a line, no bar


def test_the_same_steps_again_start_a_new_bar_and_a_falling_count_a_new_item_bar():
    out = io.StringIO()
    bar = Bar(file=out)
    for _round in range(2):
        for k in (3, 2, 1):                     # a k that counts down still fills the bar forwards
            bar(0, 10, f"features: Hessian view of checkpoint {k}/3")
    bar(5, 10, "scoring")
    bar(10, 10, "scoring")
    bar(4, 10, "scoring again")                 # done fell back: a new phase
    bar(10, 10, "scoring again")
    bar.close()
    # each bar ends with a newline: its last frame is its final state
    bars = [frames(line)[-1] for line in out.getvalue().split("\n") if frames(line)]
    assert [(f["n"], f["total"]) for f in bars] == [(3, 3), (3, 3), (10, 10), (10, 10)]
    assert [f["desc"] for f in bars] == ["features: Hessian view of checkpoint"] * 2 + ["scoring", "scoring again"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_project(tmp_path_factory.mktemp("bars") / "proj")


def test_cli_score_draws_one_bar_per_phase(tiny, capsys):
    import json
    m = len(json.loads((tiny / "checkpoints/manifest.json").read_text())["checkpoints"])
    main(["score", str(tiny), "--method", "diffin"])
    err = capsys.readouterr().err
    drawn = frames(err)
    assert drawn and all(f["n"] > 0 for f in drawn), err       # never an empty 0/N bar
    plan = [f for f in drawn if f["desc"] == "diffin: query plan: checkpoint"]
    assert plan and plan[-1]["n"] == plan[-1]["total"] == m
    assert [f["n"] for f in plan] == sorted(f["n"] for f in plan)
    assert "propagated the query" not in err                    # the second, backwards counter is gone
    scored = [f for f in drawn if f["total"] == 96 and not f["desc"].startswith("features")]
    assert scored and scored[-1]["n"] == 96
    views = [f for f in drawn if f["desc"] == "features: Hessian view of checkpoint"]
    assert views and views[-1]["n"] == views[-1]["total"]
    # the phases come in order, each its own bar: plan, scores, then the feature pass
    order = [("plan" if f in plan else "scores" if f in scored else "views" if f in views else "other") for f in drawn]
    firsts = [order.index(p) for p in ("plan", "scores", "views")]
    assert firsts == sorted(firsts)
