"""Kronecker-factored curvature: KFAC and EK-FAC for Linear, Conv2d and embedding layers.

An ``nn.Embedding`` is the linear layer that maps the one-hot code of a token to its row, so
its input factor ``A`` is the (diagonal) matrix of token frequencies, and an
``nn.EmbeddingBag`` ("sum"/"mean") the linear layer of the bag's count vector.

Per layer, the parameters are viewed as one matrix ``W~ = [W | b]`` of shape ``[out, in']``
(a convolution's weight flattened to ``[out, in*kh*kw]``, the bias folded in as the gradient
of an appended constant-1 input, ``in' = in (+1)``). The per-example gradient of
``log p(y_n|x_n)`` is ``g_n = sum_l d_{n,l} a_{n,l}^T`` with ``a`` the layer's (augmented)
input and ``d`` the gradient w.r.t. its output at position ``l`` (one position for a plain
linear layer, the ``L`` output pixels of a convolution, the extra positions of a linear layer
applied to ``[B, S, in]``). With ``vec`` the row-major flattening (the order of the flat
parameter vector), each layer's block of the curvature is approximated by

* **KFAC** (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016)::

      F_layer ~= G (x) A,   A = (1/N) sum_n sum_l a_{n,l} a_{n,l}^T   [in', in'],
                            G = (1/L) sum_n sum_l d_{n,l} d_{n,l}^T   [out, out];

* **EK-FAC** (George et al. 2018): with ``A = Q_A S_A Q_A^T`` and ``G = Q_G S_G Q_G^T``,
  ``F_layer ~= (Q_G (x) Q_A) diag(Lambda) (Q_G (x) Q_A)^T`` with the eigenvalue correction
  ``Lambda = sum_n (Q_G^T g_n Q_A)**2`` ``[out, in']``, the exact second moment of the
  per-example gradients in the Kronecker eigenbasis (the best diagonal in that basis, so
  EK-FAC is never further from the true block than KFAC, whose ``Lambda`` is
  ``outer(S_G, S_A)``).

Layers are independent (block diagonal). **Scaling**: as everywhere in netmend the curvature
is the **sum** over the examples (``F_sum = N * F_mean``): ``A`` is a mean and ``G`` a sum, so
``G (x) A`` is exact for a single example and scales like ``N``.

Cost: the factors come from ONE streamed pass over the data (one forward and one backward per
chunk, layer hooks, no per-example gradients; a convolution's input factor is assembled from
products of image rows instead of ``unfold(x) unfold(x)^T``, several times cheaper, see
:func:`_conv_input_cov`). EK-FAC's correction needs a second pass (its eigenbasis depends on
the factors of the whole set), which forms per-example gradients ``[chunk, out, in']`` of one
layer at a time (a single matmul of squares for plain linear layers), never per-example
gradients of the whole model. On the MNIST CNN (one CPU thread) the KFAC pass costs about 1.0
training epoch and EK-FAC's correction about 2.1 more, dominated by rotating the second
convolution's per-example gradients ``[32, 401]`` by its ``401 x 401`` eigenbasis. Either pass
can run on a seeded subsample (``covariance_max_examples``, ``correction_max_examples``,
rescaled to estimate the full sum): correcting on 20k of 60k examples brings EK-FAC to 1.7
epochs at a Spearman of 0.998 with the full factors' influence scores
(``benchmarks/ekfac_timing.py``).

**Which Fisher** (``fisher_type``): the output gradients ``d`` are taken at

* ``"empirical"``: the observed labels: ``sum_n g_n g_n^T`` with ``g_n`` the gradient of
  ``log p(y_n|x_n)``, the Fisher of the paper's EWC and of netmend's diagonal ``"diag"``;
* ``"sampled"``: labels drawn from the model's own predictive distribution (``mc_samples``
  per example, seeded): an unbiased Monte-Carlo estimate of the true Fisher, which for softmax
  cross-entropy equals the GGN ``sum_n J_n^T H_n J_n``. EK-FAC's correction draws its own
  labels, independent of the factors' (:func:`label_uniforms` says why: reusing them biased
  ``Lambda`` towards zero and cost about 0.09 of per-query LDS on a 1.3M-parameter MNIST MLP,
  ``benchmarks/peers_scale.json``; docs/peers-scale.md);
* ``"exact"``: the expectation over labels computed exactly (every class weighted by its
  probability; ``C`` backward passes per chunk): the KFAC/EK-FAC of the GGN itself. Exact,
  costlier; used by the tests and worth it when there are few classes.

The default is **consumer-dependent**, because the two uses want different matrices:

* a **solve** (the ``newton`` removal step, ``linear`` influence) uses the curvature as a
  Hessian surrogate. The true Fisher/GGN is the principled one: it is the Gauss-Newton
  approximation of the Hessian, positive semi-definite, and does not depend on whether the
  observed labels are fit (the empirical Fisher is a poor and label-dependent stand-in,
  Kunstner et al. 2019, and vanishes on examples the model fits perfectly). kronfluence uses
  sampled labels for influence for this reason. So :data:`DEFAULT_FISHER_TYPE` is
  ``"sampled"``;
* the **EWC penalty** (the ``ewc`` treatment) is the paper's Fisher penalty, the empirical
  Fisher; switching ``curvature`` from ``"diag"`` to ``"kfac"`` there changes only the
  structure of the approximation, not the matrix approximated, so the ``ewc`` treatment
  defaults to ``"empirical"`` (:data:`EWC_FISHER_TYPE`).

Either consumer accepts ``fisher_type=`` to override. Models with trainable parameters outside
``nn.Linear``/``nn.Conv2d``/``nn.Embedding``/``nn.EmbeddingBag`` raise ``ValueError`` (use
``curvature="diag"`` or ``"ggn"``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from netmend.curvature.hooks import (
    HookFallback,
    conv_weight_grads,
    hook_deltas,
    hook_forward,
    unfold_input,
)
from netmend.data.streaming import chunks
from netmend.model.functional import Data, FunctionalModel

KRONECKER_KINDS: tuple[str, ...] = ("kfac", "ekfac")
FISHER_TYPES: tuple[str, ...] = ("empirical", "sampled", "exact")
DEFAULT_FISHER_TYPE = "sampled"
"""For solves (Newton step, linear influence): a Monte-Carlo estimate of the true Fisher/GGN."""
EWC_FISHER_TYPE = "empirical"
"""For the EWC penalty: the paper's (empirical) Fisher, the one the diagonal EWC code uses."""
FORMAT = "netmend.kronecker/1"

