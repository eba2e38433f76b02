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

from diffin_core.project.data import Split
from diffin_core.engine.functional import FunctionalModel


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


def sgd_influence(fm: FunctionalModel, traj: Trajectory, x, y, qx, qy, membership: str = "expected",
                  mean: bool = False) -> np.ndarray:
    """The exact every-step SGD-influence (Hara et al. 2019) of every training sample on each
    query sample's loss, (N, Q) float64, the product's sign (> 0 helpful). Needs every step saved.

    u_T = g_q(theta_T); going back, u_s = (I - lr_s H_s) u_{s+1} with exact Hessian-vector products,
    influence(z) += c_s(z) <u_{s+1}, g_z(theta_s)>. ``membership``:
      "batch"     H_s = the real batch's Hessian, c_s = lr_s / |B_s| if z was in B_s else 0: the
                  first-order Taylor term of trajectory-specific leave-one-out (its linear estimand);
      "expected"  H_s = the whole training set's Hessian, c_s = lr_s / N at every step: what a
                  checkpoint estimator that knows no batches (Diff-In) approximates, every step exact.
    Linear in u_T: the mean over columns is the influence on the mean query loss (``mean``: that
    one column (N, 1), at the cost of one query)."""
    from torch.func import jvp, vmap
    if membership not in ("batch", "expected"):
        raise ValueError(f"membership must be 'batch' or 'expected', not {membership!r}")
    total = len(traj.batches)
    if any(s not in traj.saved for s in range(total + 1)):
        raise ValueError("sgd_influence needs every step saved (train_sgd with save_every=1)")
    n = len(y)

    def hvps(theta, xb, yb, U):                  # (Q, P) exact Hessian-vector products
        g = grad(lambda t: fm.mean_loss(t, xb, yb))
        return vmap(lambda v: jvp(g, (theta,), (v,))[1])(U).detach()

    def per_sample(theta, xb, yb):
        return vmap(grad(lambda t, xi, yi: fm.mean_loss(t, xi[None], yi[None])), in_dims=(None, 0, 0))(theta, xb, yb)

    U = (grad(lambda t: fm.mean_loss(t, qx, qy))(traj.saved[total])[None] if mean
         else per_sample(traj.saved[total], qx, qy)).detach()
    infl = torch.zeros(n, len(qy), dtype=torch.float64)
    for s in range(total - 1, -1, -1):
        theta, lr = traj.saved[s], float(traj.lrs[s])
        rows = torch.as_tensor(traj.batches[s]) if membership == "batch" else torch.arange(n)
        G = per_sample(theta, x[rows], y[rows]).detach()
        infl[rows] += (lr / len(rows)) * (G @ U.T).double()
        U = U - lr * hvps(theta, x[rows], y[rows], U)
    return infl.numpy()


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


@dataclass
class DigitsRun:
    """The float64 digits MLP (64-32-10) trained by plain SGD on a known batch order: what a
    ground-truth study needs (splits, the functional model, tensors, the trajectory)."""
    train: Split
    query: Split
    fm: FunctionalModel
    x: torch.Tensor
    y: torch.Tensor
    qx: torch.Tensor
    qy: torch.Tensor
    traj: Trajectory


def digits_sgd_run(n_train: int = 800, epochs: int = 8, batch: int = 32, lr0: float = 0.2,
                   noise: float = 0.1, seed: int = 0) -> DigitsRun:
    """digits_case's splits, an MLP(64, (32,), 10) in float64 (torch seed 0) trained by
    ``train_sgd`` under a cosine lr from ``lr0``, every step saved."""
    from diffin_core.engine.models import MLP
    torch.manual_seed(0)
    train, query = digits_case(noise=noise, n_train=n_train, seed=seed)
    model = MLP(64, (32,), 10).double()
    fm = FunctionalModel(model)
    x, y = torch.as_tensor(train.x, dtype=torch.float64), torch.as_tensor(train.y)
    qx, qy = torch.as_tensor(query.x, dtype=torch.float64), torch.as_tensor(query.y)
    batches = batch_order(n_train, batch, epochs, seed=seed)
    traj = train_sgd(fm, fm.theta_of(model), x, y, batches, cosine_lrs(lr0, len(batches)))
    return DigitsRun(train, query, fm, x, y, qx, qy, traj)


