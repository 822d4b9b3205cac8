"""What retraining actually does: leave-one-out effects, LDS subset retraining, the
optimisation noise floor (:func:`ground_truth`), and how well scores match them
(:func:`score_quality`). Positive = harmful throughout."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from netmend.evaluation import identification_metrics
from netmend.lab.validation.problem import Problem
from netmend.lab.validation.refit import DT, _lbfgs


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
        seed: seeds the subsets and, from a stream of its own, the choice of LOO examples
            (so ``n_loo`` does not change the subsets).
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
    # separate streams, so n_loo does not change the subsets; the subsets keep the stream
    # they always had (with every example refitted, nothing was drawn before them)
    rng = np.random.default_rng([seed, 0x6C6F6F, 1])  # the LOO examples
    lds_rng = np.random.default_rng([seed, 0x6C6F6F])  # the subsets
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
    order = np.argsort(lds_rng.random((n_subsets, N)), axis=1)[:, :keep]
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
