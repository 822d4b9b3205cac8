"""Selection without K for the Monte-Carlo valuations: the standard-error rule (``se_z``).

The Monte-Carlo standard errors of TMC-Shapley and MSR-Banzhaf are checked against the spread
of the estimates over independent seeds; the rule "value below zero by more than ``se_z``
standard errors" is checked to select exactly the players of negative value of a small game
whose values are known in closed form (enumerable), and not to select its zero-value players,
of which the plain sign rule selects about half.

Stochastic tests use fixed seeds (they are deterministic); the stated probabilities are those
of a failure with a random seed.
"""

from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np
import pytest
import torch

import netmend
from netmend.identification.shapley import KNNGame, knn_shapley_values, sampling_stderr
from netmend.identification.shapley_mc import FunctionUtility, KNNUtility, msr_banzhaf, tmc_shapley

DT = torch.float64
RUN = dict(progress=False, device="cpu")

# 8 harmful, 8 helpful, 16 zero-value (dummy) players, and one interaction between 0 and 1
N_NEG, N_POS, N_ZERO = 8, 8, 16
W = np.r_[np.full(N_NEG, -0.3), np.full(N_POS, 0.3), np.zeros(N_ZERO)]


class _Game:
    """``U(S) = sum_{i in S} W_i + 0.2 * 1[0 in S and 8 in S]``: player 0 is harmful, player 8
    helpful; the interaction adds 0.1 to each of their Shapley and Banzhaf values (both give
    half of a pairwise interaction to each member). The dummies have value 0 exactly."""

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        m = masks.astype(np.float64)
        return m @ W + 0.2 * m[:, 0] * m[:, N_NEG]


def _true_values() -> np.ndarray:
    v = W.copy()
    v[[0, N_NEG]] += 0.1
    return v


def test_closed_form_values_of_the_test_game_equal_enumeration():
    """The closed form, on the game restricted to 6 players (the others never present), equals
    the values enumerated over its 2^6 subsets: interacting 0 and 8, plain harmful, helpful and
    dummy players. (A player absent from the game does not change the others' values.)"""
    idx = [0, 1, 2, N_NEG, N_NEG + 1, N_NEG + N_POS]
    for kind in ("shapley", "banzhaf"):
        got = _enumerated_sub(kind, idx)
        np.testing.assert_allclose(got, _true_values()[idx], atol=1e-12)


def _embed(m: np.ndarray, idx: list[int]) -> np.ndarray:
    """Masks over the players ``idx`` -> masks over all players (the others absent)."""
    full = np.zeros((m.shape[0], W.size), dtype=bool)
    full[:, idx] = m
    return full


def _enumerated_sub(kind: str, idx: list[int]) -> np.ndarray:
    """Shapley or Banzhaf values of the players ``idx`` in ``_Game`` restricted to them."""

    game, n = _Game(), len(idx)

    def U(S: tuple[int, ...]) -> float:
        m = np.zeros((1, n), dtype=bool)
        m[0, list(S)] = True
        return float(game(_embed(m, idx))[0])

    out = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for r in range(n):
            for S in combinations(others, r):
                w = 1 / (n * comb(n - 1, r)) if kind == "shapley" else 1 / 2 ** (n - 1)
                out[i] += w * (U((*S, i)) - U(S))
    return out


def _selected(res, z: float) -> set[int]:
    """The SE rule: players whose estimated value is below zero by more than z SEs."""
    return set(np.flatnonzero(res.total < -z * res.stderr).tolist())


def test_tmc_se_rule_selects_exactly_the_negative_players():
    game = FunctionUtility(_Game(), W.size)
    res = tmc_shapley(game, max_permutations=400, tol=0.0, truncation_tol=-1, block=50)
    truth = _true_values()
    # dummies have marginal 0 in every permutation: value and SE exactly 0
    assert np.all(res.total[truth == 0] == 0) and np.all(res.stderr[truth == 0] == 0)
    # additive players too have a constant marginal; only 0 and 8 (interacting) vary
    assert np.all(res.stderr[[0, N_NEG]] > 0)
    assert np.all(np.delete(res.stderr, [0, N_NEG]) < 1e-12)
    assert np.all(np.abs(res.total - truth) <= 4 * res.stderr + 1e-12)
    assert _selected(res, 2.0) == set(np.flatnonzero(truth < 0).tolist())


