"""TracIn (Pruthi, Liu, Kale & Sundararajan 2020), TracInCP over saved checkpoints.

**Sign.** TracInCP(z, f) = sum_t eta_t grad L(theta_t, z) . grad L(theta_t, f) approximates
how much the SGD steps on ``z`` *lowered* the loss of ``f`` over training: positive TracIn
means a proponent (helpful). With ``g = grad log p = -grad L`` the dot product is the same,
and the cause score is its negative,

    r(z) = -sum_t eta_t g_z(theta_t)^T g_F(theta_t),        positive = harmful

(an opponent: its training steps raised the failures' loss). ``g_F`` is summed over the
query failures. Self-influence (``target="self"``) is ``sum_t eta_t ||g_z(theta_t)||^2``,
positive = suspicious (the paper's mislabel detector).

Checkpoints: pass ``checkpoints=[state_dict or nn.Module, ...]`` (same architecture as the
model) and ``lrs`` (a number or one per checkpoint; default 1). :class:`Checkpoints` is a
``netmend.model.training.fit(callback=...)`` that keeps them while training. Without checkpoints
the final model alone is used (then TracIn equals ``grad_dot`` times ``lrs``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from netmend._warnings import warn
from netmend.identification.base import Context, MethodOutput, NegDot, grad_rows, register
from netmend.identification.influence import (
    check_options,
    checkpoint_lrs,
    checkpoint_thetas,
    failure_grads,
    option_target,
    out_dtype,
)


class Checkpoints:
    """A ``fit(..., callback=...)`` that keeps a copy of the parameters every ``every`` steps.

    Attributes:
        every: keep a checkpoint after every ``every``-th optimiser step (1-based count).
        states: the kept ``state_dict`` copies, oldest first (pass as ``checkpoints=``).
    """

    def __init__(self, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1; got {every}")
        self.every = every
        self.states: list[dict[str, torch.Tensor]] = []

    def __call__(self, step: int, model: nn.Module) -> None:
        if (step + 1) % self.every == 0:
            # on the CPU: one copy of the model per checkpoint would fill a GPU
            self.states.append(
                {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            )


def neg_dot(V: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``G -> -G V`` (``V`` ``[P]`` or ``[P, M]``), computed by :func:`grad_rows` without
    forming ``G`` (:class:`netmend.identification.base.NegDot`)."""
    return NegDot(V)


EAGER_PER_FAILURE = 2**24
"""When ``N * M`` is at most this, the ``[N, M]`` per-failure scores are computed in the same
pass as the summed scores (which are their row sums), instead of in a second, lazy pass."""


def per_failure_pass(
    ctx: Context, thetas: list[torch.Tensor], lrs: list[float], desc: str
) -> torch.Tensor:
    """``-sum_t eta_t G_t Gf_t^T``: per-failure gradient-dot scores ``[N, M]``, one pass per
    checkpoint (``G_t`` the training gradients, ``Gf_t`` the failures', at ``theta_t``)."""
    total: torch.Tensor | None = None
    for theta, lr in zip(thetas, lrs):
        Gf = failure_grads(ctx, theta)
        part = lr * grad_rows(ctx, theta, neg_dot(Gf.T), desc)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("at least one checkpoint is needed")
    return total


TRACIN_OPTIONS = ("checkpoints", "lrs", "target")
"""The options of "tracin"."""


@register("tracin", options=TRACIN_OPTIONS)
def tracin(ctx: Context) -> MethodOutput:
    """TracInCP cause scores ``r(z) = -sum_t eta_t g_z(theta_t)^T g_F(theta_t)`` ``[N]``,
    positive = harmful.

    Options: ``checkpoints`` (list of state_dicts / modules; default: the final model only),
    ``lrs`` (learning rate per checkpoint or one number; default 1.0), ``target``
    ("failures" or "self": ``sum_t eta_t ||g_z(theta_t)||^2``, positive = suspicious).
    Per-failure scores ``[N, M]``: ``-sum_t eta_t g_z(theta_t)^T g_{f_i}(theta_t)``.
    One pass over the training set per checkpoint.
    """
    check_options(ctx, TRACIN_OPTIONS, "tracin")
    target = option_target(ctx, "tracin")
    if not ctx.options.get("checkpoints"):
        warn(
            "tracin without checkpoints scores the final model alone, which ranks the "
            "training set as grad_dot does: pass checkpoints=[state_dict, ...] saved during "
            "training for TracIn proper"
        )
    thetas = checkpoint_thetas(ctx, ctx.options.get("checkpoints"))
    lrs = checkpoint_lrs(ctx.options.get("lrs"), len(thetas))
    if target == "failures" and ctx.N * len(ctx.Xq) <= EAGER_PER_FAILURE:
        per = per_failure_pass(ctx, thetas, lrs, "tracin")  # one pass gives both
        return MethodOutput(
            scores=per.double().sum(1).numpy(),
            per_failure=per.numpy().astype(out_dtype(ctx)),
            info={"target": target, "checkpoints": len(thetas), "lrs": lrs},
        )
    sc = torch.zeros(ctx.N, dtype=torch.float64)
    for t, (theta, lr) in enumerate(zip(thetas, lrs)):
        desc = f"tracin {t + 1}/{len(thetas)}"
        if target == "self":
            sc += lr * grad_rows(ctx, theta, lambda G: (G * G).sum(1), desc).double()
        else:
            gF = ctx.failure_grad(theta)
            sc += lr * grad_rows(ctx, theta, neg_dot(gF), desc).double()

    def per_failure() -> np.ndarray:
        return per_failure_pass(ctx, thetas, lrs, "culprits").numpy().astype(out_dtype(ctx))

    return MethodOutput(
        scores=sc.numpy(),
        per_failure=per_failure,
        info={"target": target, "checkpoints": len(thetas), "lrs": lrs},
    )
