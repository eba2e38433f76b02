"""The linear datamodeling score helpers (diffin_core.tasks.lds) and the multi-query paths the LDS
benchmark relies on: the influence function's Hessian is built once per context."""
import numpy as np
import torch

from diffin_core.tasks import lds
from diffin_core.project.data import Split
from diffin_core.methods import ScoreSettings
from diffin_core.methods import influence_function as if_module
from diffin_core.engine.models import MLP
from diffin_core.run.scoring import run_method
from diffin_core.run.context import make_context


def test_random_subsets_keep_half_and_are_seeded():
    m = lds.random_subsets(11, 7, 0.5, seed=3)
    assert m.shape == (7, 11) and (m.sum(1) == 6).all()
    assert (m == lds.random_subsets(11, 7, 0.5, seed=3)).all()
    assert not (m == lds.random_subsets(11, 7, 0.5, seed=4)).all()


def test_predicted_change_sums_the_left_out_influence():
    infl = np.array([[1.0, 0.0], [2.0, 1.0], [4.0, -1.0]])
    masks = np.array([[True, False, True], [False, False, True]])
    assert np.allclose(lds.predicted_changes(infl, masks), [[2.0, 1.0], [3.0, 1.0]])


def test_lds_is_the_mean_spearman_over_queries_and_skips_constant_ones():
    rng = np.random.default_rng(0)
    actual = rng.normal(size=(20, 3))
    pred = np.c_[actual[:, 0] ** 3, -actual[:, 1], np.ones(20)]       # monotone, reversed, constant
    score, per = lds.lds(pred, actual)
    assert np.allclose(per[:2], [1.0, -1.0]) and np.isnan(per[2])
    assert score == 0.0


def _tiny_context():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    y = rng.integers(0, 3, 60)
    model = MLP(8, (5,), 3)
    states = []
    for k in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        states.append({n: v.clone() for n, v in model.state_dict().items()})
    return (lambda: make_context(MLP(8, (5,), 3), states, [0, 10, 20], [0.1, 0.05, 0.01], Split(x, y, np.arange(60)),
                                 ScoreSettings(device="cpu"))), x, y


def test_influence_function_builds_the_hessian_once_per_context(monkeypatch):
    new_context, x, y = _tiny_context()
    fresh = [run_method(new_context(), "influence-function", x[i:i + 1], y[i:i + 1], need_self=False)["influence"]
             for i in range(3)]
    calls = []
    real = if_module.hessian
    monkeypatch.setattr(if_module, "hessian", lambda f: calls.append(1) or real(f))
    ctx = new_context()
    shared = lds.per_query_influence(ctx, "influence-function", x[:3], y[:3])
    assert np.allclose(shared, np.stack(fresh, 1), rtol=1e-5, atol=1e-9)
    chunks = len(list(ctx.chunks()))
    assert len(calls) == chunks                    # one Hessian for three queries, not three
    assert np.abs(shared).max() > 0


def _bench_lds():
    import importlib
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module("lds")


def test_a_rerun_of_one_case_keeps_the_other_cases_rows_identical(tmp_path):
    import pandas as pd
    bench = _bench_lds()
    path = tmp_path / "lds.csv"
    old = pd.DataFrame({"method": ["diffin", "tracin", "diffin"], "model": ["a", "a", "b"],
                        "lds_mean": [0.8437214885954383, 1 / 3, 0.5], "seconds": [68.48880489667256, 0.1, 2.0]})
    bench.write_csv(old, path)
    before = path.read_text().splitlines()
    new = pd.DataFrame({"method": ["diffin"], "model": ["b"], "lds_mean": [0.25], "seconds": [1.0]})
    bench.write_csv(bench.with_other_models(new, path, ["b"]), path)
    after = path.read_text().splitlines()
    assert after[:3] == before[:3]                 # header and model a's rows, byte for byte
    assert after[3:] == ["diffin,b,0.25,1.0"]      # model b's row replaced, not duplicated


def test_sample_cnn_case_is_the_sample_project_data():
    from diffin_core.project.folder import Project
    bench = _bench_lds()
    _, x, y, qx, qy = bench.case_data("sample-cnn", 0)
    project = Project(bench.HERE.parent / "sample_data" / "mnist")
    assert np.array_equal(x, project.train.x) and np.array_equal(y, project.train.y)
    assert len(qy) == bench.CASES["sample-cnn"]["queries"]
    rows = [int(np.flatnonzero((project.query.x == q).all(axis=(1, 2, 3)))[0]) for q in qx]
    assert np.array_equal(project.query.y[rows], qy)   # query samples drawn from the query split
