"""Layer hooks shared by the curvature estimators: the input and output of each layer.

For ``nn.Linear`` and ``nn.Conv2d`` layers, the per-example gradient of a weight is the outer
product of the layer's output gradient ``d`` and its input ``a`` (unfolded into patches for a
convolution). The diagonal Fisher (:mod:`netmend.curvature.fisher`) and the KFAC/EK-FAC
factors (:mod:`netmend.curvature.kfac`) both read ``a`` and ``d`` through these hooks, so
neither forms a per-example gradient it does not need.
"""

from __future__ import annotations

import torch
from torch import nn

from netmend.model.functional import FunctionalModel


def layer_slices(fm: FunctionalModel) -> dict[str, dict[str, slice]] | None:
    """For each Linear/Conv2d module, where its weight and bias sit in the flat vector.

    Returns ``None`` when some trainable parameter belongs to another kind of layer (or a
    Conv2d with groups/non-zero padding mode), in which case the generic vmap path is used.
    """
    modules = dict(fm.caller.named_modules())
    owners = [n for n, _ in fm.module.named_parameters(remove_duplicate=False)]
    if len(owners) != len(list(fm.module.parameters())):
        return None  # a parameter shared by two modules: only vmap sums its gradients right
    out: dict[str, dict[str, slice]] = {}
    i = 0
    for name, shape in zip(fm.names, fm.shapes):
        k = shape.numel()
        mod_name, _, leaf = name.rpartition(".")
        m = modules.get(mod_name)
        ok = isinstance(m, nn.Linear) or (
            isinstance(m, nn.Conv2d)
            and m.groups == 1
            and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)
        )
        if not ok or leaf not in ("weight", "bias"):
            return None
        out.setdefault(mod_name, {})[leaf] = slice(i, i + k)
        i += k
    if any("weight" not in sl for sl in out.values()):
        return None  # a frozen weight with a trainable bias
    return out


class HookFallback(Exception):
    """The hook path cannot serve this model (a layer ran twice in one forward)."""


def hook_forward(
    fm: FunctionalModel,
    theta: torch.Tensor,
    x: torch.Tensor,
    layers: dict[str, dict[str, slice]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward over a chunk with hooks: the logits ``[B, C]``, each layer's input and output.

    The outputs stay in the autograd graph (``theta`` is made a leaf that requires grad), so
    :func:`hook_deltas` can pull any cotangent of the logits back to them, as many times as
    needed, without a second forward.
    """
    modules = dict(fm.caller.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name in layers:

        def hook(mod: nn.Module, inp: tuple, out: torch.Tensor, name: str = name) -> None:
            if name in outputs:
                raise HookFallback(name)
            inputs[name] = inp[0].detach()
            outputs[name] = out

        handles.append(modules[name].register_forward_hook(hook))
    try:
        logits = fm.logits(theta.detach().requires_grad_(True), x)
    finally:
        for h in handles:
            h.remove()
    return logits, inputs, outputs


def hook_deltas(
    logits: torch.Tensor,
    outputs: dict[str, torch.Tensor],
    names: list[str],
    cotangent: torch.Tensor,
    retain_graph: bool = False,
) -> list[torch.Tensor]:
    """Gradients of ``sum(cotangent * logits)`` w.r.t. each layer's output (zeros if unused).

    With ``cotangent = onehot(y) - softmax(logits)`` these are the output gradients of
    ``log p(y_n|x_n)``, one row per example.
    """
    deltas = torch.autograd.grad(
        logits, [outputs[n] for n in names], cotangent, retain_graph=retain_graph, allow_unused=True
    )
    return [
        (torch.zeros_like(outputs[n]) if d is None else d).detach() for n, d in zip(names, deltas)
    ]


def unfold_input(m: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """Patches of a Conv2d input, ``[B, in*kh*kw, L]`` (the order of ``weight.view(out, -1)``)."""
    return torch.nn.functional.unfold(
        a,
        m.kernel_size,
        dilation=m.dilation,
        padding=m.padding,  # type: ignore[arg-type]  # str padding excluded by layer_slices
        stride=m.stride,
    )


def hook_pass(
    fm: FunctionalModel,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    layers: dict[str, dict[str, slice]],
) -> list[tuple[nn.Module, dict[str, slice], torch.Tensor, torch.Tensor]]:
    """One forward/backward over a chunk; per layer its input ``a`` and output gradient ``d``.

    Convolution inputs are returned unfolded (``a`` ``[B, in*k*k, L]``, ``d`` ``[B, out, L]``)
    and linear layers on extra positions flattened to ``[B, S, in]``/``[B, S, out]``, so that
    the per-example weight gradient of ``log p(y_n|x_n)`` is ``d_n a_n^T`` in every case.
    """
    modules = dict(fm.caller.named_modules())
    logits, inputs, outputs = hook_forward(fm, theta, x, layers)
    ll = -torch.nn.functional.cross_entropy(logits, y, reduction="none")
    names = list(layers)
    deltas = torch.autograd.grad(ll.sum(), [outputs[n] for n in names], allow_unused=True)
    out = []
    for name, d in zip(names, deltas):
        m, a = modules[name], inputs[name]
        if d is None:
            d = torch.zeros_like(outputs[name])
        if isinstance(m, nn.Conv2d):
            a = unfold_input(m, a)
            d = d.reshape(d.shape[0], d.shape[1], -1)
        elif a.ndim > 2:
            a = a.reshape(a.shape[0], -1, a.shape[-1])
            d = d.reshape(d.shape[0], -1, d.shape[-1])
        out.append((m, layers[name], a, d.detach()))
    return out
