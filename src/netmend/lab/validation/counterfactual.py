"""The counterfactual test: retrain without a set of training examples and compare the
failures' accuracy with removing as many at random (:func:`counterfactual`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from netmend.lab.validation.problem import Problem
from netmend.lab.validation.refit import DT


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