# --- real recipes: torch's own optimisers, schedulers and BatchNorm, recorded by the Recorder ---
@dataclass
class TorchRecipe:
    """A training recipe run with torch's own classes (float64 for ground truth).

    model_fn() -> a fresh model (always the same initial weights: seed inside); optimizer_fn(params)
    -> torch.optim optimiser; scheduler_fn(optimizer, total_steps) -> lr scheduler or None.
    """
    name: str
    model_fn: object
    optimizer_fn: object
    scheduler_fn: object = None
    clip: float | None = None          # clip_grad_norm_ max norm (recorded by rec.clip_grad_norm_)
    loss: object = None                # a torch loss module (e.g. nn.CrossEntropyLoss(label_smoothing=0.1));
                                       # its per-sample losses are used (reduction ignored), and recorded
    accumulate: int = 1                # micro-batches per optimiser step (gradient accumulation)
    random_seed: int | None = None     # train-mode randomness (dropout): torch's generator seeded with it
                                       # before training, and z left out by loss weight 0 (every forward
                                       # keeps its shape, so every retraining draws the same masks)

    def per_sample(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample training losses (B,) (cross-entropy by default)."""
        import torch.nn.functional as F
        if self.loss is None:
            return F.cross_entropy(logits, y, reduction="none")
        return F.cross_entropy(logits, y, weight=self.loss.weight, ignore_index=self.loss.ignore_index,
                               reduction="none", label_smoothing=self.loss.label_smoothing)


def warmup_cosine(optimizer, total: int, warmup_frac: float = 0.1):
    """Linear warm-up from 10% then cosine to 0 (torch.optim.lr_scheduler.SequentialLR)."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
    w = max(1, int(warmup_frac * total))
    return SequentialLR(optimizer, [LinearLR(optimizer, 0.1, 1.0, total_iters=w),
                                    CosineAnnealingLR(optimizer, T_max=max(1, total - w))], milestones=[w])


def train_torch(recipe: TorchRecipe, x: torch.Tensor, y: torch.Tensor, batches: list[np.ndarray],
                drop: int | None = None, record_dir=None, every: int = 1):
    """Train with the recipe over the given batch order; ``drop`` = a training index removed from
    every batch that holds it (the batch loss keeps its denominator, so without BatchNorm this
    equals weighting the sample 0; with BatchNorm it also leaves the batch statistics).
    With ``record_dir`` the run is recorded by the Recorder every ``every`` steps. Returns the
    trained model (eval mode)."""
    from diffin_core.project.checkpoints import Recorder
    model = recipe.model_fn()
    model.train()
    opt = recipe.optimizer_fn(model.parameters())
    sched = recipe.scheduler_fn(opt, len(batches)) if recipe.scheduler_fn else None
    rec = Recorder(record_dir, model, opt, train_size=len(y), every=every, loss=recipe.loss) if record_dir else None
    if rec:
        rec.__enter__()
    same_draws = recipe.random_seed is not None
    if same_draws:
        torch.manual_seed(recipe.random_seed)
    for idx in batches:
        opt.zero_grad()
        for micro in np.array_split(idx, max(1, int(recipe.accumulate))):      # the batch mean over idx
            keep = micro if drop is None or same_draws else micro[micro != drop]
            if len(keep) == 0:
                continue
            t = torch.as_tensor(keep)
            per = recipe.per_sample(model(x[t]), y[t])
            if same_draws and drop is not None:
                per = per * torch.as_tensor(keep != drop, dtype=per.dtype)
            loss = per.sum() / len(idx)
            loss.backward()
        if recipe.clip:
            (rec.clip_grad_norm_ if rec else torch.nn.utils.clip_grad_norm_)(list(model.parameters()), recipe.clip)
        opt.step()
        if sched:
            sched.step()
        if rec:
            rec.step(batch_ids=idx)
    if rec:
        rec.__exit__(None, None, None)
    return model.eval()


def leave_one_out_torch(recipe: TorchRecipe, x, y, qx, qy, batches, samples) -> np.ndarray:
    """truth(z) = L_Q(theta_T without z) - L_Q(theta_T) for each z, retraining with the recipe
    (eval-mode query loss: the final model's own BatchNorm statistics)."""
    def query_loss(model):
        with torch.no_grad():
            return float(recipe.per_sample(model(qx), qy).mean())
    base = query_loss(train_torch(recipe, x, y, batches))
    return np.asarray([query_loss(train_torch(recipe, x, y, batches, drop=int(z))) - base for z in samples])


def self_loo_torch(recipe: TorchRecipe, x, y, batches, samples) -> np.ndarray:
    """True self-influence L_z(theta without z) - L_z(theta) for each z (nats)."""
    def loss_of(model, z):
        with torch.no_grad():
            return float(recipe.per_sample(model(x[z:z + 1]), y[z:z + 1]).mean())
    full = train_torch(recipe, x, y, batches)
    return np.asarray([loss_of(train_torch(recipe, x, y, batches, drop=int(z)), int(z)) - loss_of(full, int(z))
                       for z in samples])


def digits_mlp(batchnorm: bool = False, seed: int = 0, dtype=torch.float64, dropout: float = 0.0):
    """model_fn for the recipe cases: digits MLP 64-32-10 (tanh), optionally with BatchNorm1d
    and Dropout(``dropout``) after the hidden layer."""
    from torch import nn

    def build():
        torch.manual_seed(seed)
        hidden = [nn.Linear(64, 32)] + ([nn.BatchNorm1d(32)] if batchnorm else []) + [nn.Tanh()]
        hidden += [nn.Dropout(dropout)] if dropout else []
        return nn.Sequential(nn.Flatten(), *hidden, nn.Linear(32, 10)).to(dtype)
    return build


def digits_bn_cnn(seed: int = 0, dtype=torch.float64):
    """model_fn: digits as 1x8x8 images, Conv2d(1, 6, 3) + BatchNorm2d + tanh + 2x2 average
    pool + linear (the BatchNorm2d path of the ground-truth tests)."""
    from torch import nn

    def build():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.Tanh(),
                             nn.AvgPool2d(2), nn.Flatten(), nn.Linear(54, 10)).to(dtype)
    return build


