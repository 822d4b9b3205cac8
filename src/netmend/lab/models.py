"""Reference classifiers used by the demo, the benchmarks and the tests.

netmend itself works with any ``nn.Module`` whose forward returns logits of shape
``[batch, classes]``; these are only convenient, deterministic defaults.
"""

from __future__ import annotations

import torch
from torch import nn


def _as_float(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Integer pixels (e.g. ``uint8``, unscaled) in ``model``'s dtype; floating inputs unchanged.

    The reference models take the data sets of :mod:`netmend.lab.datasets` as they are stored
    (integers, 4x smaller than floats); netmend itself passes inputs to a model unchanged.
    """
    return x if x.is_floating_point() else x.to(next(model.parameters()).dtype)


class SmallCNN(nn.Module):
    """Two 5x5 conv layers and two linear layers for 28x28 grey images (about 47k weights).

    Input ``[B, 1, 28, 28]`` (or ``[B, 784]``, reshaped), output logits ``[B, classes]``.
    No dropout or BatchNorm, so two passes over the same data give the same outputs.
    """

    def __init__(self, num_classes: int = 10, side: int = 28) -> None:
        super().__init__()
        if side < 16:
            raise ValueError(
                f"SmallCNN needs images of side >= 16 (two 5x5 convs, two pools); got {side}"
            )
        self.side = side
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        s = ((side - 4) // 2 - 4) // 2
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * s * s, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_float(x, self).reshape(x.shape[0], 1, self.side, self.side)
        return self.head(self.features(x))


class MLP(nn.Module):
    """A fully connected network: ``[B, in_features]`` (flattened) -> ``[B, classes]``, with
    ``activation`` (default ReLU) after each hidden layer."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: tuple[int, ...] = (128,),
        activation: type[nn.Module] = nn.ReLU,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), activation()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(_as_float(x, self))


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer on flattened inputs."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(_as_float(x, self).reshape(x.shape[0], -1))


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm, a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.short(x))


class ResNet18(nn.Module):
    """The ResNet-18 layout for small grey images: a 3x3 stem, four stages of two basic blocks
    (widths ``w, 2w, 4w, 8w``, strides 1, 2, 2, 2), global average pooling, a linear head.

    With BatchNorm after every convolution; ``width=16`` has about 0.7M parameters (64: 11M).
    Input ``[B, 1, H, W]`` (integer pixels are converted to floats), output ``[B, classes]``.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        cin = width
        for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            blocks += [_BasicBlock(cin, cout, 1 if i == 0 else 2), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(_as_float(x, self)))
        return self.head(h.mean((2, 3)))
