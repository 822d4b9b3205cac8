"""Streamed data: a map-style Dataset is read batch by batch, in index order, once per pass.

Oracle: the in-memory ``(X, y)`` path (scores must agree to 1e-6 relative in float64; they
are computed in the same chunks, so they agree far tighter). A Dataset that counts its
``__getitem__`` calls shows how often each example is read.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, SubsetRandomSampler

import netmend
from netmend.data.source import REPEAT_ROWS, DataSource, as_source

RUN = dict(progress=False, device="cpu")


class Counting(Dataset):
    """``(x, y)`` items of two tensors; counts how often each index is read."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y = X, y
        self.reads = np.zeros(len(y), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):  # noqa: ANN204
        self.reads[i] += 1
        return self.X[i], self.y[i]


@pytest.fixture
def failset(blobs, blobs_logreg, failures_for):
    extra = torch.tensor([[2.5, 0.3], [0.2, 3.1], [-2.0, 1.0]], dtype=torch.float64)
    Xf = torch.cat([blobs.Xf, extra])
    return Xf, torch.cat([blobs.yf, failures_for(blobs_logreg, extra, blobs.classes)])


def test_default_pipeline_through_a_dataset_equals_in_memory(blobs, blobs_logreg, failset):
    mem = netmend.repair(blobs_logreg, (blobs.X, blobs.y), failset, chunk_size=16, **RUN)
    ds = Counting(blobs.X, blobs.y)
    got = netmend.repair(blobs_logreg, ds, Counting(*failset), chunk_size=16, **RUN)
    np.testing.assert_allclose(got.scores, mem.scores, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(got.causes, mem.causes)
    assert got.identification.info["auto_k"] == mem.identification.info["auto_k"]
    for p, q in zip(got.model.parameters(), mem.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-12)
    e1 = netmend.evaluate(got.model, Counting(blobs.X, blobs.y), device="cpu")
    assert e1 == netmend.evaluate(mem.model, (blobs.X, blobs.y), device="cpu")


@pytest.mark.parametrize(
    "method, opts",
    [
        ("linear", {}),
        ("grad_dot", {}),
        ("influence", {"curvature": "diag"}),
        ("ekfac", {}),
        ("tracin", {}),
        ("trak", {}),
        ("knn_shapley", {}),
        ("loss", {}),
    ],
)
def test_methods_through_a_dataset_equal_in_memory(method, opts, blobs, blobs_logreg, failset):
    kw = dict(k=10, chunk_size=32, **RUN, **opts)
    mem = netmend.identify(blobs_logreg, (blobs.X, blobs.y), failset, method, **kw)
    got = netmend.identify(blobs_logreg, Counting(blobs.X, blobs.y), failset, method, **kw)
    np.testing.assert_allclose(got.scores, mem.scores, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(got.causes, mem.causes)


@pytest.mark.parametrize("treat", ["newton", "ewc", "retrain", "relabel"])
def test_treatments_through_a_dataset_equal_in_memory(treat, blobs, blobs_logreg):
    causes = blobs.planted
    kw = dict(chunk_size=32, **RUN)
    if treat == "retrain":
        kw["train_config"] = netmend.TrainConfig(epochs=2, batch_size=32, lr=0.05)
    mem = netmend.treat(blobs_logreg, (blobs.X, blobs.y), causes, treat, **kw)
    got = netmend.treat(blobs_logreg, Counting(blobs.X, blobs.y), causes, treat, **kw)
    for p, q in zip(got.parameters(), mem.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-12)


def test_every_pass_reads_each_index_once(blobs, blobs_logreg, failset):
    """EWC identification with a fixed k makes four passes over the training set (the check
    that collects the labels, the Fisher, and log p before and after the fit): every example
    is read exactly four times, none more (no extra full reads, no probe re-reads)."""
    ds = Counting(blobs.X, blobs.y)
    netmend.identify(blobs_logreg, ds, failset, "ewc", k=10, chunk_size=16, **RUN)
    first = REPEAT_ROWS  # read once more by the check that the Dataset repeats its values
    assert ds.reads[:first].min() == ds.reads[:first].max() == 5
    assert ds.reads[first:].min() == ds.reads[first:].max() == 4
    # the automatic K scores the training set against both halves of each of the three
    # half-splits of the failures: one more log-likelihood pass each (at theta_+F of the
    # half; the Fisher and log p(z|theta_hat) are shared); where the halves agree on nothing,
    # the per-failure scores take one more pass
    ds2 = Counting(blobs.X, blobs.y)
    auto = netmend.identify(blobs_logreg, ds2, failset, "ewc", chunk_size=16, **RUN)
    handful = auto.info["auto_k"]["rule"].startswith("top ")
    expected = 4 + 2 * netmend.api.AUTO_K_SPLITS + int(handful)
    # the label gate reads the automatic causes once more (the model's prediction on them)
    gated = np.zeros(len(ds2), int)
    gated[np.argsort(-auto.scores, kind="stable")[: auto.info["label_gate"]["of"]]] = 1
    gated[:REPEAT_ROWS] += 1  # the repeat check
    np.testing.assert_array_equal(ds2.reads, expected + gated)


def test_finetune_reads_only_the_retained_set(blobs, blobs_logreg):
    """Fine-tuning reads D minus C (never a cause) in minibatches; the treatment does not load
    the training set whole."""
    ds = Counting(blobs.X, blobs.y)
    causes = blobs.planted
    src = as_source(ds, "train")  # the one checking pass
    before = ds.reads.copy()
    netmend.treat(blobs_logreg, src, causes, "finetune", epochs=1.0, batch_size=16, **RUN)
    extra = ds.reads - before
    assert extra[causes].sum() == 0
    keep = np.setdiff1d(np.arange(len(ds)), causes)
    # one epoch of minibatches (epochs * n / batch steps, rounded): each retained example
    # read at most twice (the last partial batch wraps into a fresh permutation)
    assert extra[keep].max() <= 2 and extra[keep].sum() == round(len(keep) / 16) * 16


def test_dataloader_with_workers_and_its_collate(blobs, blobs_logreg, failset):
    calls = {"n": 0}

    def collate(items):  # noqa: ANN001, ANN202
        calls["n"] += 1
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])

    loader = DataLoader(Counting(blobs.X, blobs.y), batch_size=7, collate_fn=collate)
    mem = netmend.identify(blobs_logreg, (blobs.X, blobs.y), failset, k=10, **RUN)
    got = netmend.identify(blobs_logreg, loader, failset, k=10, **RUN)
    np.testing.assert_allclose(got.scores, mem.scores, rtol=1e-6, atol=1e-12)
    assert calls["n"] > 0
    workers = DataLoader(Counting(blobs.X, blobs.y), batch_size=7, num_workers=2)
    got2 = netmend.identify(blobs_logreg, workers, failset, k=10, chunk_size=32, **RUN)
    np.testing.assert_allclose(got2.scores, mem.scores, rtol=1e-6, atol=1e-12)


