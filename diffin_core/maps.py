"""The training-set map: UMAP of the final checkpoint's penultimate activations.

The 2-D coordinates are cached in runs/<run>/umap.parquet (sample_id, umap_x, umap_y); the first
fit in a process compiles numba code (about a minute), so the app runs ``compute`` as a job.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .atomic import atomic_path
from .models import penultimate
from .project import Project

FILE = "umap.parquet"


def cache_path(project: Project, run: str) -> Path:
    return project.run(run).path / FILE


def features(project: Project, batch: int = 1024, progress=None) -> np.ndarray:
    """(N, D) penultimate activations of the final model over the training split."""
    model = project.final_model()
    x = project.train.x
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            out.append(penultimate(model, torch.as_tensor(x[start:start + batch])).numpy())
            if progress:
                progress(min(start + batch, len(x)), len(x), "features")
    return np.concatenate(out).astype(np.float32)


def load(project: Project, run: str) -> pd.DataFrame | None:
    """The cached map, or None when not computed yet."""
    p = cache_path(project, run)
    return pd.read_parquet(p) if p.is_file() else None


def compute(project: Project, run: str, progress=None, seed: int = 0) -> Path:
    """Fit UMAP on the features and write runs/<run>/umap.parquet atomically."""
    import umap
    feats = features(project, progress=progress)
    if progress:
        progress(len(feats), len(feats), "fitting UMAP (the first fit compiles for about a minute)")
    xy = umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, random_state=seed).fit_transform(feats)
    df = pd.DataFrame({"sample_id": project.train.ids, "umap_x": xy[:, 0], "umap_y": xy[:, 1]})
    with atomic_path(cache_path(project, run)) as tmp:
        df.to_parquet(tmp, index=False)
    return cache_path(project, run)
