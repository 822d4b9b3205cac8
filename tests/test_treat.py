"""Treatments: Newton removal against exact retraining, EWC deletion, fine-tune, retrain."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netmend
from netmend import TrainConfig
from netmend.lab.models import MLP, LogisticRegression
from netmend.model.training import fit, fresh_copy
from netmend.treatment import available as treat_available

DT = torch.float64
RUN = dict(progress=False, device="cpu")


def _well_specified(ref, l2: float, seed: int = 0, n_causes: int = 4) -> SimpleNamespace:
    """Data drawn from a 3-class logistic model on 3 standard-normal features (N = 150), the
    exact L2-regularised optimum on it and on it without ``n_causes`` random points C."""
    g = torch.Generator().manual_seed(seed)
    N, d, C = 150, 3, 3
    X = torch.randn(N, d, generator=g, dtype=DT)
    W = torch.randn(C, d, generator=g, dtype=DT)
    y = torch.multinomial(torch.softmax(X @ W.T, 1), 1, generator=g).squeeze(1)
    causes = np.sort(torch.randperm(N, generator=g)[:n_causes].numpy())
    keep = np.setdiff1d(np.arange(N), causes)
    theta_hat = ref.fit_logreg_exact(X, y, C, l2)
    theta_retrained = ref.fit_logreg_exact(X[keep], y[keep], C, l2, theta0=theta_hat)
    return SimpleNamespace(
        X=X,
        y=y,
        causes=causes,
        keep=keep,
        l2=l2,
        theta_hat=theta_hat,
        theta_retrained=theta_retrained,
        classes=C,
        d=d,
    )


@pytest.fixture(scope="module", params=[0.1, 30.0], ids=["weak-l2", "strong-l2"])
def spec(request, ref):
    return _well_specified(ref, request.param)


@pytest.fixture(scope="module")
def weak(ref):
    return _well_specified(ref, 0.1)


@pytest.fixture(scope="module")
def many(ref):
    """40 of the 150 examples removed: unconstrained EWC deletion hurts the retained data."""
    return _well_specified(ref, 0.1, n_causes=40)


def _mean_loss(ref, s, idx):
    """``theta -> mean cross-entropy`` over the examples ``idx`` of ``s``."""
    idx = torch.as_tensor(idx)
    summed = ref.logreg_flat_loss(s.X[idx], s.y[idx], s.classes)
    return lambda theta: float(summed(theta)) / len(idx)


def _model_at(ref, theta, d=3, classes=3):
    return ref.set_flat_params(LogisticRegression(d, classes).double(), theta).eval()


def _treated(ref, model, s, method="newton", **kw):
    """Flat parameters of ``netmend.treat(model, (s.X, s.y), s.causes, method, **kw)``."""
    return ref.flat_params(netmend.treat(model, (s.X, s.y), s.causes, method, **kw, **RUN))


def test_newton_ggn_lands_near_exact_retraining(ref, spec):
    """For logistic regression the GGN is the exact Hessian of the summed objective
    sum CE + (l2/2)|theta|^2 (bias included): one Newton step from theta_hat nearly reaches
    the retrained optimum."""
    model = _model_at(ref, spec.theta_hat)
    theta_new = _treated(ref, model, spec, l2=spec.l2, curvature="ggn", step_size=1.0)
    before = float((spec.theta_hat - spec.theta_retrained).norm())
    after = float((theta_new - spec.theta_retrained).norm())
    assert before > 1e-3
    assert after < 0.1 * before
    loss_c = ref.logreg_flat_loss(spec.X[spec.causes], spec.y[spec.causes], spec.classes)
    assert float(loss_c(theta_new)) > float(loss_c(spec.theta_hat))


def test_newton_diag_moves_towards_retraining(ref, spec):
    """The diagonal empirical Fisher is a crude Hessian: the step points the right way and raises
    the loss of C; with strong regularisation (A ~ l2 I dominates) it also lands closer."""
    model = _model_at(ref, spec.theta_hat)
    theta_new = _treated(ref, model, spec, l2=spec.l2, curvature="diag", step_size=1.0)
    step = theta_new - spec.theta_hat
    true = spec.theta_retrained - spec.theta_hat
    cos = float(step @ true / (step.norm() * true.norm()))
    assert cos > 0.5
    loss_c = ref.logreg_flat_loss(spec.X[spec.causes], spec.y[spec.causes], spec.classes)
    assert float(loss_c(theta_new)) > float(loss_c(spec.theta_hat))
    if spec.l2 >= 10:
        assert float((theta_new - spec.theta_retrained).norm()) < float(true.norm())


@pytest.mark.parametrize("kind", ["diag", "fisher", "ggn"])
def test_newton_step_matches_dense_formula(ref, weak, kind):
    """theta_new = theta_hat + eta * A^-1 sum_{c in C} grad loss_c, A = C_sum(D \\ C) + l2 I."""
    s = weak
    model = _model_at(ref, s.theta_hat)
    keep = torch.as_tensor(s.keep)
    G = ref.loop_grads(model, s.X[keep], s.y[keep])
    P = G.shape[1]
    damping = s.l2 + 0.05  # the "damping" option adds to l2
    if kind == "diag":
        A = torch.diag((G * G).sum(0) + damping)
    elif kind == "fisher":
        A = G.T @ G + damping * torch.eye(P, dtype=DT)
    else:
        H = torch.autograd.functional.hessian(
            ref.logreg_flat_loss(s.X[keep], s.y[keep], s.classes), s.theta_hat
        )
        A = H + damping * torch.eye(P, dtype=DT)
    g_loss = -ref.loop_grads(model, s.X[s.causes], s.y[s.causes]).sum(0)
    eta = 0.7
    expected = s.theta_hat + eta * torch.linalg.solve(A, g_loss)
    new = _treated(ref, model, s, l2=s.l2, curvature=kind, step_size=eta, damping=0.05)
    torch.testing.assert_close(new, expected, rtol=1e-6, atol=1e-8)


def test_newton_with_precomputed_fisher_matches(ref, weak):
    """treat(fisher=F_sum of D) subtracts C's part: same as computing F over D \\ C directly."""
    s = weak
    model = _model_at(ref, s.theta_hat)
    G = ref.loop_grads(model, s.X, s.y)
    for eta in (1.0, "auto"):
        kw = dict(l2=s.l2, step_size=eta, **RUN)
        a = netmend.treat(model, (s.X, s.y), s.causes, "newton", **kw)
        b = netmend.treat(model, (s.X, s.y), s.causes, "newton", fisher=(G * G).sum(0), **kw)
        torch.testing.assert_close(ref.flat_params(a), ref.flat_params(b), rtol=1e-9, atol=1e-12)
        assert not torch.equal(ref.flat_params(a), s.theta_hat)


