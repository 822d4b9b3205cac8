"""The benchmark matrix behind ``netmend bench``: corruption suites x repair pipelines.

A **suite** is ``(dataset, corruption, seed)``. For each suite the harness corrupts the
training set (:mod:`netmend.lab.corrupt`, which returns the ground-truth mask), trains the
dataset's model recipe on it, takes the test examples the model gets wrong as the failures,
and splits them into a query half (the only part any pipeline sees) and a held-out half
(:func:`netmend.evaluation.split_failures`).

A **pipeline** is an ``"identify/treat"`` pair of registered method names, looked up in
:mod:`netmend.identification` and :mod:`netmend.treatment`: a name that is not registered, or a
step option neither the method nor the bench reads, is refused when the :class:`BenchConfig` is
built (:func:`check_pipeline`), before any suite runs. Five **references** sit beside them:
``original`` (the model as trained), ``retrain-clean`` (the same recipe on the uncorrupted
training set), ``oracle-causes`` (fine-tuning without exactly the masked examples: the
treatment with perfect identification), ``finetune-only`` (the same fine-tune with nothing
removed: what further training alone repairs, which is much on an underfitted model) and
``cleanlab`` (the confident-learning peer: cross-validated predicted probabilities,
``cleanlab.filter.find_label_issues``, then the issues removed by fine-tuning, see
:func:`cleanlab_issues`).

Per cell: held-out-failure, query-failure, test and originally-correct accuracy; the
identification's precision, recall and AUROC against the mask, its K, a precision-recall curve
of its scores; and the seconds taken. :func:`run` returns it all as one JSON-ready dict;
:func:`markdown` and :func:`plots` render it.

Scores follow netmend's convention everywhere: **positive = harmful**.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from netmend import api, identification, treatment
from netmend._version import __version__
from netmend.data.checks import resolve_device
from netmend.data.source import as_source
from netmend.evaluation import FailureSplit, identification_metrics, split_failures
from netmend.evaluation.controls import (
    EPS,
    MAX_CLASS_DROP,
    MIN_DRAWS,
    Controls,
    TreatFn,
    class_accuracies,
    diagnosis_gain,
    mean_se,
    oracles_of_k,
    run_controls,
)
from netmend.evaluation.controls import repaired as repaired_verdict
from netmend.lab.corrupt import (
    FASHION_PAIRS,
    PAPER_PAIRS,
    Corruption,
    apply_trigger,
    backdoor,
    cifar10n_flips,
    noisy_inputs,
    outliers,
    pair_flips,
    selection_bias,
    subgroup_mask,
    symmetric_flips,
)
from netmend.lab.datasets import Split, load_digits, load_fashion_mnist, load_mnist
from netmend.lab.models import MLP, SmallCNN
from netmend.model.training import TrainConfig, fit, logits, predict
from netmend.store import finite_or_none
from netmend.treatment.guard import guard_k, holdout_slice
from netmend.treatment.methods import finetune_recipe

log = logging.getLogger(__name__)

CLEANLAB_INSTALL = "pip install cleanlab==2.9.0"
NUM_CLASSES = 10
REFERENCES = ("original", "retrain-clean", "oracle-causes", "finetune-only", "cleanlab")
FAILURE_BLIND = ("loss", "random")
"""Methods that ignore the failures: they get the K chosen by ``ewc`` on the same suite."""

DEFAULT_PIPELINES: tuple[str, ...] = (
    "ewc/finetune",
    "ewc/newton",
    "ewc/relabel",
    "ewc/align",
    "linear/finetune",
    "influence/finetune",
    "ekfac/finetune",
    "trak/finetune",
    "tracin/finetune",
    "grad_dot/finetune",
    "knn_shapley/finetune",
    "knn_shapley/relabel",
    "knn_shapley[embed=input]/finetune",
    "knn_shapley[embed=input]/relabel",
    "tmc_shapley/finetune",
    "banzhaf/finetune",
    "loss/finetune",
    "random/finetune",
)
QUICK_PIPELINES: tuple[str, ...] = ("ewc/finetune", "loss/finetune")
QUICK_SUITES: tuple[str, ...] = ("digits/sym20", "digits/pair", "digits/backdoor")


# --- datasets and model recipes ------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """A data set and the model recipe trained on it.

    Attributes:
        load: returns ``(train, test)`` :class:`Split` s.
        model: builds a fresh, untrained model.
        recipe: how the model is trained (also the ``retrain`` and reference recipe).
        train_size, test_size: random subsets used (``None`` = all).
        subgroup_class: the class whose thinner half the ``subgroup`` suite under-represents:
            the one where that bias adds the most test errors on the subgroup
            (``benchmarks/subgroup_classes.py``). For most classes it adds none: the model
            still classifies the thin members from the thick ones.
        pairs: the class pairs of the ``pair`` corruption and their flip probabilities.
    """

    load: Callable[[], tuple[Split, Split]]
    model: Callable[[], nn.Module]
    recipe: TrainConfig
    train_size: int | None = None
    test_size: int | None = None
    subgroup_class: int = 3
    pairs: Mapping[tuple[int, int], float] = field(default_factory=lambda: dict(PAPER_PAIRS))


CONVERGED = TrainConfig(epochs=6, average_tail=0.5)
"""The demo's recipe: Adam at a constant rate for 6 epochs, parameters averaged over the second
half of the steps. On 50,000 noisy MNIST training images, two more epochs add 0.08 points of
validation accuracy (``benchmarks/demo_convergence.json``)."""

CONVERGED_FASHION = TrainConfig(epochs=12, average_tail=0.5)
"""The same recipe, longer: Fashion-MNIST with its pair flips converges more slowly
(``benchmarks/fashion_convergence.json``, 50,000/10,000 split of the noisy training set:
validation accuracy on the noisy labels 75.5 / 77.7 / 78.9 / 79.3 / 79.5% after 2 / 4 / 6 / 9
/ 12 epochs; the last three epochs add 0.21 points, half the 0.41-point standard error of the
10k validation accuracy)."""

DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        load_digits, lambda: MLP(64, NUM_CLASSES), TrainConfig(epochs=40), subgroup_class=8
    ),
    "mnist": DatasetSpec(load_mnist, SmallCNN, TrainConfig(epochs=3), 4000, 2000, 5),
    "fashion": DatasetSpec(load_fashion_mnist, SmallCNN, TrainConfig(epochs=3), 4000, 2000, 4),
    "mnist-full": DatasetSpec(load_mnist, SmallCNN, CONVERGED, None, None, 5),
    "fashion-full": DatasetSpec(
        load_fashion_mnist, SmallCNN, CONVERGED_FASHION, None, None, 4, dict(FASHION_PAIRS)
    ),
}
"""``digits``, ``mnist`` and ``fashion`` are the dev suites. They fit a shared two-core CPU (a
3-seed matrix of five MNIST suites with four pipelines, the references and 3-fold cleanlab is
about 20 CPU-minutes). The CNN recipes (3 epochs of 4,000 images, 94 Adam steps) underfit:
with 20% label noise MNIST reaches about 90% test accuracy and Fashion-MNIST about 70%, so
their failures are partly the model's own, and any fine-tune also trains the model further.

