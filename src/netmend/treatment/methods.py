"""The paper's treatments: fine-tune without C, Newton removal, EWC deletion, retrain."""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..curvature import Curvature
from ..functional import summed_grad
from ..kfac import EWC_FISHER_TYPE
from ..optim import preconditioned_ascent
from ..training import fit, fresh_copy
from .base import TreatContext, register


@register("finetune")
def finetune(ctx: TreatContext) -> nn.Module:
    """Fine-tune a copy of the model, from ``theta_hat``, on ``D \\ C``.

    Options: ``epochs`` (0.5), ``lr`` (a tenth of the training rate: a small step keeps
    what the model got right), ``optimizer`` (as trained), ``batch_size``.
    """
    cfg = dataclasses.replace(
        ctx.train_config,
        epochs=float(ctx.options.get("epochs", 0.5)),
        lr=float(ctx.options.get("lr", ctx.train_config.lr / 10)),
        batch_size=int(ctx.options.get("batch_size", ctx.train_config.batch_size)),
        optimizer=str(ctx.options.get("optimizer", ctx.train_config.optimizer)),
        average_tail=float(ctx.options.get("average_tail", 0.5)),
    )
    keep = ctx.keep
    model = copy.deepcopy(ctx.model)
    return fit(model, ctx.X[keep], ctx.y[keep], cfg, ctx.seed, ctx.device, ctx.progress, "finetune")


@register("retrain")
def retrain(ctx: TreatContext) -> nn.Module:
    """Retrain from a fresh initialisation on ``D \\ C`` with the training recipe (the reference).

    Options: ``model_factory`` (a zero-argument callable returning a new, untrained model;
    by default every layer of a copy is re-initialised with ``reset_parameters()``).
    """
    factory = ctx.options.get("model_factory")
    model = factory() if factory is not None else fresh_copy(ctx.model, ctx.seed)
    keep = ctx.keep
    return fit(
        model,
        ctx.X[keep],
        ctx.y[keep],
        ctx.train_config,
        ctx.seed,
        ctx.device,
        ctx.progress,
        "retrain",
    )


def _guarded_step(
    ctx: TreatContext, theta0: torch.Tensor, direction: torch.Tensor, eta: float | str
) -> tuple[torch.Tensor, float]:
    """``theta0 + eta * direction`` with ``eta`` bounded by the retained data's loss.

    A number is used as given. "auto" takes the largest ``eta = 2^j`` (``j`` from -10 to 20)
    whose mean loss on a sample of ``D \\ C`` rises by at most ``max_retained_increase``
    (option, default 0.02 nats): a one-step removal from a diagonal curvature can overshoot
    by orders of magnitude, and the retained data says how far the step is safe.
    """
    if not isinstance(eta, str):
        return theta0 + eta * direction, float(eta)
    tol = float(ctx.options.get("max_retained_increase", 0.02))
    loss = ctx.retained_loss()
    base = loss(theta0)
    best = 0.0
    for j in range(-10, 21):
        cand = 2.0**j
        if loss(theta0 + cand * direction) - base > tol:
            break
        best = cand
    return theta0 + best * direction, best


@register("newton")
def newton(ctx: TreatContext) -> nn.Module:
    """One damped, Fisher-preconditioned Newton removal step.

    The summed objective ``L(theta) = sum_{n in D} loss_n + (lambda/2)||theta||^2`` is at its
    optimum at ``theta_hat``; removing ``C`` and taking one Newton step on what remains gives

        theta_new = theta_hat + eta * A^{-1} sum_{c in C} grad loss_c(theta_hat),

    with ``A = curvature of D \\ C + lambda I``. The step moves **up** the loss of ``C``
    (to first order the loss of ``C`` grows by ``eta * g_C^T A^{-1} g_C >= 0``).

    Options: ``step_size`` eta (a number, or "auto", the default: the largest power of two
    that keeps the retained loss within ``max_retained_increase``), ``curvature`` ("diag",
    "fisher", "ggn", "hessian", "kfac" or "ekfac"), ``damping`` (extra diagonal damping on top
    of lambda, 0), ``solver`` ("auto", "dense", "cg"), ``cg_tol``, ``cg_maxiter``,
    ``fisher_type`` and ``mc_samples`` (Kronecker
    kinds; sampled-label Fisher by default, see :mod:`netmend.kfac`).
    """
    kind = str(ctx.options.get("curvature", "diag"))
    damping = ctx.penalty_l2() + float(ctx.options.get("damping", 0.0))
    theta = ctx.fm.theta.to(ctx.device)
    keep = ctx.keep
    diag = ctx.retained_fisher() if kind == "diag" else None
    A = Curvature(
        kind,
        ctx.fm,
        theta,
        ctx.X[keep],
        ctx.y[keep],
        damping,
        diag=diag,
        chunk_size=ctx.chunk_size,
        device=ctx.device,
        cg_tol=float(ctx.options.get("cg_tol", 1e-6)),
        cg_maxiter=int(ctx.options.get("cg_maxiter", 100)),
        progress=ctx.progress,
        fisher_type=ctx.options.get("fisher_type"),
        mc_samples=int(ctx.options.get("mc_samples", 1)),
        seed=ctx.seed,
        solver=str(ctx.options.get("solver", "auto")),
    )
    # grad of the summed *loss* of C is minus the gradient of its log-likelihood
    g_loss = -summed_grad(
        ctx.fm, theta, ctx.X[ctx.causes], ctx.y[ctx.causes], ctx.chunk_size, ctx.device
    )
    new, _ = _guarded_step(ctx, theta, A.solve(g_loss), ctx.options.get("step_size", "auto"))
    return ctx.model_at(new)


