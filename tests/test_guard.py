"""The class guard of the automatic K (:mod:`netmend.treatment.guard`): it halves K while a
trial fine-tune, measured on a held-out slice of the training set, loses a class."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import netmend
from netmend.data.source import as_source
from netmend.treatment import guard


class Rule(nn.Module):
    """Predicts the class written in the input's only feature; with ``collapse``, class 0 is
    predicted as class 1 (a fine-tune that forgot class 0)."""

    def __init__(self, collapse: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.collapse = collapse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x[:, 0].long()
        if self.collapse:
            c = torch.where(c == 0, torch.ones_like(c), c)
        return nn.functional.one_hot(c, 3).to(x.dtype) + 0 * self.w


def _train(per_class: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(3).repeat_interleave(per_class)
    return y[:, None].double(), y


def test_holdout_slice_is_stratified_seeded_and_leaves_out_small_classes() -> None:
    y = torch.cat([torch.zeros(2000), torch.ones(2000), torch.full((400,), 2)]).long()
    idx, classes = guard.holdout_slice(y, seed=3)
    assert classes == [0, 1]  # 5% of 400 = 20 < 50 examples: class 2 is not judged
    counts = np.bincount(y[idx].numpy(), minlength=3)
    assert counts.tolist() == [100, 100, 0]
    assert np.array_equal(idx, guard.holdout_slice(y, seed=3)[0])
    assert not np.array_equal(idx, guard.holdout_slice(y, seed=4)[0])
    state = torch.get_rng_state()
    guard.holdout_slice(y, seed=5)
    assert torch.equal(state, torch.get_rng_state())


def test_guard_halves_k_until_no_class_collapses_and_holds_the_slice_out() -> None:
    X, y = _train()
    train = as_source((X, y), "train")
    val, _ = guard.holdout_slice(y, seed=0)
    causes = np.arange(6000)[::-1][:1000].copy()  # any ranked set, most harmful first
    seen: list[np.ndarray] = []

    def treat_fn(c: np.ndarray) -> nn.Module:
        seen.append(c)
        removed = np.setdiff1d(c, val).size
        return Rule(collapse=removed > 300)  # removing more than 300 forgets class 0

    g = guard.guard_k(treat_fn, Rule(), train, causes, seed=0, device="cpu")
    assert [t["k"] for t in g.tries] == [1000, 500, 250]
    assert g.k == 250 and g.passed and g.skipped is None
    assert [t["worst_class"] for t in g.tries] == [0, 0, 0]
    assert g.tries[0]["worst_class_drop"] == pytest.approx(1.0)
    assert g.tries[-1]["worst_class_drop"] == pytest.approx(0.0)
    for c, t in zip(seen, g.tries, strict=True):
        assert np.isin(val, c).all()  # the slice is never fine-tuned on
        assert np.array_equal(np.setdiff1d(c, val), np.setdiff1d(causes[: t["k"]], val))


def test_guard_keeps_the_smallest_k_and_says_so_when_every_halving_fails() -> None:
    X, y = _train()
    with pytest.warns(UserWarning, match="class guard halved K from 64 to 8"):
        g = guard.guard_k(
            lambda c: Rule(collapse=True), Rule(), as_source((X, y), "t"), np.arange(64), 0, "cpu"
        )
    assert not g.passed and g.k == 8 and len(g.tries) == guard.MAX_HALVINGS + 1


def test_guard_is_skipped_when_no_class_can_be_judged() -> None:
    X, y = _train(per_class=300)  # 5% = 15 per class
    calls: list[np.ndarray] = []
    g = guard.guard_k(calls.append, Rule(), as_source((X, y), "t"), np.arange(10), 0, "cpu")  # type: ignore[arg-type]
    assert g.skipped and g.k == 10 and not calls


def test_repair_default_guard_on_small_data_changes_nothing(blobs, blobs_logreg) -> None:
    """On a set too small to judge a class, the default repair is the unguarded one."""
    data, failures = (blobs.X, blobs.y), (blobs.Xf, blobs.yf)
    a = netmend.repair(blobs_logreg, data, failures, seed=0, progress=False)
    b = netmend.repair(blobs_logreg, data, failures, seed=0, progress=False, guard=False)
    assert a.treatment_info["guard"]["skipped"]
    assert np.array_equal(a.causes, b.causes)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_repair_with_k_auto_guards_as_the_default_k_does(blobs, blobs_logreg) -> None:
    """k="auto" is the automatic K: the guard (and the gate) run as with k=None."""
    data, failures = (blobs.X, blobs.y), (blobs.Xf, blobs.yf)
    a = netmend.repair(blobs_logreg, data, failures, seed=0, progress=False)
    b = netmend.repair(blobs_logreg, data, failures, seed=0, progress=False, k="auto")
    assert b.treatment_info["guard"] == a.treatment_info["guard"]
    assert b.treatment_info["guard"] is not None
    assert np.array_equal(a.causes, b.causes)


def test_guard_refuses_other_treatments(blobs, blobs_logreg) -> None:
    data, failures = (blobs.X, blobs.y), (blobs.Xf, blobs.yf)
    with pytest.raises(ValueError, match="finetune"):
        netmend.repair(blobs_logreg, data, failures, treat="relabel", guard=True, progress=False)
