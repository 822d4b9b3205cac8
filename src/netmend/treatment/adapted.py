"""Shared machinery of the treatments that learn from the failure-adapted model ``theta_+F``.

"align" and "relabel" correct the causes instead of deleting them: they ask the model fitted
to the failures, ``theta_+F`` (the EWC fit of :func:`netmend.identification.ewc.fit_theta_plus_f`),
what a cause should look like or be labelled, then fine-tune a copy of the model from
``theta_hat``. This module resolves ``theta_+F``, computes its predictive distributions,
chooses the layers to fine-tune and runs the fine-tune with the other layers frozen.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from netmend.data.streaming import chunks
from netmend.model.functional import Data
from netmend.model.training import TrainConfig, fit
from netmend.treatment.base import TreatContext

RECIPE_OPTIONS = ("epochs", "lr", "batch_size", "optimizer", "average_tail", "min_steps")
"""The options of "relabel"/"align" that size their fine-tune (``steps`` is not one of them:
in "align" it counts energy steps)."""

FINETUNE_OPTIONS = (*RECIPE_OPTIONS, "layers")
"""Options of the fine-tune shared by "align" and "relabel"."""

FIT_OPTIONS = ("fit_steps", "fit_step_size")
"""Options of the ``theta_+F`` fit, used only when ``theta_plus_f`` is not given."""


def check_options(ctx: TreatContext, allowed: Iterable[str], method: str) -> None:
    """Raise a ``ValueError`` naming any option ``method`` does not know."""
    known = set(allowed)
    unknown = sorted(set(ctx.options) - known)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for treatment {method!r}; it accepts {sorted(known)}"
        )


def theta_plus_f(ctx: TreatContext) -> torch.Tensor:
    """The failure-adapted parameters ``theta_+F`` ``[P]`` on ``ctx.device``.

    Uses ``ctx.theta_plus_f`` when given; otherwise fits it on ``ctx.failures`` exactly as the
    "ewc" identification does (same ``l2``; options ``fit_steps``, default 30, and
    ``fit_step_size``, default 1.0) and keeps it (and the Fisher) on the context.

    Raises:
        ValueError: neither ``theta_+F`` nor the failures are available.
    """
    if ctx.theta_plus_f is not None:
        if tuple(ctx.theta_plus_f.shape) != (ctx.fm.num_params,):
            raise ValueError(
                f"theta_plus_f has shape {tuple(ctx.theta_plus_f.shape)} but the model has "
                f"{ctx.fm.num_params} trainable parameters"
            )
        return ctx.theta_plus_f.to(ctx.device, ctx.fm.theta.dtype)
    if ctx.failures is None:
        raise ValueError(
            "this treatment needs the failure-adapted model theta_+F: pass failures=(X_F, y_F) "
            "to netmend.treat (or theta_plus_f=Identification.info['theta_plus_f'] from "
            "netmend.identify(..., method='ewc')); netmend.repair passes both"
        )
    from netmend.identification.base import Context
    from netmend.identification.ewc import fit_theta_plus_f

    Xf, yf = ctx.failures
    steps = int(ctx.options.get("fit_steps", 30))
    step_size = float(ctx.options.get("fit_step_size", 1.0))
    if steps < 1 or not step_size > 0:
        raise ValueError(f"fit_steps must be >= 1 and fit_step_size > 0; got {steps}, {step_size}")
    ictx = Context(
        ctx.fm,
        ctx.X,
        ctx.y,
        Xf,
        yf,
        ctx.device,
        ctx.chunk_size,
        ctx.progress,
        ctx.seed,
        ctx.l2,
        {},
        ctx.fisher,
    )
    ctx.fisher = ictx.fisher.cpu() if ictx.fisher is not None else None
    theta, _ = fit_theta_plus_f(ictx, steps, step_size)
    ctx.theta_plus_f = theta.detach().cpu()
    return theta.detach()


@torch.no_grad()
def predictive(
    ctx: TreatContext, theta: torch.Tensor, X: Data, temperature: float = 1.0
) -> torch.Tensor:
    """``softmax(f_theta(x) / temperature)`` for every row of ``X``: ``[N, classes]`` on CPU."""
    if len(X) == 0:  # no rows (no causes): the right width, from one training example
        width = ctx.fm.logits(theta, ctx.X[:1].to(ctx.device)).shape[1]
        return torch.zeros(0, width, dtype=theta.dtype)
    out = [
        torch.softmax(ctx.fm.logits(theta, X[s].to(ctx.device)) / temperature, dim=1).cpu()
        for s in chunks(len(X), max(ctx.chunk_size, 1024))
    ]
    return torch.cat(out)


def check_temperature(value: Any) -> float:
    """A positive, finite temperature, or a ``ValueError``."""
    t = float(value)
    if not 0 < t < float("inf"):
        raise ValueError(f"temperature must be a positive number; got {value!r}")
    return t


def check_hard(value: Any) -> bool:
    """A ``bool`` option, or a ``ValueError`` (``"False"`` would otherwise be truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"hard must be True or False; got {value!r}")
    return value


