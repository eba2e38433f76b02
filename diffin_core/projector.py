"""A seeded Gaussian random projection R (P -> d), TRAK-style, generated block by block.

    proj = Projector(num_params=P, dim=d, seed=0)
    f = proj(g)            # g (B, P) -> f (B, d),  f = g R / sqrt(d)

R has i.i.d. N(0, 1) entries, so <proj(x), proj(y)> is an unbiased estimate of <x, y>
(Johnson-Lindenstrauss; relative error ~ sqrt(2 / d)). Rows j0:j1 of R come from a generator
seeded with (seed, block index), so the same (P, d, seed, block) always gives the same R and R
is never held whole unless it fits in ``cache_mb`` (small models: then it is built once and
reused). The first d' < d columns of R are themselves a d'-dim projection of the same kind
(``prefix``), which the exactness benchmark uses to sweep d from one feature pass.
"""
from __future__ import annotations

import torch


class Projector:
    def __init__(self, num_params: int, dim: int, seed: int = 0, block: int = 65536,
                 cache_mb: float = 512.0, device: torch.device | str = "cpu"):
        if dim <= 0:
            raise ValueError(f"projection dimension must be positive, got {dim}")
        self.num_params, self.dim, self.seed, self.block = int(num_params), int(dim), int(seed), int(block)
        self.device = torch.device(device)
        self._whole: torch.Tensor | None = None
        if self.num_params * self.dim * 4 <= cache_mb * 2 ** 20:
            self._whole = torch.cat([self._block(i) for i in range(self.num_blocks)])

    @property
    def num_blocks(self) -> int:
        return (self.num_params + self.block - 1) // self.block

    def _block(self, i: int) -> torch.Tensor:
        """Rows [i*block, (i+1)*block) of R, (rows, d) float32, N(0, 1)."""
        rows = min(self.block, self.num_params - i * self.block)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randn(rows, self.dim, generator=gen).to(self.device)

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        """Project rows of g (B, P) or one vector (P,) to (B, d) or (d,), float32."""
        one = g.dim() == 1
        g = g.reshape(1, -1) if one else g
        if g.shape[1] != self.num_params:
            raise ValueError(f"expected {self.num_params} parameters, got {g.shape[1]}")
        g = g.to(device=self.device, dtype=torch.float32)
        if self._whole is not None:
            out = g @ self._whole
        else:
            out = torch.zeros(g.shape[0], self.dim, device=self.device)
            for i in range(self.num_blocks):
                out += g[:, i * self.block:(i + 1) * self.block] @ self._block(i)
        out = out / self.dim ** 0.5
        return out[0] if one else out


def prefix(features: torch.Tensor, full_dim: int, dim: int) -> torch.Tensor:
    """The d'-dim projection contained in a d-dim one: the first d' columns, rescaled."""
    return features[..., :dim] * (full_dim / dim) ** 0.5
