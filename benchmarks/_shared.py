"""Helpers shared by the benchmark scripts that train their own models and record peers'
settings. The scripts import it as a sibling module: ``python benchmarks/NAME.py`` puts
``benchmarks/`` on ``sys.path`` (the tests' ``bench_script`` fixture does the same)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sgd_epochs(
    net: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch: int,
    lr: float,
    momentum: float,
    generator: torch.Generator,
) -> None:
    """Train ``net`` in place: SGD with momentum on the mean cross-entropy, each epoch one
    permutation of ``X`` drawn from ``generator``, in batches of ``batch``."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for s in range(0, len(y), batch):
            idx = order[s : s + batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(X[idx]), y[idx]).backward()
            opt.step()


@torch.no_grad()
def losses(net: nn.Module, X: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-example cross-entropy ``[N]`` (float64)."""
    return F.cross_entropy(net(X), y, reduction="none").double().numpy()


def is_jsonable(v: Any) -> bool:
    """Whether ``json.dumps`` takes ``v`` as it is (to keep only such ``info`` entries)."""
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False
