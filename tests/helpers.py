"""Tiny project folders written the way users (and tests outside this repo) write them."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from diffin_core.project.checkpoints import Recorder

MODEL_PY = '''from diffin_core.engine.models import MLP


def build():
    return MLP(6, (8,), 3)
'''

TOML = """[model]
factory = "model.py:build"
loss = "cross_entropy"

[data]
train = "data/train.npz"
query = "data/query.npz"
kind = "tabular"

[checkpoints]
manifest = "checkpoints/manifest.json"
"""


def make_tiny_project(root: Path, n: int = 96, seed: int = 0, steps_every: int = 2) -> Path:
    """A 3-class tabular project: MLP 6-8-3 trained with SGD, checkpoints by the Recorder."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 6)) * 2
    y = rng.integers(0, 3, n)
    x = (centres[y] + rng.normal(size=(n, 6))).astype(np.float32)
    qy = rng.integers(0, 3, 30)
    qx = (centres[qy] + rng.normal(size=(30, 6))).astype(np.float32)
    (root / "data").mkdir(exist_ok=True)
    np.savez(root / "data/train.npz", x=x, y=y)
    np.savez(root / "data/query.npz", x=qx, y=qy)
    (root / "model.py").write_text(MODEL_PY)
    (root / "diffin.toml").write_text(TOML)
    import importlib.util
    spec = importlib.util.spec_from_file_location("tiny_model", root / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(seed)
    model = mod.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    with Recorder(root, model, opt, train_size=n, every=steps_every) as rec:
        for _ in range(4):
            for idx in torch.randperm(n).split(16):
                opt.zero_grad()
                F.cross_entropy(model(xt[idx]), yt[idx]).backward()
                opt.step()
                rec.step()
    return root


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root with its content hash: to show nothing on disk changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def manifest(root: Path) -> dict:
    return json.loads((root / "checkpoints/manifest.json").read_text())


def run_cli(args, capsys, stdin: str | None = None, monkeypatch=None):
    """(exit code, stdout, stderr) of `diffin ARGS` run in this process."""
    from diffin_core.cli import main
    if stdin is not None:
        import io
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err
