"""Influence functions (Koh & Liang 2017) and EK-FAC influence (Grosse et al. 2023).

**Sign.** Let ``L = -log p`` be the loss and ``g = grad log p = -grad L``. Up-weighting a
training example ``z`` by ``eps`` in the *summed* training objective moves the optimum by
``d theta / d eps = -H^{-1} grad L_z`` (``H`` the Hessian of the summed objective), so the
loss of the failures changes by ``dL_F / d eps = -grad L_F^T H^{-1} grad L_z`` (Koh & Liang's
``I_up,loss(z, F)``). Removing ``z`` is ``eps = -1``: ``Delta L_F ~= grad L_F^T H^{-1} grad L_z``.
``z`` is harmful when removing it *lowers* the failures' loss, so the cause score is

    r(z) = -Delta L_F = I_up,loss(z, F) = -g_F^T A^{-1} g_z,      positive = harmful,

with ``A = C_sum + damping * I`` the damped curvature of the summed training loss: the same
expression as ``linear``'s ``-g_z^T A^{-1} g_F`` (``theta_+F`` moves along ``A^{-1} g_F``).

**Self-influence** (``target="self"``) is ``g_z^T A^{-1} g_z >= 0``: minus ``I_up,loss(z, z)``,
how much the example's own loss depends on the example being in the training set. It is
positive = suspicious: memorised, atypical or mislabelled examples score highest.

This module also holds the streaming helpers shared by the influence family (``tracin``,
``grad_dot``/``grad_cos`` and ``trak``): per-example gradients chunk by chunk (never more
than ``chunk_size`` examples through the model at once, never ``[N, P]`` in memory), option
parsing, and checkpoint loading.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from netmend._warnings import warn
from netmend.curvature import DENSE_MAX_PARAMS, Curvature, per_example_grads
from netmend.data.streaming import chunks
from netmend.data.validate import check_number
from netmend.identification.base import Context, MethodOutput, NegDot, grad_rows, register
from netmend.model.functional import Data, stream
from netmend.store import tensor_hash

AUTO_DAMPING_RATIO = 0.1
"""``damping="auto"`` is ``AUTO_DAMPING_RATIO * mean(diag F_sum)`` (kronfluence's heuristic)."""

DIRECT_KINDS = ("diag", "kfac", "ekfac")
"""Curvatures solved directly (``Curvature.solve``); the others are solved iteratively."""


SOLVERS = ("auto", "dense", "cg", "lissa")

LISSA_TOL_FACTOR = math.log(1e6)
"""``lissa_depth="auto"`` makes the contraction ``(1 - damping/scale)^depth <= 1e-6``."""

TARGETS = ("failures", "self")


# ----------------------------------------------------------------------------- shared helpers


def check_options(ctx: Context, allowed: Iterable[str], method: str) -> None:
    """Raise on an option the method does not know (a typo would otherwise be ignored)."""
    unknown = sorted(set(ctx.options) - set(allowed))
    if unknown:
        raise ValueError(
            f"method {method!r} got unknown option(s) {unknown}; it accepts {sorted(allowed)}"
        )


def option_target(ctx: Context, method: str, self_ok: bool = True) -> str:
    """The ``target`` option: "failures" (default) or "self" (self-influence)."""
    target = ctx.options.get("target", "failures")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}; got {target!r}")
    if target == "self" and not self_ok:
        raise ValueError(f"method {method!r} has no self-influence (target='self')")
    return str(target)


def out_dtype(ctx: Context) -> type:
    """numpy dtype of per-failure matrices: float64 for float64 models, float32 otherwise."""
    return np.float64 if ctx.theta.dtype == torch.float64 else np.float32


def failure_grads(ctx: Context, theta: torch.Tensor) -> torch.Tensor:
    """Per-failure gradients ``grad log p(f_i|theta)`` ``[M, P]``, computed in chunks."""
    parts = [
        per_example_grads(ctx.fm, theta, ctx.Xq[s].to(ctx.device), ctx.yq[s].to(ctx.device))
        for s in chunks(len(ctx.Xq), ctx.chunk_size)
    ]
    return torch.cat(parts)


