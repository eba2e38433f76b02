"""Small reference models: the sample project's CNN and an MLP for tabular or tiny image data."""
from __future__ import annotations

import math

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two 5x5 conv layers and two linear layers (about 12k parameters for 1x28x28 input).

    Smooth by design (SiLU, average pooling): ReLU/max-pool kinks make finite-difference
    Hessian-vector products jump (relative error > 1 measured on a ReLU/max-pool CNN, 5e-4 here).

    Input (B, C, H, W) float in [0, 1]; output (B, num_classes) logits.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 5), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(8, 16, 5), nn.SiLU(), nn.AvgPool2d(2), nn.Flatten(),
        )
        side = ((image_size - 4) // 2 - 4) // 2
        self.head = nn.Sequential(nn.Linear(16 * side * side, 32), nn.SiLU(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Tanh MLP ``in -> hidden... -> num_classes``; flattens its input first."""

    def __init__(self, in_features: int, hidden: tuple[int, ...] = (32,), num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Activations feeding the last nn.Linear of ``model`` (B, D): the features of the UMAP map."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    captured: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0].detach()))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[0].reshape(len(x), -1)


def build_cnn(image_shape=(1, 28, 28), num_classes: int = 10) -> SmallCNN:
    c, h, _w = image_shape
    return SmallCNN(c, num_classes, h)


def build_mlp(in_features: int, num_classes: int, hidden=(32,)) -> MLP:
    return MLP(in_features, tuple(hidden), num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters() if p.requires_grad)


def eval_mode(model: nn.Module) -> nn.Module:
    """``model.eval()``, tolerating torch.export programs (their modules refuse eval())."""
    try:
        return model.eval()
    except NotImplementedError:
        return model
