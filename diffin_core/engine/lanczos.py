"""Lanczos: a low-rank spectral view of a symmetric operator (a batch Hessian) from matvecs.

``SpectralView`` approximates f(H) x for any scalar f as
    Y f(Theta) Y^T x + f(0) (x - Y Y^T x)
with Ritz values Theta (r,) and orthonormal Ritz vectors Y (P, r). For x equal to the start
vector this is the standard Krylov approximation of f(H) x (exact for polynomials of degree < r);
for other vectors it treats the unexplored complement as zero curvature.

Several start vectors (momentum carries a second adjoint vector) give the union of their Krylov
spaces; the Ritz pairs are then the Rayleigh-Ritz pairs of H on that union.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

BLOCK_ROWS = 1 << 16        # rows of the Ritz-vector assembly per block (a (BLOCK_ROWS, k) temporary)


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


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor | Sequence[torch.Tensor],
            steps: int | Sequence[int]) -> SpectralView:
    """Run ``steps`` Lanczos iterations from ``start`` (P,) with full re-orthogonalisation.

    ``start`` may be a list of start vectors with one step count each (``steps`` a list): the
    Krylov space of each is appended to the basis (zero or already-spanned starts are skipped).
    The projected matrix Q^T H Q is accumulated column by column, so it stays exact for the union.
    """
    starts = [start] if isinstance(start, torch.Tensor) and start.ndim == 1 else list(start)
    counts = [steps] * len(starts) if isinstance(steps, int) else list(steps)
    p = starts[0].numel()
    basis: list[torch.Tensor] = []
    cols: list[torch.Tensor] = []                     # cols[j] = Q[:, :j+1]^T H q_j
    for s, n_steps in zip(starts, counts):
        q = _orthonormal(s, basis)
        for _ in range(max(1, min(int(n_steps), p - len(basis)))):
            if q is None:
                break
            basis.append(q)
            w = matvec(q)
            cols.append(_dots(basis, w))              # Q^T w without stacking Q (a (P, k) copy)
            q = _orthonormal(w, basis)
    if not basis:
        raise ValueError("lanczos needs a non-zero start vector")
    k = len(basis)
    T = torch.zeros(k, k, dtype=torch.float64)
    for j, c in enumerate(cols):
        T[: j + 1, j] = c.detach().double().cpu()
    T = torch.triu(T) + torch.triu(T, 1).T                        # symmetric by construction
    values, S = torch.linalg.eigh(T)                               # on the CPU in float64 (MPS has none)
    q0 = basis[0]
    S = S.to(device=q0.device, dtype=q0.dtype)
    vectors = torch.empty(p, k, dtype=q0.dtype, device=q0.device)
    for a in range(0, p, BLOCK_ROWS):      # Q @ S a block of rows at a time: Q read once, no (P, k) copy
        b = min(p, a + BLOCK_ROWS)         # (k rank-1 updates of the whole (P, k) took ~6 s at P = 11M)
        torch.mm(torch.stack([q[a:b] for q in basis], 1), S, out=vectors[a:b])
    return SpectralView(values.to(device=q0.device, dtype=q0.dtype), vectors)


def _dots(basis: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """(k,) inner products of w with each basis vector (= Q^T w, without forming Q)."""
    return torch.stack([torch.dot(b, w) for b in basis])


def _orthonormal(w: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor | None:
    """w orthogonalised twice against the basis and normalised; None when nothing is left."""
    norm0 = torch.linalg.vector_norm(w)
    if not norm0 > 0:
        return None
    if basis:
        w = w.clone()
        for _ in range(2):                            # classical Gram-Schmidt, twice is enough in float32
            for b, c in zip(basis, _dots(basis, w).tolist()):
                w.add_(b, alpha=-c)
    norm = torch.linalg.vector_norm(w)
    if not norm > 1e-6 * norm0:
        return None
    return w / norm
