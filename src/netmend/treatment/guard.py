"""The class guard: back off the automatic K before a fine-tune forgets a class.

A fine-tune on D ∖ C follows the data it is given. When the causes are imprecise and one-sided
(issue 11's converged ``fashion-full/pair`` test suite, seed 0: 2,008 causes at precision 0.45
between T-shirts and shirts, classes that 40% label noise already mixes) removing them moves
the decision boundary through a whole class: class 0 lost 52 points of test accuracy while
the held-out failures rose. The user cannot see that without a test set, and the repair
should not hand over such a model.

The guard sees it with the training data alone. A stratified slice V of the training set
(:data:`HOLDOUT_SHARE` of each class) is held out of the fine-tune, and the candidate repair
(the same treatment call on ``causes[:K] ∪ V``) is measured on V with V's own labels, noisy
as they may be, class by class, against the original model. If some class's accuracy falls by
more than :data:`MAX_CLASS_DROP` (the Pareto criterion's class limit), K is halved, up to
:data:`MAX_HALVINGS` times. On that suite (``benchmarks/guard_explore.json``) the drop on V
tracks the drop on the test set: 38 / 17 / 9 / 4 points on V against 47 / 18 / 6 / 2 on the
test set for K = 2,008 / 1,004 / 502 / 0.

The slice's own labels dilute a class's fall when they are noisy: on that suite's seed 3 the
gated 1,789 causes cost T-shirts 13.1 test points while V, 40% of whose T-shirt labels point
elsewhere, saw 7.1 (``benchmarks/guard_explore_gate_s3.json``). So the guard reads V a second
way, against the original model's predictions rather than the labels: of the slice examples
the original calls class c, the share the candidate no longer calls c (the
**agreement drop**). A fine-tune moves unsure examples even with nothing removed (on seed 0,
11 points of shirts for the fine-tune of D ∖ V alone), so that reading is measured against
the same trial with no causes removed (``causes = V`` only: the **churn**), computed once and
only when it can matter (some class's agreement drop exceeds the limit while the label
reading passes). A class fails when either reading falls by more than the limit:
label drop > limit, or agreement drop − churn > limit.

How close the readings come (``benchmarks/guard_calibration.json``: ``fashion-full/pair``
with a 5% validation split, seeds 0-3, every trial also read on the test set): within 2.1
points of the test set's reading of the trial model on average (signed −0.1), so no bias from
V being memorised training data shows on the default's removals. (A balanced removal of
1,888 label-error candidates did read 13 points on V where the test set saw 2.8,
``benchmarks/balance_gate_dev/``.) The larger error is that the guard measures one fine-tune
(without V) and the repair returns another (with V): their worst classes differ by up to 5.6
points, and against the model returned the error is 4.0 points.

**With the user's validation data** (``guard_data``: labelled examples the original never
trained on) the guard reads that data instead, the same two ways: the trials are the repair's
own treatment call on ``causes[:K]`` (no slice is held out), the churn trial is the
finetune-only repair (no causes), and the accepted trial *is* the repaired model
(:attr:`GuardRecord.model`). So the model handed back is the one measured (error 2.4 points
against it in the runs above), and the repair costs one fine-tune fewer. The agreement
reading matters there too: read by its labels alone, a split with 40% noisy T-shirt labels
saw 9.7 points where the test set saw 14.0, and the repairs met the Pareto criterion on 1
seed of 4; with both readings, 3 of 4, as with the default guard.

Classes with fewer than :data:`MIN_PER_CLASS` held-out examples are not judged (their
accuracy moves by more than the limit with a handful of examples); when no class can be
judged, the guard is skipped and warns. The guard only chooses K: without ``guard_data``
the repair then makes its usual treatment call on the chosen causes with V back in the
training set, so its controls are the same call as before (with ``guard_data`` the trial it
returns is that call).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from netmend._warnings import warn
from netmend.data.source import DataSource
from netmend.model.training import class_accuracies_of, predict

HOLDOUT_SHARE = 0.05
"""Share of each class held out of the guard's fine-tunes to measure them."""

MIN_PER_CLASS = 50
"""A class is judged only with at least this many held-out examples (a 10-point drop is then
at least 5 examples, and about 3 standard errors for an 80%-accurate class)."""

MAX_CLASS_DROP = 0.10
"""The largest fall of a class's held-out accuracy the guard accepts (as a fraction); the
same limit as :data:`netmend.evaluation.controls.MAX_CLASS_DROP`."""

MAX_HALVINGS = 3
"""K, K/2, K/4 and K/8 are tried; if all fail, the smallest is kept, with a warning."""