``mnist-full`` and ``fashion-full`` are issue 11's converged test suites: all 60,000 training
and 10,000 test images, converged recipes (:data:`CONVERGED`, :data:`CONVERGED_FASHION`), and
on Fashion-MNIST a ``pair`` corruption between classes that look alike
(:data:`FASHION_PAIRS`; the small ``fashion`` suite keeps the paper's MNIST pairs, as its
earlier results used). A suite and seed with two pipelines and 3-fold cleanlab takes 10-20
minutes on this 2-core CPU."""

ADAPTED = ("relabel", "align")
"""Treatments that fine-tune inside (:mod:`netmend.treatment.adapted`). Unless
``treat_options`` sizes them, the harness gives their fine-tune the ``finetune`` treatment's
default length and rate (:func:`netmend.treatment.methods.finetune_recipe` on the whole
training set), so that the treatments differ in what they train on, not for how long."""


def _subset(s: Split, n: int | None, seed: int) -> Split:
    if n is None or n >= len(s):
        return s
    idx = torch.randperm(len(s), generator=torch.Generator().manual_seed(seed))[:n]
    return Split(s.X[idx], s.y[idx])


# --- corruption suites ---------------------------------------------------------------------------

BACKDOOR_TARGET = 0
SUBGROUP_KEEP = 0.1


def _patch_side(X: torch.Tensor) -> int:
    side = int(round(X[0].numel() ** 0.5)) if X.ndim == 2 else int(X.shape[-1])
    return max(2, side // 8)


CORRUPTIONS: dict[str, Callable[[Split, int, DatasetSpec], Corruption]] = {
    "sym20": lambda s, seed, _: symmetric_flips(s.y, 0.2, NUM_CLASSES, seed),
    "sym40": lambda s, seed, _: symmetric_flips(s.y, 0.4, NUM_CLASSES, seed),
    "pair": lambda s, seed, spec: pair_flips(s.y, spec.pairs, seed),
    "cifar10n-random1": lambda s, seed, _: cifar10n_flips(s.y, "random1", seed),
    "cifar10n-worst": lambda s, seed, _: cifar10n_flips(s.y, "worst", seed),
    "noisy-inputs": lambda s, seed, _: noisy_inputs(s.X, s.y, 0.2, seed, "noise", 0.5),
    "occlusion": lambda s, seed, _: noisy_inputs(s.X, s.y, 0.2, seed, "occlusion", 0.5),
    "outliers": lambda s, seed, _: outliers(s.X, s.y, 0.1, NUM_CLASSES, seed),
    "subgroup": lambda s, seed, spec: selection_bias(
        s.X, s.y, spec.subgroup_class, SUBGROUP_KEEP, seed
    ),
    "backdoor": lambda s, seed, _: backdoor(
        s.X, s.y, BACKDOOR_TARGET, 0.05, seed, patch=_patch_side(s.X)
    ),
}
"""What each corruption does to a training split, given the seed and the data set's
:class:`DatasetSpec` (all seeded; the mask is the ground truth):

* ``sym20``/``sym40``: 20%/40% of labels flipped to a uniformly drawn other class.
* ``pair``: the paper's pair flips, 1<->7 with p=0.4 and 6<->9 with p=0.3.
* ``cifar10n-random1``/``cifar10n-worst``: labels redrawn from CIFAR-10N's human
  class-transition matrix (one annotator, ~17% noise; worst of three, ~40%).
* ``noisy-inputs``: 20% of inputs get heavy Gaussian noise (sd = half the value range); labels kept.
* ``occlusion``: 20% of inputs get a white square over half the image side; labels kept.
* ``outliers``: 10% of examples replaced by feature-permuted inputs with random labels.
* ``subgroup``: the thinner half (ink below the class median) of the data set's
  ``subgroup_class`` loses 90% of its examples; the mask marks the subgroup's remaining
  members (the examples a repair needs, not causes). The failures are the test members of
  the subgroup that the model gets wrong: most test errors have nothing to do with the bias
  (with class 3, 24 of 25 on digits, 365 of 409 on MNIST; ``benchmarks/subgroup_classes.json``),
  so failures drawn from the whole test set would measure little about it.
* ``backdoor``: BadNets, 5% of the training set stamped with a corner patch and relabelled 0;
  the failures are triggered test images of the other classes (true labels kept).
"""


NOT_CAUSES = (
    "the subgroup suite's mask marks the subgroup's remaining members, which are not causes "
    "(removing them is no oracle, and precision against them measures nothing)"
)


def masks_causes(suite: str) -> bool:
    """Whether a suite's corruption mask is a set of causes (the flipped, noisy, poisoned or
    outlying examples): not for ``subgroup``, whose mask marks the under-represented members
    left in the training set, which a repair should keep."""
    return not suite.endswith("/subgroup")


@dataclass
class SuiteData:
    """One suite's data, model-independent.

    Attributes:
        name: ``dataset/corruption``; seed: the seed of everything in it.
        train: the corrupted training set ``[N, ...]``; clean: the uncorrupted one (the
            ``retrain-clean`` reference trains on it; its size may differ from ``N``).
        mask: bool ``[N]``: ground truth of the corruption on ``train``.
        test: the clean test set (``test_acc``).
        eval: where failures are looked for (the test set, plus triggered test images for
            the backdoor); pool: bool ``[len(eval)]``: which of them may count as failures
            (the triggered images for the backdoor, the subgroup's test members for
            ``subgroup``, else all).
        info: the corruption's info.
    """

    name: str
    seed: int
    train: Split
    clean: Split
    mask: np.ndarray
    test: Split
    eval: Split
    pool: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def parse_suite(name: str) -> tuple[str, str]:
    """``"dataset/corruption"`` -> ``(dataset, corruption)``, checked against the registries."""
    parts = name.split("/")
    if len(parts) != 2 or parts[0] not in DATASETS or parts[1] not in CORRUPTIONS:
        raise ValueError(
            f"unknown suite {name!r}: write DATASET/CORRUPTION with DATASET in "
            f"{sorted(DATASETS)} and CORRUPTION in {sorted(CORRUPTIONS)}"
        )
    return parts[0], parts[1]


def expand_suites(names: Sequence[str]) -> list[str]:
    """Expand a bare dataset name (``"digits"``) to all its suites; check the others."""
    out: list[str] = []
    for name in names:
        if name in DATASETS:
            out += [f"{name}/{c}" for c in CORRUPTIONS]
        else:
            parse_suite(name)
            out.append(name)
    return out


def make_suite(name: str, seed: int = 0) -> SuiteData:
    """Load, subset and corrupt the data of suite ``name`` (``"dataset/corruption"``)."""
    dataset, corruption = parse_suite(name)
    spec = DATASETS[dataset]
    train, test = spec.load()
    train = _subset(train, spec.train_size, seed)
    test = _subset(test, spec.test_size, seed + 1)
    c = CORRUPTIONS[corruption](train, seed, spec)
    X = c.inputs if c.inputs is not None else train.X
    eval_set, pool = test, np.ones(len(test), dtype=bool)
    if corruption == "subgroup":
        pool = subgroup_mask(test.X, test.y, c.info).numpy()
    if corruption == "backdoor":
        others = test.y != c.info["target"]
        triggered = apply_trigger(test.X[others], c.info["patch"], c.info["value"])
        eval_set = Split(torch.cat([test.X, triggered]), torch.cat([test.y, test.y[others]]))
        pool = np.r_[np.zeros(len(test), dtype=bool), np.ones(int(others.sum()), dtype=bool)]
    return SuiteData(
        name, seed, Split(X, c.labels), train, c.mask.numpy(), test, eval_set, pool, dict(c.info)
    )


def hold_out_validation(data: SuiteData, share: float) -> tuple[SuiteData, Split]:
    """Split a stratified validation set off a suite's (corrupted) training set.

    ``share`` of each class by the noisy labels (rounded, at least one example of a class that
    has two) is drawn with the suite's seed and removed from ``train``, ``mask`` and, when it
    is aligned with ``train`` (same size), ``clean``; the inputs and noisy labels drawn are the
    validation set, as a user's own split of their labelled data would be.

    Returns:
        ``(data without the validation set, the validation set)``.
    """
    y = data.train.y.numpy()
    rng = np.random.default_rng([data.seed, 0x7A11])
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        m = min(int(round(share * idx.size)), idx.size - 1)
        if m > 0:
            held.append(rng.choice(idx, m, replace=False))
    out = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    keep = np.setdiff1d(np.arange(y.size), out)
    val = Split(data.train.X[out], data.train.y[out])
    kept = dataclasses.replace(
        data,
        train=Split(data.train.X[keep], data.train.y[keep]),
        mask=data.mask[keep],
        clean=Split(data.clean.X[keep], data.clean.y[keep])
        if len(data.clean) == y.size
        else data.clean,
        info={**data.info, "validation": int(out.size)},
    )
    return kept, val


def _trial_readings(
    calls: list[tuple[np.ndarray, list[float]]], g: Any, labels: torch.Tensor, seed: int
) -> list[list[float]]:
    """The test-set class accuracies of the guard's trials, one per ``g.tries`` entry (the
    churn trial, the call that removes no causes, is dropped: the slice alone for the
    training-slice guard, nothing with ``guard_data``)."""
    churn = np.zeros(0, np.int64) if g.source == "guard_data" else holdout_slice(labels, seed)[0]
    return [acc for c, acc in calls if not np.array_equal(c, churn)]


def _split(model: nn.Module, data: SuiteData, device: torch.device) -> FailureSplit:
    """Failures = errors among ``data.pool``; correct = every eval example the model gets right."""
    pool = np.flatnonzero(data.pool)
    Xp, yp = data.eval.X[pool], data.eval.y[pool]
    s = split_failures(model, Xp, yp, seed=data.seed, device=device)
    correct = np.flatnonzero((predict(model, data.eval.X, device) == data.eval.y).numpy())
    return FailureSplit(pool[s.query], pool[s.heldout], correct)


def suite_accuracies(
    model: nn.Module, data: SuiteData, split: FailureSplit, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """``test_acc`` on the clean test set; query/held-out failure and correct-set accuracy on
    ``data.eval``."""
    ok = (predict(model, data.eval.X, device) == data.eval.y).numpy()
    test_ok = (predict(model, data.test.X, device) == data.test.y).numpy()
    return {
        "test_acc": float(test_ok.mean()),
        "query_failure_acc": float(ok[split.query].mean()),
        "heldout_failure_acc": float(ok[split.heldout].mean()),
        "correct_acc": float(ok[split.correct].mean()),
    }


# --- identification quality ----------------------------------------------------------------------


def pr_curve(scores: np.ndarray, mask: np.ndarray, points: int = 40) -> dict[str, list[float]]:
    """Precision and recall of the top-K by score (positive = harmful) on a grid of K.

    Returns:
        ``{"k": [...], "precision": [...], "recall": [...]}`` at ``points`` K values spread
        geometrically over ``1..N`` (always including ``N`` and the true number corrupted).
    """
    n, n_bad = mask.size, int(mask.sum())
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.cumsum(mask[order])
    ks = np.unique(np.r_[np.geomspace(1, n, points).round().astype(np.int64), n_bad, n])
    ks = ks[(ks >= 1) & (ks <= n)]
    return {
        "k": ks.astype(int).tolist(),
        "precision": (hits[ks - 1] / ks).tolist(),
        "recall": (hits[ks - 1] / n_bad).tolist() if n_bad else [math.nan] * ks.size,
    }


# --- the cleanlab peer ---------------------------------------------------------------------------


def cross_val_probs(
    make_model: Callable[[], nn.Module],
    X: torch.Tensor,
    y: torch.Tensor,
    recipe: TrainConfig,
    folds: int = 5,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Out-of-fold predicted probabilities ``[N, C]``: K-fold retraining of the same recipe.

    Each fold's rows are predicted by a fresh model (``make_model()``, seeded) trained on the
    other folds (scikit-learn's ``StratifiedKFold``, shuffled with ``seed``).
    """
    from sklearn.model_selection import StratifiedKFold

    labels = y.numpy()
    counts = np.bincount(labels)
    if folds < 2 or counts[counts > 0].min() < folds:
        raise ValueError(
            f"cross-validation with {folds} folds needs >= {folds} examples of every class "
            f"and folds >= 2; the smallest class has {counts[counts > 0].min()}"
        )
    probs: np.ndarray | None = None
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for f, (tr, te) in enumerate(cv.split(np.zeros(len(labels)), labels)):
        torch.manual_seed(seed + f)
        m = fit(make_model(), X[tr], y[tr], recipe, seed + f, device, progress, f"fold {f}")
        p = torch.softmax(logits(m, X[te], device).double(), 1).numpy()
        if probs is None:
            probs = np.zeros((len(labels), p.shape[1]))
        probs[te] = p
    if probs is None:  # unreachable: folds >= 2 always gives a split
        raise RuntimeError("cross-validation produced no folds")
    return probs


