"""The project's [train] recipe as a function: ``recipe_trainer(project)(x, y, seed) -> model``,
run into a temporary checkpoint folder (what-if retraining and cleanlab-cv's folds use it)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from diffin_core.errors import DiffinError

def _final_state(checkpoint_dir: Path, project):
    from diffin_core.project.checkpoints import read_manifest, read_state
    manifests = sorted(Path(checkpoint_dir).rglob("manifest.json"))
    if not manifests:
        raise DiffinError("the [train] recipe wrote no manifest.json into its checkpoint_dir",
                          project.config_path)
    m = read_manifest(manifests[0])
    state, _ = read_state(Path(manifests[0]).parent / m.checkpoints[-1].file)
    return state


def query_metrics(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 512) -> dict:
    """Mean cross-entropy (nats) and accuracy of ``model`` on (x, y)."""
    model = model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(y), batch):
            xb = torch.as_tensor(x[s:s + batch], dtype=torch.float32)
            yb = torch.as_tensor(y[s:s + batch], dtype=torch.long)
            logits = model(xb).float()
            loss += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    return {"loss": loss / max(len(y), 1), "accuracy": correct / max(len(y), 1)}


def recipe_trainer(project):
    """``train(x, y, seed) -> model``: the project's [train] recipe run into a temporary
    checkpoint folder, its final checkpoint loaded into a fresh ``project.build_model()``."""
    def train(x, y, seed):
        recipe, _ = project.load_callable(project.recipe, "[train] recipe")
        with tempfile.TemporaryDirectory(prefix="diffin-retrain-") as tmp:
            try:
                recipe(x, y, seed, Path(tmp))
            except DiffinError:
                raise
            except Exception as e:
                raise DiffinError(f"the [train] recipe raised {type(e).__name__}: {e}", project.config_path) from None
            state = _final_state(Path(tmp), project)
        model = project.build_model()
        model.load_state_dict(state)
        return model
    return train