def test_views_read_in_index_order(blobs):
    ds = Counting(blobs.X, blobs.y)
    src = as_source(ds, "train", batch_size=50)
    idx = torch.tensor([5, 3, 9, 3])
    torch.testing.assert_close(src[idx].to("cpu"), blobs.X[idx], rtol=0.0, atol=0.0)
    sub = src[10:40][torch.tensor([2, 0])]
    torch.testing.assert_close(sub.to("cpu"), blobs.X[[12, 10]], rtol=0.0, atol=0.0)
    assert torch.equal(sub.labels, blobs.y[[12, 10]])
    mask = torch.zeros(len(ds), dtype=torch.bool)
    mask[[1, 4]] = True
    assert torch.equal(src[mask].indices, torch.tensor([1, 4]))
    assert isinstance(src[mask], DataSource) and len(src[mask]) == 2
    assert len(src[mask].dataset()) == 2  # a torch Subset of the user's Dataset


class Stream(IterableDataset):
    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y = X, y

    def __iter__(self):  # noqa: ANN204
        return iter(zip(self.X, self.y))


def test_unordered_sources_are_refused(blobs, blobs_logreg, failset):
    ds = Counting(blobs.X, blobs.y)
    with pytest.raises(ValueError, match="shuffles or samples"):
        netmend.identify(blobs_logreg, DataLoader(ds, shuffle=True), failset, **RUN)
    sampler = SubsetRandomSampler(list(range(len(ds))))
    with pytest.raises(ValueError, match="shuffles or samples"):
        netmend.identify(blobs_logreg, DataLoader(ds, sampler=sampler), failset, **RUN)
    with pytest.raises(ValueError, match="drop_last"):
        netmend.identify(blobs_logreg, DataLoader(ds, drop_last=True), failset, **RUN)
    with pytest.raises(ValueError, match="IterableDataset has no index"):
        netmend.identify(blobs_logreg, Stream(blobs.X, blobs.y), failset, **RUN)
    with pytest.raises(ValueError, match="IterableDataset has no index"):
        netmend.identify(blobs_logreg, DataLoader(Stream(blobs.X, blobs.y)), failset, **RUN)
    assert ds.reads.sum() == 0  # refused before reading anything


