"""Tiny float64 model factories for the ``netmend repair`` tests (``_cli_models:<factory>``)."""

from __future__ import annotations

import torch
from torch import nn


def image_net() -> nn.Module:
    """Images ``[1, 6, 6]`` in [0, 1] -> 3 classes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).double()


def tabular_net() -> nn.Module:
    """4 features -> 3 classes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


class Scaled(nn.Module):
    """``tabular_net`` times a learned temperature: a top-level ``nn.Parameter``, which has no
    ``reset_parameters()`` to retrain it from scratch with."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tabular_net()
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


def scaled_tabular_net() -> nn.Module:
    return Scaled()


class TokenNet(nn.Module):
    """Token ids ``[B, L]`` (0 = padding) -> mean embedding -> 3 classes."""

    def __init__(self, vocab: int = 12, dim: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.out = nn.Linear(dim, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).to(self.embed.weight.dtype).unsqueeze(-1)
        h = (self.embed(ids) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.out(h)


def token_net() -> nn.Module:
    torch.manual_seed(0)
    return TokenNet().double()


def meta_tabular_net() -> nn.Module:
    """``tabular_net`` built on the "meta" device (shapes only), as fast-init code does."""
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def preloaded_scaled_net() -> nn.Module:
    """``scaled_tabular_net`` loading its trained weights itself (from the file named by the
    ``NETMEND_TEST_WEIGHTS`` environment variable), as some users' factories do."""
    import os

    from safetensors.torch import load_file

    model = Scaled()
    model.load_state_dict(load_file(os.environ["NETMEND_TEST_WEIGHTS"]))
    return model


class _WithRope(nn.Sequential):
    """``tabular_net``'s layers (the same weights' keys) and an unsaved buffer."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.register_buffer("freq", torch.ones(4), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.freq)


def meta_buffer_net() -> nn.Module:
    """Built on the "meta" device with a buffer its weights do not hold (persistent=False)."""
    with torch.device("meta"):
        return _WithRope().double()
