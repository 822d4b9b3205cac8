"""Relabelling: give each cause the label the failure-adapted model predicts, and fine-tune.

A mislabelled training example still teaches its input: deleting it also deletes that. Here
each cause keeps its input and takes the label of the model fitted to the failures,
``theta_+F``; the model is then fine-tuned from ``theta_hat`` on the whole training set with
the new labels.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapted import (
    FINETUNE_OPTIONS,
    FIT_OPTIONS,
    check_hard,
    check_options,
    check_temperature,
    finetune_layers,
    layer_names,
    predictive,
    theta_plus_f,
)
from .base import TreatContext, register

RELABEL_OPTIONS = ("hard", "temperature", *FINETUNE_OPTIONS, *FIT_OPTIONS)


@register("relabel")
def relabel(ctx: TreatContext) -> nn.Module:
    """Replace each cause's label by ``theta_+F``'s prediction, then fine-tune on all of ``D``.

    With ``hard=True`` (default) a cause's new label is ``argmax f_{theta_+F}(x_c)``, so only
    causes whose ``theta_+F`` prediction differs from their label change; with ``hard=False``
    every cause's target becomes ``softmax(f_{theta_+F}(x_c) / temperature)`` (the other
    examples keep their one-hot labels) and the loss is the soft-target cross-entropy.

    Options:
        hard (True), temperature (1.0; soft labels only), layers ("all", as the "finetune"
        treatment; ``None`` for the last ``nn.Linear``, an int ``k`` or module names as in
        "align"), epochs (0.5), lr (a tenth of the training rate), batch_size, optimizer,
        average_tail (0.5), fit_steps / fit_step_size (only when ``theta_+F`` is fitted here).

    Record (``ctx.record``, CPU tensors, one entry per cause in
    ``ctx.causes`` order, i.e. sorted training indices): ``causes``
    ``[K]``, ``old_labels`` ``[K]``, ``new_labels`` ``[K]`` (argmax under ``theta_+F``),
    ``changed`` (bool ``[K]``: new != old), ``n_changed``, ``transitions`` (``{(old, new):
    count}`` over the changed causes), and ``soft_labels`` ``[K, classes]`` when ``hard=False``.
    """
    check_options(ctx, RELABEL_OPTIONS, "relabel")
    hard = check_hard(ctx.options.get("hard", True))
    temperature = check_temperature(ctx.options.get("temperature", 1.0))
    layers = layer_names(ctx.model, ctx.options.get("layers", "all"))

    theta_f = theta_plus_f(ctx)
    probs = predictive(ctx, theta_f, ctx.X[ctx.causes], temperature)
    old = ctx.y[ctx.causes].clone()
    new = probs.argmax(1)
    targets: torch.Tensor
    if hard:
        targets = ctx.y.clone()
        targets[ctx.causes] = new
    else:
        targets = torch.nn.functional.one_hot(ctx.y, probs.shape[1]).to(probs.dtype)
        targets[ctx.causes] = probs
    model = finetune_layers(ctx, ctx.X, targets, layers, "relabel")
    changed = new != old
    pairs, counts = torch.unique(
        torch.stack([old[changed], new[changed]], 1), dim=0, return_counts=True
    )
    ctx.record.update(
        causes=ctx.causes.clone(),
        old_labels=old,
        new_labels=new,
        changed=changed,
        n_changed=int(changed.sum()),
        transitions={(int(a), int(b)): int(c) for (a, b), c in zip(pairs.tolist(), counts)},
        layers=layers,
    )
    if not hard:
        ctx.record["soft_labels"] = probs
    return model