_HINT = (
    "use curvature='diag' or curvature='ggn' for this model (to identify: method='influence' "
    "with that curvature)"
)


KRONECKER_LAYERS = (nn.Linear, nn.Conv2d, nn.Embedding, nn.EmbeddingBag)
"""The layer kinds KFAC/EK-FAC cover."""

EMBEDDING_MAX_ROWS = 4096
"""Most rows (vocabulary size) of an embedding KFAC/EK-FAC accepts: its input factor is a dense
``[V, V]`` matrix here (diagonal for ``nn.Embedding``, but stored and rotated densely)."""


def _check_embedding(name: str, m: nn.Embedding | nn.EmbeddingBag) -> None:
    """Refuse embeddings the Kronecker factors cannot represent exactly (named)."""
    if m.max_norm is not None:
        raise ValueError(f"embedding {name!r} renormalises rows (max_norm); {_HINT}")
    if isinstance(m, nn.EmbeddingBag) and (
        m.mode not in ("sum", "mean") or m.padding_idx is not None
    ):
        raise ValueError(
            f"EmbeddingBag {name!r} has mode {m.mode!r} or a padding_idx; KFAC covers 'sum' and "
            f"'mean' bags without padding_idx; {_HINT}"
        )
    if m.num_embeddings > EMBEDDING_MAX_ROWS:
        raise ValueError(
            f"embedding {name!r} has {m.num_embeddings} rows: its KFAC input factor would be a "
            f"dense {m.num_embeddings}x{m.num_embeddings} matrix (at most {EMBEDDING_MAX_ROWS} "
            f"rows); {_HINT}"
        )


def shared_names(module: nn.Module) -> list[str]:
    """The names of the parameters that share a tensor with another name (weight tying)."""
    seen: dict[int, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(n)
    return [n for names in seen.values() if len(names) > 1 for n in names]


def kronecker_layers(fm: FunctionalModel) -> dict[str, tuple[nn.Module, slice, slice | None]]:
    """Each trainable layer and where its weight and bias sit in the flat parameter vector.

    Returns:
        ``{layer name: (module, weight slice, bias slice or None)}`` in parameter order.

    Raises:
        ValueError: a trainable parameter outside an ``nn.Linear``/``nn.Conv2d`` (named), a
            grouped or string-padded convolution, a parameter shared by two modules, or a
            frozen weight with a trainable bias.
    """
    modules = dict(fm.module.named_modules())
    owners = [n for n, _ in fm.module.named_parameters(remove_duplicate=False)]
    if len(owners) != len(list(fm.module.parameters())):
        raise ValueError(
            f"parameters {shared_names(fm.module)} are one tensor shared by several layers "
            f"(weight tying): KFAC cannot split it; {_HINT}"
        )
    out: dict[str, tuple[nn.Module, slice, slice | None]] = {}
    weights: dict[str, slice] = {}
    biases: dict[str, slice] = {}
    i = 0
    for name, shape in zip(fm.names, fm.shapes):
        k = shape.numel()
        mod_name, _, leaf = name.rpartition(".")
        m = modules.get(mod_name)
        if not isinstance(m, KRONECKER_LAYERS) or leaf not in ("weight", "bias"):
            kind = type(m).__name__ if m is not None else "module"
            raise ValueError(
                f"parameter {name!r} belongs to the {kind} layer {mod_name!r}: KFAC/EK-FAC "
                f"cover only nn.Linear, nn.Conv2d, nn.Embedding and nn.EmbeddingBag layers; "
                f"{_HINT}"
            )
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            _check_embedding(mod_name, m)
        if isinstance(m, nn.Conv2d) and (
            m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)
        ):
            raise ValueError(
                f"Conv2d layer {mod_name!r} has groups, a non-zero padding mode or string "
                f"padding, which KFAC does not support; {_HINT}"
            )
        (weights if leaf == "weight" else biases)[mod_name] = slice(i, i + k)
        i += k
    for mod_name in list(dict.fromkeys([*weights, *biases])):
        if mod_name not in weights:
            raise ValueError(
                f"layer {mod_name!r} has a frozen weight but a trainable bias; unfreeze the "
                f"weight or {_HINT}"
            )
        out[mod_name] = (modules[mod_name], weights[mod_name], biases.get(mod_name))
    return out


