"""diffin score --ray: a local 2-CPU Ray cluster scores like a single process, shard by shard."""
import json

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install ray): the --ray path is untested")

from diffin_core.cli import main  # noqa: E402
from diffin_core.run.distributed import score_on_ray, shard_bounds  # noqa: E402
from diffin_core.errors import DiffinError  # noqa: E402
from diffin_core.methods import ScoreSettings  # noqa: E402
from diffin_core.run.scoring import score  # noqa: E402

from helpers import make_tiny_project                                # noqa: E402

SETTINGS = ScoreSettings(batch_size=16, hessian_batch=32)           # 96 rows: 6 chunks, 3 shards


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny project with its train split as a memory-mapped .npy folder, streamed."""
    root = make_tiny_project(tmp_path_factory.mktemp("ray") / "tiny")
    with np.load(root / "data/train.npz") as z:
        (root / "data/train").mkdir()
        np.save(root / "data/train/x.npy", z["x"])
        np.save(root / "data/train/y.npy", z["y"])
    toml = (root / "diffin.toml").read_text().replace('train = "data/train.npz"', 'train = "data/train"\nstream = true')
    (root / "diffin.toml").write_text(toml)
    return root


def test_shard_bounds_cover_the_rows_on_chunk_boundaries():
    assert shard_bounds(96, 3, 16) == [(0, 32), (32, 64), (64, 96)]
    assert shard_bounds(100, 4, 16) == [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert shard_bounds(10, 8, 256) == [(0, 10)]
    for n, k, b in [(1000, 7, 64), (5, 2, 1), (257, 2, 256)]:
        bounds = shard_bounds(n, k, b)
        assert bounds[0][0] == 0 and bounds[-1][1] == n and len(bounds) <= k
        assert all(a % b == 0 and a < e for a, e in bounds)
        assert all(e == a2 for (_, e), (a2, _) in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("method", ["tracin", "diffin"])
def test_ray_matches_single_process(cluster, tiny, method):
    local = pd.read_parquet(score(tiny, method, run=f"{method}-local", settings=SETTINGS) / "scores.parquet")
    run = score_on_ray(tiny, method, run=f"{method}-ray", settings=SETTINGS, shards=3)
    sharded = pd.read_parquet(run / "scores.parquet")
    meta = json.loads((run / "meta.json").read_text())
    assert meta["ray"]["shards"] == 3 and meta["ray"]["slots"] == 2 and meta["train_size"] == 96
    assert meta["method"] == method
    assert list(sharded.columns) == list(local.columns)
    np.testing.assert_array_equal(sharded["sample_id"], local["sample_id"])
    for col in ("influence", "self_influence", "label_issue", "confidence", "loss", "pred"):
        np.testing.assert_allclose(sharded[col], local[col], rtol=1e-6, atol=1e-10, err_msg=col)
    assert local["influence"].std() > 0 and np.isfinite(sharded["self_influence"]).all()


@pytest.mark.parametrize("method", ["diffin", "tracin"])
def test_ray_run_writes_the_same_approximations_as_a_local_run(cluster, tiny, tmp_path, method):
    """meta.json "approximations" of a Ray run: the same lines, in the same order, as a local run
    of the same project (here a manifest without per-step lrs: one line; diffin's plan adds the
    large-step line on the plan task), and the loss-based methods none."""
    import shutil
    root = tmp_path / "approx"
    shutil.copytree(tiny, root, ignore=shutil.ignore_patterns("runs"))
    raw = json.loads((root / "checkpoints/manifest.json").read_text())
    raw.pop("step_lrs"), raw.pop("group_steps", None)
    (root / "checkpoints/manifest.json").write_text(json.dumps(raw))
    local = json.loads((score(root, method, run="local", settings=SETTINGS, features=False) / "meta.json").read_text())
    sharded = json.loads((score_on_ray(root, method, run="ray", settings=SETTINGS, shards=3) / "meta.json").read_text())
    assert local["approximations"] and any("no per-step lrs" in a for a in local["approximations"])
    assert sharded["approximations"] == local["approximations"]
    loss = json.loads((score_on_ray(root, "loss", run="ray-loss", settings=SETTINGS, shards=3) / "meta.json").read_text())
    assert loss["approximations"] == []


def test_cli_ray_flag_without_address(cluster, tiny, capsys):
    main(["score", str(tiny), "-m", "tracin", "--run", "cli-ray", "--ray"])
    assert "wrote" in capsys.readouterr().out
    meta = json.loads((tiny / "runs/cli-ray/meta.json").read_text())
    assert meta["ray"]["address"] == "local"
    local = pd.read_parquet(score(tiny, "tracin", run="cli-local") / "scores.parquet")
    np.testing.assert_allclose(pd.read_parquet(tiny / "runs/cli-ray/scores.parquet")["influence"],
                               local["influence"], rtol=1e-6, atol=1e-10)


def test_error_inside_a_shard_is_one_line(cluster, tiny, tmp_path):
    import shutil
    root = tmp_path / "nan"
    shutil.copytree(tiny, root, ignore=shutil.ignore_patterns("runs"))
    x = np.load(root / "data/train/x.npy")
    x[70, 2] = np.nan                                           # row 70: in the last shard only
    np.save(root / "data/train/x.npy", x)
    with pytest.raises(DiffinError) as e:
        score_on_ray(root, "tracin", run="nan", settings=SETTINGS, shards=3)
    msg = str(e.value)
    assert "\n" not in msg and "x.npy" in msg and "NaN" in msg and "row 70" in msg, msg
    assert not (root / "runs/nan").exists()


def test_killed_ray_run_resumes_with_the_missing_shards(cluster, tiny):
    seen = []

    def stop_after_first_shard(done, total, message):
        seen.append(message)
        if "scored" in message:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        score_on_ray(tiny, "diffin", run="killed", settings=SETTINGS, shards=3, progress=stop_after_first_shard)
    assert not (tiny / "runs/killed").exists()
    messages = []
    run = score_on_ray(tiny, "diffin", run="killed", settings=SETTINGS, shards=3,
                       progress=lambda d, t, m: messages.append((d, m)))
    resumed = [d for d, m in messages if "resumed" in m]
    assert resumed and resumed[0] in (32, 64), messages         # at least the first shard was kept
    local = pd.read_parquet(score(tiny, "diffin", run="killed-local", settings=SETTINGS) / "scores.parquet")
    got = pd.read_parquet(run / "scores.parquet")
    for col in ("influence", "self_influence", "label_issue"):
        np.testing.assert_allclose(got[col], local[col], rtol=1e-6, atol=1e-10, err_msg=col)
    assert not any((tiny / "runs/.stages").glob("diffin-*/scores/*")) if (tiny / "runs/.stages").exists() else True


def test_node_without_the_project_folder_is_named(cluster, tmp_path):
    from diffin_core.run.distributed import _run_shards
    from diffin_core.project.stages import Stages, StageSettings
    missing = tmp_path / "not-shared"                           # what a node without the share sees
    with pytest.raises(DiffinError) as e:
        _run_shards(ray, {"num_cpus": 1}, str(missing), SETTINGS.to_dict(), "tracin", [(0, 16)], 16,
                    lambda d, t, m: None, Stages(None, StageSettings("tracin", {}, "", "")))
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg and "every node must see the project folder" in msg, msg


# --- methods whose run post-processes the pass: the same label_issue on Ray as in one process ----
TINY_TRAIN = '''import numpy as np
import torch
from torch.nn import functional as F

from diffin_core.project.checkpoints import Recorder
from diffin_core.engine.models import MLP


def train(train_x, train_y, seed, checkpoint_dir):
    torch.manual_seed(seed)
    x = torch.as_tensor(np.asarray(train_x), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    model = MLP(6, (8,), 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(seed)
    with Recorder(checkpoint_dir, model, opt, train_size=len(y), every=4, folder=".") as rec:
        for _ in range(4):
            for idx in torch.randperm(len(y), generator=gen).split(16):
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                rec.step()
'''


@pytest.mark.parametrize("method", ["mean-loss", "aum", "forgetting"])
def test_ray_training_dynamics_label_issue_matches_single_process(cluster, tiny, method):
    local = pd.read_parquet(score(tiny, method, run=f"{method}-local", settings=SETTINGS) / "scores.parquet")
    sharded = pd.read_parquet(score_on_ray(tiny, method, run=f"{method}-ray", settings=SETTINGS, shards=3)
                              / "scores.parquet")
    assert local["label_issue"].std() > 0                      # trajectory statistics, not a constant
    for col in ("influence", "label_issue"):
        np.testing.assert_allclose(sharded[col], local[col], rtol=1e-6, atol=1e-10, err_msg=col)


def test_ray_cleanlab_cv_without_a_recipe_refuses_in_one_line(cluster, tiny):
    with pytest.raises(DiffinError) as e:
        score_on_ray(tiny, "cleanlab-cv", run="cv-norecipe", settings=SETTINGS, shards=3)
    msg = str(e.value)
    assert "\n" not in msg and "[train] recipe" in msg and "diffin.toml" in msg, msg
    assert not (tiny / "runs/cv-norecipe").exists()


def test_ray_cleanlab_cv_retrains_the_recipe_like_a_local_run(cluster, tiny, tmp_path):
    import shutil
    root = tmp_path / "recipe"
    shutil.copytree(tiny, root, ignore=shutil.ignore_patterns("runs"))
    (root / "train.py").write_text(TINY_TRAIN)
    (root / "diffin.toml").write_text((root / "diffin.toml").read_text() + '\n[train]\nrecipe = "train.py:train"\n')
    local = pd.read_parquet(score(root, "cleanlab-cv", run="cv-local", settings=SETTINGS) / "scores.parquet")
    sharded = pd.read_parquet(score_on_ray(root, "cleanlab-cv", run="cv-ray", settings=SETTINGS, shards=3)
                              / "scores.parquet")
    assert local["label_issue"].std() > 0
    np.testing.assert_allclose(sharded["label_issue"], local["label_issue"], rtol=1e-6, atol=1e-10)