def test_msr_se_rule_does_not_select_zero_value_players_but_the_sign_rule_does():
    game = FunctionUtility(_Game(), W.size)
    res = msr_banzhaf(game, max_samples=2000, tol=0.0, block=200, seed=0)
    truth = _true_values()
    zero = set(np.flatnonzero(truth == 0).tolist())
    neg = set(np.flatnonzero(truth < 0).tolist())
    # the estimates of the dummies are pure noise: the sign rule picks about half of them
    # (fewer than 4 of 16 with probability 1%)
    assert len(_selected(res, 0.0) & zero) >= 4
    # the SE rule at z = 3 picks a given dummy with probability 0.13% (2% for any of 16);
    # the harmful players sit at ~ -0.3 / SE ~ -15 SEs and are all kept
    assert _selected(res, 3.0) == neg


@pytest.mark.parametrize("kind", ["tmc", "banzhaf"])
def test_stderr_matches_the_spread_over_seeds(kind):
    """The reported SE is the standard deviation of the estimate over independent runs: their
    ratio, pooled over the players with a varying estimate, lies within 20% of 1 (with 40
    seeds the pooled ratio has a relative error of a few percent)."""
    game = FunctionUtility(_Game(), W.size)
    runs = []
    for seed in range(40):
        if kind == "tmc":
            runs.append(tmc_shapley(game, max_permutations=100, tol=0.0, truncation_tol=-1,
                                    block=50, seed=seed))  # fmt: skip
        else:
            runs.append(msr_banzhaf(game, max_samples=400, tol=0.0, block=200, seed=seed))
    est = np.stack([r.total for r in runs])  # [seeds, N]
    se = np.stack([r.stderr for r in runs]).mean(0)  # [N]
    spread = est.std(0, ddof=1)
    varying = spread > 1e-9
    assert varying.sum() >= (2 if kind == "tmc" else W.size)
    ratio = np.sqrt((spread[varying] ** 2).mean() / (se[varying] ** 2).mean())
    assert 0.8 < ratio < 1.2, ratio
    np.testing.assert_array_equal(se[~varying], 0.0)


def test_knn_fast_and_generic_tmc_paths_give_the_same_stderr():
    g = torch.Generator().manual_seed(3)
    E, Et = torch.randn(30, 2, generator=g, dtype=DT), torch.randn(5, 2, generator=g, dtype=DT)
    y, yt = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (5,), generator=g)
    u = KNNUtility(KNNGame(E, y, Et, yt, np.full(5, 0.2), 5, 3, "euclidean"))

    class OnlyPerTest:
        num_points, weights = u.num_points, u.weights

        def per_test(self, masks: np.ndarray) -> np.ndarray:
            return u.per_test(masks)

    kw = dict(truncation_tol=0.05, patience=3, max_permutations=60, block=20, seed=3, tol=0.0)
    fast, slow = tmc_shapley(u, **kw), tmc_shapley(OnlyPerTest(), **kw)
    assert fast.stderr.max() > 0
    np.testing.assert_allclose(fast.stderr, slow.stderr, atol=1e-12)