def cleanlab_issues(labels: np.ndarray, pred_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Confident learning (Northcutt et al., 2021) through cleanlab.

    Args:
        labels: the (noisy) training labels ``[N]``.
        pred_probs: out-of-fold predicted probabilities ``[N, C]`` (:func:`cross_val_probs`).

    Returns:
        ``(issues, scores)``: the indices cleanlab flags as label issues, most likely first,
        and ``[N]`` scores ``1 - label quality`` (self-confidence), positive = harmful in
        netmend's sense (higher = more likely mislabelled).

    Raises:
        ImportError: cleanlab is not installed (the message names the install command).
    """
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError as exc:
        raise ImportError(
            f"the cleanlab reference needs cleanlab; install it with: {CLEANLAB_INSTALL}"
        ) from exc
    issues = find_label_issues(labels, pred_probs, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(labels, pred_probs, method="self_confidence")
    return np.asarray(issues, dtype=np.int64), 1.0 - np.asarray(quality, dtype=np.float64)


def cleanlab_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("cleanlab") is not None


# --- the harness ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """What to run.

    Attributes:
        suites: ``dataset/corruption`` names (a bare dataset name means all its corruptions).
        pipelines: ``identify/treat`` names; a step may carry options, ``method[opt=value,...]``
            (e.g. ``knn_shapley[embed=input]/relabel[neighbours=20]``, see :func:`parse_step`).
            ``finetune[guard=...]`` runs :func:`netmend.repair`'s class guard first: ``true``
            (as the repair does), ``unbalanced`` (unless the balance or all gate added causes),
            or ``data`` (measured on the ``validation_share`` split, as ``guard_data``); every
            trial is also read on the test set (``guard.trial_test_class_acc``).
        references: any of :data:`REFERENCES`.
        seeds: one suite instance per seed.
        cv_folds: folds of the cleanlab reference's cross-validation.
        treat_options: ``{treatment: {option: value}}`` passed to every use of that treatment
            (pipelines and references alike), e.g. ``{"finetune": {"epochs": 4}}``.
        draws: random-K draws per pipeline (>= 3; 0 runs no controls). Every pipeline cell
            carries its controls (:mod:`netmend.evaluation.controls`): the same treatment call
            with no causes (``finetune_only``) and with K random causes (``random_k``), the
            diagnosis ``gain`` over random-K and the Pareto ``verdict``. Where the
            ``oracle-causes`` reference runs, the controls also hold ``oracle_at_k`` (the
            same call without K random members of the corrupted set) and ``oracle_ranked``
            (without the K members the pipeline's scores rank highest), each with its gain
            over random-K.
        validation_share: if > 0, this share of each (noisy) class of the training set is
            held out of everything (the original's training, identification, treatments,
            controls, references) as the user's validation split, noisy labels and all; the
            ``finetune[guard=data]`` treatment option gives it to the class guard as
            ``guard_data`` (:func:`hold_out_validation`).
    """

    suites: tuple[str, ...] = tuple(f"{d}/{c}" for d in ("digits", "fashion") for c in CORRUPTIONS)
    pipelines: tuple[str, ...] = DEFAULT_PIPELINES
    references: tuple[str, ...] = REFERENCES
    seeds: tuple[int, ...] = (0,)
    cv_folds: int = 5
    treat_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    draws: int = 3
    validation_share: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "suites", tuple(expand_suites(self.suites)))
        for p in self.pipelines:
            check_pipeline(p)
        bad = [r for r in self.references if r not in REFERENCES]
        if bad:
            raise ValueError(f"unknown references {bad}; choose from {REFERENCES}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if self.draws and self.draws < MIN_DRAWS:
            raise ValueError(f"draws must be 0 (no controls) or >= {MIN_DRAWS}")
        if not 0.0 <= self.validation_share < 0.5:
            raise ValueError(
                f"validation_share is a share of each class in [0, 0.5), not "
                f"{self.validation_share}"
            )
        needs = [p for p in self.pipelines if parse_step(parse_pipeline(p)[1])[1].get("guard")
                 == "data"]  # fmt: skip
        if needs and not self.validation_share:
            raise ValueError(
                f"{needs[0]}: guard=data measures on a validation split, and there is none: "
                "pass validation_share (netmend bench --validation-share, e.g. 0.05)"
            )

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """Digits only, one seed, two pipelines: about a minute on two CPU cores."""
        base: dict[str, Any] = dict(suites=QUICK_SUITES, pipelines=QUICK_PIPELINES, seeds=(0,))
        return cls(**{**base, **overrides})


def parse_pipeline(name: str) -> tuple[str, str]:
    """``"identify/treat"`` -> ``(identify, treat)`` steps, each a :func:`parse_step` spec
    (registration is checked at run time)."""
    parts = name.split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(
            f"a pipeline is written IDENTIFY/TREAT (e.g. ewc/finetune, "
            f"knn_shapley[embed=input]/relabel); got {name!r}"
        )
    for part in parts:
        parse_step(part)
    return parts[0], parts[1]


def _option_value(text: str) -> Any:
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_step(spec: str) -> tuple[str, dict[str, Any]]:
    """``"method"`` or ``"method[opt=value,...]"`` -> ``(method, options)``.

    Values are read as ``None``, booleans, integers or floats when they look like one, else
    kept as strings: ``knn_shapley[embed=input,se_z=1]`` -> ``("knn_shapley", {"embed":
    "input", "se_z": 1})``.
    """
    name, bracket, rest = spec.partition("[")
    options: dict[str, Any] = {}
    if bracket:
        if not rest.endswith("]") or not rest[:-1]:
            raise ValueError(f"write options as METHOD[opt=value,...]; got {spec!r}")
        for item in rest[:-1].split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"write options as METHOD[opt=value,...]; got {spec!r}")
            options[key.strip()] = _option_value(value.strip())
    if not name:
        raise ValueError(f"a step needs a method name; got {spec!r}")
    return name, options


BENCH_OPTIONS: dict[str, tuple[str, ...]] = {
    "identify": ("gate",),
    "treat": ("guard", "guard_shrink"),
}
"""Step options the bench itself reads (besides each method's own)."""
GUARD_VALUES: tuple[Any, ...] = (True, False, "unbalanced", "data")
"""The values of ``finetune[guard=...]``."""


def check_pipeline(name: str) -> None:
    """Refuse, before any suite runs, a pipeline whose method or treatment is not registered,
    whose steps carry an option neither the method nor the bench reads, or whose ``guard`` is
    not one of :data:`GUARD_VALUES` (``guard=no`` once read as ``bool("no")``: on).

    Raises:
        ValueError: what is wrong, with the accepted names.
    """
    from netmend.identification.base import check_options as check_identify
    from netmend.treatment.base import check_options as check_treat

    ident_spec, treat_spec = parse_pipeline(name)
    for spec, kind, get, check in (
        (ident_spec, "identify", identification.get, check_identify),
        (treat_spec, "treat", treatment.get, check_treat),
    ):
        method, options = parse_step(spec)
        get(method)  # ValueError: unknown name, with "did you mean"
        if kind == "identify" and "k" in options:
            raise ValueError(
                f"{name}: the bench chooses K by each pipeline's own rule (the automatic K); "
                "'k' is not a step option"
            )
        own = {k: v for k, v in options.items() if k not in BENCH_OPTIONS[kind]}
        try:
            check(method, own)
        except ValueError as exc:
            raise ValueError(
                f"{name}: {exc} The bench also reads: {', '.join(BENCH_OPTIONS[kind])}."
            ) from None
    guard = parse_step(treat_spec)[1].get("guard", False)
    # `in` compares with ==, and 1 == True: a number is refused whatever its value
    if guard not in GUARD_VALUES or isinstance(guard, (int, float)) and not isinstance(guard, bool):
        raise ValueError(f"{name}: guard={guard!r}; write guard=true, false, unbalanced or data")
    if guard and parse_step(treat_spec)[0] != "finetune":  # found after a suite had trained
        raise ValueError(
            f"{name}: the class guard runs with the finetune treatment only; drop guard="
        )


def _treatment_call(
    model: nn.Module,
    noisy: tuple[torch.Tensor, torch.Tensor],
    treat_name: str,
    recipe: TrainConfig,
    ident: api.Identification,
    failures: tuple[torch.Tensor, torch.Tensor],
    common: dict[str, Any],
    options: dict[str, Any],
) -> TreatFn:
    """A pipeline's treatment as a function of the causes: the pipeline and its controls
    make the very same :func:`netmend.treat` call, with only the causes changed."""

    def call(causes: np.ndarray) -> nn.Module:
        return api.treat(
            model,
            noisy,
            causes,
            treat_name,
            train_config=recipe,
            fisher=ident.fisher,
            failures=failures,  # "align"/"relabel" fit theta_+F; others ignore them
            theta_plus_f=ident.info.get("theta_plus_f"),
            allow_no_causes=True,
            **common,
            **options,
        )

    return call


def run_suite(
    data: SuiteData,
    config: BenchConfig,
    device: torch.device,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the suite's model and run every pipeline and reference on it.

    Returns:
        ``{"suite", "seed", "data", "timing", "cells": [...], "_artifacts": {...}}``; each cell
        has ``pipeline``, ``kind`` ("pipeline"/"reference"), ``status`` ("ok", "skipped" with
        a ``reason``, or "error" with the ``error``), accuracies, identification metrics,
        ``pr_curve`` and ``seconds``. ``_artifacts`` (not JSON) holds the models and causes.
    """
    dataset, _ = parse_suite(data.name)
    spec = DATASETS[dataset]
    recipe, seed = spec.recipe, data.seed
    validation = None
    if config.validation_share:
        data, validation = hold_out_validation(data, config.validation_share)
    noisy = (data.train.X, data.train.y)
    timing: dict[str, float] = {}

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = fit(spec.model(), data.train.X, data.train.y, recipe, seed, device, progress, "train")
    timing["train"] = time.perf_counter() - t0
    split = _split(model, data, device)
    Xq, yq = data.eval.X[split.query], data.eval.y[split.query]
    common: dict[str, Any] = dict(seed=seed, device=device, progress=progress)
    idents: dict[str, api.Identification] = {}
    artifacts: dict[str, Any] = {
        "model": model, "split": split, "data": data, "causes": {}, "identifications": {}
    }  # fmt: skip

    def identified(spec: str) -> api.Identification:
        if spec not in idents:
            method, options = parse_step(spec)
            k = len(identified("ewc").causes) if method in FAILURE_BLIND else None
            idents[spec] = api.identify(model, noisy, (Xq, yq), method, k, **common, **options)
        return idents[spec]

    def ident_metrics(scores: np.ndarray, causes: np.ndarray) -> dict[str, Any]:
        m = identification_metrics(scores, causes, data.mask)
        if not masks_causes(data.name):  # no set of causes to score the selection against
            return {**{key: None for key in m}, "k": int(m["k"]), "pr_curve": None}
        return {**m, "k": int(m["k"]), "pr_curve": pr_curve(scores, data.mask)}

    def measure(m: nn.Module) -> dict[str, Any]:
        acc = suite_accuracies(m, data, split, device)
        return {**acc, "class_acc": class_accuracies(m, data.test.X, data.test.y, NUM_CLASSES)}

    # controls are shared between pipelines whose treatment call differs only in the causes:
    # finetune-only per treatment call, random-K per treatment call and K (failure-blind
    # pipelines get ewc's K, so ewc/finetune, loss/finetune and random/finetune share them)
    original_figures = measure(model)
    shared: dict[Any, dict[Any, Any]] = {}
    truth = np.flatnonzero(data.mask)
    # oracle-at-K beside every pipeline's random-K, where the oracle reference runs
    at_k = "oracle-causes" in config.references and truth.size > 0 and masks_causes(data.name)

    def _judge(
        figures: dict[str, Any], treat_fn: TreatFn, key: Any, ident: api.Identification
    ) -> dict[str, Any]:
        k = int(len(ident.causes))
        t = time.perf_counter()
        if key not in shared:
            deletion_step = key[0] in ("newton", "ewc")
            only = original_figures if deletion_step else measure(treat_fn(np.zeros(0, np.int64)))
            shared[key] = {"finetune_only": only}
        if k not in shared[key]:
            ctl = run_controls(
                treat_fn,
                measure,
                model,
                len(data.train),
                k,
                truth=truth if at_k else None,
                draws=config.draws,
                seed=seed,
                finetune_only=False,
                oracle_causes=False,
                oracle_at_k=at_k and k > 0,
            )
            shared[key][k] = (ctl.random_k, ctl.oracle_at_k)
        random_k, oracle = shared[key][k]
        ctl = Controls(k, original_figures, shared[key]["finetune_only"], list(random_k))
        rk = ctl.as_dict()["random_k"]
        controls: dict[str, Any] = {
            "finetune_only": {**ctl.finetune_only},  # type: ignore[dict-item]
            "random_k": {n: v for n, v in rk.items() if n != "runs"},
        }
        if oracle is not None:  # how a diagnosis of perfect precision at this K does
            controls.update(
                oracles_of_k(ctl, oracle, truth, ident.scores, treat_fn, measure, causes=False)
            )
        return {
            "controls": {**controls, "seconds": time.perf_counter() - t},
            "gain": diagnosis_gain(figures, ctl),
            "verdict": repaired_verdict(figures, ctl).as_dict(),
        }

    cells: list[dict[str, Any]] = []
    for name in config.pipelines:
        ident_spec, treat_spec = parse_pipeline(name)
        ident_name = parse_step(ident_spec)[0]
        treat_name, treat_opts = parse_step(treat_spec)
        cell: dict[str, Any] = {"pipeline": name, "kind": "pipeline"}  # checked by BenchConfig
        try:
            ident = identified(ident_spec)
            t = time.perf_counter()
            options = {**config.treat_options.get(treat_name, {}), **treat_opts}
            if treat_name in ADAPTED and not {"epochs", "lr"} & set(options):
                n = len(data.train)
                sized = finetune_recipe(recipe, n, n, config.treat_options.get("finetune"))
                options.update(epochs=sized.epochs, lr=sized.lr)
            if "label_gate" in ident.info:
                cell["label_gate"] = ident.info["label_gate"]
            guard_opt = options.pop("guard", False)
            shrink = float(options.pop("guard_shrink", 0.5))  # dev runs: the back-off factor
            if guard_opt == "unbalanced":  # the guard, unless a gate balanced C
                gated = ident.info.get("label_gate", {})
                guard_opt = not (gated.get("balanced", 0) or gated.get("added", 0))
            use_guard = bool(guard_opt)
            treat_fn = _treatment_call(
                model, noisy, treat_name, recipe, ident, (Xq, yq), common, options
            )
            repaired = None
            if use_guard:  # netmend.repair's class guard, with the same treatment call
                if treat_name != "finetune":
                    raise ValueError("the guard option belongs to the finetune treatment")
                guard_data = None
                if guard_opt == "data":  # the held-out validation split, as guard_data
                    if validation is None:
                        raise ValueError("guard=data needs a validation split: validation_share")
                    guard_data = as_source((validation.X, validation.y), "guard_data")
                calls: list[tuple[np.ndarray, list[float]]] = []

                def measured(c: np.ndarray, fn: TreatFn = treat_fn, log: list = calls) -> nn.Module:
                    m = fn(c)  # each trial, also read on the test set (calibrates the guard)
                    log.append((c, class_accuracies(m, data.test.X, data.test.y, NUM_CLASSES)))
                    return m

                g = guard_k(
                    measured, model, as_source(noisy), ident.causes, seed, device,
                    guard_data=guard_data, shrink=shrink,
                )  # fmt: skip
                cell["guard"] = g.as_dict()
                cell["guard"]["trial_test_class_acc"] = _trial_readings(calls, g, noisy[1], seed)
                ident = dataclasses.replace(ident, causes=ident.causes[: g.k])
                repaired = g.model  # with guard_data: the accepted trial, the same call
            if repaired is None and len(ident.causes):
                repaired = treat_fn(ident.causes)
            elif repaired is None:  # nothing selected: the treatment has nothing to do
                repaired, cell["note"] = model, "no causes selected; model unchanged"
            seconds = time.perf_counter() - t + ident.seconds
            figures = measure(repaired)
            judged = (
                _judge(figures, treat_fn, (treat_name, repr(sorted(options.items()))), ident)
                if config.draws
                else {}
            )
        except Exception as exc:  # a benchmark records a failing cell and goes on
            log.warning("%s on %s failed: %s", name, data.name, exc)
            tb = traceback.format_exc(limit=3)
            cells.append({**cell, "status": "error", "error": f"{exc!r}", "traceback": tb})
            continue
        artifacts["causes"][name] = ident.causes
        artifacts["identifications"][name] = ident
        cells.append(
            {
                **cell,
                "status": "ok",
                **ident_metrics(ident.scores, ident.causes),
                "k_rule": (
                    "the K of plain 'ewc' (netmend.identify's default: automatic K, label gate)"
                    if ident_name in FAILURE_BLIND
                    else "auto"
                ),
                **figures,
                "seconds": seconds,
                **judged,
            }
        )

    finetune_options = config.treat_options.get("finetune", {})

    def reference(ref: str) -> dict[str, Any]:
        cell: dict[str, Any] = {"pipeline": ref, "kind": "reference"}
        t = time.perf_counter()
        if ref == "original":
            acc = {**original_figures}  # with its test class accuracies (the verdicts' base)
            return {**cell, "status": "ok", **acc, "seconds": timing["train"]}
        if ref == "retrain-clean":
            torch.manual_seed(seed)
            clean_model = fit(
                spec.model(), data.clean.X, data.clean.y, recipe, seed, device, progress, "clean"
            )
            artifacts["retrain-clean"] = clean_model
            acc = suite_accuracies(clean_model, data, split, device)
            return {**cell, "status": "ok", **acc, "seconds": time.perf_counter() - t}
        if ref == "oracle-causes":
            truth = np.flatnonzero(data.mask)
            if truth.size == 0:
                return {**cell, "status": "skipped", "reason": "the mask is empty"}
            if not masks_causes(data.name):
                return {**cell, "status": "skipped", "reason": NOT_CAUSES}
            repaired = api.treat(
                model, noisy, truth, "finetune", train_config=recipe, **common, **finetune_options
            )
            artifacts["causes"][ref] = truth
            acc = suite_accuracies(repaired, data, split, device)
            return {**cell, "status": "ok", **acc, "seconds": time.perf_counter() - t}
        if ref == "finetune-only":  # the finetune treatment with no causes
            tuned = api.treat(
                model,
                noisy,
                [],
                "finetune",
                train_config=recipe,
                allow_no_causes=True,
                **common,
                **finetune_options,
            )
            acc = suite_accuracies(tuned, data, split, device)
            artifacts["finetune-only"] = tuned
            return {**cell, "status": "ok", **acc, "seconds": time.perf_counter() - t}
        # cleanlab
        if not cleanlab_available():
            reason = f"cleanlab is not installed ({CLEANLAB_INSTALL})"
            return {**cell, "status": "skipped", "reason": reason}
        probs = cross_val_probs(
            spec.model, data.train.X, data.train.y, recipe, config.cv_folds, seed, device
        )
        issues, scores = cleanlab_issues(data.train.y.numpy(), probs)
        if len(issues):
            repaired = api.treat(
                model, noisy, issues, "finetune", train_config=recipe, **common, **finetune_options
            )
        else:
            repaired, cell["note"] = model, "no issues found; model unchanged"
        artifacts["causes"][ref] = issues
        return {
            **cell,
            "status": "ok",
            **ident_metrics(scores, issues),
            "k_rule": "cleanlab find_label_issues",
            **suite_accuracies(repaired, data, split, device),
            "seconds": time.perf_counter() - t,
        }

    for ref in config.references:
        try:
            cells.append(reference(ref))
        except Exception as exc:  # a benchmark records a failing cell and goes on
            log.warning("reference %s on %s failed: %s", ref, data.name, exc)
            tb = traceback.format_exc(limit=3)
            cells.append(
                {
                    "pipeline": ref,
                    "kind": "reference",
                    "status": "error",
                    "error": f"{exc!r}",
                    "traceback": tb,
                }
            )
    return {
        "suite": data.name,
        "seed": seed,
        "data": {
            "train": len(data.train),
            "clean_train": len(data.clean),
            "test": len(data.test),
            "corrupted": int(data.mask.sum()),
            "failures": int(len(split.failures)),
            "query_failures": int(len(split.query)),
            "heldout_failures": int(len(split.heldout)),
            "info": data.info,
        },
        "timing": timing,
        "cells": cells,
        "_artifacts": artifacts,
    }


def run(
    config: BenchConfig,
    device: str | torch.device | None = "auto",
    progress: bool = False,
    keep_artifacts: bool = False,
    on_suite: Callable[[dict[str, Any]], object] | None = None,
    on_result: Callable[[dict[str, Any], dict[str, Any]], object] | None = None,
    resume: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the whole matrix (suites x seeds, each with every pipeline and reference).

    Args:
        resume: the partial record of an interrupted run of the same matrix (its bench.json,
            as :func:`check_resumable` accepts it): its finished suite runs are kept, and only
            the others run.
        on_suite: called after every suite with the result so far (the same dict as the
            return value, covering the suites done), e.g. to write it: a long matrix can be
            followed, and an interrupted one keeps what it finished.
        on_result: called after every suite with its result (JSON-ready) and its artifacts
            (models, split, data, causes, ``identifications`` by pipeline), e.g. to write its
            report.html (:func:`netmend.report.html.bench_report`) without keeping the
            artifacts of every suite.

    Returns:
        ``{"config", "machine", "results": [run_suite(...) per suite and seed], "skipped",
        "errors", "seconds"}``, JSON-ready (non-finite numbers become ``None``) unless
        ``keep_artifacts``, which keeps each result's ``_artifacts`` (models, splits, causes).
        A suite whose model makes fewer than 2 failures is listed under ``skipped``.
    """
    from netmend.lab.demo import machine

    dev = resolve_device(device)
    results: list[dict[str, Any]] = []
    skipped_suites: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    if resume is not None:
        check_resumable(resume, config, machine())
        results, skipped_suites = list(resume["results"]), list(resume["skipped_suites"])
        t0 -= float(resume.get("seconds") or 0.0)  # the record's seconds cover both parts
    done = {(r["suite"], r["seed"]) for r in [*results, *skipped_suites]}
    for seed in config.seeds:
        for name in config.suites:
            if (name, seed) in done:
                continue
            data = make_suite(name, seed)
            try:
                res = run_suite(data, config, dev, progress)
            except ValueError as exc:
                if "misclassifies" not in str(exc):
                    raise
                skipped_suites.append({"suite": name, "seed": seed, "reason": str(exc)})
                continue
            artifacts = res.pop("_artifacts")
            res = finite_or_none(res)
            if on_result is not None:
                on_result(res, artifacts)
            if keep_artifacts:
                res["_artifacts"] = artifacts
            results.append(res)
            if on_suite is not None:
                on_suite(_collect(config, machine(), results, skipped_suites, t0))
    return _collect(config, machine(), results, skipped_suites, t0)


def _collect(
    config: BenchConfig,
    machine: dict[str, Any],
    results: list[dict[str, Any]],
    skipped_suites: list[dict[str, Any]],
    t0: float,
) -> dict[str, Any]:
    skipped = sorted(
        {
            c["pipeline"]: c["reason"]
            for r in results
            for c in r["cells"]
            if c["status"] == "skipped"
        }.items()
    )
    errors = [
        {"suite": r["suite"], "seed": r["seed"], "pipeline": c["pipeline"], "error": c["error"]}
        for r in results
        for c in r["cells"]
        if c["status"] == "error"
    ]
    planned = len(config.suites) * len(config.seeds)
    done = len(results) + len(skipped_suites)
    return {
        "config": asdict(config),
        "machine": machine,
        "netmend": __version__,
        # written after every suite: a run stopped midway leaves a partial record, said so
        "complete": done >= planned,
        "suites_done": f"{done} of {planned} suite runs",
        "results": list(results),
        "skipped": [{"pipeline": p, "reason": why} for p, why in skipped],
        "skipped_suites": list(skipped_suites),
        "errors": errors,
        "seconds": time.perf_counter() - t0,
    }


RESUME_MACHINE_KEYS = (
    "platform", "processor", "cpu_model", "cpus", "torch_threads", "torch", "cuda"
)  # fmt: skip
"""What a resumed run's machine must share with the interrupted one's: the trained models, and
so every cell, follow the CPU's float kernels, the thread count and torch's version."""


def check_resumable(
    record: Mapping[str, Any], config: BenchConfig, here: Mapping[str, Any]
) -> None:
    """Refuse to resume ``record`` (a bench.json) unless it is the partial record of the same
    matrix, written by this netmend on this machine: otherwise its cells would not pair with
    the new ones (the models of a full suite differ between machines, docs/test-suites.md).

    Raises:
        ValueError: it is complete, or was run with other settings (named), by another
            netmend version, or on another machine (the fields that differ named).
    """
    if record.get("complete", False):
        raise ValueError("its record is complete: nothing to resume (rerun without --resume)")
    if record.get("netmend") != __version__:
        raise ValueError(
            f"it was recorded by netmend {record.get('netmend') or '(an older one)'}, this is "
            f"{__version__}: its cells would not pair with this version's; rerun without --resume"
        )
    saved = dict(record.get("config") or {})
    now = finite_or_none(json_roundtrip(asdict(config)))
    diff = sorted(k for k in {*saved, *now} if saved.get(k) != now.get(k))
    if "cleanlab" not in [*saved.get("references", []), *now.get("references", [])]:
        diff = [k for k in diff if k != "cv_folds"]  # cleanlab's folds: no cell reads them
    if diff:
        raise ValueError(
            "it ran another matrix ("
            + "; ".join(f"{k}: {saved.get(k)!r} there, {now.get(k)!r} here" for k in diff)
            + "): pass the interrupted run's flags again"
        )
    was = record.get("machine") or {}
    other = [k for k in RESUME_MACHINE_KEYS if was.get(k) != here.get(k)]
    if other:
        raise ValueError(
            "it ran on another machine or set-up ("
            + "; ".join(f"{k}: {was.get(k)!r} there, {here.get(k)!r} here" for k in other)
            + "), whose models differ: its cells would not pair with this one's. Resume it "
            "there, or rerun without --resume"
        )


def json_roundtrip(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(obj))


# --- reports -------------------------------------------------------------------------------------

SUMMARY_KEYS = ("heldout_failure_acc", "test_acc")


def latest_runs(results: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Several bench results (e.g. one per output folder, in run order) with each suite kept
    only in the last result that ran it: a rerun supersedes the earlier runs of its suite.

    Returns:
        The same keys, in order; each value a shallow copy of its result whose ``results``
        holds only the suite runs no later result repeats (possibly none).
    """
    owner = {r["suite"]: key for key, result in results.items() for r in result["results"]}
    return {
        key: {**result, "results": [r for r in result["results"] if owner[r["suite"]] == key]}
        for key, result in results.items()
    }


def paired_vs(
    result: dict[str, Any], baseline: str = "cleanlab"
) -> dict[str, dict[str, dict[str, Any]]]:
    """Each pipeline's paired difference from ``baseline`` per suite, over the seeds.

    Returns:
        ``{suite: {pipeline: {"seeds": n, "<key>": mean, "<key>_diff": mean difference,
        "<key>_se": its standard error}}}`` for ``key`` in :data:`SUMMARY_KEYS` (accuracies
        as fractions), over the seeds where both cells are ``ok``. A difference is
        ``pipeline - baseline`` on the same suite and seed: the same data, corruption,
        trained model and failures. The baseline itself is included (difference 0).
    """
    by_suite: dict[str, dict[str, list[tuple[dict[str, Any], dict[str, Any]]]]] = {}
    for r in result["results"]:
        cells = {c["pipeline"]: c for c in r["cells"] if c["status"] == "ok"}
        base = cells.get(baseline)
        if base is None:
            continue
        for name, c in cells.items():
            by_suite.setdefault(r["suite"], {}).setdefault(name, []).append((c, base))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for suite, pipes in by_suite.items():
        for name, pairs in pipes.items():
            row: dict[str, Any] = {"seeds": len(pairs), "kind": pairs[0][0]["kind"]}
            for key in SUMMARY_KEYS:
                row[key] = float(np.mean([c[key] for c, _ in pairs]))
                row[f"{key}_diff"], row[f"{key}_se"] = mean_se([c[key] - b[key] for c, b in pairs])
            out.setdefault(suite, {})[name] = row
    return out


def repairs_on_means(heldout_gain: float, test_margin: float, worst_class_drop: float) -> bool:
    """The Pareto criterion on means over seeds: held-out failures above random-K, test
    accuracy at least its floor, no class down more than ``MAX_CLASS_DROP`` (NaN: no class
    measured). Fractions."""
    collapsed = worst_class_drop > MAX_CLASS_DROP
    return bool(heldout_gain > EPS and test_margin >= -EPS and not collapsed)


def pareto_summary(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per pipeline and suite, over the seeds: the diagnosis gain and the Pareto criterion.

    A pipeline **repairs** a suite when, on the mean over seeds, its held-out-failure gain
    over random-K is positive, its test accuracy is at least the mean of
    ``max(original, finetune-only)`` minus 0.2 points, and no class falls by more than 10
    points (the mean over seeds of the worst class drop), i.e. the per-seed criterion of
    :func:`netmend.evaluation.repaired` applied to seed means. Cells without controls are
    left out.

    Returns:
        ``{pipeline: {"suites": {suite: {"seeds", "heldout_gain", "heldout_gain_se",
        "test_gain", "test_gain_se", "test_margin", "worst_class_drop", "repairs",
        "seed_passes"}}, "repairs": n, "of": m}}``; the standard errors are over seeds (NaN
        with one seed), gains and margins are fractions.
    """
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in result["results"]:
        for c in r["cells"]:
            if c["status"] == "ok" and c.get("verdict"):
                rows.setdefault(c["pipeline"], {}).setdefault(r["suite"], []).append(c)
    out: dict[str, dict[str, Any]] = {}
    for name, suites in rows.items():
        per: dict[str, Any] = {}
        for suite, cells in suites.items():
            hg = mean_se([c["gain"]["heldout_gain"] for c in cells])
            tg = mean_se([c["gain"]["test_gain"] for c in cells])
            margin = float(np.mean([c["test_acc"] - c["verdict"]["test_floor"] for c in cells]))
            drops = [c["verdict"]["worst_class_drop"] for c in cells]
            drop = (
                float(np.mean([d for d in drops if d is not None]))
                if any(d is not None for d in drops)
                else math.nan
            )
            per[suite] = {
                "seeds": len(cells),
                "heldout_gain": hg[0],
                "heldout_gain_se": hg[1],
                "test_gain": tg[0],
                "test_gain_se": tg[1],
                "test_margin": margin,
                "worst_class_drop": drop,
                "repairs": repairs_on_means(hg[0], margin, drop),
                "seed_passes": sum(bool(c["verdict"]["passed"]) for c in cells),
            }
        out[name] = {
            "suites": per,
            "repairs": sum(v["repairs"] for v in per.values()),
            "of": len(per),
        }
    return out


def pareto_markdown(result: dict[str, Any]) -> str:
    """:func:`pareto_summary` as markdown: the headline counts, then per suite (points of %)."""
    table = pareto_summary(result)
    if not table:
        return ""

    def pm(mean: float, se: float) -> str:
        return f"{100 * mean:+.1f} ± {_num(100 * se, '.1f')}"

    lines = [
        "Repairs by the Pareto criterion (held-out failures above random-K with the same K "
        "and treatment, test accuracy at least max(original, finetune-only) - 0.2 points, no "
        "class losing more than 10 points; means over seeds):",
        "",
    ]
    for name, row in table.items():
        lines.append(f"* `{name}`: repairs {row['repairs']} of {row['of']} suites")
    lines += [
        "",
        "| suite | pipeline | seeds | diagnosis gain, held-out F | gain, test | test margin "
        "| worst class drop | repairs | seeds passing |",
        "|" + "---|" * 9,
    ]
    for name, row in table.items():
        for suite, v in row["suites"].items():
            lines.append(
                f"| {suite} | {name} | {v['seeds']} "
                f"| {pm(v['heldout_gain'], v['heldout_gain_se'])} "
                f"| {pm(v['test_gain'], v['test_gain_se'])} | {100 * v['test_margin']:+.1f} "
                f"| {_num(100 * v['worst_class_drop'], '.1f')} "
                f"| {'yes' if v['repairs'] else 'no'} | {v['seed_passes']} |"
            )
    return "\n".join(lines) + "\n"


def _rank(row: dict[str, Any]) -> tuple[bool, float, float]:
    met = all(row[f"{k}_diff"] > 0 for k in SUMMARY_KEYS)
    return met, row["heldout_failure_acc"], row["test_acc"]


def summary(result: dict[str, Any], baseline: str = "cleanlab") -> list[dict[str, Any]]:
    """Per suite: the best netmend pipeline against ``baseline`` (issue 4's figure).

    ``met`` is true when the mean paired difference is positive on both held-out-failure and
    test accuracy. The best pipeline is one that meets it with the highest mean held-out
    accuracy or, when none does, the one with the highest mean held-out accuracy (ties: test
    accuracy). So ``met`` says that *some* pipeline beat the baseline on that suite: chosen
    on the same seeds, this flatters netmend; :func:`paired_vs` gives every pipeline's
    differences, and :func:`summary_markdown` counts the suites each one meets.

    Returns:
        One dict per suite: ``suite``, ``seeds``, ``best``, the best pipeline's and the
        baseline's mean accuracies, the paired differences with standard errors (see
        :func:`paired_vs`) and ``met``.
    """
    rows = []
    for suite, pipes in paired_vs(result, baseline).items():
        cands = {n: r for n, r in pipes.items() if r["kind"] == "pipeline"}
        if not cands:
            continue
        best = max(cands.items(), key=lambda item: _rank(item[1]))[0]
        b, ref = cands[best], pipes[baseline]
        row: dict[str, Any] = {"suite": suite, "seeds": b["seeds"], "best": best}
        for key in SUMMARY_KEYS:
            row[key] = b[key]
            row[f"{baseline}_{key}"] = ref[key]
            row[f"{key}_diff"], row[f"{key}_se"] = b[f"{key}_diff"], b[f"{key}_se"]
        for extra in ("oracle-causes", "finetune-only", "retrain-clean", "original"):
            if extra in pipes:
                row[f"{extra}_heldout_failure_acc"] = pipes[extra]["heldout_failure_acc"]
        row["met"] = all(row[f"{k}_diff"] > 0 for k in SUMMARY_KEYS)
        rows.append(row)
    return rows


def summary_markdown(result: dict[str, Any], baseline: str = "cleanlab") -> str:
    """:func:`summary` and every pipeline's paired differences as markdown (points of %)."""

    def pm(mean: float, se: float) -> str:
        return f"{100 * mean:+.1f} ± {_num(100 * se, '.1f')}"

    rows = summary(result, baseline)
    if not rows:
        return ""
    lines = [
        f"Best netmend pipeline per suite vs {baseline}: mean over seeds, paired difference "
        "± its standard error, in points of %.",
        "",
        f"| suite | seeds | best pipeline | held-out F | {baseline} | Δ held-out F | test "
        f"| {baseline} | Δ test | oracle-causes held-out F | finetune-only held-out F | met |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        lines.append(
            f"| {r['suite']} | {r['seeds']} | {r['best']} "
            f"| {_pct(r['heldout_failure_acc'])} | {_pct(r[f'{baseline}_heldout_failure_acc'])} "
            f"| {pm(r['heldout_failure_acc_diff'], r['heldout_failure_acc_se'])} "
            f"| {_pct(r['test_acc'])} | {_pct(r[f'{baseline}_test_acc'])} "
            f"| {pm(r['test_acc_diff'], r['test_acc_se'])} "
            f"| {_pct(r.get('oracle-causes_heldout_failure_acc'))} "
            f"| {_pct(r.get('finetune-only_heldout_failure_acc'))} "
            f"| {'yes' if r['met'] else 'no'} |"
        )
    table = paired_vs(result, baseline)
    names = sorted({n for p in table.values() for n, r in p.items() if r["kind"] == "pipeline"})
    lines += ["", f"Suites where each pipeline beats {baseline} on both (mean over seeds):", ""]
    for name in names:
        won = [
            s
            for s, p in table.items()
            if name in p and all(p[name][f"{k}_diff"] > 0 for k in SUMMARY_KEYS)
        ]
        ran = sum(name in p for p in table.values())
        lines.append(f"* `{name}`: {len(won)} of {ran}" + (f" ({', '.join(won)})" if won else ""))
    lines += [
        "",
        f"Every pipeline against {baseline} (Δ held-out F / Δ test, points):",
        "",
        "| suite | pipeline | held-out F | Δ held-out F | test | Δ test |",
        "|---|---|---|---|---|---|",
    ]
    for suite, pipes in table.items():
        for name, r in pipes.items():
            if name == baseline:
                continue
            lines.append(
                f"| {suite} | {name} | {_pct(r['heldout_failure_acc'])} "
                f"| {pm(r['heldout_failure_acc_diff'], r['heldout_failure_acc_se'])} "
                f"| {_pct(r['test_acc'])} | {pm(r['test_acc_diff'], r['test_acc_se'])} |"
            )
    return "\n".join(lines) + "\n"


def _gain(g: dict[str, Any] | None) -> str:
    if not g:
        return "-"
    se = g.get("heldout_gain_se")
    return f"{100 * g['heldout_gain']:+.1f} ± {_num(None if se is None else 100 * se, '.1f')}"


def _verdict(v: dict[str, Any] | None) -> str:
    return "-" if not v else ("yes" if v["passed"] else "no")


def _pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.1f}"


def _num(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def markdown(result: dict[str, Any]) -> str:
    """The matrix as one markdown table (accuracies in %), then skipped pipelines and errors."""
    head = (
        "| suite | seed | pipeline | K | precision | recall | AUROC | held-out F | query F "
        "| test | correct | gain F vs random-K | Pareto | seconds |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in result["results"]:
        for c in r["cells"]:
            if c["status"] != "ok":
                continue
            lines.append(
                f"| {r['suite']} | {r['seed']} | {c['pipeline']} | {c.get('k', '-')} "
                f"| {_num(c.get('precision'))} | {_num(c.get('recall'))} | {_num(c.get('auroc'))} "
                f"| {_pct(c['heldout_failure_acc'])} | {_pct(c['query_failure_acc'])} "
                f"| {_pct(c['test_acc'])} | {_pct(c['correct_acc'])} "
                f"| {_gain(c.get('gain'))} | {_verdict(c.get('verdict'))} "
                f"| {_num(c['seconds'], '.1f')} |"
            )
            ctl = c.get("controls") or {}
            for label, fig, k in (
                ("↳ finetune-only", ctl.get("finetune_only"), 0),
                (
                    f"↳ random-K ({(ctl.get('random_k') or {}).get('draws', '-')} draws)",
                    ctl.get("random_k"),
                    c.get("k", "-"),
                ),
                ("↳ oracle-at-K", ctl.get("oracle_at_k"), c.get("k", "-")),
                ("↳ oracle-ranked", ctl.get("oracle_ranked"), c.get("k", "-")),
            ):
                if fig:  # the controls' own accuracies, under the pipeline they judge
                    lines.append(
                        f"| {r['suite']} | {r['seed']} | {label} | {k} | | | "
                        f"| {_pct(fig['heldout_failure_acc'])} | {_pct(fig['query_failure_acc'])} "
                        f"| {_pct(fig['test_acc'])} | {_pct(fig['correct_acc'])} "
                        f"| {_gain(fig['gain']) if 'gain' in fig else ''} | | |"
                    )
    notes = []
    if result.get("complete") is False:  # the record of a run stopped midway
        notes.append(
            f"* **partial run: {result['suites_done']} finished** (stopped before the rest; "
            "the same command with --resume runs the rest)"
        )
    for s in result["skipped"]:
        notes.append(f"* skipped `{s['pipeline']}`: {s['reason']}")
    for s in result.get("skipped_suites", []):
        notes.append(f"* skipped suite `{s['suite']}` (seed {s['seed']}): {s['reason']}")
    for e in result["errors"]:
        notes.append(
            f"* error in `{e['pipeline']}` on {e['suite']} (seed {e['seed']}): {e['error']}"
        )
    sizes = [
        f"{r['suite']} (seed {r['seed']}): {r['data']['train']} train, {r['data']['corrupted']} "
        f"marked, {r['data']['failures']} failures ({r['data']['query_failures']} query)"
        for r in result["results"]
    ]
    text = "\n".join(lines)
    head_summary = summary_markdown(result)
    if head_summary:
        text = head_summary + "\nAll cells:\n\n" + text
    pareto = pareto_markdown(result)
    if pareto:
        text = pareto + "\n" + text
    if result.get("complete") is False:  # said first too: the verdicts above cover only these
        text = (
            f"**Partial run: {result['suites_done']} finished.** The verdicts and tables cover "
            "only those; the same command with --resume runs the rest.\n\n" + text
        )
    text += (
        "\n\nAccuracies in %. held-out F / query F: accuracy on the failures withheld from / "
        "shown to identification; correct: on test examples the original model got right. "
        "K, precision, recall, AUROC: the selected causes and the scores against the "
        "corruption mask."
    )
    if sizes:
        text += "\n\n" + "\n".join(f"* {s}" for s in sizes)
    if notes:
        text += "\n\n" + "\n".join(notes)
    return text + "\n"


def plots(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """PNG plots: ``pr_<suite>_s<seed>.png`` per suite (precision-recall of each
    identification, dot at the selected K), ``accuracy.png`` (held-out-failure and test
    accuracy per pipeline, the original model dashed) and ``time.png`` (seconds per cell)."""
    from netmend.report.plots import _pyplot, _save

    plt = _pyplot()
    out = Path(out_dir)
    paths: list[Path] = []
    for r in result["results"]:
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        seen = set()
        for c in r["cells"]:
            if c["status"] != "ok" or not c.get("pr_curve"):
                continue
            label = c["pipeline"].split("/")[0] if c["kind"] == "pipeline" else c["pipeline"]
            if label in seen:
                continue
            seen.add(label)
            curve = c["pr_curve"]
            (line,) = ax.plot(curve["recall"], curve["precision"], label=label)
            if c.get("recall") is not None and c.get("precision") is not None:
                ax.plot([c["recall"]], [c["precision"]], "o", color=line.get_color())
        base = r["data"]["corrupted"] / max(1, r["data"]["train"])
        ax.axhline(base, color="grey", ls=":", lw=1, label="chance")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{r['suite']} (seed {r['seed']}): identification", fontsize=10)
        ax.legend(fontsize=8)
        safe = r["suite"].replace("/", "_")
        paths.append(_save(plt, fig, out / f"pr_{safe}_s{r['seed']}.png"))

    rows = [r for r in result["results"] if any(c["status"] == "ok" for c in r["cells"])]
    if not rows:
        return paths
    keys = [("heldout_failure_acc", "held-out failures (%)"), ("test_acc", "test (%)")]
    fig, axes = plt.subplots(
        len(rows),
        len(keys),
        figsize=(11, 0.35 * sum(len(r["cells"]) for r in rows) + 1.5),
        squeeze=False,
    )
    for i, r in enumerate(rows):
        ok = [c for c in r["cells"] if c["status"] == "ok"]
        names = [c["pipeline"] for c in ok]
        original = next((c for c in ok if c["pipeline"] == "original"), None)
        for j, (key, title) in enumerate(keys):
            ax = axes[i, j]
            vals = [100 * (c[key] or 0.0) for c in ok]
            colors = ["C0" if c["kind"] == "pipeline" else "C7" for c in ok]
            ax.barh(range(len(names)), vals, color=colors)
            ax.set_yticks(range(len(names)), names if j == 0 else [""] * len(names), fontsize=8)
            ax.invert_yaxis()
            if original is not None:
                ax.axvline(100 * (original[key] or 0.0), color="k", ls="--", lw=1)
            lo = min(vals) if key == "test_acc" else 0.0  # zoom where differences are small
            ax.set_xlim(max(0.0, lo - (100 - lo) * 0.3 - 1) if lo else 0.0, 100)
            ax.set_title(f"{r['suite']} s{r['seed']}: {title}", fontsize=9)
    paths.append(_save(plt, fig, out / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(8, 0.3 * sum(len(r["cells"]) for r in rows) + 1.5))
    labels, secs = [], []
    for r in rows:
        for c in r["cells"]:
            if c["status"] == "ok":
                labels.append(f"{r['suite']} s{r['seed']} {c['pipeline']}")
                secs.append(max(c["seconds"], 1e-3))
    ax.barh(range(len(labels)), secs)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("seconds (identification + treatment; references: their whole cost)")
    paths.append(_save(plt, fig, out / "time.png"))
    return paths


def write(result: dict[str, Any], out_dir: str | Path, with_plots: bool = True) -> list[Path]:
    """Write ``bench.json`` (atomically; with the Pareto verdicts of :func:`pareto_summary` under
    ``"pareto"``), ``bench.md`` and, with ``with_plots``, the PNGs."""
    from netmend.store import write_json_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    public["results"] = [
        {k: v for k, v in r.items() if not k.startswith("_")} for r in result["results"]
    ]
    public["pareto"] = finite_or_none(pareto_summary(public))  # the verdicts bench.md shows
    write_json_atomic(out / "bench.json", public)
    (out / "bench.md").write_text(markdown(public))
    paths = [out / "bench.json", out / "bench.md"]
    if with_plots:
        paths += plots(public, out)
    return paths


__all__ = [
    "BenchConfig",
    "CORRUPTIONS",
    "DATASETS",
    "DEFAULT_PIPELINES",
    "DatasetSpec",
    "QUICK_PIPELINES",
    "QUICK_SUITES",
    "REFERENCES",
    "SuiteData",
    "cleanlab_issues",
    "cross_val_probs",
    "expand_suites",
    "make_suite",
    "markdown",
    "parse_pipeline",
    "parse_step",
    "paired_vs",
    "pareto_markdown",
    "pareto_summary",
    "parse_suite",
    "plots",
    "pr_curve",
    "run",
    "run_suite",
    "suite_accuracies",
    "summary",
    "summary_markdown",
    "write",
]
