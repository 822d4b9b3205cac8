"""Input conversion and validation shared by every stage.

Every user-facing entry point funnels its data through :func:`netmend.data.source.as_source`
(and its model through :mod:`netmend.model.checks`), so a malformed input fails once, early,
with a message that says what to do. Validation raises :class:`ValueError` /
:class:`TypeError`, never ``assert`` (which vanishes under ``python -O``).
"""

from __future__ import annotations

import numpy as np
import torch

from netmend.data.source import SourceLike, as_source
from netmend.data.task import Task

DataLike = SourceLike
"""A map-style ``Dataset``, a non-shuffled ``DataLoader``, a pair ``(X, y)`` or a
:class:`netmend.data.source.DataSource`."""


def as_tensors(
    data: DataLike, name: str = "data", allow_empty: bool = False, task: Task | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise ``data`` as a pair of tensors ``(X, y)`` (for small sets only: the
    training set is read through :func:`netmend.data.source.as_source` instead).

    Args:
        data: anything :func:`netmend.data.source.as_source` takes whose inputs are tensors.
        name: how the data is named in error messages ("valid", ...).
        allow_empty: accept ``N == 0``.
        task: how batches split into inputs and labels (see :func:`netmend.identify`).

    Returns:
        ``X`` with shape ``[N, ...]`` and ``y`` with shape ``[N]`` (int64). Inputs keep their
        dtype (integer token ids and ``uint8`` images too; a pair's ``X`` is not copied).

    Raises:
        ValueError: mismatched lengths, NaN/inf inputs, non-integer labels, empty data, a
            shuffled ``DataLoader``.
        TypeError: an unsupported container, or inputs that are not one tensor (e.g. dicts).
    """
    src = as_source(data, name, task, allow_empty=allow_empty)
    X = src.read()
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name}: inputs must be one tensor here; got {type(X).__name__}")
    return X, src.labels


def rows_in(A: torch.Tensor, B: torch.Tensor) -> np.ndarray:
    """Which rows of ``A`` ``[n, ...]`` are, bit for bit, rows of ``B`` ``[m, ...]``: ``[n]`` bool.

    Rows of another dtype or shape never match. One hashable value per row (no Python loop).
    """
    if A.dtype != B.dtype or A.shape[1:] != B.shape[1:] or not len(A) or not len(B):
        return np.zeros(len(A), dtype=bool)
    a = np.ascontiguousarray(A.detach().cpu().reshape(len(A), -1).numpy())
    b = np.ascontiguousarray(B.detach().cpu().reshape(len(B), -1).numpy())
    row = np.dtype((np.void, a.dtype.itemsize * a.shape[1]))  # one opaque value per row
    return np.isin(a.view(row).ravel(), b.view(row).ravel())


def check_labels(y: torch.Tensor, num_classes: int, name: str) -> None:
    """Raise if any label lies outside ``[0, num_classes)``."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        hint = (
            ": a binary model with one logit z must return two, one per class (e.g. "
            "torch.cat([torch.zeros_like(z), z], 1), whose softmax gives p(1) = sigmoid(z))"
            if num_classes == 1
            else ""
        )
        raise ValueError(
            f"{name}: labels must lie in [0, {num_classes}) for a model with {num_classes} "
            f"outputs; found labels in [{int(y.min())}, {int(y.max())}]{hint}"
        )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" picks CUDA when available, otherwise CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device {device!r} is not a device: use 'cpu', 'cuda', 'cuda:N' or 'auto'"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was asked for but CUDA is not available here; use device='cpu' "
            "or 'auto'"
        )
    return dev
