"""Layer hooks shared by the curvature estimators: the input and output of each layer.

For ``nn.Linear`` and ``nn.Conv2d`` layers, the per-example gradient of a weight is the outer
product of the layer's output gradient ``d`` and its input ``a`` (unfolded into patches for a
convolution). The other layers with a closed form (:data:`HOOK_LAYERS`) are read the same way:
``nn.BatchNorm1d/2d/3d`` in eval mode and ``nn.LayerNorm`` (weight: the sum over positions of
the normalised input times ``d``; bias: the sum of ``d``), ``nn.Embedding`` (the rows of the
example's token ids receive ``d``, summed over repeated ids) and ``nn.EmbeddingBag`` over
``[B, L]`` bags in "sum"/"mean" mode (each id of a bag receives the bag's ``d``, divided by
``L`` for "mean"). The diagonal Fisher (:mod:`netmend.curvature.fisher`) and the KFAC/EK-FAC
factors (:mod:`netmend.curvature.kfac`) both read ``a`` and ``d`` through these hooks, so
neither forms a per-example gradient it does not need.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from netmend.model.functional import FunctionalModel

HOOK_LAYERS = (
    nn.Linear,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.Embedding,
    nn.EmbeddingBag,
)
"""The layer kinds whose per-example gradients the hook path computes in closed form."""


def hookable(m: nn.Module | None) -> bool:
    """Whether the hook path can serve module ``m`` (see :data:`HOOK_LAYERS`)."""
    if isinstance(m, nn.Conv2d):
        return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        # eval mode with running statistics: an affine map per channel, no batch coupling
        return not m.training and m.track_running_stats and m.running_var is not None
    if isinstance(m, nn.Embedding):
        return m.max_norm is None
    if isinstance(m, nn.EmbeddingBag):
        return m.max_norm is None and m.mode in ("sum", "mean") and m.padding_idx is None
    return isinstance(m, (nn.Linear, nn.LayerNorm))


def layer_slices(fm: FunctionalModel) -> dict[str, dict[str, slice]] | None:
    """For each hookable module (:data:`HOOK_LAYERS`), where its weight and bias sit in the
    flat vector.

    Returns ``None`` when some trainable parameter belongs to another kind of layer (or a
    Conv2d with groups/non-zero padding mode, a BatchNorm in train mode), in which case the
    generic vmap path is used.
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
        if not hookable(m) or leaf not in ("weight", "bias"):
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
            if isinstance(mod, nn.EmbeddingBag) and (inp[0].ndim != 2 or len(inp) > 1):
                raise HookFallback(name)  # ragged bags (offsets) or per-sample weights
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

    Layers that the forward does not call are left out (their gradients are zero).

    Convolution inputs are returned as they are (``a`` ``[B, in, H, W]``, ``d`` ``[B, out, L]``;
    :func:`conv_weight_grads` forms ``d_n unfold(a_n)^T``) and linear layers
    on extra positions flattened to ``[B, S, in]``/``[B, S, out]``, so that the per-example
    weight gradient of ``log p(y_n|x_n)`` is ``d_n a_n^T``. The
    other layers' ``a`` and ``d`` are returned as they are (:func:`norm_input` gives a norm
    layer's normalised input; an embedding's ``a`` holds the token ids).
    """
    modules = dict(fm.caller.named_modules())
    logits, inputs, outputs = hook_forward(fm, theta, x, layers)
    ll = -torch.nn.functional.cross_entropy(logits, y, reduction="none")
    names = [n for n in layers if n in outputs]  # a layer the forward never calls (an unused
    # head): its gradients are zero, and callers leave its rows and columns at zero
    deltas = torch.autograd.grad(ll.sum(), [outputs[n] for n in names], allow_unused=True)
    out = []
    for name, d in zip(names, deltas):
        m, a = modules[name], inputs[name]
        if d is None:
            d = torch.zeros_like(outputs[name])
        if isinstance(m, nn.Conv2d):
            d = d.reshape(
                d.shape[0], d.shape[1], -1
            )  # a stays the raw input: see conv_weight_grads
        elif isinstance(m, nn.Linear) and a.ndim > 2:
            a = a.reshape(a.shape[0], -1, a.shape[-1])
            d = d.reshape(d.shape[0], -1, d.shape[-1])
        out.append((m, layers[name], a, d.detach()))
    return out


def norm_input(m: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """The normalised input ``x_hat`` of a BatchNorm (eval mode) or LayerNorm layer, like ``a``.

    The layer's output is ``x_hat * weight + bias`` (per channel, dimension 1, for BatchNorm;
    over the trailing ``normalized_shape`` for LayerNorm).
    """
    if isinstance(m, nn.LayerNorm):
        dims = tuple(range(a.ndim - len(m.normalized_shape), a.ndim))
        var, mean = torch.var_mean(a, dim=dims, keepdim=True, correction=0)
        return (a - mean) * torch.rsqrt(var + m.eps)
    assert isinstance(m, nn.modules.batchnorm._BatchNorm)  # internal: hookable() checked it
    assert m.running_mean is not None and m.running_var is not None
    shape = (1, -1) + (1,) * (a.ndim - 2)
    return (a - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)


def token_rows(
    m: nn.Embedding | nn.EmbeddingBag, ids: torch.Tensor, d: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nonzero rows of each example's embedding-weight gradient, without forming ``[B, V, D]``.

    Args:
        m: the layer; ids: its input token ids ``[B, ...]`` (``[B, L]`` bags for EmbeddingBag).
        d: its output gradient (``[B, ..., D]``; ``[B, D]`` for EmbeddingBag).

    Returns:
        ``(example [U], token [U], grad [U, D])``: for each distinct (example, token id) pair
        the summed gradient of that weight row (repeated ids in one example add up; the
        ``padding_idx`` row gets none, as in torch).
    """
    B = ids.shape[0]
    ids = ids.reshape(B, -1)
    D = d.shape[-1]
    if isinstance(m, nn.EmbeddingBag):
        scale = 1.0 / ids.shape[1] if m.mode == "mean" else 1.0
        d = (d * scale).unsqueeze(1).expand(B, ids.shape[1], D)
    d = d.reshape(B * ids.shape[1], D)
    example = torch.arange(B, device=ids.device).repeat_interleave(ids.shape[1])
    tokens = ids.reshape(-1)
    if m.padding_idx is not None:
        keep = tokens != m.padding_idx
        example, tokens, d = example[keep], tokens[keep], d[keep]
    key = example * m.num_embeddings + tokens
    uniq, inverse = torch.unique(key, return_inverse=True)
    rows = torch.zeros(uniq.numel(), D, dtype=d.dtype, device=d.device).index_add_(0, inverse, d)
    return uniq // m.num_embeddings, uniq % m.num_embeddings, rows


