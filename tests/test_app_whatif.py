"""What-if page: predicted change from influence, verified by paired multi-seed retraining in the
background job, with the noise verdict; the run's LDS when known."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from app_fixtures import jobs, loss_run, new_app, scored, workspace  # noqa: F401


@pytest.fixture(scope="module")
def tiny_scored(tmp_path_factory):
    """A digits project whose [train] recipe takes well under a second, scored with tracin."""
    import textwrap
    from sklearn.datasets import load_digits
    from diffin_core.project.data import save_split
    from diffin_core.project.folder import Project
    from diffin_core.project.sample import flip_labels
    from diffin_core.run.scoring import score
    from test_tasks import MODEL, TOML, TRAIN
    root = tmp_path_factory.mktemp("whatif") / "tiny-digits"
    (root / "data").mkdir(parents=True)
    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, q = perm[:300], perm[300:600]
    noisy, _ = flip_labels(y[tr], 0.3, seed=0)
    save_split(root / "data/train.npz", x[tr], noisy, true_y=y[tr])
    save_split(root / "data/query.npz", x[q], y[q])
    (root / "diffin.toml").write_text(TOML)
    (root / "model.py").write_text(MODEL)
    (root / "train.py").write_text(textwrap.dedent(TRAIN))
    project = Project(root)
    recipe, _ = project.load_callable(project.recipe, "recipe")
    recipe(project.train.x, project.train.y, 0, root / "checkpoints")
    score(project, "tracin", run="tracin-1")
    return root


@pytest.fixture
def tiny(workspace, tiny_scored):
    dest = workspace / tiny_scored.name
    shutil.copytree(tiny_scored, dest)
    return dest


def test_paired_multi_seed_verification_and_noise_verdict(tiny, jobs):
    from diffin_core.tasks.curate import noise_verdict
    at = new_app(tiny, "pages/6_What-if.py")
    at.number_input(key="whatif_k").set_value(15).run()
    scores = pd.read_parquet(tiny / "runs/tracin-1/scores.parquet")
    expected = np.sort(scores["influence"].to_numpy())[:15].sum()
    shown = [m.value for m in at.metric if m.label.startswith("Predicted change")][0]
    assert float(shown.split()[0]) == round(expected, 4)
    assert expected < 0 and "falls" in [m.value for m in at.metric if m.label == "Direction"][0]

    assert at.number_input(key="whatif_seeds").value == 3
    at.button(key="whatif_verify").click().run()
    job = jobs.list()[0]
    assert job.kind == "whatif"
    assert jobs.wait(job.id, timeout=300).status == "done", jobs.get(job.id).error
    at.run()
    assert not at.exception

    per_seed = at.dataframe[0].value                       # the paired table, one row per seed
    assert per_seed["seed"].tolist() == [0, 1, 2]
    assert np.allclose(per_seed["Δ loss"], per_seed["loss without"] - per_seed["loss with all"])
    assert per_seed["loss with all"].nunique() == 3        # different seeds, different baselines
    summary = at.dataframe[1].value
    assert len(summary) == 1 and summary["removed"].iloc[0] == 15 and summary["seeds"].iloc[0] == 3
    assert summary["predicted Δ loss"].iloc[0] == pytest.approx(expected, rel=1e-12)
    assert summary["actual Δ loss (mean)"].iloc[0] == pytest.approx(per_seed["Δ loss"].mean())
    assert summary["actual Δ loss (std)"].iloc[0] == pytest.approx(per_seed["Δ loss"].std(ddof=1))

    verdict = noise_verdict(expected, per_seed["Δ loss"].to_numpy())
    assert summary["verdict"].iloc[0] == verdict["verdict"]
    boxes = [e.value for e in (*at.success, *at.info, *at.warning)]
    assert verdict["verdict_text"] in boxes
    assert ("sign is wrong" in verdict["verdict_text"]) == (verdict["verdict"] == "contradicted")

    stored = [json.loads(p.read_text()) for p in (tiny / "runs/tracin-1/whatif").glob("*.json")
              if not p.name.startswith("baseline-")]
    assert len(stored) == 1 and stored[0]["seeds"] == [0, 1, 2]
    assert sorted(stored[0]["removed_ids"]) == sorted(scores.nsmallest(15, "influence")["sample_id"].tolist())
    assert len(list((tiny / "runs/tracin-1/whatif").glob("baseline-*.json"))) == 3


def test_lds_of_the_runs_method_is_shown(tiny):
    (tiny / "lds.json").write_text(json.dumps([
        {"method": "tracin", "model": "tiny-digits", "subsets": 50, "lds_mean": 0.123, "lds_std": 0.045},
        {"method": "diffin", "model": "tiny-digits", "subsets": 50, "lds_mean": 0.9, "lds_std": 0.01}]))
    at = new_app(tiny, "pages/6_What-if.py")
    captions = " ".join(c.value for c in at.caption)
    assert "0.12 ± 0.04 on tiny-digits" in captions and "0.90" not in captions


def test_review_exclusions_as_the_selection(scored, jobs):
    from diffin_core.workspace.review import ReviewLog
    ReviewLog(scored).decide_many([3, 5, 8], "exclude")
    at = new_app(scored, "pages/6_What-if.py")
    at.radio(key="whatif_source").set_value("the samples excluded in review").run()
    assert [m.value for m in at.metric if m.label == "Samples to remove"][0] == "3"
