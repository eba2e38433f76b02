"""Comparing two runs, and the score-based subsets the Export page offers.

Ranks are compared on sample_id; ``coreset_mask``/``drop_harmful_mask`` are stand-ins until the
engine's task module offers these selections.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def _aligned(a: pd.DataFrame, b: pd.DataFrame, column: str) -> pd.DataFrame:
    return a[["sample_id", "label", column]].merge(b[["sample_id", column]], on="sample_id",
                                                   suffixes=("_a", "_b"))


def rank_correlation(a: pd.DataFrame, b: pd.DataFrame, column: str = "influence") -> float | None:
    """Spearman correlation of ``column`` between two runs' scores (None if undefined)."""
    df = _aligned(a, b, column).dropna()
    if len(df) < 2:
        return None
    r = df[f"{column}_a"].rank().corr(df[f"{column}_b"].rank())
    return None if pd.isna(r) else float(r)


def disagreements(a: pd.DataFrame, b: pd.DataFrame, column: str = "label_issue", n: int = 20) -> pd.DataFrame:
    """The ``n`` samples whose percentile rank on ``column`` differs most between the runs."""
    df = _aligned(a, b, column).dropna()
    df["rank_a"] = df[f"{column}_a"].rank(pct=True)
    df["rank_b"] = df[f"{column}_b"].rank(pct=True)
    df["gap"] = (df["rank_a"] - df["rank_b"]).abs()
    return df.sort_values("gap", ascending=False, kind="stable").head(n).reset_index(drop=True)


def coreset_mask(scores: pd.DataFrame, fraction: float) -> np.ndarray:
    """Keep the most helpful ``fraction`` of samples (by influence), the same share per class."""
    keep = np.zeros(len(scores), dtype=bool)
    for _, idx in scores.groupby("label").indices.items():
        n = int(round(fraction * len(idx)))
        order = np.argsort(-scores["influence"].to_numpy()[idx], kind="stable")
        keep[idx[order[:n]]] = True
    return keep


def drop_harmful_mask(scores: pd.DataFrame, k: int) -> np.ndarray:
    """Keep all but the ``k`` samples with the lowest (most harmful) influence."""
    keep = np.ones(len(scores), dtype=bool)
    keep[np.argsort(scores["influence"].to_numpy(), kind="stable")[:max(int(k), 0)]] = False
    return keep