GROUPED_MIN_POSITIONS = 32
"""A convolution with at least this many output positions per example gets its per-example
weight gradients from one grouped backward-weight convolution (:func:`conv_weight_grads`),
2-10 times faster than ``unfold`` and a batched matmul on CPU on the ResNet-18 layout's
28x28 to 7x7 maps; one with fewer (its 4x4 maps) from ``unfold`` and a batched matmul, 2-4
times faster there."""

BLOCK_ELEMENTS = 2**21
"""Per-example weight gradients are formed a sub-batch at a time, at most about this many
numbers (8 MiB in float32) at once, so that a block stays in cache while it is squared or
multiplied: on the ResNet-18 layout's 128x128 convolutions a 128-example block (75 MB) is
squared 3-5 times slower than sixteen 8-example ones."""

GROUPED_BLOCK_ELEMENTS = 2**19
"""The same bound for the "grouped" way of :func:`conv_weight_grads` (2 MiB in float32):
its backward-weight convolution with the examples as groups slows down sharply past a few
MiB of output on CPU (the ResNet-18 layout's 64x64 convolutions on 7x7 maps: 60-64 us per
example in blocks of 8-28 examples, 96-164 us in blocks of 32-128, one thread), while the
"unfold" way's batched matmul prefers the larger :data:`BLOCK_ELEMENTS` (its 128x128
convolutions on 4x4 maps: 125 us per example at 2^21 numbers, 147 at 2^19). Over that
layout's whole diagonal Fisher (2,048 Fashion-MNIST images) the split is 6-9% faster than
2^21 for both."""


