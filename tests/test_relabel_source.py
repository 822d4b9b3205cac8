"""Label sources of "relabel" and "align": k-NN vote, theta_+F, delete-then-relabel."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import netmend
from netmend import TrainConfig
from netmend.lab.models import MLP
from netmend.model.training import fit, logits
from netmend.treatment.labels import knn_votes
from netmend.treatment.methods import finetune_recipe

DT = torch.float64
RUN = dict(progress=False, device="cpu")
CFG = TrainConfig(epochs=2.0, batch_size=32, lr=0.05)
DELETE: dict = {}  # "finetune" at its default: relabel's fine-tune uses the same recipe


def FT(n_train: int, n: int) -> TrainConfig:
    """The fine-tune recipe of "relabel" on ``n`` of ``n_train`` examples ("finetune"'s)."""
    return finetune_recipe(CFG, n_train, n)


def _brute_votes(E: torch.Tensor, y: torch.Tensor, rows, k: int, classes: int) -> torch.Tensor:
    """Label shares among the k nearest other rows, one example at a time."""
    out = torch.zeros(len(rows), classes, dtype=DT)
    for i, r in enumerate(rows):
        d = [(float(((E[r] - E[j]) ** 2).sum()), j) for j in range(E.shape[0]) if j != r]
        for _, j in sorted(d)[:k]:
            out[i, int(y[j])] += 1.0 / k
    return out


@pytest.fixture(scope="module")
def planted() -> SimpleNamespace:
    """Three 8-D Gaussian classes, 50 points each; 8 scattered class-0 points labelled 1, which
    an MLP trained to zero training error memorises. Causes: the 8 flipped points and 5 clean
    ones; failures: class-0 test points with their correct label."""
    g = torch.Generator().manual_seed(0)
    centres = 3.0 * torch.eye(3, 8, dtype=DT)
    X = torch.cat([c + torch.randn(50, 8, generator=g, dtype=DT) for c in centres])
    true = torch.arange(3).repeat_interleave(50)
    y = true.clone()
    flipped = torch.randperm(50, generator=g)[:8]
    y[flipped] = 1
    Xf = centres[0] + torch.randn(10, 8, generator=g, dtype=DT)
    torch.manual_seed(0)
    model = fit(MLP(8, 3, hidden=(32,)).double(), X, y, TrainConfig(300, 32, 0.01), 0, "cpu", False)
    causes = torch.cat([flipped, torch.tensor([5, 60, 70, 110, 120])]).unique()
    return SimpleNamespace(
        X=X, y=y, true=true, flipped=flipped, model=model, causes=causes, Xf=Xf, yf=true[:10]
    )


def _embed(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """The input of the MLP's last layer, by hand."""
    with torch.no_grad():
        return model.net[:-1](X)


def _treat(p, method: str, record: dict | None = None, **opts) -> nn.Module:
    return netmend.treat(
        p.model,
        (p.X, p.y),
        p.causes,
        method,
        failures=(p.Xf, p.yf),
        train_config=CFG,
        record=record,
        **RUN,
        **opts,
    )


# ----------------------------------------------------------------------------- the k-NN vote


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_knn_votes_match_brute_force(chunk_size):
    g = torch.Generator().manual_seed(4)
    E = torch.randn(40, 3, generator=g, dtype=DT)
    y = torch.randint(0, 4, (40,), generator=g)
    rows = torch.tensor([0, 3, 17, 39, 22])
    votes = knn_votes(E, y, rows, 5, 4, chunk_size=chunk_size)
    torch.testing.assert_close(votes, _brute_votes(E, y, rows.tolist(), 5, 4), rtol=0, atol=1e-12)
    # the row's own label never votes: a row among 1-NN pairs votes for its partner only
    E2 = torch.tensor([[0.0], [0.1], [5.0], [5.2]], dtype=DT)
    y2 = torch.tensor([0, 1, 2, 0])
    v2 = knn_votes(E2, y2, torch.arange(4), 1, 3, chunk_size=chunk_size)
    torch.testing.assert_close(v2.argmax(1), torch.tensor([1, 0, 0, 2]))


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_knn_votes_break_ties_by_index_on_integer_inputs(chunk_size):
    """Raw pixel values tie often: the lower training index wins, whatever the block size,
    and integer embeddings give what their floating copy gives."""
    g = torch.Generator().manual_seed(5)
    E = torch.randint(0, 3, (30, 2), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (30,), generator=g)
    rows = torch.arange(0, 30, 4)
    votes = knn_votes(E, y, rows, 6, 3, chunk_size=chunk_size, dtype=DT)
    ref = _brute_votes(E.to(DT), y, rows.tolist(), 6, 3)
    torch.testing.assert_close(votes, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(knn_votes(E.to(DT), y, rows, 6, 3, chunk_size=chunk_size), votes)


def test_knn_recovers_memorised_flips_where_theta_plus_f_does_not(planted):
    p = planted
    assert bool((logits(p.model, p.X[p.flipped]).argmax(1) == 1).all()), "flips not memorised"
    is_flip = torch.isin(p.causes, p.flipped)
    fixed, kept = {}, {}
    for source in ("theta_plus_f", "knn"):
        rec: dict = {}
        _treat(p, "relabel", rec, source=source, neighbours=10)
        new = rec["new_labels"]
        fixed[source] = float((new[is_flip] == p.true[p.causes][is_flip]).double().mean())
        kept[source] = float((new[~is_flip] == p.y[p.causes][~is_flip]).double().mean())
        assert rec["source"] == source
        assert rec["n_relabelled"] + rec["n_kept"] + rec["n_dropped"] == len(p.causes)
    assert fixed["knn"] >= 0.75 and kept["knn"] == 1.0, (fixed, kept)
    assert fixed["theta_plus_f"] <= 0.25, (fixed, kept)


def test_knn_relabel_is_fit_on_the_neighbours_vote(ref, planted):
    p = planted
    E = _embed(p.model, p.X)
    votes = _brute_votes(E, p.y, p.causes.tolist(), 10, 3)
    for hard in (True, False):
        rec: dict = {}
        new = _treat(p, "relabel", rec, neighbours=10, hard=hard)  # "knn" is the default
        assert rec["source"] == "knn"
        torch.testing.assert_close(rec["confidence"], votes.max(1).values, rtol=0, atol=1e-12)
        torch.testing.assert_close(rec["new_labels"], votes.argmax(1))
        changed = votes.argmax(1) != p.y[p.causes]
        torch.testing.assert_close(rec["changed"], changed)
        assert rec["n_kept"] == int((~changed).sum()) and rec["n_dropped"] == 0
        if hard:
            T = p.y.clone()
            T[p.causes] = votes.argmax(1)
        else:
            torch.testing.assert_close(rec["soft_labels"], votes, rtol=0, atol=1e-12)
            T = torch.eye(3, dtype=DT)[p.y]
            T[p.causes] = rec["soft_labels"]
        expected = fit(copy.deepcopy(p.model), p.X, T, FT(len(p.X), len(p.X)), 0, "cpu", False)
        torch.testing.assert_close(
            ref.flat_params(new), ref.flat_params(expected), rtol=1e-10, atol=1e-12
        )
    # the embedding option: flattened inputs
    rec_in: dict = {}
    _treat(p, "relabel", rec_in, neighbours=10, embed="input")
    votes_in = _brute_votes(p.X, p.y, p.causes.tolist(), 10, 3)
    torch.testing.assert_close(rec_in["new_labels"], votes_in.argmax(1))


def test_knn_relabel_needs_no_failures(ref, planted):
    p = planted
    a = netmend.treat(p.model, (p.X, p.y), p.causes, "relabel", train_config=CFG, **RUN)
    b = _treat(p, "relabel")
    torch.testing.assert_close(ref.flat_params(a), ref.flat_params(b), rtol=1e-10, atol=1e-12)


def test_min_confidence_drops_the_unsure_causes(ref, planted):
    p = planted
    rec: dict = {}
    new = _treat(p, "relabel", rec, neighbours=10, min_confidence=0.85)
    votes = _brute_votes(_embed(p.model, p.X), p.y, p.causes.tolist(), 10, 3)
    dropped = votes.max(1).values < 0.85
    assert 0 < int(dropped.sum()) < len(p.causes), "the test needs both kinds of cause"
    torch.testing.assert_close(rec["dropped"], dropped)
    assert rec["n_dropped"] == int(dropped.sum())
    assert not bool((rec["changed"] & dropped).any())
    T = p.y.clone()
    T[p.causes] = votes.argmax(1)
    train = torch.ones(len(p.y), dtype=torch.bool)
    train[p.causes[dropped]] = False
    expected = fit(
        copy.deepcopy(p.model),
        p.X[train],
        T[train],
        FT(len(p.X), int(train.sum())),
        0,
        "cpu",
        False,
    )
    torch.testing.assert_close(
        ref.flat_params(new), ref.flat_params(expected), rtol=1e-10, atol=1e-12
    )


def test_dropping_every_cause_is_deletion(ref, planted):
    """theta_+F's soft predictions are never exactly certain: min_confidence=1 drops every
    cause, and relabelling becomes the "finetune" treatment (fine-tune on D minus C)."""
    p = planted
    rec: dict = {}
    new = _treat(p, "relabel", rec, source="theta_plus_f", min_confidence=1.0)
    assert rec["n_dropped"] == len(p.causes)
    deleted = _treat(p, "finetune", **DELETE)
    torch.testing.assert_close(
        ref.flat_params(new), ref.flat_params(deleted), rtol=1e-10, atol=1e-12
    )


def test_deletion_source_asks_the_model_fine_tuned_without_the_causes(planted):
    p = planted
    deleted = _treat(p, "finetune", **DELETE)
    z = logits(deleted, p.X[p.causes])
    rec: dict = {}
    _treat(p, "relabel", rec, source="deletion", hard=False, temperature=2.0)
    torch.testing.assert_close(rec["soft_labels"], torch.softmax(z / 2.0, 1), rtol=0, atol=1e-14)
    torch.testing.assert_close(rec["new_labels"], z.argmax(1))


def test_align_takes_its_labels_from_the_chosen_source(ref, planted):
    p = planted
    votes = _brute_votes(_embed(p.model, p.X), p.y, p.causes.tolist(), 10, 3)
    rec: dict = {}
    new = _treat(p, "align", rec, source="knn", neighbours=10, min_confidence=0.85)
    assert rec["source"] == "knn"
    torch.testing.assert_close(rec["soft_labels"], votes, rtol=0, atol=1e-12)
    torch.testing.assert_close(rec["label_after"], votes.argmax(1))
    used = votes.max(1).values >= 0.85
    torch.testing.assert_close(rec["dropped"], ~used)
    assert 0 < int(used.sum()) < len(p.causes)
    keep = torch.ones(len(p.y), dtype=torch.bool)
    keep[p.causes] = False
    X = torch.cat([p.X[keep], rec["aligned"][used]])
    T = torch.cat([torch.eye(3, dtype=DT)[p.y[keep]], votes[used]])
    model = copy.deepcopy(p.model)
    for name, q in model.named_parameters():
        q.requires_grad_(name.startswith("net.3"))
    expected = fit(model, X, T, FT(len(p.X), len(X)), 0, "cpu", False)
    with torch.no_grad():  # the first layer is frozen: exactly theta_hat's
        for (name, q), q0 in zip(expected.named_parameters(), p.model.parameters()):
            if not name.startswith("net.3"):
                q.copy_(q0)
            q.requires_grad_(True)
    # ~400 steps: the two float64 runs may part by an ulp (different memory layouts of X)
    torch.testing.assert_close(ref.flat_params(new), ref.flat_params(expected), rtol=0, atol=1e-12)
    # the default stays theta_+F's prediction at the aligned input
    rec_f: dict = {}
    _treat(p, "align", rec_f)
    assert rec_f["source"] == "theta_plus_f" and rec_f["n_dropped"] == 0


@pytest.mark.parametrize(
    "method, opts",
    [
        ("relabel", {"source": "knn"}),
        ("relabel", {"source": "deletion"}),
        ("align", {"source": "knn", "min_confidence": 0.5}),
        ("align", {"source": "deletion", "hard": True}),
    ],
)
def test_user_model_untouched_and_deterministic(ref, planted, method, opts):
    p = planted
    before = ref.state_hash(p.model)
    a = _treat(p, method, seed=3, **opts)
    b = _treat(p, method, seed=3, **opts)
    c = _treat(p, method, seed=4, **opts)
    assert ref.state_hash(p.model) == before
    assert not any(m._forward_pre_hooks for m in p.model.modules()), "a hook was left behind"
    assert ref.state_hash(a) == ref.state_hash(b)
    assert ref.state_hash(a) != ref.state_hash(c)
    assert ref.state_hash(a) != before


@pytest.mark.parametrize(
    "method, opts, match",
    [
        ("relabel", {"source": "oracle"}, "source"),
        ("align", {"source": None}, "source"),
        ("relabel", {"min_confidence": 1.5}, "min_confidence"),
        ("relabel", {"min_confidence": True}, "min_confidence"),
        ("relabel", {"neighbours": 0}, "neighbours"),
        ("relabel", {"neighbours": 150}, "neighbours"),
        ("relabel", {"neighbours": 2.0}, "neighbours"),
        ("relabel", {"embed": "pixels"}, "embed"),
        ("relabel", {"embed": 3}, "embed"),
        ("relabel", {"embed": lambda x: x[:1]}, "rows"),
        ("relabel", {"temperature": 2.0}, "temperature"),
        ("align", {"source": "knn", "temperature": 2.0}, "temperature"),
    ],
)
def test_bad_options_raise(planted, method, opts, match):
    with pytest.raises(ValueError, match=match):
        _treat(planted, method, **opts)


def test_knn_works_on_a_loader_and_numpy_causes(ref, planted):
    """The causes' order and type do not matter: the record is in sorted-index order."""
    p = planted
    rec_a: dict = {}
    rec_b: dict = {}
    a = _treat(p, "relabel", rec_a)
    b = netmend.treat(
        p.model,
        (p.X.numpy(), p.y.numpy()),
        np.flip(p.causes.numpy()).copy(),
        "relabel",
        train_config=CFG,
        record=rec_b,
        **RUN,
    )
    torch.testing.assert_close(rec_a["causes"], rec_b["causes"])
    torch.testing.assert_close(rec_a["new_labels"], rec_b["new_labels"])
    torch.testing.assert_close(ref.flat_params(a), ref.flat_params(b), rtol=1e-10, atol=1e-12)
