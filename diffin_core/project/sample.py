"""The sample project: real MNIST (5,000 digits; LeCun, Cortes & Burges), 10% flipped labels.

    python -m diffin_core.project.sample [--out sample_data/mnist]

regenerates sample_data/mnist/ from sample_data/mnist_5k.npz: 4,000 train and 1,000 query
samples, 400 train labels flipped to another class (seed 0; the clean labels are kept in
train.npz as ``true_y`` so the app and tests can show recall), and a small CNN trained with
SGD, lr cosine-decayed from 0.3 to 0.003, whose 12 checkpoints (every 50 steps and the last)
and learning rates are in the manifest.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from diffin_core.project.atomic import write_text
from diffin_core.project.data import save_split

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "sample_data"
RAW = SAMPLE_DIR / "mnist_5k.npz"

TOML = """[project]
name = "MNIST sample (10% flipped labels)"

[model]
factory = "model.py:build"
loss = "cross_entropy"

[data]
train = "data/train.npz"
query = "data/query.npz"
kind = "image"
image_shape = [1, 28, 28]
label_names = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]

[checkpoints]
manifest = "checkpoints/manifest.json"

[train]
recipe = "train.py:train"
"""

MODEL_PY = '''"""The sample project's model: diffin_core's SmallCNN for 1x28x28 digits."""
from diffin_core.engine.models import SmallCNN


def build():
    return SmallCNN(in_channels=1, num_classes=10, image_size=28)
'''

TRAIN_PY = '''"""The sample project's training recipe: (train_x, train_y, seed, checkpoint_dir) -> None."""
import math

import torch
from torch.nn import functional as F

from diffin_core.project.checkpoints import Recorder
from diffin_core.engine.models import SmallCNN

EPOCHS, BATCH, LR, FLOOR, EVERY = 8, 64, 0.3, 0.01, 50


def train(train_x, train_y, seed, checkpoint_dir):
    """SGD, batch 64, 8 epochs, lr cosine-decayed from 0.3 to 0.003 (a stable end, so that
    leave-one-out effects are reproducible); checkpoints every 50 steps into checkpoint_dir."""
    torch.manual_seed(seed)
    x = torch.as_tensor(train_x, dtype=torch.float32).reshape(-1, 1, 28, 28)
    y = torch.as_tensor(train_y, dtype=torch.long)
    model = SmallCNN(1, 10, 28)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    total = EPOCHS * math.ceil(len(y) / BATCH)
    cosine = lambda t: FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    gen = torch.Generator().manual_seed(seed)
    with Recorder(checkpoint_dir, model, opt, train_size=len(y), every=EVERY, folder=".") as rec:
        for _ in range(EPOCHS):
            for idx in torch.randperm(len(y), generator=gen).split(BATCH):
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                sched.step()
                rec.step()
'''


def flip_labels(y: np.ndarray, fraction: float, seed: int, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped indices): ``fraction`` of labels moved to a different class."""
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(len(y), int(round(fraction * len(y))), replace=False))
    noisy = y.astype(np.int64).copy()
    noisy[flipped] = (noisy[flipped] + rng.integers(1, num_classes, len(flipped))) % num_classes
    return noisy, flipped


def mnist_splits(n_train: int = 4000, seed: int = 0):
    """(x_train uint8 (4000, 784), y_train, x_query, y_query) from the shipped 5k file."""
    with np.load(RAW) as d:
        x, y = d["X"], d["y"].astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    tr, q = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[q], y[q]


def build_sample_project(out: str | Path = SAMPLE_DIR / "mnist", noise: float = 0.1, seed: int = 0) -> Path:
    """Write the whole sample project folder (about 2 MB); replaces an existing one atomically."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    xtr, ytr, xq, yq = mnist_splits(seed=seed)
    noisy, _ = flip_labels(ytr, noise, seed)
    save_split(tmp / "data/train.npz", xtr, noisy, true_y=ytr)
    save_split(tmp / "data/query.npz", xq, yq)
    write_text(tmp / "diffin.toml", TOML)
    write_text(tmp / "model.py", MODEL_PY)
    write_text(tmp / "train.py", TRAIN_PY)
    return train_and_place(tmp, out, seed)


def train_and_place(tmp: Path, out: Path, seed: int, drop: tuple[str, ...] = ()) -> Path:
    """Run the project folder ``tmp``'s [train] recipe into tmp/checkpoints, remove the
    sub-folders named in ``drop`` (caches), then move ``tmp`` to ``out`` (replacing it)."""
    from diffin_core.project.folder import Project
    project = Project(tmp)
    recipe, _ = project.load_callable(project.recipe, "[train] recipe")
    recipe(project.train.x, project.train.y, seed, tmp / "checkpoints")
    for name in drop:
        shutil.rmtree(tmp / name, ignore_errors=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(SAMPLE_DIR / "mnist"))
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(build_sample_project(a.out, a.noise, a.seed))


if __name__ == "__main__":
    main()
