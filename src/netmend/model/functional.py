"""Functional view of a model: flat parameter vectors, per-example log-likelihoods and gradients.

Everything here is batched with ``torch.func`` and streamed over the data in chunks:
no Python loop over examples and never an ``[N, P]`` matrix (only ``[chunk, P]``).

Conventions: ``ll`` is the per-example log-likelihood ``log p(y|x, theta)`` (= minus the
cross-entropy); gradients are of ``ll`` (not of the loss) unless a name says ``loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from netmend.data.streaming import chunks, map_chunks
from netmend.store import tensor_hash


def as_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A chunk of inputs as the model receives it: unchanged.

    Integer inputs (token ids for an ``nn.Embedding``, ``uint8`` pixels) reach the model as
    the user's data holds them: converting or scaling them is the model's (or the task's)
    business, never a silent cast (``netmend.lab.models`` convert integer pixels themselves).
    ``dtype`` is kept for callers that align floating inputs; it is not applied here.
    """
    del dtype
    return x


def param_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of ``model``'s parameters (torch's default if it has none)."""
    return next(
        (p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype()
    )


def match_dtype(X: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A whole data set for a model of ``dtype``: floating inputs cast to it (a no-op when they
    match), integer inputs kept as they are (:func:`as_input` converts each chunk)."""
    return X.to(dtype) if X.is_floating_point() else X


@dataclass
class FunctionalModel:
    """A model split into its trainable parameters (as one flat vector) and everything else.

    Attributes:
        module: the model; never modified (the parameters are passed functionally).
        names: trainable parameter names, in order.
        shapes: their shapes.
        theta: the flat parameter vector ``[P]`` at which the model was captured (detached).
        buffers: buffers and frozen parameters, passed through unchanged.
    """

    module: nn.Module
    names: list[str]
    shapes: list[torch.Size]
    theta: torch.Tensor
    buffers: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: nn.Module) -> FunctionalModel:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        buffers = {n: b for n, b in model.named_buffers()}
        buffers.update(frozen)
        theta = torch.cat([p.detach().reshape(-1) for _, p in named])
        return cls(model, [n for n, _ in named], [p.shape for _, p in named], theta, buffers)

    @property
    def num_params(self) -> int:
        return int(self.theta.numel())

    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector ``[P]`` into a ``{name: tensor}`` dict shaped like the parameters."""
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = s.numel()
            out[n] = v[i : i + k].view(s)
            i += k
        return out

    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` at flat parameters ``theta`` ``[P]``."""
        params = self.unflatten(theta)
        return functional_call(self.module, (params, self.buffers), (as_input(x, theta.dtype),))

    def ll(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example log-likelihood ``log p(y|x, theta)``, shape ``[B]``."""
        return -F.cross_entropy(self.logits(theta, x), y, reduction="none")

    def per_example_grads(
        self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Gradients of each example's log-likelihood, ``[B, P]`` (vmap over examples)."""

        def one(t: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return self.ll(t, xi.unsqueeze(0), yi.unsqueeze(0)).squeeze(0)

        return vmap(grad(one), in_dims=(None, 0, 0))(theta, x, y)

    def ll_jvp(
        self, theta: torch.Tensor, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ll, g.v)``: log-likelihoods ``[B]`` and directional derivatives ``[B]`` along ``v``.

        ``(g.v)_n = grad log p(y_n|x_n, theta) . v``, from one forward-mode pass (no per-example
        gradients are formed).
        """
        res = jvp(lambda t: self.ll(t, x, y), (theta,), (v,))
        out, tangent = res[0], res[1]
        return out.detach(), tangent.detach()

    def ll_vjp(
        self, theta: torch.Tensor, u: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """``sum_n u_n grad log p(y_n|x_n, theta)``, shape ``[P]`` (one backward pass)."""
        pull = vjp(lambda t: self.ll(t, x, y), theta)[1]
        return pull(u)[0].detach()


def stream(
    X: torch.Tensor,
    y: torch.Tensor,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk_size: int,
    device: torch.device,
    progress: bool = False,
    desc: str = "",
    fingerprint: Callable[[], str] | None = None,
) -> torch.Tensor:
    """Apply ``fn(x_chunk, y_chunk) -> [b, ...]`` over the data in chunks; concatenate on CPU.

    Resumable: inside ``netmend.identify(..., cache_dir=...)`` the completed chunks are
    checkpointed and a rerun skips them (see :func:`netmend.data.streaming.map_chunks`, which also
    explains ``fingerprint``, an optional name of ``fn``'s other inputs).
    """

    def one(s: slice) -> torch.Tensor:
        return fn(X[s].to(device), y[s].to(device)).detach().cpu()

    return map_chunks(
        X.shape[0], chunk_size, one, desc=desc, progress=progress, fingerprint=fingerprint
    )


def log_likelihoods(
    fm: FunctionalModel,
    theta: torch.Tensor,
    X: torch.Tensor,
    y: torch.Tensor,
    chunk_size: int = 1024,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """``log p(y_n|x_n, theta)`` for every example, ``[N]`` on CPU."""
    device = torch.device(device)
    theta = theta.to(device)
    with torch.no_grad():
        return stream(
            X,
            y,
            lambda x, t: fm.ll(theta, x, t),
            chunk_size,
            device,
            progress,
            "ll",
            fingerprint=lambda: tensor_hash(theta),
        )


def summed_grad(
    fm: FunctionalModel,
    theta: torch.Tensor,
    X: torch.Tensor,
    y: torch.Tensor,
    chunk_size: int = 1024,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``sum_n grad log p(y_n|x_n, theta)`` over the set, ``[P]`` (summed, not averaged)."""
    device = torch.device(device)
    theta = theta.to(device)
    total = torch.zeros_like(theta)
    for s in chunks(X.shape[0], chunk_size):
        x, t = X[s].to(device), y[s].to(device)
        total += fm.ll_vjp(theta, torch.ones(x.shape[0], dtype=theta.dtype, device=device), x, t)
    return total