@dataclass
class LayerFactors:
    """The Kronecker factors of one layer (shapes with ``in' = in (+1 for the bias)``).

    Attributes:
        name: the module's name in the model.
        weight, bias: where the weight (row-major ``[out, in]``) and bias sit in the flat vector.
        A: ``(1/N) sum_{n,l} a a^T`` ``[in', in']``; G: ``(1/L) sum_{n,l} d d^T`` ``[out, out]``.
        QA, eigA: eigenvectors ``[in', in']`` and eigenvalues ``[in']`` of ``A``; QG, eigG of ``G``.
        eigenvalues: ``Lambda`` ``[out, in']``, the curvature's eigenvalues in the basis
            ``Q_G (x) Q_A``: ``outer(eigG, eigA)`` for KFAC, the correction for EK-FAC.
        transposed: the weight is stored ``[in, out]`` (an embedding: ``[V, D]``, the
            transpose of the ``[D, V]`` matrix that maps a one-hot token to its row).
    """

    name: str
    weight: slice
    bias: slice | None
    A: torch.Tensor
    G: torch.Tensor
    QA: torch.Tensor
    eigA: torch.Tensor
    QG: torch.Tensor
    eigG: torch.Tensor
    eigenvalues: torch.Tensor
    transposed: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in')``."""
        return int(self.G.shape[0]), int(self.A.shape[0])

    def to_matrix(self, rows: torch.Tensor) -> torch.Tensor:
        """This layer's part of flat vectors ``[m, P]`` as matrices ``[m, out, in']``."""
        out, inn = self.shape
        if self.transposed:
            return rows[:, self.weight].reshape(rows.shape[0], inn, out).transpose(1, 2)
        W = rows[:, self.weight].reshape(rows.shape[0], out, -1)
        if self.bias is None:
            return W
        return torch.cat([W, rows[:, self.bias, None]], 2)

    def from_matrix(self, M: torch.Tensor, rows: torch.Tensor) -> None:
        """Write matrices ``[m, out, in']`` into flat vectors ``rows`` ``[m, P]`` in place."""
        if self.transposed:
            rows[:, self.weight] = M.transpose(1, 2).reshape(M.shape[0], -1)
            return
        if self.bias is None:
            rows[:, self.weight] = M.reshape(M.shape[0], -1)
            return
        rows[:, self.weight] = M[:, :, :-1].reshape(M.shape[0], -1)
        rows[:, self.bias] = M[:, :, -1]

    def rotate(self, M: torch.Tensor) -> torch.Tensor:
        """``Q_G^T M Q_A`` for ``M`` ``[m, out, in']``: coordinates in the Kronecker eigenbasis."""
        return self.QG.T @ M @ self.QA

    def unrotate(self, M: torch.Tensor) -> torch.Tensor:
        """``Q_G M Q_A^T`` (inverse of :meth:`rotate`)."""
        return self.QG @ M @ self.QA.T


