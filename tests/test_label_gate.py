"""The label gate of the automatic causes (:mod:`netmend.identification.label_gate`): when most
of the causes are examples the model does not predict the given label of, only those are kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import netmend
from netmend.identification.label_gate import GATE_SHARE, label_gate
from netmend.lab.models import MLP
from netmend.model.training import TrainConfig, fit, predict


def test_gate_keeps_the_disagreeing_causes_in_order_when_they_are_most_of_them() -> None:
    causes = np.array([9, 4, 7, 1, 3])
    labels = np.array([0, 1, 2, 0, 1])
    pred = np.array([1, 1, 0, 2, 1])  # disagrees on causes 9, 7, 1: 3 of 5
    kept, info = label_gate(causes, pred, labels)
    assert kept.tolist() == [9, 7, 1]
    assert info == {
        "candidates": 3, "of": 5, "share": 0.6, "applied": True, "threshold": GATE_SHARE
    }  # fmt: skip


def test_gate_keeps_every_cause_when_the_model_believes_most_of_their_labels() -> None:
    """A backdoor's or a subgroup's causes are learned, not mislabelled: gating them would
    throw the diagnosis away."""
    causes = np.array([5, 6, 2, 8, 1])
    labels = torch.tensor([3, 3, 3, 3, 3])
    pred = torch.tensor([3, 0, 3, 3, 3])  # 1 of 5 disagree: below the gate's share
    assert GATE_SHARE > 1 / 5
    kept, info = label_gate(causes, pred, labels)
    assert kept.tolist() == causes.tolist()
    assert not info["applied"] and info["candidates"] == 1


def test_gate_threshold_is_inclusive_and_empty_causes_pass_through() -> None:
    causes = np.arange(4)
    kept, info = label_gate(causes, np.array([1, 1, 0, 0]), np.array([0, 0, 0, 0]), share=0.5)
    assert info["share"] == 0.5 and kept.tolist() == [0, 1]
    kept, info = label_gate(causes, np.array([1, 0, 0, 0]), np.zeros(4, int), share=0.3)
    assert kept.tolist() == causes.tolist()  # 0.25 < 0.3
    kept, info = label_gate(np.zeros(0, np.int64), np.zeros(0, int), np.zeros(0, int))
    assert kept.size == 0 and not info["applied"]


def test_gate_refuses_predictions_that_do_not_match_the_causes() -> None:
    with pytest.raises(ValueError, match="one prediction and one label per cause"):
        label_gate(np.arange(3), np.zeros(2, int), np.zeros(3, int))


@pytest.fixture(scope="module")
def pair_noise():
    """Three 2-d classes; a third of class 0 labelled 1; an MLP trained on the noisy labels,
    and the clean test points it gets wrong as failures."""
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [2.5, 0.0], [1.25, 2.5]], dtype=torch.float64)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(3).repeat_interleave(n)
        return centers[y] + torch.randn(3 * n, 2, generator=g, dtype=torch.float64), y

    (X, y), (Xt, yt) = draw(150), draw(200)
    noisy = y.clone()
    flipped = torch.nonzero(y == 0).flatten()[torch.randperm(150, generator=g)[:50]]
    noisy[flipped] = 1
    torch.manual_seed(0)
    recipe = TrainConfig(epochs=30, batch_size=32)
    model = fit(MLP(2, 3, hidden=(16,)).double(), X, noisy, recipe, 0, "cpu", False).eval()
    wrong = predict(model, Xt) != yt
    return model, (X, noisy), (Xt[wrong], yt[wrong]), flipped.numpy()


def test_identify_gates_the_automatic_causes_and_not_an_explicit_k(pair_noise) -> None:
    model, (X, y), fails, flipped = pair_noise
    kw = dict(device="cpu", progress=False)
    plain = netmend.identify(model, (X, y), fails, gate=False, **kw)
    gated = netmend.identify(model, (X, y), fails, **kw)
    assert "label_gate" not in plain.info
    np.testing.assert_array_equal(gated.scores, plain.scores)
    c = torch.from_numpy(plain.causes)
    expected, info = label_gate(plain.causes, predict(model, X[c]), y[c])
    np.testing.assert_array_equal(gated.causes, expected)
    assert gated.info["label_gate"] == info
    assert info["applied"] and 0 < gated.causes.size < plain.causes.size
    # what the gate drops are correctly labelled examples: precision rises
    assert np.isin(gated.causes, flipped).mean() > np.isin(plain.causes, flipped).mean()

    top = netmend.identify(model, (X, y), fails, k=10, **kw)
    assert "label_gate" not in top.info and top.causes.size == 10
    forced = netmend.identify(model, (X, y), fails, k=10, gate=True, **kw)
    c = torch.from_numpy(top.causes)
    expected, _ = label_gate(top.causes, predict(model, X[c]), y[c])
    np.testing.assert_array_equal(forced.causes, expected)


def test_repair_passes_the_gate_through(pair_noise) -> None:
    model, train, fails, _ = pair_noise
    kw = dict(device="cpu", progress=False, guard=False, train_config=TrainConfig(epochs=1))
    on = netmend.repair(model, train, fails, **kw)
    off = netmend.repair(model, train, fails, gate=False, **kw)
    assert on.identification.info["label_gate"]["applied"]
    assert "label_gate" not in off.identification.info
    assert on.causes.size < off.causes.size


class _Lookup(torch.nn.Module):
    """A 'model' whose input is an example's index and whose logits put all mass on a fixed
    predicted class per index: the gate's forward pass made explicit."""

    def __init__(self, predicted: torch.Tensor, classes: int) -> None:
        super().__init__()
        self.register_buffer("table", torch.eye(classes)[predicted] * 10.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0].long()]