def test_ewc_deletion_raises_loss_of_causes_under_penalty(ref, weak):
    s = weak
    model = _model_at(ref, s.theta_hat)
    keep = torch.as_tensor(s.keep)
    A = (ref.loop_grads(model, s.X[keep], s.y[keep]) ** 2).sum(0) + s.l2
    cap = 2 * np.log(s.classes)
    Xc, yc = s.X[s.causes], s.y[s.causes]

    def J(theta):
        m = _model_at(ref, theta)
        with torch.no_grad():
            gain = F.cross_entropy(m(Xc), yc, reduction="none").clamp(max=cap).sum()
        d = theta - s.theta_hat
        return float(gain - 0.5 * (A * d * d).sum())

    new = netmend.treat(model, (s.X, s.y), s.causes, "ewc", l2=s.l2, **RUN)
    theta_new = ref.flat_params(new)
    assert J(theta_new) > J(s.theta_hat) + 1e-3
    loss_c = ref.logreg_flat_loss(Xc, yc, s.classes)
    assert float(loss_c(theta_new)) > float(loss_c(s.theta_hat))
    # one step: along A^-1 grad(sum loss_C), a positive (backtracked) multiple of it
    one = ref.flat_params(
        netmend.treat(model, (s.X, s.y), s.causes, "ewc", l2=s.l2, steps=1, **RUN)
    )
    direction = -ref.loop_grads(model, Xc, yc).sum(0) / A
    ratio = (one - s.theta_hat) / direction
    assert float(ratio.min()) > 0
    constant = torch.full_like(ratio, float(ratio.mean()))
    torch.testing.assert_close(ratio, constant, rtol=1e-8, atol=0)
    assert np.log2(float(ratio.mean())) == pytest.approx(round(np.log2(float(ratio.mean()))))