@dataclass
class KroneckerFactors:
    """Block-diagonal Kronecker-factored curvature ``C_sum`` (KFAC or EK-FAC) of a model.

    Attributes:
        kind: "kfac" or "ekfac".
        layers: one :class:`LayerFactors` per trainable layer, in parameter order.
        num_params: ``P``, the length of the flat parameter vector.
        fisher_type: "empirical", "sampled" or "exact" (see the module docstring).
        num_examples: ``N``, the number of examples summed over.
        mc_samples, seed: label samples per example and their seed (for "sampled"; the seed
            also draws the subsamples below).
        covariance_examples: how many examples the factors ``A`` and ``G`` (and so the
            eigenbases) were estimated on (``num_examples`` unless subsampled).
        correction_examples: how many examples EK-FAC's ``Lambda`` was estimated on (0 for
            KFAC; ``num_examples`` unless subsampled).
    """

    kind: str
    layers: list[LayerFactors]
    num_params: int
    fisher_type: str
    num_examples: int
    mc_samples: int = 1
    seed: int = 0
    covariance_examples: int = 0
    correction_examples: int = 0

    def _rows(self, v: torch.Tensor) -> torch.Tensor:
        if v.ndim not in (1, 2) or v.shape[0] != self.num_params:
            raise ValueError(
                f"expected a vector [{self.num_params}] or matrix [{self.num_params}, m]; "
                f"got {tuple(v.shape)}"
            )
        return v[None] if v.ndim == 1 else v.T

    def _apply(self, v: torch.Tensor, scale: Any) -> torch.Tensor:
        """``(Q_G (x) Q_A) diag(scale(Lambda)) (Q_G (x) Q_A)^T v`` per layer."""
        rows = self._rows(v)
        out = torch.zeros_like(rows)
        for lf in self.layers:
            M = lf.rotate(lf.to_matrix(rows))
            lf.from_matrix(lf.unrotate(scale(lf.eigenvalues.to(M)) * M), out)
        return out[0] if v.ndim == 1 else out.T

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``C_sum v`` (undamped) for ``v`` ``[P]`` or ``[P, m]``."""
        return self._apply(v, lambda lam: lam)

    def solve(self, b: torch.Tensor, damping: float) -> torch.Tensor:
        """``(C_sum + damping I)^{-1} b``, exactly (in the eigenbasis), ``b`` ``[P]`` or ``[P, m]``.

        ``(Q_G (x) Q_A) diag(1/(Lambda + damping)) (Q_G (x) Q_A)^T b``, per layer.
        """
        if not damping > 0:
            raise ValueError(f"damping must be > 0 (got {damping}); the curvature is singular")
        return self._apply(b, lambda lam: 1.0 / (lam + damping))

    def quadratic(self, v: torch.Tensor) -> torch.Tensor:
        """``v^T C_sum v`` (undamped; a scalar, or ``[m]`` for ``v`` ``[P, m]``).

        Differentiable in ``v`` (the EWC penalty uses it inside an autograd objective).
        """
        rows = self._rows(v)
        total = rows.new_zeros(rows.shape[0])
        for lf in self.layers:
            M = lf.rotate(lf.to_matrix(rows))
            total = total + (lf.eigenvalues.to(M) * M * M).sum((1, 2))
        return total[0] if v.ndim == 1 else total

    def diagonal(self) -> torch.Tensor:
        """The diagonal of ``C_sum``, ``[P]``: ``(Q_G**2) Lambda (Q_A**2)^T`` per layer."""
        dtype = self.layers[0].A.dtype
        device = self.layers[0].A.device
        out = torch.zeros(1, self.num_params, dtype=dtype, device=device)
        for lf in self.layers:
            d = (lf.QG * lf.QG) @ lf.eigenvalues @ (lf.QA * lf.QA).T
            lf.from_matrix(d[None], out)
        return out[0]

    def dense(self) -> torch.Tensor:
        """The full ``[P, P]`` matrix (for tests and tiny models only)."""
        A = self.layers[0].A
        eye = torch.eye(self.num_params, dtype=A.dtype, device=A.device)
        return self.matvec(eye)

    def to(self, device: torch.device | str) -> KroneckerFactors:
        """A copy with every factor on ``device``."""
        layers = [
            LayerFactors(
                lf.name,
                lf.weight,
                lf.bias,
                lf.A.to(device),
                lf.G.to(device),
                lf.QA.to(device),
                lf.eigA.to(device),
                lf.QG.to(device),
                lf.eigG.to(device),
                lf.eigenvalues.to(device),
                lf.transposed,
            )
            for lf in self.layers
        ]
        return dataclasses.replace(self, layers=layers)

    _TENSORS = ("A", "G", "QA", "eigA", "QG", "eigG", "eigenvalues")

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """A flat ``{key: tensor}`` dict and a ``{key: str}`` metadata dict (safetensors-ready).

        Keys are ``"<layer>/<factor>"``; the metadata holds the kind, the Fisher type, ``N``,
        ``P`` and each layer's slices, as strings. Inverse: :meth:`from_tensors`.
        """
        tensors = {
            f"{lf.name}/{k}": getattr(lf, k).detach().contiguous()
            for lf in self.layers
            for k in self._TENSORS
        }
        layers = [
            {
                "name": lf.name,
                "weight": [lf.weight.start, lf.weight.stop],
                "bias": None if lf.bias is None else [lf.bias.start, lf.bias.stop],
                "transposed": lf.transposed,
            }
            for lf in self.layers
        ]
        meta = {
            "format": FORMAT,
            "kind": self.kind,
            "fisher_type": self.fisher_type,
            "num_examples": str(self.num_examples),
            "num_params": str(self.num_params),
            "mc_samples": str(self.mc_samples),
            "seed": str(self.seed),
            "covariance_examples": str(self.covariance_examples),
            "correction_examples": str(self.correction_examples),
            "layers": json.dumps(layers),
        }
        return tensors, meta

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> KroneckerFactors:
        """Rebuild factors saved by :meth:`to_tensors`; raises ValueError if anything is off."""
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"not Kronecker factors of format {FORMAT!r} (got {metadata.get('format')!r}); "
                "recompute them"
            )
        try:
            specs = json.loads(metadata["layers"])
            layers = []
            for s in specs:
                w = slice(*s["weight"])
                b = None if s["bias"] is None else slice(*s["bias"])
                layers.append(
                    LayerFactors(
                        s["name"],
                        w,
                        b,
                        transposed=bool(s.get("transposed", False)),
                        **{k: tensors[f"{s['name']}/{k}"] for k in cls._TENSORS},
                    )
                )
            out = cls(
                metadata["kind"],
                layers,
                int(metadata["num_params"]),
                metadata["fisher_type"],
                int(metadata["num_examples"]),
                int(metadata["mc_samples"]),
                int(metadata["seed"]),
                int(metadata.get("covariance_examples", metadata["num_examples"])),
                int(metadata.get("correction_examples", 0)),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"incomplete Kronecker factors ({exc!r}); recompute them") from exc
        for lf in out.layers:
            o, i = lf.shape
            if tuple(lf.eigenvalues.shape) != (o, i):
                raise ValueError(f"layer {lf.name!r}: eigenvalues do not match the factors")
        return out


# ----------------------------------------------------------------------------- computation


def _canonical_a(m: nn.Module, a: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """A layer's input as ``[B, in', L]`` (conv patches / positions last, bias column appended).

    An embedding's input is its token ids; its ``a`` is their one-hot code ``[B, V, L]`` (the
    ``padding_idx`` column zero: that row gets no gradient), and an EmbeddingBag's the bag's
    count vector ``[B, V, 1]`` (divided by the bag length for "mean").
    """
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        ids = a.reshape(a.shape[0], -1)
        onehot = torch.nn.functional.one_hot(ids, m.num_embeddings).to(m.weight.dtype)
        if m.padding_idx is not None:
            onehot[..., m.padding_idx] = 0
        if isinstance(m, nn.EmbeddingBag):
            bag = onehot.sum(1) / (ids.shape[1] if m.mode == "mean" else 1)
            return bag[:, :, None]
        return onehot.transpose(1, 2)
    if isinstance(m, nn.Conv2d):
        a = unfold_input(m, a)
    elif a.ndim == 2:
        a = a[:, :, None]
    else:
        a = a.reshape(a.shape[0], -1, a.shape[-1]).transpose(1, 2)
    if has_bias:
        a = torch.cat([a, a.new_ones(a.shape[0], 1, a.shape[2])], 1)
    return a


def _input_cov(m: nn.Module, x: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """``sum_n sum_l a_{n,l} a_{n,l}^T`` over a chunk, ``[in', in']``, from the raw layer input."""
    if isinstance(m, nn.Conv2d):
        return _conv_input_cov(m, x, has_bias)
    a = _canonical_a(m, x, has_bias)
    af = a.transpose(0, 1).reshape(a.shape[1], -1)  # [in', B*L]
    return af @ af.T


def _conv_input_cov(m: nn.Conv2d, x: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """KFC's ``sum_n sum_l a_{n,l} a_{n,l}^T`` for a convolution without unfolding its input.

    For kernel offsets ``u = (uy, ux)`` and ``u' = (uy', ux')`` the block of ``A`` between them
    is ``sum_{n, l} x_n[:, u + s*l] x_n[:, u' + s*l]^T``. Every such product is an entry of
    ``R_dy[y] = X[y] X[y + dy]^T`` with ``X[y]`` the image row ``y`` as a ``[W*C, B]``
    matrix and ``dy = uy' - uy``: one batched matmul per row offset ``dy >= 0`` (the blocks
    with ``dy < 0`` are transposes) gives all of them, and each block is a gather-and-sum
    over the output grid. For a ``k x k`` kernel this is about ``k (H W C)^2 / H`` products
    per example instead of the ``k^4 L C^2`` of ``unfold(x) unfold(x)^T`` (5-6x fewer for
    the MNIST CNN), in large, efficient matmuls.
    """
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    ph, pw = cast("tuple[int, int]", m.padding)  # str padding excluded by kronecker_layers
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    B, C, Hp, Wp = xp.shape
    Ho, Wo = (Hp - dh * (kh - 1) - 1) // sh + 1, (Wp - dw * (kw - 1) - 1) // sw + 1
    rows = xp.permute(2, 3, 1, 0).reshape(Hp, Wp * C, B)  # X[y], row y of the image
    K = kh * kw
    blocks = x.new_zeros(K, K, C, C)
    oy = torch.arange(Ho, device=x.device) * sh
    ox = torch.arange(Wo, device=x.device) * sw
    for di in range(kh):
        dy = di * dh
        h = Hp - dy
        R = torch.bmm(rows[:h], rows[dy:].transpose(1, 2)).view(h, Wp, C, Wp, C)
        ks, k2s = [], []
        for i in range(kh - di):
            for j in range(kw):
                for j2 in range(kw):
                    ks.append(i * kw + j)
                    k2s.append((i + di) * kw + j2)
        k1 = torch.tensor(ks, device=x.device)
        k2 = torch.tensor(k2s, device=x.device)
        y_idx = (k1 // kw * dh)[:, None, None] + oy[None, :, None]  # [npairs, Ho, 1]
        x1 = (k1 % kw * dw)[:, None, None] + ox[None, None, :]  # [npairs, 1, Wo]
        x2 = (k2 % kw * dw)[:, None, None] + ox[None, None, :]
        vals = R[y_idx, x1, :, x2, :].sum((1, 2))  # [npairs, C, C]
        blocks[k1, k2] = vals
        if di > 0:
            blocks[k2, k1] = vals.transpose(1, 2)
    A = blocks.permute(2, 0, 3, 1).reshape(C * K, C * K)  # index (c, k) as in unfold
    if not has_bias:
        return A
    xs = xp.sum(0)  # [C, Hp, Wp]
    col = torch.stack(
        [xs[:, i * dh + oy][:, :, j * dw + ox].sum((1, 2)) for i in range(kh) for j in range(kw)],
        1,
    ).reshape(-1)  # [C*K]
    out = x.new_empty(C * K + 1, C * K + 1)
    out[:-1, :-1] = A
    out[:-1, -1] = col
    out[-1, :-1] = col
    out[-1, -1] = B * Ho * Wo
    return out


def _canonical_d(m: nn.Module, d: torch.Tensor) -> torch.Tensor:
    """A layer's output gradient as ``[B, out, L]``."""
    if isinstance(m, nn.Conv2d):
        return d.reshape(d.shape[0], d.shape[1], -1)
    if d.ndim == 2:
        return d[:, :, None]
    return d.reshape(d.shape[0], -1, d.shape[-1]).transpose(1, 2)


