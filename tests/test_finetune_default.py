"""The "finetune" treatment's default recipe: sized in optimiser steps at the training rate,
strong enough to unlearn a memorised, planted cluster once it is removed."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import netmend
from netmend.lab.models import MLP
from netmend.model.training import TrainConfig, fit, predict
from netmend.treatment.methods import FINETUNE_MIN_STEPS, finetune_recipe
from netmend.treatment.methods import prior_weights as prior_weights_of

RUN = dict(progress=False, device="cpu")


def _planted(seed: int):
    """Three 2-D blobs (40 points each) and 8 points labelled 1 planted inside blob 0, plus
    20 probes from the planted spot whose true class is 0; an MLP trained to memorise them."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    X = torch.cat([c + torch.randn(40, 2, generator=g) for c in centres])
    y = torch.arange(3).repeat_interleave(40)
    spot = torch.tensor([-2.0, -1.0])
    X = torch.cat([X, spot + 0.15 * torch.randn(8, 2, generator=g)])
    y = torch.cat([y, torch.ones(8, dtype=torch.long)])
    probes = spot + 0.1 * torch.randn(20, 2, generator=g)
    cfg = TrainConfig(epochs=100, batch_size=64, lr=3e-2)
    torch.manual_seed(seed)
    model = fit(MLP(2, 3, (64,)), X, y, cfg, seed, "cpu", False)
    return X, y, np.arange(120, 128), probes, cfg, model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("seed", [0, 1])
def test_default_unlearns_the_removed_planted_cluster(seed):
    X, y, planted, probes, cfg, model = _planted(seed)
    # the premise: the model memorised the planted points and carries them to the probes
    assert (predict(model, X[planted]) == 1).all()
    assert (predict(model, probes) == 1).float().mean() >= 0.9
    before = {k: v.clone() for k, v in model.state_dict().items()}

    new = netmend.treat(model, (X, y), planted, "finetune", train_config=cfg, seed=seed, **RUN)
    # the default moves the probes back to their true class and keeps the retained data
    assert (predict(new, probes) == 0).float().mean() >= 0.9
    keep = np.setdiff1d(np.arange(len(y)), planted)
    assert (predict(new, X[keep]) == y[keep]).float().mean() >= 0.97
    # the former default (half an epoch at a tenth of the rate) barely moved them: the
    # test above is one a weaker default fails
    weak = netmend.treat(
        model,
        (X, y),
        planted,
        "finetune",
        train_config=cfg,
        seed=seed,
        epochs=0.5,
        lr=cfg.lr / 10,
        **RUN,
    )
    assert (predict(weak, probes) == 0).float().mean() <= 0.1
    # the user's model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.training


def _count_steps(model: torch.nn.Module) -> list[int]:
    """Count training-mode forward passes (one per optimiser step) of ``model`` and its
    deep copies (the hook is copied with it)."""
    calls: list[int] = []

    def hook(module, args, out):
        if module.training:
            calls.append(args[0].shape[0])

    model.register_forward_hook(hook)
    return calls


def test_default_is_min_steps_capped_by_training_or_one_epoch():
    """steps = max(one epoch of D \\ C, min(FINETUNE_MIN_STEPS, the training recipe's steps))."""
    g = torch.Generator().manual_seed(0)
    cases = (  # (n, causes, training epochs, expected steps at batch 16)
        (100, 10, 200.0, FINETUNE_MIN_STEPS),  # small data, long training: the floor
        (100, 10, 3.0, 19),  # never longer than training took: 3 * 100 / 16
        (9000, 5, 3.0, math.ceil(8995 / 16)),  # large data: one epoch
    )
    for n, causes, epochs, expected in cases:
        cfg = TrainConfig(epochs=epochs, batch_size=16, lr=1e-2)
        X, y = torch.randn(n, 2, generator=g), torch.randint(0, 3, (n,), generator=g)
        model = MLP(2, 3, (4,)).eval()
        calls = _count_steps(model)
        netmend.treat(model, (X, y), np.arange(causes), "finetune", train_config=cfg, **RUN)
        assert len(calls) == expected and set(calls) == {16}, (n, epochs)
    # the recipe: the training rate and optimiser, the last half averaged
    cfg = TrainConfig(epochs=200.0, batch_size=16, lr=1e-2)
    r = finetune_recipe(cfg, 100, 90)
    assert (r.lr, r.optimizer, r.batch_size, r.average_tail) == (1e-2, "adam", 16, 0.5)
    assert round(r.epochs * 90 / 16) == FINETUNE_MIN_STEPS
    # explicit sizes are taken as given, with no floor and no cap
    assert round(finetune_recipe(cfg, 100, 90, {"steps": 7}).epochs * 90 / 16) == 7
    assert finetune_recipe(cfg, 100, 90, {"epochs": 0.5}).epochs == 0.5
    assert round(finetune_recipe(cfg, 100, 90, {"min_steps": 3}).epochs * 90 / 16) == 6
    X, y = torch.randn(50, 2, generator=g), torch.randint(0, 3, (50,), generator=g)
    model = MLP(2, 3, (4,)).eval()
    calls = _count_steps(model)
    netmend.treat(model, (X, y), [0], "finetune", train_config=cfg, steps=11, batch_size=7, **RUN)
    assert len(calls) == 11


