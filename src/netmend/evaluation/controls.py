"""Controls for a repair, and the Pareto criterion that says whether a repair counts.

A repair fine-tunes (or otherwise treats) the model without its causes. Much of what it
repairs may come from the treatment alone (more training) or from removing *any* K
examples; the diagnosis earns its keep only by what it adds over those. So every repair is
judged next to its **controls**, each produced by the very same treatment call (same method,
options, recipe and seed) with only the causes changed:

* ``finetune-only``: the treatment with no causes removed;
* ``random-K``: K uniformly drawn training examples, K = the pipeline's own K, over
  ``draws >= 3`` seeded draws (mean and standard error);
* ``oracle-causes``: the ground-truth corrupted set, where one is known;
* ``oracle-at-K`` (opt-in): K examples drawn from that set, K = the pipeline's own K: a
  diagnosis of perfect precision that chose the same number of causes but knows nothing of
  the failures;
* ``oracle-ranked`` (opt-in, :func:`truth_ranked`): the K members of that set the pipeline's
  own scores rank highest: the pipeline's ranking with its clean picks skipped, which tells
  what its false positives cost at its K;
* ``retrain-clean``: the reference, a model trained on clean data (where one exists).

The **diagnosis gain** is the pipeline's held-out-failure and test accuracy minus the mean of
``random-K`` (with the standard error of that mean). :func:`repaired` is the Pareto
criterion (see its docstring for the rule).

This module knows no treatment: it is given the treatment as a function of the causes
(:func:`netmend.with_controls` builds that function from exactly the arguments the repair's
``netmend.treat`` call received), so a control cannot drift from the pipeline's recipe.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from netmend.model.training import class_accuracies

TEST_TOLERANCE = 0.002
"""Test accuracy may fall at most 0.2 points below max(original, finetune-only)."""
MAX_CLASS_DROP = 0.10
"""No class's test accuracy may fall by more than 10 points below the better of original and
finetune-only on that class (a class collapse buys held-out failures of its neighbour)."""
RECIPE_LOSS = 0.01
"""Test accuracy the fine-tune alone (finetune-only) may lose before a run warns about the
fine-tune's recipe."""
MIN_DRAWS = 3
EPS = 1e-9
"""Differences of accuracies below this are float noise (accuracies are counts over ``n``)."""

Measure = Callable[[nn.Module], dict[str, Any]]
TreatFn = Callable[[np.ndarray], nn.Module]


def random_causes(n_train: int, k: int, draw: int, seed: int = 0) -> np.ndarray:
    """The ``draw``-th random-K cause set: ``k`` distinct indices of ``[0, n_train)``, sorted.

    Seeded by ``(seed, draw)`` alone (a local generator; the global RNG is untouched).
    """
    if not 0 <= k <= n_train:
        raise ValueError(f"k must lie in [0, {n_train}]; got {k}")
    rng = np.random.default_rng([seed, draw, 7919])
    return np.sort(rng.choice(n_train, size=k, replace=False)).astype(np.int64)


def truth_at_k(truth: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """The ``oracle-at-K`` cause set: ``k`` distinct members of ``truth`` (all of it when
    ``k >= len(truth)``), sorted.

    Seeded by ``seed`` alone (a local generator; the global RNG is untouched).

    Raises:
        ValueError: a negative ``k``.
    """
    t = np.unique(np.asarray(truth, dtype=np.int64))
    if k < 0:
        raise ValueError(f"k must be >= 0; got {k}")
    if k >= t.size:
        return t
    rng = np.random.default_rng([seed, 104729])
    return np.sort(rng.choice(t, size=k, replace=False)).astype(np.int64)


def truth_ranked(truth: np.ndarray, scores: np.ndarray | torch.Tensor, k: int) -> np.ndarray:
    """The ``oracle-ranked`` cause set: the ``k`` members of ``truth`` with the highest
    ``scores`` (positive = harmful; ties by index), sorted by index; all of ``truth`` when
    ``k >= len(truth)``.

    Args:
        truth: ground-truth corrupted training indices.
        scores: ``[N]`` the pipeline's cause scores.
        k: the pipeline's K.

    Raises:
        ValueError: a negative ``k``, or a truth index outside the scores.
    """
    t = np.unique(np.asarray(truth, dtype=np.int64))
    s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores)
    if k < 0:
        raise ValueError(f"k must be >= 0; got {k}")
    if t.size and (t[0] < 0 or t[-1] >= s.shape[0]):
        raise ValueError(f"truth holds indices outside the {s.shape[0]} scores")
    order = np.argsort(-s[t], kind="stable")  # t is sorted: ties go to the lower index
    return np.sort(t[order[:k]])


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean of ``values`` and its standard error (NaN with fewer than two values)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
    return float(v.mean()), se