def _cotangents(
    logits: torch.Tensor,
    y: torch.Tensor,
    fisher_type: str,
    uniforms: torch.Tensor | None,
) -> list[torch.Tensor]:
    """Logit cotangents whose pulled-back outer products sum to the chosen Fisher.

    ``d log p(c|x) / d logits = onehot(c) - p``: "empirical" uses the observed label; "sampled"
    ``S`` labels drawn by inverse CDF from fixed uniforms ``[B, S]`` (each scaled by
    ``1/sqrt(S)``); "exact" every class ``c`` scaled by ``sqrt(p_c)``.
    """
    z = logits.detach()
    p = torch.softmax(z, 1)
    C = p.shape[1]

    def onehot(lab: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(lab, C).to(p)

    if fisher_type == "empirical":
        return [onehot(y) - p]
    if fisher_type == "sampled":
        assert uniforms is not None  # drawn by the caller (internal invariant)
        cdf = torch.cumsum(p, 1)
        S = uniforms.shape[1]
        out = []
        for s in range(S):
            u = uniforms[:, s : s + 1].to(cdf)
            lab = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1).clamp_max(C - 1)
            out.append((onehot(lab) - p) / math.sqrt(S))
        return out
    eye = torch.eye(C, dtype=p.dtype, device=p.device)
    return [p[:, c : c + 1].sqrt() * (eye[c] - p) for c in range(C)]


