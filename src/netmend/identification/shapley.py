"""Data-Shapley cause identification: exact KNN-Shapley on the model's embeddings.

A training example's *value* is its Shapley value in the game "accuracy on the failures (and,
optionally, on a trusted clean validation set) of a K-nearest-neighbour classifier trained on a
subset of the training set", with the classifier working on the model's penultimate-layer
embeddings. An example that lowers that accuracy on average over all subsets (a mislabelled
point next to a failure) has a **negative** value, so the cause score is ``r = -value``:
**positive = harmful**, and the causes are simply the examples with ``r > 0`` (no K to choose;
these methods set ``MethodOutput.info["default_k"] = "positive"``).

The utility (Jia et al. 2019, "Efficient task-specific data valuation for nearest neighbor
algorithms", Theorem 1) of a subset ``S`` for one test point ``(x_t, y_t)`` is

    u_t(S) = (1/K) * #{the min(K, |S|) nearest neighbours of x_t in S with label y_t},

``u_t(empty) = 0``; ties in distance are broken by training index (a stable sort). For this game
the exact Shapley values need one sort per test point (``O(N log N)``):

    s_(N) = 1[y_(N) = y_t] * min(K, N) / (N K)
    s_(i) = s_(i+1) + (1[y_(i) = y_t] - 1[y_(i+1) = y_t]) / K * min(K, i) / i,

where ``(i)`` is the i-th nearest training point. (Jia et al. state ``s_(N) = 1[.]/N``, which
assumes ``N >= K``; ``min(K, N)/(N K)`` is the value for any ``K``.)

The whole game is ``U(S) = mean_{failures} u_t(S) + valid_weight * mean_{valid} u_t(S)``; a
Shapley value is linear in the game, so values of ``U`` are the same combination of the
per-test-point values, and they sum to ``U(full) - U(empty)`` (efficiency).

By default (``valid="train"``) the validation points are a seeded draw of the training set
itself, each left out of its own game (a null player there, :func:`sorted_matches`): a point
whose label disagrees with its neighbourhood lowers their leave-one-out KNN accuracy and gets a
negative value even far from every failure. Valued on the failures alone (``valid=None``),
every point near a failure whose label differs from the failure's is "harmful": on the
label-noise suites of ``netmend bench`` on digits (sym20, pair, cifar10n-worst) that selected
44-52% of the training set at a cause precision of 0.12-0.50; with the default, 12-34% at
0.61-0.91 (``benchmarks/bench_digits``, ``benchmarks/shapley_k.md``).

The Monte-Carlo estimators on the same game (truncated Monte-Carlo Shapley, Data Banzhaf) are in
:mod:`netmend.identification.shapley_mc`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from netmend.data.checks import as_tensors, check_labels
from netmend.data.source import DataSource
from netmend.data.streaming import chunks
from netmend.data.task import Task, tree_map
from netmend.data.validate import number_option
from netmend.identification.base import Context, MethodOutput, register
from netmend.model.functional import Data
from netmend.model.training import task_of

log = logging.getLogger(__name__)

DEFAULT_K = 5
"""Neighbours of the KNN utility. K = 5 is the common default (scikit-learn's, Jia et al.'s
experiments use 1-10): K = 1 makes the value of a point depend on a single neighbour of each
failure (noisy, many exact zeros), while a large K spreads the blame for a failure over points
far from it, towards the class prior."""

METRICS = ("euclidean", "cosine")

Embed = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- embeddings


def _last_linear(model: nn.Module, x: Any, task: Task) -> nn.Linear:
    """The ``nn.Linear`` that the forward pass calls last (the classification head)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer whose input could serve as the "
            "embedding; pass embed= a callable mapping inputs [B, ...] to features [B, D] "
            "(or embed='input' to use the flattened inputs)"
        )
    called: list[nn.Linear] = []
    handles = [m.register_forward_pre_hook(lambda mod, _inp: called.append(mod)) for m in linears]
    try:
        with torch.no_grad():
            task.forward(model, x)
    finally:
        for h in handles:
            h.remove()
    if not called:
        raise ValueError(
            f"the forward pass of {type(model).__name__} calls none of its nn.Linear layers; "
            "pass embed= a callable mapping inputs [B, ...] to features [B, D]"
        )
    return called[-1]


