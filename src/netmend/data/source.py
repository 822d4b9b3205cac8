"""Data sources: the training set (or failures, or test set) read in batches, in index order.

A :class:`DataSource` is what every pass of netmend reads: it knows its length and labels
(``[N]`` int64, the only per-example data it keeps, besides an optional index view), and
reads the model inputs of any index range or index array **on demand**, through the user's
map-style ``Dataset`` and its ``collate_fn``, so that a data set that lives on disk is never
held in memory. A pair of tensors ``(X, y)`` takes a fast in-memory path.

Indexing a source gives a view (``src[a:b]``, ``src[index_array]``, ``src[bool_mask]``: a
source over those examples, nothing is read); ``view.to(device)`` reads its inputs as one
batch, so code written for a tensor ``X`` (``X[s].to(device)``, ``X[keep]``) reads a
``Dataset`` chunk by chunk unchanged. Use ``len(src)``, not ``src.shape[0]``.

Sources refuse what cannot be read in a fixed order: shuffled ``DataLoader`` s, samplers other
than the sequential one, and ``IterableDataset`` s (which have no index).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    SequentialSampler,
    Subset,
    TensorDataset,
)
from torch.utils.data.dataloader import default_collate

from netmend.data.task import (
    Inputs,
    MissingLabel,
    Task,
    batch_len,
    overrides,
    resolve_task,
    tensors_of,
    tree_map,
)
from netmend.data.validate import unwrap_pandas
from netmend.store import tensor_hash

log = logging.getLogger(__name__)

Index = Union[range, torch.Tensor]  # noqa: UP007 (a runtime alias)

PROBE_ROWS = 64
"""The model checks (number of classes, logits vs probabilities) probe the first examples, at
most this many; the checking pass of a ``Dataset`` keeps these items, so the probe reads no
example a second time."""


def _as_index(key: Any, n: int) -> Index:
    """A slice/array/mask over ``range(n)`` as a ``range`` or an int64 tensor of indices."""
    if isinstance(key, slice):
        return range(n)[key]
    if isinstance(key, range):
        return key
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        raise TypeError("index a data source with a slice or an index array, not an int")
    t = torch.as_tensor(np.asarray(key) if not isinstance(key, torch.Tensor) else key)
    if t.dtype == torch.bool:
        if t.shape != (n,):
            raise ValueError(f"a boolean mask must have shape [{n}]; got {tuple(t.shape)}")
        return torch.nonzero(t).reshape(-1)
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    if t.is_floating_point():
        raise TypeError("index a data source with integers, not floats")
    t = t.reshape(-1).long()
    if int(t.min()) < -n or int(t.max()) >= n:
        raise IndexError(f"index out of range for a data source of {n} examples")
    return torch.where(t < 0, t + n, t)


def _compose(outer: Index | None, key: Index) -> Index:
    """The global indices of ``key`` taken within a view over ``outer`` (None = identity)."""
    if outer is None:
        return key
    if isinstance(outer, range):
        if isinstance(key, range):
            if len(key) == 0:
                return range(0)
            start, step = outer[key.start], outer.step * key.step
            return range(start, start + step * len(key), step)
        return outer.start + key * outer.step  # no arange of the whole view
    sel = key if isinstance(key, torch.Tensor) else torch.arange(key.start, key.stop, key.step)
    return outer[sel]


def _cast(x: Inputs, dtype: torch.dtype | None) -> Inputs:
    if dtype is None:
        return x
    return tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, x)


class _Reader:
    """Reads the inputs of global indices, in the given order (no labels)."""

    n: int

    def read(self, index: Index) -> Inputs:  # pragma: no cover - interface
        raise NotImplementedError

    def read_head(self, index: Index) -> Inputs:
        """:meth:`read` for the model probe (a reader may serve it from memory)."""
        return self.read(index)

    def fingerprint(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


class _TensorReader(_Reader):
    def __init__(self, X: Inputs, y: torch.Tensor) -> None:
        self.X, self.y = X, y
        self.n = int(y.shape[0])

    def read(self, index: Index) -> Inputs:
        if isinstance(index, range) and index.step == 1:
            return tree_map(lambda t: t[index.start : index.stop], self.X)
        idx = index if isinstance(index, torch.Tensor) else torch.tensor(index, dtype=torch.long)
        return tree_map(lambda t: t[idx], self.X)

    def fingerprint(self) -> str:
        return tensor_hash(*tensors_of(self.X), self.y)


class _Chunks:
    """Consecutive index ranges ``[i, i + size)`` from ``start`` to ``n`` (a lazy batch sampler:
    no list of all indices)."""

    def __init__(self, start: int, n: int, size: int) -> None:
        self.start, self.n, self.size = start, n, size

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(self.start, self.n, self.size):
            yield list(range(i, min(i + self.size, self.n)))

    def __len__(self) -> int:
        return -(-(self.n - self.start) // self.size)


class _DatasetReader(_Reader):
    """Reads a map-style ``Dataset`` item by item and collates; with ``num_workers > 0``,
    consecutive equal-sized ranges (a sequential pass) are prefetched by a ``DataLoader``."""

    def __init__(
        self,
        dataset: Dataset[Any],
        task: Task,
        collate_fn: Callable[[list[Any]], Any] | None,
        num_workers: int,
        worker_options: dict[str, Any] | None = None,
    ) -> None:
        self.dataset, self.task = dataset, task
        self.collate = collate_fn or default_collate
        self.num_workers = num_workers
        self.worker_options = dict(worker_options or {})  # the user's DataLoader's, passed on
        self.n = len(dataset)  # type: ignore[arg-type]
        self._it: Iterator[Any] | None = None
        self._next, self._size = -1, 0
        self.hash, self.hash_batch = "", 1024  # the checking pass's hash and its batches
        self.head: list[Any] = []  # the first PROBE_ROWS items, kept by the checking pass

    def _inputs(self, batch: Any) -> Inputs:
        return self.task.inputs_and_labels(batch)[0]

    def read_head(self, index: Index) -> Inputs:
        """Like :meth:`read`, for the model probe: the first examples come from the items the
        checking pass kept, not from a second read."""
        if (
            isinstance(index, range)
            and index.step == 1
            and index.start == 0
            and 0 < index.stop <= len(self.head)
        ):
            return self._inputs(self.collate(self.head[: index.stop]))
        return self.read(index)

    def read(self, index: Index) -> Inputs:
        if self.num_workers > 0 and isinstance(index, range) and index.step == 1 and len(index) > 0:
            return self._inputs(self._prefetched(index.start, index.stop))
        items = [self.dataset[int(i)] for i in index]
        return self._inputs(self.collate(items))

    def _prefetched(self, a: int, b: int) -> Any:
        if self._it is None or a != self._next or b - a != self._size:
            size = b - a
            loader = DataLoader(
                self.dataset,
                batch_sampler=_Chunks(a, self.n, size),
                collate_fn=self.collate,
                num_workers=self.num_workers,
                **self.worker_options,
            )
            self._it, self._size = iter(loader), size
        self._next = b
        return next(self._it)

    def fingerprint(self) -> str:
        return self.hash

    def rehash(self, name: str) -> str:
        """The content hash taken again, by reading the whole ``Dataset`` once more (the
        fingerprint is the checking pass's): to detect data changed in place since then."""
        h = hashlib.blake2b(digest_size=16)
        for i in range(0, self.n, self.hash_batch):
            items = _read_items(self, name, i, min(i + self.hash_batch, self.n))
            x, y = self.task.inputs_and_labels(self.collate(items))
            h.update(_batch_hash(x, check_label_values(_to_tensor(y, name), name)))
        return h.hexdigest()


class DataSource:
    """A data set read in batches in index order: labels in memory, inputs read on demand.

    Build one with :func:`as_source`. Attributes: ``labels`` (``[N]`` int64), ``dtype`` (the
    floating dtype inputs are cast to when read, ``None`` to keep them), ``task``.
    """

    def __init__(
        self,
        reader: _Reader,
        labels: torch.Tensor,
        task: Task,
        index: Index | None = None,
        dtype: torch.dtype | None = None,
        signature: Any = None,
    ) -> None:
        self._reader, self._all_labels, self.task = reader, labels, task
        self._index, self.dtype, self.signature = index, dtype, signature
        self._labels: torch.Tensor | None = None
        self._probe = False  # a view made by head(): may be served from the checking pass

    def __len__(self) -> int:
        return self._reader.n if self._index is None else len(self._index)

    def __repr__(self) -> str:
        return f"DataSource({len(self)} examples, {type(self._reader).__name__[1:-6]})"

    @property
    def labels(self) -> torch.Tensor:
        """Labels ``[N]`` (int64, CPU)."""
        if self._labels is None:
            if self._index is None:
                self._labels = self._all_labels
            elif isinstance(self._index, range):
                i = self._index
                self._labels = (
                    self._all_labels[i.start : i.stop : i.step]
                    if i.step > 0
                    else (self._all_labels[torch.arange(i.start, i.stop, i.step)])
                )
            else:
                self._labels = self._all_labels[self._index]
        return self._labels

    @property
    def indices(self) -> torch.Tensor:
        """The indices of this view in the underlying data set ``[N]`` (int64)."""
        i = range(self._reader.n) if self._index is None else self._index
        return i if isinstance(i, torch.Tensor) else torch.arange(i.start, i.stop, i.step)

    @property
    def in_memory(self) -> bool:
        """Whether the inputs are tensors in memory (the ``(X, y)`` fast path)."""
        return isinstance(self._reader, _TensorReader)

    def __getitem__(self, key: Any) -> DataSource:
        """A view over ``key`` (slice, int64 index array or boolean mask ``[N]``); reads nothing."""
        sub = _compose(self._index, _as_index(key, len(self)))
        out = DataSource(self._reader, self._all_labels, self.task, sub, self.dtype, self.signature)
        out._probe = self._probe
        return out

    def head(self, m: int) -> DataSource:
        """The first ``m`` examples, for probing the model: a ``Dataset`` source serves up to
        :data:`PROBE_ROWS` of them from the items its checking pass kept (no second read)."""
        out = self[:m]
        out._probe = True
        return out

    def with_dtype(self, dtype: torch.dtype | None) -> DataSource:
        """The same source with floating inputs cast to ``dtype`` as they are read."""
        return DataSource(
            self._reader, self._all_labels, self.task, self._index, dtype, self.signature
        )

    def read(self) -> Inputs:
        """The inputs of this view as one batch, on CPU, in index order."""
        index = range(self._reader.n) if self._index is None else self._index
        read = self._reader.read_head if self._probe else self._reader.read
        x = read(index)
        if isinstance(self._reader, _TensorReader) and overrides(self.task, "inputs"):
            x = self.task.inputs(x)  # a Dataset's batches pass through it in the reader
        return _cast(x, self.dtype)

    def to(self, device: torch.device | str) -> Inputs:
        """The inputs of this view as one batch on ``device`` (``X[s].to(device)`` for a tensor).

        Read with the ``Dataset``'s ``__getitem__`` and the ``collate_fn`` for a ``Dataset``
        source; take a view of a slice of it first: this reads every example of the view.
        """
        return tree_map(lambda t: t.to(device), self.read())

    def batches(self, size: int) -> Iterator[tuple[slice, Inputs, torch.Tensor]]:
        """``(slice, inputs, labels)`` over consecutive batches of at most ``size`` examples."""
        n = len(self)
        for i in range(0, n, size):
            s = slice(i, min(i + size, n))
            yield s, self[s].read(), self.labels[s]

    def fingerprint(self, fresh: bool = False, name: str = "data") -> str:
        """A hash naming the content of this view (inputs, labels, index, dtype). A
        ``Dataset``'s content is hashed once, by its checking pass; ``fresh=True`` reads it
        again (one more pass, whose errors name the set ``name``) to see whether it changed
        in place since."""
        h = hashlib.blake2b(digest_size=16)
        if fresh and isinstance(self._reader, _DatasetReader):
            h.update(self._reader.rehash(name).encode())
        else:
            h.update(self._reader.fingerprint().encode())
        h.update(str(self.dtype).encode())
        if self._index is not None:
            h.update(tensor_hash(self.indices).encode())
        return h.hexdigest()

    def dataset(self) -> Dataset[Any]:
        """This view as a torch ``Dataset`` (a ``Subset`` of the user's ``Dataset``)."""
        r = self._reader
        if isinstance(r, _DatasetReader):
            if self._index is None:
                return r.dataset
            return Subset(r.dataset, self.indices.tolist())
        assert isinstance(r, _TensorReader)
        X = r.read(range(r.n) if self._index is None else self._index)
        if not isinstance(X, torch.Tensor):
            raise TypeError("an in-memory source with dict inputs has no TensorDataset form")
        return TensorDataset(_cast(X, self.dtype), self.labels)


class _SequenceDataset(Dataset):
    """A list (or any sequence) of items, as a map-style ``Dataset``."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


SourceLike = Union[DataSource, Dataset, DataLoader, Sequence[Any]]  # noqa: UP007
"""A ``DataSource``; a map-style ``Dataset``; a non-shuffled ``DataLoader``; a pair ``(X, y)``."""


def _to_tensor(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):  # read on the CPU, as every source is (a no-op there)
        return a.detach().cpu()
    arr = a if isinstance(a, np.ndarray) else None
    if arr is None and isinstance(a, (list, tuple)) and a and isinstance(a[0], (str, bytes)):
        arr = np.asarray(a)
    if arr is not None and arr.dtype.kind in "USO":  # torch's message names numpy.str_
        raise TypeError(
            f"{name}: holds {'strings' if arr.dtype.kind in 'US' else 'Python objects'} (class "
            "names?); pass numbers: for labels, each example's class index in the model's "
            "output order, e.g. y = [classes.index(c) for c in labels] with classes that order"
        )
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a))
    try:
        return torch.as_tensor(np.asarray(a))
    except Exception as exc:  # pragma: no cover - message path
        raise TypeError(f"{name}: cannot convert {type(a).__name__} to a tensor") from exc


def check_label_values(y: torch.Tensor, name: str) -> torch.Tensor:
    """Labels ``[N]`` as int64; raises on another shape or on non-integer values."""
    if y.ndim != 1:
        raise ValueError(f"{name}: labels must have shape [N]; got shape {tuple(y.shape)}")
    if y.is_floating_point() and not torch.all(y == torch.round(y)):
        bad = y[y != torch.round(y)][:3].tolist()
        raise ValueError(
            f"{name}: labels must be integer class indices (0, 1, ...); found {bad}. Pass each "
            "example's class index, not a probability, a soft label or a regression target"
        )
    if y.is_complex():
        raise ValueError(f"{name}: labels must be integer class indices")
    return y.long()


def nonfinite_rows(X: torch.Tensor, block_elements: int = 1 << 20) -> int:
    """Number of examples of ``X`` ``[N, ...]`` with a NaN or inf, checked block by block.

    ``torch.isfinite`` of the whole set would allocate ``[N, ...]`` temporaries (a float
    ``abs`` and two masks, about 1.7x the data); blocks keep the extra memory constant.
    """
    if X.shape[0] == 0 or not X.is_floating_point():
        return 0
    rows = max(1, block_elements // max(1, X[0].numel()))
    bad = 0
    for i in range(0, X.shape[0], rows):
        block = X[i : i + rows]
        bad += int((~torch.isfinite(block)).reshape(block.shape[0], -1).any(1).sum())
    return bad


def _check_inputs(X: Inputs, name: str) -> None:
    for t in tensors_of(X):
        if t.is_complex():
            raise ValueError(f"{name}: complex inputs are not supported; pass real-valued inputs")
        bad = nonfinite_rows(t)
        if bad:
            raise ValueError(
                f"{name}: {bad} input(s) contain NaN or inf; clean or drop them before calling "
                "netmend"
            )


def _signature(X: Inputs) -> Any:
    """Per-example shapes of the inputs' tensors (the structure of a batch)."""
    return tree_map(lambda t: tuple(t.shape[1:]), X)


def as_source(
    data: SourceLike,
    name: str = "data",
    task: Task | None = None,
    allow_empty: bool = False,
    batch_size: int = 1024,
    num_workers: int = 0,
) -> DataSource:
    """Wrap ``data`` as a :class:`DataSource`, checking its labels (one pass over the data).

    Args:
        data: a :class:`DataSource` (returned as is); a pair ``(X, y)`` of tensors/arrays
            (``X`` ``[N, ...]`` or a dict of such tensors, ``y`` ``[N]``): kept in memory;
            an object with ``.X`` and ``.y``; a ``TensorDataset(X, y)`` (its tensors are used
            directly, unless ``task`` overrides ``inputs_and_labels``); any other map-style
            ``Dataset`` whose items collate (default collate) into a batch that ``task`` splits
            into inputs and labels; or a ``DataLoader`` over one, built without shuffling,
            custom samplers or ``drop_last`` (its ``collate_fn`` and ``num_workers`` are used;
            its ``batch_size`` is ignored: netmend reads in ``chunk_size`` batches).
        name: how the data is named in messages ("train", "failures", ...).
        task: how batches split into inputs and labels (default :class:`ClassificationTask`).
        allow_empty: accept ``N == 0``.
        batch_size: examples per read of the checking pass over a ``Dataset``.
        num_workers: worker processes reading a ``Dataset`` (a ``DataLoader``'s own setting
            wins).

    Returns:
        A :class:`DataSource` with ``labels`` ``[N]`` int64. Inputs are not converted: integer
        token ids and ``uint8`` images reach the model as they are, or as ``task.inputs``
        returns them when the task overrides it (for pairs and Datasets alike).

    Raises:
        ValueError: a shuffled or sampled ``DataLoader``, ``drop_last``, an ``IterableDataset``,
            mismatched lengths, NaN/inf inputs, non-integer labels, empty data.
        TypeError: an unsupported container or batch.
    """
    task = resolve_task(task)
    if isinstance(data, DataSource):
        return data
    data = unwrap_pandas(data, name)  # pandas (X, y): paired by position, never imported
    collate: Callable[[list[Any]], Any] | None = None
    worker_options: dict[str, Any] = {}
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            raise ValueError(_ITERABLE.format(name=name))
        inner = getattr(data.batch_sampler, "sampler", None)
        if not isinstance(data.sampler, SequentialSampler) or (
            data.batch_sampler is not None and not isinstance(inner, SequentialSampler)
        ):
            which = (  # the one that shuffles: a batch_sampler's own sampler, if it is that
                data.sampler
                if not isinstance(data.sampler, SequentialSampler) or data.batch_sampler is None
                else (inner if inner is not None else data.batch_sampler)
            )
            raise ValueError(
                f"{name}: the DataLoader shuffles or samples ({type(which).__name__}); "
                "netmend returns one score per example in dataset order, so pass the Dataset "
                "itself or a DataLoader built with shuffle=False and no sampler."
            )
        if data.drop_last:
            raise ValueError(
                f"{name}: the DataLoader drops its last batch (drop_last=True), so some examples "
                "would get no score; build it with drop_last=False or pass the Dataset"
            )
        collate = None if data.collate_fn is default_collate else data.collate_fn
        num_workers = data.num_workers
        # how its workers are started (worker_init_fn reopening an HDF5/LMDB handle per worker
        # is the usual pattern for data on disk; dropped, the workers crashed); not its
        # generator, whose state would move with every pass
        worker_options = {
            k: getattr(data, k)
            for k in ("worker_init_fn", "multiprocessing_context", "timeout", "pin_memory")
        }
        if num_workers > 0:
            worker_options["prefetch_factor"] = data.prefetch_factor
        data = data.dataset
        if not isinstance(data, Dataset) and isinstance(data, Sequence):
            data = _SequenceDataset(data)  # a DataLoader over a list of items
    if isinstance(data, IterableDataset):
        raise ValueError(_ITERABLE.format(name=name))
    if (
        isinstance(data, TensorDataset)
        and len(data.tensors) == 2
        and collate is None
        and not overrides(task, "inputs_and_labels")
    ):
        data = tuple(data.tensors)  # (inputs, labels): what the task would split it into
    if hasattr(data, "X") and hasattr(data, "y") and not isinstance(data, Dataset):
        data = (data.X, data.y)  # a split of the experiment kit (netmend.lab.datasets.Split)
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data, Dataset):
        raw = data[0]
        X = (
            {k: _to_tensor(v, name) for k, v in raw.items()}
            if isinstance(raw, Mapping)
            else _to_tensor(raw, name)
        )
        y = _to_tensor(data[1], name)
        if y.ndim == 0:
            raise ValueError(
                f"{name}: the label is a single number, not one label per example; pass one "
                "example as a batch of one: (x[None], torch.tensor([label]))"
            )
        n = int(y.shape[0])
        for t in tensors_of(X):
            if t.ndim == 0 or t.shape[0] != n:
                raise ValueError(
                    f"{name}: inputs and labels have different lengths "
                    f"({t.shape[0] if t.ndim else 0} vs {n}); pass one label per input"
                )
        y = check_label_values(y, name)
        _check_empty(len(y), name, allow_empty)
        _check_inputs(X, name)
        sig = _signature(X)
        return DataSource(_TensorReader(X, y), y, task, signature=sig)
    if isinstance(data, Dataset):
        if not hasattr(data, "__len__"):
            raise TypeError(f"{name}: the Dataset has no __len__; netmend needs a map-style one")
        reader = _DatasetReader(data, task, collate, num_workers, worker_options)
        labels = _label_pass(reader, name, batch_size)
        _check_empty(reader.n, name, allow_empty)
        return DataSource(reader, labels, task)
    raise TypeError(
        f"{name}: expected a torch Dataset (map-style), a DataLoader without shuffling, or a pair "
        f"(X, y) of tensors/arrays; got {type(data).__name__}"
    )