def test_fill_gate_keeps_k_with_the_next_disagreeing_causes_by_score() -> None:
    """Brute force: the filled set is the top-K of the examples with a positive score whose
    label the model does not predict, K = the automatic causes' count."""
    from netmend.identification.label_gate import fill_gate

    rng = np.random.default_rng(0)
    n, c = 300, 3
    labels = torch.from_numpy(rng.integers(0, c, n))
    predicted = labels.clone()
    flip = rng.random(n) < 0.4
    predicted[torch.from_numpy(flip)] = (labels[torch.from_numpy(flip)] + 1) % c
    scores = rng.normal(size=n)
    causes = np.argsort(-scores, kind="stable")[:40]
    X = torch.arange(n, dtype=torch.float32)[:, None]
    model = _Lookup(predicted, c)
    kept, info = fill_gate(model, X, labels, scores, causes, share=0.3)
    disagree = (predicted != labels).numpy()
    assert info["applied"] and info["candidates"] == int(disagree[causes].sum())
    ranked = [i for i in np.argsort(-scores, kind="stable") if scores[i] > 0 and disagree[i]]
    assert kept.tolist() == ranked[:40]
    assert info["filled"] == 40 - info["candidates"]
    # the positive scores run out: fewer than K, never an example with r <= 0
    top = np.argsort(-scores, kind="stable")[: int(0.7 * (scores > 0).sum())]
    short, info2 = fill_gate(model, X, labels, scores, top, share=0.3)
    assert len(ranked) < top.size and info2["scanned"] == (scores > 0).sum() - top.size
    assert short.tolist() == ranked
    # not applied (a believed cause set): the causes come back unchanged
    agree = np.flatnonzero(~disagree)[:40]
    same, info3 = fill_gate(model, X, labels, scores, agree, share=0.3)
    assert same.tolist() == agree.tolist() and info3["filled"] == 0


def test_identify_refuses_an_unknown_gate() -> None:
    X = torch.randn(20, 2)
    y = torch.arange(20) % 2
    with pytest.raises(ValueError, match="gate must be"):
        netmend.identify(MLP(2, 2, (4,)), (X, y), (X[:2], 1 - y[:2]), gate="yes", progress=False)