def penultimate_embeddings(
    model: nn.Module,
    X: Data,
    chunk_size: int = 512,
    device: torch.device | str = "cpu",
    progress: bool = False,
    task: Task | None = None,
) -> torch.Tensor:
    """The input of the model's last-called ``nn.Linear`` for every example, ``[N, D]`` on CPU.

    ``X`` is a tensor or a :class:`netmend.data.source.DataSource` (read chunk by chunk);
    ``task`` calls the model (default: ``X``'s own).

    A forward pre-hook records the head's input chunk by chunk; it is removed afterwards (the
    model is otherwise untouched; netmend passes its private copy).

    Raises:
        ValueError: the model has no ``nn.Linear`` (pass ``embed=`` instead).
    """
    device = torch.device(device)
    task = task_of(X, task)
    head = _last_linear(model, X[:1].to(device), task)
    last: list[torch.Tensor] = []
    out: torch.Tensor | None = None

    def hook(_mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        last[:] = [inputs[0].detach().reshape(inputs[0].shape[0], -1)]

    handle = head.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for s in tqdm(
                list(chunks(len(X), chunk_size)),
                desc="embed",
                disable=not progress,
                leave=False,
            ):
                task.forward(model, X[s].to(device))
                e = last[0]
                if out is None:  # one [N, D] buffer, filled in place (no list of chunks)
                    out = torch.empty((len(X), e.shape[1]), dtype=e.dtype)
                out[s] = e.cpu()
    finally:
        handle.remove()
    if out is None:
        raise ValueError("no examples to embed: X is empty")
    return out


def _cast(x: Any, dtype: torch.dtype) -> Any:
    """A chunk of inputs for a user's ``embed`` callable: floating inputs in ``dtype``."""
    return tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, x)


def _flat_inputs(X: Data) -> torch.Tensor:
    """The flattened inputs ``[N, D]`` (``embed="input"``): the whole set, by definition."""
    if isinstance(X, DataSource):
        log.info(
            "embed='input' reads all %d inputs into memory (the embedding is the inputs)", len(X)
        )
        x = X.read()
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                "embed='input' needs tensor inputs; with dict inputs pass embed= a callable "
                "mapping a batch to features [B, D], or leave it None"
            )
        X = x
    return X.reshape(len(X), -1)


def embedder(
    embed: Any,
    model: nn.Module,
    dtype: torch.dtype,
    chunk_size: int,
    device: torch.device,
    progress: bool = False,
    task: Task | None = None,
) -> Callable[[Data], torch.Tensor]:
    """The embedding ``[n, ...] -> [n, D]`` (CPU) named by an ``embed`` option.

    ``embed``: ``None``, the input of the model's last ``nn.Linear``
    (:func:`penultimate_embeddings`); ``"input"``, the flattened inputs (integer inputs stay
    integer: exact distances); or a callable on a chunk of inputs (converted to ``dtype``).
    Shared by the Shapley methods and the "knn" label source of the treatments.
    """
    if embed is None:
        return lambda X: penultimate_embeddings(model, X, chunk_size, device, progress, task)
    if isinstance(embed, str):
        if embed != "input":
            raise ValueError(f"embed must be None, 'input' or a callable; got {embed!r}")
        return _flat_inputs
    if not callable(embed):
        raise ValueError(f"embed must be None, 'input' or a callable; got {type(embed).__name__}")

    def run(X: Data) -> torch.Tensor:
        with torch.no_grad():
            outs = [
                torch.as_tensor(embed(_cast(X[s].to(device), dtype)))
                for s in chunks(len(X), chunk_size)
            ]
        E = torch.cat([o.detach().reshape(o.shape[0], -1).cpu() for o in outs])
        if E.shape[0] != len(X):
            raise ValueError(
                f"embed returned {E.shape[0]} rows for {len(X)} inputs; it must map a batch "
                "[B, ...] to features [B, D]"
            )
        return E

    return run