def test_finetune_recipe_rejects_bad_sizes():
    cfg = TrainConfig()
    with pytest.raises(ValueError, match="'steps' or 'epochs', not both"):
        finetune_recipe(cfg, 10, 10, {"steps": 5, "epochs": 1.0})
    with pytest.raises(ValueError, match="at least one step"):
        finetune_recipe(cfg, 10, 10, {"steps": 0})
    with pytest.raises(ValueError, match="nothing is left to fine-tune on"):
        finetune_recipe(cfg, 10, 0)
    X, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="nothing is left"):
        netmend.treat(MLP(2, 3, (4,)).eval(), (X, y), np.arange(6), "finetune", **RUN)
    model = copy.deepcopy(MLP(2, 3, (4,))).eval()
    with pytest.raises(ValueError, match="epochs"):
        netmend.treat(model, (X, y), [0], "finetune", epochs=-1.0, **RUN)


def test_prior_weights_restore_each_labels_share_of_the_training_set():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (200,), generator=g)
    y[:5] = 3  # label 3 present, then removed entirely below
    keep = torch.rand(200, generator=g) > 0.3
    keep[y == 3] = False
    w = prior_weights_of(y, keep)
    # brute force: per label, its share of D divided by its share of D \ C
    for c in range(4):
        n_c, kept_c = int((y == c).sum()), int((y[keep] == c).sum())
        expected = 0.0 if kept_c == 0 else (n_c / 200) / (kept_c / int(keep.sum()))
        assert math.isclose(float(w[c]), expected, rel_tol=1e-6)
    kept_w = w[y[keep]].double()
    # the weights keep the loss's scale only where no label vanished; here label 3 did
    shares = torch.stack([kept_w[y[keep] == c].sum() for c in range(3)]) / kept_w.sum()
    full = torch.bincount(y[y != 3], minlength=3).double() / int((y != 3).sum())
    assert torch.allclose(shares, full, atol=1e-6)
    with pytest.raises(ValueError, match="hard labels"):
        prior_weights_of(torch.zeros(10, 3), torch.ones(10, dtype=torch.bool))


def test_class_weighted_fit_takes_the_weighted_mean_loss_step():
    """One full-batch SGD step with class weights equals the step of the hand-written loss
    mean_i w[y_i] * CE_i (float64); without weights fit() is unchanged."""
    torch.manual_seed(0)
    X = torch.randn(12, 3, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    w = torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)
    model = MLP(3, 3, (5,)).double()
    cfg = TrainConfig(epochs=1, batch_size=12, lr=0.1, optimizer="sgd", average_tail=0.0)
    stepped = fit(copy.deepcopy(model), X, y, cfg, 0, "cpu", False, class_weight=w)
    by_hand = copy.deepcopy(model)
    loss = (torch.nn.functional.cross_entropy(by_hand(X), y, reduction="none") * w[y]).mean()
    grads = torch.autograd.grad(loss, list(by_hand.parameters()))
    with torch.no_grad():
        for p, gr in zip(by_hand.parameters(), grads):
            p.sub_(0.1 * gr)  # SGD's first step: the momentum buffer is the gradient
    for a, b in zip(stepped.parameters(), by_hand.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    ones = fit(copy.deepcopy(model), X, y, cfg, 0, "cpu", False, class_weight=torch.ones(3))
    plain = fit(copy.deepcopy(model), X, y, cfg, 0, "cpu", False)
    for a, b in zip(ones.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="hard labels"):
        fit(copy.deepcopy(model), X, torch.eye(3)[y].double(), cfg, 0, "cpu", False, class_weight=w)


def test_keep_prior_keeps_the_class_a_one_sided_removal_would_shrink():
    """Removing 30 of class 0's 40 examples: the plain fine-tune's bias shift moves the
    boundary into class 0 (mean probability of class 0 on its own retained points falls);
    with keep_prior the fine-tune weights the 10 left so that class 0 keeps its share."""
    X, y, _, _, cfg, model = _planted(0)
    causes = np.arange(0, 30)
    probs = {}
    for keep_prior in (False, True):
        res = netmend.treat(
            model, (X, y), causes, "finetune", train_config=cfg, seed=0, keep_prior=keep_prior,
            **RUN,
        )  # fmt: skip
        with torch.no_grad():
            probs[keep_prior] = torch.softmax(res(X[:40]), 1)[:, 0].mean().item()
    assert probs[True] > probs[False]


def test_a_fine_tune_without_the_training_recipe_warns():
    """Without train_config the fine-tune runs at TrainConfig()'s rate, which barely moved a
    model trained at 5e-2 (outside-in trial): say so, and stay quiet when the recipe or a
    rate is given."""
    X, y, planted, _, cfg, model = _planted(0)
    with pytest.warns(UserWarning, match=r"no train_config.*lr 0.001.*train_config=TrainConfig"):
        netmend.treat(model, (X, y), planted, "finetune", **RUN)
    with pytest.warns(UserWarning, match=r"no train_config"):
        netmend.treat(model, (X, y), planted, "relabel", **RUN)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        netmend.treat(model, (X, y), planted, "finetune", train_config=cfg, **RUN)
        netmend.treat(model, (X, y), planted, "finetune", lr=0.03, **RUN)
