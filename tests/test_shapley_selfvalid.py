"""Self-validation of the KNN game (``valid="train"``, the default of the Shapley methods): each
validation point is a training point left out of its own game. Checked against subsets
enumerated with that point removed, for the closed forms (Shapley, Banzhaf), the utility the
Monte-Carlo estimators evaluate, and the streamed reduction; then what it buys: a mislabelled
point far from every failure is found, which the failures alone cannot do."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from test_shapley import enumerate_values, knn_subset_utility, tie_game

import netmend
from netmend.identification.shapley import (
    DEFAULT_VALID_SIZE,
    KNNGame,
    knn_banzhaf_from_distances,
    knn_game_values,
    knn_shapley_from_distances,
    knn_shapley_values,
    knn_utility_from_distances,
    reduce_values,
)
from netmend.identification.shapley_mc import KNNUtility

DT = torch.float64
RUN = dict(progress=False, device="cpu")


def self_game(seed: int, n: int = 7, T: int = 3, classes: int = 3):
    """A tie-heavy game whose last ``n`` test points are the training points themselves."""
    E, y, Et, yt = tie_game(seed, n=n, T=T, classes=classes)
    Et, yt = torch.cat([Et, E]), torch.cat([yt, y])
    exclude = torch.cat([torch.full((T,), -1), torch.arange(n)])
    return E, y, Et, yt, exclude


def utility_without_self(D, y, yt, K, exclude):
    """``U(S) [T]`` by the loop, each test point's excluded training point removed from S."""

    def U(S):
        out = np.empty(D.shape[0])
        for t in range(D.shape[0]):
            St = [i for i in S if i != exclude[t]]
            out[t] = knn_subset_utility(D[t : t + 1], y, yt[t : t + 1], K, St)[0]
        return out

    return U


