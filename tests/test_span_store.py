"""The query-span store of a batch-order Adam run (issue 23 item 4, issue 18's new query).

Adam's replay is linear in the query gradient, so the feature pass replays an orthonormal basis of
the query samples' gradients (features.span_build) and a new query is one small product
(run/span.py). Checked against the exact path (the replay of the query itself):
* adam_batches.segment_many (K directions at once) equals segment for each direction;
* a store whose span holds every query gradient answers every query, and every set of queries,
  as the exact path does (to float rounding), marked exact, through the CLI without torch;
* a store cut to fewer directions labels its answers approximate with the share left out and the
  agreement measured against the full replay; `--exact` and the app's rescoring replay in full."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffin_core.engine import adam_batches
from diffin_core.methods import runner
from diffin_core.methods.diffin import DiffIn
from diffin_core.project.folder import Project
from diffin_core.run import answers
from diffin_core.run import features as F
from diffin_core.run import scoring as S
from diffin_core.run import span
from diffin_core.run.scoring import exact_context, score, top_k
from tests.test_features import tiny_with


def _adamw(ps):
    return torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01)


def _exact(project, run, idx) -> np.ndarray:
    ctx = exact_context(project, run)
    q = project.query
    return DiffIn().run(ctx, q.x[idx], q.y[idx], need_self=False)["influence"]


def test_segment_many_equals_segment_per_direction(tmp_path):
    project = Project(tiny_with(tmp_path / "p", _adamw, batches=True))
    score(project, "diffin", run="d", features=False)
    ctx = exact_context(project, "d")
    runner.configure(ctx, runner.memory_plan(DiffIn(), ctx, False))
    adam_batches.decide(ctx)
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(3, ctx.fm.num_params, generator=gen, dtype=torch.float64)
    k = ctx.m - 1
    many, (ut, um, uv) = adam_batches.segment_many(ctx, k, (V.clone(), torch.zeros_like(V), torch.zeros_like(V)))
    for j in range(3):
        rows, (ut1, um1, uv1), _ = adam_batches.segment(ctx, k, adam_batches.start(V[j]))
        scale = float(rows.abs().max())
        np.testing.assert_allclose(many[j].numpy(), rows.numpy(), rtol=0, atol=1e-6 * scale)
        for a, b in ((ut[j], ut1), (um[j], um1), (uv[j], uv1)):
            assert float((a - b).norm()) <= 1e-6 * float(b.norm()) + 1e-12


def test_full_span_store_answers_every_query_exactly(tmp_path):
    root = tiny_with(tmp_path / "p", _adamw, batches=True)
    project = Project(root)
    run = score(project, "diffin", run="d")
    meta = json.loads((run / "features" / "meta.json").read_text())
    assert meta["kind"] == "query-span" and meta["exact_queries"] == len(project.query)
    assert meta["rank"] <= len(project.query) and meta["measured"][0]["query"] == "all"
    assert all(m["top10"] == 1.0 and m["max_error"] < 1e-5 for m in meta["measured"])
    for idx in ([3], [0, 7, 11]):
        ex = _exact(project, "d", idx)
        ans = F.fast_answer(project, "d", idx)
        assert ans.all_exact and not ans.labelled and ans.path.startswith("exact path")
        np.testing.assert_allclose(ans.influence, ex, rtol=0, atol=1e-5 * np.abs(ex).max())
    # the CLI: a new query from the store, numpy only (no torch imported), kept with the run
    code = ("import sys; from diffin_core.cli import app\n"
            "try:\n    app(['top', sys.argv[1], '--run', 'd', '-q', '5', '--k', '3'])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    top_k(project, "d", [2], k=3)                  # keeps the run's columns (the numpy-only print needs them)
    r = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "exact path: Adam's batch-order replay, read from the store" in r.stdout
    saved = answers.load(run, [5])
    np.testing.assert_allclose(saved.influence, _exact(project, "d", [5]), rtol=0,
                               atol=1e-5 * np.abs(saved.influence).max())


def test_a_cut_span_is_labelled_and_rescored_in_full(tmp_path):
    root = tiny_with(tmp_path / "p", _adamw, batches=True)
    project = Project(root)
    run = score(project, "diffin", run="d", features=False)
    ctx = exact_context(project, "d")
    runner.configure(ctx, runner.memory_plan(DiffIn(), ctx, True))
    adam_batches.decide(ctx)
    meta = F.span_build(ctx, project.query, run / "features", rank=2, checks=1,
                        reference=project.scores("d")["influence"].to_numpy(), run_dir=run)
    assert meta["rank"] == 2 and meta["exact_queries"] < len(project.query) and meta["approximations"]
    worst = meta["measured"][1]["query"]
    assert answers.load(run, [worst], exact_only=True) is not None     # the check's replay is kept
    qi = next(i for i in range(len(project.query)) if i != worst)
    helpful, _ = top_k(project, "d", [qi], k=3)
    path = helpful.attrs["path"]
    assert path.startswith("approximate (query-span store") and "left out" in path and "1 queries answered" in path
    ans = answers.load(run, [qi])
    assert ans.labelled and not ans.exact.any()
    store = span.SpanStore.open(run)
    res = store.residual([qi])
    assert 0 < res < 1 and f"{100 * res:.2g}%" in path
    # its values are the exact replay of the query's projection on the span (linearity)
    ex = _exact(project, "d", [qi])
    assert not np.allclose(ans.influence, ex, rtol=0, atol=1e-6 * np.abs(ex).max())
    # --exact replays it in full; the app's rescoring job does too and keeps it
    h_ex, _ = top_k(project, "d", [qi], k=3, exact=True)
    assert h_ex.attrs["path"].startswith("exact path")
    S.rescore_for(str(root), "d", [qi])
    kept = answers.load(run, [qi])
    assert kept.all_exact
    np.testing.assert_allclose(kept.influence, ex, rtol=0, atol=1e-6 * np.abs(ex).max())
    # the measured agreement now counts both exact answers
    assert store.agreement(run)["queries"] == 2


@pytest.mark.slow
def test_text_sample_store_equals_the_replay(tmp_path):
    """A small build of the text sample (BERT, the Trainer + DiffinCallback: AdamW, warm-up +
    linear decay, clipping, dropout): its store (24 queries, so every query gradient in the span)
    answers a query and a set as `diffin top --exact` does, marked exact."""
    from diffin_core.project.sample_text import build_text_sample
    root = build_text_sample(tmp_path / "sms", n_train=96, n_query=24, epochs=2)
    run = score(root, "diffin", run="d")
    project = Project(root)
    meta = json.loads((run / "features" / "meta.json").read_text())
    assert meta["kind"] == "query-span" and meta["exact_queries"] == 24
    for idx in ([5], [1, 2, 20]):
        ans = F.fast_answer(project, "d", idx)
        ex = _exact(project, "d", idx)
        assert ans.all_exact
        np.testing.assert_allclose(ans.influence, ex, rtol=0, atol=1e-5 * np.abs(ex).max())
        assert span.top_overlap(ans.influence, ex) == 1.0
