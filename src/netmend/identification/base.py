"""Shared machinery of cause identification: the context, the registry, the result, selection.

Sign convention, everywhere: a score is the cause score ``r(z)`` of Tanno et al. (2022),
**positive = harmful**: ``r(z) > 0`` means that making the model fit the failures lowers the
likelihood of training example ``z``, i.e. ``z`` conflicts with the failures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from netmend._registry import Registry
from netmend._warnings import warn
from netmend.curvature import (
    Curvature,
    fisher_diag_sum,
    per_example_grad_products,
    per_example_grads,
)
from netmend.model.functional import Data, FunctionalModel, stream, summed_grad
from netmend.store import tensor_hash

AUTO_L2_RATIO = 1e4
"""``l2="auto"`` sets ``lambda = AUTO_L2_RATIO * mean(diag F_sum)`` (see :func:`resolve_l2`)."""


IGNORES_L2 = frozenset(
    {"influence", "ekfac", "tracin", "grad_dot", "grad_cos", "trak"}
    | {"knn_shapley", "tmc_shapley", "banzhaf", "loss", "random"}
)
"""The built-in methods that never read ``l2`` (only "ewc" and "linear" do): the influence
family damps its curvature by its own ``damping`` option."""


def resolve_l2(l2: float | str, fisher_diag: Callable[[], torch.Tensor]) -> float:
    """Turn ``l2`` (a positive float or "auto") into the ``lambda`` used everywhere.

    "auto" scales ``lambda`` to the model: ``AUTO_L2_RATIO`` times the mean diagonal entry
    of the summed empirical Fisher. The diagonal Fisher of a network is near-singular and its
    smallest entries are its least reliable; a ``lambda`` well above its mean keeps the fit of
    ``theta_+F`` local, where the diagonal approximation holds. On the MNIST CNN the precision
    of the top causes rises with this ratio and flattens past 1e3-1e4 (benchmarks/README).
    """
    if isinstance(l2, str):
        if l2 != "auto":
            raise ValueError(f"l2 must be a positive number or 'auto'; got {l2!r}")
        mean = float(fisher_diag().mean())
        return AUTO_L2_RATIO * mean if mean > 0 else 1.0
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0 (it damps a near-singular Fisher); got {l2}")
    return float(l2)


@dataclass(frozen=True)
class NegDot:
    """``G -> -G V`` (``V`` ``[P]`` or ``[P, M]``) as the function of :func:`grad_rows`, which
    then computes it layer by layer without forming the per-example gradients ``G``
    (:func:`netmend.curvature.per_example_grad_products`): same numbers up to rounding,
    without the ``[chunk, P]`` matrix and its memory traffic."""

    V: torch.Tensor

    def __call__(self, G: torch.Tensor) -> torch.Tensor:
        return -(G @ self.V)


def grad_rows(
    ctx: Context,
    theta: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    desc: str,
    X: Data | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fn(G_chunk)`` over the training set (or ``(X, y)``), concatenated on CPU.

    ``G_chunk`` ``[B, P]`` are the per-example gradients of ``log p(y_n|x_n, theta)`` of one
    chunk of at most ``ctx.chunk_size`` examples; ``fn`` maps them to ``[B]`` or ``[B, M]``.
    A :class:`NegDot` ``fn`` is computed without forming ``G_chunk``.
    A :func:`netmend.model.functional.stream` pass, so it resumes inside a cached ``identify``.
    """
    X = ctx.X if X is None else X
    y = ctx.y if y is None else y

    if isinstance(fn, NegDot):
        V = fn.V.to(device=theta.device, dtype=theta.dtype).contiguous()

        def rows(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return -per_example_grad_products(ctx.fm, theta, x, t, V)

    else:

        def rows(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return fn(per_example_grads(ctx.fm, theta, x, t))

    return stream(
        X, y, rows, ctx.chunk_size, ctx.device, ctx.progress, desc, lambda: tensor_hash(theta)
    )


@dataclass
class Context:
    """Everything an identification method may use, with shared work computed once.

    Attributes:
        fm: the model, functionally (the user's model is never modified).
        X, y: the training set: its inputs (a :class:`netmend.data.source.DataSource`, read
            batch by batch with ``X[s].to(device)``, or a tensor ``[N, ...]``) and labels
            ``[N]``. Use ``len(X)``; take views ``X[idx]``, never the whole set.
        Xq, yq: the query failures (a source or tensor of ``M`` inputs), ``[M]`` (the only
            failures a method may see).
        device, chunk_size, progress, seed: run settings.
        l2: the ``lambda`` of the paper's penalty ``(lambda/2)||theta - theta_hat||^2``; it also
            damps the diagonal Fisher. A number, or "auto" until a method asks for it through
            :meth:`lam`.
        options: method-specific keyword options.
    """

    fm: FunctionalModel
    X: Data
    y: torch.Tensor
    Xq: Data
    yq: torch.Tensor
    device: torch.device
    chunk_size: int = 128
    progress: bool = True
    seed: int = 0
    l2: float | str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    fisher: torch.Tensor | None = None  # summed diagonal empirical Fisher [P], lazily computed
    shared: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """Work that depends only on the model and the training set (e.g. ``log p(z|theta_hat)``),
    kept for the contexts :func:`dataclasses.replace` derives from this one (the halves of the
    automatic K share it: one dict, not a copy)."""

    def __post_init__(self) -> None:
        if not isinstance(self.l2, str):
            self.l2 = resolve_l2(self.l2, self.fisher_diag)  # validates a number
        elif self.l2 != "auto":
            resolve_l2(self.l2, self.fisher_diag)  # raises with the accepted values

    def lam(self) -> float:
        """``lambda`` as a number; ``l2="auto"`` is resolved (computing the Fisher) on first use,
        so methods that never use ``lambda`` (Shapley, TracIn, ...) never pay for the Fisher."""
        if isinstance(self.l2, str):
            self.l2 = resolve_l2(self.l2, self.fisher_diag)
        return float(self.l2)

    @property
    def N(self) -> int:
        return int(len(self.X))

    @property
    def theta(self) -> torch.Tensor:
        return self.fm.theta.to(self.device)

    def fisher_diag(self) -> torch.Tensor:
        """The summed diagonal empirical Fisher over the training set at ``theta_hat`` ``[P]``."""
        if self.fisher is None:
            self.fisher = fisher_diag_sum(
                self.fm, self.theta, self.X, self.y, self.chunk_size, self.device, self.progress
            )
        return self.fisher.to(self.device)

    def diag_curvature(self) -> Curvature:
        """``F_sum + l2 * I`` (diagonal), the EWC penalty's curvature."""
        return Curvature(
            "diag",
            self.fm,
            self.theta,
            self.X,
            self.y,
            self.lam(),
            diag=self.fisher_diag(),
            device=self.device,
        )

    def failure_grad(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        """``grad log p(F_q | theta)``, summed over the query failures, ``[P]``."""
        t = self.theta if theta is None else theta
        return summed_grad(self.fm, t, self.Xq, self.yq, self.chunk_size, self.device)

    def per_failure_scores(self, precond: Curvature) -> np.ndarray:
        """Linearised per-failure cause scores, ``[N, M]`` float32, positive = harmful.

        ``S[n, i] = -g_n^T A^{-1} g_{f_i}``: the first-order drop in ``log p(z_n)`` when the
        parameters take one preconditioned step (``A``) towards fitting failure ``i`` alone.
        Streams per-example gradients of the training set in chunks (``[chunk, P]`` at most).
        """
        theta = self.theta
        Gq = per_example_grads(self.fm, theta, self.Xq.to(self.device), self.yq.to(self.device))
        V = precond.solve(Gq.T.contiguous())  # [P, M]
        return grad_rows(self, theta, NegDot(V), "culprits").numpy().astype(np.float32)


@dataclass
class MethodOutput:
    """What a registered method returns: the scores ``[N]`` and, optionally, per-failure scores.

    ``per_failure`` is ``[N, M]`` (positive = harmful to failure ``i``) or a zero-argument
    callable computing it lazily (it costs one more pass over the training set).
    """

    scores: np.ndarray
    per_failure: np.ndarray | Callable[[], np.ndarray] | None = None
    info: dict[str, Any] = field(default_factory=dict)


Method = Callable[[Context], MethodOutput]
IDENTIFY_ARGUMENTS = frozenset(
    {"model", "train", "failures", "method", "k", "l2", "seed", "device", "chunk_size"}
    | {"progress", "fisher", "cache_dir", "overwrite_cache", "task", "gate"}
)
""":func:`netmend.identify`'s own keywords: a method option of one of these names could never
reach the method (``tests/test_architecture.py`` holds it to the signature)."""

_REGISTRY: Registry[Method] = Registry(
    "identification method", IDENTIFY_ARGUMENTS, "netmend.identify"
)


def register(name: str, options: Iterable[str] | None = None) -> Callable[[Method], Method]:
    """Register an identification method under ``name`` (a decorator).

    A method is a function ``(Context) -> MethodOutput`` whose scores are positive = harmful.
    ``options`` names the keyword options it reads from ``ctx.options`` (``()``: none); an
    option outside them is refused by :func:`netmend.identify` (see :func:`check_options`).
    """
    return _REGISTRY.register(name, options)


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming any option method ``name`` does not declare (with the valid
    names and the closest match)."""
    _REGISTRY.check_options(name, options)


def get(name: str) -> Method:
    """The registered identification method ``name`` (raises listing the known ones)."""
    return _REGISTRY.get(name)


def available() -> list[str]:
    """Names of the registered identification methods."""
    return _REGISTRY.available()


def is_auto_k(k: int | float | str | None) -> bool:
    """Whether ``k`` asks for the automatic K (``None`` or ``"auto"``), which the label gate,
    the class guard and the continual :class:`netmend.Repairer` key on."""
    return k is None or (isinstance(k, str) and k == "auto")


def select(scores: np.ndarray, k: int | float | str | None) -> np.ndarray:
    """Choose the causes from cause scores (positive = harmful), most harmful first.

    Args:
        scores: ``[N]`` cause scores.
        k: an int: the top ``k``; a float in (0, 1): that fraction of the training set;
            ``"positive"``: every example with ``r > 0``. (``None``/"auto" is resolved by
            :func:`netmend.identify`, which needs to re-score halves of the failures; see
            :func:`reproducible_k`.)

    Returns:
        Training indices, int64, sorted by decreasing score (ties by index); an int ``k``
        above ``N`` selects all ``N`` (:func:`netmend.identify` refuses such a ``k``).

    Raises:
        ValueError: NaN scores (they would rank last, silently), a negative or unknown ``k``.
    """
    scores = np.asarray(scores)
    if np.isnan(scores).any():
        raise ValueError(
            f"{int(np.isnan(scores).sum())} scores are NaN: a method that failed on some "
            "examples; check the model's outputs on them before selecting causes"
        )
    if isinstance(k, torch.Tensor) and k.ndim == 0 and not k.is_floating_point():
        k = int(k.item())  # a 0-d integer tensor, as identify takes it
    order = np.argsort(-scores, kind="stable")
    if k == "positive":
        return order[scores[order] > 0]
    if isinstance(k, float) and not isinstance(k, bool):
        if not 0 < k < 1:
            raise ValueError(f"a fractional k must lie in (0, 1); got {k}")
        frac, k = k, int(round(k * len(scores)))
        if k == 0 and len(scores):  # a fraction below 1/(2N): nothing, and no word
            warn(
                f"k={frac:g} of {len(scores)} training examples rounds to 0 causes: nothing is "
                "selected. Pass a larger fraction, or a count (k=10)"
            )
    if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
        if k < 0:
            raise ValueError(f"k must be >= 0; got {k}")
        return order[: int(k)]
    raise ValueError(f"k must be an int, a fraction, 'positive', 'auto' or None; got {k!r}")


def _ranks(scores: np.ndarray) -> np.ndarray:
    """Rank of each score in decreasing order (0 = highest; ties by index), ``[n]``; int32
    when it fits: rank vectors are the largest O(N) buffers of the automatic K."""
    n = len(scores)
    r = np.empty(n, dtype=np.int32 if n < 2**31 else np.int64)
    r[np.argsort(-scores, kind="stable")] = np.arange(n, dtype=r.dtype)
    return r


def k_grid(max_k: int, grid: int = 60) -> np.ndarray:
    """The K values the automatic-K rules try: ``grid`` log-spaced integers from
    ``min(10, max_k)`` to ``max_k`` (duplicates dropped), int64; empty if ``max_k < 1``."""
    if max_k < 1:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.geomspace(min(10, max_k), max_k, grid).astype(np.int64))


def reproducible_k(
    scores_a: np.ndarray, scores_b: np.ndarray, max_k: int | None = None, grid: int = 60
) -> tuple[int, dict[int, float]]:
    """The automatic K: where two independent halves of the failures stop agreeing on culprits.

    Score the training set twice, against two disjoint random halves of the query failures.
    Real causes of a kind of failure are blamed by both halves; examples blamed by chance are
    not. For each K on a log grid, the agreement ``|top_K(a) & top_K(b)| / K`` minus its
    chance level ``K / N`` is computed, and the K with the highest excess agreement is
    returned (the same idea as the irreproducible discovery rate used to threshold replicated
    experiments). Uses the query failures only.

    Args:
        scores_a, scores_b: ``[N]`` scores (positive = harmful) from the two halves.
        max_k: largest K considered (default ``N // 2``).
        grid: number of K values (log-spaced from 10).

    Returns:
        ``K`` and the excess agreement at each K tried.
    """
    n = len(scores_a)
    if len(scores_b) != n:
        raise ValueError("the two score vectors must have the same length")
    max_k = min(n // 2 if max_k is None else max_k, n)
    if max_k < 1:
        return 0, {}
    ra, rb = _ranks(scores_a), _ranks(scores_b)
    worst = np.maximum(ra, rb, out=ra)  # an example is in both top-K sets iff worst < K
    del rb
    counts = np.bincount(worst, minlength=n)
    np.cumsum(counts, out=counts)  # counts[K-1] = |top_K(a) & top_K(b)|
    ks = k_grid(max_k, grid)
    excess = {int(k): float(counts[k - 1] / k - k / n) for k in ks}
    best = max(excess, key=lambda k: (excess[k], k))
    return best, excess


MAX_CLASS_SHARE = 0.3
"""The automatic K never selects more than this share of one class's training examples.

Chosen on the dev suites (``benchmarks/k_rule.py``): against half a class (netmend 0.3) it
kept the Pareto passes of the 10 digits suites (10 of 30 with the edge rule), turned the
mean test-accuracy gain over random-K from -0.57 to +0.09 points for 1.4 points less
held-out gain, and on the demo's seed 0 (full MNIST, the dev seed of the demo) it stops at
2,910 causes at precision 0.958 where half a class took 5,186 at 0.815, 709 of them clean 1s
whose removal took class 1 from 99.4% to 73.3% test accuracy (``k_rule_dev_cap0.3.json``).
"""
EMPTIED_CLASS_SHARE = 0.5
"""Causes holding more than this share of a class are warned about (``classes_over_half``)."""
CULPRITS_PER_FAILURE = 5
"""With fewer than 4 failures, the automatic K takes this many top culprits per failure."""


def top_indices(values: np.ndarray, n: int) -> np.ndarray:
    """The indices of the ``n`` largest of ``values`` ``[N]``, largest first, ties broken by
    index as :func:`select` breaks them (``argpartition`` alone picks any of a tied block:
    KNN-Shapley's per-failure values tie in blocks of up to 40). O(N), no full sort.
    """
    n = min(int(n), values.shape[0])
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    kth = np.partition(-values, n - 1)[n - 1]  # minus the n-th largest value
    above = np.flatnonzero(-values < kth)
    tied = np.flatnonzero(-values == kth)[: n - above.size]
    top = np.concatenate([above, tied])
    return top[np.lexsort((top, -values[top]))].astype(np.int64)


def class_capped(
    causes: np.ndarray, labels: np.ndarray | torch.Tensor, max_share: float = MAX_CLASS_SHARE
) -> np.ndarray:
    """The longest prefix of ``causes`` (most harmful first) that holds at most ``max_share``
    of any class's training examples.

    A selection that takes most of a class leaves a fine-tune little of that class to learn
    from, and it forgets the class (on a BatchNorm ResNet on the digits, 76 of the 93
    examples labelled 6 selected at precision 0.25 took class 6 from 0.90 to 0.15). The
    automatic K stops before that; an explicit ``k`` is honoured, with a warning.

    Args:
        causes: ``[K]`` training indices, most harmful first.
        labels: the training labels ``[N]``.
        max_share: the largest share of a class that may be selected, in (0, 1].

    A class too small to give even one example (``floor(max_share * n_c) == 0``: 3 or
    fewer examples at 30%) is passed over rather than ending the list: such a class ended
    every selection at its first example (an outside-in trial: 14 causes instead of 128).

    Returns:
        ``causes[:K']`` with ``K' <= K``, less any examples of such tiny classes.
    """
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must lie in (0, 1]; got {max_share}")
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    y = y.astype(np.int64)
    causes = np.asarray(causes, dtype=np.int64)
    total = np.bincount(y)
    limits = np.floor(max_share * total).astype(np.int64)
    causes = causes[limits[y[causes]] > 0]  # tiny classes: passed over
    picked = y[causes]
    stop = causes.size
    for c in np.unique(picked):
        limit = int(limits[c])
        where = np.flatnonzero(picked == c)
        if where.size > limit:
            stop = min(stop, int(where[limit]))
    return causes[:stop]


def per_failure_top(
    per_failure: np.ndarray, scores: np.ndarray, n: int, summed_positive: bool = False
) -> np.ndarray:
    """The union of each failure's top ``n`` culprits with a positive per-failure score.

    Args:
        per_failure: ``[N, M]`` per-failure cause scores (positive = harmful to failure i).
        scores: ``[N]`` summed cause scores (orders the union, most harmful first).
        n: culprits per failure.
        summed_positive: keep only culprits whose summed score is positive too (never one
            the evidence of all failures together calls helpful). The automatic K's fallback
            where halves of the failures agree on nothing uses it.

    Returns:
        At most ``n * M`` training indices, int64, sorted by decreasing ``scores``.
    """
    pf = np.asarray(per_failure, dtype=np.float64)
    n = min(n, pf.shape[0])
    top = np.argpartition(-pf, n - 1, axis=0)[:n]  # [n, M]
    keep = np.take_along_axis(pf, top, axis=0) > 0
    chosen = np.unique(top[keep])
    if summed_positive:
        chosen = chosen[scores[chosen] > 0]
    return chosen[np.argsort(-scores[chosen], kind="stable")].astype(np.int64)