def _embedder(ctx: Context) -> Callable[[Data], torch.Tensor]:
    return embedder(
        ctx.options.get("embed"), ctx.fm.module, ctx.theta.dtype, ctx.chunk_size, ctx.device,
        ctx.progress, ctx.fm.task,
    )  # fmt: skip


# ----------------------------------------------------------------------------- the KNN game


@dataclass
class KNNGame:
    """The KNN-utility game of a training set against a set of test points.

    Attributes:
        E: training embeddings ``[N, D]``; y: training labels ``[N]``.
        Et: test embeddings ``[T, D]`` (failures first, then validation points); yt: ``[T]``.
        weights: ``[T]`` float64, ``U(S) = sum_t weights[t] * u_t(S)``.
        num_failures: ``M``, the first ``M`` test points are the query failures.
        K: neighbours; metric: "euclidean" or "cosine".
        exclude: ``[T]`` long or ``None``: for a test point that is itself training point
            ``exclude[t]`` (self-validation, ``valid="train"``), that point is left out of the
            test point's game (``-1``: none), see :func:`sorted_matches`.
    """

    E: torch.Tensor
    y: torch.Tensor
    Et: torch.Tensor
    yt: torch.Tensor
    weights: np.ndarray
    num_failures: int
    K: int
    metric: str
    exclude: torch.Tensor | None = None

    def distances(self, t: slice) -> torch.Tensor:
        """Distances of test points ``t`` to every training point, ``[len(t), N]``."""
        return pairwise_distances(self.Et[t], self.E, self.metric)

    def excluded(self, t: slice) -> torch.Tensor | None:
        """``exclude`` of test points ``t`` (``None`` when nothing is excluded)."""
        return None if self.exclude is None else self.exclude[t]


def pairwise_distances(A: torch.Tensor, B: torch.Tensor, metric: str) -> torch.Tensor:
    """``[len(A), len(B)]`` Euclidean or cosine (``1 - cos``) distances."""
    if metric == "euclidean":
        return torch.cdist(A, B)
    if metric == "cosine":
        a = A / A.norm(dim=1, keepdim=True).clamp_min(1e-12)
        b = B / B.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return 1.0 - a @ b.T
    raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")