@pytest.mark.parametrize("method", ["tmc_shapley", "banzhaf"])
def test_se_z_option_selects_values_below_minus_z_standard_errors(blobs, blobs_logreg, method):
    opts = {"tmc_shapley": dict(max_permutations=100), "banzhaf": dict(max_samples=2000)}[method]
    data, fail = (blobs.X, blobs.y), (blobs.Xf, blobs.yf)
    plain = netmend.identify(blobs_logreg, data, fail, method, None, se_z=0.0, **opts, **RUN)
    z2 = netmend.identify(blobs_logreg, data, fail, method, None, se_z=2.0, **opts, **RUN)
    se = z2.info["value_stderr"]
    np.testing.assert_array_equal(se, plain.info["value_stderr"])  # same seed, same draws
    assert se.max() > 0
    value = -plain.scores
    np.testing.assert_allclose(z2.scores, -value - 2.0 * se, atol=1e-12)
    expected = set(np.flatnonzero(value < -2.0 * se).tolist())
    assert set(z2.causes.tolist()) == expected
    assert set(plain.causes.tolist()) == set(np.flatnonzero(value < 0).tolist())
    assert len(expected) < len(plain.causes)  # the rule drops noisy near-zero values
    assert set(blobs.planted) <= expected  # and keeps the planted mislabelled points
    with pytest.raises(ValueError, match="se_z"):
        netmend.identify(blobs_logreg, data, fail, method, None, se_z=-1.0, **opts, **RUN)


# ----------------------------------------------------------------------------- exact game


def _two_class_pool(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    X = torch.randn(n, 2, generator=g, dtype=DT) + 1.5 * (2 * y[:, None] - 1).to(DT)
    return X, y


def test_sampling_stderr_matches_the_spread_over_validation_draws():
    """The value of a training point is an average over the validation points; its sampling SE
    must equal the spread of the value when the validation set is redrawn from its population
    (a pool 50x larger). The ratio of the pooled spreads lies within 15% of 1."""
    E, y = _two_class_pool(40, 0)
    y[:4] = 1 - y[:4]  # four mislabelled points
    Xf, yf = _two_class_pool(6, 1)
    pool_X, pool_y = _two_class_pool(2500, 2)
    rng = np.random.default_rng(0)
    vals, ses = [], []
    for _ in range(60):
        v = torch.from_numpy(rng.choice(2500, 50, replace=False))
        Et, yt = torch.cat([Xf, pool_X[v]]), torch.cat([yf, pool_y[v]])
        w = np.r_[np.full(6, 1 / 6), np.full(50, 0.5 / 50)]
        game = KNNGame(E, y, Et, yt, w, 6, 3, "euclidean")
        V = knn_shapley_values(game)
        vals.append(V @ w)
        ses.append(sampling_stderr(game, V))
        # the formula: failures and validation points are two samples, weights 1 and 0.5
        direct = np.sqrt(V[:, :6].var(1, ddof=1) / 6 + 0.25 * V[:, 6:].var(1, ddof=1) / 50)
        np.testing.assert_allclose(ses[-1], direct, rtol=1e-12)
    spread = np.std(vals, axis=0, ddof=1)  # the failures are fixed: only the valid draw varies
    se_valid = np.sqrt(np.mean(np.square(ses), 0) - np.var(V[:, :6], 1, ddof=1) / 6)
    ratio = np.sqrt(np.mean(spread**2) / np.mean(se_valid**2))
    assert 0.85 < ratio < 1.15, ratio


def test_knn_shapley_se_z_scores_and_selection(blobs, blobs_logreg):
    g = torch.Generator().manual_seed(11)
    Xv = torch.randn(30, 2, generator=g, dtype=DT) * 2
    with torch.no_grad():
        yv = blobs_logreg(Xv).argmax(1)
    data, fail = (blobs.X, blobs.y), (blobs.Xf, blobs.yf)
    kw = dict(valid=(Xv, yv), K=4, **RUN)
    plain = netmend.identify(blobs_logreg, data, fail, "knn_shapley", None, se_z=0.0, **kw)
    z1 = netmend.identify(blobs_logreg, data, fail, "knn_shapley", None, se_z=1.0, **kw)
    se = z1.info["value_stderr"]
    assert se.max() > 0
    value = -plain.scores
    np.testing.assert_allclose(z1.scores, -value - se, atol=1e-12)
    assert set(z1.causes.tolist()) == set(np.flatnonzero(value < -se).tolist())
    assert len(z1.causes) < len(plain.causes)
    assert set(blobs.planted) <= set(z1.causes.tolist())