_ITERABLE = (
    "{name}: an IterableDataset has no index, so netmend cannot read example n again, in "
    "order, on every pass; wrap the data in a map-style Dataset (with __len__ and "
    "__getitem__) or pass tensors (X, y)"
)


def _check_empty(n: int, name: str, allow_empty: bool) -> None:
    if n == 0 and not allow_empty:
        audit = (
            " (or failures=None, to audit the training set with a method that ignores "
            "failures, e.g. identify(model, train, None, 'loss', k=100))"
            if name == "failures"
            else ""
        )
        raise ValueError(f"{name} is empty: pass at least one example{audit}")


def _read_items(reader: _DatasetReader, name: str, i: int, j: int) -> list[Any]:
    """Items ``i..j-1`` of the ``Dataset``, a ``__len__`` that runs past its data said so."""
    try:
        return [reader.dataset[k] for k in range(i, j)]
    except IndexError as exc:  # a __len__ larger than the data: torch's bare IndexError
        raise ValueError(
            f"{name}: reading examples {i}..{j - 1} of the {reader.n} its __len__ gives failed "
            f"({exc}): check that __len__ matches the data the Dataset can read"
        ) from exc


def _batch_hash(x: Inputs, y: torch.Tensor) -> bytes:
    """One batch's part of a ``Dataset``'s content hash (its inputs and checked labels)."""
    return tensor_hash(*tensors_of(x), y).encode()


