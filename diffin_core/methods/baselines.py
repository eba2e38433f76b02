"""Label-error detectors at the final checkpoint: loss, margin, cleanlab (confident learning).

They have no influence of their own: their ``influence`` column and top-k lists are grad-dot's
(final-checkpoint gradient similarity), and self_influence is null. label_issue is their score.
"""
from __future__ import annotations

import numpy as np

from diffin_core.methods.first_order import GradDot


class _Detector(GradDot):
    has_self_influence = False

    def chunk(self, ctx, gq, x, y, need_self):
        return ctx.fm.directional(ctx.thetas[-1], x, y, gq), None


class Loss(_Detector):
    """label_issue = cross-entropy loss of the given label (nats)."""
    name = "loss"

    def label_issue(self, _self, probs, y):
        return -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))


class Margin(_Detector):
    """label_issue = -(p_given - max other p): positive when another class wins."""
    name = "margin"

    def label_issue(self, _self, probs, y):
        given = probs[np.arange(len(y)), y]
        other = probs.copy()
        other[np.arange(len(y)), y] = -np.inf
        return other.max(1) - given


class Cleanlab(_Detector):
    """label_issue = 1 - cleanlab's label quality score (self-confidence) on the final
    checkpoint's predicted probabilities (in-sample, as the checkpoints are all we have)."""
    name = "cleanlab"

    def label_issue(self, _self, probs, y):
        from cleanlab.rank import get_label_quality_scores
        probs = probs / probs.sum(1, keepdims=True)
        return 1.0 - get_label_quality_scores(y, probs)
