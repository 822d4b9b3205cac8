"""Rules for the automatic K, from the agreement of half-splits of the query failures.

Every rule reads the same evidence: for ``S`` random half-splits of the query failures, the
training set scored against each half (``scores_a[s]``, ``scores_b[s]``, positive =
harmful). For each K on a log grid, the *excess agreement* of a split is
``|top_K(a) & top_K(b)| / K - K / N`` (:func:`netmend.identification.reproducible_k`): the
share of one half's top K that the other half also blames, above chance. Real causes of a
kind of failure are blamed by both halves; examples blamed by chance are not.

* ``argmax`` (netmend 0.3): the K of highest excess agreement on one split. The curve is a
  long flat plateau when the failures share many causes (the demo: 0.92 to 0.93 from K = 800
  to K = 2,500), so its argmax wanders along the plateau with the split (K = 1,922 / 10 / 446
  on the demo's three seeds).
* ``argmax_mean``: the same argmax, of the agreement averaged over the splits;
* ``edge``: the excess agreement averaged over the splits, and the **largest** K at which it
  is still at least ``REPRODUCIBLE`` (0.9) of its maximum: the far edge of the plateau,
  where adding examples starts to add ones the halves do not both blame.
* ``crossfit``: each half's ranking judged by the other half's scores. Removing half A's
  top K is predicted to help half B's failures by ``sum over A's top K of r_B`` (the
  scores are per-example effects on B, positive = removing helps); the rule takes the K
  that maximises that held-out benefit, averaged over both directions and all splits.
  Examples that A blames by chance carry B-scores of either sign, so the sum stops growing
  where A's ranking stops being about B's failures.
* ``mirror``: no halves: the negative scores as a null for the positive ones (target-decoy
  or knockoff counting): the largest K whose top-K threshold ``t`` has
  ``#{r <= -t} <= MIRROR_FDR * K``. Conservative when many examples are truly helpful.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from netmend.identification.base import k_grid, reproducible_k

REPRODUCIBLE = 0.9
"""``edge`` keeps the largest K whose mean excess agreement is at least this share of the
highest."""

MIN_AGREEMENT = 0.1
"""``edge`` supports no K (returns 0) unless the best mean excess agreement reaches this: a
tenth of the top K blamed by both halves beyond chance. Unrelated halves of pure noise reach
about 0.03 (a chance overlap of one example among the top 10, averaged over three splits)."""

MIRROR_FDR = 0.1
"""``mirror``: the largest share of the top K that the negative tail may mirror."""

Rule = Callable[
    [Sequence[np.ndarray], Sequence[np.ndarray], int, np.ndarray], tuple[int, dict[int, float]]
]


def mean_excess(
    scores_a: Sequence[np.ndarray], scores_b: Sequence[np.ndarray], max_k: int | None = None
) -> dict[int, float]:
    """The excess agreement at each K of the grid, averaged over the splits.

    Args:
        scores_a, scores_b: ``S`` pairs of ``[N]`` score vectors, one pair per half-split.
        max_k: the largest K considered (default ``N // 2``).

    Returns:
        ``{K: mean over splits of the excess agreement}``, K on the log grid of
        :func:`netmend.identification.reproducible_k`.
    """
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError("give one pair of score vectors per half-split (at least one)")
    curves = [reproducible_k(a, b, max_k)[1] for a, b in zip(scores_a, scores_b, strict=True)]
    return {k: float(np.mean([c[k] for c in curves])) for k in curves[0]}


def argmax_rule(
    scores_a: Sequence[np.ndarray],
    scores_b: Sequence[np.ndarray],
    max_k: int,
    scores: np.ndarray | None = None,
) -> tuple[int, dict[int, float]]:
    """netmend 0.3's K: the argmax of the first split's excess agreement."""
    return reproducible_k(scores_a[0], scores_b[0], max_k)


def argmax_mean_rule(
    scores_a: Sequence[np.ndarray],
    scores_b: Sequence[np.ndarray],
    max_k: int,
    scores: np.ndarray | None = None,
) -> tuple[int, dict[int, float]]:
    """The argmax of the excess agreement averaged over every split (ties: the larger K)."""
    excess = mean_excess(scores_a, scores_b, max_k)
    if not excess:
        return 0, excess
    return max(excess, key=lambda k: (excess[k], k)), excess


def edge_rule(
    scores_a: Sequence[np.ndarray],
    scores_b: Sequence[np.ndarray],
    max_k: int,
    scores: np.ndarray | None = None,
    share: float = REPRODUCIBLE,
) -> tuple[int, dict[int, float]]:
    """The largest K whose mean excess agreement is at least ``share`` of its maximum.

    Args:
        scores_a, scores_b: ``S`` pairs of ``[N]`` score vectors (positive = harmful), one
            pair per random half-split of the query failures.
        max_k: the largest K considered (e.g. the number of positive scores).
        scores: unused (the common signature of :data:`RULES`).
        share: the share of the best agreement that the chosen K keeps.

    Returns:
        ``K`` (0 when no K is supported: the best mean excess agreement is below
        :data:`MIN_AGREEMENT`) and the mean excess agreement at each K of the grid.
    """
    excess = mean_excess(scores_a, scores_b, max_k)
    if not excess:
        return 0, excess
    top = max(excess.values())
    if top < MIN_AGREEMENT:
        return 0, excess
    return max(k for k, e in excess.items() if e >= share * top), excess


def crossfit_rule(
    scores_a: Sequence[np.ndarray],
    scores_b: Sequence[np.ndarray],
    max_k: int,
    scores: np.ndarray | None = None,
) -> tuple[int, dict[int, float]]:
    """The K that maximises the other half's predicted benefit, ``sum_{A's top K} r_B``.

    Each direction's curve is divided by the largest absolute score of the judging half, so
    that splits with larger scores do not dominate the average. Returns 0 when no K has a
    positive mean benefit.
    """
    if len(scores_a) != len(scores_b) or not scores_a or max_k < 1:
        return 0, {}
    n = len(scores_a[0])
    ks = k_grid(min(max_k, n))
    curves = []
    for a, b in zip(scores_a, scores_b, strict=True):
        for rank, judge in ((a, b), (b, a)):
            order = np.argsort(-rank, kind="stable")[: int(ks[-1])]
            gain = np.cumsum(judge[order]) / max(float(np.abs(judge).max()), 1e-300)
            curves.append(gain[ks - 1])
    mean = np.mean(curves, axis=0)
    benefit = {int(k): float(v) for k, v in zip(ks, mean, strict=True)}
    if mean.max() <= 0:
        return 0, benefit
    return int(ks[int(np.argmax(mean))]), benefit


def mirror_rule(
    scores_a: Sequence[np.ndarray],
    scores_b: Sequence[np.ndarray],
    max_k: int,
    scores: np.ndarray | None = None,
    fdr: float = MIRROR_FDR,
) -> tuple[int, dict[int, float]]:
    """The largest K with ``#{r <= -t_K} <= fdr * K``, ``t_K`` the K-th largest score."""
    if scores is None:
        raise ValueError("the mirror rule needs the scores of all failures")
    s = np.asarray(scores, dtype=np.float64)
    ks = k_grid(min(max_k, len(s)))
    if ks.size == 0:
        return 0, {}
    top = -np.sort(-s)
    neg = np.sort(s)  # ascending: #{r <= -t} = searchsorted(neg, -t, "right")
    ratio = {}
    best = 0
    for k in ks:
        t = top[k - 1]
        if t <= 0:
            break
        false = int(np.searchsorted(neg, -t, side="right"))
        ratio[int(k)] = false / int(k)
        if false <= fdr * k:
            best = int(k)
    return best, ratio


RULES: dict[str, Rule] = {
    "argmax": argmax_rule,
    "argmax_mean": argmax_mean_rule,
    "edge": edge_rule,
    "crossfit": crossfit_rule,
    "mirror": mirror_rule,
}
"""The rules compared by ``benchmarks/k_rule.py``, by name."""

__all__ = [
    "MIN_AGREEMENT",
    "MIRROR_FDR",
    "REPRODUCIBLE",
    "RULES",
    "Rule",
    "argmax_rule",
    "crossfit_rule",
    "edge_rule",
    "mean_excess",
    "mirror_rule",
]
