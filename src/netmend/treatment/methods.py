"""The paper's treatments: fine-tune without C, Newton removal, EWC deletion, retrain."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netmend._warnings import warn
from netmend.curvature import SOLVER_OPTIONS, Curvature, solver_options
from netmend.curvature.kfac import EWC_FISHER_TYPE
from netmend.data.task import rows
from netmend.model.functional import summed_grad
from netmend.model.optim import preconditioned_ascent
from netmend.model.training import TrainConfig, fit, fresh_copy
from netmend.treatment.base import TreatContext, register

FINETUNE_MIN_STEPS = 500
"""Fewest optimiser steps of a default "finetune" (see :func:`finetune_recipe`)."""

FINETUNE_RECIPE_OPTIONS = (
    "steps", "epochs", "min_steps", "lr", "batch_size", "optimizer", "average_tail",
    "freeze_batchnorm",
)  # fmt: skip
"""The options of "finetune" (:func:`finetune_recipe`)."""
NEWTON_OPTIONS = ("step_size", "max_retained_increase", "curvature", "damping", *SOLVER_OPTIONS)
"""The options of "newton"."""
EWC_OPTIONS = (
    "steps", "step_size", "cap", "max_retained_increase", "curvature", "fisher_type",
    "mc_samples",
)  # fmt: skip
"""The options of the "ewc" treatment."""


def warn_default_recipe(ctx: TreatContext) -> None:
    """Warn when a fine-tune's recipe comes from ``TrainConfig()`` rather than the user's.

    The fine-tune runs at the training learning rate for a length sized by the training's
    steps; neither is known without ``train_config``. With ``TrainConfig()`` (Adam at 1e-3, 3
    epochs) a model trained at 5e-2 for 200 epochs barely moved: 1 of 77 failures repaired,
    even with the true causes removed, against 71 of 77 with its recipe (outside-in trial).
    """
    if ctx.train_config_given or "lr" in ctx.options:
        return
    c = TrainConfig()
    warn(
        f"no train_config: the fine-tune assumes the model was trained with TrainConfig() "
        f"({c.optimizer}, lr {c.lr:g}, batch {c.batch_size}, {c.epochs:g} epochs) and runs at "
        "that rate; pass train_config=TrainConfig(...) with the recipe the model was trained "
        "with (or the treatment option lr), or a model trained at another rate may barely move"
    )


def finetune_recipe(
    train_config: TrainConfig,
    n_train: int,
    n_retained: int,
    options: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """The recipe of the "finetune" treatment: the training recipe, resized.

    Default: the training learning rate and optimiser at a constant rate, the parameters
    averaged over the last half of the steps (Polyak-Ruppert), and

        steps = max(one epoch of D \\ C, min(FINETUNE_MIN_STEPS, steps the model trained for))

    with the training batch size, the training length being ``train_config.epochs * N /
    batch_size``. Small data gets up to 500 steps (the 1,348 digits trained for 40 epochs:
    421 steps, i.e. as long as training); never more steps than training took, since a
    fine-tune dearer than retraining is pointless; large data gets one epoch (60,000 MNIST
    images: 469 steps, half of the demo's 2-epoch training).

    Why steps at the training rate: a network forgets a memorised example only through the
    gradients of the retained examples near it, and how far those move it is set by the
    number of optimiser steps times the learning rate, not by how often each example is
    seen. The former default, half an epoch at a tenth of the rate, is 5 steps at lr/10 on
    the digits: with exactly the corrupted examples removed ("oracle-causes" of
    ``netmend bench``: symmetric, pair, CIFAR-10N-worst, backdoor and noisy-input
    corruption, seeds 0-2, MLP) it left the held-out failures at 0-6% accuracy against
    34-73% for retraining on clean data, and test accuracy at 92.1-96.6%. This default
    reaches 45-69% on the held-out failures and 97.0-97.8% test accuracy (retraining on
    clean data: 97.3%). With the true causes removed, repair grows monotonically with the
    steps (digits, failures repaired after 100/200/400 steps: 35/46/60%, test accuracy
    96.0/96.7/97.3%); a linear or cosine decay of the rate to zero repaired less at the
    same cost (53-54% at 400 steps) and never kept test accuracy better, so the rate is
    constant. On MNIST (8,000 retained of 10,000, SmallCNN trained 2 epochs), 400 steps at
    the training rate repaired 66-85% of the failures at 97.3-97.4% test accuracy; at a
    tenth of it, 43-68% at 94.8-94.9%.

    A long fine-tune follows the data it is given: when the causes hold many clean
    examples of a few classes (e.g. ``knn_shapley`` valued on the failures alone,
    ``valid=None``, selects half of the digits), it forgets those classes (digits test
    accuracy 58-62%, against 92-96% with the former default). Such imprecise cause sets
    call for the "relabel" treatment or a smaller ``k``, or a shorter fine-tune
    (``steps``/``epochs``).

    Args:
        train_config: the recipe the model was trained with.
        n_train: ``N``, the size of the training set it was trained on.
        n_retained: ``|D \\ C|``, the number of examples fine-tuned on.
        options: ``steps`` (an exact number of optimiser steps), ``epochs`` (an exact number
            of passes over ``D \\ C``, e.g. 0.5; with neither, the default above),
            ``min_steps`` (the floor of the default, 500), ``lr`` (the training rate),
            ``batch_size``, ``optimizer`` (as trained), ``average_tail`` (0.5),
            ``freeze_batchnorm`` (True: BatchNorm layers keep the trained model's running
            statistics; see :class:`~netmend.model.training.TrainConfig`).

    Returns:
        The :class:`TrainConfig` to pass to :func:`netmend.model.training.fit` on ``D \\ C``.

    Raises:
        ValueError: both ``steps`` and ``epochs`` are given, or either is not positive, or
            ``D \\ C`` is empty.
    """
    opts = dict(options or {})
    if n_retained <= 0:
        raise ValueError("the causes cover the whole training set: nothing is left to fine-tune on")
    if "steps" in opts and "epochs" in opts:
        raise ValueError("give the finetune treatment 'steps' or 'epochs', not both")
    batch = int(opts.get("batch_size", train_config.batch_size))
    if "epochs" in opts:
        epochs = float(opts["epochs"])
    else:
        if "steps" in opts:
            steps = int(opts["steps"])
        else:
            trained = max(1, round(train_config.epochs * n_train / train_config.batch_size))
            floor = min(int(opts.get("min_steps", FINETUNE_MIN_STEPS)), trained)
            steps = max(floor, math.ceil(n_retained / batch))
        if steps <= 0:
            raise ValueError(f"finetune needs at least one step; got steps={steps}")
        epochs = steps * batch / n_retained  # fit() rounds epochs * n / batch back to steps
    return dataclasses.replace(
        train_config,
        epochs=epochs,
        lr=float(opts.get("lr", train_config.lr)),
        batch_size=batch,
        optimizer=str(opts.get("optimizer", train_config.optimizer)),
        average_tail=float(opts.get("average_tail", 0.5)),
        freeze_batchnorm=bool(opts.get("freeze_batchnorm", True)),
    )


@register("finetune", options=(*FINETUNE_RECIPE_OPTIONS, "keep_prior"))
def finetune(ctx: TreatContext) -> nn.Module:
    """Fine-tune a copy of the model, from ``theta_hat``, on ``D \\ C``.

    The recipe is :func:`finetune_recipe`: by default ``max(one epoch, min(500, the
    training's steps))`` optimiser steps at the training learning rate, tail-averaged over
    the last half (the reasons and the measurements behind them are in its docstring).
    Options: ``steps`` or ``epochs``, ``min_steps``, ``lr``, ``batch_size``, ``optimizer``,
    ``average_tail``, ``freeze_batchnorm``, and ``keep_prior`` (default False: weight each
    retained example's loss by :func:`prior_weights`, so that removing causes of one label
    does not also lower that label's share of the fine-tune's data).
    """
    keep = ctx.keep
    warn_default_recipe(ctx)
    cfg = finetune_recipe(ctx.train_config, len(ctx.X), int(keep.sum()), ctx.options)
    weight = prior_weights(ctx.y, keep) if ctx.options.get("keep_prior", False) else None
    model = copy.deepcopy(ctx.model)
    return fit(
        model,
        ctx.X[keep],
        ctx.y[keep],
        cfg,
        ctx.seed,
        ctx.device,
        ctx.progress,
        "finetune",
        class_weight=weight,
    )


def prior_weights(y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-label loss weights ``[C]`` that give ``D \\ C`` the label shares of ``D``.

    ``w_c = (n_c / N) / (n'_c / N')`` with ``n_c`` the examples labelled ``c`` in ``D`` and
    ``n'_c`` in ``D \\ C``: the weights sum to ``N'`` over ``D \\ C`` (the loss keeps its
    scale) and each label's total weight is its share of ``D``. Removing 1,000 causes
    labelled "T-shirt" from 6,000 otherwise lowers that label's prior by a sixth, a logit
    bias of ``log(5/6) = -0.18`` against the class on every input, on top of what the
    removed examples themselves taught. Labels with no retained example get weight 0.

    Args:
        y: hard labels ``[N]`` of the training set.
        keep: boolean mask ``[N]`` of ``D \\ C``.

    Returns:
        ``[C]`` float32 weights, ``C = max(y) + 1``.

    Raises:
        ValueError: ``y`` holds soft targets ``[N, C]``.
    """
    if y.ndim != 1:
        raise ValueError("keep_prior needs hard labels [N], not soft targets [N, C]")
    labels = y.long().cpu()
    mask = keep.cpu().bool()
    c = int(labels.max()) + 1 if labels.numel() else 0
    n = torch.bincount(labels, minlength=c).double()
    kept = torch.bincount(labels[mask], minlength=c).double()
    share = n / max(1, labels.numel())
    kept_share = kept / max(1, int(mask.sum()))
    w = torch.where(kept > 0, share / kept_share.clamp_min(1e-300), torch.zeros_like(share))
    return w.float()


@register("retrain", options=("model_factory",))
def retrain(ctx: TreatContext) -> nn.Module:
    """Retrain from a fresh initialisation on ``D \\ C`` with the training recipe (the reference).

    The recipe must be the one the model was trained with (``train_config=`` of
    :func:`netmend.treat`); without it this raises instead of retraining with a default
    recipe that would make a poor reference (3 epochs at lr 1e-3 gave 0.11-0.39 test
    accuracy where the real recipe gave 0.891, issue 13).

    Options: ``model_factory`` (a zero-argument callable returning a new, untrained model;
    by default every trainable layer of a copy is re-initialised with ``reset_parameters()``
    and frozen parameters keep their values, see
    :func:`netmend.model.training.fresh_copy`).

    Raises:
        ValueError: no ``train_config`` was given.
    """
    if not ctx.train_config_given:
        raise ValueError(
            "the 'retrain' treatment needs the recipe the model was trained with: pass "
            "train_config=TrainConfig(epochs=..., lr=..., batch_size=..., ...) to treat()/repair()"
        )
    keep = ctx.keep
    if not keep.any():  # as finetune: fit() on nothing would return the untrained model
        raise ValueError("the causes cover the whole training set: nothing is left to retrain on")
    factory = ctx.options.get("model_factory")
    model = factory() if factory is not None else fresh_copy(ctx.model, ctx.seed)
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


_DELETION_EVIDENCE = (
    "breaks a converged CNN: on the demo (full MNIST, SmallCNN trained to convergence, seeds "
    "0-2) it took test accuracy from 98.8% to 84-88% with the default's causes "
    "(benchmarks/demo_seeds.json); use 'finetune' or 'relabel'"
)
DELETION_RESEARCH = f"one-step Newton deletion {_DELETION_EVIDENCE}"
"""Why "newton" is research-only."""
EWC_DELETION_RESEARCH = (
    f"EWC deletion (raising the causes' loss under the EWC penalty) {_DELETION_EVIDENCE}"
)
"""Why "ewc" (the treatment) is research-only: its own name, not newton's one-step reason
(found by an outside-in trial)."""


@register("newton", options=NEWTON_OPTIONS, research=DELETION_RESEARCH)
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
    of lambda, 0), and the solver's options (:data:`netmend.curvature.SOLVER_OPTIONS`:
    ``solver`` "auto"/"dense"/"cg", ``cg_tol``, ``cg_maxiter``; for the Kronecker kinds
    ``fisher_type``, ``mc_samples`` and the subsample sizes ``covariance_max_examples``,
    ``correction_max_examples``; sampled-label Fisher by default, see
    :mod:`netmend.curvature.kfac`).
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
        progress=ctx.progress,
        seed=ctx.seed,
        **solver_options(ctx.options),
    )
    # grad of the summed *loss* of C is minus the gradient of its log-likelihood
    g_loss = -summed_grad(
        ctx.fm, theta, ctx.X[ctx.causes], ctx.y[ctx.causes], ctx.chunk_size, ctx.device
    )
    new, _ = _guarded_step(ctx, theta, A.solve(g_loss), ctx.options.get("step_size", "auto"))
    return ctx.model_at(new)


