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
    """A fully connected ReLU network: ``[B, in_features]`` (flattened) -> ``[B, classes]``."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (128,)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
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
