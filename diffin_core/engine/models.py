"""Reference models: the sample project's CNN, an MLP for tabular or tiny image data, and a
CIFAR-style ResNet-18 (11.2M parameters, BatchNorm) for the scale benchmark."""
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


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with a (projected when the shape changes) skip."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images (CIFAR layout: 3x3 stem, no max-pool), no torchvision.

    11.17M parameters for 3 input channels and 10 classes; BatchNorm throughout, so its
    buffers (running mean/var) are part of every checkpoint. Input (B, C, 32, 32) float;
    output (B, num_classes) logits.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        blocks, cin = [], w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            stride = 1 if i == 0 else 2
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


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


def build_resnet18(image_shape=(3, 32, 32), num_classes: int = 10, width: int = 64) -> ResNet18:
    return ResNet18(image_shape[0], num_classes, width)


def count_parameters(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters() if p.requires_grad)


def eval_mode(model: nn.Module) -> nn.Module:
    """``model.eval()``, tolerating torch.export programs (their modules refuse eval())."""
    try:
        return model.eval()
    except NotImplementedError:
        return model


DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def train_mode_randomness(model: nn.Module, replayed: bool = False, recorded: bool = False) -> str | None:
    """One approximation line when ``model`` has Dropout layers that train with p > 0 and their
    masks are not replayed (the engine then scores the eval-mode network), else None.
    ``replayed``: the Recorder kept training's generator states and the batch order is recorded,
    so every step's masks are redrawn (engine/dropout.py): nothing to say. ``recorded``: the
    states are there but the batch order is not (the line says what is missing).
    The measured cost is in docs/recipes.md ("Dropout"); Adam's replay self-check also fails on
    such a run and the checkpoint estimator scores it (engine/adam_batches.py)."""
    if replayed:
        return None
    ps = []
    for mod in model.modules():
        p = getattr(mod, "p", None)
        if isinstance(mod, DROPOUT_TYPES) and isinstance(p, (int, float)) and p > 0:
            ps.append(float(p))
        elif type(mod).__name__.lower().endswith(("dropout", "droppath", "stochasticdepth")) and \
                isinstance(p, (int, float)) and p > 0:
            ps.append(float(p))                 # timm's DropPath, torchvision's StochasticDepth, ...
    if not ps and not recorded:
        return None
    what = ("random training forwards" if not ps else
            f"{len(ps)} layer{'s' if len(ps) > 1 else ''}, p={ps[0]:g}" if len(set(ps)) == 1 else
            f"{len(ps)} layers, p={min(ps):g}..{max(ps):g}")
    why = ("the generator states are recorded but the batch order is not: record it, rec.step(batch_ids=...)"
           if recorded else "record the run with the Recorder and its batch order to replay them")
    return (f"Dropout ({what}): training's random masks are not replayed ({why}), "
            "the eval-mode network is scored (measured on a digits MLP at p=0.2, Spearman vs leave-one-out on "
            "2 seeds: SGD 0.91/0.85 (0.90/0.95 without dropout), AdamW 0.74/0.88 (0.99/0.98); docs/recipes.md "
            "\"Dropout\")")