def checkpoint_thetas(ctx: Context, checkpoints: Any) -> list[torch.Tensor]:
    """Flat parameter vectors ``[P]`` of checkpoints (state_dicts or modules); default ``[theta]``.

    Each checkpoint must hold every trainable parameter of the model, under the same name and
    shape. Buffers are taken from the final model (checkpoints only change the parameters).
    """
    if checkpoints is None:
        return [ctx.theta]
    if isinstance(checkpoints, (nn.Module, Mapping, torch.Tensor)):
        raise ValueError(
            "checkpoints must be a list of state_dicts or nn.Modules (wrap a single one in a list)"
        )
    out = []
    for i, c in enumerate(checkpoints):
        if isinstance(c, nn.Module):
            sd: Mapping[str, Any] = c.state_dict()
        elif isinstance(c, Mapping):
            sd = c
        else:
            raise ValueError(
                f"checkpoint {i} is a {type(c).__name__}; pass state_dicts or nn.Modules"
            )
        parts = []
        for name, shape in zip(ctx.fm.names, ctx.fm.shapes):
            if name not in sd:
                raise ValueError(
                    f"checkpoint {i} has no parameter {name!r}: checkpoints must be state_dicts "
                    "of the same architecture as the model"
                )
            t = torch.as_tensor(sd[name]).detach()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(
                    f"checkpoint {i}: parameter {name!r} has shape {tuple(t.shape)}, the model's "
                    f"has {tuple(shape)}"
                )
            parts.append(t.reshape(-1).to(ctx.theta.dtype))
        theta = torch.cat(parts).to(ctx.device)
        if not torch.isfinite(theta).all():
            raise ValueError(f"checkpoint {i} contains NaN or inf parameters")
        out.append(theta)
    if not out:
        raise ValueError("checkpoints is empty: pass at least one, or leave it out (final model)")
    return out


def checkpoint_lrs(lrs: Any, n: int) -> list[float]:
    """Per-checkpoint learning rates: ``None`` gives 1.0 each; a number is used for all."""
    if lrs is None:
        vals = [1.0] * n
    elif isinstance(lrs, (int, float)) and not isinstance(lrs, bool):
        vals = [float(lrs)] * n
    else:
        vals = [float(v) for v in lrs]
        if len(vals) != n:
            raise ValueError(f"lrs has {len(vals)} entries for {n} checkpoints: give one each")
    if not all(math.isfinite(v) and v > 0 for v in vals):
        raise ValueError(f"learning rates must be finite and > 0; got {vals}")
    return vals


def resolve_damping(ctx: Context, damping: Any) -> float:
    """``damping``: a positive float, or "auto" = ``AUTO_DAMPING_RATIO * mean(diag F_sum)``.

    The mean diagonal of the summed empirical Fisher is its mean eigenvalue, so "auto" damps
    by a tenth of the average curvature, as kronfluence's heuristic does (0.1 x the mean
    eigenvalue). It is ``1e-5`` of ``l2="auto"``: the EWC ``l2`` is tuned to keep an ascent
    local and would wash out the curvature of an influence function. When the Fisher is zero
    (every gradient vanishes; all scores are then zero) it falls back to 1.
    """
    if isinstance(damping, str):
        if damping != "auto":
            raise ValueError(f"damping must be a positive number or 'auto'; got {damping!r}")
        mean = float(ctx.fisher_diag().mean())
        return AUTO_DAMPING_RATIO * mean if mean > 0 else 1.0
    if isinstance(damping, bool) or not (
        isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0
    ):
        raise ValueError(
            f"damping must be > 0 (it regularises a singular curvature); got {damping}"
        )
    return float(damping)


# ----------------------------------------------------------------------------- solvers


def build_curvature(
    ctx: Context,
    kind: str,
    damping: float,
    X: Data | None = None,
    y: torch.Tensor | None = None,
    solver: str = "auto",
) -> Curvature:
    """The damped curvature ``C_sum + damping * I`` of kind ``kind`` over ``(X, y)`` (default
    the training set); ``solver`` is :class:`Curvature`'s ("auto", "dense" or "cg")."""
    X = ctx.X if X is None else X
    y = ctx.y if y is None else y
    extra: dict[str, Any] = {}
    if kind == "diag" and X is ctx.X:
        extra["diag"] = ctx.fisher_diag()
    if kind in ("kfac", "ekfac"):
        extra.update(seed=ctx.seed, mc_samples=int(ctx.options.get("mc_samples", 1)))
        extra["fisher_type"] = ctx.options.get("fisher_type")
        for key in ("covariance_max_examples", "correction_max_examples"):
            extra[key] = ctx.options.get(key)
    return Curvature(
        kind,
        ctx.fm,
        ctx.theta,
        X,
        y,
        damping,
        chunk_size=ctx.chunk_size,
        device=ctx.device,
        solver=solver,
        **extra,
    )


