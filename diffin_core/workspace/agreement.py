"""Inter-reviewer agreement: Cohen's kappa (two reviewers) and Fleiss' kappa (any number).

A decision is one category: "keep", "exclude", or "relabel:<label>" (two relabels to different
labels disagree). Kappa = (observed agreement - chance agreement) / (1 - chance agreement);
None when chance agreement is 1 (every rating in one category: kappa is undefined).

Cohen's kappa uses scikit-learn's ``cohen_kappa_score`` (a dependency) and falls back to the
same formula here. Fleiss' kappa allows a different number of raters per sample (at least 2):
P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1)), P = mean_i P_i, p_j = sum_i n_ij / sum_i n_i,
P_e = sum_j p_j^2 (Fleiss 1971 when every n_i is equal; statsmodels' fleiss_kappa gives the same).
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence


def cohen_kappa(a: Sequence, b: Sequence) -> float | None:
    """Cohen's kappa of two raters' categories over the same items (None: undefined or empty)."""
    a, b = [str(v) for v in a], [str(v) for v in b]
    if len(a) != len(b):
        raise ValueError("cohen_kappa needs two ratings of the same items")
    n = len(a)
    if n == 0:
        return None
    po = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    pe = sum(ca[c] * cb[c] for c in ca) / (n * n)
    if pe >= 1.0 - 1e-12:
        return None
    try:
        from sklearn.metrics import cohen_kappa_score
        return float(cohen_kappa_score(a, b))
    except ImportError:
        return (po - pe) / (1.0 - pe)


def fleiss_kappa(ratings: Sequence[Sequence]) -> float | None:
    """Fleiss' kappa from one list of categories per item (items with under 2 ratings skipped)."""
    items = [Counter(str(v) for v in r) for r in ratings if len(r) >= 2]
    if not items:
        return None
    totals: Counter = Counter()
    p_items = []
    for c in items:
        n = sum(c.values())
        totals.update(c)
        p_items.append((sum(v * v for v in c.values()) - n) / (n * (n - 1)))
    all_n = sum(totals.values())
    pe = sum((v / all_n) ** 2 for v in totals.values())
    if pe >= 1.0 - 1e-12:
        return None
    p = sum(p_items) / len(p_items)
    return (p - pe) / (1.0 - pe)


def category(action: str, label) -> str:
    """A decision as one category for agreement: relabels to different labels differ."""
    return f"relabel:{int(label)}" if action == "relabel" else str(action)
