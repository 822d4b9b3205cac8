"""Where "relabel" and "align" take a cause's new label from: the label sources.

A cause's new label must come from something that has not memorised the cause's current,
possibly wrong, label. ``theta_+F`` starts from ``theta_hat``, which was trained on that label:
on the digits benchmark (pair flips, K = number of flips) it gave the true label to only about
half of the flipped causes. The sources:

* ``"knn"`` (deep k-NN label cleaning, Bahri, Jiang and Gupta 2020): the label shares among
  the ``neighbours`` nearest training examples in an embedding (by default the input of the
  model's last ``nn.Linear`` under ``theta_hat``), the cause itself left out. Its own label
  does not vote, so memorising it does not matter; the vote is right wherever fewer than half
  of the neighbours are mislabelled. It ignores the failures (they chose the causes).
* ``"theta_plus_f"``: ``softmax(f_{theta_+F}(x) / temperature)``, the failure-adapted model.
* ``"deletion"``: ``softmax(f(x) / temperature)`` of a copy of ``theta_hat`` fine-tuned on
  ``D \\ C`` with the treatment's own fine-tune recipe: "delete, then relabel". It has not seen
  the causes, but a long fine-tune without them also forgets their classes.

Every source gives a distribution over classes for each cause, ``[K, classes]``; its maximum
is the source's confidence, which ``min_confidence`` compares against to drop a cause.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from netmend.data.streaming import chunks
from netmend.identification.shapley import embedder
from netmend.model.functional import Data
from netmend.model.training import logits
from netmend.treatment.adapted import finetune_layers, predictive, theta_plus_f
from netmend.treatment.base import TreatContext

SOURCES = ("knn", "theta_plus_f", "deletion")
"""The label sources, in the order the docs list them."""

LABEL_OPTIONS = ("source", "neighbours", "embed", "min_confidence")
"""Options of the label source, shared by "relabel" and "align"."""

DEFAULT_NEIGHBOURS = 25
"""``neighbours`` for ``source="knn"``: the best of 10 / 25 / 50 on the digits benchmark."""


def knn_votes(
    E: torch.Tensor,
    y: torch.Tensor,
    rows: torch.Tensor,
    neighbours: int,
    classes: int,
    chunk_size: int = 1024,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Label shares among each row's nearest neighbours, the row itself left out.

    Distances are computed block by block (``chunk_size`` rows against ``chunk_size``
    training examples) with a running top-``neighbours``, so nothing of size ``[K, N]`` or a
    floating copy of an integer ``E`` is ever held.

    Args:
        E: embeddings of the whole training set ``[N, D]`` (integer ones, e.g. raw pixels,
            are converted block by block to ``dtype``).
        y: its labels ``[N]`` (int64).
        rows: the indices to vote on ``[K]`` (int64, distinct).
        neighbours: how many neighbours vote, ``1 <= neighbours <= N - 1``.
        classes: number of classes ``C``.
        chunk_size: block size; device: where; dtype: of the distances and the result
            (default ``E``'s if floating, else torch's default).

    Returns:
        ``[K, C]`` (CPU): row ``i`` is the share of each label among the ``neighbours``
        training examples closest to ``E[rows[i]]`` in Euclidean distance, ``rows[i]``
        excluded; ties in distance go to the lower training index, so the result does not
        depend on ``chunk_size``.
    """
    device = torch.device(device)
    if dtype is None:
        dtype = E.dtype if E.is_floating_point() else torch.get_default_dtype()
    n = E.shape[0]
    yd = y.to(device)
    out = []
    for s in chunks(rows.numel(), chunk_size):
        r = rows[s].to(device)
        q = E[rows[s]].to(device, dtype)  # distances need floats
        best_d = torch.empty(r.numel(), 0, dtype=dtype, device=device)
        best_i = torch.empty(r.numel(), 0, dtype=torch.long, device=device)
        for t in chunks(n, chunk_size):
            cols = torch.arange(t.start, t.stop, device=device)
            # exact differences, not the matmul expansion: a distance must not depend on the
            # block it was computed in, or near-ties would depend on ``chunk_size``
            e = E[t].to(device, dtype)
            d = torch.cdist(q, e, compute_mode="donot_use_mm_for_euclid_dist")
            d = d.masked_fill(r[:, None] == cols[None, :], float("inf"))
            # candidates: the best so far (sorted by distance, then index) and this block
            # (ascending index, all above the best's): a stable sort by distance orders them
            # by (distance, index)
            cand_d = torch.cat([best_d, d], 1)
            cand_i = torch.cat([best_i, cols.expand(r.numel(), -1)], 1)
            order = torch.sort(cand_d, dim=1, stable=True).indices[:, :neighbours]
            best_d, best_i = cand_d.gather(1, order), cand_i.gather(1, order)
        votes = torch.zeros(r.numel(), classes, dtype=dtype, device=device)
        votes.scatter_add_(1, yd[best_i], torch.ones(best_i.shape, dtype=dtype, device=device))
        out.append((votes / neighbours).cpu())
    return torch.cat(out) if out else torch.empty(0, classes, dtype=dtype)


