"""EWC-influence (Tanno et al. 2022, the paper's preferred estimator).

Fit ``theta_+F`` by maximising, from ``theta_hat``,

    J(theta) = sum_{f in F_q} log p(f|theta)
               - 1/2 (theta - theta_hat)^T F_sum (theta - theta_hat)
               - (lambda/2) ||theta - theta_hat||^2,

with ``F_sum = N * F_mean`` the summed diagonal empirical Fisher (the log-likelihood of the
failures is summed too, so both terms are on the same scale), then score every training
example by ``r(z) = log p(z|theta_hat) - log p(z|theta_+F)``: positive = harmful.

The ascent is preconditioned by the penalty's own curvature ``A = F_sum + lambda I``
(a natural-gradient step), with backtracking so that ``J`` never decreases; the first step
from ``theta_hat`` with unit step size is exactly the ``linear`` method's step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from netmend._warnings import warn
from netmend.data.validate import number_option
from netmend.identification.base import Context, MethodOutput, register
from netmend.model.functional import log_likelihoods
from netmend.model.optim import preconditioned_ascent


def fit_theta_plus_f(
    ctx: Context, steps: int = 30, step_size: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Maximise the EWC objective ``J`` over the query failures; return ``theta_+F`` ``[P]``.

    Args:
        ctx: identification context (its ``l2`` is ``lambda``).
        steps: most preconditioned ascent steps.
        step_size: initial step size of the backtracking ascent.

    Returns:
        ``theta_+F`` and a record of the fit (objective, failure log-likelihood, distance).
    """
    Xq, yq = ctx.Xq.to(ctx.device), ctx.yq.to(ctx.device)
    return preconditioned_ascent(
        lambda t: ctx.fm.ll(t, Xq, yq).sum(),  # summed: same scale as the N-scaled penalty
        ctx.theta,
        ctx.fisher_diag() + ctx.lam(),
        steps=steps,
        step_size=step_size,
    )


@register("ewc", options=("steps", "step_size"))
def ewc_influence(ctx: Context) -> MethodOutput:
    """EWC-influence cause scores ``r(z) = log p(z|theta_hat) - log p(z|theta_+F)`` ``[N]``.

    Options (``ctx.options``): ``steps`` (30), ``step_size`` (1.0).
    Per-failure culprits use the same curvature, linearised per failure (see
    :meth:`Context.per_failure_scores`): a separate fit per failure would cost a pass each.
    """
    theta_f, info = fit_theta_plus_f(
        ctx,
        steps=number_option(ctx.options, "steps", 30, integer=True, low=1),
        step_size=number_option(ctx.options, "step_size", 1.0, strict=True),
    )
    if not info.get("converged", True):  # an outside trial: 5% from the optimum at l2=1, no word
        warn(
            f"ewc: the fit of theta_+F used all its steps={int(info['steps'])} while its "
            "objective was still rising: the scores approximate those of the converged fit. "
            "Raise the option steps (e.g. steps=300), or use a larger l2"
        )
    kw: dict[str, Any] = dict(chunk_size=ctx.chunk_size, device=ctx.device, progress=ctx.progress)
    before = ctx.shared.get("ll_theta_hat")  # the same for every set of failures
    if before is None:
        before = ctx.shared["ll_theta_hat"] = log_likelihoods(ctx.fm, ctx.theta, ctx.X, ctx.y, **kw)
    after = log_likelihoods(ctx.fm, theta_f, ctx.X, ctx.y, **kw)
    scores = (before - after).double().numpy()
    precond = ctx.diag_curvature()
    return MethodOutput(
        scores=np.asarray(scores),
        per_failure=lambda: ctx.per_failure_scores(precond),
        info={**info, "theta_plus_f": theta_f.cpu()},
    )