def test_newton_auto_step_keeps_retained_loss_within_tolerance(ref, weak):
    """step_size="auto" (the default) is the largest 2^j along the unit Newton step whose mean
    loss on the retained data rises by at most max_retained_increase (default 0.02 nats)."""
    s = weak
    model = _model_at(ref, s.theta_hat)
    retained = _mean_loss(ref, s, s.keep)
    loss_c = _mean_loss(ref, s, s.causes)
    base = retained(s.theta_hat)
    unit = _treated(ref, model, s, l2=s.l2, step_size=1.0)
    direction = unit - s.theta_hat
    default = _treated(ref, model, s, l2=s.l2)
    etas = []
    for tol in (0.01, 0.02, 0.2):
        opts = {} if tol == 0.02 else {"max_retained_increase": tol}
        new = _treated(ref, model, s, l2=s.l2, **opts)
        if tol == 0.02:
            torch.testing.assert_close(new, default, rtol=1e-10, atol=1e-12)
        step = new - s.theta_hat
        eta = float(step @ direction / (direction @ direction))
        torch.testing.assert_close(step, eta * direction, rtol=1e-9, atol=1e-12)
        j = np.log2(eta)
        assert j == pytest.approx(round(j), abs=1e-9) and -10 <= round(j) <= 20
        assert retained(new) - base <= tol + 1e-12
        # the largest such power of two: doubling it breaks the tolerance
        assert retained(s.theta_hat + 2 * eta * direction) - base > tol
        assert loss_c(new) > loss_c(s.theta_hat)
        etas.append(eta)
    assert etas[0] <= etas[1] <= etas[2] and etas[0] < etas[2]  # monotone in the tolerance
    assert etas[1] > 1  # here the unit step is too timid: "auto" removes more of C
    assert loss_c(default) > loss_c(unit)


def test_treat_auto_l2_is_ratio_times_mean_fisher_diag(ref, weak):
    """l2="auto" (the default) in treat: lambda = 1e4 * mean(diag F_sum) over the whole D."""
    s = weak
    model = _model_at(ref, s.theta_hat)
    G = ref.loop_grads(model, s.X, s.y)
    lam = 1e4 * float((G * G).sum(0).mean())
    for method, opts in (("newton", {"step_size": 1.0}), ("ewc", {})):
        default = netmend.treat(model, (s.X, s.y), s.causes, method, **opts, **RUN)
        auto = netmend.treat(model, (s.X, s.y), s.causes, method, l2="auto", **opts, **RUN)
        explicit = netmend.treat(model, (s.X, s.y), s.causes, method, l2=lam, **opts, **RUN)
        small = netmend.treat(model, (s.X, s.y), s.causes, method, l2=s.l2, **opts, **RUN)
        a, d, e = (ref.flat_params(m) for m in (auto, default, explicit))
        torch.testing.assert_close(a, d, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-13)
        assert not torch.equal(a, s.theta_hat)
        assert not torch.allclose(a, ref.flat_params(small), rtol=1e-3)
    # the same with a precomputed Fisher
    fish = netmend.treat(
        model, (s.X, s.y), s.causes, "newton", step_size=1.0, fisher=(G * G).sum(0), **RUN
    )
    explicit = netmend.treat(model, (s.X, s.y), s.causes, "newton", step_size=1.0, l2=lam, **RUN)
    torch.testing.assert_close(
        ref.flat_params(fish), ref.flat_params(explicit), rtol=1e-9, atol=1e-13
    )
    with pytest.raises(ValueError, match="l2 must be a positive number or 'auto'"):
        netmend.treat(model, (s.X, s.y), s.causes, "newton", l2="large", **RUN)