def recipe_loss(original: float | None, finetune_only: float | None, recipe: str) -> str | None:
    """A warning when the fine-tune alone (no causes removed) loses more than
    :data:`RECIPE_LOSS` of test accuracy: a converged model fine-tuned with its own recipe keeps
    it (within 0.3 points on issue 11's suites), so a loss says the recipe does not match the
    model's training, or the model is not converged (an outside-in trial lost 10 points, and
    the repair with it, with no word).

    Args:
        original, finetune_only: test accuracies (fractions; ``None`` when not measured).
        recipe: how the caller names the recipe to fix (e.g. the CLI's flags).
    """
    if original is None or finetune_only is None or original - finetune_only <= RECIPE_LOSS:
        return None
    return (
        f"the fine-tune alone (the 'finetune only' control, no causes removed) loses "
        f"{100 * (original - finetune_only):.1f} test points, so the repair's figures carry that "
        f"loss too: {recipe} should be the model's own training recipe (netmend fine-tunes for "
        "up to 500 steps at its learning rate), or the model is not converged"
    )


@dataclass
class Controls:
    """The controls of one repair, measured by the same ``measure`` as the pipeline.

    Attributes:
        k: the pipeline's K (the size of every random-K draw).
        original: the unrepaired model's figures.
        finetune_only: the treatment with no causes removed (``None`` if not run).
        random_k: one dict per draw (each also holds its ``causes``).
        oracle_causes: the treatment without the ground-truth corrupted set, if known.
        oracle_at_k: the treatment without ``k`` members of that set (:func:`truth_at_k`;
            holds its ``causes``), if asked for.
        retrain_clean: the clean-data reference, if given.
        seconds: wall time per control.
    """

    k: int
    original: dict[str, Any]
    finetune_only: dict[str, Any] | None = None
    random_k: list[dict[str, Any]] = field(default_factory=list)
    oracle_causes: dict[str, Any] | None = None
    oracle_at_k: dict[str, Any] | None = None
    retrain_clean: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def random_k_mean(self, key: str) -> tuple[float, float]:
        """Mean over the random-K draws of ``key`` and its standard error."""
        return mean_se([r[key] for r in self.random_k])

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: every control's figures, random-K's mean ± s.e. per accuracy."""
        out: dict[str, Any] = {"k": self.k, "original": _public(self.original)}
        for name in ("finetune_only", "oracle_causes", "oracle_at_k", "retrain_clean"):
            v = getattr(self, name)
            if v is not None:
                out[name] = _public(v)
        if self.random_k:
            summary: dict[str, Any] = {"draws": len(self.random_k)}
            for key in _scalar_keys(self.random_k[0]):
                summary[key], summary[f"{key}_se"] = self.random_k_mean(key)
            summary["class_acc"] = _mean_lists([r.get("class_acc") for r in self.random_k])
            summary["runs"] = [_public(r) for r in self.random_k]
            out["random_k"] = summary
        out["seconds"] = dict(self.seconds)
        return out


def _scalar_keys(d: Mapping[str, Any]) -> list[str]:
    return [k for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _mean_lists(rows: Sequence[Sequence[float] | None]) -> list[float] | None:
    if not rows or any(r is None for r in rows):
        return None
    with warnings.catch_warnings():  # a class the test set lacks is NaN in every row
        warnings.simplefilter("ignore", RuntimeWarning)
        return [float(v) for v in np.nanmean(np.asarray(rows, dtype=np.float64), axis=0)]


def _public(d: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in d.items() if k != "causes"}
    if "causes" in d:
        out["causes"] = [int(i) for i in np.asarray(d["causes"]).tolist()]
    return out


def run_controls(
    treat: TreatFn,
    measure: Measure,
    original: nn.Module,
    n_train: int,
    k: int,
    *,
    truth: np.ndarray | None = None,
    clean_model: Callable[[], nn.Module] | None = None,
    draws: int = MIN_DRAWS,
    seed: int = 0,
    finetune_only: bool = True,
    oracle_causes: bool = True,
    oracle_at_k: bool = False,
) -> Controls:
    """Run the controls of a repair whose pipeline selected ``k`` causes.

    Args:
        treat: the pipeline's treatment as a function of the causes: ``treat(causes)`` must
            make exactly the call that produced the repair, with only ``causes`` changed
            (an empty array for ``finetune-only``).
        measure: the figures of a model (e.g. accuracies on the test set and failure split,
            with ``class_acc``): the same function measures the pipeline.
        original: the unrepaired model (measured, never treated).
        n_train: ``N``, the training set's size.
        k: the pipeline's K.
        truth: ground-truth corrupted training indices (``oracle-causes``), if known.
        clean_model: builds the clean-data reference (``retrain-clean``), if there is one.
        draws: random-K draws (at least 3).
        seed: seeds the draws (see :func:`random_causes`).
        finetune_only: run the ``finetune-only`` control.
        oracle_causes: run ``oracle-causes`` when ``truth`` is given.
        oracle_at_k: also run ``oracle-at-K`` (needs ``truth``).

    Returns:
        The :class:`Controls`.
    """
    if draws < MIN_DRAWS:
        raise ValueError(f"random-K needs at least {MIN_DRAWS} draws for a standard error")
    if not 0 <= k <= n_train:
        raise ValueError(f"k must lie in [0, {n_train}]; got {k}")
    if oracle_at_k and (truth is None or not len(truth)):
        raise ValueError("oracle-at-K draws from the ground-truth causes: pass a non-empty truth")
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], nn.Module]) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = measure(fn())
        seconds[name] = time.perf_counter() - t0
        return out

    ctl = Controls(k, measure(original), seconds=seconds)
    empty = np.zeros(0, dtype=np.int64)
    if finetune_only:
        ctl.finetune_only = timed("finetune_only", lambda: treat(empty))
    for d in range(draws):
        causes = random_causes(n_train, k, d, seed)
        row = timed(f"random_k_{d}", lambda c=causes: treat(c))  # type: ignore[misc]
        ctl.random_k.append({**row, "causes": causes})
    if truth is not None and len(truth):
        t = np.asarray(truth, dtype=np.int64)
        if oracle_causes:
            ctl.oracle_causes = {**timed("oracle_causes", lambda: treat(t)), "k": int(t.size)}
        if oracle_at_k:
            at_k = truth_at_k(t, k, seed)
            ctl.oracle_at_k = {**timed("oracle_at_k", lambda: treat(at_k)), "causes": at_k}
    if clean_model is not None:
        ctl.retrain_clean = timed("retrain_clean", clean_model)
    return ctl


def diagnosis_gain(pipeline: Mapping[str, Any], controls: Controls) -> dict[str, float]:
    """The pipeline's gain over ``random-K`` (same K, same treatment): what the diagnosis adds.

    Returns:
        ``heldout_gain`` and ``test_gain`` (pipeline minus the mean of the random-K draws,
        fractions), each with ``_se``: the standard error of the random-K mean (the pipeline
        is one run; over seeds, take the mean and s.e. of the per-seed gains).
    """
    out: dict[str, float] = {}
    for key, name in (("heldout_failure_acc", "heldout_gain"), ("test_acc", "test_gain")):
        mean, se = controls.random_k_mean(key)
        gain = float(pipeline[key]) - mean
        # equal accuracies whose mean was taken in another order: 0, not 6.9e-18
        out[name], out[f"{name}_se"] = (0.0 if abs(gain) < EPS else gain), se
    return out


@dataclass(frozen=True)
class Verdict:
    """Whether a repair counts (:func:`repaired`), and why not.

    Attributes:
        passed: all three conditions hold.
        heldout_gain: held-out-failure accuracy minus random-K's mean.
        test_floor: ``max(original, finetune-only) - tolerance`` on test accuracy.
        worst_class_drop: the largest fall of one class's test accuracy below the better of
            original and finetune-only on that class (NaN without per-class figures).
        worst_class: that class.
        reasons: the conditions that failed, in words.
    """

    passed: bool
    heldout_gain: float
    test_floor: float
    worst_class_drop: float
    worst_class: int | None
    reasons: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "heldout_gain": self.heldout_gain,
            "test_floor": self.test_floor,
            "worst_class_drop": self.worst_class_drop,
            "worst_class": self.worst_class,
            "reasons": list(self.reasons),
        }


def repaired(
    pipeline: Mapping[str, Any],
    controls: Controls,
    *,
    tolerance: float = TEST_TOLERANCE,
    max_class_drop: float = MAX_CLASS_DROP,
) -> Verdict:
    """The Pareto criterion: does this repair count?

    A repair counts when all of these hold:

    1. its held-out-failure accuracy is above the mean of ``random-K`` (by more than float
       noise, ``EPS``) (the same treatment
       with as many random causes): the diagnosis, not the removal of K examples, repairs;
    2. its test accuracy is at least ``max(original, finetune-only) - tolerance`` (0.2
       points): it does not buy failures with accuracy that the treatment alone keeps;
    3. no class's test accuracy falls by more than ``max_class_drop`` (10 points) below the
       better of original and finetune-only on that class: held-out failures of class A
       that rise because the model now predicts A for most of class B are a collapse, not a
       repair, even when the overall test accuracy hides it (a small class, or gains on the
       other classes). Checked when ``class_acc`` is measured.

    Args:
        pipeline: the pipeline's figures (``heldout_failure_acc``, ``test_acc`` and,
            optionally, ``class_acc`` ``[C]``).
        controls: its :class:`Controls` (random-K and, if run, finetune-only).
        tolerance, max_class_drop: the thresholds above, as fractions.

    Returns:
        A :class:`Verdict`.
    """
    if not controls.random_k:
        raise ValueError("the Pareto criterion needs the random-K control: run it first")
    reasons = []
    heldout_gain = (
        float(pipeline["heldout_failure_acc"]) - controls.random_k_mean("heldout_failure_acc")[0]
    )
    heldout_gain = 0.0 if abs(heldout_gain) < EPS else heldout_gain  # rounding, not a gain
    if not heldout_gain > EPS:
        reasons.append(f"held-out failures {100 * heldout_gain:+.2f} points vs random-K")
    refs = [controls.original] + ([controls.finetune_only] if controls.finetune_only else [])
    floor = max(float(r["test_acc"]) for r in refs) - tolerance
    if float(pipeline["test_acc"]) < floor - EPS:
        ours_pct, floor_pct = _distinct(100 * float(pipeline["test_acc"]), 100 * floor)
        reasons.append(
            f"test accuracy {ours_pct}% below the floor {floor_pct}% (max of original and "
            f"finetune-only, minus {100 * tolerance:.1f} points)"
        )
    worst, worst_class = math.nan, None
    ours = pipeline.get("class_acc")
    ref_rows = [r.get("class_acc") for r in refs]
    if ours is not None and all(r is not None for r in ref_rows):
        with warnings.catch_warnings():  # a class the test set lacks: NaN, no warning
            warnings.simplefilter("ignore", RuntimeWarning)
            best = np.nanmax(np.asarray(ref_rows, dtype=np.float64), axis=0)
        drop = best - np.asarray(ours, dtype=np.float64)
        if np.isfinite(drop).any():
            worst_class = int(np.nanargmax(drop))
            worst = float(drop[worst_class])
            if worst > max_class_drop:
                reasons.append(
                    f"class {worst_class} lost {100 * worst:.1f} points of test accuracy "
                    f"(more than {100 * max_class_drop:.0f})"
                )
    return Verdict(not reasons, heldout_gain, floor, worst, worst_class, tuple(reasons))


def oracles_of_k(
    ctl: Controls,
    oracle_at_k: Mapping[str, Any],
    truth: np.ndarray,
    scores: np.ndarray | torch.Tensor,
    treat: TreatFn,
    measure: Measure,
    causes: bool = True,
) -> dict[str, dict[str, Any]]:
    """The two oracles of the pipeline's own K, each with its gain over ``ctl``'s random-K.

    ``oracle-at-K`` was run by :func:`run_controls` (it depends on K alone, so pipelines of
    one K share it); ``oracle-ranked`` is run here, since it depends on the pipeline's scores.

    Args:
        ctl: the pipeline's controls (its K and random-K draws).
        oracle_at_k: ``ctl``'s ``oracle-at-K`` figures (with their ``causes``).
        truth: ground-truth corrupted training indices.
        scores: ``[N]`` the pipeline's cause scores (:func:`truth_ranked`).
        treat, measure: as for :func:`run_controls`.
        causes: keep each oracle's cause indices in its record.

    Returns:
        ``{"oracle_at_k": {...}, "oracle_ranked": {...}}``: figures, ``causes`` (if asked
        for) and ``gain`` (:func:`diagnosis_gain`).
    """
    ranked = truth_ranked(truth, scores, ctl.k)
    rows = {"oracle_at_k": dict(oracle_at_k), "oracle_ranked": {**measure(treat(ranked))}}
    rows["oracle_ranked"]["causes"] = ranked
    out = {}
    for name, fig in rows.items():
        kept = _public(fig) if causes else {n: v for n, v in fig.items() if n != "causes"}
        out[name] = {**kept, "gain": diagnosis_gain(fig, ctl)}
    return out


def _distinct(a: float, b: float) -> tuple[str, str]:
    """``a`` and ``b`` with the fewest decimals (2 to 6) that tell them apart: at two, a
    verdict once read "96.38% below the floor 96.38%"."""
    for d in range(2, 7):
        x, y = f"{a:.{d}f}", f"{b:.{d}f}"
        if x != y:
            break
    return x, y


def class_share(causes: np.ndarray, labels: np.ndarray | torch.Tensor) -> dict[int, float]:
    """Share of each class's training examples that ``causes`` hold, ``{class: share}``."""
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    y = y.astype(np.int64)
    total = np.bincount(y)
    picked = np.bincount(y[np.asarray(causes, dtype=np.int64)], minlength=total.size)
    return {int(c): float(picked[c] / total[c]) for c in np.flatnonzero(total)}


__all__ = [
    "Controls",
    "MAX_CLASS_DROP",
    "TEST_TOLERANCE",
    "Verdict",
    "class_accuracies",
    "class_share",
    "diagnosis_gain",
    "mean_se",
    "random_causes",
    "repaired",
    "run_controls",
]