@pytest.mark.parametrize("K", [1, 3, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_leaving_a_point_out_equals_enumerating_the_game_without_it(K, seed):
    E, y, Et, yt, exclude = self_game(seed)
    D = torch.cdist(Et, E)
    U = utility_without_self(D.numpy(), y.numpy(), yt.numpy(), K, exclude.numpy())
    n, ex = E.shape[0], exclude.numpy()
    for kind, closed in (
        ("shapley", knn_shapley_from_distances),
        ("banzhaf", knn_banzhaf_from_distances),
    ):
        expected = enumerate_values(n, U, kind)  # [n, T]
        got = closed(D, y, yt, K, exclude).numpy().T
        assert np.abs(expected).max() > 0.05
        np.testing.assert_allclose(got, expected, atol=1e-13)
        rows = np.flatnonzero(ex >= 0)
        assert (got[ex[rows], rows] == 0).all()  # the left-out point is a null player
    # the plain game differs (a point counts as its own nearest neighbour), so the test can fail
    plain = knn_shapley_from_distances(D, y, yt, K).numpy().T
    assert not np.allclose(plain, enumerate_values(n, U, "shapley"), atol=1e-6)
    # efficiency of the Shapley values, and the full-set utility without the point
    full = U(range(n))
    np.testing.assert_allclose(knn_utility_from_distances(D, y, yt, K, exclude).numpy(), full)
    np.testing.assert_allclose(
        knn_shapley_from_distances(D, y, yt, K, exclude).numpy().sum(1), full, atol=1e-13
    )


def test_monte_carlo_utility_leaves_the_point_out_of_every_subset():
    E, y, Et, yt, exclude = self_game(3, n=8)
    K = 3
    game = KNNGame(E, y, Et, yt, np.full(len(yt), 1 / len(yt)), 3, K, "euclidean", exclude)
    U = utility_without_self(torch.cdist(Et, E).numpy(), y.numpy(), yt.numpy(), K, exclude.numpy())
    subsets = [S for r in range(9) for S in itertools.combinations(range(8), r)]
    masks = np.zeros((len(subsets), 8), dtype=bool)
    for b, S in enumerate(subsets):
        masks[b, list(S)] = True
    got = KNNUtility(game).per_test(masks)
    np.testing.assert_allclose(got, np.stack([U(S) for S in subsets]), atol=1e-12)


@pytest.mark.parametrize("kind", ["shapley", "banzhaf"])
def test_streamed_reduction_equals_the_dense_values(kind):
    g = torch.Generator().manual_seed(5)
    N, M, V = 60, 4, 25
    E = torch.randn(N, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (N,), generator=g)
    vidx = torch.randperm(N, generator=g)[:V]
    Et = torch.cat([torch.randn(M, 3, generator=g, dtype=DT), E[vidx]])
    yt = torch.cat([torch.randint(0, 3, (M,), generator=g), y[vidx]])
    w = np.r_[np.full(M, 1 / M), np.full(V, 0.7 / V)]
    game = KNNGame(E, y, Et, yt, w, M, 4, "euclidean", torch.cat([torch.full((M,), -1), vidx]))
    dense = reduce_values(game, knn_shapley_values(game, kind=kind))
    # chunks of 3 test points: they straddle the failures / validation boundary
    streamed = knn_game_values(game, kind=kind, max_elems=3 * N)
    np.testing.assert_allclose(streamed.total, dense.total, atol=1e-14)
    np.testing.assert_allclose(streamed.per_failure, dense.per_failure, atol=1e-12)
    np.testing.assert_allclose(streamed.stderr, dense.stderr, rtol=1e-9, atol=1e-12)
    assert dense.stderr.max() > 0


def test_identify_defaults_to_the_training_set_left_one_out(blobs, blobs_logreg):
    ident = netmend.identify(
        blobs_logreg, (blobs.X, blobs.y), (blobs.Xf, blobs.yf), "knn_shapley", None,
        K=4, se_z=0.0, **RUN,
    )  # fmt: skip
    N = blobs.X.shape[0]
    assert ident.info["validation"] == "train"
    assert ident.info["num_validation"] == min(N, DEFAULT_VALID_SIZE) == N
    # by hand: the failure (weight 1) and every training point in its own game, left out
    Et = torch.cat([blobs.Xf, blobs.X])
    yt = torch.cat([blobs.yf, blobs.y])
    exclude = torch.cat([torch.tensor([-1]), torch.arange(N)])
    Vals = knn_shapley_from_distances(torch.cdist(Et, blobs.X), blobs.y, yt, 4, exclude)
    w = np.r_[1.0, np.full(N, 1.0 / N)]
    np.testing.assert_allclose(ident.scores, -(Vals.numpy().T @ w), atol=1e-12)
    np.testing.assert_allclose(ident.per_failure[:, 0], -Vals[0].numpy(), atol=1e-6)
    # a subsample is seeded: the same seed gives the same draw, another seed another one
    kw = dict(K=4, valid_size=30, **RUN)
    a = netmend.identify(
        blobs_logreg, (blobs.X, blobs.y), (blobs.Xf, blobs.yf), "knn_shapley", None, seed=1, **kw
    )
    b = netmend.identify(
        blobs_logreg, (blobs.X, blobs.y), (blobs.Xf, blobs.yf), "knn_shapley", None, seed=1, **kw
    )
    c = netmend.identify(
        blobs_logreg, (blobs.X, blobs.y), (blobs.Xf, blobs.yf), "knn_shapley", None, seed=2, **kw
    )
    assert a.info["num_validation"] == 30
    np.testing.assert_array_equal(a.scores, b.scores)
    assert not np.array_equal(a.scores, c.scores)


@pytest.mark.parametrize("method", ["knn_shapley", "banzhaf", "tmc_shapley"])
def test_a_mislabelled_point_far_from_the_failures_is_found_only_with_self_validation(
    blobs, blobs_logreg, method
):
    # one extra point deep in class 2's blob (centre (0, 4)) labelled 0: it cannot touch the
    # failure at (-0.9, -0.6), whose neighbours are the planted points
    X = torch.cat([blobs.X, torch.tensor([[0.1, 4.1]], dtype=DT)])
    y = torch.cat([blobs.y, torch.tensor([0])])
    far = X.shape[0] - 1
    opts = {
        "knn_shapley": {},
        "banzhaf": dict(estimator="exact"),
        "tmc_shapley": dict(max_permutations=300),
    }[method]
    found = {}
    for valid in ("train", None):
        ident = netmend.identify(
            blobs_logreg, (X, y), (blobs.Xf, blobs.yf), method, None, valid=valid, **opts, **RUN
        )
        found[valid] = far in set(ident.causes)
        # the planted points next to the failure are found either way
        assert len(set(blobs.planted) & set(ident.causes)) >= 4
    assert found == {"train": True, None: False}


@pytest.mark.parametrize(
    "options, message",
    [({"valid": "test"}, "valid must be 'train', None or"), ({"valid_size": 0}, "valid_size must")],
)
def test_bad_valid_option(blobs, blobs_logreg, options, message):
    data, failures = (blobs.X, blobs.y), (blobs.Xf, blobs.yf)
    with pytest.raises(ValueError, match=message):
        netmend.identify(blobs_logreg, data, failures, "knn_shapley", **options, **RUN)
