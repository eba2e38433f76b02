"""Low-precision scoring (issue 11, item 3): bf16/fp16 forward passes only after a check against
float32; a failed check falls back to exactly float32; HVPs and the query plan never run low."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from diffin_core.engine import precision
from diffin_core.methods import runner
from diffin_core.project.data import Split
from diffin_core.errors import DiffinError
from diffin_core.engine.functional import FunctionalModel, no_tf32
from diffin_core.methods import METHODS, ScoreSettings
from diffin_core.engine.models import SmallCNN
from diffin_core.run.scoring import score
from diffin_core.run.context import make_context
from tests.helpers import make_tiny_project


@pytest.fixture(scope="module")
def case():
    """A small image CNN trained 3 x 20 SGD steps on 300 samples, 4 checkpoints."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = 300
    x = rng.random((n, 1, 12, 12), dtype=np.float32)
    y = rng.integers(0, 3, n)
    x[np.arange(n), 0, y * 4, y * 4] += 2.0
    model = torch.nn.Sequential(torch.nn.ZeroPad2d(4), SmallCNN(1, 3, 20))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    states, steps = [], []
    for epoch in range(3):
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        steps.append(epoch * 20)
        for idx in torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).split(15):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    steps.append(60)
    return model, states, steps, Split(x, y, np.arange(n)), x[:16], y[:16]


def run(case, prec, need_self=False, method="diffin"):
    model, states, steps, train, qx, qy = case
    s = ScoreSettings(lanczos_steps=4, hessian_batch=32, batch_size=64, precision=prec)
    ctx = make_context(model, states, steps, [0.1] * len(steps), train, s)
    torch.manual_seed(0)
    out = runner.run(METHODS[method](), ctx, qx, qy, need_self)
    return out, ctx


def test_compare_figures():
    a = np.linspace(-1, 1, 100)
    same = precision.compare(a, a)
    assert same["passed"] and same["spearman"] == 1.0 and same["rel_l2"] == 0.0 and same["k"] == 10
    flipped = precision.compare(a, -a)
    assert not flipped["passed"] and flipped["spearman_raw"] == -1.0 and flipped["topk_raw"] == 0.0
    assert flipped["topk_overlap"] == 0.0 and flipped["spearman"] < -0.99
    tied = precision.compare(np.repeat([-1.0, 0.0, 1.0], 30), np.repeat([-1.0, 0.0, 1.0], 30) + 1e-4 * np.sin(np.arange(90)))
    assert tied["passed"] and tied["spearman"] == 1.0 and tied["topk_overlap"] == 1.0 and tied["spearman_raw"] < 0.99
    assert not precision.compare(a, np.where(a > 0.9, np.nan, a))["passed"]


@pytest.mark.parametrize("need_self", [False, True])
def test_bfloat16_passes_check_and_is_close(case, need_self):
    ref, ctx32 = run(case, "float32", need_self)
    with warnings.catch_warnings():
        warnings.simplefilter("error", precision.PrecisionWarning)
        low, ctx = run(case, "bfloat16", need_self)
    rec = ctx.precision
    assert rec["used"] == "bfloat16" and rec["rows"] == 256 and rec["influence"]["passed"]
    assert ctx32.precision == {"requested": "float32", "used": "float32"}
    keys = ["influence", "self_influence"] if need_self else ["influence"]
    for key in keys:
        fig = precision.compare(ref[key], low[key])
        assert fig["spearman"] > 0.99 and fig["rel_l2"] < 0.05, (key, fig)
        assert not np.array_equal(ref[key], low[key])        # bf16 really ran
    if need_self:
        assert rec["self_influence"]["passed"]


def test_failed_check_falls_back_to_exact_float32(case, monkeypatch):
    ref, _ = run(case, "float32", need_self=True)
    monkeypatch.setattr(precision, "THRESHOLDS", precision.Thresholds(rel_l2=0.0))   # bf16 cannot be exact
    with pytest.warns(precision.PrecisionWarning, match="bfloat16 failed the check against float32 on 256 rows"):
        low, ctx = run(case, "bfloat16", need_self=True)
    assert ctx.precision["used"] == "float32" and not ctx.precision["influence"]["passed"]
    for key in ("influence", "self_influence", "probs"):
        np.testing.assert_array_equal(low[key], ref[key])


