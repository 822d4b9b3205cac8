"""Gradient similarity: ``grad_dot`` and ``grad_cos`` between training and failure gradients.

**Sign.** One gradient step on the failures' loss, ``theta + eta g_F`` (``g = grad log p``),
changes ``log p(z)`` by ``eta g_z^T g_F`` to first order. A training example whose gradient
points against the failures' loses likelihood when the model is fixed: it conflicts with
them. So the cause score is

    grad_dot: r(z) = -g_z^T g_F,        grad_cos: r(z) = -sum_i cos(g_z, g_{f_i}),

positive = harmful. ``grad_dot`` is ``linear`` / ``influence`` with the identity as curvature,
and ``tracin`` on the final model alone. ``grad_cos`` (RelatIF-style normalisation) removes
the gradient norms, so that examples with large gradients (outliers, mislabelled examples)
do not dominate every ranking; each failure gets one equal vote. A zero gradient (a
saturated softmax) has cosine 0, never NaN.
"""

from __future__ import annotations

import numpy as np
import torch

from netmend.identification.base import Context, MethodOutput, grad_rows, register
from netmend.identification.influence import check_options, failure_grads, option_target, out_dtype
from netmend.identification.tracin import EAGER_PER_FAILURE, neg_dot, per_failure_pass


def unit_rows(G: torch.Tensor) -> torch.Tensor:
    """Rows of ``G`` ``[B, P]`` divided by their norms; zero rows stay zero (no NaN)."""
    norm = torch.linalg.vector_norm(G, dim=1, keepdim=True)
    return torch.where(norm > 0, G / norm.clamp_min(torch.finfo(G.dtype).tiny), torch.zeros_like(G))


@register("grad_dot", options=("target",))
def grad_dot(ctx: Context) -> MethodOutput:
    """Gradient dot product ``r(z) = -g_z^T g_F`` ``[N]``, positive = harmful.

    ``g_F`` is summed over the query failures. Options: ``target`` "failures" (default) or
    "self" (``||g_z||^2``, positive = suspicious). Per-failure scores ``[N, M]``:
    ``-g_z^T g_{f_i}``.
    """
    check_options(ctx, ("target",), "grad_dot")
    target = option_target(ctx, "grad_dot")
    theta = ctx.theta
    if target == "failures" and ctx.N * len(ctx.Xq) <= EAGER_PER_FAILURE:
        per = per_failure_pass(ctx, [theta], [1.0], "grad_dot")  # one pass gives both
        return MethodOutput(
            scores=per.double().sum(1).numpy(),
            per_failure=per.numpy().astype(out_dtype(ctx)),
            info={"target": target},
        )
    if target == "self":
        sc = grad_rows(ctx, theta, lambda G: (G * G).sum(1), "grad_dot")
    else:
        gF = ctx.failure_grad(theta)
        sc = grad_rows(ctx, theta, neg_dot(gF), "grad_dot")

    def per_failure() -> np.ndarray:
        Gf = failure_grads(ctx, theta)
        return grad_rows(ctx, theta, neg_dot(Gf.T), "culprits").numpy().astype(out_dtype(ctx))

    return MethodOutput(
        scores=sc.double().numpy(), per_failure=per_failure, info={"target": target}
    )


@register("grad_cos", options=("target",))
def grad_cos(ctx: Context) -> MethodOutput:
    """Gradient cosine similarity ``r(z) = -sum_i cos(g_z, g_{f_i})`` ``[N]``, positive = harmful.

    Each of the ``M`` failures contributes a score in ``[-1, 1]`` (so ``r`` lies in
    ``[-M, M]``). Per-failure scores ``[N, M]``: ``-cos(g_z, g_{f_i})``. No self-influence
    (the cosine of a gradient with itself is 1).
    """
    check_options(ctx, ("target",), "grad_cos")
    option_target(ctx, "grad_cos", self_ok=False)
    theta = ctx.theta
    Uf = unit_rows(failure_grads(ctx, theta))  # [M, P]
    u = Uf.sum(0)
    sc = grad_rows(ctx, theta, lambda G: -(unit_rows(G) @ u), "grad_cos")

    def per_failure() -> np.ndarray:
        return (
            grad_rows(ctx, theta, lambda G: -(unit_rows(G) @ Uf.T), "culprits")
            .numpy()
            .astype(out_dtype(ctx))
        )

    return MethodOutput(
        scores=sc.double().numpy(), per_failure=per_failure, info={"target": "failures"}
    )
