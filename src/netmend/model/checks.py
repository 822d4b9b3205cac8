"""Checks of the user's model: deterministic passes, logits of the right shape, real failures.

Validation raises :class:`ValueError` / :class:`TypeError` with a message that says what to
do, never ``assert``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from netmend._warnings import warn
from netmend.data.task import Task, resolve_task, tree_map
from netmend.model.functional import Data
from netmend.model.training import model_device, predict

_STOCHASTIC = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.AlphaDropout)
_LOOKUPS = ("embedding", "embedding_bag")
"""The ``torch.nn.functional`` lookups that raise ``IndexError`` on an id out of range."""


def _raised_by_lookup(exc: BaseException) -> bool:
    """Whether ``exc`` came out of ``F.embedding`` / ``F.embedding_bag`` (an id out of range)."""
    tb, functional = exc.__traceback__, os.path.join("nn", "functional.py")
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in _LOOKUPS and code.co_filename.endswith(functional):
            return True
        tb = tb.tb_next
    return False


_ID_RANGE = re.compile(r"not in the valid range|Expected idx >= 0 && idx < num_embeddings")


@contextmanager
def ids_in_range() -> Iterator[None]:
    """Report an Embedding's (or EmbeddingBag's) out-of-range id as bad input (``ValueError``),
    not torch's bare ``IndexError: index out of range in self`` (an EmbeddingBag's
    ``RuntimeError``) from deep inside a pass.

    Only the model's first example is tried before the passes, so an id >= an Embedding's
    ``num_embeddings`` (or a negative one) anywhere else in the training set or the failures
    surfaces mid-pass. Other ``IndexError`` s pass through unchanged. (On CUDA the same id
    is a device-side assertion, which cannot be caught: check ids on the CPU first.)
    """
    try:
        yield
    except (IndexError, RuntimeError) as exc:
        # an EmbeddingBag raises RuntimeError ("... not in the valid range [0, 10)",
        # "embedding_bag: Expected idx >= 0 ..."): only an id out of range is bad input
        if isinstance(exc, RuntimeError) and not _ID_RANGE.search(str(exc)):
            raise
        if not _raised_by_lookup(exc):
            raise
        raise ValueError(
            "an input id is out of range for an Embedding of the model (torch: "
            f"{exc}): a token id >= the layer's num_embeddings, or a negative one, in the "
            "training set or the failures. Check the ids against the model's vocabulary "
            "size, or map unknown tokens to an id the model has (e.g. its <unk>)"
        ) from exc


def check_model(model: nn.Module) -> None:
    """Raise if ``model`` would give different outputs on two passes over the same data.

    A model in train mode with dropout or BatchNorm changes its outputs (and, for BatchNorm,
    its running statistics) at every call, which makes scores meaningless.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    check_materialised(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters (requires_grad=True): nothing to score")
    check_eval_mode(model)


def check_materialised(model: nn.Module) -> None:
    """Raise if ``model`` has parameters or buffers on the "meta" device (shapes, no values):
    torch failed later with "Tensor.item() cannot be called on meta tensors" or "Cannot copy
    out of meta tensor"."""
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(
            f"model has {len(meta)} tensors on the 'meta' device, with no values "
            f"({', '.join(meta[:3])}): load its weights first, e.g. "
            "load_state_dict(state, assign=True), or model.to_empty(device='cpu') then "
            "load_state_dict(...); a buffer that is not saved (persistent=False) must be "
            "computed again after either"
        )


def check_eval_mode(model: nn.Module) -> None:
    """Raise if dropout or BatchNorm layers of ``model`` are in train mode (its outputs, and
    so its predictions, would change between passes)."""
    stochastic = [n for n, m in model.named_modules() if isinstance(m, _STOCHASTIC) and m.training]
    if stochastic:
        raise ValueError(
            f"model is in train mode with dropout/BatchNorm layers ({', '.join(stochastic[:3])}); "
            "their outputs change between passes. Call model.eval() before netmend."
        )


def num_classes_of(
    model: nn.Module, X: Data, device: torch.device, task: Task | None = None
) -> int:
    """Number of outputs of ``model`` (its logits' last dimension) on the first input of ``X``.

    Raises:
        TypeError: the output holds no logits ``task`` can read (a clear message says what
            outputs are understood).
        ValueError: the logits are not of shape ``[batch, classes]``.
    """
    x, t = X[:1].to(model_device(model, device)), resolve_task(task)
    try:
        with torch.no_grad():
            output = t.call(model, x)
    except (RuntimeError, TypeError, IndexError, AttributeError) as exc:
        seen = tree_map(lambda t: f"shape {tuple(t.shape[1:])}, {t.dtype}", x)
        raise ValueError(
            f"the model fails on the data's first example (per-example inputs: {seen}): "
            f"{type(exc).__name__}: {exc}. Pass inputs the model takes (shape, dtype: e.g. "
            "float images scaled as in training), or convert them in the model or a task="
        ) from exc
    return int(t.logits(output).shape[1])


def check_failures(
    model: nn.Module,
    Xf: Data,
    yf: torch.Tensor,
    device: torch.device,
    batch_size: int,
    task: Task | None = None,
) -> torch.Tensor:
    """Check that the failures are failures; return a boolean mask of the ones the model gets wrong.

    Raises:
        ValueError: the model already classifies every "failure" correctly.
    """
    pred = predict(model, Xf, device=device, batch_size=batch_size, task=task)
    wrong = pred != yf
    if not bool(wrong.any()):
        raise ValueError(
            "the model already classifies every example of the failure set correctly: there is "
            "nothing to repair. Pass inputs the model gets wrong, with their correct labels."
        )
    if not bool(wrong.all()):
        warn(
            f"{int((~wrong).sum())} of {len(yf)} failure examples are already classified "
            "correctly; they are kept (they still say what the model should do).",
        )
    return wrong


def check_finite_parameters(model: nn.Module, what: str = "the model") -> None:
    """Raise if a parameter or floating buffer of ``model`` holds NaN or inf.

    A broken model gives NaN scores whatever the settings; saying so beats advice about
    ``l2`` that cannot help.
    """
    named = list(model.named_parameters()) + [
        (n, b) for n, b in model.named_buffers() if b.is_floating_point()
    ]
    bad = [n for n, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(
            f"{what}'s parameters contain NaN or inf ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): netmend cannot score or repair a broken model. "
            "Reload finite weights (e.g. an earlier checkpoint) before calling netmend."
        )


PROBABILITY_ATOL = 1e-4
"""How close to 1 a row's sum (or its ``exp``'s sum) must be to count as a distribution."""


def check_logits(
    model: nn.Module, X: Data, device: torch.device, name: str, task: Task | None = None
) -> None:
    """Refuse a model whose outputs are probabilities; warn about log-probabilities.

    netmend applies ``log_softmax`` to the model's outputs. Probabilities (rows ``>= 0``
    summing to 1, a model ending in ``softmax``) would be read as logits: every
    log-likelihood, gradient and score would be silently wrong. Log-probabilities (rows
    ``<= 0`` whose ``exp`` sums to 1, a model ending in ``log_softmax``) give the same
    scores as logits (``log_softmax`` is idempotent), so they only warn. Checked on the first
    batch (at most 64 rows) of ``X`` (pass fewer rows to bound the batch); a single row is
    not judged.

    Raises:
        ValueError: every row of the first batch is a probability distribution.

    ``X`` is a tensor or a :class:`netmend.data.source.DataSource`; ``task`` calls the model
    and reads its logits.
    """
    if len(X) < 2:
        return
    with torch.no_grad():
        out = resolve_task(task).forward(model, X[:64].to(device))
    if out.ndim != 2 or out.shape[1] < 2 or not out.is_floating_point():
        return
    out = out.double()
    if bool((out >= 0).all()) and bool(((out.sum(1) - 1).abs() <= PROBABILITY_ATOL).all()):
        raise ValueError(
            f"the model's outputs on {name} look like probabilities (every row is >= 0 and sums "
            "to 1): netmend needs logits (it applies log_softmax itself). Remove the final "
            "softmax, e.g. pass nn.Sequential(*list(model)[:-1]) or a module returning logits."
        )
    if bool((out <= 0).all()) and bool(((out.exp().sum(1) - 1).abs() <= PROBABILITY_ATOL).all()):
        warn(
            f"the model's outputs on {name} look like log-probabilities (a final log_softmax): "
            "netmend treats them as logits, which gives the same scores (log_softmax is "
            "idempotent); if they are something else, pass a model returning logits.",
        )