def test_ewc_deletion_trust_region(ref, many):
    """A step is refused if the mean loss on the retained data rises by more than
    max_retained_increase (0.05 nats by default) over theta_hat."""
    s = many
    model = _model_at(ref, s.theta_hat)
    retained = _mean_loss(ref, s, s.keep)
    loss_c = _mean_loss(ref, s, s.causes)
    base = retained(s.theta_hat)
    free = ref.flat_params(
        netmend.treat(
            model, (s.X, s.y), s.causes, "ewc", l2=s.l2, max_retained_increase=math.inf, **RUN
        )
    )
    assert retained(free) - base > 0.1  # without the trust region it would cost more than 0.05
    results = []
    for tol in (0.05, 0.01):
        opts = {} if tol == 0.05 else {"max_retained_increase": tol}
        new = ref.flat_params(
            netmend.treat(model, (s.X, s.y), s.causes, "ewc", l2=s.l2, **opts, **RUN)
        )
        assert retained(new) - base <= tol + 1e-12
        assert loss_c(new) > loss_c(s.theta_hat) + 0.05  # it still forgets C
        results.append(new)
    assert loss_c(results[1]) < loss_c(results[0]) < loss_c(free)


def test_finetune_is_fit_on_retained_data(ref, blobs, blobs_logreg):
    cfg = TrainConfig(epochs=2.0, batch_size=16, lr=0.02)
    causes = blobs.planted
    new = netmend.treat(
        blobs_logreg, (blobs.X, blobs.y), causes, "finetune", train_config=cfg, seed=3, **RUN
    )
    keep = np.setdiff1d(np.arange(len(blobs.y)), causes)
    # the default at the training rate, tail-averaged: max(one epoch, min(500, training steps)),
    # here as many steps as training took (2 epochs of 126 examples at batch 16)
    steps = round(2.0 * len(blobs.y) / 16)
    short = dataclasses.replace(cfg, epochs=steps * 16 / len(keep), average_tail=0.5)
    Xk, yk = blobs.X[keep], blobs.y[keep]
    expected = fit(copy.deepcopy(blobs_logreg), Xk, yk, short, 3, "cpu", False)
    torch.testing.assert_close(
        ref.flat_params(new), ref.flat_params(expected), rtol=1e-10, atol=1e-12
    )
    assert not torch.equal(ref.flat_params(new), ref.flat_params(blobs_logreg))
    # options override the defaults
    new2 = netmend.treat(
        blobs_logreg,
        (blobs.X, blobs.y),
        causes,
        "finetune",
        train_config=cfg,
        seed=3,
        epochs=0.5,
        lr=0.01,
        batch_size=8,
        **RUN,
    )
    short2 = dataclasses.replace(cfg, epochs=0.5, lr=0.01, batch_size=8, average_tail=0.5)
    expected2 = fit(copy.deepcopy(blobs_logreg), Xk, yk, short2, 3, "cpu", False)
    torch.testing.assert_close(
        ref.flat_params(new2), ref.flat_params(expected2), rtol=1e-10, atol=1e-12
    )


