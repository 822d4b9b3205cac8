"""Curvature: the diagonal empirical Fisher, Fisher- and GGN-vector products, and damped solves.

Scaling convention (the trap of mean- vs sum-reduced losses): every curvature here is the
**sum** over a set of examples, matching summed log-likelihoods. The paper's penalty
``(N/2) (theta - theta_hat)^T F_mean (theta - theta_hat)`` is therefore
``1/2 (theta - theta_hat)^T F_sum (theta - theta_hat)`` with ``F_sum = N * F_mean``.

A :class:`Curvature` is the damped operator ``A = C_sum + damping * I`` with
``C_sum`` one of

* ``"diag"``: the diagonal of the empirical Fisher, ``sum_n g_n * g_n``;
* ``"fisher"``: the full empirical Fisher ``sum_n g_n g_n^T`` (products by forward + reverse
  mode, solves by conjugate gradients);
* ``"ggn"``: the generalised Gauss-Newton ``sum_n J_n^T H_n J_n`` (the true Fisher of the
  model's predictive distribution; equal to the Hessian for a linear softmax model);
* ``"kfac"``, ``"ekfac"``: Kronecker-factored approximations of a Fisher, block diagonal per
  Linear/Conv2d layer (see :mod:`netmend.curvature.kfac`, which also says which Fisher,
  ``fisher_type``, and why); products and damped solves are exact for the approximation (in
  its eigenbasis);
* ``"hessian"``: the exact Hessian of the summed negative log-likelihood
  ``-sum_n log p(y_n|x_n, theta)``, by forward-over-reverse Hessian-vector products
  (``torch.func``), solved by conjugate gradients. Away from a minimum (and often at a
  network's approximate one) it is **indefinite**: the damping must exceed its most negative
  eigenvalue for the solve to exist, and CG raises when it meets non-positive curvature.

``g_n = grad log p(y_n|x_n, theta)``, ``J_n`` the Jacobian of the logits, ``H_n`` the
Hessian of the cross-entropy in the logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.func import grad, jacrev, vjp, vmap

from netmend._warnings import warn
from netmend.curvature.hooks import (
    GROUPED_BLOCK_ELEMENTS,
    HookFallback,
    batch_blocks,
    conv_grads_grouped,
    conv_weight_grads,
    hook_pass,
    layer_slices,
    norm_input,
    token_rows,
)
from netmend.data.streaming import chunks, map_chunks
from netmend.data.task import tree_map
from netmend.data.validate import number_option
from netmend.model.functional import Data, FunctionalModel, jvp
from netmend.store import tensor_hash

if TYPE_CHECKING:
    from netmend.curvature.kfac import KroneckerFactors

CurvatureKind = Literal["diag", "fisher", "ggn", "kfac", "ekfac", "hessian"]
CURVATURE_KINDS: tuple[str, ...] = ("diag", "fisher", "ggn", "kfac", "ekfac", "hessian")

DENSE_MAX_PARAMS = 4096
"""Solves of "fisher", "ggn" and "hessian" build the dense ``[P, P]`` matrix and factorise it
when ``P`` is at most this (one pass instead of one per CG iteration and right-hand side)."""


def _sq_grads_by_hooks(
    fm: FunctionalModel,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    layers: dict[str, dict[str, slice]],
) -> torch.Tensor:
    """``sum_n g_n**2`` over one chunk, from layer inputs and output gradients.

    For a linear layer the per-example weight gradient is ``d_n a_n^T``, so the sum of its
    squares is ``(d**2)^T (a**2)``: one matmul, no per-example gradient is formed. Other layers
    form their per-example gradients a sub-batch at a time (:func:`_grad_blocks`) and square
    them in place, so no ``[B, out, in']`` tensor larger than a cache-sized block exists.
    """
    total = torch.zeros_like(theta)
    for m, sl, a, d in hook_pass(fm, theta, x, y, layers):
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            _, tok, rows = token_rows(m, a, d)
            sq = torch.zeros_like(m.weight, dtype=theta.dtype).index_add_(0, tok, rows * rows)
            total[sl["weight"]] = sq.reshape(-1)
            continue
        if isinstance(m, nn.Linear) and a.ndim == 2:
            total[sl["weight"]] = ((d * d).T @ (a * a)).reshape(-1)
            if "bias" in sl:
                total[sl["bias"]] = (d * d).sum(0)
            continue
        w = total[sl["weight"]]
        for _, gw, gb in _grad_blocks(m, a, d):
            w += gw.reshape(gw.shape[0], -1).square_().sum(0)  # gw is ours: square in place
            if "bias" in sl:
                total[sl["bias"]] += (gb * gb).sum(0)
    return total.detach()


def _grad_blocks(
    m: nn.Module, a: torch.Tensor, d: torch.Tensor
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Per-example gradients of one layer (not Embedding: see :func:`token_rows`), by sub-batch.

    Yields ``(rows, gw, gb)``: the examples ``rows`` of the chunk, their weight gradients
    ``gw`` ``[n, *weight.shape]`` (``[n, out, in']`` for Linear/Conv2d; the caller may
    overwrite it, and must be done with it before asking for the next block, whose buffer it
    may be) and bias gradients ``gb`` ``[n, out]`` (may be a view of ``d``: read only).
    Linear and Conv2d layers come in blocks of at most about
    :data:`netmend.curvature.hooks.BLOCK_ELEMENTS` numbers
    (:data:`netmend.curvature.hooks.GROUPED_BLOCK_ELEMENTS` for a convolution whose gradients
    come the "grouped" way; cache-sized: the caller reduces each block before the next is
    formed); norm layers' gradients are ``[B, C]`` and come in
    one block.
    """
    B = a.shape[0]
    if isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
        if isinstance(m, nn.LayerNorm):  # positions: the dims between batch and features
            lead = tuple(range(1, a.ndim - len(m.normalized_shape)))
            gw = norm_input(m, a) * d
            yield slice(0, B), (gw.sum(lead) if lead else gw), (d.sum(lead) if lead else d)
            return
        # BatchNorm (eval): x_hat = (a - mean) * r per channel (dim 1), positions after it
        assert m.running_mean is not None and m.running_var is not None  # hookable() checked
        shape = (1, -1) + (1,) * (a.ndim - 2)
        r = torch.rsqrt(m.running_var + m.eps).to(d.dtype)
        gw = (a - m.running_mean.view(shape)) * d
        if a.ndim > 2:
            lead = tuple(range(2, a.ndim))
            yield slice(0, B), gw.sum(lead).mul_(r), d.sum(lead)
        else:
            yield slice(0, B), gw.mul_(r), d
        return
    if isinstance(m, nn.Conv2d):  # a [B, in, H, W], d [B, out, L]
        grouped = conv_grads_grouped(m, a, d.shape[2])
        blocks = batch_blocks(B, m.weight.numel(), GROUPED_BLOCK_ELEMENTS if grouped else None)
        # the "unfold" way writes into one reused buffer; the grouped kernel allocates its own
        buf = None if grouped else d.new_empty(blocks[0].stop, d.shape[1], m.weight[0].numel())
        for rows in blocks:
            dr = d[rows]
            out = None if buf is None else buf[: dr.shape[0]]
            gw = conv_weight_grads(m, a[rows], dr, "grouped" if grouped else "unfold", out)
            yield rows, gw, dr.sum(2)
        return
    per = d.shape[-1] * a.shape[-1]
    for rows in batch_blocks(B, per):
        if a.ndim == 2:
            yield rows, torch.einsum("bo,bi->boi", d[rows], a[rows]), d[rows]
        else:  # Linear on [B, S, *]
            dr = d[rows]
            yield rows, torch.bmm(dr.transpose(1, 2), a[rows]), dr.sum(1)


def _hook_passes(
    fm: FunctionalModel, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> list[tuple[nn.Module, dict[str, slice], torch.Tensor, torch.Tensor]] | None:
    """:func:`netmend.curvature.hooks.hook_pass` when the hook path serves ``fm``, else None."""
    layers = layer_slices(fm)
    if layers is None:
        return None
    try:
        return hook_pass(fm, theta, x, y, layers)
    except HookFallback:
        return None


def per_example_grads(
    fm: FunctionalModel, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Per-example gradients of ``log p(y_n|x_n, theta)`` for one chunk, ``[B, P]``.

    Uses layer hooks (one batched backward plus a per-layer product) when every trainable
    parameter sits in a layer of :data:`netmend.curvature.hooks.HOOK_LAYERS` (Linear, Conv2d,
    BatchNorm in eval mode, LayerNorm, Embedding, EmbeddingBag), and ``torch.func.vmap``
    otherwise. To multiply them by vectors, :func:`per_example_grad_products` is faster: it
    never holds the ``[B, P]`` matrix.
    """
    passes = _hook_passes(fm, theta, x, y)
    if passes is None:
        return fm.per_example_grads(theta, x, y).detach()
    G = torch.zeros(y.shape[0], theta.numel(), dtype=theta.dtype, device=theta.device)
    for m, sl, a, d in passes:
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            ex, tok, rows = token_rows(m, a, d)
            V, D = m.weight.shape
            cols = sl["weight"].start + tok[:, None] * D + torch.arange(D, device=tok.device)
            G[ex[:, None], cols] = rows
            continue
        for r, gw, gb in _grad_blocks(m, a, d):
            G[r, sl["weight"]] = gw.reshape(gw.shape[0], -1)
            if "bias" in sl:
                G[r, sl["bias"]] = gb
    return G


def per_example_grad_products(
    fm: FunctionalModel,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    V: torch.Tensor,
) -> torch.Tensor:
    """``G V`` for the per-example gradients ``G`` ``[B, P]`` of one chunk, without forming G.

    ``G[n] = grad log p(y_n|x_n, theta)`` as in :func:`per_example_grads`; on the hook path
    each layer's per-example gradients are formed a cache-sized sub-batch at a time and
    multiplied by that layer's rows of ``V`` at once, so the ``[B, P]`` matrix (and its
    memory traffic) never exists. Equal to ``per_example_grads(...) @ V`` up to rounding.

    Args:
        fm, theta: the model and its parameters ``[P]``.
        x, y: one chunk of inputs and labels ``[B]``.
        V: ``[P]`` or ``[P, M]``.

    Returns:
        ``[B]`` (for ``V`` ``[P]``) or ``[B, M]``.
    """
    if V.shape[0] != theta.numel() or V.ndim not in (1, 2):
        raise ValueError(f"V must be [P] or [P, M] with P = {theta.numel()}; got {tuple(V.shape)}")
    passes = _hook_passes(fm, theta, x, y)
    if passes is None:
        return fm.per_example_grads(theta, x, y).detach() @ V
    Vm = V.reshape(V.shape[0], -1).to(theta.dtype)
    out = torch.zeros(y.shape[0], Vm.shape[1], dtype=theta.dtype, device=theta.device)
    for m, sl, a, d in passes:
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            ex, tok, rows = token_rows(m, a, d)
            D = m.weight.shape[1]
            Vw = Vm[sl["weight"]].reshape(-1, D, Vm.shape[1])  # [vocab, D, M]
            out.index_add_(0, ex, torch.einsum("ud,udm->um", rows, Vw[tok]))
            continue
        Vw = Vm[sl["weight"]]
        if isinstance(m, nn.Linear):  # a, d: [B, in/out] or [B, S, in/out] (hook_pass)
            out += _linear_products(m, a, d, Vw)
            if "bias" in sl:
                out += (d if d.ndim == 2 else d.sum(1)) @ Vm[sl["bias"]]
            continue
        for r, gw, gb in _grad_blocks(m, a, d):
            out[r] += gw.reshape(gw.shape[0], -1) @ Vw
            if "bias" in sl:
                out[r] += gb @ Vm[sl["bias"]]
    return out if V.ndim == 2 else out.squeeze(1)


def _linear_products(
    m: nn.Linear, a: torch.Tensor, d: torch.Tensor, Vw: torch.Tensor
) -> torch.Tensor:
    """A Linear layer's per-example weight gradients times ``Vw``, ``[B, M]``, never formed.

    Example b's gradient is ``sum_s d[b, s] a[b, s]^T`` (``[out, in]``; ``s`` the positions of
    a ``[B, S, in]`` input, one for ``[B, in]``), so its product with column ``j`` of ``Vw``
    (``[out * in, M]``, read as ``V_j [out, in]``) is ``sum_s d[b, s]^T V_j a[b, s]``: one
    batched matrix product of the inputs with ``Vw`` as ``[out, in, M]``, then a contraction
    with ``d``. Forming the ``[rows, out, in]`` gradients instead reads all of ``Vw`` once per
    cache-sized block of a few examples, which made the per-failure culprit matrix of a wide
    layer about 15x slower. The ``[out, rows * S, M]`` intermediate is blocked to
    :data:`netmend.curvature.hooks.BLOCK_ELEMENTS` numbers.

    Args:
        m: the layer; ``a`` its inputs ``[B, in]`` or ``[B, S, in]``; ``d`` the gradients of
            ``log p(y|x)`` with respect to its outputs, ``[B, out]`` or ``[B, S, out]``.
        Vw: ``[out * in, M]``, the weight's rows of ``V`` (row-major ``[out, in]``).

    Returns:
        ``[B, M]``.
    """
    o, i = m.weight.shape
    M = Vw.shape[1]
    V3 = Vw.reshape(o, i, M)
    B = a.shape[0]
    S = 1 if a.ndim == 2 else a.shape[1]
    res = torch.empty(B, M, dtype=Vw.dtype, device=Vw.device)
    for rows in batch_blocks(B, o * S * M):
        U = torch.matmul(a[rows].reshape(-1, i).to(Vw.dtype), V3)  # [out, rows * S, M]
        t = torch.einsum("obm,bo->bm", U, d[rows].reshape(-1, o).to(Vw.dtype))
        res[rows] = t.reshape(-1, S, M).sum(1)
    return res


def fisher_diag_sum(
    fm: FunctionalModel,
    theta: torch.Tensor,
    X: Data,
    y: torch.Tensor,
    chunk_size: int = 128,
    device: torch.device | str = "cpu",
    progress: bool = False,
    method: Literal["auto", "hooks", "vmap"] = "auto",
) -> torch.Tensor:
    """Diagonal of the empirical Fisher summed over the set: ``sum_n g_n**2``, shape ``[P]``.

    ``g_n = grad log p(y_n|x_n, theta)``. Two exact implementations:

    * ``"hooks"`` (used by ``"auto"`` when every trainable parameter is in a layer of
      :data:`netmend.curvature.hooks.HOOK_LAYERS`: Linear, Conv2d, BatchNorm in eval mode,
      LayerNorm, Embedding, EmbeddingBag): one ordinary forward/backward per chunk plus a
      product per layer, so it costs about one training epoch;
    * ``"vmap"``: per-example gradients with ``torch.func.vmap``, any architecture.

    Neither holds ``[N, P]`` in memory, and the result does not depend on ``chunk_size``
    (per-example squares, not squared batch means).
    """
    device = torch.device(device)
    theta = theta.to(device)
    layers = layer_slices(fm) if method in ("auto", "hooks") else None
    if method == "hooks" and layers is None:
        raise ValueError(
            "method='hooks' needs every trainable parameter in a Linear, Conv2d, BatchNorm "
            "(eval mode), LayerNorm, Embedding or EmbeddingBag layer; use method='vmap'"
        )
    if layers is None:
        chunk_size = min(chunk_size, 32)  # vmap is fastest on small chunks (cache-bound)
    state = {"layers": layers}

    def chunk_sum(s: slice) -> torch.Tensor:  # sum_n g_n**2 over one chunk, [P]
        x, t = X[s].to(device), y[s].to(device)
        if state["layers"] is not None:
            try:
                return _sq_grads_by_hooks(fm, theta, x, t, state["layers"])
            except HookFallback:
                if method == "hooks":
                    raise ValueError("method='hooks' cannot serve a layer called twice") from None
                state["layers"] = None
        g = fm.per_example_grads(theta, x, t)
        return (g * g).sum(0)

    # resumable inside identify(..., cache_dir=...): see netmend.data.streaming.map_chunks
    total = map_chunks(
        len(X),
        chunk_size,
        chunk_sum,
        desc="fisher",
        reduce="sum",
        init=torch.zeros_like(theta),
        progress=progress,
        fingerprint=lambda: f"{method}:{tensor_hash(theta)}",
    )
    return total.detach()


def cg(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    tol: float = 1e-6,
    maxiter: int = 100,
    x0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Conjugate gradients for ``A x = b`` with symmetric positive definite ``A``.

    Args:
        matvec: ``v -> A v``.
        b: right-hand side ``[P]``.
        tol: stop when ``||r|| <= tol * ||b||``.
        maxiter: most iterations.
        x0: starting point (zeros by default).

    Returns:
        The solution ``[P]`` and the number of iterations used.
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = torch.dot(r, r)
    bnorm = torch.linalg.vector_norm(b)
    if float(bnorm) == 0.0:
        return x, 0
    for it in range(1, maxiter + 1):
        Ap = matvec(p)
        pAp = torch.dot(p, Ap)
        if float(pAp) <= 0:
            raise ValueError(
                "conjugate gradients met a direction of non-positive curvature; increase damping"
            )
        alpha = rs / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = torch.dot(r, r)
        if float(torch.sqrt(rs_new)) <= tol * float(bnorm):
            return x, it
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x, maxiter


def dense_curvature(
    fm: FunctionalModel,
    theta: torch.Tensor,
    X: Data,
    y: torch.Tensor,
    kind: str,
    chunk_size: int = 128,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The undamped curvature ``C_sum`` as a dense ``[P, P]`` matrix (for small models).

    ``kind`` is "fisher" (``sum_n g_n g_n^T``), "ggn" (``sum_n J_n^T (diag(p_n) - p_n p_n^T)
    J_n``) or "hessian" (of the summed negative log-likelihood). Built chunk by chunk
    (``[chunk, C, P]`` Jacobians at most), so it costs one pass instead of one pass per
    conjugate-gradient iteration; worth it while ``P^2`` floats fit comfortably in memory.
    """
    if kind not in ("fisher", "ggn", "hessian"):
        raise ValueError(f"a dense curvature is 'fisher', 'ggn' or 'hessian'; got {kind!r}")
    theta = theta.detach().to(device)
    P = theta.numel()
    out = torch.zeros(P, P, dtype=theta.dtype, device=device)

    def logits_one(t: torch.Tensor, xi: Any) -> torch.Tensor:
        return fm.logits(t, tree_map(lambda a: a.unsqueeze(0), xi)).squeeze(0)

    for s in chunks(len(X), chunk_size):
        x, t = X[s].to(device), y[s].to(device)
        if kind == "fisher":
            G = per_example_grads(fm, theta, x, t)  # [b, P]
            out += G.T @ G
        elif kind == "ggn":
            J = vmap(jacrev(logits_one), in_dims=(None, 0))(theta, x)  # [b, C, P]
            p = torch.softmax(fm.logits(theta, x).detach(), dim=1)  # [b, C]
            Jp = torch.einsum("bc,bcp->bp", p, J)
            Jf = J.flatten(0, 1)  # [b*C, P]
            out += (Jf * p.reshape(-1, 1)).T @ Jf - Jp.T @ Jp
        else:

            def nll(th: torch.Tensor, x: torch.Tensor = x, t: torch.Tensor = t) -> torch.Tensor:
                return -fm.ll(th, x, t).sum()

            out += jacrev(jacrev(nll))(theta).detach()  # reverse-over-reverse: fastest here
    return out


SOLVER_OPTIONS = (
    "solver",
    "cg_tol",
    "cg_maxiter",
    "fisher_type",
    "mc_samples",
    "covariance_max_examples",
    "correction_max_examples",
)
"""The user options, shared by every method that solves with a :class:`Curvature`, that
:func:`solver_options` turns into its keyword arguments."""


def solver_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`Curvature` keyword arguments from a method's options (:data:`SOLVER_OPTIONS`).

    Missing options take :class:`Curvature`'s defaults: ``solver`` "auto", ``cg_tol`` 1e-6,
    ``cg_maxiter`` 100, ``fisher_type`` ``None``, ``mc_samples`` 1 and no subsampling
    (``covariance_max_examples`` / ``correction_max_examples`` ``None``).
    """
    return {
        "solver": str(options.get("solver", "auto")),
        "cg_tol": number_option(options, "cg_tol", 1e-6, strict=True),
        "cg_maxiter": number_option(options, "cg_maxiter", 100, integer=True, low=1),
        "fisher_type": options.get("fisher_type"),
        "mc_samples": number_option(options, "mc_samples", 1, integer=True, low=1),
        "covariance_max_examples": options.get("covariance_max_examples"),
        "correction_max_examples": options.get("correction_max_examples"),
    }


@dataclass
class Curvature:
    """The damped curvature ``A = C_sum + damping * I`` at ``theta`` over the set ``(X, y)``.

    Attributes:
        kind: "diag", "fisher", "ggn", "kfac", "ekfac" or "hessian" (see the module docstring).
        fm: the functional model; theta: where the curvature is taken ``[P]``.
        X, y: the examples the curvature sums over.
        damping: added to the diagonal; must be > 0 (the empirical Fisher of a network is
            near-singular, and an undamped solve would blow up along its null space).
        diag: for kind "diag", the summed diagonal ``[P]`` (computed when not given).
        chunk_size, device: streaming settings.
        cg_tol, cg_maxiter: conjugate-gradient settings for "fisher", "ggn" and "hessian".
        solver: how "fisher", "ggn" and "hessian" are solved: "auto" (default: "dense" when
            ``P <= DENSE_MAX_PARAMS``, else "cg"), "dense" (the ``[P, P]`` matrix from
            :func:`dense_curvature`, one pass, Cholesky; raises if not positive definite) or
            "cg" (conjugate gradients, one pass per iteration).
        fisher_type: for "kfac"/"ekfac": "empirical", "sampled" or "exact" (``None``: the
            default of :mod:`netmend.curvature.kfac`, "sampled").
        mc_samples, seed: sampled labels per example and their seed (``fisher_type="sampled"``).
        factors: for "kfac"/"ekfac", precomputed
            :class:`netmend.curvature.kfac.KroneckerFactors` (e.g. loaded from a cache; computed
            when not given).
        covariance_max_examples, correction_max_examples: for "kfac"/"ekfac", estimate the
            Kronecker factors / EK-FAC's eigenvalue correction on a seeded subsample of at most
            this many examples (``None``: all; see
            :func:`netmend.curvature.kfac.kronecker_factors`).
    """

    kind: str
    fm: FunctionalModel
    theta: torch.Tensor
    X: Data
    y: torch.Tensor
    damping: float
    diag: torch.Tensor | None = None
    chunk_size: int = 128
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cg_tol: float = 1e-6
    cg_maxiter: int = 100
    progress: bool = False
    fisher_type: str | None = None
    mc_samples: int = 1
    seed: int = 0
    factors: KroneckerFactors | None = None
    solver: str = "auto"
    covariance_max_examples: int | None = None
    correction_max_examples: int | None = None
    _chol: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.solver not in ("auto", "dense", "cg"):
            raise ValueError(f"solver must be 'auto', 'dense' or 'cg'; got {self.solver!r}")
        if self.kind not in CURVATURE_KINDS:
            raise ValueError(f"unknown curvature {self.kind!r}; choose one of {CURVATURE_KINDS}")
        if not self.damping > 0:
            raise ValueError(
                f"damping must be > 0 (got {self.damping}); the Fisher is near-singular"
            )
        self.theta = self.theta.to(self.device)
        if self.kind == "diag" and self.diag is None:
            self.diag = fisher_diag_sum(
                self.fm, self.theta, self.X, self.y, self.chunk_size, self.device, self.progress
            )
        if self.kind in ("kfac", "ekfac"):
            from netmend.curvature.kfac import DEFAULT_FISHER_TYPE, kronecker_factors

            if self.factors is None:
                self.factors = kronecker_factors(
                    self.fm,
                    self.theta,
                    self.X,
                    self.y,
                    self.kind,
                    self.fisher_type or DEFAULT_FISHER_TYPE,
                    self.mc_samples,
                    self.seed,
                    self.chunk_size,
                    self.device,
                    self.progress,
                    self.covariance_max_examples,
                    self.correction_max_examples,
                )
            elif self.factors.kind != self.kind or self.factors.num_params != self.fm.num_params:
                raise ValueError(
                    f"the given factors are {self.factors.kind!r} for {self.factors.num_params} "
                    f"parameters, not {self.kind!r} for {self.fm.num_params}: recompute them"
                )
            self.factors = self.factors.to(self.device)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for ``v`` of shape ``[P]``."""
        v = v.to(self.device)
        if self.kind == "diag":
            assert self.diag is not None  # set in __post_init__ (internal invariant)
            return (self.diag.to(self.device) + self.damping) * v
        if self.factors is not None:
            return self.factors.matvec(v) + self.damping * v
        out = self.damping * v
        for s in chunks(len(self.X), self.chunk_size):
            x, t = self.X[s].to(self.device), self.y[s].to(self.device)
            if self.kind == "fisher":
                _, gv = self.fm.ll_jvp(self.theta, v, x, t)  # [b] = g_n . v
                out = out + self.fm.ll_vjp(self.theta, gv, x, t)  # sum_n g_n (g_n . v)
            elif self.kind == "hessian":
                out = out + self._hessian_chunk(v, x, t)
            else:
                out = out + self._ggn_chunk(v, x)
        return out

    def _ggn_chunk(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        def f(t: torch.Tensor) -> torch.Tensor:
            return self.fm.logits(t, x)

        res = jvp(f, (self.theta,), (v,))
        z, jv = res[0], res[1]
        p = torch.softmax(z.detach(), dim=1)
        hjv = p * jv - p * (p * jv).sum(1, keepdim=True)  # (diag(p) - p p^T) J v
        pull = vjp(f, self.theta)[1]
        return pull(hjv.detach())[0].detach()

    def _hessian_chunk(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``H v`` of ``-sum log p(t|x)`` over one chunk (forward-over-reverse)."""

        def nll(th: torch.Tensor) -> torch.Tensor:
            return -self.fm.ll(th, x, t).sum()

        return jvp(grad(nll), (self.theta,), (v,))[1].detach()

    def quadratic(self, v: torch.Tensor) -> torch.Tensor:
        """``v^T C_sum v``, the undamped curvature's quadratic form (a scalar) for ``v`` ``[P]``.

        Differentiable in ``v`` for "diag", "kfac" and "ekfac" (the EWC penalty's kinds).
        """
        v = v.to(self.device)
        if self.kind == "diag":
            assert self.diag is not None
            return (self.diag.to(self.device) * v * v).sum()
        if self.factors is not None:
            return self.factors.quadratic(v)
        return torch.dot(v, self.matvec(v.detach()) - self.damping * v.detach())

    def cg_solve(
        self, b: torch.Tensor, tol: float, maxiter: int, damping_name: str = "the damping (l2)"
    ) -> tuple[torch.Tensor, int]:
        """:func:`cg` on this damped curvature ``[P]``, for every CG solve in netmend: a
        direction of non-positive curvature is said as the dense solve says it, with the
        damping and what to change, and a solve stopped at ``maxiter`` short of ``tol`` warns.

        Args:
            b: the right-hand side ``[P]``. tol, maxiter: as :func:`cg`.
            damping_name: how the warning names the damping the caller's user sets.

        Returns:
            The solution ``[P]`` and the number of iterations used.
        """
        try:
            x, its = cg(self.matvec, b, tol=tol, maxiter=maxiter)
        except ValueError as exc:
            if "non-positive curvature" not in str(exc):
                raise
            fix = "" if self.kind == "ggn" else ", or use 'ggn' (always PSD)"
            raise ValueError(
                f"the damped {self.kind} curvature is not positive definite (conjugate gradients "
                f"met a direction of non-positive curvature at damping {self.damping:g}): "
                f"increase damping{fix}. The Hessian of a non-convex model (an MLP) is usually "
                "indefinite"
            ) from None
        # cg returns maxiter also when it converged on that step: the true residual tells,
        # with slack (it drifts from CG's recursive one by rounding: 11x at cg_tol=1e-13)
        unmet = its >= maxiter and float(torch.linalg.vector_norm(b - self.matvec(x))) > max(
            100 * tol, 1e-10
        ) * float(torch.linalg.vector_norm(b))
        if unmet:  # silently 20-25% off a dense solve on an outside MLP
            warn(
                f"conjugate gradients stopped at cg_maxiter={maxiter} before reaching "
                f"cg_tol={tol:g}: the {self.kind} solve is inexact; raise cg_maxiter, "
                f"{damping_name}, or use solver='dense' on a small model"
            )
        return x, its

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """``A^{-1} b`` for ``b`` of shape ``[P]`` or ``[P, m]``.

        Exact for "diag", "kfac" and "ekfac"; conjugate gradients (column by column) otherwise.
        """
        b = b.to(self.device)
        if self.factors is not None:
            return self.factors.solve(b, self.damping)
        if self.kind == "diag":
            assert self.diag is not None
            d = self.diag.to(self.device) + self.damping
            return b / (d if b.ndim == 1 else d[:, None])
        dense = self.solver == "dense" or (
            self.solver == "auto" and self.fm.num_params <= DENSE_MAX_PARAMS
        )
        if dense:
            if self._chol is None:
                C = dense_curvature(
                    self.fm, self.theta, self.X, self.y, self.kind, self.chunk_size, self.device
                )
                C.diagonal().add_(self.damping)
                chol, bad = torch.linalg.cholesky_ex(C)
                if int(bad) != 0:
                    raise ValueError(
                        f"the damped {self.kind} curvature is not positive definite (damping "
                        f"{self.damping:g}); increase damping, or use 'ggn' (always PSD)"
                    )
                self._chol = chol
            return torch.cholesky_solve(b[:, None] if b.ndim == 1 else b, self._chol).reshape(
                b.shape
            )
        if b.ndim != 1:
            return torch.stack([self.solve(b[:, j]) for j in range(b.shape[1])], 1)
        return self.cg_solve(b, self.cg_tol, self.cg_maxiter)[0]
