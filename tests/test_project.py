"""The project folder, the Recorder, scoring output and the CLI, on a tiny real project."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from diffin_core.cli import main
from diffin_core.errors import DiffinError
from diffin_core.methods import METHODS
from diffin_core.project.folder import Project
from diffin_core.run.scoring import query_influence, score, top_k

from helpers import make_tiny_project, manifest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_project(tmp_path_factory.mktemp("proj") / "tiny")


def test_recorder_writes_steps_lrs_and_optimizer(tiny):
    m = manifest(tiny)
    steps = [c["step"] for c in m["checkpoints"]]
    assert steps[0] == 0 and steps == sorted(steps) and len(steps) >= 10
    assert steps[-1] == 4 * 6                                    # 4 epochs x 6 batches: final weights saved
    assert all(c["lr"] == pytest.approx(0.2) for c in m["checkpoints"])
    assert m["optimizer"] == "SGD" and m["train_size"] == 96
    assert all((tiny / "checkpoints" / c["file"]).is_file() for c in m["checkpoints"])


def test_recorder_notes_momentum_and_engine_uses_effective_lr(tmp_path):
    from diffin_core.project.checkpoints import Recorder, read_manifest
    from diffin_core.engine.models import MLP
    model = MLP(4, (3,), 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with Recorder(tmp_path, model, opt, train_size=10, every=1) as rec:
        rec.step()
    m = read_manifest(tmp_path / "checkpoints/manifest.json")
    assert m.momentum == pytest.approx(0.9) and m.optimizer == "SGD"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_score_writes_one_row_per_sample(tiny, method):
    if getattr(METHODS[method], "needs_recipe", False):      # cleanlab-cv: tiny has no [train] recipe
        with pytest.raises(DiffinError, match="recipe"):
            score(tiny, method, run=f"t-{method}")
        assert not (tiny / "runs" / f"t-{method}").exists()
        return
    run = score(tiny, method, run=f"t-{method}")
    df = pd.read_parquet(run / "scores.parquet")
    meta = json.loads((run / "meta.json").read_text())
    assert list(df.columns[:5]) == ["sample_id", "label", "influence", "self_influence", "label_issue"]
    assert len(df) == 96 and df["sample_id"].tolist() == list(range(96))
    assert np.isfinite(df["influence"]).all() and np.isfinite(df["label_issue"]).all()
    assert df["influence"].std() > 0
    has_self = METHODS[method].has_self_influence
    assert df["self_influence"].notna().all() == has_self
    assert meta["method"] == method and meta["seconds"] > 0 and meta["checkpoints"] >= 10
    assert "torch" in meta["versions"] and meta["settings"]["lanczos_steps"] > 0


def test_top_k_matches_the_influence_ranking(tiny):
    project = Project(tiny)
    score(project, "diffin", run="d")
    infl = query_influence(project, "diffin", [4])
    helpful, harmful = top_k(project, "d", [4], k=5)
    assert helpful["sample_id"].tolist() == list(np.argsort(-infl, kind="stable")[:5])
    assert harmful["sample_id"].tolist() == list(np.argsort(infl, kind="stable")[:5])
    assert (helpful["influence"].diff().dropna() <= 0).all() and (harmful["influence"] < 0).all()
    assert helpful.attrs["path"] != "exact path"                        # the run's feature store answered
    assert not list((project.runs_dir / "d" / "topk").glob("*.npy"))   # ... so nothing was recomputed
    ex_helpful, ex_harmful = top_k(project, "d", [4], k=5, exact=True)
    assert ex_helpful.attrs["path"] == "exact path"
    assert ex_helpful["sample_id"].tolist() == list(np.argsort(-infl, kind="stable")[:5])
    assert ex_harmful["sample_id"].tolist() == list(np.argsort(infl, kind="stable")[:5])
    assert list((project.runs_dir / "d" / "topk").glob("*.npy"))       # the exact path is cached
    again, _ = top_k(project, "d", [4], k=5)
    assert again.attrs["path"] == "exact path (cached)"
    # the whole query set as the list reproduces the run's influence column
    all_q = query_influence(project, "diffin", np.arange(len(project.query)))
    assert np.allclose(all_q, project.scores("d")["influence"], rtol=1e-4, atol=1e-9)


def test_helpful_samples_share_the_query_label(tiny):
    project = Project(tiny)
    helpful, harmful = top_k(project, "d", [0], k=8)
    qlabel = int(project.query.y[0])
    assert (helpful["label"] == qlabel).mean() > (harmful["label"] == qlabel).mean()


def test_cli_score_and_top(tiny, capsys):
    main(["score", str(tiny), "--method", "tracin", "--run", "cli"])
    assert (tiny / "runs/cli/scores.parquet").is_file()
    main(["top", str(tiny), "--run", "cli", "--query-index", "2", "--k", "3"])
    out = capsys.readouterr().out
    assert "most helpful" in out and "most harmful" in out
    assert len([ln for ln in out.splitlines() if ln.strip() and ln.strip()[0].isdigit()]) == 6


def test_device_auto_picks_cpu_here():
    from diffin_core.methods import pick_device
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type in (expected, "mps")


def test_exported_program_scores_like_the_factory(tiny, tmp_path):
    """[model] program = "model.pt2" (torch.export, dynamic batch) gives the factory's scores."""
    import shutil
    from diffin_core.engine.models import MLP
    dest = tmp_path / "exported"
    shutil.copytree(tiny, dest, ignore=shutil.ignore_patterns("runs"))
    ep = torch.export.export(MLP(6, (8,), 3), (torch.zeros(2, 6),),
                             dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
    torch.export.save(ep, str(dest / "model.pt2"))
    (dest / "model.py").unlink()
    toml = (dest / "diffin.toml").read_text().replace('factory = "model.py:build"', 'program = "model.pt2"')
    (dest / "diffin.toml").write_text(toml)
    a = pd.read_parquet(score(dest, "tracin", run="x") / "scores.parquet")
    b = pd.read_parquet(score(tiny, "tracin", run="y") / "scores.parquet")
    assert np.allclose(a["influence"], b["influence"], rtol=1e-4, atol=1e-10)


def test_influence_function_large_model_path_is_finite_and_agrees_with_explicit(tiny):
    """Above explicit_max_params the CG/Lanczos path runs; it must stay finite on a
    non-convex net and rank like the explicit solve."""
    from scipy.stats import spearmanr
    from diffin_core.methods import ScoreSettings
    from diffin_core.run.scoring import run_method
    from diffin_core.run.context import project_context
    project = Project(tiny)
    q = project.query
    explicit = run_method(project_context(project, ScoreSettings()), "influence-function", q.x, q.y)
    ctx = project_context(project, ScoreSettings(explicit_max_params=0, hessian_batch=96))
    cg = run_method(ctx, "influence-function", q.x, q.y)
    assert np.isfinite(cg["influence"]).all() and np.isfinite(cg["self_influence"]).all()
    assert spearmanr(cg["influence"], explicit["influence"])[0] > 0.8


def test_top_k_cache_tells_long_query_lists_apart(tiny):
    project = Project(tiny)
    score(project, "grad-dot", run="gd")
    a, b = list(range(0, 29)), list(range(0, 28)) + [29]          # share a long common prefix
    top_k(project, "gd", a, k=3)
    top_k(project, "gd", b, k=3)
    assert len(list((project.runs_dir / "gd" / "topk").glob("*.npy"))) == 2
    cached = top_k(project, "gd", b, k=96)[0].sort_values("sample_id")["influence"].to_numpy()
    assert np.allclose(cached, query_influence(project, "grad-dot", b), rtol=1e-5, atol=1e-12)


def test_cli_demo_copies_the_sample_project_and_scores_it_once(tmp_path, capsys):
    from diffin_core.project.sample import SAMPLE_DIR
    main(["demo", "--workspace", str(tmp_path), "--method", "loss"])
    dest = tmp_path / "mnist-sample"
    df = pd.read_parquet(dest / "runs/loss/scores.parquet")
    assert len(df) == 4000 and "true_label" in df
    flipped = df["label"] != df["true_label"]
    assert flipped.sum() == 400                                       # the sample project's 10% flips
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(flipped, df["label_issue"]) > 0.95
    assert not (SAMPLE_DIR / "mnist" / "runs").exists()              # the shipped copy stays clean
    main(["demo", "--workspace", str(tmp_path), "--method", "loss"])  # second call: nothing rescored
    assert "already scored" in capsys.readouterr().out