@register("ewc")
def ewc_deletion(ctx: TreatContext) -> nn.Module:
    """EWC deletion: maximise the loss of ``C`` under the EWC penalty of what is retained.

        J(theta) = sum_{c in C} min(loss_c(theta), cap)
                   - 1/2 (theta - theta_hat)^T F_sum(D \\ C) (theta - theta_hat)
                   - (lambda/2) ||theta - theta_hat||^2

    Left alone, ``-log p(C|theta)`` is unbounded above; four things bound it: the cap on each
    example's loss (default ``2 log(classes)``: forget a label, do not learn its opposite),
    ``lambda > 0``, monotone backtracked steps (see :mod:`netmend.optim`), and a trust
    region: a step is refused if the mean loss on a sample of the retained data rises by more
    than ``max_retained_increase`` (default 0.02 nats) over ``theta_hat``.

    ``F_sum(D \\ C)`` is the diagonal empirical Fisher (``curvature="diag"``, default) or a
    Kronecker-factored one (``"kfac"``, ``"ekfac"``; empirical Fisher by default, option
    ``fisher_type``), whose penalty is the exact Kronecker quadratic form. The ascent is then
    preconditioned by that form's diagonal plus lambda: :func:`preconditioned_ascent` takes a
    diagonal, so its diagonal penalty is cancelled inside the gain and the objective is exactly
    ``J`` above.

    Options: ``steps`` (10), ``step_size`` (1.0), ``cap``, ``max_retained_increase``,
    ``curvature``, ``fisher_type``, ``mc_samples``.
    """
    kind = str(ctx.options.get("curvature", "diag"))
    if kind not in ("diag", "kfac", "ekfac"):
        raise ValueError(
            f"unknown curvature {kind!r} for the ewc treatment; choose 'diag', 'kfac' or 'ekfac'"
        )
    theta0 = ctx.fm.theta.to(ctx.device)
    Xc, yc = ctx.X[ctx.causes].to(ctx.device), ctx.y[ctx.causes].to(ctx.device)
    with torch.no_grad():
        classes = ctx.fm.logits(theta0, Xc[:1]).shape[1]
    cap = float(ctx.options.get("cap", 2 * math.log(classes)))
    chunk = max(ctx.chunk_size, 1024)
    tol = float(ctx.options.get("max_retained_increase", 0.02))
    retained = ctx.retained_loss()
    base = retained(theta0)

    def gain(theta: torch.Tensor) -> torch.Tensor:
        total = theta.new_zeros(())
        for i in range(0, Xc.shape[0], chunk):
            z = ctx.fm.logits(theta, Xc[i : i + chunk])
            ce = F.cross_entropy(z, yc[i : i + chunk], reduction="none")
            total = total + ce.clamp(max=cap).sum()
        return total

    objective, precond = gain, ctx.retained_fisher() if kind == "diag" else None
    if precond is None:
        keep = ctx.keep
        K = Curvature(
            kind,
            ctx.fm,
            theta0,
            ctx.X[keep],
            ctx.y[keep],
            ctx.penalty_l2(),
            chunk_size=ctx.chunk_size,
            device=ctx.device,
            progress=ctx.progress,
            fisher_type=ctx.options.get("fisher_type", EWC_FISHER_TYPE),
            mc_samples=int(ctx.options.get("mc_samples", 1)),
            seed=ctx.seed,
        )
        precond = K.factors.diagonal()  # type: ignore[union-attr]  # set for Kronecker kinds

        def objective(theta: torch.Tensor) -> torch.Tensor:
            # - 1/2 d^T F d, with the ascent's own - 1/2 d^T diag(F) d added back
            d = theta - theta0
            return gain(theta) - 0.5 * K.quadratic(d) + 0.5 * (precond * d * d).sum()

    theta, _ = preconditioned_ascent(
        objective,
        theta0,
        precond + ctx.penalty_l2(),
        steps=int(ctx.options.get("steps", 10)),
        step_size=float(ctx.options.get("step_size", 1.0)),
        accept=lambda t: retained(t) - base <= tol,
    )
    return ctx.model_at(theta)
