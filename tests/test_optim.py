"""The preconditioned, backtracked ascent used by both EWC fits."""

from __future__ import annotations

import pytest
import torch

from netmend.model.optim import preconditioned_ascent

DT = torch.float64


def _problem(seed: int, stiff: bool):
    g = torch.Generator().manual_seed(seed)
    P = 6
    M = torch.randn(P, P, generator=g, dtype=DT)
    Q = M @ M.T / P + 0.1 * torch.eye(P, dtype=DT)  # gain = b.t - 1/2 t^T Q t (concave)
    if stiff:
        Q = Q + torch.diag(torch.tensor([40.0, 0, 0, 0, 0, 0], dtype=DT))  # unit steps overshoot
    b = torch.randn(P, generator=g, dtype=DT)
    A = torch.rand(P, generator=g, dtype=DT) + 0.5
    theta0 = torch.randn(P, generator=g, dtype=DT)

    def gain(t):
        return b @ t - 0.5 * t @ Q @ t

    def J(t):
        d = t - theta0
        return float(gain(t) - 0.5 * (A * d * d).sum())

    # argmax of gain(t) - 1/2 (t - t0)^T diag(A) (t - t0):  (Q + diag A) t = b + A t0
    t_star = torch.linalg.solve(Q + torch.diag(A), b + A * theta0)
    return gain, J, theta0, A, t_star


@pytest.mark.parametrize("stiff", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_reaches_analytic_maximiser(seed, stiff):
    gain, J, theta0, A, t_star = _problem(seed, stiff)
    theta, info = preconditioned_ascent(gain, theta0, A, steps=2000, tol=0.0)
    torch.testing.assert_close(theta, t_star, rtol=1e-6, atol=1e-7)
    assert info["objective_end"] == pytest.approx(J(t_star), rel=1e-9, abs=1e-9)
    assert info["objective_start"] == pytest.approx(J(theta0), rel=1e-12)
    assert info["distance"] == pytest.approx(float((theta - theta0).norm()), rel=1e-12)
    assert info["gain_end"] == pytest.approx(float(gain(theta)), rel=1e-12, abs=1e-12)
    assert info["steps"] >= 1


@pytest.mark.parametrize("stiff", [False, True])
def test_objective_never_decreases(stiff):
    """Run with 0, 1, 2, ... accepted steps: the objective is monotone along the path, and no
    evaluated candidate that lowers it is ever accepted."""
    gain, J, theta0, A, t_star = _problem(3, stiff)
    values = []
    for steps in range(0, 25):
        theta, info = preconditioned_ascent(gain, theta0, A, steps=steps, tol=0.0)
        values.append(J(theta))
        assert info["objective_end"] >= info["objective_start"]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert values[-1] > values[0]
    assert values[-1] <= J(t_star) + 1e-12


def test_first_unit_step_is_natural_gradient_step():
    """From theta0 the first step is theta0 + A^-1 grad gain(theta0) when it is accepted."""
    g = torch.Generator().manual_seed(4)
    P = 5
    b = torch.randn(P, generator=g, dtype=DT)
    A = torch.rand(P, generator=g, dtype=DT) + 1.0
    theta0 = torch.zeros(P, dtype=DT)

    def gain(t):
        return b @ t - 0.05 * (t * t).sum()

    theta, info = preconditioned_ascent(gain, theta0, A, steps=1)
    assert info["steps"] == 1 and not info["converged"]  # still rising: steps ran out
    torch.testing.assert_close(theta, theta0 + b / A, rtol=1e-12, atol=1e-14)
    theta, info = preconditioned_ascent(gain, theta0, A, steps=500)
    assert info["steps"] < 500 and info["converged"]


def test_non_positive_penalty_is_rejected():
    t0 = torch.zeros(3, dtype=DT)
    for A in (torch.tensor([1.0, 0.0, 1.0], dtype=DT), torch.tensor([1.0, -1.0, 1.0], dtype=DT)):
        with pytest.raises(ValueError, match="penalty curvature must be positive"):
            preconditioned_ascent(lambda t: t.sum(), t0, A)


def test_stationary_start_takes_no_step():
    t0 = torch.ones(3, dtype=DT)
    gain = lambda t: -0.5 * ((t - 1) ** 2).sum()  # noqa: E731  (maximum at t0)
    theta, info = preconditioned_ascent(gain, t0, torch.ones(3, dtype=DT))
    assert torch.equal(theta, t0) and info["steps"] == 0


@pytest.mark.parametrize("stiff", [False, True])
def test_accept_bounds_the_result(stiff):
    """A trust region ||theta - theta0|| <= r that excludes the maximiser: every candidate
    outside it is refused, so the result stays inside, and the objective still rises."""
    gain, J, theta0, A, t_star = _problem(5, stiff)
    r = 0.5 * float((t_star - theta0).norm())
    calls = []

    def inside(t):
        calls.append(t.clone())
        return float((t - theta0).norm()) <= r

    theta, info = preconditioned_ascent(gain, theta0, A, steps=200, tol=0.0, accept=inside)
    assert float((theta - theta0).norm()) <= r
    assert info["distance"] <= r
    assert info["steps"] >= 1 and J(theta) > J(theta0)
    assert info["objective_end"] == pytest.approx(J(theta), rel=1e-12)
    assert J(theta) < J(t_star)
    assert calls and any(float((c - theta0).norm()) > r for c in calls)  # some were refused
    # the unconstrained run leaves the region (the bound is what kept it inside)
    free, _ = preconditioned_ascent(gain, theta0, A, steps=200, tol=0.0)
    assert float((free - theta0).norm()) > r


def test_accept_refusing_everything_takes_no_step():
    gain, J, theta0, A, _ = _problem(6, False)
    calls = []

    def never(t):
        calls.append(1)
        return False

    theta, info = preconditioned_ascent(gain, theta0, A, accept=never)
    assert torch.equal(theta, theta0)
    assert info["steps"] == 0 and info["objective_end"] == info["objective_start"]
    # each refusal halves the step: 1, 1/2, ..., 2^-13 (14 candidates), then it stops; accept
    # is asked only about candidates that raise J
    assert 1 <= len(calls) <= 14


def test_accept_always_true_changes_nothing():
    gain, J, theta0, A, _ = _problem(7, True)
    a, info_a = preconditioned_ascent(gain, theta0, A, steps=40)
    b, info_b = preconditioned_ascent(gain, theta0, A, steps=40, accept=lambda t: True)
    assert torch.equal(a, b) and info_a == info_b


def test_accept_sees_only_improving_candidates():
    """accept is a constraint on top of monotonicity: it is asked only about candidates that
    raise J, and the objective never decreases along the path."""
    gain, J, theta0, A, t_star = _problem(3, True)
    seen = []

    def record(t):
        seen.append(J(t))
        return True

    values = []
    for steps in range(0, 15):
        theta, _ = preconditioned_ascent(gain, theta0, A, steps=steps, tol=0.0, accept=record)
        values.append(J(theta))
    assert seen and min(seen) > J(theta0)
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert values[-1] > values[0]