def check_source(value: Any) -> str:
    """A known label source, or a ``ValueError``."""
    if value not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}; got {value!r}")
    return str(value)


def check_min_confidence(value: Any) -> float:
    """A number in ``[0, 1]``, or a ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError(f"min_confidence must be a number in [0, 1]; got {value!r}")
    t = float(value)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"min_confidence must be a number in [0, 1]; got {value!r}")
    return t


def _embedder(ctx: TreatContext) -> Callable[[Data], torch.Tensor]:
    """The embedding of the "knn" source: ``[n, ...] -> [n, D]`` on CPU."""
    return embedder(
        ctx.options.get("embed"),
        ctx.model,
        ctx.fm.theta.dtype,
        ctx.chunk_size,
        ctx.device,
        task=ctx.fm.task,
    )


def label_distribution(
    ctx: TreatContext,
    source: str,
    temperature: float,
    layers: list[str] | None,
    X_model: Data | None = None,
) -> torch.Tensor:
    """The source's distribution over classes for every cause, ``[K, classes]`` on CPU.

    Rows follow ``ctx.causes`` (sorted training indices).

    Args:
        ctx: the treatment context; reads the options ``neighbours`` and ``embed`` ("knn").
        source: one of :data:`SOURCES`.
        temperature: divides the logits of the model sources ("theta_plus_f", "deletion").
        layers: the layers the "deletion" source's fine-tune trains (as the treatment's own).
        X_model: the inputs the model sources are asked about, ``[K, ...]`` (default: the
            causes' inputs; "align" passes the aligned inputs). "knn" always votes on the
            causes themselves: their neighbours are training examples.

    Raises:
        ValueError: bad ``neighbours`` or ``embed``; ``temperature`` given with "knn".
    """
    Xc = ctx.X[ctx.causes] if X_model is None else X_model
    if source == "theta_plus_f":
        return predictive(ctx, theta_plus_f(ctx), Xc, temperature)
    if source == "deletion":
        keep = ctx.keep
        deleted = finetune_layers(ctx, ctx.X[keep], ctx.y[keep], layers, "delete")
        z = logits(deleted, Xc, ctx.device, max(ctx.chunk_size, 1024), task=ctx.fm.task)
        return torch.softmax(z / temperature, dim=1).to(ctx.fm.theta.dtype)
    if "temperature" in ctx.options:
        raise ValueError(
            "temperature applies to the model sources ('theta_plus_f', 'deletion'); with "
            "source='knn' the soft label is the neighbours' vote share: drop temperature="
        )
    n = len(ctx.X)
    k = ctx.options.get("neighbours", DEFAULT_NEIGHBOURS)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n - 1:
        raise ValueError(f"neighbours must be an int in [1, {n - 1}] (N - 1); got {k!r}")
    classes = int(logits(ctx.model, ctx.X[:1], ctx.device, task=ctx.fm.task).shape[1])
    E = _embedder(ctx)(ctx.X)
    chunk = max(ctx.chunk_size, 1024)
    return knn_votes(E, ctx.y, ctx.causes, k, classes, chunk, ctx.device, ctx.fm.theta.dtype)