def batchnorm_cnn_recipe() -> TorchRecipe:
    """A BatchNorm2d CNN with SGD + momentum 0.9 under a cosine schedule (torch's own classes)."""
    from torch.optim import SGD
    from torch.optim.lr_scheduler import CosineAnnealingLR
    return TorchRecipe("batchnorm2d-cnn-sgd-momentum", digits_bn_cnn(),
                       lambda p: SGD(p, lr=0.05, momentum=0.9), lambda o, t: CosineAnnealingLR(o, T_max=t))


def standard_recipes() -> dict[str, TorchRecipe]:
    """The recipes of the ground-truth tests and benchmarks/recipes.py (torch's own classes)."""
    from torch.optim import SGD, AdamW
    from torch.optim.lr_scheduler import CosineAnnealingLR, StepLR
    return {
        "sgd-momentum-wd": TorchRecipe("sgd-momentum-wd", digits_mlp(),
                                       lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-3),
                                       lambda o, t: CosineAnnealingLR(o, T_max=t)),
        "nesterov": TorchRecipe("nesterov", digits_mlp(),
                                lambda p: SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
                                lambda o, t: StepLR(o, step_size=max(1, t // 3), gamma=0.3)),
        "adamw-warmup-cosine": TorchRecipe("adamw-warmup-cosine", digits_mlp(),
                                           lambda p: AdamW(p, lr=3e-3, weight_decay=0.05), warmup_cosine),
        # cosine, not a constant lr: with lr 0.05 to the last step, the truth is dominated by which
        # batch of the last epoch held z; its exact derivative averaged over batch membership (all an
        # estimator without the batch order can know) reaches Spearman 0.68 against it (0.96 cosine)
        "batchnorm-sgd-momentum": TorchRecipe("batchnorm-sgd-momentum", digits_mlp(batchnorm=True),
                                              lambda p: SGD(p, lr=0.05, momentum=0.9),
                                              lambda o, t: CosineAnnealingLR(o, T_max=t)),
    }


def recipe_case(name: str, record_dir, n_train: int = 800, epochs: int = 8, batch: int = 32,
                samples: int = 40, every: int = 10, self_samples: int = 0, seed: int = 0) -> dict:
    """A ground-truth case: digits (10% flipped labels), the named recipe recorded by the Recorder
    into ``record_dir``, and the float64 trajectory leave-one-out of ``samples`` training samples
    on the mean query loss (plus, with ``self_samples``, true self-influence of that many)."""
    recipe = name if isinstance(name, TorchRecipe) else standard_recipes()[name]
    train, query = digits_case(noise=0.1, n_train=n_train, seed=seed)
    x, y = torch.as_tensor(train.x, dtype=torch.float64), torch.as_tensor(train.y)
    qx, qy = torch.as_tensor(query.x, dtype=torch.float64), torch.as_tensor(query.y)
    batches = batch_order(n_train, batch, epochs, seed=seed)
    train_torch(recipe, x, y, batches, record_dir=record_dir, every=every)
    rng = np.random.default_rng(seed + 1)
    idx = rng.choice(n_train, samples, replace=False)
    out = dict(recipe=recipe, train=train, query=query, samples=idx,
               truth=leave_one_out_torch(recipe, x, y, qx, qy, batches, idx))
    if self_samples:
        sidx = rng.choice(n_train, self_samples, replace=False)
        out.update(self_samples=sidx, self_truth=self_loo_torch(recipe, x, y, batches, sidx))
    return out
