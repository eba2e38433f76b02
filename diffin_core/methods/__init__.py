"""methods: the estimators and the walks that run them.

``METHODS[name]()`` gives an Attributor (see base.py for the contract): Diff-In, TracIn, the
influence function, training-dynamics and loss baselines, the label-issue score, Diff-In's
self-influence walks (ritz_self, loo_logits) and the bounded-memory runner that streams the
training set through an attributor.

May import: errors, engine, project. Layer 3 of 7.
"""
from diffin_core.methods.base import Attributor, Context, ScoreSettings, pick_device, segment_lengths
from diffin_core.methods.baselines import Cleanlab, Loss, Margin
from diffin_core.methods.diffin import DiffIn, DiffInPaper
from diffin_core.methods.dynamics import AUM, CleanlabCV, Forgetting, MeanLoss
from diffin_core.methods.first_order import GradCos, GradDot, TracIn, TracInAdam
from diffin_core.methods.influence_function import InfluenceFunction

METHODS = {cls.name: cls for cls in (DiffIn, DiffInPaper, TracIn, TracInAdam, GradDot, GradCos, InfluenceFunction,
                                     Loss, Margin, Cleanlab, MeanLoss, AUM, Forgetting, CleanlabCV)}

__all__ = ["METHODS", "Attributor", "Context", "ScoreSettings", "pick_device", "segment_lengths"]