def test_balance_gate_adds_the_reverse_errors_of_each_direction_by_score() -> None:
    """Brute force: for each direction g -> p of the kept causes (c of them), the c
    highest-scoring non-causes labelled p that the model calls g are added; nothing else."""
    from netmend.identification.label_gate import balance_gate

    rng = np.random.default_rng(1)
    n, c = 400, 4
    labels = torch.from_numpy(rng.integers(0, c, n))
    predicted = labels.clone()
    flip = torch.from_numpy(rng.random(n) < 0.3)
    predicted[flip] = (labels[flip] + torch.from_numpy(rng.integers(1, c, n))[flip]) % c
    scores = rng.normal(size=n)
    causes = np.argsort(-scores, kind="stable")[:60]
    X = torch.arange(n, dtype=torch.float32)[:, None]
    model = _Lookup(predicted, c)
    out, info = balance_gate(model, X, labels, scores, causes, share=0.3, min_direction_share=0)
    y, p = labels.numpy(), predicted.numpy()
    kept = [i for i in causes if p[i] != y[i]]
    partners = {}
    for g in range(c):
        for q in range(c):
            rev = [i for i in range(n) if y[i] == q and p[i] == g and i not in set(causes)]
            partners[(g, q)] = sorted(rev, key=lambda i: -scores[i])
    expect = []
    for i in kept:  # each kept cause, then the next unused partner of its reverse direction
        expect.append(i)
        if partners[(y[i], p[i])]:
            expect.append(partners[(y[i], p[i])].pop(0))
    assert info["applied"] and out.tolist() == expect
    # every prefix of whole pairs is balanced: as many g -> q as q -> g of each pair
    paired = next(m for m in range(len(expect) // 2 + 1)
                  if m == len(expect) // 2 or expect[2 * m + 1] in kept)  # fmt: skip
    assert paired >= 10  # the check below reads at least ten prefixes
    for j in range(2, 2 * paired + 1, 2):
        pre = expect[:j]
        for g in range(c):
            for q in range(g + 1, c):
                fwd = sum(1 for i in pre if y[i] == g and p[i] == q)
                back = sum(1 for i in pre if y[i] == q and p[i] == g)
                assert fwd == back
    assert info["balanced"] == len(expect) - len(kept) > 0
    # each side of every pair loses as many label errors as it can: counts per direction
    for g, q, k, added in info["directions"]:
        assert k == sum(1 for i in kept if y[i] == g and p[i] == q) and added <= k
    # not applied (a believed cause set): unchanged, nothing added
    agree = np.flatnonzero(p == y)[:40]
    same, info2 = balance_gate(model, X, labels, scores, agree, share=0.3)
    assert same.tolist() == agree.tolist() and info2["balanced"] == 0
    # only directions taking >= min_direction_share of their class are balanced: at 4% of
    # ~100 examples per class, the directions with 4 or more kept causes
    size = np.bincount(y)
    some, info3 = balance_gate(
        model, X, labels, scores, causes, share=0.3, min_direction_share=0.04
    )
    big = {(g, q) for g, q, k, _ in info["directions"] if k >= 0.04 * size[g]}
    assert 0 < len(big) < len(info["directions"])
    assert [d[3] > 0 for d in info3["directions"]] == [
        (g, q) in big and added > 0 for g, q, _, added in info["directions"]
    ]
    assert set(some) == set(kept) | {i for i in out if i not in kept and (p[i], y[i]) in big}
    # with no direction that large, the causes are the plain gate's
    none, info4 = balance_gate(model, X, labels, scores, causes, share=0.3, min_direction_share=1)
    assert none.tolist() == kept and info4["balanced"] == 0


def test_all_gate_removes_every_disagreeing_example_by_score_once_the_gate_applies() -> None:
    """Brute force: applied, the causes are all examples whose label the model does not
    predict (any score, any class), most harmful first; not applied, the causes unchanged."""
    from netmend.identification.label_gate import all_gate

    rng = np.random.default_rng(2)
    n, c = 300, 3
    labels = torch.from_numpy(rng.integers(0, c, n))
    predicted = labels.clone()
    flip = torch.from_numpy(rng.random(n) < 0.2)
    predicted[flip] = (labels[flip] + 1) % c
    scores = rng.normal(size=n)
    disagree = (predicted != labels).numpy()
    ranked = np.argsort(-scores, kind="stable")
    causes = np.concatenate([ranked[disagree[ranked]][:12], ranked[~disagree[ranked]][:8]])
    X = torch.arange(n, dtype=torch.float32)[:, None]
    model = _Lookup(predicted, c)
    out, info = all_gate(model, X, labels, scores, causes, share=0.3)
    expect = sorted(np.flatnonzero(disagree).tolist(), key=lambda i: -scores[i])
    assert info["applied"] and info["candidates"] == 12 and out.tolist() == expect
    assert info["added"] == int(disagree.sum()) - 12 > 0
    assert (scores[out] <= 0).any()  # failure-blind in which examples, not only r > 0
    agree = np.flatnonzero(~disagree)[:20]
    same, info2 = all_gate(model, X, labels, scores, agree, share=0.3)
    assert same.tolist() == agree.tolist() and not info2["applied"] and info2["added"] == 0


def test_identify_all_gate_takes_every_disagreeing_training_example(pair_noise) -> None:
    model, (X, y), fails, _ = pair_noise
    kw = dict(device="cpu", progress=False)
    gated = netmend.identify(model, (X, y), fails, **kw)
    every = netmend.identify(model, (X, y), fails, gate="all", **kw)
    np.testing.assert_array_equal(every.scores, gated.scores)
    wrong = np.flatnonzero((predict(model, X) != y).numpy())
    assert sorted(every.causes.tolist()) == wrong.tolist()
    assert np.all(np.diff(every.scores[every.causes]) <= 0)  # most harmful first
    assert set(gated.causes) < set(every.causes)
    assert every.info["label_gate"]["added"] == wrong.size - gated.causes.size


def test_the_automatic_k_shows_one_bar_for_its_six_scorings(pair_noise, capfd) -> None:
    """The six half-failure scorings run with their own bars off; the automatic K has one."""
    model, train, fails, _ = pair_noise
    netmend.identify(model, train, fails, device="cpu", progress=True)
    err = capfd.readouterr().err
    assert "automatic K: scoring halves" in err and "/6 " in err
    netmend.identify(model, train, fails, device="cpu", progress=False)
    assert "automatic K" not in capfd.readouterr().err