def test_bad_items_are_refused_clearly(blobs):
    class NaNs(Counting):
        def __getitem__(self, i: int):  # noqa: ANN204
            x, y = super().__getitem__(i)
            return (x * float("nan") if i == 3 else x), y

    with pytest.raises(ValueError, match="NaN or inf"):
        as_source(NaNs(blobs.X, blobs.y), "train")
    soft = Counting(blobs.X, blobs.y.double() + 0.5)
    with pytest.raises(ValueError, match="integer class indices"):
        as_source(soft, "train")

    class Holes(Counting):  # an item that could not be read: None, not an example
        def __getitem__(self, i: int):  # noqa: ANN204
            return None if i in (5, 9) else super().__getitem__(i)

    def pad(items: list) -> tuple:  # the user's own collate_fn: it cannot take None
        return torch.stack([x for x, _ in items]), [y for _, y in items]

    for loader in (Holes(blobs.X, blobs.y), DataLoader(Holes(blobs.X, blobs.y), collate_fn=pad)):
        with pytest.raises(ValueError, match="returned None for examples 5, 9: every index"):
            as_source(loader, "train")

    class Unlabelled(Counting):  # a label not yet given: None (torch said "NoneType")
        def __getitem__(self, i: int):  # noqa: ANN204
            x, y = super().__getitem__(i)
            return x, (None if i == 70 else int(y))

    for data in (
        DataLoader(Unlabelled(blobs.X, blobs.y), collate_fn=pad),
        Unlabelled(blobs.X, blobs.y),
    ):  # torch's collate: "NoneType", of the chunk
        with pytest.raises(ValueError, match="failures: example 70 has no label"):
            as_source(data, "failures")

    def unnamed(items: list) -> tuple:  # a collate_fn that maps labels 2 to None itself
        return torch.stack([x for x, _ in items]), [None if int(y) == 2 else y for _, y in items]

    first_2 = int(np.flatnonzero(blobs.y.numpy() == 2)[0])
    with pytest.raises(ValueError, match=f"train: examples {first_2}, .* have no label"):
        as_source(DataLoader(Counting(blobs.X, blobs.y), collate_fn=unnamed), "train")

    def broken(items: list) -> tuple:
        raise KeyError("input_ids")

    with pytest.raises(TypeError, match=r"\('input_ids'\); your collate_fn raised it"):
        as_source(DataLoader(Counting(blobs.X, blobs.y), collate_fn=broken), "train")


def test_nested_views_compose_like_tensor_indexing(blobs):
    """Views of views (ranges with steps, reversed, index arrays, empty) select what numpy
    indexing of ``arange(N)`` with the same keys selects."""
    src = as_source((blobs.X, blobs.y), "train")
    ref = np.arange(len(blobs.y))
    outer = [slice(3, 100, 2), slice(None, None, -3), np.array([7, 1, 1, 30]), slice(5, 5)]
    inner = [slice(1, 20, 3), slice(None, None, -1), np.array([0, 1]), slice(0, 0)]
    for a in outer:
        for b in inner:
            want = ref[a]
            if isinstance(b, np.ndarray) and len(want) < 2:
                continue
            want = want[b]
            ka = torch.from_numpy(a) if isinstance(a, np.ndarray) else a
            kb = torch.from_numpy(b) if isinstance(b, np.ndarray) else b
            view = src[ka][kb]
            np.testing.assert_array_equal(view.indices.numpy(), want)
            if len(want):
                rows = torch.from_numpy(want.copy())
                torch.testing.assert_close(view.to("cpu"), blobs.X[rows], rtol=0.0, atol=0.0)