EWC_MIN_RISE = 0.01
"""The causes' mean loss (nats) an ``ewc`` deletion must raise before it is said to have done
nothing."""


@register("ewc", options=EWC_OPTIONS, research=EWC_DELETION_RESEARCH)
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
    # the causes' inputs, read once (K examples): the gain is evaluated at every step
    Xc, yc = ctx.X[ctx.causes].to(ctx.device), ctx.y[ctx.causes].to(ctx.device)
    with torch.no_grad():
        classes = ctx.fm.logits(theta0, rows(Xc, slice(0, 1))).shape[1]
    cap = float(ctx.options.get("cap", 2 * math.log(classes)))
    chunk = max(ctx.chunk_size, 1024)
    tol = float(ctx.options.get("max_retained_increase", 0.02))
    retained = ctx.retained_loss()
    base = retained(theta0)

    def gain(theta: torch.Tensor) -> torch.Tensor:
        total = theta.new_zeros(())
        for i in range(0, len(yc), chunk):
            z = ctx.fm.logits(theta, rows(Xc, slice(i, i + chunk)))
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
    with torch.no_grad():
        rise = float(gain(theta) - gain(theta0)) / max(len(yc), 1)
    if rise < EWC_MIN_RISE:  # an outside-in trial: no prediction changed, no word
        warn(
            "the ewc deletion barely moved the model: the causes' mean loss rose by under "
            f"{EWC_MIN_RISE:g} nats, so it forgets nothing. Its penalty (l2 and the retained "
            "examples' Fisher) "
            "holds the parameters in place: pass a smaller l2 (e.g. l2=1.0), or use the "
            "'finetune' treatment"
        )
    return ctx.model_at(theta)
