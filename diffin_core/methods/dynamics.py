"""Training-dynamics label-error detectors: the peers of Diff-In's trajectory label_issue.

Like the final-checkpoint detectors (baselines.py) they have no influence of their own: their
``influence`` column is grad-dot's and self_influence is null; label_issue (higher = more likely
mislabelled) is computed from the saved checkpoints (step > 0), or for ``cleanlab-cv`` from
models retrained with the project's ``[train] recipe``.
"""
from __future__ import annotations

import numpy as np

from diffin_core.errors import DiffinError
from diffin_core.methods.label_issue import (area_under_margin, checkpoint_logits, forgetting_counts, losses_from_logits)
from diffin_core.methods.baselines import _Detector


class _Trajectory(_Detector):
    def score(self, logits: np.ndarray, y: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def run(self, ctx, qx, qy, need_self=True):
        out = super().run(ctx, qx, qy, need_self)
        if need_self:
            ctx.progress(0, ctx.n, f"{self.name}: evaluating the checkpoints")
            out["label_issue"] = np.asarray(self.score(checkpoint_logits(ctx), ctx.train.y), dtype=np.float64)
        return out


class MeanLoss(_Trajectory):
    """label_issue = the given label's cross-entropy averaged over the saved checkpoints (nats)."""
    name = "mean-loss"

    def score(self, logits, y):
        return losses_from_logits(logits, y).mean(0)


class AUM(_Trajectory):
    """label_issue = -AUM, the area under the margin over the saved checkpoints (Pleiss et al. 2020)."""
    name = "aum"

    def score(self, logits, y):
        return -area_under_margin(logits, y)


class Forgetting(_Trajectory):
    """label_issue = forgetting events between saved checkpoints (never learned = most)."""
    name = "forgetting"

    def score(self, logits, y):
        return forgetting_counts(logits.argmax(-1) == y[None, :])


class CleanlabCV(_Detector):
    """label_issue = 1 - cleanlab's label quality on out-of-sample probabilities from 5-fold
    cross-validation, retraining the project's [train] recipe once per fold."""
    name = "cleanlab-cv"
    folds = 5
    needs_recipe = True          # scoring needs the project's [train] recipe (ctx.trainer)

    def run(self, ctx, qx, qy, need_self=True):
        out = super().run(ctx, qx, qy, need_self)
        if need_self:
            trainer = getattr(ctx, "trainer", None)
            if trainer is None:
                raise DiffinError("cleanlab-cv retrains the model K times: add "
                                  "`[train] recipe = \"train.py:train\"` to diffin.toml")
            probs = out_of_sample_probs(trainer, ctx.train.x, ctx.train.y, self.folds,
                                        ctx.settings.seed, ctx.progress)
            out["label_issue"] = cleanlab_issue(probs, ctx.train.y)
        return out


def cleanlab_issue(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """1 - cleanlab's self-confidence label quality score (N,); probs (N, C) rows renormalised."""
    from cleanlab.rank import get_label_quality_scores
    probs = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)
    return 1.0 - get_label_quality_scores(np.asarray(y), probs / probs.sum(1, keepdims=True))


def out_of_sample_probs(trainer, x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0,
                        progress=None) -> np.ndarray:
    """K-fold out-of-sample softmax probabilities (N, C) (cleanlab's recommended input).

    ``trainer(x, y, seed) -> torch.nn.Module`` trains a fresh model; folds are stratified by the
    given label (sklearn StratifiedKFold, shuffled with ``seed``); a class with fewer samples
    than folds falls back to plain KFold."""
    import torch
    from sklearn.model_selection import KFold, StratifiedKFold
    y = np.asarray(y)
    progress = progress or (lambda d, t, m: None)
    counts = np.bincount(y)
    splitter = (StratifiedKFold(folds, shuffle=True, random_state=seed) if counts[counts > 0].min() >= folds
                else KFold(folds, shuffle=True, random_state=seed))
    probs = None
    for i, (tr, te) in enumerate(splitter.split(np.zeros(len(y)), y)):
        progress(i, folds, f"cleanlab-cv: training fold {i + 1}/{folds}")
        model = trainer(x[tr], y[tr], seed).eval()
        with torch.no_grad():
            p = torch.cat([torch.softmax(model(torch.as_tensor(x[te[s:s + 512]], dtype=torch.float32)).double(), -1)
                           for s in range(0, len(te), 512)]).numpy()
        if probs is None:
            probs = np.zeros((len(y), p.shape[1]))
        probs[te] = p
    progress(folds, folds, "cleanlab-cv: folds done")
    return probs