class Augmented(Counting):
    """Random noise on every read: data augmentation left on."""

    def __getitem__(self, i: int):  # noqa: ANN204
        x, y = super().__getitem__(i)
        return x + 0.05 * torch.randn_like(x), y


def test_a_dataset_with_augmentation_left_on_is_refused(blobs, blobs_logreg, failset):
    """Every pass read other examples: on MNIST the causes' precision fell from 0.95 to 0.07,
    below chance, with no word (an outside-in trial)."""
    with pytest.raises(ValueError, match="random transform .data augmentation. is on"):
        netmend.identify(blobs_logreg, Augmented(blobs.X, blobs.y), failset, k=5, **RUN)


def test_a_dataset_changed_in_place_is_refused_before_its_culprits_are_cached(
    tmp_path, blobs, blobs_logreg, failset
):
    """A Dataset's hash was its checking pass's, never taken again: the lazy culprit pass ran
    on the changed data and was saved as the run's, for later runs on the original data."""
    X = blobs.X.clone()
    ds = Counting(X, blobs.y)
    r = netmend.identify(blobs_logreg, ds, failset, k=5, cache_dir=tmp_path, **RUN)
    X.mul_(-1)  # the file rewritten in place
    with pytest.raises(ValueError, match="changed in place after identify"):
        r.culprits(0, 3)
    X.mul_(-1)
    again = netmend.identify(blobs_logreg, Counting(X, blobs.y), failset, k=5,
                             cache_dir=tmp_path, **RUN)  # fmt: skip
    plain = netmend.identify(blobs_logreg, (X, blobs.y), failset, k=5, **RUN)
    np.testing.assert_allclose(again.per_failure, plain.per_failure, rtol=1e-6, atol=1e-9)


def test_culprits_leave_the_global_rng_alone(blobs, blobs_logreg, failset):
    """The lazy per-failure pass ran outside the entry points' RNG guard: a DataLoader with
    workers drew its base seed from the caller's global torch RNG."""
    loader = DataLoader(Counting(blobs.X, blobs.y), batch_size=16, num_workers=1)
    r = netmend.identify(blobs_logreg, loader, failset, k=5, **RUN)
    state = torch.get_rng_state()
    r.culprits(0, 3)
    assert torch.equal(state, torch.get_rng_state())


def test_a_batch_samplers_shuffle_and_a_long_len_are_named(blobs):
    """The refusal named the DataLoader's SequentialSampler, not the RandomSampler inside its
    batch_sampler; a __len__ past the data was numpy's bare IndexError."""
    from torch.utils.data import BatchSampler, RandomSampler

    ds = Counting(blobs.X, blobs.y)
    shuffled = DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 16, False))
    with pytest.raises(ValueError, match=r"shuffles or samples \(RandomSampler\)"):
        as_source(shuffled, "train")

    class Long(Counting):
        def __len__(self) -> int:
            return len(self.y) + 3

    with pytest.raises(ValueError, match="check that __len__ matches the data"):
        as_source(Long(blobs.X, blobs.y), "train")


class PerWorker(Counting):
    """Data behind a handle opened per process, as HDF5 or LMDB files are: read in a worker,
    it must have been reopened there by the DataLoader's worker_init_fn."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(X, y)
        self.open()

    def open(self) -> None:
        self.pid = os.getpid()

    def __getitem__(self, i: int):  # noqa: ANN204
        if self.pid != os.getpid():
            raise RuntimeError("the handle was opened in another process")
        return super().__getitem__(i)


def _reopen(_: int) -> None:
    from torch.utils.data import get_worker_info

    get_worker_info().dataset.open()


def test_a_dataloaders_worker_init_fn_is_kept(blobs, blobs_logreg, failset):
    """netmend built its own DataLoader from collate_fn and num_workers only: the user's
    worker_init_fn was dropped, and a Dataset reopening its file per worker crashed."""
    loader = DataLoader(PerWorker(blobs.X, blobs.y), batch_size=16, num_workers=1,
                        worker_init_fn=_reopen)  # fmt: skip
    got = netmend.identify(blobs_logreg, loader, failset, k=5, **RUN)
    plain = netmend.identify(blobs_logreg, (blobs.X, blobs.y), failset, k=5, **RUN)
    np.testing.assert_array_equal(got.causes, plain.causes)
