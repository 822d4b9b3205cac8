"""Functional view of a model: flat parameter vectors, per-example log-likelihoods and gradients.

Everything here is batched with ``torch.func`` and streamed over the data in chunks:
no Python loop over examples and never an ``[N, P]`` matrix (only ``[chunk, P]``).

Conventions: ``ll`` is the per-example log-likelihood ``log p(y|x, theta)`` (= minus the
cross-entropy); gradients are of ``ll`` (not of the loss) unless a name says ``loss``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vjp, vmap
from torch.func import jvp as _torch_jvp

from netmend.data.source import DataSource
from netmend.data.streaming import map_chunks
from netmend.data.task import DEFAULT_TASK, Inputs, Task, batch_len, tree_map
from netmend.model.twin import functional_twin, no_fastpath
from netmend.store import tensor_hash

Data = Union[torch.Tensor, DataSource]  # noqa: UP007 (a runtime alias)
"""A data set's inputs ``[N, ...]``: a tensor, or a :class:`DataSource` read batch by batch.
Both support ``len(X)``, views ``X[s]`` and ``X[s].to(device)`` (a batch of inputs)."""


@functools.cache
def _load_forward_rules() -> None:
    """Load torch's forward-mode decompositions once, without their deprecation warning.

    torch registers them on the first forward-mode pass with ``torch.jit.script``, which torch
    2.13 deprecates, so that pass warns from inside torch (18 DeprecationWarnings), and a user
    who runs with ``-W error::DeprecationWarning`` (as many test suites do) would see netmend's
    first Jacobian-vector product fail. The warning is torch's own, not about netmend's use,
    so only it is silenced, only here. Same condition as torch's own loader.
    """
    if os.environ.get("PYTORCH_JIT", "1") != "1" or not __debug__:
        return
    with warnings.catch_warnings(), contextlib.suppress(ImportError):  # none in this torch
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning
        )
        import torch._decomp.decompositions_for_jvp  # noqa: F401


def jvp(
    func: Callable[..., Any], primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[Any, ...]:
    """``torch.func.jvp(func, primals, tangents)`` (``(output, tangent)``), with the
    forward-mode rules loaded quietly."""
    _load_forward_rules()
    return _torch_jvp(func, primals, tangents)


def param_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of ``model``'s parameters (torch's default if it has none)."""
    return next(
        (p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype()
    )


def match_dtype(X: Data, dtype: torch.dtype) -> Data:
    """A whole data set for a model of ``dtype``: floating inputs cast to it (a no-op when they
    match), integer inputs kept as they are. A :class:`DataSource` casts each batch as it is
    read (no copy of the set)."""
    if isinstance(X, DataSource):
        return X.with_dtype(dtype)
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
        task: how the model is called on a batch of inputs and where its logits are
            (:class:`netmend.data.task.Task`; the default reads tensors, tuples, dicts and
            ``.logits``).
        twin: the module that is called: ``module`` itself, or for models with recurrent or
            ``EmbeddingBag`` layers a copy that ``torch.func`` can transform
            (:func:`netmend.model.twin.functional_twin`; same names, same function).
    """

    module: nn.Module
    names: list[str]
    shapes: list[torch.Size]
    theta: torch.Tensor
    buffers: dict[str, torch.Tensor]
    task: Task = field(default=DEFAULT_TASK)
    twin: nn.Module | None = None

    @property
    def caller(self) -> nn.Module:
        """The module netmend calls (and hooks): the twin if there is one, else ``module``."""
        return self.module if self.twin is None else self.twin

    @classmethod
    def of(cls, model: nn.Module, task: Task | None = None) -> FunctionalModel:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        buffers = {n: b for n, b in model.named_buffers()}
        buffers.update(frozen)
        if not named:
            raise ValueError(
                "the model has no trainable parameters (every parameter has requires_grad=False)"
            )
        theta = torch.cat([p.detach().reshape(-1) for _, p in named])
        names, shapes = [n for n, _ in named], [p.shape for _, p in named]
        twin = functional_twin(model)
        return cls(
            model,
            names,
            shapes,
            theta,
            buffers,
            task or DEFAULT_TASK,
            None if twin is model else twin,
        )

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

    def logits(self, theta: torch.Tensor, x: Inputs) -> torch.Tensor:
        """Logits ``[B, C]`` at flat parameters ``theta`` ``[P]`` on a batch of inputs ``x``
        (a tensor ``[B, ...]`` or a dict of them, called and read through :attr:`task`)."""
        params = self.unflatten(theta)

        def call(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.caller, (params, self.buffers), args, kwargs)

        with no_fastpath():
            return self.task.forward(call, x)

    def ll(self, theta: torch.Tensor, x: Inputs, y: torch.Tensor) -> torch.Tensor:
        """Per-example log-likelihood ``log p(y|x, theta)``, shape ``[B]``."""
        return -F.cross_entropy(self.logits(theta, x), y, reduction="none")

    def per_example_grads(self, theta: torch.Tensor, x: Inputs, y: torch.Tensor) -> torch.Tensor:
        """Gradients of each example's log-likelihood, ``[B, P]`` (vmap over examples)."""

        def one(t: torch.Tensor, xi: Inputs, yi: torch.Tensor) -> torch.Tensor:
            return self.ll(t, tree_map(lambda a: a.unsqueeze(0), xi), yi.unsqueeze(0)).squeeze(0)

        return vmap(grad(one), in_dims=(None, 0, 0))(theta, x, y)

    def ll_jvp(
        self, theta: torch.Tensor, v: torch.Tensor, x: Inputs, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ll, g.v)``: log-likelihoods ``[B]`` and directional derivatives ``[B]`` along ``v``.

        ``(g.v)_n = grad log p(y_n|x_n, theta) . v``, from one forward-mode pass (no per-example
        gradients are formed).
        """
        res = jvp(lambda t: self.ll(t, x, y), (theta,), (v,))
        out, tangent = res[0], res[1]
        return out.detach(), tangent.detach()

    def ll_vjp(
        self, theta: torch.Tensor, u: torch.Tensor, x: Inputs, y: torch.Tensor
    ) -> torch.Tensor:
        """``sum_n u_n grad log p(y_n|x_n, theta)``, shape ``[P]`` (one backward pass)."""
        pull = vjp(lambda t: self.ll(t, x, y), theta)[1]
        return pull(u)[0].detach()


def stream(
    X: Data,
    y: torch.Tensor,
    fn: Callable[[Inputs, torch.Tensor], torch.Tensor],
    chunk_size: int,
    device: torch.device,
    progress: bool = False,
    desc: str = "",
    fingerprint: Callable[[], str] | None = None,
) -> torch.Tensor:
    """Apply ``fn(x_chunk, y_chunk) -> [b, ...]`` over the data in chunks; concatenate on CPU.

    ``X`` is a tensor or a :class:`DataSource` (read chunk by chunk, in index order).

    Resumable: inside ``netmend.identify(..., cache_dir=...)`` the completed chunks are
    checkpointed and a rerun skips them (see :func:`netmend.data.streaming.map_chunks`, which also
    explains ``fingerprint``, an optional name of ``fn``'s other inputs).
    """

    def one(s: slice) -> torch.Tensor:
        return fn(X[s].to(device), y[s].to(device)).detach().cpu()

    return map_chunks(
        len(X), chunk_size, one, desc=desc, progress=progress, fingerprint=fingerprint
    )


def log_likelihoods(
    fm: FunctionalModel,
    theta: torch.Tensor,
    X: Data,
    y: torch.Tensor,
    chunk_size: int = 1024,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """``log p(y_n|x_n, theta)`` for every example, ``[N]`` on CPU.

    Raises:
        ValueError: one is NaN or infinite (the model's logits are, on those examples): every
            score built on it would be, and the error would surface later as advice to raise
            ``l2``.
    """
    device = torch.device(device)
    theta = theta.to(device)
    with torch.no_grad():
        ll = stream(
            X,
            y,
            lambda x, t: fm.ll(theta, x, t),
            chunk_size,
            device,
            progress,
            "ll",
            fingerprint=lambda: tensor_hash(theta),
        )
    check_finite_outputs(~torch.isfinite(ll), "train", "log-probability")  # -inf too: a
    # label the model gives probability 0 (a masked class) has no finite score
    return ll


def check_finite_outputs(
    bad: torch.Tensor, name: str | None, what: str = "logits", offset: int = 0
) -> None:
    """Refuse outputs that are NaN or infinite, naming the examples.

    Args:
        bad: ``[B]`` (or ``[B, ...]``) True where an example's output is not finite.
        name: the data set ("train", "failures", ...), if known.
        what: the output ("logits", "log-probability").
        offset: the index of ``bad``'s first example in its data set.

    Raises:
        ValueError: any is.
    """
    rows = bad.reshape(bad.shape[0], -1).any(dim=1) if bad.ndim > 1 else bad
    if not bool(rows.any()):
        return
    idx = torch.nonzero(rows).flatten().cpu() + offset
    shown = ", ".join(str(int(i)) for i in idx[:5]) + (" ..." if idx.numel() > 5 else "")
    where = f"{name}: the" if name else "The"
    verb = "are" if what.endswith("s") else "is"
    raise ValueError(
        f"{where} model's {what} {verb} NaN or infinite on {idx.numel()} example"
        f"{'s' if idx.numel() > 1 else ''} ({shown}): netmend would read a class from a NaN or "
        "score them as infinitely harmful. Make the model's forward finite on such inputs (an "
        "input that is all padding gives NaN attention in torch's transformer layers), or "
        "leave those examples out"
    )


def summed_grad(
    fm: FunctionalModel,
    theta: torch.Tensor,
    X: Data,
    y: torch.Tensor,
    chunk_size: int = 1024,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``sum_n grad log p(y_n|x_n, theta)`` over the set, ``[P]`` (summed, not averaged)."""
    device = torch.device(device)
    theta = theta.to(device)

    def chunk_grad(s: slice) -> torch.Tensor:
        x, t = X[s].to(device), y[s].to(device)
        return fm.ll_vjp(theta, torch.ones(batch_len(x), dtype=theta.dtype, device=device), x, t)

    return map_chunks(
        len(X),
        chunk_size,
        chunk_grad,
        desc="grad",
        reduce="sum",
        init=torch.zeros_like(theta),
        fingerprint=lambda: tensor_hash(theta),
    )