class InverseCurvature:
    """``b -> A^{-1} b`` by conjugate gradients, LiSSA or a direct solve, with diagnostics.

    Args:
        ctx: identification context (the curvature sums over its training set).
        kind: "ggn", "hessian", "fisher", "ekfac", "kfac" or "diag".
        damping: added to the curvature's diagonal (> 0).
        solver: "auto" (default: "dense" when ``P <= DENSE_MAX_PARAMS``, else "cg"), "dense"
            (the ``[P, P]`` matrix, one pass, Cholesky), "cg" or "lissa"; direct kinds
            (``DIRECT_KINDS``) ignore "auto"/"dense"/"cg" and reject "lissa".
        cg_tol, cg_maxiter: CG stops when ``||r|| <= cg_tol ||b||`` or after ``cg_maxiter``.
        lissa: LiSSA settings (see :func:`lissa`): ``depth``, ``scale``, ``repeats``,
            ``batch``, ``seed``.
    """

    def __init__(
        self,
        ctx: Context,
        kind: str,
        damping: float,
        solver: str = "auto",
        cg_tol: float = 1e-8,
        cg_maxiter: int = 300,
        lissa: dict[str, Any] | None = None,
    ) -> None:
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}")
        if solver != "auto" and kind in DIRECT_KINDS:  # was accepted, and info said "dense"
            raise ValueError(
                f"curvature {kind!r} is inverted directly (its factors' eigenbasis or diagonal): "
                f"solver={solver!r} does not apply; leave solver out, or pick curvature 'ggn', "
                "'hessian' or 'fisher' for it"
            )
        if solver == "auto":
            small = ctx.fm.num_params <= DENSE_MAX_PARAMS
            solver = "direct" if kind in DIRECT_KINDS else ("dense" if small else "cg")
        self.ctx, self.kind, self.damping, self.solver = ctx, kind, damping, solver
        # dense and Kronecker kinds are solved by the Curvature itself (Cholesky / eigenbasis)
        self.direct = kind in DIRECT_KINDS or solver == "dense"
        self.A = build_curvature(ctx, kind, damping, solver="dense" if self.direct else "cg")
        self.cg_tol = check_number(cg_tol, "cg_tol", strict=True)
        self.cg_maxiter = check_number(cg_maxiter, "cg_maxiter", integer=True, low=1)
        self.lissa_opts = dict(lissa or {})
        self.info: dict[str, Any] = {"curvature": kind, "damping": damping, "solver": solver}
        self._lissa_setup: tuple[float, int] | None = None

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """``A^{-1} b`` for ``b`` ``[P]``."""
        b = b.to(self.ctx.device)
        if self.direct:
            return self.A.solve(b)
        if self.solver == "cg":
            x, its = self.A.cg_solve(b, self.cg_tol, self.cg_maxiter, "the damping")
            self.info["cg_iterations"] = max(int(self.info.get("cg_iterations", 0)), its)
            return x
        return self._lissa(b)

    def solve_many(self, B: torch.Tensor) -> torch.Tensor:
        """``A^{-1} B`` for ``B`` ``[P, m]``, column by column (each column as :meth:`solve`)."""
        if B.shape[1] == 0:
            return B.to(self.ctx.device)
        if self.direct:
            return self.A.solve(B.to(self.ctx.device))
        return torch.stack([self.solve(B[:, j]) for j in range(B.shape[1])], 1)

    def _lissa(self, b: torch.Tensor) -> torch.Tensor:
        o = self.lissa_opts
        if self._lissa_setup is None:
            scale = o.get("scale", "auto")
            if scale == "auto":
                scale = 1.5 * top_eigenvalue(self.A.matvec, b, seed=int(o.get("seed", 0)))
            scale = float(scale)
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"lissa_scale must be > 0; got {scale}")
            depth = o.get("depth", "auto")
            if depth == "auto":
                needed = math.ceil(LISSA_TOL_FACTOR * scale / self.damping)
                depth = min(needed, int(o.get("max_depth", 10_000)))
                self.info["lissa_depth_capped"] = needed > depth
            depth = int(depth)
            if depth < 1:
                raise ValueError(f"lissa_depth must be >= 1; got {depth}")
            self._lissa_setup = (scale, depth)
            self.info.update(lissa_scale=scale, lissa_depth=depth)
        scale, depth = self._lissa_setup
        return lissa(
            self.ctx,
            self.kind,
            self.damping,
            b,
            depth=depth,
            scale=scale,
            repeats=int(o.get("repeats", 1)),
            batch=int(o.get("batch", 128)),
            seed=int(o.get("seed", 0)),
            full=self.A,
        )


