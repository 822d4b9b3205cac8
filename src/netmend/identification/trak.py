"""TRAK (Park, Georgiev, Ilyas, Leclerc & Madry 2023): attribution by randomly projected gradients.

For each model (the final one, or each of an ensemble of ``checkpoints``) TRAK linearises the
model output ``m(x, y; theta) = logit_y - logsumexp_{j != y} logit_j`` (the margin; for
softmax cross-entropy ``log p_y = log sigmoid(m)``), projects its per-example gradients to
``k`` dimensions with a random matrix ``R`` ``[P, k]``, ``phi(x, y) = R^T grad m``, and scores

    tau(f, z) = phi_f^T (Phi^T Phi + lambda I)^{-1} phi_z (1 - p_z),

with ``Phi`` ``[N, k]`` the training features and ``1 - p_z = sigmoid(-m_z)`` TRAK's
reweighting for cross-entropy (``Q``). Over an ensemble the kernel part and the ``1 - p``
are averaged separately, as in TRAK's Algorithm 1 (no soft-thresholding).

**Sign.** ``tau(f, z) > 0`` means training on ``z`` raised the failure's margin for its
correct label (a proponent). Since ``(1 - p_z) grad m_z = g_z = grad log p(z)``, ``tau`` is
``phi_f^T K^{-1} R^T g_z``: an influence function with a Gauss-Newton-like curvature, whose
Koh & Liang sign makes ``tau > 0`` helpful. The cause score is its negative, summed over
the failures: ``r(z) = -sum_i tau(f_i, z)``, positive = harmful. Self-influence
(``target="self"``) is ``tau(z, z) = phi_z^T K^{-1} phi_z (1 - p_z) >= 0``, positive =
suspicious.

**Projection.** ``R`` has i.i.d. ``N(0, 1/k)`` entries, generated in blocks of parameter rows
from ``numpy.random.SeedSequence([seed, checkpoint, block])``: deterministic given the seed,
identical on every device and for every ``chunk_size``. It is kept in memory only when it
takes at most ``CACHE_BYTES`` (256 MiB: ``P * k`` up to 2^26 entries in float32, 2^25 in
float64); otherwise each chunk regenerates it block by block, so no
``[P, k]`` matrix (and never ``[N, P]``) is held. ``Phi`` ``[N, k]`` is held, one model at a
time.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import grad, vmap
from tqdm.auto import tqdm

from netmend.curvature.hooks import hook_deltas, hook_forward, layer_slices, unfold_input
from netmend.data.streaming import chunks
from netmend.data.task import tree_map
from netmend.data.validate import number_option
from netmend.identification.base import Context, MethodOutput, register
from netmend.identification.influence import (
    check_options,
    checkpoint_thetas,
    option_target,
    out_dtype,
)
from netmend.model.functional import Data, FunctionalModel

BLOCK_ELEMENTS = 2**20
"""Entries of ``R`` generated at once (``BLOCK_ELEMENTS // k`` parameter rows per block)."""
CACHE_BYTES = 2**28
"""``R`` is kept whole when it takes at most this many bytes (256 MiB) in the features' dtype."""
MAX_UNPROJECTED = 8192
"""``projection="none"`` holds ``[N, P]`` features and a ``[P, P]`` kernel: small models only."""
AUTO_RIDGE_RATIO = 0.1
"""``ridge="auto"``'s default ``ridge_ratio``: ``lambda = ridge_ratio * trace(Phi^T Phi) / k``
(0.01 until netmend 0.3.5: every ratio from 0.03 to 0.2 scored a higher LDS on each problem
measured, benchmarks/trak_ridge.json and dattri_protocol_dev.json, and 0.1 came within 0.06 of
each problem's best)."""
GRAM_BLOCK = 256
"""Columns per block of :func:`gram` (each off-diagonal block of ``Phi^T Phi`` computed once)."""


def seeded_gaussian(
    rows: int, cols: int, seed: list[int], dtype: torch.dtype, device: Any
) -> torch.Tensor:
    """``[rows, cols]`` i.i.d. ``N(0, 1/cols)`` entries drawn in float64 from a generator seeded
    by ``numpy.random.SeedSequence(seed)``: the same numbers on every device and dtype."""
    state = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    R = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return (R / math.sqrt(cols)).to(dtype).to(device)


class GaussianProjection:
    """The seeded random projection ``G -> G R``, ``R`` ``[P, k]`` with ``N(0, 1/k)`` entries.

    Args:
        num_params: ``P``; dim: ``k``; seed: any sequence of ints (e.g. ``[seed, checkpoint]``).
        dtype, device: of the projected gradients.
        cache: keep ``R`` whole (default: when it takes at most ``CACHE_BYTES``).
    """

    def __init__(
        self,
        num_params: int,
        dim: int,
        seed: list[int],
        dtype: torch.dtype,
        device: torch.device,
        cache: bool | None = None,
    ) -> None:
        if dim < 1:
            raise ValueError(f"proj_dim must be >= 1; got {dim}")
        self.P, self.k, self.seed = num_params, dim, list(seed)
        self.dtype, self.device = dtype, device
        self.rows = max(1, BLOCK_ELEMENTS // dim)
        if cache is None:
            itemsize = torch.empty((), dtype=dtype).element_size()
            cache = num_params * dim * itemsize <= CACHE_BYTES
        self.full = torch.cat([self.block(b) for b in range(self.num_blocks)]) if cache else None

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.P / self.rows)

    def block(self, b: int) -> torch.Tensor:
        """Rows ``[b * rows, (b + 1) * rows)`` of ``R``."""
        lo, hi = b * self.rows, min((b + 1) * self.rows, self.P)
        return seeded_gaussian(hi - lo, self.k, [*self.seed, b], self.dtype, self.device)

    def __call__(self, G: torch.Tensor) -> torch.Tensor:
        """``G R`` for ``G`` ``[B, P]``: ``[B, k]``."""
        if self.full is not None:
            return G @ self.full
        out = torch.zeros(G.shape[0], self.k, dtype=G.dtype, device=G.device)
        for b in range(self.num_blocks):
            out += G[:, b * self.rows : min((b + 1) * self.rows, self.P)] @ self.block(b)
        return out

    def matrix(self) -> torch.Tensor:
        """``R`` ``[P, k]`` (for tests and small models)."""
        return (
            self.full
            if self.full is not None
            else torch.cat([self.block(b) for b in range(self.num_blocks)])
        )


class KroneckerProjection:
    """Per-layer Kronecker-factored projections of per-example gradients (LoGra's, Choe et al.
    2024), computed from the layer hooks' inputs and output gradients without forming them.

    A linear layer's per-example weight gradient is ``d a^T`` (``[out, in]``; a convolution's
    the sum over positions of ``d_p a_p^T`` with ``a_p`` the input patch). Projected by
    ``P_out`` ``[out, k_out]`` and ``P_in`` ``[in, k_in]`` with i.i.d. ``N(0, 1/k)`` entries,
    it is ``(P_out^T d)(P_in^T a)^T`` (``[k_out, k_in]``), i.e. the gradient times the
    Kronecker product ``P_out (x) P_in``, at the cost of two small products per example
    instead of ``out * in * k``. The bias gradient ``d`` is projected by ``P_out``. The
    features of all layers are concatenated.

    Each side is projected to ``s = round(sqrt(dim))`` dimensions, or kept as it is when it
    has at most ``s`` (so a 10-class output layer keeps its 10 output gradients).

    Args:
        fm: the model (every trainable parameter in a ``Linear`` or ``Conv2d``).
        dim: the per-layer target dimension ``k_out * k_in`` (``s = round(sqrt(dim))``).
        seed: any sequence of ints; layer ``l``'s side ``j`` uses ``[*seed, l, j]``.
        dtype, device: of the features.

    Raises:
        ValueError: a trainable parameter outside a ``Linear`` or ``Conv2d`` layer.
    """

    def __init__(
        self, fm: FunctionalModel, dim: int, seed: list[int], dtype: torch.dtype, device: Any
    ) -> None:
        if dim < 1:
            raise ValueError(f"proj_dim must be >= 1; got {dim}")
        layers = layer_slices(fm)
        modules = dict(fm.caller.named_modules())
        other = (
            None
            if layers is None
            else next(
                (n for n in layers if not isinstance(modules[n], (nn.Linear, nn.Conv2d))), None
            )
        )
        if layers is None or other is not None:
            where = f"layer {other!r} ({type(modules[other]).__name__})" if other else "a layer"
            raise ValueError(
                f"projection='kronecker' covers Linear and Conv2d layers; {where} has trainable "
                "parameters: use projection='gaussian' (or freeze that layer)"
            )
        self.layers, self.modules, self.fm = layers, modules, fm
        side = max(1, round(math.sqrt(dim)))
        self.mats: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self.widths: dict[str, int] = {}  # each layer's number of features
        for li, (name, sl) in enumerate(layers.items()):
            w = modules[name].weight
            out, fan_in = w.shape[0], w[0].numel()
            mats: list[torch.Tensor | None] = []
            for j, n in enumerate((out, fan_in)):
                # a side with at most `side` entries is kept as it is
                mats.append(
                    None if n <= side else seeded_gaussian(n, side, [*seed, li, j], dtype, device)
                )
            k_out, k_in = (min(out, side), min(fan_in, side))
            self.mats[name] = (mats[0], mats[1])
            self.widths[name] = k_out * k_in + (k_out if "bias" in sl else 0)
        self.dim = sum(self.widths.values())

    def matrix(self) -> torch.Tensor:
        """The whole projection ``[P, dim]`` (block diagonal over layers; tests, small models)."""
        blocks = []
        for name, sl in self.layers.items():
            w = self.modules[name].weight
            P_out, P_in = self.mats[name]
            eye = torch.eye
            o = P_out if P_out is not None else eye(w.shape[0], dtype=torch.float64)
            i = P_in if P_in is not None else eye(w[0].numel(), dtype=torch.float64)
            o, i = o.double().cpu(), i.double().cpu()
            blocks.append((sl["weight"], torch.kron(o, i)))
            if "bias" in sl:
                blocks.append((sl["bias"], o))
        P = self.fm.num_params
        R = torch.zeros(P, self.dim, dtype=torch.float64)
        col = 0
        for rows, block in blocks:
            R[rows, col : col + block.shape[1]] = block
            col += block.shape[1]
        return R

    def features(
        self, theta: torch.Tensor, x: Any, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Margins ``[B]`` and the projected margin gradients ``[B, dim]`` of one chunk."""
        logits, inputs, outputs = hook_forward(self.fm, theta, x, self.layers)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(y, logits.shape[1]).bool()
            others = logits.detach().masked_fill(mask, -math.inf)
            m = logits.detach().gather(1, y[:, None]).squeeze(1) - torch.logsumexp(others, 1)
            cot = mask.to(logits.dtype) - torch.softmax(others, 1)  # d margin / d logits
        names = [n for n in self.layers if n in outputs]
        deltas = dict(zip(names, hook_deltas(logits, outputs, names, cot)))
        B = y.shape[0]
        parts = []
        for name, sl in self.layers.items():
            mod = self.modules[name]
            P_out, P_in = self.mats[name]
            if name not in deltas:  # never called: zero gradient
                parts.append(theta.new_zeros(B, self.widths[name]))
                continue
            a, d = inputs[name], deltas[name]
            if isinstance(mod, nn.Conv2d):
                a = unfold_input(mod, a)  # [B, in*kh*kw, L]
                d = d.reshape(B, d.shape[1], -1)  # [B, out, L]
            elif a.ndim == 2:
                a, d = a[:, :, None], d[:, :, None]  # one position
            else:  # Linear over positions: [B, ..., in] -> [B, in, S]
                a = a.reshape(B, -1, a.shape[-1]).transpose(1, 2)
                d = d.reshape(B, -1, d.shape[-1]).transpose(1, 2)
            pa = a if P_in is None else torch.einsum("bil,ik->bkl", a, P_in)
            pd = d if P_out is None else torch.einsum("bol,ok->bkl", d, P_out)
            parts.append(torch.einsum("bol,bil->boi", pd, pa).reshape(B, -1))
            if "bias" in sl:
                parts.append(pd.sum(2))
        return m, torch.cat(parts, 1).detach()


def gram(Phi: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """``Phi^T Phi`` ``[k, k]`` of ``Phi`` ``[n, k]``: the upper block triangle, mirrored
    (exactly symmetric). About half the flops of ``Phi.T @ Phi`` (a symmetric rank-``n``
    update, which torch does not expose); 2.3x faster for ``[5000, 2442]`` in float32 on
    one CPU thread."""
    k = Phi.shape[1]
    K = Phi.new_empty(k, k)
    for i0 in range(0, k, block):
        i1 = min(i0 + block, k)
        rows = Phi[:, i0:i1].T @ Phi[:, i0:]  # [i1 - i0, k - i0]
        K[i0:i1, i0:] = rows
        K[i0:, i0:i1] = rows.T
        diag = rows[:, : i1 - i0]
        K[i0:i1, i0:i1] = (diag + diag.T) / 2  # exactly symmetric
    return K


def margins_and_grads(
    ctx: Context, theta: torch.Tensor, x: Any, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Margins ``m = logit_y - logsumexp_{j != y} logit_j`` ``[B]`` and their per-example
    gradients ``[B, P]`` (``torch.func.vmap``), for one chunk."""
    fm = ctx.fm

    def margin(t: torch.Tensor, xi: Any, yi: torch.Tensor) -> torch.Tensor:
        z = fm.logits(t, tree_map(lambda a: a.unsqueeze(0), xi)).squeeze(0)
        mask = torch.arange(z.shape[0], device=z.device) == yi
        zy = torch.where(mask, z, torch.zeros_like(z)).sum()
        others = torch.where(mask, torch.full_like(z, -math.inf), z)
        return zy - torch.logsumexp(others, 0)

    G = vmap(grad(margin), in_dims=(None, 0, 0))(theta, x, y).detach()
    with torch.no_grad():
        m = vmap(margin, in_dims=(None, 0, 0))(theta, x, y)
    return m, G


def features(
    ctx: Context,
    theta: torch.Tensor,
    X: Data,
    y: torch.Tensor,
    project: GaussianProjection | KroneckerProjection | None,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRAK features ``phi = R^T grad m`` ``[n, k]`` and ``1 - p = sigmoid(-m)`` ``[n]``,
    streamed in chunks of ``ctx.chunk_size``; on ``ctx.device``."""
    phis, ws = [], []
    for s in tqdm(
        list(chunks(len(X), ctx.chunk_size)), desc=desc, disable=not ctx.progress, leave=False
    ):
        x, t = X[s].to(ctx.device), y[s].to(ctx.device)
        if isinstance(project, KroneckerProjection):
            m, phi = project.features(theta, x, t)  # from the layer hooks: no [B, P] gradient
        else:
            m, G = margins_and_grads(ctx, theta, x, t)
            phi = project(G) if project is not None else G
        phis.append(phi)
        ws.append(torch.sigmoid(-m))
    return torch.cat(phis), torch.cat(ws)


TRAK_OPTIONS = (
    "proj_dim", "projection", "ridge", "ridge_ratio", "proj_seed", "checkpoints", "target",
)  # fmt: skip
"""The options of "trak"."""


@register("trak", options=TRAK_OPTIONS)
def trak(ctx: Context) -> MethodOutput:
    """TRAK cause scores ``r(z) = -sum_i tau(f_i, z)`` ``[N]``, positive = harmful.

    Options:
        proj_dim: ``k``, the projection's dimension (default 1024; for "kronecker", each
            layer's).
        projection: "auto" (default: a Gaussian projection when ``P > proj_dim``, none
            otherwise, since projecting to ``k >= P`` dimensions gains nothing), "gaussian",
            "none" (exact gradients; ``P <= 8192``) or "kronecker" (per-layer
            Kronecker-factored Gaussian projections from the layer hooks,
            :class:`KroneckerProjection`: Linear and Conv2d layers; far cheaper per example
            than a dense ``[P, k]`` projection).
        ridge: ``lambda``, "auto" (default): ``ridge_ratio * trace(Phi^T Phi) / k``, a
            fraction of the kernel's mean eigenvalue, which keeps the solve finite when
            ``Phi^T Phi`` is singular (``k > N``, dead units); or a float >= 0 (0 is TRAK's
            own default: beware a singular kernel).
        ridge_ratio: that fraction, a float > 0 (default 0.1). The best LDS came at 0.3
            (digits logistic regression), 3 (digits MLP) and 0.2 (an ensemble of 50 MNIST
            MLPs); 0.1 was within 0.005, 0.041 and 0.003 of those, and 0.01 (the default
            until 0.3.5) below every ratio from 0.03 to 0.2 on all three (benchmarks/README.md,
            "TRAK's ridge"). Tune it on a development split, not on the figures you report.
        proj_seed: seed of the projection (default: the identification's ``seed``); checkpoint
            ``t`` uses ``[proj_seed, t]``.
        checkpoints: ensemble of models (state_dicts / modules of the same architecture;
            default: the final model alone).
        target: "failures" (default) or "self" (``tau(z, z)``, positive = suspicious).

    Per-failure scores ``[N, M]``: ``-tau(f_i, z)`` (against the failures whatever the target).
    """
    o = ctx.options
    check_options(ctx, TRAK_OPTIONS, "trak")
    target = option_target(ctx, "trak")
    thetas = checkpoint_thetas(ctx, o.get("checkpoints"))
    k = number_option(o, "proj_dim", 1024, integer=True, low=1)
    mode = o.get("projection", "auto")
    if mode not in ("auto", "gaussian", "none", "kronecker"):
        raise ValueError(
            f"projection must be 'auto', 'gaussian', 'none' or 'kronecker'; got {mode!r}"
        )
    P = ctx.fm.num_params
    if mode == "auto":
        mode = "gaussian" if k < P else "none"
    if mode == "none" and P > MAX_UNPROJECTED:
        raise ValueError(
            f"projection='none' needs P <= {MAX_UNPROJECTED} parameters (the model has {P}); "
            "use projection='gaussian' with a proj_dim"
        )
    ridge = o.get("ridge", "auto")
    if not (
        ridge == "auto"
        or (
            isinstance(ridge, (int, float))
            and not isinstance(ridge, bool)
            and math.isfinite(ridge)
            and ridge >= 0
        )
    ):
        raise ValueError(f"ridge must be 'auto' or a number >= 0; got {ridge!r}")
    ratio = o.get("ridge_ratio", AUTO_RIDGE_RATIO)
    if isinstance(ratio, bool) or not (
        isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0
    ):
        raise ValueError(f"ridge_ratio must be a finite number > 0; got {ratio!r}")
    if "ridge_ratio" in o and ridge != "auto":
        raise ValueError(
            "ridge_ratio sets ridge='auto''s fraction of the kernel's mean eigenvalue; pass one "
            "of ridge (a number) or ridge_ratio, not both"
        )
    seed = int(o.get("proj_seed", ctx.seed))
    T = len(thetas)
    kern = torch.zeros(ctx.N, len(ctx.Xq), dtype=ctx.theta.dtype)  # mean phi_z K^-1 phi_f
    kern_self = torch.zeros(ctx.N, dtype=ctx.theta.dtype)
    wbar = torch.zeros(ctx.N, dtype=ctx.theta.dtype)
    lambdas = []
    for t, theta in enumerate(thetas):
        proj: GaussianProjection | KroneckerProjection | None = None
        if mode == "gaussian":
            proj = GaussianProjection(P, k, [seed, t], theta.dtype, ctx.device)
        elif mode == "kronecker":
            proj = KroneckerProjection(ctx.fm, k, [seed, t], theta.dtype, ctx.device)
        Phi, w = features(ctx, theta, ctx.X, ctx.y, proj, f"trak {t + 1}/{T}")
        PhiF, _ = features(ctx, theta, ctx.Xq, ctx.yq, proj, "trak failures")
        K = gram(Phi)
        dim = K.shape[0]
        lam = float(ratio) * float(torch.trace(K)) / dim if ridge == "auto" else float(ridge)
        if ridge == "auto" and not lam > 0:
            lam = 1.0  # every feature is zero: any ridge gives zero scores
        lambdas.append(lam)
        K = K + lam * torch.eye(dim, dtype=K.dtype, device=K.device)
        L, info = torch.linalg.cholesky_ex(K)
        if int(info) != 0:
            raise ValueError(
                "TRAK's kernel Phi^T Phi + ridge*I is singular; use ridge='auto' or a ridge > 0"
            )
        kern += (Phi @ torch.cholesky_solve(PhiF.T, L)).cpu() / T
        if target == "self":
            kern_self += (Phi * torch.cholesky_solve(Phi.T, L).T).sum(1).cpu() / T
        wbar += w.cpu() / T
        del Phi
    per_failure = -(wbar[:, None] * kern)
    scores = wbar * kern_self if target == "self" else per_failure.sum(1)
    return MethodOutput(
        scores=scores.double().numpy(),
        per_failure=per_failure.numpy().astype(out_dtype(ctx)),
        info={
            "target": target,
            "projection": mode,
            "proj_dim": proj.dim
            if isinstance(proj, KroneckerProjection)
            else (k if mode == "gaussian" else P),
            "ridge": lambdas,
            "checkpoints": T,
        },
    )
