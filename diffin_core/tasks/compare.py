"""Comparing two runs: rank correlation and the samples they disagree on most (matched on sample_id)."""
from __future__ import annotations

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



def histograms(values, groups, bins: int = 80) -> pd.DataFrame:
    """Per-group counts over shared bins (columns group, centre, width, count); NaNs dropped.

    Binned on the server so a page sends a few hundred numbers, not one per sample.
    """
    import numpy as np
    values, groups = np.asarray(values, dtype=float), np.asarray(groups)
    ok = np.isfinite(values)
    if not ok.any():
        return pd.DataFrame(columns=["group", "centre", "width", "count"])
    edges = np.histogram_bin_edges(values[ok], bins=bins)
    centre, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    frames = [pd.DataFrame({"group": g, "centre": centre, "width": width,
                            "count": np.histogram(values[ok & (groups == g)], bins=edges)[0]})
              for g in pd.unique(groups[ok])]
    return pd.concat(frames, ignore_index=True)
