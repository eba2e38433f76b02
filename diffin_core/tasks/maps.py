"""The training-set map: UMAP of the run's stored influence features (features.py: each sample's
projected effective gradient, no second gradient pass), of the final checkpoint's penultimate
activations, or of its per-sample loss gradients randomly projected to 128 dimensions.

The 2-D coordinates are cached in runs/<run>/umap.parquet (activations) or
runs/<run>/umap-gradients.parquet (sample_id, umap_x, umap_y); the first fit in a process
compiles numba code (about a minute), so the app runs ``compute`` as a job.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diffin_core.project.atomic import atomic_path
from diffin_core.engine.models import penultimate
from diffin_core.project.folder import Project

FILES = {"activations": "umap.parquet", "gradients": "umap-gradients.parquet", "stored": "umap-stored.parquet"}
PCA_DIM = 50                 # stored features (d = 1024) are reduced to this before UMAP
PROJECTED_DIM = 128


def cache_path(project: Project, run: str, kind: str = "activations") -> Path:
    return project.run(run).path / FILES[kind]


def features(project: Project, kind: str = "activations", batch: int = 256, progress=None,
             seed: int = 0) -> np.ndarray:
    """(N, D) features of the training split at the final checkpoint: penultimate activations,
    or per-sample gradients times a fixed Gaussian projection (P, 128) / sqrt(128), which keeps
    gradient inner products in expectation (Johnson-Lindenstrauss)."""
    if kind not in FILES:
        raise ValueError(f"unknown map features {kind!r}; choose from {list(FILES)}")
    model = project.final_model()
    x, y = project.train.x, project.train.y
    if kind == "gradients":
        from diffin_core.engine.functional import FunctionalModel
        fm = FunctionalModel(model)
        theta = fm.theta_of(model)
        gen = torch.Generator().manual_seed(seed)
        proj = torch.randn(fm.num_params, PROJECTED_DIM, generator=gen) / PROJECTED_DIM ** 0.5
    out = []
    for start in range(0, len(x), batch):
        xb = torch.as_tensor(x[start:start + batch])
        if kind == "gradients":
            g = fm.per_sample_grads(theta, xb, torch.as_tensor(y[start:start + batch]))
            out.append((g @ proj).numpy())
        else:
            with torch.no_grad():
                out.append(penultimate(model, xb).numpy())
        if progress:
            progress(min(start + batch, len(x)), len(x), f"features ({kind})")
    return np.concatenate(out).astype(np.float32)


def stored_features(project: Project, run: str, seed: int = 0) -> np.ndarray:
    """(N, PCA_DIM) float32 from the run's feature store: the projected effective gradients,
    unit rows (direction of influence, not its size), reduced by a seeded randomized PCA. No
    gradient is computed."""
    from diffin_core.errors import DiffinError
    from diffin_core.run.features import FeatureStore
    store = FeatureStore.open(project, run)
    if store is None:
        raise DiffinError(f"run {run!r} has no feature store (built by `diffin score` for diffin runs)",
                          project.run(run).path)
    x = torch.from_numpy(np.asarray(store.train, dtype=np.float32))
    x = x - x.mean(0)
    q = min(PCA_DIM, *x.shape)
    with torch.random.fork_rng(devices=[]):          # pca_lowrank draws from the global RNG:
        torch.manual_seed(seed)                        # seeded, the same map every time
        u, s, _ = torch.pca_lowrank(x, q=q, center=False, niter=3)
    return (u * s).numpy().astype(np.float32)


def load(project: Project, run: str, kind: str = "activations") -> pd.DataFrame | None:
    """The cached map, or None when not computed yet."""
    p = cache_path(project, run, kind)
    return pd.read_parquet(p) if p.is_file() else None


def compute(project: Project, run: str, progress=None, seed: int = 0, kind: str = "activations") -> Path:
    """Fit UMAP on the features and write the run's map file atomically."""
    import umap
    feats = stored_features(project, run, seed) if kind == "stored" else features(project, kind, progress=progress, seed=seed)
    if progress:
        progress(len(feats), len(feats), "fitting UMAP (the first fit compiles for about a minute)")
    xy = umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, random_state=seed).fit_transform(feats)
    df = pd.DataFrame({"sample_id": project.train.ids, "umap_x": xy[:, 0], "umap_y": xy[:, 1]})
    with atomic_path(cache_path(project, run, kind)) as tmp:
        df.to_parquet(tmp, index=False)
    return cache_path(project, run, kind)