def conv_grads_grouped(m: nn.Conv2d, x: torch.Tensor, positions: int) -> bool:
    """Whether :func:`conv_weight_grads`'s "auto" takes the "grouped" way for input ``x``
    with ``positions`` output positions per example (see there)."""
    return positions >= GROUPED_MIN_POSITIONS and (x.dtype != torch.float64 or x.is_cuda)


def batch_blocks(batch: int, per_example: int, budget: int | None = None) -> list[slice]:
    """Consecutive sub-batches of ``range(batch)`` holding at most ``budget`` (default
    :data:`BLOCK_ELEMENTS`) numbers each when each example takes ``per_example`` (at least one
    example per block)."""
    budget = BLOCK_ELEMENTS if budget is None else budget
    step = max(1, min(batch, budget // max(per_example, 1)))
    return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]


def conv_weight_grads(
    m: nn.Conv2d,
    x: torch.Tensor,
    d: torch.Tensor,
    method: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example weight gradients ``sum_l d_l a_l^T`` ``[B, out, in*kh*kw]`` of a Conv2d.

    Args:
        m: the layer (``groups == 1``, numeric padding: see :func:`hookable`).
        x: its input ``[B, in, H, W]``.
        d: its output gradients ``[B, out, L]`` (``L = Ho * Wo`` positions).
        method: ``"grouped"``: one backward-weight convolution with the examples as groups
            (``[1, B*in, H, W]`` input, ``[1, B*out, Ho, Wo]`` output gradient), the kernel
            that computes an ordinary weight gradient (oneDNN on CPU, cuDNN on CUDA), so it
            costs about one weight gradient of the batch; ``"unfold"``: the input's patches
            ``[B, in*kh*kw, L]`` and one batched matmul; ``"auto"``: "grouped" when ``L >=``
            :data:`GROUPED_MIN_POSITIONS` (and the dtype is not float64, whose CPU kernel
            loops over the groups), else "unfold". All three are exact.
        out: an optional ``[B, out, in*kh*kw]`` buffer the "unfold" way writes into (reusing
            one saves a page-faulting allocation per block); "grouped" ignores it.

    Returns:
        The gradients (``out`` or a new tensor), in the order of ``weight.view(out, -1)``.
    """
    B, n_out, L = d.shape
    if method == "auto":
        method = "grouped" if conv_grads_grouped(m, x, L) else "unfold"
    if method == "unfold":
        return torch.bmm(d, unfold_input(m, x).transpose(1, 2), out=out)
    if method != "grouped":
        raise ValueError(f"method must be 'auto', 'grouped' or 'unfold'; got {method!r}")
    C, H, W = x.shape[1:]
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    ph, pw = cast("tuple[int, int]", m.padding)  # str padding excluded by hookable()
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    weight = x.new_empty(B * n_out, C, kh, kw)  # only its shape is read
    _, g, _ = torch.ops.aten.convolution_backward(
        d.reshape(1, B * n_out, Ho, Wo),
        x.reshape(1, B * C, H, W),
        weight,
        None,
        m.stride,
        m.padding,
        m.dilation,
        False,
        [0, 0],
        B,
        [False, True, False],
    )
    return g.reshape(B, n_out, C * kh * kw)