@dataclass
class GuardRecord:
    """What the guard did (``RepairResult.treatment_info["guard"]``).

    Attributes:
        k_start: the automatic K it started from.
        k: the K it chose.
        tries: per K tried, ``{"k", "worst_class", "worst_class_drop", "label_drop",
            "agree_drop", "agree_raw_drop"}``: drops as fractions on the held-out slice, the
            worst class's decisive drop (the larger of the two readings), and the largest
            class drop by the slice's labels, by agreement with the original's predictions
            less the churn (0 where the churn was not needed; see the module docstring) and
            by agreement alone.
        churn: per judged class, the agreement drop of the trial with no causes removed, or
            ``None`` if it was not needed.
        holdout: the number of examples measured (the held-out slice, or ``guard_data``).
        judged_classes: the classes measured.
        passed: whether the chosen K met the limit (``False`` after every halving failed).
        skipped: why the guard did not run, if it did not.
        source: what the guard measured: ``"training slice"`` (a slice held out of the trial
            fine-tunes) or ``"guard_data"`` (the user's validation data).
        readings: how a class's fall is read (both sources read both; see the module
            docstring).
        model: with ``guard_data``, the trial model at the chosen K: the repair's own
            treatment call on ``causes[:k]``, which the repair returns rather than training
            it again; ``None`` otherwise. Not part of :meth:`as_dict`.
    """

    k_start: int
    k: int
    tries: list[dict[str, Any]] = field(default_factory=list)
    churn: list[float] | None = None
    holdout: int = 0
    judged_classes: list[int] = field(default_factory=list)
    passed: bool = True
    skipped: str | None = None
    source: str = "training slice"
    readings: tuple[str, ...] = ("labels", "agreement net of churn")
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """The record as plain data (JSON-ready), without :attr:`model`."""
        return {
            f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "model"
        }


UNCHECKED_SHARE = 0.1
"""A guard that cannot run warns when the causes hold at least this share of one class (a
removal that small cannot empty a class: K = 15 of the digits' 1,348 examples is not said)."""


def resolve_guard(guard: bool | None, with_data: bool, auto_k: bool, treat: str) -> bool:
    """Whether the class guard runs, as :func:`netmend.repair` and the continual
    :class:`netmend.Repairer` decide it: ``guard`` if given, else on with ``guard_data``
    (``with_data``) or with the automatic K (``auto_k``) and the "finetune" treatment.

    Raises:
        TypeError: ``guard`` is not a bool or None.
        ValueError: ``guard_data`` with ``guard=False``, or a guard with another treatment.
    """
    if guard is not None and not isinstance(guard, (bool, np.bool_)):  # "no" is truthy
        raise TypeError(f"guard must be True, False or None (the default); got {guard!r}")
    guard = None if guard is None else bool(guard)
    if with_data and guard is False:
        raise ValueError("guard_data is read only by the class guard: drop it or pass guard=True")
    if guard is None:
        guard = with_data or (auto_k and treat == "finetune")
    if guard and treat != "finetune":
        raise ValueError(
            f"the class guard works with the 'finetune' treatment, not {treat!r}: pass "
            "guard=False (and no guard_data)"
        )
    return guard


def holdout_slice(
    labels: torch.Tensor,
    seed: int,
    share: float = HOLDOUT_SHARE,
    min_per_class: int = MIN_PER_CLASS,
) -> tuple[np.ndarray, list[int]]:
    """A stratified random slice of the training set, from the classes large enough to judge.

    Args:
        labels: ``[N]`` training labels.
        seed: seeds the draw (a local generator; the global RNG is untouched).
        share: share of each class drawn. min_per_class: classes whose share is smaller are
            left out (and not judged).

    Returns:
        ``(indices, classes)``: sorted int64 training indices ``[V]`` and the judged classes.
    """
    y = labels.cpu().numpy()
    rng = np.random.default_rng([seed, 0x6A4D])
    picked, classes = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        m = int(round(share * idx.size))
        if m >= min_per_class:
            picked.append(rng.choice(idx, m, replace=False))
            classes.append(int(c))
    out = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
    return out.astype(np.int64), classes