def test_unsupported_autocast_falls_back(case, monkeypatch):
    real = precision.autocast

    def broken():                      # as a device without float16 autocast would answer
        if precision._ACTIVE.get() is not None:
            raise RuntimeError("autocast dtype not supported here")
        return real()
    monkeypatch.setattr(precision, "autocast", broken)
    ref, _ = run(case, "float32")
    with pytest.warns(precision.PrecisionWarning, match="float16 unsupported on cpu"):
        low, ctx = run(case, "float16")
    assert ctx.precision["used"] == "float32"
    np.testing.assert_array_equal(low["influence"], ref["influence"])


def test_hvps_and_plan_never_low_precision(case, monkeypatch):
    """Every forward pass inside an HVP / batch gradient runs without autocast, the scoring passes
    with it; the plan (w_k, the propagated query vectors) is identical between precisions."""
    seen, inside = [], []
    for name in ("hvp_fd", "batch_grad"):
        orig = getattr(FunctionalModel, name)

        def wrapped(self, *a, _orig=orig, **k):
            inside.append(1)
            try:
                return _orig(self, *a, **k)
            finally:
                inside.pop()
        monkeypatch.setattr(FunctionalModel, name, wrapped)
    plans = {}
    orig_chunk = METHODS["diffin"].chunk

    def chunk(self, ctx, plan, x, y, need_self):
        for it in plan:
            plans.setdefault(ctx.settings.precision, {}).setdefault(it.k, it.w.clone())
        return orig_chunk(self, ctx, plan, x, y, need_self)
    monkeypatch.setattr(METHODS["diffin"], "chunk", chunk)
    hook = case[0].register_forward_hook(lambda m, i, o: seen.append((bool(inside), torch.is_autocast_enabled("cpu"))))
    try:
        run(case, "float32")
        run(case, "bfloat16")
    finally:
        hook.remove()
    assert any(not h and ac for h, ac in seen)                 # scoring passes ran in bf16
    assert any(h for h, _ in seen) and not any(h and ac for h, ac in seen)
    assert plans["float32"].keys() == plans["bfloat16"].keys() and len(plans["float32"]) > 1
    for k, w in plans["float32"].items():
        assert torch.equal(w, plans["bfloat16"][k])


def test_finite_differences_switch_autocast_off(case):
    ctx = make_context(case[0], case[1], case[2], [0.1] * 4, case[3], ScoreSettings())
    ctx.precision = {"used": "bfloat16"}
    with precision.lowered(ctx):
        with precision.autocast():
            assert torch.is_autocast_enabled("cpu")
            with no_tf32():                                  # diffin-paper's finite differences
                assert not torch.is_autocast_enabled("cpu")
                with precision.autocast():
                    assert not torch.is_autocast_enabled("cpu")


def test_meta_json_records_the_check(tmp_path):
    root = make_tiny_project(tmp_path / "p", n=96)
    run32 = score(root, "diffin", "f32", ScoreSettings(lanczos_steps=4), features=False)
    run16 = score(root, "diffin", "bf16", ScoreSettings(lanczos_steps=4, precision="bfloat16"), features=False)
    meta = json.loads((run16 / "meta.json").read_text())
    rec = meta["precision"]
    assert meta["settings"]["precision"] == "bfloat16" and rec["requested"] == "bfloat16"
    assert rec["rows"] == 96 and set(rec["influence"]) >= {"spearman", "rel_l2", "topk_overlap", "k", "passed"}
    assert rec["used"] == ("bfloat16" if rec["influence"]["passed"] and rec["self_influence"]["passed"] else "float32")
    assert precision.summary(rec).startswith(f"precision {rec['used']}")
    assert json.loads((run32 / "meta.json").read_text())["precision"]["used"] == "float32"


def test_unknown_precision_is_one_line_error():
    from diffin_core.cli import _settings
    with pytest.raises(DiffinError, match="precision 'fp8': choose float32, bfloat16 or float16"):
        _settings(precision="fp8")