def _check_args(kind: str, fisher_type: str, mc_samples: int, N: int) -> None:
    if kind not in KRONECKER_KINDS:
        raise ValueError(f"unknown Kronecker kind {kind!r}; choose one of {KRONECKER_KINDS}")
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"unknown fisher_type {fisher_type!r}; choose one of {FISHER_TYPES}")
    if not (isinstance(mc_samples, int) and mc_samples >= 1):
        raise ValueError(f"mc_samples must be a positive int; got {mc_samples!r}")
    if N < 1:
        raise ValueError("Kronecker factors need at least one example")


def _passes(
    fm: FunctionalModel,
    theta: torch.Tensor,
    X: Data,
    y: torch.Tensor,
    layers: dict[str, tuple[nn.Module, slice, slice | None]],
    fisher_type: str,
    uniforms: torch.Tensor | None,
    chunk_size: int,
    device: torch.device,
    progress: bool,
    desc: str,
    index: torch.Tensor | None = None,
) -> Any:
    """Stream the data: per chunk, per layer, ``(name, module, raw input, [d [B, out, L], ...])``.

    One ``d`` per logit cotangent (see :func:`_cotangents`). ``index`` (sorted row indices)
    restricts the pass to a subsample, read chunk by chunk (no copy of the subsample).
    """
    names = list(layers)
    rows = len(X) if index is None else index.numel()
    for c in tqdm(list(chunks(rows, chunk_size)), desc=desc, disable=not progress, leave=False):
        s = c if index is None else index[c]
        x, t = X[s].to(device), y[s].to(device)
        try:
            logits, inputs, outputs = hook_forward(fm, theta, x, {n: {} for n in names})
        except HookFallback as exc:
            raise ValueError(
                f"layer {exc.args[0]!r} is called more than once per forward (weight sharing): "
                f"KFAC cannot serve it; {_HINT}"
            ) from None
        missing = [n for n in names if n not in inputs]
        if missing:
            raise ValueError(
                f"layer {missing[0]!r} is not used by the model's forward: freeze its "
                f"parameters (requires_grad_(False)), or {_HINT}"
            )
        cots = _cotangents(logits, t, fisher_type, None if uniforms is None else uniforms[s])
        ds = [
            hook_deltas(logits, outputs, names, c, retain_graph=k < len(cots) - 1)
            for k, c in enumerate(cots)
        ]
        del logits, outputs
        for j, n in enumerate(names):
            m, _, b = layers[n]
            yield n, m, inputs.pop(n), [_canonical_d(m, dk[j]) for dk in ds]


COVARIANCE_STREAM = 0
"""Stream of the sampled labels of the factors ``A``, ``G`` (and so of the eigenbases)."""
CORRECTION_STREAM = 1
"""Stream of the sampled labels of EK-FAC's eigenvalue correction: independent of the above."""