def guard_k(
    treat_fn: Callable[[np.ndarray], nn.Module],
    model: nn.Module,
    train: DataSource,
    causes: np.ndarray,
    seed: int,
    device: torch.device | str,
    max_class_drop: float = MAX_CLASS_DROP,
    max_halvings: int = MAX_HALVINGS,
    guard_data: DataSource | None = None,
    shrink: float = 0.5,
) -> GuardRecord:
    """Choose how many of ``causes`` (most harmful first) a fine-tune may remove.

    Args:
        treat_fn: the repair's treatment call as a function of the causes (the guard passes
            ``causes[:K] ∪ V``, or ``causes[:K]`` with ``guard_data``).
        model: the original model (not modified).
        train: the training set.
        causes: the automatic causes, most harmful first ``[K]``.
        seed: seeds the held-out slice.
        device: where to measure.
        max_class_drop, max_halvings: see :data:`MAX_CLASS_DROP`, :data:`MAX_HALVINGS`.
        guard_data: labelled examples the original never trained on (a validation split); if
            given, the guard measures the trials there, by the labels, instead of on a slice
            held out of the training set, and keeps the accepted trial as ``record.model``
            (see the module docstring). Classes with fewer than :data:`MIN_PER_CLASS` of its
            examples are not judged.
        shrink: each K tried is the first times ``shrink`` to the power of the step (0.5:
            halving, the default); the steps reach the same smallest K,
            ``k0 * 0.5 ** max_halvings`` (e.g. 0.71: six steps instead of three; dev runs only,
            ``benchmarks/README.md``).

    Returns:
        A :class:`GuardRecord`; ``record.k`` is the K to use. Warns when every halving failed.
    """
    causes = np.asarray(causes, dtype=np.int64)
    k0 = int(causes.size)
    if k0 == 0:
        return GuardRecord(k0, k0, skipped="no causes")
    if guard_data is None:
        val, classes = holdout_slice(train.labels, seed)
        if not classes:
            why = f"no class has {MIN_PER_CLASS} examples in a {HOLDOUT_SHARE:.0%} slice"
            ylab = train.labels.cpu().numpy().astype(np.int64)
            share = np.bincount(ylab[causes], minlength=ylab.max() + 1) / np.maximum(
                np.bincount(ylab), 1
            )
            if share.max() >= UNCHECKED_SHARE:  # said: a trial's class fell 20 points, silently
                c = int(share.argmax())
                warn(
                    f"the class guard did not run: {why} of the {len(train)} training "
                    f"examples, so removing K = {k0} causes ({share[c]:.0%} of class {c}) was "
                    "not checked for a class it empties; pass guard_data (a labelled "
                    f"validation split with at least {MIN_PER_CLASS} examples of each class)"
                )
            return GuardRecord(k0, k0, skipped=why)
        held = train[torch.from_numpy(val)]
        n_classes = int(train.labels.max()) + 1
    else:
        val = np.zeros(0, np.int64)
        counts = np.bincount(guard_data.labels.cpu().numpy(), minlength=1)
        classes = [int(c) for c in np.flatnonzero(counts >= MIN_PER_CLASS)]
        if not classes:
            why = f"no class has {MIN_PER_CLASS} examples in guard_data"
            warn(
                f"the class guard did not run: {why}, so K = {k0} was not checked; pass a "
                f"validation split with at least {MIN_PER_CLASS} examples of each class"
            )
            return GuardRecord(k0, k0, skipped=why, source="guard_data")
        held = guard_data
        n_classes = max(int(train.labels.max()), int(guard_data.labels.max())) + 1
    labels = held.labels.cpu()
    judged = np.asarray(classes)

    def readings(m: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        """Per judged class: accuracy with the slice's labels, and the predictions ``[V]``."""
        pred = predict(m, held, device)
        acc = np.asarray(class_accuracies_of(pred, labels, n_classes))[judged]
        return acc, pred.numpy()

    before, original = readings(model)
    called = torch.from_numpy(original)  # the original's predictions, read as the labels

    def agree_drop(pred: np.ndarray) -> np.ndarray:
        """Per judged class: share of what the original calls c that ``pred`` does not (0 for
        a class the original calls nothing)."""
        agree = class_accuracies_of(torch.from_numpy(pred), called, n_classes)
        return np.nan_to_num(1.0 - np.asarray(agree)[judged], nan=0.0)

    record = GuardRecord(
        k0,
        k0,
        holdout=len(held),
        judged_classes=classes,
        passed=False,
        source="training slice" if guard_data is None else "guard_data",
    )
    churn: np.ndarray | None = None
    k = k0
    if not 0.0 < shrink < 1.0:
        raise ValueError(f"shrink is a factor in (0, 1), not {shrink}")
    steps = round(max_halvings * math.log(0.5) / math.log(shrink))  # 0 halvings: K only
    for step in range(steps + 1):
        if step:
            k = max(1, int(k0 * shrink**step))
        trial = treat_fn(np.union1d(causes[:k], val) if guard_data is None else causes[:k])
        acc, pred = readings(trial)
        label = before - acc
        raw = agree_drop(pred)
        agree = np.zeros_like(raw)
        if label.max() <= max_class_drop and raw.max() > max_class_drop:
            if churn is None:  # the same trial with no causes removed, once (V: empty with
                # guard_data, where it is the finetune-only repair)
                churn = agree_drop(readings(treat_fn(val))[1])
                record.churn = [float(v) for v in churn]
            agree = raw - churn
        drops = np.maximum(label, agree)
        worst = int(np.argmax(drops))
        record.tries.append(
            {
                "k": k,
                "worst_class": classes[worst],
                "worst_class_drop": float(drops[worst]),
                "label_drop": float(label.max()),
                "agree_drop": float(agree.max()),
                "agree_raw_drop": float(raw.max()),
            }
        )
        record.k = k
        if guard_data is not None:
            record.model = trial  # the repair at this K: kept, not trained again
        if drops[worst] <= max_class_drop:
            record.passed = True
            break
        if k == 1:
            break
    if not record.passed:
        where = "held-out training data" if guard_data is None else "guard_data"
        warn(
            f"the class guard halved K from {k0} to {record.k} and a class still lost "
            f"{100 * record.tries[-1]['worst_class_drop']:.0f} points on {where}: "
            "check the repaired model per class before using it",
        )
    return record
