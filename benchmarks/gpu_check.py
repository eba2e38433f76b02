"""GPU numerics: the finite-difference HVP with TF32 on and off against the exact HVP.

    python benchmarks/gpu_check.py            # on a CUDA machine -> benchmarks/results/gpu_check.csv

For a SmallCNN (MNIST-sized) and an MLP in float32 on CUDA: relative error
||HVP_fd - HVP_exact|| / ||HVP_exact|| along random directions and along the batch gradient,
with TF32 allowed (CUDA's default for convolutions; matmuls when enabled) and with TF32 off
(what FunctionalModel.hvp_fd does). The reference is the exact HVP (forward-over-reverse) in
float64. On a machine without CUDA it says so and prints the float32 CPU errors (no TF32 there).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from diffin_core.engine.functional import FunctionalModel  # noqa: E402
from diffin_core.engine.models import MLP, SmallCNN  # noqa: E402


def fd_hvp(fm, theta, x, y, v, eps=1e-3):
    """The forward difference with whatever TF32 flags are set (no no_tf32 guard)."""
    h = eps / torch.linalg.vector_norm(v)
    return (fm.batch_grad(theta + h * v, x, y) - fm.batch_grad(theta, x, y)) / h


def rel(a, b):
    return float(torch.linalg.vector_norm(a.double() - b) / torch.linalg.vector_norm(b))


def check(name, model, shape, device, n=128, seeds=3):
    torch.manual_seed(0)
    fm = FunctionalModel(model).to(device)
    theta = fm.theta_of(model).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((n, *shape), generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    fm64 = FunctionalModel(copy.deepcopy(model).double()).to(device)
    rows = []
    directions = [("gradient", fm.batch_grad(theta, x, y))] + [
        (f"random-{s}", torch.randn(fm.num_params, generator=torch.Generator().manual_seed(s)).to(device)) for s in range(seeds)]
    for dname, v in directions:
        exact = fm64.hvp_exact(theta.double(), x.double(), y, v.double())
        for tf32 in ([True, False] if device.type == "cuda" else [False]):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            err_raw = rel(fd_hvp(fm, theta, x, y, v), exact)
            err_guarded = rel(fm.hvp_fd(theta, x, y, v), exact)      # the engine's HVP: TF32 forced off
            rows.append(dict(model=name, direction=dname, tf32_allowed=tf32, fd_error=err_raw,
                             engine_fd_error=err_guarded, device=str(device)))
            print(rows[-1], flush=True)
    return rows


def main():
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        print("no CUDA on this machine: TF32 does not exist here; float32 CPU errors only (nothing written)")
    rows = check("SmallCNN", SmallCNN(1, 10, 28), (1, 28, 28), device)
    rows += check("MLP-784-128-10", MLP(784, (128,), 10), (784,), device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True               # torch's defaults
    if cuda:
        import pandas as pd
        out = HERE / "results" / "gpu_check.csv"
        pd.DataFrame(rows).to_csv(out, index=False, float_format="%.3e")
        print(f"wrote {out} ({torch.cuda.get_device_name()})")


if __name__ == "__main__":
    main()