def layer_names(model: nn.Module, layers: Any) -> list[str] | None:
    """Names of the submodules whose parameters a fine-tune may change (``None``: all of them).

    Args:
        model: the model.
        layers: "all" (every parameter), ``None`` (the last ``nn.Linear`` in registration
            order), an int ``k`` (the last ``k`` submodules that own parameters, in registration
            order), or a sequence of submodule names (as in ``model.named_modules()``).

    Raises:
        ValueError: an unknown name, a module without parameters, ``k < 1``, or no
            ``nn.Linear`` for the default.
    """
    if isinstance(layers, str) and layers == "all":
        return None
    owners = [n for n, m in model.named_modules() if any(True for _ in m.parameters(False))]
    if layers is None:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linear:
            raise ValueError(
                "the model has no nn.Linear layer to fine-tune by default: pass layers= (an int "
                "k for the last k layers with parameters, a list of module names, or 'all')"
            )
        return [linear[-1]]
    if (
        isinstance(layers, bool)
        or not isinstance(layers, (int, Sequence))
        or isinstance(layers, str)
    ):
        raise ValueError(
            f"layers must be None, 'all', an int or a list of module names; got {layers!r}"
        )
    if isinstance(layers, int):
        if not 1 <= layers <= len(owners):
            raise ValueError(
                f"layers={layers}: the model has {len(owners)} modules with parameters; pass "
                f"1..{len(owners)}"
            )
        return owners[-layers:]
    names = [str(n) for n in layers]
    bad = [n for n in names if n not in owners]
    if bad or not names:
        raise ValueError(
            f"layers {bad or names} are not modules with parameters of this model; choose "
            f"among {owners}"
        )
    return names


def finetune_config(ctx: TreatContext, n_examples: int) -> TrainConfig:
    """The fine-tune recipe on ``n_examples``: the "finetune" treatment's default
    (:func:`netmend.treatment.methods.finetune_recipe`: at least one epoch and up to 500
    optimiser steps at the training rate, tail-averaged), overridable by
    :data:`RECIPE_OPTIONS`, so that deleting, relabelling and aligning differ in what they
    train on, not for how long."""
    from netmend.treatment.methods import (  # local: methods registers treatments on import
        finetune_recipe,
        warn_default_recipe,
    )

    warn_default_recipe(ctx)
    opts = {k: ctx.options[k] for k in RECIPE_OPTIONS if k in ctx.options}
    return finetune_recipe(ctx.train_config, int(len(ctx.X)), n_examples, opts)


def finetune_layers(
    ctx: TreatContext,
    X: Data,
    targets: torch.Tensor,
    layers: list[str] | None,
    desc: str,
) -> nn.Module:
    """Fine-tune a copy of ``ctx.model`` from ``theta_hat`` on ``(X, targets)``.

    Args:
        ctx: the treatment context (its model is copied, never changed).
        X: inputs ``[n, ...]``.
        targets: class indices ``[n]`` (int64) or class probabilities ``[n, classes]`` (rows
            sum to 1; the loss is then the soft-target cross-entropy
            ``-sum_k p_k log softmax(f(x))_k``, which ``F.cross_entropy`` computes).
        layers: names of the submodules to train (:func:`layer_names`); ``None`` trains all.
        desc: the progress bar's label.

    Returns:
        The fine-tuned copy in eval mode. Parameters outside ``layers`` are bit-identical to
        the original's (restored after training: tail averaging would otherwise round them),
        and every parameter keeps its original ``requires_grad``.
    """
    cfg = finetune_config(ctx, int(len(X)))
    model = copy.deepcopy(ctx.model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    trained: set[str] = set()
    if layers is None:
        trained = {n for n, f in flags.items() if f}
    else:
        modules = dict(model.named_modules())
        for name in layers:
            prefix = f"{name}." if name else ""
            trained |= {
                prefix + n for n, p in modules[name].named_parameters() if flags[prefix + n]
            }
    if not trained:
        raise ValueError(f"layers {layers} hold no trainable parameters")
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained)
    fit(model, X, targets, cfg, ctx.seed, ctx.device, ctx.progress, desc)
    original = dict(ctx.model.named_parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n not in trained:
                p.copy_(original[n])
            p.requires_grad_(flags[n])
    return model.eval()
