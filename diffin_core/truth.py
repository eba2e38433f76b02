"""Ground truth: trajectory-specific leave-one-out on a small model.

Retrain from the same initial weights with the same batch order and learning-rate schedule,
with sample z's weight set to 0 in every batch holding it (the batch mean keeps its
denominator), and measure the mean query loss at the end:
    truth(z) = L_Q(theta_T without z) - L_Q(theta_T)      (the product's sign: > 0 helpful)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import grad

from .data import Split
from .functional import FunctionalModel


@dataclass
class Trajectory:
    """A recorded SGD run: the batch order, the lr of every step, and the saved checkpoints."""
    theta0: torch.Tensor
    batches: list[np.ndarray]
    lrs: list[float]
    saved: dict[int, torch.Tensor]          # step -> theta

    def checkpoints(self, count: int) -> tuple[list[int], list[torch.Tensor], list[float]]:
        """``count`` evenly spaced checkpoints ending at the final step: (steps, thetas, lrs)."""
        total = len(self.batches)
        steps = sorted({int(round(s)) for s in np.linspace(0, total, count)})
        missing = [s for s in steps if s not in self.saved]
        if missing:
            raise ValueError(f"steps {missing[:3]} were not saved")
        lrs = [self.lrs[min(s, total - 1)] for s in steps]
        return steps, [self.saved[s] for s in steps], lrs


def cosine_lrs(lr0: float, total: int) -> list[float]:
    return [lr0 * 0.5 * (1 + math.cos(math.pi * s / total)) for s in range(total)]


def batch_order(n: int, batch_size: int, epochs: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [perm[i:i + batch_size] for _ in range(epochs)
            for perm in [rng.permutation(n)] for i in range(0, n, batch_size)]


def train_sgd(fm: FunctionalModel, theta0: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              batches: list[np.ndarray], lrs: list[float], drop: int | None = None,
              save_every: int | None = 1) -> Trajectory:
    """Plain SGD over the given batches; ``drop`` = a training index whose weight is 0."""
    weights = torch.ones(len(y), dtype=theta0.dtype)
    if drop is not None:
        weights[drop] = 0.0

    def batch_loss(theta, xb, yb, wb):
        return (fm.losses(theta, xb, yb) * wb).sum() / len(yb)

    g = grad(batch_loss)
    theta = theta0.clone()
    saved = {0: theta.clone()} if save_every else {}
    for s, (idx, lr) in enumerate(zip(batches, lrs)):
        t = torch.as_tensor(idx)
        theta = theta - lr * g(theta, x[t], y[t], weights[t])
        if save_every and ((s + 1) % save_every == 0 or s + 1 == len(batches)):
            saved[s + 1] = theta.clone()
    return Trajectory(theta0, batches, lrs, saved if save_every else {len(batches): theta})


def leave_one_out(fm: FunctionalModel, traj: Trajectory, x, y, qx, qy, samples) -> np.ndarray:
    """truth(z) for each z in ``samples`` (float64 recommended): L_Q(without z) - L_Q(with z)."""
    base = float(fm.mean_loss(traj.saved[len(traj.batches)], qx, qy))
    out = []
    for z in samples:
        t = train_sgd(fm, traj.theta0, x, y, traj.batches, traj.lrs, drop=int(z), save_every=None)
        out.append(float(fm.mean_loss(t.saved[len(traj.batches)], qx, qy)) - base)
    return np.asarray(out)


def digits_case(noise: float = 0.1, n_train: int = 1200, seed: int = 0, dtype=torch.float64):
    """sklearn digits, 10% flipped train labels: (train Split, query Split) with true_y kept."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    tr, q = perm[:n_train], perm[n_train:]
    y_noisy = y[tr].copy()
    flip = rng.choice(n_train, int(noise * n_train), replace=False)
    y_noisy[flip] = (y_noisy[flip] + rng.integers(1, 10, len(flip))) % 10
    train = Split(x[tr], y_noisy, np.arange(n_train), y[tr])
    query = Split(x[q], y[q], np.arange(len(q)))
    return train, query