def label_uniforms(N: int, mc_samples: int, seed: int, stream: int) -> torch.Tensor:
    """The fixed uniforms ``[N, mc_samples]`` (float64) that draw the sampled labels of a pass.

    Drawn up front from a local generator, so that the chunking does not change the labels.
    The covariance pass (``stream`` :data:`COVARIANCE_STREAM`) is seeded by ``seed`` itself;
    EK-FAC's correction (:data:`CORRECTION_STREAM`) draws **independent** labels, from a seed
    derived from ``(seed, stream)``. Reusing the covariance pass's labels biases the
    correction: the eigenbasis ``Q_G`` is fitted to those very output gradients, so ``Lambda``
    measured on them is too small in the directions they happened to miss (exactly zero in
    the null space of a sampled ``G`` of deficient rank, where the true Fisher is not). With
    one sampled label per example on a well-fit model, most sampled gradients are tiny and
    ``G`` is such a low-rank estimate; the tiny damping of influence functions then inverts
    those zeros. With independent labels ``Lambda`` is, given the basis, an unbiased estimate
    of the Fisher's diagonal in it, as in kronfluence (whose two passes draw their own labels).
    """
    if stream == COVARIANCE_STREAM:
        gen = torch.Generator().manual_seed(seed)
    else:
        state = np.random.SeedSequence([seed, stream]).generate_state(2, np.uint32)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.rand(N, mc_samples, generator=gen, dtype=torch.float64)


