"""A functional twin of a model: the same parameters, layers that ``torch.func`` can transform.

Some torch layers call fused kernels that ``torch.func`` cannot batch or differentiate in
forward mode:

* ``nn.GRU``/``nn.LSTM``/``nn.RNN`` (``_VF.gru`` & co. write into a hidden state created
  without the vmap batch dimension: ``output with shape [1, 16] doesn't match the broadcast
  shape [32, 1, 16]``);
* ``nn.EmbeddingBag`` (``_embedding_bag`` has no forward-mode derivative);
* ``nn.TransformerEncoderLayer``/``nn.MultiheadAttention`` in eval mode take a "fast path"
  (``aten::_transformer_encoder_layer_fwd``), and ``scaled_dot_product_attention`` a flash
  kernel, with no forward-mode derivative.

:func:`functional_twin` returns the model itself when it has none of the first two, and
otherwise a deep copy whose recurrent and bag layers compute the same function with plain
tensor operations (time steps unrolled: a loop over positions, never over examples). The
parameter and buffer names are unchanged, so ``functional_call`` passes the same dict. The
user's model is never modified. :func:`no_fastpath` turns the attention fast path off for the
duration of netmend's functional calls and restores the user's setting afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def no_fastpath() -> Iterator[None]:
    """Inside: no attention fast path, and ``scaled_dot_product_attention`` in its math kernel.

    The ``nn.MultiheadAttention``/``nn.TransformerEncoderLayer`` fast path and the fused
    (flash) attention kernels have no forward-mode derivatives; the regular path and the math
    kernel compute the same function with plain operations (slower on a GPU). The previous
    global settings are restored on exit.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mha = torch.backends.mha
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        mha.set_fastpath_enabled(before)


def needs_twin(model: nn.Module) -> bool:
    """Whether ``model`` has a recurrent or ``EmbeddingBag`` layer (see the module docstring)."""
    return any(isinstance(m, (nn.RNNBase, nn.EmbeddingBag)) for m in model.modules())


def functional_twin(model: nn.Module) -> nn.Module:
    """``model`` itself, or a copy whose RNN/EmbeddingBag layers use plain tensor operations.

    Raises:
        ValueError: a recurrent layer netmend cannot unroll (``nn.RNN`` with a non-tanh/relu
            nonlinearity cannot occur; this is for future layer kinds), named.
    """
    if not needs_twin(model):
        return model
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, (nn.GRU, nn.LSTM, nn.RNN)):
            m.forward = types.MethodType(_unrolled_forward, m)  # type: ignore[method-assign]
        elif isinstance(m, nn.EmbeddingBag):
            m.forward = types.MethodType(_bag_forward, m)  # type: ignore[method-assign]
    return twin


def _bag_forward(
    self: nn.EmbeddingBag,
    input: torch.Tensor,
    offsets: torch.Tensor | None = None,
    per_sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``nn.EmbeddingBag.forward`` for 2-D bags (``[B, L]`` ids) with plain operations.

    1-D inputs with ``offsets`` (ragged bags) and ``padding_idx`` go to the original kernel,
    which has every reverse-mode derivative but no forward-mode one.
    """
    if input.ndim != 2 or offsets is not None or self.padding_idx is not None:
        return nn.EmbeddingBag.forward(self, input, offsets, per_sample_weights)
    e = F.embedding(
        input, self.weight, max_norm=self.max_norm, norm_type=self.norm_type
    )  # [B, L, D]
    if per_sample_weights is not None:
        e = e * per_sample_weights.unsqueeze(-1)
    if self.mode == "sum":
        return e.sum(1)
    if self.mode == "mean":
        return e.mean(1)
    return e.amax(1)


def _cell(
    mode: str,
    x: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor | None,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
    w_hr: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One time step of a GRU/LSTM/RNN cell (torch's gate layout), ``x`` ``[B, in]``."""
    gi = F.linear(x, w_ih, b_ih)
    gh = F.linear(h, w_hh, b_hh)
    if mode == "GRU":
        ir, iz, in_ = gi.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h, None
    if mode == "LSTM":
        assert c is not None  # internal invariant: LSTMs carry a cell state
        i, f, g, o = (gi + gh).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if w_hr is None else F.linear(h, w_hr)), c
    pre = gi + gh
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None


def _unrolled_forward(self: nn.RNNBase, input: Any, hx: Any = None) -> Any:
    """``nn.GRU``/``nn.LSTM``/``nn.RNN`` ``forward`` with the time steps unrolled."""
    if isinstance(input, nn.utils.rnn.PackedSequence):
        raise TypeError(
            f"netmend cannot differentiate a {type(self).__name__} through a PackedSequence per "
            "example; pad the sequences (and mask or pick the last real step in the model)"
        )
    batched = input.ndim == 3
    x = input if batched else input.unsqueeze(1 if not self.batch_first else 0)
    if self.batch_first:
        x = x.transpose(0, 1)  # [T, B, in]
    T, B = x.shape[0], x.shape[1]
    dirs = 2 if self.bidirectional else 1
    lstm = self.mode == "LSTM"
    real = self.proj_size if getattr(self, "proj_size", 0) > 0 else self.hidden_size
    if hx is None:
        h0 = x.new_zeros(self.num_layers * dirs, B, real)
        c0 = x.new_zeros(self.num_layers * dirs, B, self.hidden_size) if lstm else None
    else:
        h0, c0 = hx if lstm else (hx, None)
        if not batched:
            h0 = h0.unsqueeze(1)
            c0 = None if c0 is None else c0.unsqueeze(1)
    hs, cs = [], []
    layer_in = x
    for layer in range(self.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"l{layer}" + ("_reverse" if d == 1 else "")
            w_ih = getattr(self, f"weight_ih_{sfx}")
            w_hh = getattr(self, f"weight_hh_{sfx}")
            b_ih = getattr(self, f"bias_ih_{sfx}") if self.bias else None
            b_hh = getattr(self, f"bias_hh_{sfx}") if self.bias else None
            w_hr = getattr(self, f"weight_hr_{sfx}", None) if lstm else None
            k = layer * dirs + d
            h = h0[k]
            c = None if c0 is None else c0[k]
            steps = range(T - 1, -1, -1) if d == 1 else range(T)
            seq: list[torch.Tensor] = [h] * T
            for t in steps:
                h, c = _cell(self.mode, layer_in[t], h, c, w_ih, w_hh, b_ih, b_hh, w_hr)
                seq[t] = h
            outs.append(torch.stack(seq))
            hs.append(h)
            if c is not None:
                cs.append(c)
        layer_in = torch.cat(outs, -1) if dirs == 2 else outs[0]
        if self.training and self.dropout > 0 and layer < self.num_layers - 1:
            layer_in = F.dropout(layer_in, self.dropout, True)
    out = layer_in.transpose(0, 1) if self.batch_first else layer_in
    h_n = torch.stack(hs)
    c_n = torch.stack(cs) if lstm else None
    if not batched:
        out = out.squeeze(0 if self.batch_first else 1)
        h_n = h_n.squeeze(1)
        c_n = None if c_n is None else c_n.squeeze(1)
    return (out, (h_n, c_n)) if lstm else (out, h_n)
