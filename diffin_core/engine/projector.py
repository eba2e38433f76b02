"""A seeded sparse random projection (CountSketch) P -> d for the feature store.

    proj = Projector(num_params=P, dim=d, seed=0)
    f = proj(g)            # g (B, P) -> f (B, d),  f[:, j] = sum_{i: h(i) = j} s(i) g[:, i]

Each parameter i goes to one bucket h(i) (uniform in 0..d-1) with a random sign s(i) = +-1, so
<proj(x), proj(y)> is an unbiased estimate of <x, y> with the same variance as a Gaussian
projection up to terms in the largest coordinates, (||x||^2 ||y||^2 + <x, y>^2) / d at most
(Johnson-Lindenstrauss; relative error ~ sqrt(2 / d)). Projecting a row costs O(P) (one
scatter-add), not O(P d): the feature pass is then bound by the per-sample gradients, not by the
projection (a dense d = 2048 projection of a 25k-parameter MLP cost 50x its gradients here).
``fold`` turns a d-dim sketch into the d'-dim sketch of the same seed (d' dividing d, bucket
h(i) mod d'), which the exactness benchmark uses to sweep d from one feature pass.

The scatter runs over column blocks of about CHUNK_ELEMENTS values (B rows x P/blocks columns):
each block's signed (and optionally scaled) copy stays in cache instead of a (B, P) temporary of
the size of the gradients (223 MB for 5 rows of a ResNet-18). index_add_ adds in index order, so
the blocks in turn give the same sums as one scatter over all P columns; on 5 rows of a
ResNet-18's gradients (d = 4096) the blocks cost 0.35x the one scatter's CPU time
(benchmarks/resnet_profile.py, units sketch_unblocked and sketch).
"""
from __future__ import annotations

import numpy as np
import torch

CHUNK_ELEMENTS = 1 << 19        # values per column block of __call__ (2 MB of float32: in L2)
MIN_COLUMNS = 1024              # columns per block at least (many rows: no tiny blocks)


class Projector:
    def __init__(self, num_params: int, dim: int, seed: int = 0, device: torch.device | str = "cpu"):
        if dim <= 0:
            raise ValueError(f"projection dimension must be positive, got {dim}")
        self.num_params, self.dim, self.seed = int(num_params), int(dim), int(seed)
        self.device = torch.device(device)
        rng = np.random.default_rng([self.seed, 8191])
        self.bucket = torch.as_tensor(rng.integers(0, self.dim, self.num_params), device=self.device)
        self.sign = torch.as_tensor(rng.integers(0, 2, self.num_params, dtype=np.int8) * 2 - 1,
                                    dtype=torch.float32, device=self.device)

    def __call__(self, g: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Project rows of g (B, P) or one vector (P,) to (B, d) or (d,), float32. ``scale`` (P,):
        project g * scale (a diagonal map, Adam's preconditioner) without a (B, P) product."""
        one = g.dim() == 1
        g = g.reshape(1, -1) if one else g
        if g.shape[1] != self.num_params:
            raise ValueError(f"expected {self.num_params} parameters, got {g.shape[1]}")
        if scale is not None and tuple(scale.shape) != (self.num_params,):
            raise ValueError(f"expected a scale of {self.num_params} parameters, got {tuple(scale.shape)}")
        rows = g.shape[0]
        out = torch.zeros(rows, self.dim, device=self.device)
        step = max(MIN_COLUMNS, CHUNK_ELEMENTS // max(rows, 1))
        for a in range(0, self.num_params, step):
            b = min(a + step, self.num_params)
            block = g[:, a:b] if scale is None else g[:, a:b] * scale[a:b].to(g.device)   # as (g * scale)
            out.index_add_(1, self.bucket[a:b], block.to(device=self.device, dtype=torch.float32) * self.sign[a:b])
        return out[0] if one else out


def fold(features: torch.Tensor, full_dim: int, dim: int) -> torch.Tensor:
    """The d'-dim sketch contained in a d-dim one (d' divides d): columns j, j + d', ... added."""
    if full_dim % dim:
        raise ValueError(f"{dim} does not divide {full_dim}")
    return features.reshape(*features.shape[:-1], full_dim // dim, dim).sum(-2)
