"""Lanczos: a low-rank spectral view of a symmetric operator (a batch Hessian) from matvecs.

``SpectralView`` approximates f(H) x for any scalar f as
    Y f(Theta) Y^T x + f(0) (x - Y Y^T x)
with Ritz values Theta (r,) and orthonormal Ritz vectors Y (P, r). For x equal to the start
vector this is the standard Krylov approximation of f(H) x (exact for polynomials of degree < r);
for other vectors it treats the unexplored complement as zero curvature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class SpectralView:
    values: torch.Tensor   # (r,) Ritz values
    vectors: torch.Tensor  # (P, r) Ritz vectors, orthonormal columns

    def apply(self, f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """f(H) applied to x of shape (P,) or to each row of x (B, P)."""
        zero = torch.zeros(1, dtype=self.values.dtype, device=self.values.device)
        f0 = f(zero)[0]
        coeff = x @ self.vectors                      # (B, r) or (r,)
        inside = (coeff * (f(self.values) - f0)) @ self.vectors.T
        return f0 * x + inside


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, steps: int) -> SpectralView:
    """Run ``steps`` Lanczos iterations from ``start`` (P,) with full re-orthogonalisation."""
    p = start.numel()
    steps = max(1, min(steps, p))
    q = start / torch.linalg.vector_norm(start)
    basis = [q]
    alphas, betas = [], []
    for j in range(steps):
        w = matvec(basis[j])
        alpha = torch.dot(w, basis[j])
        alphas.append(alpha)
        Q = torch.stack(basis, dim=1)
        w = w - Q @ (Q.T @ w)
        w = w - Q @ (Q.T @ w)                         # twice is enough in float32
        beta = torch.linalg.vector_norm(w)
        if j == steps - 1 or beta <= 1e-10 * max(1.0, abs(float(alpha))):
            break
        betas.append(beta)
        basis.append(w / beta)
    k = len(alphas)
    T = torch.diag(torch.stack(alphas))
    if k > 1:
        off = torch.stack(betas[: k - 1])
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    values, S = torch.linalg.eigh(T.double())
    Q = torch.stack(basis[:k], dim=1)
    return SpectralView(values.to(start.dtype), Q @ S.to(start.dtype))
