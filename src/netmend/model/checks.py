"""Checks of the user's model: deterministic passes, logits of the right shape, real failures.

Validation raises :class:`ValueError` / :class:`TypeError` with a message that says what to
do, never ``assert``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from netmend.model.functional import as_input, param_dtype
from netmend.model.training import predict

_STOCHASTIC = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.AlphaDropout)


def check_model(model: nn.Module) -> None:
    """Raise if ``model`` would give different outputs on two passes over the same data.

    A model in train mode with dropout or BatchNorm changes its outputs (and, for BatchNorm,
    its running statistics) at every call, which makes scores meaningless.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters (requires_grad=True): nothing to score")
    stochastic = [n for n, m in model.named_modules() if isinstance(m, _STOCHASTIC) and m.training]
    if stochastic:
        raise ValueError(
            f"model is in train mode with dropout/BatchNorm layers ({', '.join(stochastic[:3])}); "
            "their outputs change between passes. Call model.eval() before netmend."
        )


def num_classes_of(model: nn.Module, X: torch.Tensor, device: torch.device) -> int:
    """Number of outputs of ``model`` (its logits' last dimension) on one input."""
    with torch.no_grad():
        out = model(as_input(X[:1].to(device), param_dtype(model)))
    if out.ndim != 2:
        raise ValueError(
            f"model output must be logits of shape [batch, classes]; got shape {tuple(out.shape)}"
        )
    return int(out.shape[1])


def check_failures(
    model: nn.Module, Xf: torch.Tensor, yf: torch.Tensor, device: torch.device, batch_size: int
) -> torch.Tensor:
    """Check that the failures are failures; return a boolean mask of the ones the model gets wrong.

    Raises:
        ValueError: the model already classifies every "failure" correctly.
    """
    pred = predict(model, Xf, device=device, batch_size=batch_size)
    wrong = pred != yf
    if not bool(wrong.any()):
        raise ValueError(
            "the model already classifies every example of the failure set correctly: there is "
            "nothing to repair. Pass inputs the model gets wrong, with their correct labels."
        )
    if not bool(wrong.all()):
        warnings.warn(
            f"{int((~wrong).sum())} of {len(yf)} failure examples are already classified "
            "correctly; they are kept (they still say what the model should do).",
            stacklevel=3,
        )
    return wrong