def sorted_matches(
    D: torch.Tensor,
    y_train: torch.Tensor,
    y_test: torch.Tensor,
    exclude: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training points by distance (stable: ties by index) and their label matches, ``[T, N]``.

    ``exclude`` ``[T]`` (``-1``: none) leaves training point ``exclude[t]`` out of test point
    ``t``'s game: it is put last with no label match. In the KNN utility (matches among the
    ``min(K, |S|)`` nearest, divided by ``K``) such a point never changes ``u_t(S)``: when
    ``|S| <= K`` it adds no match, otherwise it is not among the ``K`` nearest. It is a null
    player, so its value is 0 and every other value equals that of the game without it
    (Shapley and Banzhaf values are unchanged by adding a null player).

    Returns:
        ``order`` ``[T, N]`` (nearest first) and ``match`` ``[T, N]`` in that order, of
        ``dtype`` (default: ``D``'s floating dtype, else float64).
    """
    rows = None
    if exclude is not None:
        exclude = exclude.to(D.device)
        rows = torch.nonzero(exclude >= 0).squeeze(1)
        if rows.numel():
            D = D.clone()
            D[rows, exclude[rows]] = math.inf
    dt = dtype or (D.dtype if D.is_floating_point() else torch.float64)
    order = torch.argsort(D, dim=1, stable=True)  # [T, N], nearest first
    match = (y_train.to(D.device)[order] == y_test.to(D.device)[:, None]).to(dt)
    if rows is not None and rows.numel():
        match[rows, -1] = 0
    return order, match


def knn_shapley_from_distances(
    D: torch.Tensor,
    y_train: torch.Tensor,
    y_test: torch.Tensor,
    K: int,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact KNN-Shapley values of every training point for every test point, ``[T, N]``.

    Jia et al. (2019), Theorem 1, vectorised over test points: one stable sort per row, then the
    recursion as a reversed cumulative sum. Ties in distance are broken by training index.
    These are *values* (positive = helpful); row ``t`` sums to ``u_t(full)``.

    Args:
        D: distances ``[T, N]`` of the test points to the training points.
        y_train: ``[N]`` labels; y_test: ``[T]`` labels.
        K: neighbours (any ``K >= 1``, also ``K > N``).
        exclude: ``[T]`` or ``None``: a training point left out of each test point's game
            (``-1``: none); its value there is 0, see :func:`sorted_matches`.
    """
    T, N = D.shape
    order, match = sorted_matches(D, y_train, y_test, exclude)
    dt = match.dtype
    i = torch.arange(1, N, device=D.device, dtype=dt)  # ranks 1 .. N-1
    coef = torch.clamp(i, max=K) / (i * K)
    step = (match[:, :-1] - match[:, 1:]) * coef  # [T, N-1]: s_(i) - s_(i+1)
    last = match[:, -1] * (min(K, N) / (N * K))  # [T]
    s = torch.empty_like(match)
    s[:, -1] = last
    s[:, :-1] = last[:, None] + step.flip(1).cumsum(1).flip(1)
    return torch.empty_like(s).scatter_(1, order, s)


def knn_banzhaf_from_distances(
    D: torch.Tensor,
    y_train: torch.Tensor,
    y_test: torch.Tensor,
    K: int,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact Banzhaf values of every training point in the KNN game of each test point, ``[T, N]``.

    The closed form behind :func:`netmend.identification.shapley_mc.msr_banzhaf` on this game.
    With the training points sorted by distance (``(i)``: the i-th nearest, ties by index) and
    the other points each in the subset with probability 1/2, adding ``(i)`` changes ``u_t``
    only if fewer than ``K`` nearer points are present (probability
    ``F(i-1) = P(Bin(i-1, 1/2) <= K-1)``); it then evicts ``(j), j > i``, when ``(j)`` is present
    with exactly ``K-1`` of the other ``j-2`` nearer points (probability ``p(j-2) / 2``,
    ``p(n) = P(Bin(n, 1/2) = K-1)``):

        b_(i) = (1[y_(i) = y_t] F(i-1) - sum_{j > i} 1[y_(j) = y_t] p(j-2) / 2) / K.

    One sort and a reversed cumulative sum per test point, ``O(N log N)``. ``exclude`` as in
    :func:`knn_shapley_from_distances`.
    """
    T, N = D.shape
    order, match = sorted_matches(D, y_train, y_test, exclude)
    dt = match.dtype
    n = torch.arange(N, device=D.device, dtype=torch.float64)  # 0 .. N-1
    q = torch.arange(K, device=D.device, dtype=torch.float64)  # 0 .. K-1
    # log P(Bin(n, 1/2) = q) for every n and q <= K-1 (zero where q > n)
    logp = (
        torch.lgamma(n[:, None] + 1)
        - torch.lgamma(q[None] + 1)
        - torch.lgamma((n[:, None] - q[None]).clamp_min(0) + 1)
        - n[:, None] * math.log(2.0)
    )
    pmf = torch.where(q[None] <= n[:, None], logp.exp(), torch.zeros(()).to(logp))
    F = pmf.sum(1).clamp(max=1.0).to(dt)  # F[n] = P(Bin(n, 1/2) <= K-1)
    p_last = pmf[:, K - 1].to(dt)  # p[n] = P(Bin(n, 1/2) = K-1)
    evict = torch.zeros_like(match)  # evict[:, i] = sum_{j > i} m_(j) p(j-2) / 2 (0-based j)
    if N > 1:
        term = match[:, 1:] * p_last[: N - 1] / 2  # j = 1 .. N-1 (0-based), j-2 -> j-1
        evict[:, :-1] = term.flip(1).cumsum(1).flip(1)
    b = (match * F - evict) / K
    return torch.empty_like(b).scatter_(1, order, b)


def knn_utility_from_distances(
    D: torch.Tensor,
    y_train: torch.Tensor,
    y_test: torch.Tensor,
    K: int,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """``u_t(full)`` for every test point ``[T]``: the fraction of its ``K`` nearest training
    points that carry its label (divided by ``K`` even when ``N < K``); ``exclude`` as in
    :func:`knn_shapley_from_distances`."""
    _, match = sorted_matches(D, y_train, y_test, exclude, torch.float64)
    return match[:, :K].sum(1) / K


def _value_chunks(
    game: KNNGame, device: torch.device | str, kind: str, max_elems: int
) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(s, values)`` for consecutive test points ``s``: their exact KNN-Shapley (or Banzhaf)
    values ``[len(s), N]`` float64 on the CPU, at most ``max_elems`` distances at a time."""
    exact = knn_banzhaf_from_distances if kind == "banzhaf" else knn_shapley_from_distances
    N, T = game.E.shape[0], game.Et.shape[0]
    device = torch.device(device)
    E, y = game.E.to(device), game.y.to(device)
    for s in chunks(T, max(1, max_elems // max(N, 1))):
        D = pairwise_distances(game.Et[s].to(device), E, game.metric)
        yield s, exact(D, y, game.yt[s], game.K, game.excluded(s)).double().cpu()


def knn_shapley_values(
    game: KNNGame, device: torch.device | str = "cpu", kind: str = "shapley"
) -> np.ndarray:
    """Per-test-point exact KNN-Shapley (or, ``kind="banzhaf"``, KNN-Banzhaf) values ``[N, T]``
    float64 (positive = helpful).

    Streams the test points in chunks so that at most ``~2^22`` distances are held at once;
    ``O(T N (D + log N))`` time.
    """
    out = np.empty((game.E.shape[0], game.Et.shape[0]), dtype=np.float64)
    for s, v in _value_chunks(game, device, kind, 1 << 22):
        out[:, s] = v.T.numpy()
    return out


@dataclass
class GameValues:
    """What the cause scores need from the per-test-point values ``[N, T]``, without holding
    them: ``T`` grows with a validation set, ``M`` (the failures) stays small.

    Attributes:
        total: ``values @ weights`` ``[N]``, the values in the whole game.
        per_failure: ``values[:, :M]`` ``[N, M]``.
        stderr: ``[N]``, :func:`sampling_stderr` of the values.
    """

    total: np.ndarray
    per_failure: np.ndarray
    stderr: np.ndarray


def _groups(game: KNNGame) -> list[tuple[int, int, float]]:
    """``(lo, hi, W)``: the test points ``[lo, hi)`` of each group (failures, validation) and
    the group's total weight ``W``."""
    M, T = game.num_failures, int(game.Et.shape[0])
    return [(lo, hi, float(np.sum(game.weights[lo:hi]))) for lo, hi in ((0, M), (M, T))]


def _stderr_from_moments(n: int, W: float, total: np.ndarray, sq: np.ndarray) -> np.ndarray:
    """``W^2 s^2 / n`` from a group's sums and sums of squares (``s^2``: sample variance)."""
    if n < 2:
        return np.zeros_like(total)
    var = np.maximum(sq - total**2 / n, 0.0) / (n - 1)
    return W**2 * var / n


def knn_game_values(
    game: KNNGame,
    device: torch.device | str = "cpu",
    kind: str = "shapley",
    max_elems: int = 1 << 22,
) -> GameValues:
    """:func:`knn_shapley_values` (or Banzhaf), reduced on the fly to :class:`GameValues`.

    Memory ``O(N M)`` plus one chunk of at most ``max_elems`` distances, whatever the number of
    validation points; the same numbers as :func:`reduce_values` of :func:`knn_shapley_values`.
    """
    N, M = game.E.shape[0], game.num_failures
    w = torch.as_tensor(game.weights, dtype=torch.float64)
    total = np.zeros(N)
    per_failure = np.empty((N, M))
    groups = _groups(game)
    sums = [np.zeros(N) for _ in groups]
    sqs = [np.zeros(N) for _ in groups]
    for s, v in _value_chunks(game, device, kind, max_elems):  # v: [len(s), N]
        total += (w[s] @ v).numpy()
        lo, hi = s.start, s.stop
        if lo < M:
            per_failure[:, lo : min(hi, M)] = v[: min(hi, M) - lo].T.numpy()
        for g, (glo, ghi, _) in enumerate(groups):
            a, b = max(lo, glo), min(hi, ghi)
            if a < b:
                part = v[a - lo : b - lo]
                sums[g] += part.sum(0).numpy()
                sqs[g] += (part**2).sum(0).numpy()
    var = sum(
        _stderr_from_moments(ghi - glo, W, sums[g], sqs[g])
        for g, (glo, ghi, W) in enumerate(groups)
    )
    return GameValues(total, per_failure, np.sqrt(var))


# ----------------------------------------------------------------------------- options


def check_options(ctx: Context, known: set[str]) -> None:
    """Raise on an option the method does not know (a typo would otherwise be ignored)."""
    unknown = set(ctx.options) - known
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; this method takes {sorted(known)}")


GAME_OPTIONS = {"K", "metric", "valid", "valid_weight", "valid_size", "embed"}

DEFAULT_VALID_SIZE = 1000
"""Training points drawn (seeded) as validation points when ``valid="train"``: the standard
error of a value over them falls as ``1/sqrt(V)``; each costs a sort of the training set."""


def _self_validation(ctx: Context) -> torch.Tensor:
    """``valid="train"``: a seeded draw of ``min(N, valid_size)`` training indices ``[V]``."""
    size = number_option(ctx.options, "valid_size", DEFAULT_VALID_SIZE, integer=True, low=1)
    g = torch.Generator().manual_seed(ctx.seed)
    return torch.randperm(ctx.N, generator=g)[: min(ctx.N, size)].sort().values


def build_game(ctx: Context) -> KNNGame:
    """The KNN game of ``ctx``: embeddings of the training set, the failures and ``valid``.

    Options read: ``K``, ``metric``, ``embed``, ``valid`` and ``valid_weight`` (the weight of
    the validation accuracy against the failures' accuracy, default 1.0). ``valid`` is

    * ``"train"`` (the default): the training set validates itself. ``valid_size`` (default
      :data:`DEFAULT_VALID_SIZE`) training points, drawn with the seed, are validation points,
      each left out of its own game (:func:`sorted_matches`). A point whose label disagrees
      with its neighbours' lowers their leave-one-out KNN accuracy, so it gets a negative value
      wherever it is, not only next to a failure: without this term every point next to a
      failure but of another class than the failure's is "harmful" (see the module
      docstring for what that selects on digits).
    * an ``(Xv, yv)`` pair or dataset of trusted clean examples with correct labels;
    * ``None``: the failures alone.
    """
    K = number_option(ctx.options, "K", DEFAULT_K, integer=True, low=1)
    metric = ctx.options.get("metric", "euclidean")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")
    valid_weight = number_option(ctx.options, "valid_weight", 1.0)
    embed = _embedder(ctx)
    M = int(len(ctx.Xq))
    Xt, yt = ctx.Xq, ctx.yq
    weights = np.full(M, 1.0 / M)
    valid = ctx.options.get("valid", "train")
    self_idx: torch.Tensor | None = None
    if isinstance(valid, str):
        if valid != "train":
            raise ValueError(
                f"valid must be 'train', None or an (Xv, yv) pair of clean examples; got {valid!r}"
            )
        self_idx = _self_validation(ctx)
    elif valid is not None:
        Xv, yv = as_tensors(valid, "valid")
        Xt = ctx.Xq.read() if isinstance(ctx.Xq, DataSource) else ctx.Xq  # the M failures
        if not isinstance(Xt, torch.Tensor) or Xv.shape[1:] != Xt.shape[1:]:
            raise ValueError(
                f"valid has input shape {tuple(Xv.shape[1:])} unlike the failures' inputs: pass "
                "valid=(Xv, yv) with tensor inputs like the training set"
            )
        with torch.no_grad():
            classes = int(ctx.fm.logits(ctx.theta, ctx.Xq[:1].to(ctx.device)).shape[-1])
        check_labels(yv, classes, "valid")
        if Xv.dtype != Xt.dtype:  # e.g. uint8 failures, float valid: both as the model's dtype
            Xt, Xv = Xt.to(ctx.theta.dtype), Xv.to(ctx.theta.dtype)
        Xt = torch.cat([Xt, Xv.to(Xt.dtype)])
        yt = torch.cat([yt, yv.to(ctx.yq.dtype)])
        weights = np.concatenate([weights, np.full(Xv.shape[0], valid_weight / Xv.shape[0])])
    E = embed(ctx.X).to(ctx.theta.dtype)  # cdist needs floats
    Et = embed(Xt).to(ctx.theta.dtype)
    if E.shape[0] != ctx.N or Et.shape[1] != E.shape[1]:
        raise ValueError("embed must map every input batch [B, ...] to features [B, D]")
    y, yt, exclude = ctx.y.cpu(), yt.cpu(), None
    if self_idx is not None:
        V = int(self_idx.numel())
        Et, yt = torch.cat([Et, E[self_idx]]), torch.cat([yt, y[self_idx].to(yt.dtype)])
        weights = np.concatenate([weights, np.full(V, valid_weight / V)])
        exclude = torch.cat([torch.full((M,), -1, dtype=torch.long), self_idx])
    return KNNGame(E, y, Et, yt, weights, M, K, metric, exclude)


def reduce_values(game: KNNGame, values: np.ndarray) -> GameValues:
    """:class:`GameValues` of per-test-point values ``[N, T]``."""
    M = game.num_failures
    return GameValues(values @ game.weights, values[:, :M], sampling_stderr(game, values))


def game_output(game: KNNGame, values: GameValues, info: dict[str, Any]) -> MethodOutput:
    """Scores ``-values.total`` ``[N]`` and per-failure scores ``-values.per_failure``
    ``[N, M]`` (both positive = harmful)."""
    scores = -values.total
    info = dict(info, default_k="positive", K=game.K, metric=game.metric)
    num_valid = int(game.Et.shape[0] - game.num_failures)
    info["validation"] = "train" if game.exclude is not None else ("given" if num_valid else None)
    info["num_validation"] = num_valid
    info["num_harmful"] = int((scores > 0).sum())
    pf = (-values.per_failure).astype(np.float32)
    return MethodOutput(scores=scores, per_failure=pf, info=info)


DEFAULT_SE_Z = {"knn_shapley": 0.5, "tmc_shapley": 0.5, "banzhaf": 0.0, "banzhaf_exact": 1.0}
"""Default ``se_z`` per method (``"banzhaf_exact"``: "banzhaf" with ``estimator="exact"``), see
:func:`with_se_z`. Chosen by ``benchmarks/shapley_k.py`` (digits sym20/pair/CIFAR-10N-worst
and MNIST sym20, seeds 0-2, with the default ``valid="train"``), among ``z`` in {0, 0.5, 1, 2}:
cells whose ``k=None`` selection is within 0.05 of the precision of the best K chosen with
hindsight (the max-F1 top-K of the same scores), and of its F1 too. knn_shapley and
tmc_shapley: 12/12 at 0.5, 11/12 also on F1 (sign: 9/12 and 8/12); exact Banzhaf: 12/12 at
1 (7/12 also on F1; 0.5 gives 9/12 on both); MSR Banzhaf: 6/12 at 0 and at 0.5, so 0 (its
5,000 subsets leave the ranking itself poor). With a clean validation set instead the same
defaults meet 12/12, 12/12, 12/12 and 5/12. A larger ``z`` raises precision further at a loss
of recall."""


def sampling_stderr(game: KNNGame, values: np.ndarray) -> np.ndarray:
    """Standard error ``[N]`` of the values ``values @ weights`` over the draw of the test points.

    ``U`` is a weighted sum of two sample means: over the ``M`` failures and over the ``V``
    validation points. Taking each as a random sample of its population (failures of this kind,
    clean data), a training point's squared standard error is ``sum_g W_g^2 s_g^2 / n_g``, with
    ``s_g^2`` the sample variance of its per-test values ``values[:, g]`` in group ``g``, ``n_g``
    the group's size and ``W_g`` its total weight. A group of one test point contributes 0.

    Args:
        game: the game (its ``weights`` and ``num_failures``).
        values: per-test-point values ``[N, T]`` (failures first, then validation points).
    """
    var = np.zeros(values.shape[0])
    for lo, hi, W in _groups(game):
        if hi - lo >= 2:
            var += W**2 * values[:, lo:hi].var(1, ddof=1) / (hi - lo)
    return np.sqrt(var)


def with_se_z(out: MethodOutput, stderr: np.ndarray, se_z: float) -> MethodOutput:
    """Score ``r = -value - se_z * SE``: the one-sided lower confidence bound of the harm.

    With ``se_z = 0`` the score is minus the value and ``k=None`` selects every example of
    negative value. The values of many clean examples are slightly negative: in the KNN game a
    point far from a test point whose label it does not share still gets about
    ``-P(label match)/rank`` (it sometimes evicts a matching neighbour from a small subset), and
    a Monte-Carlo estimate of a ~0 value has a random sign. With ``se_z > 0``, ``k=None``
    selects only the examples whose value is below zero by more than ``se_z`` standard errors
    (a one-sided z-test of ``value < 0``). ``info["value_stderr"]`` ``[N]`` holds ``SE``, so
    ``scores + se_z * SE`` recovers ``-value``.
    """
    out.info.update(se_z=se_z, value_stderr=stderr)
    if se_z > 0:
        out.scores = out.scores - se_z * stderr
        out.info["num_harmful"] = int((out.scores > 0).sum())
    return out


@register("knn_shapley", options=GAME_OPTIONS | {"se_z"})
def knn_shapley(ctx: Context) -> MethodOutput:
    """Exact KNN-Shapley cause scores ``r = -value``, ``[N]``, positive = harmful.

    The value is the Shapley value of the training example in the game "KNN accuracy on the
    failures (+ ``valid_weight`` x accuracy on ``valid``)" on the model's penultimate-layer
    embeddings. Per-failure scores ``[N, M]`` are minus the values for each failure alone.
    Select causes with ``k="positive"`` (the default for this method, see ``info["default_k"]``).

    Options: ``K`` (5), ``metric`` ("euclidean" | "cosine"), ``valid`` ("train": the training
    set validates itself, leave-one-out; an ``(Xv, yv)`` clean set; or None, see
    :func:`build_game`), ``valid_size`` (1000, for "train"), ``valid_weight`` (1.0),
    ``embed`` (None = input of the last ``nn.Linear``; "input"; or a
    callable ``[B, ...] -> [B, D]``), ``se_z`` (:data:`DEFAULT_SE_Z`: the score is
    ``-value - se_z * SE``, ``SE`` the standard error over the sampling of the failures and
    validation points, :func:`sampling_stderr`; so ``k=None`` selects the values below zero by
    more than ``se_z`` standard errors, see :func:`with_se_z`).

    Cost: ``O(T N (D + log N))`` for ``T`` failures + validation points, memory ``O(N M)``.
    """
    check_options(ctx, GAME_OPTIONS | {"se_z"})
    se_z = number_option(ctx.options, "se_z", DEFAULT_SE_Z["knn_shapley"])
    game = build_game(ctx)
    values = knn_game_values(game, ctx.device)
    out = game_output(game, values, {"estimator": "exact"})
    return with_se_z(out, values.stderr, se_z)