def test_finetune_optimizer(ref, blobs, blobs_logreg):
    """The optimiser is the training recipe's unless the "optimizer" option overrides it."""
    cfg = TrainConfig(epochs=2.0, batch_size=16, lr=0.02)
    sgd_cfg = dataclasses.replace(cfg, optimizer="sgd")
    keep = np.setdiff1d(np.arange(len(blobs.y)), blobs.planted)
    Xk, yk = blobs.X[keep], blobs.y[keep]
    expected = fit(
        copy.deepcopy(blobs_logreg),
        Xk,
        yk,
        dataclasses.replace(sgd_cfg, epochs=16 * 16 / len(keep), average_tail=0.5),  # 16 steps
        3,
        "cpu",
        False,
    )
    by_option = netmend.treat(
        blobs_logreg,
        (blobs.X, blobs.y),
        blobs.planted,
        "finetune",
        train_config=cfg,
        seed=3,
        optimizer="sgd",
        **RUN,
    )
    by_config = netmend.treat(
        blobs_logreg,
        (blobs.X, blobs.y),
        blobs.planted,
        "finetune",
        train_config=sgd_cfg,
        seed=3,
        **RUN,
    )
    adam = netmend.treat(
        blobs_logreg,
        (blobs.X, blobs.y),
        blobs.planted,
        "finetune",
        train_config=sgd_cfg,
        seed=3,
        optimizer="adam",
        **RUN,
    )
    for got in (by_option, by_config):
        torch.testing.assert_close(
            ref.flat_params(got), ref.flat_params(expected), rtol=1e-10, atol=1e-12
        )
    assert not torch.allclose(ref.flat_params(adam), ref.flat_params(expected), rtol=1e-6)
    with pytest.raises(ValueError, match="optimizer must be 'adam' or 'sgd'"):
        netmend.treat(
            blobs_logreg,
            (blobs.X, blobs.y),
            blobs.planted,
            "finetune",
            train_config=cfg,
            optimizer="rmsprop",
            **RUN,
        )


