"""The linear datamodeling score (LDS; Park et al. 2023 "TRAK", as dattri computes it).

For random subsets S_1..S_M of the training set (each keeps ``fraction`` = 50% of it) and query
samples q, an attribution method predicts the query loss of the model trained on S_j as the full
model's loss plus the summed influence of what was left out:

    predicted(S_j, q) = sum_{z not in S_j} influence(z, q)       (the product's sign: influence =
                                                                  L_q(without z) - L_q(with z))
    actual(S_j, q)    = L_q(model retrained on S_j)
    LDS = mean over q of Spearman_j(predicted(S_j, q), actual(S_j, q))      (1 = perfect ranking)

The full model's loss is a constant per q, so it does not change the Spearman correlation.
Also here: a TRAK-style projected estimator (random projections of per-sample gradients, the
Gauss-Newton kernel of the features, ensembled over late checkpoints), and ``known_lds`` which
the What-if page reads (a project's own lds.json, else the committed benchmark table).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

COMMITTED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "lds.csv"


def random_subsets(n: int, count: int = 50, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """(count, n) boolean masks, each keeping round(fraction * n) samples (seeded)."""
    rng = np.random.default_rng(seed)
    keep = int(round(fraction * n))
    masks = np.zeros((count, n), dtype=bool)
    for j in range(count):
        masks[j, rng.choice(n, keep, replace=False)] = True
    return masks


def predicted_changes(influence: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Predicted query-loss change of each subset (M, Q): the summed influence (N, Q) of the
    samples each mask (M, N) leaves out."""
    return (~masks).astype(np.float64) @ np.asarray(influence, dtype=np.float64)


def lds(predicted: np.ndarray, actual: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean over query samples, per-query Spearman) of predicted vs actual, both (M, Q).
    A query whose actual or predicted values are constant has an undefined correlation and is
    skipped (NaN in the per-query array)."""
    predicted, actual = np.asarray(predicted), np.asarray(actual)
    per = np.array([spearmanr(predicted[:, q], actual[:, q])[0]
                    if np.ptp(predicted[:, q]) > 0 and np.ptp(actual[:, q]) > 0 else np.nan
                    for q in range(actual.shape[1])])
    return float(np.nanmean(per)), per


def per_query_influence(ctx, method: str, qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
    """Influence (N, Q) of every training sample on each query sample's loss, one method run
    per query sample (the registry's estimators score the mean loss of their query set)."""
    from diffin_core.run.scoring import run_method
    cols = [run_method(ctx, method, qx[i:i + 1], qy[i:i + 1], need_self=False)["influence"]
            for i in range(len(qy))]
    return np.stack(cols, 1)


def trak_influence(ctx, qx: np.ndarray, qy: np.ndarray, dim: int = 1024, last: int = 3,
                   damping: float = 1e-3, seed: int = 0) -> np.ndarray:
    """TRAK-style projected estimator (N, Q), in the product's sign (> 0 helpful).

    At each of the ``last`` checkpoints: phi = P^T g (per-sample loss gradients, P a seeded
    Gaussian (params, dim) / sqrt(dim)); influence(z, q) = phi_q^T (Phi^T Phi / N + damping *
    mean eigenvalue * I)^-1 phi_z / N (the Gauss-Newton influence function in the projected
    space); averaged over the checkpoints (TRAK ensembles models; we ensemble a run's late
    checkpoints). Simplified from Park et al. 2023: loss gradients instead of the margin's, no
    (1 - p) reweighting."""
    gen = torch.Generator().manual_seed(seed)
    p = ctx.fm.num_params
    proj = (torch.randn(p, dim, generator=gen, dtype=torch.float64) / dim ** 0.5).to(ctx.device, ctx.thetas[0].dtype)
    total = np.zeros((ctx.n, len(qy)))
    ks = list(range(max(0, ctx.m - last), ctx.m))
    qxt, qyt = ctx.tensors(qx, qy)
    for k in ks:
        fm = ctx.fm_at(k)                        # checkpoint k's own BatchNorm statistics
        feats = torch.cat([(fm.per_sample_grads(ctx.thetas[k], x, y) @ proj).double().cpu()
                           for _sl, x, y in ctx.chunks()])                               # (N, dim)
        fq = (fm.per_sample_grads(ctx.thetas[k], qxt, qyt) @ proj).double().cpu()     # (Q, dim)
        kernel = feats.T @ feats / ctx.n
        lam = damping * float(torch.trace(kernel)) / dim
        sol = torch.linalg.solve(kernel + lam * torch.eye(dim, dtype=kernel.dtype), fq.T)  # (dim, Q)
        total += (feats @ sol).numpy() / ctx.n
    return total / len(ks)


def known_lds(method: str, project_root: str | Path | None = None) -> list[dict]:
    """What is known about ``method``'s LDS: rows {model, lds_mean, lds_std, subsets, source}.

    A project's own ``lds.json`` (a list of such rows with a "method" key) comes first; else the
    committed benchmark table benchmarks/results/lds.csv (if it is there)."""
    rows: list[dict] = []
    if project_root is not None:
        path = Path(project_root) / "lds.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                rows = [dict(r, source="this project's lds.json") for r in data if r.get("method") == method]
            except (json.JSONDecodeError, OSError, AttributeError, TypeError):
                rows = []
    if not rows and COMMITTED.is_file():
        import pandas as pd
        table = pd.read_csv(COMMITTED)
        rows = [dict(r, source="benchmarks/results/lds.csv")
                for r in table[table["method"] == method].to_dict("records")]
    return rows
