"""Seeded label corruptions that return the corrupted labels and the ground-truth mask.

Every function is deterministic given ``seed`` and never modifies its input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

PAPER_PAIRS: dict[tuple[int, int], float] = {(1, 7): 0.4, (6, 9): 0.3}
"""The paper's MNIST corruption: 1<->7 flipped with probability 0.4, 6<->9 with 0.3."""


@dataclass(frozen=True)
class Corruption:
    """Corrupted labels and which of them were changed.

    Attributes:
        labels: the corrupted labels, int64 ``[N]``.
        mask: ``True`` where the label was changed, bool ``[N]``.
    """

    labels: torch.Tensor
    mask: torch.Tensor

    @property
    def rate(self) -> float:
        return float(self.mask.float().mean()) if self.mask.numel() else 0.0


def _as_numpy_labels(y: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(y.cpu().numpy() if isinstance(y, torch.Tensor) else y, dtype=np.int64).copy()


def _result(original: np.ndarray, new: np.ndarray) -> Corruption:
    return Corruption(torch.from_numpy(new), torch.from_numpy(new != original))


def pair_flips(
    y: torch.Tensor | np.ndarray,
    pairs: Mapping[tuple[int, int], float] = PAPER_PAIRS,
    seed: int = 0,
) -> Corruption:
    """Swap labels within class pairs: ``a`` becomes ``b`` (and ``b`` becomes ``a``) with ``p``.

    Args:
        y: clean labels ``[N]``.
        pairs: ``{(a, b): p}``; the default is the paper's ``{(1, 7): 0.4, (6, 9): 0.3}``.
        seed: seeds the draw.
    """
    orig = _as_numpy_labels(y)
    new = orig.copy()
    rng = np.random.default_rng(seed)
    u = rng.random(orig.shape[0])
    for (a, b), p in pairs.items():
        if not 0 <= p <= 1:
            raise ValueError(f"flip probability for pair {(a, b)} must lie in [0, 1]; got {p}")
        new[(orig == a) & (u < p)] = b
        new[(orig == b) & (u < p)] = a
    return _result(orig, new)


def symmetric_flips(
    y: torch.Tensor | np.ndarray, rate: float, num_classes: int, seed: int = 0
) -> Corruption:
    """Flip a ``rate`` share of labels, each to a uniformly drawn *different* class."""
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must lie in [0, 1]; got {rate}")
    orig = _as_numpy_labels(y)
    rng = np.random.default_rng(seed)
    flip = rng.random(orig.shape[0]) < rate
    shift = rng.integers(1, num_classes, size=orig.shape[0])
    new = np.where(flip, (orig + shift) % num_classes, orig)
    return _result(orig, new)


def transition_flips(y: torch.Tensor | np.ndarray, T: np.ndarray, seed: int = 0) -> Corruption:
    """Draw each new label from row ``T[y]`` of a class-transition matrix.

    Args:
        y: clean labels ``[N]``.
        T: ``[C, C]`` row-stochastic matrix, ``T[i, j] = P(noisy = j | clean = i)``.
        seed: seeds the draw.
    """
    T = np.asarray(T, dtype=np.float64)
    if T.ndim != 2 or T.shape[0] != T.shape[1]:
        raise ValueError(f"T must be a square [C, C] matrix; got shape {T.shape}")
    if (T < 0).any() or not np.allclose(T.sum(1), 1.0, atol=1e-6):
        raise ValueError("T must be row-stochastic: non-negative rows that sum to 1")
    orig = _as_numpy_labels(y)
    if orig.size and (orig.min() < 0 or orig.max() >= T.shape[0]):
        raise ValueError(f"labels must lie in [0, {T.shape[0]}) for a {T.shape[0]}-class T")
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(T, axis=1)[orig]  # [N, C]
    u = rng.random((orig.shape[0], 1))
    new = np.minimum((u > cdf).sum(1), T.shape[0] - 1).astype(np.int64)
    return _result(orig, new)