def _eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0: the factor is PSD) and eigenvectors, computed in float64."""
    w, Q = torch.linalg.eigh(M.double())
    return w.clamp_min(0).to(M.dtype), Q.to(M.dtype)


def kronecker_factors(
    fm: FunctionalModel,
    theta: torch.Tensor,
    X: Data,
    y: torch.Tensor,
    kind: str = "kfac",
    fisher_type: str = DEFAULT_FISHER_TYPE,
    mc_samples: int = 1,
    seed: int = 0,
    chunk_size: int = 512,
    device: torch.device | str = "cpu",
    progress: bool = False,
    covariance_max_examples: int | None = None,
    correction_max_examples: int | None = None,
) -> KroneckerFactors:
    """KFAC or EK-FAC factors of the summed Fisher over ``(X, y)`` at ``theta``.

    Args:
        fm: the model, functionally (every trainable parameter in a Linear/Conv2d layer).
        theta: the flat parameters ``[P]``.
        X, y: the examples ``[N, ...]``, ``[N]`` (``y`` is used by "empirical" only).
        kind: "kfac" (one pass) or "ekfac" (a second pass for the eigenvalue correction).
        fisher_type: "empirical", "sampled" (default; see the module docstring) or "exact".
        mc_samples: sampled labels per example (for "sampled").
        seed: seeds the sampled labels (drawn up front, so the chunking does not change them;
            EK-FAC's correction draws independent ones, see :func:`label_uniforms`).
        chunk_size: examples per pass (does not change the result).
        device: where to compute; progress: show a progress bar.
        covariance_max_examples: estimate ``A`` and ``G`` on at most this many examples, a
            seeded uniform subsample (``None``, the default: all). ``G`` is rescaled by
            ``N / n`` so the factors still estimate the sum over all ``N``.
        correction_max_examples: the same for EK-FAC's eigenvalue correction (see
            :func:`eigencorrect`). Subsampling trades accuracy for time like kronfluence's
            ``covariance_max_examples`` / ``lambda_max_examples``;
            ``benchmarks/ekfac_timing.py`` measures both.

    Returns:
        The factors (on ``device``, in ``theta``'s dtype).

    Raises:
        ValueError: unsupported layers (see :func:`kronecker_layers`) or bad arguments.
    """
    _check_args(kind, fisher_type, mc_samples, int(len(X)))
    device = torch.device(device)
    theta = theta.detach().to(device)
    layers = kronecker_layers(fm)
    N = int(len(X))
    uniforms = None
    if fisher_type == "sampled":
        uniforms = label_uniforms(N, mc_samples, seed, COVARIANCE_STREAM)
    A: dict[str, torch.Tensor] = {}
    G: dict[str, torch.Tensor] = {}
    index = _subsample(N, covariance_max_examples, seed, 0, "covariance_max_examples")
    n = N if index is None else index.numel()
    args = (fm, theta, X, y, layers, fisher_type, uniforms, chunk_size, device, progress)
    for name, m, x, ds in _passes(*args, desc=kind, index=index):
        A[name] = A.get(name, 0) + _input_cov(m, x, layers[name][2] is not None)
        for d in ds:
            df = d.transpose(0, 1).reshape(d.shape[1], -1)
            G[name] = G.get(name, 0) + (df @ df.T) / d.shape[2]
    factors = []
    for name, (m, w, b) in layers.items():
        Am = A[name] / n
        Gs = G[name] * (N / n)
        eigA, QA = _eigh(Am)
        eigG, QG = _eigh(Gs)
        emb = isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        factors.append(
            LayerFactors(name, w, b, Am, Gs, QA, eigA, QG, eigG, eigG[:, None] * eigA, emb)
        )
    out = KroneckerFactors(kind, factors, fm.num_params, fisher_type, N, mc_samples, seed, n)
    if kind == "ekfac":
        eigencorrect(out, fm, theta, X, y, chunk_size, device, progress, correction_max_examples)
    return out


def _subsample(
    N: int, max_examples: int | None, seed: int, salt: int, name: str
) -> torch.Tensor | None:
    """Sorted indices of a seeded uniform subsample of ``max_examples`` of ``N`` rows, or
    ``None`` (all rows) when ``max_examples`` is ``None`` or at least ``N``."""
    if max_examples is None:
        return None
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"{name} must be a positive int or None; got {max_examples!r}")
    if max_examples >= N:
        return None
    gen = torch.Generator().manual_seed(seed * 2 + salt)
    return torch.randperm(N, generator=gen)[:max_examples].sort().values


def eigencorrect(
    factors: KroneckerFactors,
    fm: FunctionalModel,
    theta: torch.Tensor,
    X: Data,
    y: torch.Tensor,
    chunk_size: int = 512,
    device: torch.device | str = "cpu",
    progress: bool = False,
    max_examples: int | None = None,
) -> KroneckerFactors:
    """Turn KFAC factors into EK-FAC in place: ``Lambda = sum_n (Q_G^T g_n Q_A)**2``.

    Streams the data once more (same Fisher type as the factors; for "sampled", labels drawn
    independently of the factors' own, see :func:`label_uniforms`), or a
    seeded uniform subsample of ``max_examples`` of it (``Lambda`` then rescaled by
    ``N / n``: an unbiased estimate of the sum over all ``N``). Per
    chunk and layer it forms the per-example gradients in the eigenbasis, ``[B, out, in']``,
    choosing the cheaper order (rotate the inputs and output gradients first, or form
    ``g_n = sum_l d_l a_l^T`` first); for a plain linear layer the sum is a single matmul of
    squares, ``(d'**2)^T (a'**2)``.
    """
    device = torch.device(device)
    theta = theta.detach().to(device)
    layers = kronecker_layers(fm)
    by_name = {lf.name: lf for lf in factors.layers}
    if list(by_name) != list(layers):
        raise ValueError("the factors were computed for another model")
    uniforms = None
    if factors.fisher_type == "sampled":  # labels drawn afresh: see label_uniforms
        uniforms = label_uniforms(len(X), factors.mc_samples, factors.seed, CORRECTION_STREAM)
    lam = {n: torch.zeros_like(lf.eigenvalues) for n, lf in by_name.items()}
    N = int(len(X))
    index = _subsample(N, max_examples, factors.seed, 1, "correction_max_examples")
    n_used = N if index is None else index.numel()
    args = (fm, theta, X, y, layers, factors.fisher_type, uniforms, chunk_size, device, progress)
    for name, m, x, ds in _passes(*args, desc="ekfac", index=index):
        lf = by_name[name]
        has_bias = lf.bias is not None
        QA, QG = lf.QA.to(x.device), lf.QG.to(x.device)  # x may hold token ids
        dr = [QG.T @ d for d in ds]  # rotated output gradients [B, out, L]
        out, L = dr[0].shape[1], dr[0].shape[2]
        if L == 1:  # g_n = d_n a_n^T: sum_n (d'_n a'_n^T)**2 = (d'**2)^T (a'**2)
            a2 = (_canonical_a(m, x, has_bias)[:, :, 0] @ QA) ** 2  # [B, in']
            for d in dr:
                lam[name] += (d[:, :, 0] ** 2).T @ a2
            continue
        inp, k = QA.shape[0], len(dr)
        inn = inp - int(has_bias)  # the bias column is row `inn` of QA
        rotate_first = L * inp * inn + k * out * L * inp
        grads_first = k * (out * L * inn + out * inp * inn)
        if rotate_first <= grads_first:
            a = _canonical_a(m, x, False)  # [B, in, L]
            ar = QA[:inn].T @ a  # [B, in', L] = Q_A^T [a; 1]
            if has_bias:
                ar = ar + QA[inn][None, :, None]
            for d in dr:
                g = torch.bmm(d, ar.transpose(1, 2))  # [B, out, in']
                lam[name] += g.square_().sum(0)
        else:
            seq = None if isinstance(m, nn.Conv2d) else _canonical_a(m, x, False)
            for d in dr:
                if seq is None:
                    g = conv_weight_grads(cast(nn.Conv2d, m), x, d) @ QA[:inn]
                else:
                    g = torch.bmm(d, seq.transpose(1, 2)) @ QA[:inn]  # [B, out, in']
                if has_bias:
                    g = g + d.sum(2)[:, :, None] * QA[inn]
                lam[name] += g.square_().sum(0)
    for n, lf in by_name.items():
        lf.eigenvalues = lam[n] if n_used == N else lam[n] * (N / n_used)
    factors.kind = "ekfac"
    factors.correction_examples = n_used
    return factors


__all__ = [
    "DEFAULT_FISHER_TYPE",
    "EWC_FISHER_TYPE",
    "FISHER_TYPES",
    "KRONECKER_KINDS",
    "KroneckerFactors",
    "LayerFactors",
    "eigencorrect",
    "kronecker_factors",
    "kronecker_layers",
    "label_uniforms",
]