def test_fit_with_sgd_is_momentum_sgd(ref, blobs, blobs_logreg):
    """TrainConfig(optimizer="sgd") is torch SGD with momentum 0.9 on mean cross-entropy."""
    cfg = TrainConfig(epochs=1.0, batch_size=42, lr=0.05, weight_decay=0.01, optimizer="sgd")
    got = fit(copy.deepcopy(blobs_logreg), blobs.X, blobs.y, cfg, seed=7, progress=False)
    model = copy.deepcopy(blobs_logreg).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    order = torch.randperm(len(blobs.y), generator=torch.Generator().manual_seed(7))
    assert len(blobs.y) == 3 * 42
    for i in range(3):
        idx = order[42 * i : 42 * (i + 1)]
        loss = F.cross_entropy(model(blobs.X[idx]), blobs.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(ref.flat_params(got), ref.flat_params(model), rtol=1e-12, atol=0)


def test_finetune_without_planted_points_fixes_the_failure(blobs, blobs_logreg):
    with torch.no_grad():
        assert int(blobs_logreg(blobs.Xf).argmax(1)) != int(blobs.yf)
    cfg = TrainConfig(batch_size=32, lr=0.1)
    new = netmend.treat(
        blobs_logreg,
        (blobs.X, blobs.y),
        blobs.planted,
        "finetune",
        train_config=cfg,
        epochs=30,
        **RUN,
    )
    with torch.no_grad():
        assert int(new(blobs.Xf).argmax(1)) == int(blobs.yf)


def test_retrain_starts_from_scratch(ref, blobs, blobs_logreg):
    cfg = TrainConfig(epochs=3.0, batch_size=32, lr=0.05)
    causes = blobs.planted
    a = netmend.treat(
        blobs_logreg, (blobs.X, blobs.y), causes, "retrain", train_config=cfg, seed=1, **RUN
    )
    # the result does not depend on the original parameters, only on the architecture and seed
    other = copy.deepcopy(blobs_logreg)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    b = netmend.treat(other, (blobs.X, blobs.y), causes, "retrain", train_config=cfg, seed=1, **RUN)
    torch.testing.assert_close(ref.flat_params(a), ref.flat_params(b), rtol=1e-10, atol=1e-12)
    keep = np.setdiff1d(np.arange(len(blobs.y)), causes)
    expected = fit(fresh_copy(blobs_logreg, 1), blobs.X[keep], blobs.y[keep], cfg, 1, "cpu", False)
    torch.testing.assert_close(
        ref.flat_params(a), ref.flat_params(expected), rtol=1e-10, atol=1e-12
    )
    # model_factory builds the fresh model
    calls = []

    def factory():
        calls.append(1)
        torch.manual_seed(99)
        return LogisticRegression(2, 3).double()

    c = netmend.treat(
        blobs_logreg,
        (blobs.X, blobs.y),
        causes,
        "retrain",
        train_config=cfg,
        seed=1,
        model_factory=factory,
        **RUN,
    )
    assert calls == [1]
    expected_c = fit(factory(), blobs.X[keep], blobs.y[keep], cfg, 1, "cpu", False)
    torch.testing.assert_close(
        ref.flat_params(c), ref.flat_params(expected_c), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize(
    "method, opts",
    [
        ("finetune", {}),
        ("newton", {}),
        ("newton", {"curvature": "ggn"}),
        ("ewc", {}),
        ("retrain", {}),
    ],
)
def test_treat_leaves_input_model_untouched(ref, blobs, blobs_logreg, method, opts):
    before = ref.state_hash(blobs_logreg)
    training_flag = blobs_logreg.training
    cfg = TrainConfig(epochs=1.0, batch_size=32, lr=0.05)
    new = netmend.treat(
        blobs_logreg, (blobs.X, blobs.y), blobs.planted, method, train_config=cfg, **opts, **RUN
    )
    assert ref.state_hash(blobs_logreg) == before
    assert blobs_logreg.training == training_flag
    assert new is not blobs_logreg and not new.training
    assert not torch.equal(ref.flat_params(new), ref.flat_params(blobs_logreg))
    pairs = zip(new.parameters(), blobs_logreg.parameters(), strict=True)
    assert all(p.data_ptr() != q.data_ptr() for p, q in pairs)


def test_treat_registry():
    assert {"finetune", "newton", "ewc", "retrain"} <= set(treat_available())


def test_tail_averaging_returns_the_mean_of_the_last_iterates():
    """fit(average_tail=a) equals the mean of the parameters after each of the last a*steps."""
    torch.manual_seed(0)
    X, y = torch.randn(64, 3, dtype=torch.float64), torch.randint(0, 2, (64,))
    cfg = TrainConfig(epochs=2.0, batch_size=16, lr=0.05)  # 8 steps
    ref = nn.Linear(3, 2).double()
    init = copy.deepcopy(ref.state_dict())
    iterates = []
    for n in range(1, 9):  # the last-iterate trajectory, step by step, from the same start
        m = nn.Linear(3, 2).double()
        m.load_state_dict(init)
        fit(m, X, y, dataclasses.replace(cfg, epochs=n * 16 / 64), seed=0, progress=False)
        iterates.append(torch.cat([p.detach().reshape(-1) for p in m.parameters()]))
    m = nn.Linear(3, 2).double()
    m.load_state_dict(init)
    fit(m, X, y, dataclasses.replace(cfg, average_tail=0.5), seed=0, progress=False)
    got = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    torch.testing.assert_close(got, torch.stack(iterates[4:]).mean(0))
    with pytest.raises(ValueError, match="average_tail"):
        TrainConfig(average_tail=1.0)


def test_tail_averaging_leaves_frozen_parameters_bit_for_bit():
    """The mean of equal values can round away from them (17 of 160 frozen weights moved by
    up to 1.5e-8 in an outside-in trial): frozen parameters are not averaged."""
    torch.manual_seed(0)
    X, y = torch.randn(64, 7), torch.randint(0, 3, (64,))
    m = nn.Sequential(nn.Linear(7, 20), nn.Tanh(), nn.Linear(20, 3))
    with torch.no_grad():
        m[0].weight.mul_(1 / 3)  # values whose mean over the tail rounds (float32)
    for p in m[0].parameters():
        p.requires_grad_(False)
    frozen = {k: v.clone() for k, v in m[0].state_dict().items()}
    head = m[2].weight.detach().clone()
    cfg = TrainConfig(epochs=4.0, batch_size=8, lr=0.05, average_tail=0.5)  # 16 averaged steps
    fit(m, X, y, cfg, seed=0, progress=False)
    for k, v in m[0].state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert not torch.equal(m[2].weight, head)  # the trainable layer did train


class _BNNet(nn.Module):
    """A tiny float64 classifier with a BatchNorm1d between two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(2, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def test_finetune_keeps_the_trained_batchnorm_statistics(blobs, ref):
    """A repair fine-tune normalises by the trained model's running statistics and never
    re-estimates them from minibatches of D minus C (they cost a BatchNorm ResNet ~2 points of
    test accuracy on the digits); freeze_batchnorm=False restores the old behaviour."""
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=20, lr=1e-2, batch_size=16)
    model = fit(_BNNet().double(), blobs.X, blobs.y, cfg, 0, "cpu", False).eval()
    mean0, var0 = model.bn.running_mean.clone(), model.bn.running_var.clone()
    causes = np.array([0, 5, 9])
    new = netmend.treat(model, (blobs.X, blobs.y), causes, "finetune", train_config=cfg, **RUN)
    torch.testing.assert_close(new.bn.running_mean, mean0, rtol=0, atol=0)
    torch.testing.assert_close(new.bn.running_var, var0, rtol=0, atol=0)
    assert not torch.equal(new.fc1.weight, model.fc1.weight)  # the weights did train
    # it is the fine-tune of a copy whose BatchNorm stays in eval mode, by hand
    keep = np.setdiff1d(np.arange(len(blobs.y)), causes)
    by_hand = copy.deepcopy(model)
    by_hand.bn.train = lambda mode=True: by_hand.bn  # type: ignore[method-assign]
    from netmend.treatment.methods import finetune_recipe

    recipe = dataclasses.replace(
        finetune_recipe(cfg, len(blobs.y), len(keep)), freeze_batchnorm=False
    )
    expected = fit(by_hand, blobs.X[keep], blobs.y[keep], recipe, 0, "cpu", False)
    torch.testing.assert_close(
        ref.flat_params(new), ref.flat_params(expected), rtol=1e-10, atol=1e-12
    )
    moved = netmend.treat(
        model,
        (blobs.X, blobs.y),
        causes,
        "finetune",
        train_config=cfg,
        freeze_batchnorm=False,
        **RUN,
    )
    assert not torch.allclose(moved.bn.running_mean, mean0)
    torch.testing.assert_close(model.bn.running_mean, mean0, rtol=0, atol=0)  # user's model


def test_an_ewc_deletion_that_moves_nothing_says_so(blobs):
    """At the automatic l2 the deletion's penalty held the parameters in place: no prediction
    changed, and only the research-only notice was said."""
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=30, lr=0.05, batch_size=32)
    m = fit(MLP(2, 3, (8,)).double(), blobs.X, blobs.y, cfg, seed=0, progress=False).eval()
    with pytest.warns(UserWarning, match="barely moved the model: the causes' mean loss rose"):
        netmend.treat(m, (blobs.X, blobs.y), blobs.planted, "ewc", **RUN)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        moved = netmend.treat(m, (blobs.X, blobs.y), blobs.planted, "ewc", l2=1.0, **RUN)
    assert not [w for w in got if "barely moved" in str(w.message)]
    change = max((p - q).abs().max().item() for p, q in zip(moved.parameters(), m.parameters()))
    assert change > 0.05
