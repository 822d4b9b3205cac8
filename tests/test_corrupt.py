"""Seeded label corruptions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netmend.lab.corrupt import PAPER_PAIRS, pair_flips, symmetric_flips, transition_flips

N = 20000


@pytest.fixture
def labels():
    return torch.from_numpy(np.random.default_rng(0).integers(0, 10, N))


def test_pair_flips_paper_pairs(labels):
    original = labels.clone()
    out = pair_flips(labels, seed=0)
    assert torch.equal(labels, original)  # input not mutated
    new, mask = out.labels, out.mask
    assert new.dtype == torch.int64 and mask.dtype == torch.bool and new.shape == labels.shape
    assert torch.equal(mask, new != labels)
    partner = {1: 7, 7: 1, 6: 9, 9: 6}
    for c in range(10):
        sel = labels == c
        changed = new[sel & mask]
        if c in partner:
            assert (changed == partner[c]).all()  # flips only within the pair
            rate = float(mask[sel].float().mean())
            p = PAPER_PAIRS[(1, 7)] if c in (1, 7) else PAPER_PAIRS[(6, 9)]
            n = int(sel.sum())
            assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / n)
        else:
            assert changed.numel() == 0
    assert out.rate == pytest.approx(float(mask.float().mean()))


def test_pair_flips_deterministic_and_numpy_input(labels):
    a = pair_flips(labels, seed=3)
    b = pair_flips(labels.numpy(), seed=3)
    c = pair_flips(labels, seed=4)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.labels, c.labels)
    y_np = labels.numpy().copy()
    pair_flips(y_np, seed=3)
    np.testing.assert_array_equal(y_np, labels.numpy())


def test_pair_flips_custom_pairs_and_bad_probability():
    y = np.array([0, 1, 2, 0, 1, 2] * 1000)
    out = pair_flips(y, {(0, 2): 1.0}, seed=0)
    np.testing.assert_array_equal(out.labels.numpy(), np.where(y == 0, 2, np.where(y == 2, 0, y)))
    assert out.rate == pytest.approx(2 / 3)
    assert pair_flips(y, {(0, 2): 0.0}).rate == 0.0
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        pair_flips(y, {(0, 2): 1.5})


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.6, 1.0])
def test_symmetric_flips(labels, rate):
    original = labels.clone()
    out = symmetric_flips(labels, rate, num_classes=10, seed=1)
    assert torch.equal(labels, original)
    assert torch.equal(out.mask, out.labels != labels)
    assert ((out.labels >= 0) & (out.labels < 10)).all()
    assert abs(out.rate - rate) < 4 * np.sqrt(max(rate * (1 - rate), 1e-12) / N) + 1e-12
    # never flips to the same class: every drawn flip is a change, so the rate is exact in law;
    # and targets are spread uniformly over the 9 other classes
    if rate > 0:
        flipped_from_3 = out.labels[(labels == 3) & out.mask]
        counts = np.bincount(flipped_from_3.numpy(), minlength=10)
        assert counts[3] == 0
        others = counts[np.arange(10) != 3]
        assert others.min() > 0.5 * others.mean()
    again = symmetric_flips(labels, rate, num_classes=10, seed=1)
    assert torch.equal(again.labels, out.labels)


def test_symmetric_flips_rate_one_changes_everything(labels):
    out = symmetric_flips(labels, 1.0, num_classes=10, seed=2)
    assert bool(out.mask.all())


def test_symmetric_flips_bad_rate(labels):
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match=r"rate must lie in \[0, 1\]"):
            symmetric_flips(labels, bad, 10)


def test_transition_flips_matches_T():
    C = 4
    rng = np.random.default_rng(0)
    T = rng.dirichlet(np.ones(C) * 2, size=C)
    T[2] = [0.0, 0.0, 1.0, 0.0]  # a class that never changes
    y = np.repeat(np.arange(C), 10000)
    out = transition_flips(y, T, seed=0)
    new = out.labels.numpy()
    emp = np.array([np.bincount(new[y == i], minlength=C) / 10000 for i in range(C)])
    np.testing.assert_allclose(emp, T, atol=0.02)
    assert (new[y == 2] == 2).all()
    np.testing.assert_array_equal(out.mask.numpy(), new != y)
    again = transition_flips(torch.from_numpy(y), T, seed=0)
    assert torch.equal(again.labels, out.labels)
    assert not torch.equal(transition_flips(y, T, seed=1).labels, out.labels)
    # identity T changes nothing
    assert transition_flips(y, np.eye(C)).rate == 0.0


@pytest.mark.parametrize(
    "T, match",
    [
        (np.ones((2, 3)) / 3, "square"),
        (np.ones(4) / 4, "square"),
        (np.array([[0.5, 0.6], [0.5, 0.5]]), "row-stochastic"),
        (np.array([[1.5, -0.5], [0.5, 0.5]]), "row-stochastic"),
    ],
)
def test_transition_flips_invalid_T(T, match):
    with pytest.raises(ValueError, match=match):
        transition_flips(np.array([0, 1]), T)


def test_transition_flips_labels_out_of_range():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        transition_flips(np.array([0, 2]), np.eye(2))
