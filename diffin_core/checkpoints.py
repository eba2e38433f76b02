"""Checkpoints: the manifest, safe loading (safetensors, or .pt with weights_only=True), the Recorder.

manifest.json: {"train_size": N, "optimizer": "SGD", "momentum": 0.0,
                "checkpoints": [{"file": "ckpt_000.safetensors", "step": 40, "lr": 0.1}, ...]}
step = the global optimiser step at which the weights were saved; lr = the learning rate of the
update taken from those weights. The last checkpoint (highest step) is the model being explained.
"""
from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_path, write_text
from .errors import DiffinError

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")


@dataclass
class Checkpoint:
    file: str
    step: int
    lr: float


@dataclass
class Manifest:
    train_size: int | None
    checkpoints: list[Checkpoint]
    optimizer: str = "SGD"
    momentum: float = 0.0
    path: str = ""

    def to_json(self) -> str:
        return json.dumps({"train_size": self.train_size, "optimizer": self.optimizer,
                           "momentum": self.momentum,
                           "checkpoints": [c.__dict__ for c in self.checkpoints]}, indent=1)


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise DiffinError("checkpoint manifest not found", path)
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffinError(f"not valid JSON ({e})", path) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("checkpoints"), list) or not raw["checkpoints"]:
        raise DiffinError("needs a non-empty list 'checkpoints'", path)
    ckpts = []
    for i, c in enumerate(raw["checkpoints"]):
        if not isinstance(c, dict):
            raise DiffinError(f"checkpoint {i} is not an object", path)
        for key in ("file", "step", "lr"):
            if key not in c:
                raise DiffinError(f"checkpoint {i} ({c.get('file', '?')}) has no {key!r}", path)
        try:
            step, lr = int(c["step"]), float(c["lr"])
        except (TypeError, ValueError):
            raise DiffinError(f"checkpoint {i} has a non-numeric step or lr", path) from None
        if step < 0 or not lr >= 0:
            raise DiffinError(f"checkpoint {i} needs step >= 0 and lr >= 0", path)
        ckpts.append(Checkpoint(str(c["file"]), step, lr))
    steps = [c.step for c in ckpts]
    if len(set(steps)) != len(steps):
        raise DiffinError("two checkpoints share a step", path)
    ckpts.sort(key=lambda c: c.step)
    return Manifest(raw.get("train_size"), ckpts, str(raw.get("optimizer", "SGD")),
                    float(raw.get("momentum", 0.0) or 0.0), str(path))


def write_manifest(path: str | Path, manifest: Manifest) -> None:
    write_text(path, manifest.to_json())


def read_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a state_dict and any metadata it carries (step, lr) without running pickled code.

    A .pt may hold a bare state_dict or a dict with "model"/"state_dict" and optional "step",
    "lr" or an "optimizer" state whose param_groups give lr.
    """
    path = Path(path)
    if not path.is_file():
        raise DiffinError("checkpoint file not found", path)
    if path.stat().st_size == 0:
        raise DiffinError("checkpoint file is empty (0 bytes)", path)
    meta: dict = {}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
            from safetensors import safe_open
            with safe_open(str(path), "pt") as fh:
                meta = dict(fh.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise DiffinError(f"corrupt or truncated safetensors file ({e})", path) from None
    elif path.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DiffinError("refused: the .pt file holds pickled code or objects, not plain tensors "
                              f"(weights_only load failed: {first[:120]})", path) from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
            raise DiffinError(f"corrupt or truncated checkpoint ({type(e).__name__})", path) from None
        state = obj
        if isinstance(obj, dict):
            for key in ("model", "state_dict", "model_state_dict"):
                if isinstance(obj.get(key), dict):
                    state = obj[key]
                    meta = {k: obj[k] for k in ("step", "lr", "epoch") if k in obj}
                    opt = obj.get("optimizer") or obj.get("optimizer_state_dict")
                    if "lr" not in meta and isinstance(opt, dict) and opt.get("param_groups"):
                        meta["lr"] = opt["param_groups"][0].get("lr")
                    break
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise DiffinError("the checkpoint is not a state_dict of tensors", path)
    else:
        raise DiffinError(f"unsupported checkpoint format {path.suffix!r}; use .safetensors or .pt", path)
    return state, meta


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], path) -> None:
    """Raise a one-line DiffinError when ``state`` does not fit ``model`` exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing:
        raise DiffinError(f"tensors don't fit the model: missing {missing[0]!r}"
                          + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""), path)
    if extra:
        raise DiffinError(f"tensors don't fit the model: unexpected {extra[0]!r}", path)
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise DiffinError(f"tensors don't fit the model: {k!r} has shape {list(state[k].shape)}, "
                              f"the model expects {list(v.shape)}", path)
        if not torch.isfinite(state[k].float()).all():
            raise DiffinError(f"tensor {k!r} contains NaN or infinite values", path)


def save_state(path: str | Path, model: nn.Module, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


class Recorder:
    """Drop-in checkpoint recorder for a training loop.

        with Recorder(project_dir, model, optimizer, train_size=len(ds), every=50) as rec:
            for x, y in loader:
                loss.backward(); optimizer.step(); rec.step()

    ``train_size`` (recommended) lets the engine check the manifest against the data.
    Saves the initial weights (step 0), every ``every`` optimiser steps, and the final weights,
    as safetensors in <project>/checkpoints with manifest.json (step, lr of the next update,
    optimiser type and momentum). Diff-In assumes SGD-like updates theta -= lr * g: heavy-ball
    momentum beta is accounted for by an effective lr of lr/(1-beta); Adam's per-coordinate
    preconditioning is not modelled, so scores become a ranking heuristic (still signed).
    """

    def __init__(self, project_dir, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 train_size: int | None = None, every: int = 50, folder: str = "checkpoints"):
        self.dir = Path(project_dir) / folder
        self.model, self.optimizer, self.every = model, optimizer, max(1, int(every))
        group = optimizer.param_groups[0]
        momentum = group.get("momentum", 0.0) or 0.0
        self.manifest = Manifest(None if train_size is None else int(train_size), [], type(optimizer).__name__, float(momentum))
        self.global_step = 0

    def __enter__(self) -> "Recorder":
        self.dir.mkdir(parents=True, exist_ok=True)
        self.save()
        return self

    def step(self) -> None:
        """Call once after every optimizer.step()."""
        self.global_step += 1
        if self.global_step % self.every == 0:
            self.save()

    def save(self) -> None:
        if self.manifest.checkpoints and self.manifest.checkpoints[-1].step == self.global_step:
            return
        lr = float(self.optimizer.param_groups[0]["lr"])
        name = f"ckpt_{self.global_step:06d}.safetensors"
        save_state(self.dir / name, self.model, {"step": self.global_step, "lr": lr})
        self.manifest.checkpoints.append(Checkpoint(name, self.global_step, lr))
        write_manifest(self.dir / "manifest.json", self.manifest)

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.save()
        return False
