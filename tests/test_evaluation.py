"""The evaluation protocol: failure split, accuracies, identification metrics (hand-computed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from netmend.evaluation import FailureSplit, accuracies, identification_metrics, split_failures


@pytest.fixture
def fixed():
    """A parameter-free 'model' whose logits are its inputs; 21 inputs, known predictions."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(21, 3, generator=g, dtype=torch.float64)
    pred = X.argmax(1)
    y = pred.clone()
    wrong = torch.tensor([1, 4, 5, 9, 10, 13, 17, 20])
    y[wrong] = (pred[wrong] + 1) % 3
    return nn.Identity(), X, y, wrong.numpy()


def test_split_failures_partition(fixed):
    model, X, y, wrong = fixed
    s = split_failures(model, X, y, seed=0)
    assert isinstance(s, FailureSplit)
    assert len(np.intersect1d(s.query, s.heldout)) == 0
    np.testing.assert_array_equal(s.failures, wrong)
    np.testing.assert_array_equal(np.sort(np.r_[s.query, s.heldout]), wrong)
    np.testing.assert_array_equal(s.correct, np.setdiff1d(np.arange(21), wrong))
    assert len(s.query) == 4 and len(s.heldout) == 4
    assert (np.diff(s.query) > 0).all() and (np.diff(s.heldout) > 0).all()
    # deterministic by seed; another seed gives another split of the same failures
    t = split_failures(model, X, y, seed=0)
    np.testing.assert_array_equal(s.query, t.query)
    others = [split_failures(model, X, y, seed=k).query for k in range(1, 6)]
    assert any(not np.array_equal(o, s.query) for o in others)
    # fractions round and keep both halves non-empty
    assert len(split_failures(model, X, y, query_fraction=0.25).query) == 2
    assert len(split_failures(model, X, y, query_fraction=0.01).query) == 1
    assert len(split_failures(model, X, y, query_fraction=0.99).heldout) == 1


def test_split_failures_errors(fixed):
    model, X, y, wrong = fixed
    for q in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="query_fraction"):
            split_failures(model, X, y, query_fraction=q)
    y_one = X.argmax(1)
    y_one[3] = (y_one[3] + 1) % 3
    with pytest.raises(ValueError, match="misclassifies 1 test example"):
        split_failures(model, X, y_one)
    # a model in train mode with dropout drew another "split" at every call, with examples
    # it gets right among the failures (an outside-in trial); refused as repair refuses it
    noisy = nn.Sequential(nn.Identity(), nn.Dropout(0.5)).train()
    with pytest.raises(ValueError, match=r"train mode.*model\.eval\(\)"):
        split_failures(noisy, X, y)
    with pytest.raises(ValueError, match="out of range for an Embedding"):
        split_failures(nn.Sequential(nn.Embedding(5, 3), nn.Flatten()), torch.tensor([[7]]),
                       torch.tensor([0]))  # fmt: skip


def test_split_failures_reads_any_test_set(fixed):
    """(X, y) only: a DataLoader of dict batches was "not subscriptable"."""
    from torch.utils.data import DataLoader

    model, X, y, wrong = fixed
    items = [{"x": X[i], "labels": y[i]} for i in range(len(y))]

    class Dicts(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # called as model(**inputs)
            return x

    loader = DataLoader(items, batch_size=4)  # default collate: a dict of stacked tensors
    s = split_failures(Dicts(), loader, seed=0)
    np.testing.assert_array_equal(s.failures, wrong)
    np.testing.assert_array_equal(s.query, split_failures(model, X, y, seed=0).query)


def test_accuracies(fixed):
    model, X, y, wrong = fixed
    s = split_failures(model, X, y, seed=1)
    out = accuracies(model, X, y, s)
    assert out == {
        "test_acc": pytest.approx(13 / 21),
        "query_failure_acc": 0.0,
        "heldout_failure_acc": 0.0,
        "correct_acc": 1.0,
    }
    # a "repaired" model: fixes exactly one held-out failure
    y2 = y.clone()
    y2[s.heldout[0]] = X[s.heldout[0]].argmax()
    out2 = accuracies(model, X, y2, s)
    assert out2["heldout_failure_acc"] == pytest.approx(1 / len(s.heldout))
    assert out2["query_failure_acc"] == 0.0


SCORES = np.array([0.9, 0.8, -0.1, 0.5, 0.2, -0.3])
MASK = np.array([True, False, True, False, False, False])
PER_FAILURE = np.array(
    [
        [0.1, 1.0],
        [0.9, -1.0],
        [0.8, 0.5],
        [0.0, 0.2],
        [-1.0, 0.3],
        [0.3, 0.4],
    ]
)


def test_identification_metrics_hand_computed():
    out = identification_metrics(SCORES, np.array([0, 1, 3]), MASK, PER_FAILURE, n_culprits=2)
    assert out["k"] == 3
    assert out["precision"] == pytest.approx(1 / 3)
    assert out["recall"] == pytest.approx(1 / 2)
    # positives {0.9, -0.1} vs negatives {0.8, 0.5, 0.2, -0.3}: 4 + 1 of 8 pairs ordered right
    assert out["auroc"] == pytest.approx(5 / 8)
    assert out["precision_at_true_k"] == pytest.approx(1 / 2)  # top-2 = {0, 1}
    # failure 0 top-2 {1, 2} -> 1 of 2 corrupted; failure 1 top-2 {0, 2} -> 2 of 2
    assert out["culprit_precision_at_5"] == pytest.approx(3 / 4)
    # torch masks are accepted
    out_t = identification_metrics(SCORES, np.array([0, 1, 3]), torch.from_numpy(MASK))
    assert out_t["auroc"] == pytest.approx(5 / 8) and "culprit_precision_at_5" not in out_t


def test_identification_metrics_edge_cases():
    none = identification_metrics(SCORES, np.array([], dtype=np.int64), MASK)
    assert none["k"] == 0 and math.isnan(none["precision"]) and none["recall"] == 0.0
    clean = identification_metrics(SCORES, np.array([0]), np.zeros(6, bool))
    assert math.isnan(clean["recall"]) and math.isnan(clean["auroc"])
    assert math.isnan(clean["precision_at_true_k"]) and clean["precision"] == 0.0
    top_two = np.array([True, True, False, False, False, False])  # the two highest scores
    perfect = identification_metrics(SCORES, np.array([0, 2]), top_two)
    assert perfect["auroc"] == 1.0 and perfect["precision_at_true_k"] == 1.0


def test_culprit_precision_with_exactly_n_culprits_examples():
    out = identification_metrics(SCORES[:5], np.array([0]), MASK[:5], PER_FAILURE[:5], n_culprits=5)
    assert out["culprit_precision_at_5"] == pytest.approx(2 / 5)


def test_culprit_precision_with_fewer_examples_than_n_culprits():
    """Every example is a culprit of every failure: the precision is the corrupted share."""
    out = identification_metrics(SCORES, np.array([0]), MASK, PER_FAILURE, n_culprits=10)
    assert out["culprit_precision_at_5"] == pytest.approx(2 / 6)
    # n_culprits = 1: failure 0's top culprit is example 1 (clean), failure 1's is 0 (corrupted)
    one = identification_metrics(SCORES, np.array([0]), MASK, PER_FAILURE, n_culprits=1)
    assert one["culprit_precision_at_5"] == pytest.approx(1 / 2)
