"""Monte-Carlo data valuation: truncated Monte-Carlo Shapley and Data Banzhaf (MSR).

Both estimate values in a game ``U(S)`` over subsets ``S`` of the ``N`` training points, given as
a :class:`SetUtility`: ``per_test(masks [B, N] bool) -> [B, T]`` utilities per test point and
``weights [T]`` with ``U(S) = per_test(S) @ weights``. Values are estimated per test point
(``[N, T]``) and combined with the weights, so the per-failure values come for free.

* :func:`tmc_shapley` (Ghorbani & Zou 2019, "Data Shapley"): Shapley values as the mean marginal
  contribution over random permutations. A permutation is cut short ("truncated") once
  ``patience`` consecutive prefixes have a utility within ``truncation_tol`` of ``U(full)``; the
  remaining points get marginal 0 (Ghorbani & Zou's own code also waits for 5 such prefixes).
  The marginals of one permutation sum to ``U(prefix) - U(empty)``, i.e. to
  ``U(full) - U(empty)`` within ``truncation_tol`` (exactly, with ``truncation_tol=0``).
* :func:`msr_banzhaf` (Wang & Jia 2023, "Data Banzhaf"): subsets with each point included with
  probability 1/2; every sample updates every point (maximum sample reuse):
  ``value_i = mean U(S | i in S) - mean U(S | i not in S)``. Banzhaf values are *not*
  efficient (they do not sum to ``U(full) - U(empty)`` in general); they are the semivalue
  most robust to noise in ``U``.

Selection (both): the estimators track the Monte-Carlo standard error of every value, and the
registered methods' option ``se_z`` selects only the values below zero by more than ``se_z``
standard errors (a point whose true value is ~0 has an estimate of random sign, so plain sign
selection takes about half of them; see :func:`netmend.identification.shapley.with_se_z` and
``benchmarks/shapley_k.py``).

Stopping (both): after every block of ``block`` permutations / subsets, the running values
``v_t`` (combined with the weights, ``[N]``) are compared with those ``window`` draws earlier;
the run stops when ``||v_t - v_{t-window}||_1 / ||v_t||_1 < tol`` (the L1 version of Ghorbani &
Zou's "mean relative change below 5% over the last 100 permutations", which does not blow up on
values near 0), or at the maximum number of draws.

Parallelism and determinism: block ``b`` draws from ``SeedSequence(seed, spawn_key=(stream, b))``
(a child of the run seed), whichever process computes it, and blocks are accumulated and checked
in block order. The result is therefore a function of ``seed`` alone: ``n_jobs=2`` gives the
same values as ``n_jobs=1``. ``n_jobs > 1`` uses a "forkserver" (else "spawn") process pool,
each worker receiving the utility once, so a script that uses it needs the usual
``if __name__ == "__main__":`` guard; ``n_jobs=1`` runs in-process.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from netmend.data.streaming import chunks
from netmend.data.validate import number_option
from netmend.identification.base import Context, MethodOutput, register
from netmend.identification.shapley import (
    DEFAULT_SE_Z,
    GAME_OPTIONS,
    KNNGame,
    build_game,
    check_options,
    game_output,
    knn_game_values,
    pairwise_distances,
    reduce_values,
    sorted_matches,
    with_se_z,
)

CHUNK_ELEMS = 1 << 22
"""Largest ``[subsets, tests, N]`` block evaluated at once by :class:`KNNUtility`."""

_STREAMS = {"tmc": 0x544D43, "banzhaf": 0x42414E}


class SetUtility(Protocol):
    """A game over subsets of ``num_points`` training points, per test point.

    ``per_test(masks)`` maps ``[B, N]`` bool membership masks to ``[B, T]`` float64 utilities;
    the game is ``U(S) = per_test(S) @ weights``. Must be picklable for ``n_jobs > 1``.
    """

    num_points: int
    weights: np.ndarray

    def per_test(self, masks: np.ndarray) -> np.ndarray: ...


class KNNUtility:
    """The KNN utility of :mod:`netmend.identification.shapley`, for arbitrary subsets.

    ``u_t(S) = (1/K) #{the min(K, |S|) nearest points of S to test point t with its label}``,
    ties broken by training index (the same game as the exact KNN-Shapley). Holds the rank of
    every training point for every test point (``[T, N]`` int32) and the label matches in rank
    order; evaluating ``B`` subsets costs ``O(B T N)``.
    """

    def __init__(self, game: KNNGame) -> None:
        N, T = game.E.shape[0], game.Et.shape[0]
        self.num_points, self.K = N, game.K
        self.weights = np.asarray(game.weights, dtype=np.float64)
        rank = np.empty((T, N), dtype=np.int32)
        match = np.zeros((T, N + 1), dtype=bool)  # in rank order; column N: "no neighbour"
        for s in chunks(T, max(1, CHUNK_ELEMS // max(N, 1))):
            D = pairwise_distances(game.Et[s], game.E, game.metric)
            order, m = sorted_matches(D, game.y, game.yt[s], game.excluded(s), torch.bool)
            r = torch.empty_like(order)
            r.scatter_(1, order, torch.arange(N).expand_as(order).contiguous())
            rank[s] = r.numpy()
            match[s, :N] = m.numpy()
        self.rank, self.match = rank, match

    @property
    def num_tests(self) -> int:
        return int(self.rank.shape[0])

    def per_test(self, masks: np.ndarray) -> np.ndarray:
        """``[B, T]`` KNN utilities of the subsets ``masks`` ``[B, N]`` (bool)."""
        masks = np.asarray(masks, dtype=bool)
        B, N = masks.shape
        T, k = self.num_tests, min(self.K, N)
        rank = torch.from_numpy(self.rank)
        match = torch.from_numpy(self.match).double()
        out = np.empty((B, T), dtype=np.float64)
        for s in chunks(B, max(1, CHUNK_ELEMS // max(T * N, 1))):
            m = torch.from_numpy(masks[s])
            r = torch.where(m[:, None, :], rank[None], N)  # [b, T, N]; absent points rank N
            top = torch.topk(r, k, dim=2, largest=False, sorted=False).values.long()
            hits = match[None].expand(r.shape[0], T, N + 1).gather(2, top)
            out[s] = (hits.sum(2) / self.K).numpy()
        return out

    def prefix_marginals(self, perm: np.ndarray) -> np.ndarray:
        """Exact marginals ``u_t(P_j) - u_t(P_{j-1})`` of adding the point at every position
        ``j`` of the permutation ``perm`` to the prefix ``P_{j-1}``, ``[N, T]``.

        A point changes ``u_t`` only when it enters the current ``K`` nearest (then it evicts
        the ``K``-th nearest): ``(1[its label matches] - 1[the evicted one's matches]) / K``.
        Entries are rare (about ``K ln(N/K)`` per test point), so only candidates are visited:
        a point at a position in ``[K 2^m, K 2^(m+1))`` can enter only if its rank is below the
        ``K``-th smallest rank of the first ``K 2^m`` points (one ``np.partition`` per window).
        The loop runs over candidate slots (about ``2 K log2(N/K)``), vectorised over test
        points; ``O(T N)`` per permutation in all.
        """
        a = self.rank[:, perm].astype(np.int64)  # [T, N] ranks in permutation order
        T, N = a.shape
        k = min(self.K, N)
        cand = np.ones((T, N), dtype=bool)
        lo = k
        while lo < N:
            hi = min(N, 2 * lo)
            th = np.partition(a[:, :lo], k - 1, axis=1)[:, k - 1]
            cand[:, lo:hi] = a[:, lo:hi] < th[:, None]
            lo = hi
        rows, cols = np.nonzero(cand)  # row-major: positions ascending within each row
        counts = np.bincount(rows, minlength=T)
        slot = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
        L = int(counts.max()) if T else 0
        where = np.full((T, L), N, dtype=np.int64)  # N: padding
        where[rows, slot] = cols
        t = np.arange(T)
        top = np.full((T, k), N, dtype=np.int64)  # ranks of the current K nearest, ascending
        marg = np.zeros((N + 1, T))  # row N absorbs the padding
        for c in range(L):
            j = where[:, c]
            new = np.where(j < N, a[t, np.minimum(j, N - 1)], N)
            old = top[:, -1]
            enter = new < old
            d = (self.match[t, new].astype(np.float64) - self.match[t, old]) / self.K
            marg[np.where(enter, j, N), t] = np.where(enter, d, 0.0)
            top[:, -1] = np.where(enter, new, old)
            top.sort(axis=1)
        return marg[:N]


@dataclass
class FunctionUtility:
    """A scalar game ``fn(masks [B, N] bool) -> [B]`` as a :class:`SetUtility` (``T = 1``).

    ``fn`` must be picklable (a module-level function or object) for ``n_jobs > 1``.
    """

    fn: Callable[[np.ndarray], np.ndarray]
    num_points: int
    weights: np.ndarray = field(default_factory=lambda: np.ones(1))

    def per_test(self, masks: np.ndarray) -> np.ndarray:
        return np.asarray(self.fn(np.asarray(masks, dtype=bool)), dtype=np.float64).reshape(-1, 1)


@dataclass
class MCResult:
    """Result of a Monte-Carlo valuation.

    Attributes:
        values: ``[N, T]`` float64 values per test point (positive = helpful).
        total: ``[N]`` ``values @ weights``, the values in the game ``U``.
        stderr: ``[N]`` the Monte-Carlo standard error of ``total`` (see :func:`tmc_shapley`,
            :func:`msr_banzhaf`); 0 where every draw gave the point the same marginal.
        draws: permutations (TMC) or subsets (Banzhaf) used.
        converged: whether the stopping criterion was met before the maximum.
        change: the last relative change ``||v_t - v_{t-window}||_1 / ||v_t||_1`` (nan if the
            window was never filled).
        info: estimator diagnostics (e.g. the mean fraction of each permutation evaluated).
    """

    values: np.ndarray
    total: np.ndarray
    stderr: np.ndarray
    draws: int
    converged: bool
    change: float
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- one block


def _rng(kind: str, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STREAMS[kind], index)))


def _truncation_runs(close: np.ndarray, run: int) -> np.ndarray:
    """Length of the run of consecutive ``close`` prefixes ending at each position, given a run
    of ``run`` before the first one."""
    n = close.shape[0]
    last_far = np.maximum.accumulate(np.where(close, -1, np.arange(n)))
    return np.where(last_far < 0, run + np.arange(1, n + 1), np.arange(n) - last_far)


def _tmc_block(
    utility: SetUtility, seed: int, index: int, size: int, p: dict[str, Any]
) -> dict[str, Any]:
    """Sum of the per-test marginals of ``size`` truncated permutations, ``[N, T]``.

    Uses ``utility.prefix_marginals(perm)`` when the utility has it (exact marginals of every
    position at once, e.g. :class:`KNNUtility`), else evaluates prefixes in growing chunks
    until the permutation is truncated.
    """
    rng = _rng("tmc", seed, index)
    N, w = utility.num_points, utility.weights
    T = w.shape[0]
    acc = np.zeros((N, T))
    sq = np.zeros(N)  # sum over permutations of the squared weighted marginal, for the SE
    cap = max(1, CHUNK_ELEMS // max(T * N, 1))
    fast = getattr(utility, "prefix_marginals", None)
    u_empty, u_full, tol, patience = p["u_empty"], p["u_full"], p["truncation_tol"], p["patience"]
    evaluated = 0
    for _ in range(size):
        perm = rng.permutation(N)
        if fast is not None:
            marg = fast(perm)  # [N, T], row j: marginal of the point at position j
            u = float(u_empty @ w) + np.cumsum(marg @ w)
            hit = np.flatnonzero(_truncation_runs(np.abs(u - u_full) <= tol, 0) >= patience)
            stop = int(hit[0]) + 1 if hit.size else N
            acc[perm[:stop]] += marg[:stop]
            sq[perm[:stop]] += (marg[:stop] @ w) ** 2
            evaluated += stop
            continue
        pos = np.empty(N, dtype=np.int64)
        pos[perm] = np.arange(N)
        prev, run, start, b = u_empty, 0, 0, min(cap, 8)
        while start < N:
            end = min(N, start + b)
            j = np.arange(start, end)
            ut = utility.per_test(pos[None, :] <= j[:, None])  # prefixes up to position j
            runs = _truncation_runs(np.abs(ut @ w - u_full) <= tol, run)
            hit = np.flatnonzero(runs >= patience)
            stop = int(hit[0]) + 1 if hit.size else end - start
            d = np.diff(np.vstack([prev[None], ut[:stop]]), axis=0)
            acc[perm[start : start + stop]] += d
            sq[perm[start : start + stop]] += (d @ w) ** 2
            if hit.size:
                start += stop
                break
            prev, run, start, b = ut[-1], int(runs[-1]), end, min(cap, 2 * b)
        evaluated += start
    return {"sum": acc, "sq": sq, "n": size, "evaluated": evaluated}


def _banzhaf_block(
    utility: SetUtility, seed: int, index: int, size: int, p: dict[str, Any]
) -> dict[str, Any]:
    """MSR sums of ``size`` subsets (each point in with probability 1/2)."""
    rng = _rng("banzhaf", seed, index)
    masks = rng.random((size, utility.num_points)) < 0.5
    ut = utility.per_test(masks)  # [size, T]
    u2 = (ut @ utility.weights) ** 2  # [size] squared game utilities, for the SE
    return {
        "in_sum": masks.T.astype(np.float64) @ ut,  # [N, T]
        "in_n": masks.sum(0).astype(np.float64),  # [N]
        "all_sum": ut.sum(0),  # [T]
        "in_sq": masks.T.astype(np.float64) @ u2,  # [N]
        "all_sq": u2.sum(),
        "n": size,
    }


_BLOCKS = {"tmc": _tmc_block, "banzhaf": _banzhaf_block}


def _mean_se(total: np.ndarray, sq: np.ndarray, n: np.ndarray | float) -> np.ndarray:
    """Squared standard error of a mean from the sum and the sum of squares of ``n`` draws
    (sample variance with ``n - 1``; 0 where ``n < 2``)."""
    n = np.asarray(n, dtype=np.float64)
    var = np.maximum(sq - total**2 / np.maximum(n, 1), 0.0) / np.maximum(n - 1, 1)
    return np.where(n > 1, var / np.maximum(n, 1), 0.0)


def _tmc_stderr(acc: dict[str, Any], w: np.ndarray) -> np.ndarray:
    """SE of the TMC value ``[N]``: the spread of the point's weighted marginal over the
    permutations (a truncated permutation gives it marginal 0), divided by sqrt(draws)."""
    return np.sqrt(_mean_se(acc["sum"] @ w, acc["sq"], acc["n"]))


def _banzhaf_stderr(acc: dict[str, Any], w: np.ndarray) -> np.ndarray:
    """SE of the MSR value ``[N]``, ``sqrt(var_in / n_in + var_out / n_out)``: the two-sample
    standard error of ``mean U(S | i in S) - mean U(S | i not in S)`` (Wang & Jia 2023)."""
    n_in = acc["in_n"]
    n_out = acc["n"] - n_in
    in_u = acc["in_sum"] @ w
    out_u = float(acc["all_sum"] @ w) - in_u
    var = _mean_se(in_u, acc["in_sq"], n_in) + _mean_se(out_u, acc["all_sq"] - acc["in_sq"], n_out)
    return np.where((n_in > 0) & (n_out > 0), np.sqrt(var), 0.0)


def _tmc_estimate(acc: dict[str, Any]) -> np.ndarray:
    return acc["sum"] / acc["n"]


def _banzhaf_estimate(acc: dict[str, Any]) -> np.ndarray:
    n_in = acc["in_n"][:, None]
    n_out = acc["n"] - n_in
    mean_in = acc["in_sum"] / np.maximum(n_in, 1)
    mean_out = (acc["all_sum"][None] - acc["in_sum"]) / np.maximum(n_out, 1)
    # a point never (or always) drawn has no estimate: value 0 until it is
    return np.where((n_in > 0) & (n_out > 0), mean_in - mean_out, 0.0)


# ----------------------------------------------------------------------------- block runners

_WORKER_UTILITY: SetUtility | None = None


def _init_worker(utility: SetUtility) -> None:
    global _WORKER_UTILITY
    torch.set_num_threads(1)
    _WORKER_UTILITY = utility


def _worker_block(kind: str, seed: int, index: int, size: int, p: dict[str, Any]) -> dict:
    if _WORKER_UTILITY is None:  # pragma: no cover - the initializer always runs first
        raise RuntimeError("worker was not initialised with a utility")
    return _BLOCKS[kind](_WORKER_UTILITY, seed, index, size, p)


def _blocks_serial(
    utility: SetUtility, kind: str, seed: int, size: int, p: dict[str, Any], n: int
) -> Iterator[dict[str, Any]]:
    for b in range(n):
        yield _BLOCKS[kind](utility, seed, b, size, p)


def check_main_guard() -> None:
    """Refuse ``n_jobs > 1`` from a script without an ``if __name__ == "__main__":`` guard.

    Every worker of a "forkserver"/"spawn" pool imports the caller's script again: without
    the guard each reruns it, its whole computation and output included (an outside-in
    trial: 376 s against 25 s with ``n_jobs=1``, every line printed once per worker).

    Raises:
        ValueError: the script's source holds no ``__main__`` test.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or mp.parent_process() is not None:
        return  # an interactive session, python -c, or a worker itself
    try:
        source = Path(path).read_text(errors="replace")
    except OSError:
        return
    if "__main__" not in source:
        raise ValueError(
            f"n_jobs > 1 starts worker processes, and each one imports {path} again: it has no "
            '`if __name__ == "__main__":` guard, so every worker would rerun the whole script. '
            "Put the script's work under that guard, or pass n_jobs=1"
        )


def _mp_context() -> mp.context.BaseContext:
    """The "forkserver" context where available, else "spawn".

    The fork server imports torch and this module once; each worker is a cheap fork of it, never
    of the caller's (threaded) process. Adds this module to the fork server's preload list.
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")


def _blocks_parallel(
    utility: SetUtility, kind: str, seed: int, size: int, p: dict[str, Any], n: int, jobs: int
) -> Iterator[dict[str, Any]]:
    """Blocks ``0 .. n-1`` computed by a process pool, yielded in order (at most ``2 jobs``
    submitted ahead; the rest is cancelled when the consumer stops)."""
    ex = ProcessPoolExecutor(
        jobs, mp_context=_mp_context(), initializer=_init_worker, initargs=(utility,)
    )
    pending: dict[int, Future[dict[str, Any]]] = {}
    nxt = 0
    try:
        for b in range(n):
            while nxt < n and nxt < b + 2 * jobs:
                pending[nxt] = ex.submit(_worker_block, kind, seed, nxt, size, p)
                nxt += 1
            yield pending.pop(b).result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _run(
    utility: SetUtility,
    kind: str,
    seed: int,
    block: int,
    max_draws: int,
    min_draws: int,
    tol: float,
    window: int,
    n_jobs: int,
    p: dict[str, Any],
    progress: bool,
) -> MCResult:
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1; got {n_jobs}")
    if n_jobs > 1:
        check_main_guard()
    if block < 1 or max_draws < 1 or window < 1:
        raise ValueError("block, max draws and window must be >= 1")
    estimate = _tmc_estimate if kind == "tmc" else _banzhaf_estimate
    n_blocks = math.ceil(max_draws / block)
    w_blocks = math.ceil(window / block)
    min_blocks = math.ceil(max(min_draws, window) / block)
    history: deque[np.ndarray] = deque(maxlen=w_blocks + 1)
    acc: dict[str, Any] | None = None
    converged, change = False, float("nan")
    gen = (
        _blocks_serial(utility, kind, seed, block, p, n_blocks)
        if n_jobs == 1
        else _blocks_parallel(utility, kind, seed, block, p, n_blocks, n_jobs)
    )
    bar = tqdm(total=n_blocks * block, desc=kind, disable=not progress, leave=False)
    try:
        for b, res in enumerate(gen):
            acc = res if acc is None else {k: acc[k] + res[k] for k in acc}
            bar.update(block)
            history.append(estimate(acc) @ utility.weights)
            if len(history) == w_blocks + 1:
                v, old = history[-1], history[0]
                norm = float(np.abs(v).sum())
                diff = float(np.abs(v - old).sum())
                change = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
                if b + 1 >= min_blocks and change < tol:
                    converged = True
                    break
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            close()
        bar.close()
    if acc is None:  # pragma: no cover - n_blocks >= 1
        raise RuntimeError("no Monte-Carlo block ran")
    values = estimate(acc)
    stderr = (_tmc_stderr if kind == "tmc" else _banzhaf_stderr)(acc, utility.weights)
    info: dict[str, Any] = {}
    if kind == "tmc":
        info["evaluated_fraction"] = acc["evaluated"] / (acc["n"] * utility.num_points)
    total = values @ utility.weights
    return MCResult(values, total, stderr, int(acc["n"]), converged, change, info)


# ----------------------------------------------------------------------------- public estimators


def tmc_shapley(
    utility: SetUtility,
    *,
    seed: int = 0,
    max_permutations: int = 1000,
    tol: float = 0.05,
    window: int = 100,
    min_permutations: int = 0,
    truncation_tol: float = 1e-3,
    patience: int = 5,
    block: int = 10,
    n_jobs: int = 1,
    progress: bool = False,
) -> MCResult:
    """Truncated Monte-Carlo Shapley values of every point in ``utility`` (Ghorbani & Zou 2019).

    Args:
        utility: the game (:class:`SetUtility`), ``N`` points, ``T`` test points.
        seed: the run seed (same seed, same result, for any ``n_jobs``).
        max_permutations: hard cap on permutations.
        tol, window: stop when the running values changed by less than ``tol`` (relative, L1)
            over the last ``window`` permutations (checked every block, after ``window`` and
            ``min_permutations`` permutations).
        truncation_tol, patience: cut a permutation after ``patience`` consecutive prefixes with
            ``|U(prefix) - U(full)| <= truncation_tol`` (``U`` is an accuracy here, so the
            tolerance is in accuracy units); ``truncation_tol < 0`` never truncates.
        block: permutations per block (the unit of work, seeding and checking).
        n_jobs: processes (1: in-process).
        progress: progress bar.

    Returns:
        An :class:`MCResult`; ``values`` ``[N, T]`` (positive = helpful). Each permutation's
        marginals sum to ``U(full) - U(empty)`` within ``truncation_tol``. ``stderr`` ``[N]``:
        the sample standard deviation of a point's marginal in ``U`` over the permutations
        divided by ``sqrt(draws)``.

    Cost: ``O(N T)`` per prefix utility, so ``O(N^2 T)`` per untruncated permutation.
    """
    N = utility.num_points
    full = utility.per_test(np.ones((1, N), dtype=bool))[0]
    empty = utility.per_test(np.zeros((1, N), dtype=bool))[0]
    if patience < 1:
        raise ValueError(f"patience must be >= 1; got {patience}")
    p = {
        "u_full": float(full @ utility.weights),
        "u_empty": empty,
        "truncation_tol": float(truncation_tol),
        "patience": int(patience),
    }
    res = _run(
        utility,
        "tmc",
        seed,
        block,
        max_permutations,
        min_permutations,
        tol,
        window,
        n_jobs,
        p,
        progress,
    )
    res.info.update(u_full=p["u_full"], u_empty=float(empty @ utility.weights))
    return res


def msr_banzhaf(
    utility: SetUtility,
    *,
    seed: int = 0,
    max_samples: int = 5000,
    tol: float = 0.05,
    window: int = 1000,
    min_samples: int = 0,
    block: int = 100,
    n_jobs: int = 1,
    progress: bool = False,
) -> MCResult:
    """Data Banzhaf values by maximum sample reuse (Wang & Jia 2023).

    ``value_i = mean U(S | i in S) - mean U(S | i not in S)`` over subsets ``S`` with each point
    included independently with probability 1/2; every subset informs every point.

    Args:
        utility: the game (:class:`SetUtility`), ``N`` points.
        seed: the run seed (same seed, same result, for any ``n_jobs``).
        max_samples: hard cap on subsets.
        tol, window, min_samples: stopping rule as in :func:`tmc_shapley` (in subsets).
        block: subsets per block. n_jobs: processes. progress: progress bar.

    Returns:
        An :class:`MCResult`; ``values`` ``[N, T]`` (positive = helpful). ``stderr`` ``[N]``:
        ``sqrt(var_in / n_in + var_out / n_out)``, the two-sample standard error of the
        difference of the means of ``U`` over the subsets with and without the point.

    Cost: ``O(N T)`` per subset.
    """
    return _run(
        utility,
        "banzhaf",
        seed,
        block,
        max_samples,
        min_samples,
        tol,
        window,
        n_jobs,
        {},
        progress,
    )


# ----------------------------------------------------------------------------- registered methods

_RUN_OPTIONS = {"tol", "window", "block", "n_jobs", "se_z"}
TMC_OPTIONS = GAME_OPTIONS | _RUN_OPTIONS | {"max_permutations", "truncation_tol", "patience"}
BANZHAF_OPTIONS = GAME_OPTIONS | _RUN_OPTIONS | {"max_samples", "estimator"}


def _common(ctx: Context, window: int, block: int) -> dict[str, Any]:
    return {
        "seed": ctx.seed,
        "tol": number_option(ctx.options, "tol", 0.05),
        "window": number_option(ctx.options, "window", window, integer=True, low=1),
        "block": number_option(ctx.options, "block", block, integer=True, low=1),
        "n_jobs": number_option(ctx.options, "n_jobs", 1, integer=True, low=1),
        "progress": ctx.progress,
    }


def _mc_output(game: KNNGame, res: MCResult, estimator: str, se_z: float) -> MethodOutput:
    """Scores ``r = -value - se_z * SE`` ``[N]`` (positive = harmful), per-failure ``-values``.

    ``SE = sqrt(SE_mc^2 + SE_test^2)``: the Monte-Carlo standard error (``MCResult.stderr``,
    also in ``info["value_stderr_mc"]``) and the one over the sampling of the test points
    (:func:`netmend.identification.shapley.sampling_stderr`). See
    :func:`netmend.identification.shapley.with_se_z`.
    """
    info = dict(
        res.info,
        estimator=estimator,
        draws=res.draws,
        converged=res.converged,
        change=res.change,
        value_stderr_mc=res.stderr,
    )
    values = reduce_values(game, res.values)
    out = game_output(game, values, info)
    return with_se_z(out, np.sqrt(res.stderr**2 + values.stderr**2), se_z)


@register("tmc_shapley", options=TMC_OPTIONS)
def tmc_shapley_method(ctx: Context) -> MethodOutput:
    """Truncated Monte-Carlo Shapley cause scores ``r = -value``, ``[N]``, positive = harmful.

    The game and the options of "knn_shapley" (``K``, ``metric``, ``valid``, ``valid_weight``,
    ``embed``): the learner is the KNN classifier on the model's embeddings, the utility its
    accuracy on the failures (+ validation). The exact "knn_shapley" computes the same values
    in ``O(T N log N)``; this estimator is the reference implementation of Data Shapley (and its
    sampler works with any :class:`SetUtility`, see :func:`tmc_shapley`).

    Options: ``max_permutations`` (1000), ``tol`` (0.05), ``window`` (100), ``truncation_tol``
    (1e-3), ``patience`` (5), ``block`` (10), ``n_jobs`` (1), ``se_z``
    (``DEFAULT_SE_Z["tmc_shapley"]``: the score is ``-value - se_z * SE``, so ``k=None``
    selects the values below zero by more than ``se_z`` standard errors, Monte-Carlo and
    test-point sampling combined, see :func:`_mc_output`), plus the game's options.
    """
    check_options(ctx, TMC_OPTIONS)
    game = build_game(ctx)
    res = tmc_shapley(
        KNNUtility(game),
        max_permutations=number_option(ctx.options, "max_permutations", 1000, integer=True, low=1),
        truncation_tol=number_option(ctx.options, "truncation_tol", 1e-3, low=-math.inf),
        patience=number_option(ctx.options, "patience", 5, integer=True, low=1),
        **_common(ctx, 100, 10),
    )
    se_z = number_option(ctx.options, "se_z", DEFAULT_SE_Z["tmc_shapley"])
    return _mc_output(game, res, "tmc", se_z)


@register("banzhaf", options=BANZHAF_OPTIONS)
def banzhaf_method(ctx: Context) -> MethodOutput:
    """Data Banzhaf (MSR) cause scores ``r = -value``, ``[N]``, positive = harmful.

    Same game and game options as "knn_shapley"; Banzhaf values weight every subset equally
    (``1 / 2^(N-1)``; Shapley values weight each subset *size* equally), which makes them the
    most robust semivalue to noise in the utility. They are not efficient.

    Options: ``estimator`` ("msr": the sampler; "exact": the closed form of the KNN game,
    :func:`netmend.identification.shapley.knn_banzhaf_from_distances`), ``max_samples``
    (5000), ``tol`` (0.05), ``window`` (1000), ``block`` (100), ``n_jobs`` (1), ``se_z``
    (``DEFAULT_SE_Z["banzhaf"]``, ``["banzhaf_exact"]`` with "exact", whose ``SE`` is
    the test-point sampling error alone; as in "tmc_shapley"), plus the game's options.

    In the KNN game only the ~2K nearest points of a test point have a sizeable Banzhaf value
    (a point matters only when fewer than K nearer ones are drawn); MSR noise gives the many
    near-zero values random signs, so selection by sign is far more precise with "exact".
    """
    check_options(ctx, BANZHAF_OPTIONS)
    estimator = ctx.options.get("estimator", "msr")
    if estimator not in ("msr", "exact"):
        raise ValueError(f"estimator must be 'msr' or 'exact'; got {estimator!r}")
    key = "banzhaf_exact" if estimator == "exact" else "banzhaf"
    se_z = number_option(ctx.options, "se_z", DEFAULT_SE_Z[key])
    game = build_game(ctx)
    if estimator == "exact":
        values = knn_game_values(game, ctx.device, kind="banzhaf")
        out = game_output(game, values, {"estimator": "exact"})
        return with_se_z(out, values.stderr, se_z)
    res = msr_banzhaf(
        KNNUtility(game),
        max_samples=number_option(ctx.options, "max_samples", 5000, integer=True, low=1),
        **_common(ctx, 1000, 100),
    )
    return _mc_output(game, res, "banzhaf", se_z)
