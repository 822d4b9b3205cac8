"""Preconditioned, monotone ascent on ``gain(theta) - 1/2 (theta - theta0)^T A (theta - theta0)``.

Both EWC fits use it: the identification fit of ``theta_+F`` (gain = log-likelihood of the
failures) and EWC deletion (gain = capped loss of the causes). ``A`` is the diagonal
``F_sum + lambda`` (positive), so ``A^{-1}`` times the gradient is the natural-gradient
direction, and the very first unit step from ``theta0`` is the one-step (linear / Newton)
estimate. Steps are backtracked so the objective never decreases: the fit cannot diverge.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def preconditioned_ascent(
    gain: Callable[[torch.Tensor], torch.Tensor],
    theta0: torch.Tensor,
    A: torch.Tensor,
    steps: int = 30,
    step_size: float = 1.0,
    tol: float = 1e-6,
    accept: Callable[[torch.Tensor], bool] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Maximise ``J(theta) = gain(theta) - 1/2 (theta-theta0)^T diag(A) (theta-theta0)``.

    Args:
        gain: ``theta [P] -> scalar`` (differentiable; summed, not averaged, over its examples).
        theta0: the anchor and starting point ``[P]``.
        A: the positive penalty diagonal ``[P]``.
        steps: most accepted steps.
        step_size: initial step on ``A^{-1} grad J``; halved on each rejection (down to 1e-4),
            doubled back (up to its initial value) after each success.
        tol: stop when an accepted step improves ``J`` by less than ``tol * |J|``.
        accept: optional trust region: a candidate ``theta`` is refused (and the step halved)
            unless ``accept(theta)`` is true.

    Returns:
        The maximiser found and a record (objective and gain at start and end, steps, distance,
        and ``converged``: false when ``steps`` ran out while ``J`` still rose by more than
        ``tol * |J|`` a step).
    """
    if not bool((A > 0).all()):
        raise ValueError("the penalty curvature must be positive; increase the damping/l2")

    def evaluate(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        theta = theta.detach().requires_grad_(True)
        d = theta - theta0
        G = gain(theta)
        J = G - 0.5 * (A * d * d).sum()
        (g,) = torch.autograd.grad(J, theta)
        return J.detach(), g.detach(), G.detach()

    theta = theta0.detach().clone()
    J0, g, G0 = evaluate(theta)
    J, G, eta, taken = J0, G0, step_size, 0
    converged = False  # stopped by tol, or no step up the objective remains
    for _ in range(steps):
        accepted = False
        while eta >= 1e-4:
            cand = theta + eta * g / A
            Jc, gc, Gc = evaluate(cand)
            if Jc > J and (accept is None or accept(cand)):
                accepted = True
                break
            eta /= 2
        if not accepted:
            converged = True
            break
        improvement = float(Jc - J)
        theta, J, g, G, taken = cand, Jc, gc, Gc, taken + 1
        eta = min(step_size, eta * 2)
        if improvement <= tol * abs(float(J)):
            converged = True
            break
    info = {
        "objective_start": float(J0),
        "objective_end": float(J),
        "gain_start": float(G0),
        "gain_end": float(G),
        "steps": float(taken),
        "distance": float(torch.linalg.vector_norm(theta - theta0)),
        "converged": converged,
    }
    return theta.detach(), info
