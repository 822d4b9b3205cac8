"""Linear influence: one Fisher-preconditioned natural-gradient step towards the failures.

``theta_+F ~= theta_hat + gamma * A^{-1} g_F`` with ``g_F = grad log p(F_q|theta_hat)``
(summed) and ``A = F_sum + lambda I`` the damped curvature, so to first order

    r(z) = log p(z|theta_hat) - log p(z|theta_+F) = -gamma * g_z^T A^{-1} g_F,

positive = harmful. ``A`` is the diagonal empirical Fisher (``curvature="diag"``, default),
the full empirical Fisher / GGN / Hessian solved by conjugate gradients (``"fisher"``,
``"ggn"``, ``"hessian"``), or a Kronecker-factored Fisher solved exactly (``"kfac"``,
``"ekfac"``; sampled-label Fisher by default, see :mod:`netmend.curvature.kfac`).
``g_z^T v`` for every training example comes from one forward-mode (jvp) pass.
"""

from __future__ import annotations

import numpy as np
import torch

from netmend.curvature import SOLVER_OPTIONS, Curvature, solver_options
from netmend.data.validate import number_option
from netmend.identification.base import Context, MethodOutput, register
from netmend.model.functional import stream


def curvature_for(ctx: Context, kind: str) -> Curvature:
    """The damped curvature ``A`` of kind ``kind`` (see :data:`netmend.curvature.CURVATURE_KINDS`).

    Options read from ``ctx.options``: ``solver`` ("auto": dense Cholesky for small models,
    else CG; "dense"; "cg"), ``cg_tol``, ``cg_maxiter`` (CG kinds), ``fisher_type``,
    ``mc_samples``, ``covariance_max_examples`` and ``correction_max_examples``
    ("kfac"/"ekfac"; sampled labels and subsamples are seeded with ``ctx.seed``).
    """
    if kind == "diag":
        return ctx.diag_curvature()
    return Curvature(
        kind,
        ctx.fm,
        ctx.theta,
        ctx.X,
        ctx.y,
        ctx.lam(),
        chunk_size=ctx.chunk_size,
        device=ctx.device,
        progress=ctx.progress,
        seed=ctx.seed,
        **solver_options(ctx.options),
    )


@register("linear", options=("curvature", "gamma", *SOLVER_OPTIONS))
def linear_influence(ctx: Context) -> MethodOutput:
    """Cause scores ``r(z) = -gamma g_z^T A^{-1} g_F``, ``[N]``, positive = harmful.

    Options: ``curvature`` ("diag"; or "fisher", "ggn", "hessian", "kfac", "ekfac"), ``gamma``
    (1.0), ``cg_tol``, ``cg_maxiter``, ``fisher_type`` and ``mc_samples`` (Kronecker kinds).
    """
    gamma = number_option(ctx.options, "gamma", 1.0, strict=True)  # <= 0: no step, or away
    A = curvature_for(ctx, str(ctx.options.get("curvature", "diag")))
    v = A.solve(ctx.failure_grad())  # [P]
    theta = ctx.theta

    def directional(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ctx.fm.ll_jvp(theta, v, x, t)[1]

    gv = stream(ctx.X, ctx.y, directional, ctx.chunk_size, ctx.device, ctx.progress, "linear")
    scores = (-gamma * gv).double().numpy()
    return MethodOutput(
        scores=np.asarray(scores),
        per_failure=lambda: gamma * ctx.per_failure_scores(A),  # summing to the scores
    )
