"""Input conversion and validation shared by every stage.

Every user-facing entry point funnels its data through :func:`as_tensors` (and its model
through :mod:`netmend.model.checks`), so a malformed input fails once, early, with a message that
says what to do. Validation raises :class:`ValueError` / :class:`TypeError`, never
``assert`` (which vanishes under ``python -O``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from netmend.data.validate import unwrap_pandas

DataLike = Union[Dataset, DataLoader, Sequence[Any]]  # noqa: UP007 (a runtime alias)
"""A ``Dataset`` yielding ``(x, y)``, a non-shuffled ``DataLoader``, or a pair ``(X, y)``."""


def _to_tensor(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach()
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a))
    try:
        return torch.as_tensor(np.asarray(a))
    except Exception as exc:  # pragma: no cover - message path
        raise TypeError(f"{name}: cannot convert {type(a).__name__} to a tensor") from exc


def as_tensors(
    data: DataLike, name: str = "data", allow_empty: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise ``data`` as a pair of tensors ``(X, y)``.

    Args:
        data: a ``Dataset`` yielding ``(x, y)``; a ``DataLoader`` over one (it must not
            shuffle: scores are returned in dataset order); or a pair ``(X, y)`` of tensors
            or numpy arrays with ``X`` of shape ``[N, ...]`` and ``y`` of shape ``[N]``.
        name: how the data is named in error messages ("train", "failures", ...).
        allow_empty: accept ``N == 0``.

    Returns:
        ``X`` with shape ``[N, ...]`` and ``y`` with shape ``[N]`` (int64). Floating inputs
        keep their dtype; integer inputs (token ids, ``uint8`` images) too, and reach the model
        as they are: converting or scaling them is the model's business (netmend never casts
        token ids to floats, and never holds a floating copy of the whole set).

    Raises:
        ValueError: mismatched lengths, NaN/inf inputs, non-integer labels, empty data.
        TypeError: an unsupported container.
    """
    data = unwrap_pandas(data, name)  # pandas (X, y): paired by position, never imported
    if hasattr(data, "X") and hasattr(data, "y") and not isinstance(data, Dataset):
        # a split of the experiment kit (netmend.lab.datasets.Split) or any object with X and y
        return as_tensors((data.X, data.y), name=name, allow_empty=allow_empty)
    if isinstance(data, DataLoader):
        if not isinstance(data.sampler, SequentialSampler):
            raise ValueError(
                f"{name}: the DataLoader shuffles or samples ({type(data.sampler).__name__}); "
                "netmend returns one score per example in dataset order, so pass the Dataset "
                "itself or a DataLoader built with shuffle=False."
            )
        if data.drop_last:
            raise ValueError(
                f"{name}: the DataLoader drops its last batch (drop_last=True), so some examples "
                "would get no score; build it with drop_last=False or pass the Dataset"
            )
        xs, ys = [], []
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TypeError(f"{name}: each batch must be (x, y); got {type(batch).__name__}")
            xs.append(_to_tensor(batch[0], name))
            ys.append(_to_tensor(batch[1], name))
        X = torch.cat(xs) if xs else torch.empty(0)
        y = torch.cat(ys) if ys else torch.empty(0, dtype=torch.long)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data, Dataset):
        X, y = _to_tensor(data[0], name), _to_tensor(data[1], name)
    elif isinstance(data, Dataset):
        n = len(data)  # type: ignore[arg-type]
        if n == 0:
            X, y = torch.empty(0), torch.empty(0, dtype=torch.long)
        else:
            loader = DataLoader(data, batch_size=1024, shuffle=False)
            return as_tensors(loader, name=name, allow_empty=allow_empty)
    else:
        raise TypeError(
            f"{name}: expected a torch Dataset yielding (x, y), a DataLoader, or a pair (X, y) "
            f"of tensors/arrays; got {type(data).__name__}"
        )
    if y.ndim != 1:
        raise ValueError(f"{name}: labels must have shape [N]; got shape {tuple(y.shape)}")
    if X.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name}: inputs and labels have different lengths ({X.shape[0]} vs {y.shape[0]}); "
            "pass one label per input"
        )
    if X.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty: pass at least one example")
    if y.is_floating_point():
        if not torch.all(y == torch.round(y)):
            raise ValueError(f"{name}: labels must be integer class indices, not probabilities")
        y = y.long()
    y = y.long()
    if X.is_complex():
        raise ValueError(f"{name}: complex inputs are not supported; pass real-valued inputs")
    if not X.is_floating_point():  # e.g. uint8 images: kept, converted chunk by chunk
        return X, y
    bad = _nonfinite_rows(X)
    if bad:
        raise ValueError(
            f"{name}: {bad} input(s) contain NaN or inf; clean or drop them before calling netmend"
        )
    return X, y


def _nonfinite_rows(X: torch.Tensor, block_elements: int = 1 << 20) -> int:
    """Number of examples of ``X`` ``[N, ...]`` with a NaN or inf, checked block by block.

    ``torch.isfinite`` of the whole set would allocate ``[N, ...]`` temporaries (a float
    ``abs`` and two masks, about 1.7x the data); blocks keep the extra memory constant.
    """
    if X.shape[0] == 0:
        return 0
    rows = max(1, block_elements // max(1, X[0].numel()))
    bad = 0
    for i in range(0, X.shape[0], rows):
        block = X[i : i + rows]
        bad += int((~torch.isfinite(block)).reshape(block.shape[0], -1).any(1).sum())
    return bad


def check_labels(y: torch.Tensor, num_classes: int, name: str) -> None:
    """Raise if any label lies outside ``[0, num_classes)``."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{name}: labels must lie in [0, {num_classes}) for a model with {num_classes} "
            f"outputs; found labels in [{int(y.min())}, {int(y.max())}]"
        )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" picks CUDA when available, otherwise CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was asked for but CUDA is not available here; use device='cpu' "
            "or 'auto'"
        )
    return dev
