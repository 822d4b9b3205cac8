"""Ground-truth validation: what each identification method's scores are worth against retraining.

A :class:`Problem` is a small, fully deterministic classification task with planted label noise:
scikit-learn's digits, standardised, with a share of training labels flipped, and a float64
model trained **to convergence** (full-batch L-BFGS with strong-Wolfe line search on the summed
cross-entropy plus ``(l2/2)||theta||^2``; logistic regression is then polished with exact Newton
steps). Because the optimum is reached to machine precision, retraining without some examples
is a well-defined function of the examples kept, and its effect on the failures can be measured
exactly. :func:`ground_truth` measures

* the actual **leave-one-out** effect of training examples on the query failures' loss, and
* the actual per-failure query losses after retraining on random subsets (for the **linear
  datamodeling score**, LDS, of Park et al. 2023);

:func:`score_quality` compares a method's scores with both (and with the planted corruption),
and :func:`validate` runs every identification method, adds a **counterfactual** test (retrain
without each method's top-k and compare with removing k examples at random), and returns one
JSON-ready report.

Sign convention, everywhere: **positive = harmful**. The LOO effect of ``z`` is
``L_q(theta_hat) - L_q(theta_{-z})``, positive when removing ``z`` lowers the summed loss of
the query failures. For a subset ``S``, scores ``s`` predict the loss after retraining on ``S``
as ``L_q(theta_hat) - sum_{z not in S} s(z)`` (removing harmful examples lowers the loss).

Retraining is warm-started from the trained parameters (for the non-convex MLP this measures
the effect within the trained basin, the usual convention). For logistic regression all refits
are batched: many weight masks ``w in {0, 1}^N`` are solved at once by damped Newton on the
weighted objective ``sum_n w_n CE_n(theta) + (l2/2)||theta||^2``; leave-one-out refits use the
full-data Hessian corrected by a rank-``C`` Woodbury downdate, so they converge in 2-4 steps.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn
from torch.func import vmap
from tqdm.auto import tqdm

from netmend.data.streaming import chunks
from netmend.evaluation import identification_metrics, split_failures
from netmend.lab.corrupt import symmetric_flips
from netmend.lab.models import MLP, LogisticRegression
from netmend.model.functional import FunctionalModel

DT = torch.float64
DATASETS = ("digits",)
MODELS = ("logreg", "mlp")
DEFAULT_L2 = {"logreg": 1.0, "mlp": 1.0}
"""Weight decay ``l2`` of the summed training objective ``sum CE + (l2/2)||theta||^2``."""
GRAD_TOL = 1e-9
"""Refits stop when the gradient norm of the summed objective falls below this."""


# ----------------------------------------------------------------------------- batched refits


class LogregSolver:
    """Exact, batched refits of L2-regularised multinomial logistic regression.

    Parameters are held as ``T [B, C, D+1]`` (row ``c`` = weight row and bias of class ``c``),
    i.e. the flat vector of :class:`~netmend.lab.models.LogisticRegression` is
    ``[W.flatten(), b]`` = ``T[:, :, :D].flatten(), T[:, :, D]``. Each refit ``b`` minimises
    ``sum_n W[b, n] CE_n(T_b) + (l2/2)||T_b||^2`` (the bias is penalised too).

    Args:
        X: inputs ``[N, D]`` (float64). y: labels ``[N]``. classes: ``C``. l2: weight decay.
    """

    def __init__(self, X: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> None:
        self.X1 = torch.cat([X.to(DT), torch.ones(X.shape[0], 1, dtype=DT)], 1)  # [N, D1]
        self.Y = F.one_hot(y, classes).to(DT)  # [N, C]
        self.C, self.D1 = classes, self.X1.shape[1]
        self.P = self.C * self.D1
        self.l2 = float(l2)

    def value_grad(self, T: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objectives ``[B]`` and gradients ``[B, C, D1]`` of ``B`` weighted problems."""
        Z = self.X1 @ T.transpose(1, 2)  # [B, N, C]
        lse = torch.logsumexp(Z, -1)
        ce = lse - (Z * self.Y).sum(-1)  # [B, N]
        f = (W * ce).sum(1) + 0.5 * self.l2 * (T * T).sum((1, 2))
        R = W.unsqueeze(-1) * (torch.softmax(Z, -1) - self.Y)  # [B, N, C]
        g = R.transpose(1, 2) @ self.X1 + self.l2 * T
        return f, g

    def hessian(self, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The Hessian ``[P, P]`` of one weighted objective at ``t [C, D1]`` (weights ``[N]``)."""
        rows = torch.nonzero(w).squeeze(1)  # examples with weight 0 add nothing
        X1, w = self.X1[rows], w[rows]
        p = torch.softmax(X1 @ t.T, -1)  # [n, C]
        q = w.unsqueeze(1) * p
        blocks = (q.T.unsqueeze(2) * X1.unsqueeze(0)).transpose(1, 2) @ X1  # [C, D1, D1]
        V = (p.unsqueeze(2) * X1.unsqueeze(1)).reshape(-1, self.P)  # [n, P]
        H = torch.block_diag(*blocks) - V.T @ (w.unsqueeze(1) * V)
        return H + self.l2 * torch.eye(self.P, dtype=DT)

    def solve(
        self,
        W: torch.Tensor,
        T0: torch.Tensor,
        precond: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        tol: float = GRAD_TOL,
        max_iter: int = 100,
        memory: int = 10,
        newton_until: float = 1e-3,
        newton_at: tuple[int, ...] = (0, 2),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Minimise ``B`` weighted objectives from ``T0`` (``[C, D1]`` or ``[B, C, D1]``).

        Batched L-BFGS whose initial inverse Hessian is ``precond(active, g) -> step``
        (``active``: indices of the unconverged problems, ``g`` their gradients); by default
        each problem's exact inverse Hessian at ``T0``, recomputed at the iterations in
        ``newton_at`` for problems whose gradient norm still exceeds ``newton_until``, and held
        in between (the L-BFGS pairs correct it).
        Steps are halved per problem until the objective decreases (Armijo), or the gradient
        norm halves, or the objective is unchanged to rounding. Converged problems are not
        touched again.

        Returns:
            ``T [B, C, D1]`` and the final gradient norms ``[B]``.
        """
        B = W.shape[0]
        T = (T0.expand(B, -1, -1) if T0.ndim == 2 else T0).clone()
        L: torch.Tensor | None = None
        if precond is None:
            L = torch.empty(B, self.P, self.P, dtype=DT)  # inverse Hessians

            def precond(act: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
                assert L is not None
                full = torch.zeros(B, self.P, 1, dtype=DT)  # no copy of L[act] (B P^2)
                full[act] = r.reshape(-1, self.P, 1)
                return torch.bmm(L, full)[act].reshape_as(r)

        f, g = self.value_grad(T, W)
        hist: list[tuple[torch.Tensor, torch.Tensor]] = []  # L-BFGS pairs (s, y), [B, P] each
        self.iterations = 0
        for it in range(max_iter):
            gnorm = g.flatten(1).norm(dim=1)
            act = torch.nonzero(gnorm > tol).squeeze(1)  # only unconverged problems move
            if act.numel() == 0:
                break
            self.iterations = it + 1
            Ta, ga, fa, Wa = T[act], g[act], f[act], W[act]
            T_prev, g_prev = T.clone(), g.clone()
            if L is not None:  # exact Newton while far from the optimum, then L-BFGS
                far = act[(gnorm[act] > newton_until) | (it == 0)] if it in newton_at else act[:0]
                for b in far.tolist():
                    L[b] = torch.cholesky_inverse(torch.linalg.cholesky(self.hessian(T[b], W[b])))
            step = self._two_loop(hist, act, ga, precond)
            slope = (ga * step).flatten(1).sum(1)
            t = torch.ones(act.numel(), dtype=DT)
            todo = torch.ones(act.numel(), dtype=torch.bool)
            for _ in range(20):
                fc, gc = self.value_grad(Ta - t[:, None, None] * step, Wa)
                ok = todo & (
                    (fc <= fa - 1e-4 * t * slope)
                    | (gc.flatten(1).norm(dim=1) < 0.5 * gnorm[act])
                    | (fc <= fa + 1e-13 * fa.abs())  # rounding level: accept
                )
                upd = act[ok]
                T[upd] = Ta[ok] - t[ok, None, None] * step[ok]
                f[upd], g[upd] = fc[ok], gc[ok]
                todo = todo & ~ok
                if not bool(todo.any()):
                    break
                t = torch.where(todo, t / 2, t)
            if bool(todo.all()):
                break  # no problem can make progress (machine precision reached)
            hist.append(((T - T_prev).flatten(1), (g - g_prev).flatten(1)))
            hist = hist[-memory:]
        return T, g.flatten(1).norm(dim=1)

    def hessian_precond(
        self, T: torch.Tensor, W: torch.Tensor
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(active, g) -> H_b^{-1} g_b`` with ``H_b`` the exact Hessian of problem ``b`` at
        ``T[b]`` (one Cholesky factor per problem)."""
        L = torch.linalg.cholesky(torch.stack([self.hessian(T[b], W[b]) for b in range(len(W))]))

        def apply(act: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return torch.cholesky_solve(r.reshape(-1, self.P, 1), L[act]).reshape_as(r)

        return apply

    def _two_loop(
        self,
        hist: list[tuple[torch.Tensor, torch.Tensor]],
        act: torch.Tensor,
        g: torch.Tensor,
        precond: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """L-BFGS two-loop recursion, batched, with ``precond`` as the initial inverse Hessian."""
        q = g.flatten(1).clone()
        coef = []
        for s_, y_ in reversed(hist):
            s_, y_ = s_[act], y_[act]
            sy = (s_ * y_).sum(1)
            rho = torch.where(sy > 0, 1 / torch.where(sy > 0, sy, 1.0), 0.0)
            a = rho * (s_ * q).sum(1)
            q -= a[:, None] * y_
            coef.append((s_, y_, rho, a))
        r = precond(act, q.view_as(g)).flatten(1)
        for s_, y_, rho, a in reversed(coef):
            b = rho * (y_ * r).sum(1)
            r += (a - b)[:, None] * s_
        return r.view_as(g)

    def loo_precond(
        self, t_hat: torch.Tensor, removed: torch.Tensor
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Preconditioner for leave-one-out refits: ``(H_full - h_z)^{-1}`` at ``t_hat``.

        ``h_z = J_z^T A_z J_z`` (``A_z = diag(p) - p p^T``, ``J_z = I_C (x) x_z^T``) is example
        ``z``'s own Hessian, so by Woodbury
        ``(H - J^T A J)^{-1} r = H^{-1} r + G (I - A K)^{-1} A J H^{-1} r`` with
        ``G = H^{-1} J^T`` and ``K = J G`` (``C x C``). One Cholesky factor for all ``z``.
        """
        H = self.hessian(t_hat, torch.ones(self.X1.shape[0], dtype=DT))
        L = torch.linalg.cholesky(H)
        x = self.X1[removed]  # [B, D1]
        B, C, D1 = x.shape[0], self.C, self.D1
        eye = torch.eye(C, dtype=DT)
        E = (eye[None, :, :, None] * x[:, None, None, :]).reshape(B * C, self.P)  # J^T columns
        G = torch.cholesky_solve(E.T.contiguous(), L).T.reshape(B, C, C, D1)  # [b, c', c, i]
        K = torch.einsum("bkci,bi->bck", G, x)  # K[b, c, c'] = x^T G[b, c'][c]
        p = torch.softmax(x @ t_hat.T, -1)  # [B, C]
        A = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
        MA = torch.linalg.solve(eye - A @ K, A)  # (I - A K)^{-1} A, [B, C, C]

        def apply(act: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            b = act.numel()
            u = torch.cholesky_solve(r.reshape(b, self.P).T.contiguous(), L).T.reshape(b, C, D1)
            v = (u * x[act].unsqueeze(1)).sum(-1)  # J u, [b, C]
            s = (MA[act] @ v.unsqueeze(2)).squeeze(2)  # [b, C]
            return u + torch.einsum("bkci,bk->bci", G[act], s)

        return apply


def _lbfgs(
    loss: Callable[[torch.Tensor], torch.Tensor],
    theta0: torch.Tensor,
    tol: float = GRAD_TOL,
    max_rounds: int = 40,
) -> tuple[torch.Tensor, float]:
    """Minimise ``loss(theta)`` by full-batch L-BFGS (strong Wolfe) from ``theta0``.

    Returns the minimiser and its gradient norm.
    """
    theta = theta0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1,
        max_iter=500,
        tolerance_grad=tol / 10,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        val = loss(theta)
        val.backward()
        return val

    gnorm = float("inf")
    for _ in range(max_rounds):
        opt.step(closure)
        (g,) = torch.autograd.grad(loss(theta), theta)
        new = float(g.norm())
        if new <= tol or new >= gnorm:
            gnorm = min(new, gnorm)
            break
        gnorm = new
    return theta.detach(), gnorm


# ----------------------------------------------------------------------------- the problem


@dataclass
class Problem:
    """A deterministic task with planted label noise and a model trained to convergence.

    Attributes:
        model: the trained classifier, float64, eval mode (never modified here).
        X, y: training inputs ``[N, D]`` float64 and noisy labels ``[N]`` int64.
        corrupted: ``[N]`` bool, True where the label was flipped.
        Xq, yq: query failures (test inputs the model gets wrong, correct labels), ``M``.
        Xh, yh: held-out failures (the other half; never used for scoring).
        Xt, yt: the whole test set.
        l2: weight decay of the training objective ``sum CE + (l2/2)||theta||^2``.
        grad_norm: gradient norm of that objective at the trained parameters.
        info: how the problem was made (data set, model, flip rate, seed, sizes).
    """

    model: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    corrupted: np.ndarray
    Xq: torch.Tensor
    yq: torch.Tensor
    Xh: torch.Tensor
    yh: torch.Tensor
    Xt: torch.Tensor
    yt: torch.Tensor
    l2: float
    grad_norm: float = float("nan")
    info: dict[str, Any] = field(default_factory=dict)
    _fm: FunctionalModel | None = field(default=None, repr=False)
    _solver: LogregSolver | None = field(default=None, repr=False)

    @property
    def N(self) -> int:
        return int(self.X.shape[0])

    @property
    def fm(self) -> FunctionalModel:
        if self._fm is None:
            self._fm = FunctionalModel.of(self.model)
        return self._fm

    @property
    def theta(self) -> torch.Tensor:
        """The trained flat parameters ``[P]``."""
        return self.fm.theta

    def objective(self, w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``theta -> sum_n w_n CE_n(theta) + (l2/2)||theta||^2`` (``w [N]``)."""
        fm, X, y, l2 = self.fm, self.X, self.y, self.l2

        def loss(theta: torch.Tensor) -> torch.Tensor:
            ce = F.cross_entropy(fm.logits(theta, X), y, reduction="none")
            return (w * ce).sum() + 0.5 * l2 * (theta * theta).sum()

        return loss

    def _keep_mask(self, keep: np.ndarray | torch.Tensor | Sequence[int]) -> np.ndarray:
        k = np.asarray(keep.cpu().numpy() if isinstance(keep, torch.Tensor) else keep)
        if k.dtype == bool:
            if k.shape != (self.N,):
                raise ValueError(f"a boolean keep mask must have shape ({self.N},); got {k.shape}")
            return k
        if k.size and (not np.issubdtype(k.dtype, np.integer) or k.min() < 0 or k.max() >= self.N):
            raise ValueError(f"keep must be a bool mask [{self.N}] or indices in [0, {self.N})")
        mask = np.zeros(self.N, dtype=bool)
        mask[k.astype(np.int64)] = True
        return mask

    def refit(
        self, masks: np.ndarray, progress: bool = False, loo: np.ndarray | None = None
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Retrain on each row of ``masks`` ``[B, N]`` (bool), warm-started from ``theta_hat``.

        Args:
            masks: the examples kept by each refit.
            progress: show a progress bar.
            loo: optional ``[B]`` index of the one example each row removes (faster path).

        Returns:
            Flat parameters ``[B, P]`` and final gradient norms ``[B]``.
        """
        masks = np.asarray(masks, dtype=bool).reshape(-1, self.N)
        W = torch.from_numpy(masks).to(DT)
        out, norms = [], []
        if self._solver is not None:
            s = self._solver
            t_hat = self._t_of(self.theta)
            size = 128 if loo is not None else 16
            for sl in tqdm(
                list(chunks(len(masks), size)), desc="refit", disable=not progress, leave=False
            ):
                pre = None
                if loo is not None:
                    pre = s.loo_precond(t_hat, torch.as_tensor(loo[sl], dtype=torch.long))
                T, gn = s.solve(W[sl], t_hat, precond=pre)
                out.append(self._theta_of(T))
                norms.append(gn.numpy())
        else:
            for b in tqdm(range(len(masks)), desc="refit", disable=not progress, leave=False):
                th, gnorm = _lbfgs(self.objective(W[b]), self.theta)
                out.append(th.unsqueeze(0))
                norms.append(np.array([gnorm]))
        if not out:
            return torch.empty(0, self.fm.num_params, dtype=DT), np.empty(0)
        return torch.cat(out), np.concatenate(norms)

    def _t_of(self, theta: torch.Tensor) -> torch.Tensor:
        s = self._solver
        if s is None:
            raise RuntimeError("the logistic-regression layout is only defined for logreg")
        C, D = s.C, s.D1 - 1
        return torch.cat([theta[: C * D].reshape(C, D), theta[C * D :].reshape(C, 1)], 1)

    def _theta_of(self, T: torch.Tensor) -> torch.Tensor:
        return torch.cat([T[:, :, :-1].flatten(1), T[:, :, -1]], 1)

    def module_at(self, theta: torch.Tensor) -> nn.Module:
        """A copy of the model with flat parameters ``theta`` ``[P]`` (eval mode)."""
        m = copy.deepcopy(self.model)
        with torch.no_grad():
            for (_, p), v in zip(m.named_parameters(), self.fm.unflatten(theta).values()):
                p.copy_(v)
        return m.eval()

    def retrain(self, keep: np.ndarray | torch.Tensor | Sequence[int]) -> nn.Module:
        """Refit on ``X[keep]`` (bool mask ``[N]`` or indices) from the trained parameters.

        To convergence (gradient norm below ``GRAD_TOL``, or as low as float64 allows),
        deterministic. Returns a new float64 module in eval mode.
        """
        theta, _ = self.refit(self._keep_mask(keep)[None])
        return self.module_at(theta[0])

    def logits(self, thetas: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, M, C]`` of ``B`` parameter vectors ``[B, P]`` on inputs ``X [M, ...]``."""
        fm = self.fm
        outs = [vmap(lambda t: fm.logits(t, X))(thetas[sl]) for sl in chunks(len(thetas), 64)]
        return torch.cat(outs)

    def losses(self, thetas: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example NLL ``[B, M]`` of ``B`` parameter vectors ``[B, P]`` on ``(X, y)``."""
        fm = self.fm
        outs = []
        for sl in chunks(thetas.shape[0], 64):
            Z = vmap(lambda t: fm.logits(t, X))(thetas[sl])  # [b, M, C]
            outs.append(-torch.log_softmax(Z, -1).gather(-1, y.expand(Z.shape[0], -1)[..., None]))
        return torch.cat(outs).squeeze(-1) if outs else torch.empty(0, X.shape[0], dtype=DT)

    def query_loss(self, model: nn.Module) -> float:
        """Summed NLL of the query failures under ``model``."""
        with torch.no_grad():
            return float(F.cross_entropy(model(self.Xq), self.yq, reduction="sum"))

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary of the problem."""
        return {
            **self.info,
            "train": self.N,
            "test": int(self.Xt.shape[0]),
            "corrupted": int(self.corrupted.sum()),
            "query_failures": int(self.Xq.shape[0]),
            "heldout_failures": int(self.Xh.shape[0]),
            "params": self.fm.num_params,
            "l2": self.l2,
            "train_grad_norm": self.grad_norm,
        }


def make_problem(
    dataset: str = "digits",
    model: str = "logreg",
    flip_rate: float = 0.2,
    seed: int = 0,
    n_train: int | None = None,
    *,
    l2: float | None = None,
    hidden: tuple[int, ...] = (32,),
) -> Problem:
    """Build a deterministic validation problem.

    Args:
        dataset: "digits" (scikit-learn's 8x8 digits, 75/25 split, standardised with the
            training mean and standard deviation).
        model: "logreg" (convex: LOO is well defined) or "mlp" (one hidden ReLU layer).
        flip_rate: share of training labels flipped to a uniformly drawn other class.
        seed: seeds the split, the flips, the initialisation and the failure split.
        n_train: keep only this many training examples (a seeded subset; default all).
        l2: weight decay of ``sum CE + (l2/2)||theta||^2`` (default 1.0).
        hidden: hidden widths of the MLP.

    Returns:
        A :class:`Problem` whose model is trained to convergence in float64.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {MODELS}")
    if not 0 <= flip_rate < 1:
        raise ValueError(f"flip_rate must lie in [0, 1); got {flip_rate}")
    from netmend.lab.datasets import load_digits

    train, test = load_digits(seed=seed)
    X, y_clean = train.X.to(DT), train.y
    if n_train is not None:
        if n_train < 10:
            raise ValueError(f"n_train must be >= 10; got {n_train}")
        idx = torch.randperm(len(y_clean), generator=torch.Generator().manual_seed(seed))
        idx = torch.sort(idx[: min(n_train, len(y_clean))]).values
        X, y_clean = X[idx], y_clean[idx]
    mu, sd = X.mean(0), X.std(0)
    sd = torch.where(sd > 1e-8, sd, torch.ones_like(sd))
    X = ((X - mu) / sd).contiguous()
    Xt = ((test.X.to(DT) - mu) / sd).contiguous()
    classes = 10
    flips = symmetric_flips(y_clean, flip_rate, classes, seed=seed)
    y = flips.labels
    wd = float(DEFAULT_L2[model] if l2 is None else l2)
    if not wd > 0:
        raise ValueError(f"l2 must be > 0 (it makes the optimum unique); got {wd}")

    torch.manual_seed(seed)
    net: nn.Module = (
        LogisticRegression(X.shape[1], classes)
        if model == "logreg"
        else MLP(X.shape[1], classes, hidden=hidden)
    )
    net = net.to(DT).eval()
    prob = Problem(
        net, X, y, flips.mask.numpy().copy(), Xt[:0], test.y[:0], Xt[:0], test.y[:0],
        Xt, test.y, wd,
    )  # fmt: skip
    if model == "logreg":
        prob._solver = LogregSolver(X, y, classes, wd)
    tol = GRAD_TOL if prob._solver is None else 1e-4  # logreg: Newton finishes the job
    theta, gnorm = _lbfgs(prob.objective(torch.ones(len(y), dtype=DT)), prob.theta, tol)
    if prob._solver is not None:  # polish to machine precision with exact Newton steps
        T, gn = prob._solver.solve(torch.ones(1, len(y), dtype=DT), prob._t_of(theta))
        theta, gnorm = prob._theta_of(T)[0], float(gn[0])
    prob.model = prob.module_at(theta)
    prob._fm = None
    prob.grad_norm = gnorm
    split = split_failures(prob.model, Xt, test.y, seed=seed)
    prob.Xq, prob.yq = Xt[split.query], test.y[split.query]
    prob.Xh, prob.yh = Xt[split.heldout], test.y[split.heldout]
    prob.info = {
        "dataset": dataset,
        "model": model,
        "flip_rate": flip_rate,
        "seed": seed,
        "n_train": n_train,
    }
    return prob


# ----------------------------------------------------------------------------- ground truth


@dataclass
class GroundTruth:
    """Measured effects of retraining (positive = harmful).

    Attributes:
        loo_idx: ``[n]`` training indices whose leave-one-out effect was measured.
        loo_effect: ``[n]`` ``L_q(theta_hat) - L_q(theta_{-z})`` (summed over query failures).
        loo_effect_per_failure: ``[n, M]`` the same per query failure.
        lds_masks: ``[S, N]`` bool, the examples kept by each random subset.
        lds_loss: ``[S, M]`` per-failure query NLL after retraining on each subset.
        base_loss: ``[M]`` per-failure query NLL of the trained model.
        noise_floor: largest change of the summed query loss when refitting the full set from
            perturbed starts (optimisation noise; compare with ``|loo_effect|``).
        max_grad_norm: largest final gradient norm of any refit.
        seconds: wall time per part.
    """

    loo_idx: np.ndarray
    loo_effect: np.ndarray
    lds_masks: np.ndarray
    lds_loss: np.ndarray
    loo_effect_per_failure: np.ndarray
    base_loss: np.ndarray
    noise_floor: float
    max_grad_norm: float
    alpha: float
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (no arrays)."""
        a = np.abs(self.loo_effect)
        return {
            "n_loo": int(self.loo_idx.size),
            "n_subsets": int(self.lds_masks.shape[0]),
            "alpha": self.alpha,
            "loo_abs_median": float(np.median(a)) if a.size else float("nan"),
            "loo_abs_max": float(a.max()) if a.size else float("nan"),
            "loo_harmful_share": float((self.loo_effect > 0).mean()) if a.size else float("nan"),
            "noise_floor": self.noise_floor,
            "noise_floor_over_median_loo": float(self.noise_floor / np.median(a))
            if a.size and np.median(a) > 0
            else float("nan"),
            "max_grad_norm": self.max_grad_norm,
            "seconds": self.seconds,
        }


def ground_truth(
    problem: Problem,
    n_loo: int | None = None,
    n_subsets: int = 100,
    alpha: float = 0.5,
    seed: int = 0,
    progress: bool = True,
) -> GroundTruth:
    """Measure leave-one-out and subset-retraining effects on the query failures.

    Args:
        problem: the task.
        n_loo: how many training examples (a seeded random subset) get an exact LOO refit;
            default all of them for logistic regression and 100 for the MLP.
        n_subsets: random subsets for the LDS, each of ``round(alpha * N)`` examples.
        alpha: the share of the training set each subset keeps.
        seed: seeds the choice of LOO examples and subsets.
        progress: show progress bars.

    Returns:
        A :class:`GroundTruth` (effects positive = harmful).
    """
    N = problem.N
    if n_loo is None:
        n_loo = N if problem._solver is not None else min(N, 100)
    if not 0 <= n_loo <= N:
        raise ValueError(f"n_loo must lie in [0, {N}]; got {n_loo}")
    if n_subsets < 0 or not 0 < alpha < 1:
        raise ValueError(f"need n_subsets >= 0 and alpha in (0, 1); got {n_subsets}, {alpha}")
    rng = np.random.default_rng([seed, 0x6C6F6F])
    seconds: dict[str, float] = {}
    base = problem.losses(problem.theta[None], problem.Xq, problem.yq)[0].numpy()

    t0 = time.perf_counter()
    loo_idx = np.sort(rng.choice(N, n_loo, replace=False)) if n_loo < N else np.arange(N)
    masks = np.ones((n_loo, N), dtype=bool)
    masks[np.arange(n_loo), loo_idx] = False
    th, gn_loo = problem.refit(masks, progress, loo=loo_idx)
    loo_pf = base[None] - problem.losses(th, problem.Xq, problem.yq).numpy()
    seconds["loo"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    keep = int(round(alpha * N))
    order = np.argsort(rng.random((n_subsets, N)), axis=1)[:, :keep]
    lds_masks = np.zeros((n_subsets, N), dtype=bool)
    np.put_along_axis(lds_masks, order, True, axis=1)
    th, gn_lds = problem.refit(lds_masks, progress)
    lds_loss = problem.losses(th, problem.Xq, problem.yq).numpy()
    seconds["lds"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    noise, gn_noise = _noise_floor(problem, seed)
    seconds["noise_floor"] = time.perf_counter() - t0
    norms = np.concatenate([gn_loo, gn_lds, gn_noise])
    return GroundTruth(
        loo_idx=loo_idx,
        loo_effect=loo_pf.sum(1),
        lds_masks=lds_masks,
        lds_loss=lds_loss,
        loo_effect_per_failure=loo_pf,
        base_loss=base,
        noise_floor=noise,
        max_grad_norm=float(norms.max()) if norms.size else float("nan"),
        alpha=alpha,
        seconds=seconds,
    )


def _noise_floor(problem: Problem, seed: int, repeats: int = 3) -> tuple[float, np.ndarray]:
    """Largest ``|L_q(refit) - L_q(theta_hat)|`` over full-set refits from perturbed starts."""
    theta = problem.theta
    g = torch.Generator().manual_seed(seed + 17)
    scale = 0.05 * float(theta.abs().mean())
    base = problem.query_loss(problem.model)
    diffs, norms = [], []
    ones = torch.ones(1, problem.N, dtype=DT)
    for _ in range(repeats):
        start = theta + scale * torch.randn(theta.shape, generator=g, dtype=DT)
        if problem._solver is not None:
            T, gn = problem._solver.solve(ones, problem._t_of(start))
            th, gnorm = problem._theta_of(T)[0], float(gn[0])
        else:
            th, gnorm = _lbfgs(problem.objective(ones[0]), start)
        diffs.append(abs(problem.query_loss(problem.module_at(th)) - base))
        norms.append(gnorm)
    return float(max(diffs)), np.asarray(norms)


# ----------------------------------------------------------------------------- scoring


def _spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``a`` with the same column of ``b`` (``[S, M]``)."""
    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    den = np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(0) / np.where(den > 0, den, 1.0), np.nan)


def lds_predictions(
    gt: GroundTruth, scores: np.ndarray, per_failure: np.ndarray | None = None
) -> np.ndarray:
    """Predicted per-failure losses ``[S, M]`` (up to a constant) after retraining on each subset.

    ``pred[s, i] = -sum_{z not in S_s} score_i(z)``: removing harmful (positive) examples lowers
    the loss. Uses ``per_failure[:, i]`` when given, else the summed ``scores`` for every failure.
    """
    dropped = (~gt.lds_masks).astype(np.float64)
    if per_failure is not None:
        return -(dropped @ np.asarray(per_failure, dtype=np.float64))
    pred = -(dropped @ np.asarray(scores, dtype=np.float64))
    return np.repeat(pred[:, None], gt.lds_loss.shape[1], axis=1)


def score_quality(
    problem: Problem,
    gt: GroundTruth,
    scores: np.ndarray,
    per_failure: np.ndarray | None = None,
) -> dict[str, float]:
    """How well cause scores (positive = harmful) match retraining and the planted noise.

    Args:
        problem, gt: the task and its measured effects.
        scores: ``[N]`` summed cause scores.
        per_failure: optional ``[N, M]`` per-query-failure scores.

    Returns:
        ``spearman_loo`` (Spearman with the actual LOO effects), ``lds`` (mean over failures of
        the Spearman correlation between predicted and actual subset losses), ``precision_at_k``
        (top-K precision against the corrupted labels, K = number corrupted), ``auroc`` (scores
        vs corrupted), ``culprit_precision_at_5`` (nan without per-failure scores) and
        ``lds_summed`` (the LDS from summed scores, whatever is given).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (problem.N,):
        raise ValueError(f"scores must have shape ({problem.N},); got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    pf = None
    if per_failure is not None:
        pf = np.asarray(per_failure, dtype=np.float64)
        if pf.shape != (problem.N, gt.lds_loss.shape[1]):
            raise ValueError(
                f"per_failure must have shape ({problem.N}, {gt.lds_loss.shape[1]}); got {pf.shape}"
            )
    out: dict[str, float] = {}
    if gt.loo_idx.size > 1:
        out["spearman_loo"] = float(
            _spearman_columns(s[gt.loo_idx, None], gt.loo_effect[:, None])[0]
        )
    else:
        out["spearman_loo"] = float("nan")
    if gt.lds_masks.shape[0] > 1:
        summed = _spearman_columns(lds_predictions(gt, s), gt.lds_loss)
        out["lds_summed"] = float(np.nanmean(summed)) if np.isfinite(summed).any() else np.nan
        if pf is not None:
            per = _spearman_columns(lds_predictions(gt, s, pf), gt.lds_loss)
            out["lds"] = float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")
        else:
            out["lds"] = out["lds_summed"]
    else:
        out["lds"] = out["lds_summed"] = float("nan")
    n_bad = int(problem.corrupted.sum())
    top = np.argsort(-s, kind="stable")[:n_bad]
    m = identification_metrics(s, top, problem.corrupted, None if pf is None else pf)
    out["precision_at_k"] = m["precision_at_true_k"]
    out["auroc"] = m["auroc"]
    out["culprit_precision_at_5"] = m.get("culprit_precision_at_5", float("nan"))
    return out


# ----------------------------------------------------------------------------- counterfactual


def _outcomes(problem: Problem, thetas: torch.Tensor) -> dict[str, np.ndarray]:
    """Accuracy and loss on the held-out failures, the query failures and the test set."""
    out: dict[str, np.ndarray] = {}
    for name, X, y in (
        ("heldout", problem.Xh, problem.yh),
        ("query", problem.Xq, problem.yq),
        ("test", problem.Xt, problem.yt),
    ):
        Z = problem.logits(thetas, X)  # [B, M, C]

        nll = -torch.log_softmax(Z, -1).gather(-1, y.expand(Z.shape[0], -1)[..., None])[..., 0]
        out[f"{name}_acc"] = (Z.argmax(-1) == y).to(DT).mean(1).numpy()
        out[f"{name}_loss"] = nll.sum(1).numpy() if name != "test" else nll.mean(1).numpy()
    return out


def counterfactual(
    problem: Problem,
    removals: dict[str, np.ndarray],
    k: int,
    repeats: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Retrain without each named set of training indices and without ``k`` random ones.

    Returns:
        ``{"original": {...}, "random": {metric: {"mean", "sd"}}, "sets": {name: {metric,
        "delta_<metric>", "delta_<metric>_vs_random"}}}``; the metrics are ``heldout_acc``,
        ``heldout_loss`` (summed NLL), ``query_acc``, ``query_loss``, ``test_acc``,
        ``test_loss`` (mean NLL); deltas are retrained minus original.
    """
    rng = np.random.default_rng([seed, 0x43465F])
    names = list(removals)
    rand = [rng.choice(problem.N, size=k, replace=False) for _ in range(repeats)]
    sets = [np.asarray(removals[n], dtype=np.int64) for n in names] + rand
    masks = np.ones((len(sets), problem.N), dtype=bool)
    for i, s in enumerate(sets):
        masks[i, s] = False
    thetas, norms = problem.refit(masks, progress)
    res = _outcomes(problem, torch.cat([problem.theta[None], thetas]))
    original = {m: float(v[0]) for m, v in res.items()}
    randoms = {m: v[1 + len(names) :] for m, v in res.items()}
    report: dict[str, Any] = {
        "k": k,
        "repeats": repeats,
        "original": original,
        "random": {
            m: {
                "mean": float(v.mean() - original[m]) if v.size else float("nan"),
                "sd": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
            }
            for m, v in randoms.items()
        },
        "random_is_delta": True,
        "max_grad_norm": float(norms.max()) if norms.size else float("nan"),
        "sets": {},
    }
    for i, n in enumerate(names):
        row: dict[str, float] = {"removed": int(len(sets[i]))}
        for m, v in res.items():
            d = float(v[1 + i] - original[m])
            row[m] = float(v[1 + i])
            row[f"delta_{m}"] = d
            row[f"delta_{m}_vs_random"] = d - report["random"][m]["mean"]
        report["sets"][n] = row
    return report


# ----------------------------------------------------------------------------- the harness


def validate(
    methods: list[str] | None = None,
    problem: Problem | None = None,
    gt: GroundTruth | None = None,
    k: int | None = None,
    counterfactual_repeats: int = 5,
    options: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
    seed: int = 0,
    *,
    l2: float | str | None = None,
    counterfactual_ks: list[int] | None = None,
) -> dict[str, Any]:
    """Score every identification method against retraining and the planted corruption.

    Args:
        methods: labels of the methods to run (default: ``netmend.identification.available()``
            at call time). A label is a registered name, or any name whose ``options`` entry
            says ``{"method": <registered name>, ...}`` (e.g. ``"linear-ggn"``).
        problem: the task (default ``make_problem(seed=seed)``).
        gt: its ground truth (default ``ground_truth(problem, seed=seed)``).
        k: how many top-scored examples each method removes in the counterfactual test
            (default: the number of corrupted training labels).
        counterfactual_repeats: random removals of ``k`` examples to compare with.
        options: per-label keyword options passed to :func:`netmend.identify`.
        progress: show progress bars.
        seed: seeds the default problem, the ground truth, the methods and the random removals.
        l2: the ``l2`` passed to :func:`netmend.identify` unless a method's options set it:
            default the problem's training weight decay (so that curvature-based methods damp
            with the true objective's regulariser); "auto" for netmend's default.
        counterfactual_ks: more removal sizes for the counterfactual test (e.g. ``[k // 4,
            k // 2, 2 * k]``): each method's top-k' is removed and the model retrained, against
            k' random removals, giving a curve of held-out accuracy change over k' (one
            batched refit per k'). Reported as ``counterfactual_curve``.

    Returns:
        A JSON-ready dict: ``problem``, ``ground_truth`` (summary, with the noise floor),
        ``k``, ``methods`` (per label: ``score_quality`` figures, ``seconds`` of scoring,
        ``per_failure_seconds``, ``counterfactual`` deltas, or ``error`` if the method failed),
        ``counterfactual`` (the random reference and reference removals: the corrupted
        examples and, when every LOO effect was measured, the top-k by actual LOO effect).
    """
    from netmend import api, identification

    if problem is None:
        problem = make_problem(seed=seed)
    if gt is None:
        gt = ground_truth(problem, seed=seed, progress=progress)
    labels = list(identification.available() if methods is None else methods)
    options = dict(options or {})
    n_bad = int(problem.corrupted.sum())
    k = n_bad if k is None else int(k)
    if not 0 < k < problem.N:
        raise ValueError(f"k must lie in [1, {problem.N - 1}]; got {k}")
    l2_default: float | str = problem.l2 if l2 is None else l2
    report: dict[str, Any] = {
        "problem": problem.describe(),
        "ground_truth": gt.summary(),
        "k": k,
        "identify_l2_default": l2_default,
        "methods": {},
    }
    removals: dict[str, np.ndarray] = {}
    order: dict[str, np.ndarray] = {}
    for label in labels:
        opts = dict(options.get(label, {}))
        name = str(opts.pop("method", label))
        opts.setdefault("l2", l2_default)
        opts.setdefault("seed", seed)
        entry: dict[str, Any] = {"method": name, "options": _jsonable(opts)}
        try:
            ident = api.identify(
                problem.model,
                (problem.X, problem.y),
                (problem.Xq, problem.yq),
                method=name,
                k=k,
                progress=progress,
                device="cpu",
                **opts,
            )
            entry["seconds"] = ident.seconds
            pf: np.ndarray | None
            t0 = time.perf_counter()
            try:
                pf = np.asarray(ident.per_failure)
            except ValueError:
                pf = None
            entry["per_failure_seconds"] = time.perf_counter() - t0 if pf is not None else None
            entry.update(score_quality(problem, gt, ident.scores, pf))
            order[label] = np.argsort(-ident.scores, kind="stable")
            removals[label] = order[label][:k]
        except Exception as exc:  # recorded in the report, never hidden
            warnings.warn(f"method {label!r} failed: {exc!r}", stacklevel=2)
            entry["error"] = f"{type(exc).__name__}: {exc}"
        report["methods"][label] = entry

    refs = {"ref:corrupted": np.flatnonzero(problem.corrupted)}
    if gt.loo_idx.size == problem.N:
        refs["ref:loo_topk"] = gt.loo_idx[np.argsort(-gt.loo_effect, kind="stable")[:k]]
    cf = counterfactual(problem, {**removals, **refs}, k, counterfactual_repeats, seed, progress)
    if counterfactual_ks:  # the main k is already refitted: the curve reuses it
        report["counterfactual_curve"] = _curve(
            problem, gt, order, sorted({int(c) for c in counterfactual_ks} | {k}),
            counterfactual_repeats, seed, progress, done={k: cf},
        )  # fmt: skip
    for label, row in cf["sets"].items():
        if label in report["methods"]:
            report["methods"][label]["counterfactual"] = row
    cf["references"] = {n: cf["sets"][n] for n in refs}
    del cf["sets"]
    report["counterfactual"] = cf
    if gt.loo_idx.size == problem.N:  # the oracle's own figures, as an upper reference
        report["references"] = {
            "loo_oracle": score_quality(problem, gt, gt.loo_effect, gt.loo_effect_per_failure)
        }
    return report


def _curve(
    problem: Problem,
    gt: GroundTruth,
    order: dict[str, np.ndarray],
    ks: list[int],
    repeats: int,
    seed: int,
    progress: bool,
    done: dict[int, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Held-out accuracy change (vs random removal) after retraining without each method's
    top-k', for every k' in ``ks``; the corrupted set's top-k' by LOO effect as a reference.

    ``done`` maps a k' to the :func:`counterfactual` report already computed for it with the
    same removals (each method's top-k', the LOO top-k', the same seed and repeats), which is
    used instead of refitting.
    """
    bad = [c for c in ks if not 0 < c < problem.N]
    if bad:
        raise ValueError(f"counterfactual_ks must lie in [1, {problem.N - 1}]; got {bad}")
    out: dict[str, Any] = {"ks": ks, "random": [], "methods": {n: [] for n in order}}
    if gt.loo_idx.size == problem.N:
        loo_order = gt.loo_idx[np.argsort(-gt.loo_effect, kind="stable")]
        out["methods"]["ref:loo_topk"] = []
    for c in ks:
        sets = {n: o[:c] for n, o in order.items()}
        if "ref:loo_topk" in out["methods"]:
            sets["ref:loo_topk"] = loo_order[:c]
        cf = (done or {}).get(c) or counterfactual(problem, sets, c, repeats, seed, progress)
        out["random"].append(cf["random"]["heldout_acc"]["mean"])
        for n in out["methods"]:
            out["methods"][n].append(cf["sets"][n]["delta_heldout_acc_vs_random"])
    return out


def curve_table(report: dict[str, Any]) -> str:
    """The counterfactual curve of :func:`validate` as markdown (one row per method)."""
    cur = report["counterfactual_curve"]
    lines = [
        "| method | " + " | ".join(f"k={c}" for c in cur["ks"]) + " |",
        "|---|" + "---:|" * len(cur["ks"]),
    ]
    for n, v in cur["methods"].items():
        lines.append(f"| {n} | " + " | ".join(f"{x:+.3f}" for x in v) + " |")
    lines.append(
        "| *random (Δ vs original)* | " + " | ".join(f"{x:+.3f}" for x in cur["random"]) + " |"
    )
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    return repr(obj)


TABLE_COLUMNS = (
    "method",
    "spearman LOO",
    "LDS",
    "precision@K",
    "AUROC",
    "culprit precision@5",
    "counterfactual Δ held-out acc vs random",
    "seconds",
)


def table(report: dict[str, Any]) -> str:
    """The report as a markdown table (one row per method, then the references)."""

    def f(v: Any, fmt: str = "{:.3f}") -> str:
        return "–" if v is None or (isinstance(v, float) and v != v) else fmt.format(v)

    lines = [
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(TABLE_COLUMNS) - 1)) + "|",
    ]
    for label, e in report["methods"].items():
        if "error" in e:
            lines.append(f"| {label} | error: {e['error'][:80]} |" + " |" * 6)
            continue
        cf = e.get("counterfactual", {})
        secs = e["seconds"] + (e.get("per_failure_seconds") or 0.0)
        lines.append(
            f"| {label} | {f(e['spearman_loo'])} | {f(e['lds'])} | {f(e['precision_at_k'])} | "
            f"{f(e['auroc'])} | {f(e['culprit_precision_at_5'])} | "
            f"{f(cf.get('delta_heldout_acc_vs_random'), '{:+.3f}')} | {f(secs, '{:.2f}')} |"
        )
    refs = report.get("references", {})
    cfr = report["counterfactual"]["references"]
    if "loo_oracle" in refs:
        r = refs["loo_oracle"]
        d = cfr.get("ref:loo_topk", {}).get("delta_heldout_acc_vs_random")
        lines.append(
            f"| *oracle: actual LOO* | {f(r['spearman_loo'])} | {f(r['lds'])} | "
            f"{f(r['precision_at_k'])} | {f(r['auroc'])} | {f(r['culprit_precision_at_5'])} | "
            f"{f(d, '{:+.3f}')} | – |"
        )
    c = cfr["ref:corrupted"]
    lines.append(
        f"| *remove all {c['removed']} corrupted* | – | – | 1.000 | 1.000 | – | "
        f"{f(c['delta_heldout_acc_vs_random'], '{:+.3f}')} | – |"
    )
    return "\n".join(lines)