def top_eigenvalue(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    like: torch.Tensor,
    iters: int = 30,
    seed: int = 0,
) -> float:
    """Largest eigenvalue (in magnitude) of a symmetric operator by seeded power iteration."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(like.shape[0], generator=g, dtype=torch.float64).to(like)
    v = v / torch.linalg.vector_norm(v)
    lam = 0.0
    for _ in range(iters):
        w = matvec(v)
        lam = float(torch.dot(v, w))
        n = torch.linalg.vector_norm(w)
        if float(n) == 0.0:
            return 1.0
        v = w / n
    return abs(lam) if lam != 0 else 1.0


def lissa(
    ctx: Context,
    kind: str,
    damping: float,
    b: torch.Tensor,
    depth: int,
    scale: float,
    repeats: int = 1,
    batch: int = 128,
    seed: int = 0,
    full: Curvature | None = None,
) -> torch.Tensor:
    """LiSSA (Agarwal, Bullins & Hazan 2017; as used by Koh & Liang) for ``A^{-1} b``.

    With ``A = C_sum + damping * I`` and ``A_j = (N/B) C_{batch_j} + damping * I`` an unbiased
    minibatch estimate of ``A``, the recursion ``h_0 = b``, ``h_j = b + h_{j-1} - A_j h_{j-1} /
    scale`` is the truncated Neumann series of ``(A / scale)^{-1} b``; the estimate is
    ``h_depth / scale``, averaged over ``repeats`` independent runs.

    It converges when every eigenvalue of ``A`` lies in ``(0, 2 * scale)``, at the rate
    ``(1 - lambda_min(A) / scale)^depth`` with ``lambda_min(A) >= damping``. Minibatches of
    ``batch`` training examples are drawn without replacement from seeded permutations
    (seed ``[seed, repeat]``), so the result is deterministic given the seed and independent
    of ``chunk_size``; with ``batch >= N`` the recursion is exact and deterministic, and stops
    early once ``||h_j - h_{j-1}|| <= 1e-12 ||h_j||``.

    Args:
        ctx: identification context; kind: "ggn", "hessian" or "fisher"; damping: > 0.
        b: right-hand side ``[P]``.
        depth, scale, repeats, batch, seed: as above.
        full: the full-batch damped curvature (reused when ``batch >= N``).

    Returns:
        The estimate of ``A^{-1} b``, ``[P]``.
    """
    if repeats < 1 or batch < 1:
        raise ValueError(f"lissa_repeats and lissa_batch must be >= 1; got {repeats}, {batch}")
    n = ctx.N
    b = b.to(ctx.device)
    total = torch.zeros_like(b)
    for r in range(repeats):
        gen = torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, r]).generate_state(1)[0])
        )
        order = torch.empty(0, dtype=torch.long)
        pos = 0
        h = b.clone()
        for _ in range(depth):
            if batch >= n:
                A = full if full is not None else build_curvature(ctx, kind, damping)
                Ah = A.matvec(h)
            else:
                if pos + batch > order.numel():
                    order = torch.cat([order[pos:], torch.randperm(n, generator=gen)])
                    pos = 0
                idx = order[pos : pos + batch]
                pos += batch
                Ab = build_curvature(ctx, kind, damping * batch / n, ctx.X[idx], ctx.y[idx])
                Ah = (n / batch) * Ab.matvec(h)  # (N/B) C_batch h + damping h
            h_new = b + h - Ah / scale
            if not torch.isfinite(h_new).all():
                raise ValueError(
                    f"LiSSA diverged (scale={scale:g} is below half the curvature's largest "
                    "eigenvalue on some minibatch); raise lissa_scale or lissa_batch"
                )
            done = batch >= n and float(torch.linalg.vector_norm(h_new - h)) <= 1e-12 * float(
                torch.linalg.vector_norm(h_new)
            )
            h = h_new
            if done:
                break
        total = total + h / scale
    return total / repeats


# ----------------------------------------------------------------------------- the methods

INFLUENCE_OPTIONS = (
    "curvature",
    "solver",
    "damping",
    "target",
    "cg_tol",
    "cg_maxiter",
    "lissa_depth",
    "lissa_max_depth",
    "lissa_scale",
    "lissa_repeats",
    "lissa_batch",
    "fisher_type",
    "mc_samples",
    "covariance_max_examples",
    "correction_max_examples",
)


KRONECKER_OPTIONS = (
    "fisher_type",
    "mc_samples",
    "covariance_max_examples",
    "correction_max_examples",
)
"""Options read only by the Kronecker-factored curvatures ("kfac", "ekfac")."""


def _warn_idle_options(o: dict[str, Any], kind: str, solver: str, method: str) -> None:
    """Warn of options that the chosen curvature or solver never reads: a sweep over them
    returned bit-identical scores with no word (an outside trial: ``mc_samples=7`` with the
    dense GGN, ``lissa_depth`` with CG). A warning, not a refusal: one option set shared by
    several solvers is a common way to compare them."""
    idle = []
    if kind not in ("kfac", "ekfac"):
        idle += [k for k in KRONECKER_OPTIONS if k in o]
    if solver != "lissa":
        idle += [k for k in o if k.startswith("lissa_")]
    if solver not in ("cg", "auto") or kind in DIRECT_KINDS:
        idle += [k for k in ("cg_tol", "cg_maxiter") if k in o]
    if idle:
        warn(
            f"method {method!r} with curvature={kind!r} and solver={solver!r} does not read "
            f"{', '.join(sorted(idle))}: they change nothing (fisher_type, mc_samples, ...: "
            "curvature 'kfac'/'ekfac'; lissa_*: solver='lissa'; cg_*: solver='cg')"
        )


SELF_ITERATIVE_MAX = 200
"""Self-influence by an iterative solver warns above this many training examples."""


def influence_scores(ctx: Context, kind: str, method: str) -> MethodOutput:
    """Influence-function cause scores with curvature ``kind`` (see the module docstring)."""
    check_options(ctx, INFLUENCE_OPTIONS, method)
    o = ctx.options
    target = option_target(ctx, method)
    damping = resolve_damping(ctx, o.get("damping", "auto"))
    lissa_opts = {k[len("lissa_") :]: v for k, v in o.items() if k.startswith("lissa_")}
    lissa_opts["seed"] = ctx.seed
    _warn_idle_options(o, kind, str(o.get("solver", "auto")), method)
    inv = InverseCurvature(
        ctx,
        kind,
        damping,
        solver=str(o.get("solver", "auto")),
        cg_tol=float(o.get("cg_tol", 1e-8)),
        cg_maxiter=int(o.get("cg_maxiter", 300)),
        lissa=lissa_opts,
    )
    theta = ctx.theta
    if target == "self":
        # g_z^T A^{-1} g_z: one solve per training example (use a direct kind for large N)
        if not inv.direct and ctx.N > SELF_ITERATIVE_MAX:
            warn(
                f"self-influence with solver {inv.solver!r} runs one iterative solve per "
                f"training example ({ctx.N} of them, up to cg_maxiter={inv.cg_maxiter} "
                "curvature products each): this can take hours. Use method='ekfac' (or "
                "curvature='ekfac'/'kfac'), solver='dense' for a model of at most "
                f"{DENSE_MAX_PARAMS} parameters, or method='trak' / 'loss' with target='self'"
            )
        sc = grad_rows(ctx, theta, lambda G: (G * inv.solve_many(G.T).T).sum(1), "self-influence")
    else:
        v = inv.solve(ctx.failure_grad(theta))  # A^{-1} g_F, g_F summed over the failures

        def directional(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # g_z . v for a chunk by one forward-mode pass: no [chunk, P] gradient rows
            return -ctx.fm.ll_jvp(theta, v, x, t)[1]

        sc = stream(
            ctx.X, ctx.y, directional, ctx.chunk_size, ctx.device, ctx.progress, method,
            lambda: tensor_hash(torch.cat([theta, v])),
        )  # fmt: skip

    def per_failure() -> np.ndarray:
        V = inv.solve_many(failure_grads(ctx, theta).T)  # [P, M]
        return grad_rows(ctx, theta, NegDot(V), "culprits").numpy().astype(out_dtype(ctx))

    return MethodOutput(
        scores=sc.double().numpy(), per_failure=per_failure, info={**inv.info, "target": target}
    )


@register("influence", options=INFLUENCE_OPTIONS)
def influence(ctx: Context) -> MethodOutput:
    """Koh & Liang influence functions: ``r(z) = -g_F^T A^{-1} g_z`` ``[N]``, positive = harmful.

    ``r(z)`` is the first-order drop in the failures' summed loss when ``z`` is removed from
    the training set; ``A = C_sum + damping I`` with ``C_sum`` summed over the training set.

    Options:
        curvature: "ggn" (default; Gauss-Newton = Fisher of the model's predictive
            distribution, PSD, equal to the Hessian for a linear softmax model), "hessian"
            (exact Hessian-vector products; may be indefinite away from a minimum: raise
            ``damping`` if CG reports non-positive curvature), "fisher" (empirical Fisher),
            "ekfac", "kfac" (Kronecker-factored, solved directly), "diag".
        solver: "auto" (default): "dense" for models of at most ``DENSE_MAX_PARAMS``
            parameters (the damped ``[P, P]`` matrix built in one pass and Cholesky-factorised;
            exact, and all right-hand sides solved at once), else "cg" (conjugate gradients,
            ``cg_tol`` 1e-8 relative residual, ``cg_maxiter`` 300); or "lissa"
            (``lissa_depth`` "auto": enough steps for a contraction of 1e-6, at most
            ``lissa_max_depth`` 10000; ``lissa_scale`` "auto": 1.5 x the power-iteration
            estimate of ``A``'s largest eigenvalue;
            ``lissa_repeats`` 1; ``lissa_batch`` 128 examples per stochastic curvature product,
            full batch when >= N; seeded by ``seed``).
        damping: "auto" (default): 0.1 x the mean diagonal of the summed empirical Fisher
            (its mean eigenvalue; kronfluence's heuristic), or a positive float. The
            identification's ``l2`` is not used: it is tuned for EWC and far too strong here.
        fisher_type, mc_samples: for "kfac"/"ekfac", which Fisher the factors estimate
            (default: :data:`netmend.curvature.kfac.DEFAULT_FISHER_TYPE`, labels sampled from
            the model,
            ``mc_samples`` 1 per example, seeded by ``seed``); see :mod:`netmend.curvature.kfac`.
        covariance_max_examples, correction_max_examples: for "kfac"/"ekfac", estimate the
            factors / EK-FAC's eigenvalue correction on a seeded subsample of at most this
            many training examples (default ``None``: all), like kronfluence's
            ``covariance_max_examples`` / ``lambda_max_examples``; trades accuracy for time
            (measured in ``benchmarks/ekfac_timing.py``).
        target: "failures" (default) or "self": self-influence ``g_z^T A^{-1} g_z`` (positive =
            suspicious, e.g. mislabelled; costs one solve per training example).

    Per-failure scores ``[N, M]``: ``-g_{f_i}^T A^{-1} g_z`` (one solve per failure), whatever
    the target.
    """
    return influence_scores(ctx, str(ctx.options.get("curvature", "ggn")), "influence")


@register("ekfac", options=INFLUENCE_OPTIONS)
def ekfac_influence(ctx: Context) -> MethodOutput:
    """EK-FAC influence (Grosse et al. 2023; kronfluence's method), positive = harmful.

    Exactly ``influence`` with ``curvature="ekfac"``: the eigenvalue-corrected
    Kronecker-factored curvature, inverted directly (no iterative solve). Same options as
    ``influence`` (``damping`` "auto" = 0.1 x the mean eigenvalue, ``target``), except that
    ``curvature`` and ``solver`` are fixed.
    """
    if ctx.options.get("curvature", "ekfac") != "ekfac":
        raise ValueError(
            "method 'ekfac' fixes curvature='ekfac'; use method='influence' to choose another"
        )
    if ctx.options.get("solver", "auto") != "auto":
        raise ValueError(
            f"method 'ekfac' inverts its eigenvalue-corrected factors directly: solver="
            f"{ctx.options['solver']!r} does not apply (leave solver out, or use method="
            "'influence' with curvature='ggn' for a dense or iterative solve)"
        )
    return influence_scores(ctx, "ekfac", "ekfac")