def _check_item_labels(items: list[Any], task: Task, name: str, start: int) -> None:
    """Refuse items whose label is ``None`` (``(x, None)``, ``{"label": None, ...}``) before
    they are collated: torch's collate said only "Could not infer dtype of NoneType", of the
    whole chunk."""
    keys = getattr(task, "label_keys", ())
    missing = []
    for t, item in enumerate(items):
        if isinstance(item, (tuple, list)) and len(item) >= 2 and item[1] is None:
            missing.append(start + t)
        elif isinstance(item, Mapping):
            key = next((k for k in keys if k in item), None)
            if key is not None and item[key] is None:
                missing.append(start + t)
    if missing:
        raise _no_label(name, missing)


def _no_label(name: str, indices: list[int]) -> ValueError:
    """The refusal of examples without a label, by index."""
    at = ", ".join(map(str, indices[:5])) + (" ..." if len(indices) > 5 else "")
    return ValueError(
        f"{name}: example{'s' if len(indices) > 1 else ''} {at} "
        f"{'have' if len(indices) > 1 else 'has'} no label (None): every example needs its "
        "class index; leave the unlabelled ones out"
    )


def _label_pass(reader: _DatasetReader, name: str, batch_size: int) -> torch.Tensor:
    """Read a ``Dataset`` once in order: collect its labels ``[N]``, check every batch and hash
    the content (the source's fingerprint). Memory: the labels and one batch."""
    n = reader.n
    labels = torch.empty(n, dtype=torch.long)
    h = hashlib.blake2b(digest_size=16)
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)
        items = _read_items(reader, name, i, j)
        _check_item_labels(items, reader.task, name, i)
        nones = [i + t for t, item in enumerate(items) if item is None]
        if nones:  # the user's collate_fn, or torch's, would fail on it with another message
            raise ValueError(
                f"{name}: the Dataset returned None for example{'s' if len(nones) > 1 else ''} "
                f"{', '.join(map(str, nones[:5]))}{' ...' if len(nones) > 5 else ''}: every "
                "index below its __len__ must give an example; fix __getitem__ or leave those "
                "out of the Dataset"
            )
        try:
            batch = reader.collate(items)
        except Exception as exc:
            advice = (
                "pass a DataLoader with a collate_fn that pads them"
                if reader.collate is default_collate
                else "your collate_fn raised it: check it on these examples"
            )
            raise TypeError(
                f"{name}: examples {i}..{j - 1} cannot be collated into a batch ({exc}); {advice}"
            ) from exc
        try:
            x, y = reader.task.inputs_and_labels(batch)
        except MissingLabel as exc:  # None labels the user's collate_fn made
            raise _no_label(name, [i + p for p in exc.positions]) from None
        if i == 0:
            reader.head = items[:PROBE_ROWS]
        y = check_label_values(_to_tensor(y, name), name)
        if y.shape[0] != j - i or batch_len(x) != j - i:
            raise ValueError(
                f"{name}: a batch of {j - i} examples gave {batch_len(x)} inputs and "
                f"{y.shape[0]} labels; each item must be one example"
            )
        _check_inputs(x, name)
        labels[i:j] = y
        h.update(_batch_hash(x, y))
    reader.hash, reader.hash_batch = h.hexdigest(), batch_size
    _check_repeatable(reader, name)
    log.debug("%s: read %d examples to check them and collect their labels", name, n)
    return labels


REPEAT_ROWS = 8
"""Examples a ``Dataset``'s checking pass reads a second time, to see that it returns the same
values for an index (no random transform)."""


def _check_repeatable(reader: _DatasetReader, name: str) -> None:
    """Refuse a ``Dataset`` that returns other values for the same index (a random transform,
    data augmentation left on): every pass would read other examples. Its first items are
    read again and compared with the ones the checking pass kept (an outside-in trial: flips
    and noise took the causes' precision from 0.95 to 0.07, below chance, silently)."""
    kept = reader.head[:REPEAT_ROWS]
    if not kept:
        return
    again = [reader.dataset[k] for k in range(len(kept))]
    first, second = (reader.task.inputs_and_labels(reader.collate(v)) for v in (kept, again))
    if tensor_hash(*tensors_of(first[0])) != tensor_hash(*tensors_of(second[0])):
        raise ValueError(
            f"{name}: the Dataset returned other inputs when its first examples were read "
            "again: a random transform (data augmentation) is on. netmend reads every example "
            "several times and needs the same values each time: pass the Dataset with its "
            "evaluation transforms (no random crops, flips or noise)"
        )
