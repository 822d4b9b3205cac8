"""Relabelling: give each cause a label from a source that has not memorised it, and fine-tune.

A mislabelled training example still teaches its input: deleting it also deletes that. Here
each cause keeps its input and takes a new label from a label source
(:mod:`netmend.treatment.labels`: by default the vote of its nearest neighbours in the
model's embedding; or the failure-adapted model ``theta_+F``; or the model fine-tuned without
the causes); the model is then fine-tuned from ``theta_hat`` on the training set with the new
labels. Causes the source is unsure of can be dropped instead (``min_confidence``): with a
threshold above every confidence, relabelling is deletion (the "finetune" treatment).
"""

from __future__ import annotations

import torch
from torch import nn

from netmend.treatment.adapted import (
    FINETUNE_OPTIONS,
    FIT_OPTIONS,
    check_hard,
    check_options,
    check_temperature,
    finetune_layers,
    layer_names,
)
from netmend.treatment.base import TreatContext, register
from netmend.treatment.labels import (
    LABEL_OPTIONS,
    check_min_confidence,
    check_source,
    label_distribution,
)

RELABEL_OPTIONS = ("hard", "temperature", *LABEL_OPTIONS, *FINETUNE_OPTIONS, *FIT_OPTIONS)


@register("relabel", options=RELABEL_OPTIONS)
def relabel(ctx: TreatContext) -> nn.Module:
    """Give each cause the label its ``source`` predicts, drop the unsure ones, fine-tune on D.

    With ``hard=True`` (default) a cause's new label is the argmax of the source's
    distribution ``p_c`` ``[classes]``, so only causes whose source disagrees with their label
    change; with ``hard=False`` the cause's target becomes ``p_c`` itself (the other examples
    keep their one-hot labels) and the loss is the soft-target cross-entropy. A cause whose
    confidence ``max_k p_c[k]`` is below ``min_confidence`` is dropped from the fine-tune, as
    deletion would.

    Sources (option ``source``; :mod:`netmend.treatment.labels`):

    * ``"knn"`` (default): the label shares among the ``neighbours`` (25) nearest training
      examples, the cause itself left out, in the embedding ``embed`` (``None``: the input of
      the last ``nn.Linear`` under ``theta_hat``; ``"input"``: the flattened inputs; or a
      callable ``[B, ...] -> [B, D]``). Needs neither the failures nor ``theta_+F``.
    * ``"theta_plus_f"``: ``softmax(f_{theta_+F}(x_c) / temperature)``. ``theta_+F`` started
      from ``theta_hat`` and still predicts most causes' given labels: on the digits benchmark
      (pair flips, K = number of flips, 3-epoch fine-tune) it gave the true label to 51% of
      the flipped causes, "knn" to 84% (and kept the label of 93% / 88% of the clean ones).
    * ``"deletion"``: ``softmax(f(x_c) / temperature)`` of a copy fine-tuned on ``D \\ C``
      with this treatment's own fine-tune recipe and ``layers`` ("delete, then relabel").
      Good after a short fine-tune; a long one forgets the clean causes' classes and
      relabels them wrongly (it kept 11% of the clean causes' labels after 3 epochs).

    Options:
        source ("knn"), neighbours (25), embed (None), min_confidence (0.0: keep every
        cause), hard (True), temperature (1.0; model sources and soft labels only), layers
        ("all", as the "finetune" treatment; ``None`` for the last ``nn.Linear``, an int ``k``
        or module names as in "align"), the fine-tune's epochs, lr, batch_size, optimizer,
        average_tail, min_steps (default: the "finetune" treatment's recipe,
        :func:`netmend.treatment.adapted.finetune_config`), fit_steps / fit_step_size (only when
        ``theta_+F`` is fitted here).

    Record (``ctx.record``, CPU tensors, one entry per cause in ``ctx.causes`` order, i.e.
    sorted training indices): ``causes`` ``[K]``, ``source``, ``old_labels`` ``[K]``,
    ``new_labels`` ``[K]`` (argmax of the source), ``confidence`` ``[K]`` (its maximum),
    ``dropped`` (bool ``[K]``: confidence < ``min_confidence``), ``changed`` (bool ``[K]``:
    kept and new != old), ``n_changed`` (= ``n_relabelled``), ``n_kept`` (kept with the old
    label), ``n_dropped``, ``transitions`` (``{(old, new): count}`` over the changed causes),
    ``layers``, and ``soft_labels`` ``[K, classes]`` when ``hard=False``.
    """
    check_options(ctx, RELABEL_OPTIONS, "relabel")
    source = check_source(ctx.options.get("source", "knn"))
    min_confidence = check_min_confidence(ctx.options.get("min_confidence", 0.0))
    hard = check_hard(ctx.options.get("hard", True))
    temperature = check_temperature(ctx.options.get("temperature", 1.0))
    layers = layer_names(ctx.model, ctx.options.get("layers", "all"))

    probs = label_distribution(ctx, source, temperature, layers)
    old = ctx.y[ctx.causes].clone()
    confidence, new = probs.max(1)
    dropped = confidence < min_confidence
    targets: torch.Tensor
    if hard:
        targets = ctx.y.clone()
        targets[ctx.causes] = new
    else:
        targets = torch.nn.functional.one_hot(ctx.y, probs.shape[1]).to(probs.dtype)
        targets[ctx.causes] = probs
    if bool(dropped.any()):
        train = torch.ones(len(ctx.X), dtype=torch.bool)
        train[ctx.causes[dropped]] = False
        model = finetune_layers(ctx, ctx.X[train], targets[train], layers, "relabel")
    else:
        model = finetune_layers(ctx, ctx.X, targets, layers, "relabel")
    changed = (new != old) & ~dropped
    pairs, counts = torch.unique(
        torch.stack([old[changed], new[changed]], 1), dim=0, return_counts=True
    )
    ctx.record.update(
        causes=ctx.causes.clone(),
        source=source,
        old_labels=old,
        new_labels=new,
        confidence=confidence,
        dropped=dropped,
        changed=changed,
        n_changed=int(changed.sum()),
        n_relabelled=int(changed.sum()),
        n_kept=int((~changed & ~dropped).sum()),
        n_dropped=int(dropped.sum()),
        transitions={(int(a), int(b)): int(c) for (a, b), c in zip(pairs.tolist(), counts)},
        layers=layers,
    )
    if not hard:
        ctx.record["soft_labels"] = probs
    return model
