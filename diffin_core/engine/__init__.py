"""engine: the mathematics of influence, free of any project folder.

Owns the functional view of a model (flat parameters, per-sample gradients, HVPs and JVPs with
torch.func), the recorded training recipe as numbers (per-step learning rates, momentum, Adam's
preconditioner), the trajectory propagation of Diff-In, Lanczos, BatchNorm handling, numeric
precision checks, memory budgets and random projections.

May import: diffin_core.errors and third-party packages only. Layer 1 of 7 (see tests/test_layers.py).
"""
