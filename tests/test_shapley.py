"""Data-Shapley identification: exact KNN-Shapley and the Monte-Carlo estimators (TMC-Shapley,
MSR Data Banzhaf) against values enumerated over every subset of tiny games; efficiency,
convergence, determinism, n_jobs invariance, planted and flipped-label recovery, input errors.

Stochastic tests use fixed seeds (they are deterministic); their tolerances are about 4-5
standard errors of the estimate at the number of draws used, measured over other seeds."""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

import netmend
from netmend.identification.shapley import (
    KNNGame,
    knn_banzhaf_from_distances,
    knn_shapley_from_distances,
    knn_shapley_values,
    knn_utility_from_distances,
    penultimate_embeddings,
)
from netmend.identification.shapley_mc import FunctionUtility, KNNUtility, msr_banzhaf, tmc_shapley
from netmend.lab.models import MLP

DT = torch.float64
RUN = dict(progress=False, device="cpu")


# ----------------------------------------------------------------------------- brute force


def knn_subset_utility(D: np.ndarray, ytr: np.ndarray, yte: np.ndarray, K: int, S) -> np.ndarray:
    """Jia et al.'s KNN utility of subset ``S`` for every test point, by a plain loop ``[T]``:
    the fraction (over K) of the min(K, |S|) nearest points of S with the test label; ties in
    distance broken by training index."""
    out = np.zeros(D.shape[0])
    for t in range(D.shape[0]):
        near = sorted(S, key=lambda i: (D[t, i], i))[:K]
        out[t] = sum(ytr[i] == yte[t] for i in near) / K
    return out


def enumerate_values(n: int, U, kind: str) -> np.ndarray:
    """Shapley or Banzhaf values of the game ``U(frozenset) -> [T]`` by enumerating all subsets."""
    table = {S: np.asarray(U(S), dtype=np.float64) for r in range(n + 1) for S in
             map(frozenset, itertools.combinations(range(n), r))}  # fmt: skip
    T = table[frozenset()].shape[0]
    out = np.zeros((n, T))
    for i in range(n):
        rest = [j for j in range(n) if j != i]
        for r in range(n):
            if kind == "shapley":
                weight = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
            else:
                weight = 1.0 / 2 ** (n - 1)
            for S in map(frozenset, itertools.combinations(rest, r)):
                out[i] += weight * (table[S | {i}] - table[S])
    return out


def tie_game(seed: int, n: int = 7, T: int = 4, classes: int = 3):
    """Integer-grid points (many tied distances, duplicate points) and random labels."""
    g = torch.Generator().manual_seed(seed)
    E = torch.randint(0, 3, (n, 2), generator=g).to(DT)
    Et = torch.randint(0, 3, (T, 2), generator=g).to(DT)
    y = torch.randint(0, classes, (n,), generator=g)
    yt = torch.randint(0, classes, (T,), generator=g)
    return E, y, Et, yt


# ----------------------------------------------------------------------------- exact KNN-Shapley


@pytest.mark.parametrize("K", [1, 3, 7, 12])
@pytest.mark.parametrize("seed", [0, 1])
def test_knn_shapley_equals_enumeration(K, seed):
    E, y, Et, yt = tie_game(seed)
    D = torch.cdist(Et, E)
    Dn, yn, ytn = D.numpy(), y.numpy(), yt.numpy()
    assert len(np.unique(Dn[0])) < Dn.shape[1], "the game must contain tied distances"
    expected = enumerate_values(
        E.shape[0], lambda S: knn_subset_utility(Dn, yn, ytn, K, S), "shapley"
    )
    got = knn_shapley_from_distances(D, y, yt, K).numpy().T  # [n, T]
    assert np.abs(expected).max() > 0.05
    np.testing.assert_allclose(got, expected, atol=1e-13)
    # efficiency: each test point's values sum to u_t(full) - u_t(empty) = u_t(full)
    np.testing.assert_allclose(
        got.sum(0), knn_utility_from_distances(D, y, yt, K).numpy(), atol=1e-13
    )
    # the chunked path over embeddings gives the same values
    game = KNNGame(E, y, Et, yt, np.full(4, 0.25), 4, K, "euclidean")
    np.testing.assert_allclose(knn_shapley_values(game), expected, atol=1e-13)


@pytest.mark.parametrize("K", [1, 3, 7, 12])
def test_knn_banzhaf_closed_form_equals_enumeration(K):
    E, y, Et, yt = tie_game(1)
    D = torch.cdist(Et, E)
    Dn, yn, ytn = D.numpy(), y.numpy(), yt.numpy()
    expected = enumerate_values(
        E.shape[0], lambda S: knn_subset_utility(Dn, yn, ytn, K, S), "banzhaf"
    )
    assert np.abs(expected).max() > 0.05
    got = knn_banzhaf_from_distances(D, y, yt, K).numpy().T
    np.testing.assert_allclose(got, expected, atol=1e-13)


def test_knn_utility_evaluates_subsets_like_the_loop():
    E, y, Et, yt = tie_game(3, n=9, T=5)
    Dn = torch.cdist(Et, E).numpy()
    u = KNNUtility(KNNGame(E, y, Et, yt, np.full(5, 0.2), 5, 3, "euclidean"))
    masks = np.random.default_rng(0).random((40, 9)) < 0.5
    masks[0] = False
    masks[1] = True
    expected = np.stack(
        [knn_subset_utility(Dn, y.numpy(), yt.numpy(), 3, np.flatnonzero(m)) for m in masks]
    )
    np.testing.assert_allclose(u.per_test(masks), expected, atol=1e-12)
    # the exact marginals along a permutation are the differences of prefix utilities
    perm = np.random.default_rng(1).permutation(9)
    prefixes = np.zeros((10, 9), dtype=bool)
    for j in range(9):
        prefixes[j + 1 :, perm[j]] = True
    np.testing.assert_allclose(
        u.prefix_marginals(perm), np.diff(u.per_test(prefixes), axis=0), atol=1e-12
    )


# ----------------------------------------------------------------------------- Monte-Carlo

TINY = 6


def tiny_knn_utility() -> KNNUtility:
    E, y, Et, yt = tie_game(5, n=TINY, T=3)
    return KNNUtility(KNNGame(E, y, Et, yt, np.array([0.5, 0.3, 0.2]), 3, 2, "euclidean"))


def tiny_table_game():
    """A non-KNN game: a random table over the 2^6 subsets, with U(empty) = 0."""
    vals = np.random.default_rng(7).normal(size=2**TINY)
    vals[0] = 0.0
    code = 2 ** np.arange(TINY)
    fn = _TableFn(vals, code)
    U = lambda S: np.array([vals[sum(code[i] for i in S)]])  # noqa: E731
    return FunctionUtility(fn, TINY), U


class _TableFn:
    def __init__(self, vals: np.ndarray, code: np.ndarray) -> None:
        self.vals, self.code = vals, code

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        return self.vals[masks.astype(np.int64) @ self.code]


class _OnlyPerTest:
    """Hides KNNUtility.prefix_marginals, so TMC takes the generic chunked-prefix path."""

    def __init__(self, u: KNNUtility) -> None:
        self.u, self.num_points, self.weights = u, u.num_points, u.weights

    def per_test(self, masks: np.ndarray) -> np.ndarray:
        return self.u.per_test(masks)


def test_tmc_converges_to_enumerated_shapley_and_stops_by_criterion():
    u = tiny_knn_utility()
    exact = enumerate_values(TINY, lambda S: u.per_test(_mask(S))[0], "shapley")
    res = tmc_shapley(
        u, truncation_tol=-1, tol=0.002, window=1000, max_permutations=20000, block=50
    )
    assert res.converged and res.draws < 20000, (res.draws, res.change)
    # per-test values within 0.02: the stopping rule (tol=0.002 over 1000 permutations) stops
    # after 2-4k permutations, where the largest error over 8 seeds was 0.009
    np.testing.assert_allclose(res.values, exact, atol=0.02)
    # untruncated permutations: each one's marginals sum exactly to U(full) - U(empty)
    full, empty = u.per_test(np.ones((1, TINY), bool))[0], u.per_test(np.zeros((1, TINY), bool))[0]
    np.testing.assert_allclose(res.values.sum(0), full - empty, atol=1e-12)
    # the same on a table game without a KNN structure (generic prefix path, scalar game)
    game, U = tiny_table_game()
    exact_t = enumerate_values(TINY, U, "shapley")
    res_t = tmc_shapley(game, truncation_tol=-1, tol=0.003, window=500, max_permutations=20000)
    assert res_t.converged and res_t.draws < 20000
    np.testing.assert_allclose(res_t.values, exact_t, atol=0.05 * np.abs(exact_t).max() + 0.02)
    np.testing.assert_allclose(res_t.total.sum(), U(range(TINY))[0], atol=1e-12)


def _mask(S) -> np.ndarray:
    m = np.zeros((1, TINY), dtype=bool)
    m[0, list(S)] = True
    return m


def test_tmc_fast_and_generic_paths_agree_and_truncation_keeps_efficiency():
    E, y, Et, yt = tie_game(8, n=30, T=5)
    u = KNNUtility(KNNGame(E, y, Et, yt, np.full(5, 0.2), 5, 3, "euclidean"))
    kw = dict(truncation_tol=0.05, patience=3, max_permutations=60, block=20, seed=3)
    fast = tmc_shapley(u, **kw)
    slow = tmc_shapley(_OnlyPerTest(u), **kw)
    np.testing.assert_allclose(fast.values, slow.values, atol=1e-12)
    assert fast.info["evaluated_fraction"] < 1.0  # some permutations were truncated
    # every truncated permutation's marginals sum to U(prefix) - U(empty), within the tolerance
    gap = fast.total.sum() - (fast.info["u_full"] - fast.info["u_empty"])
    assert abs(gap) <= 0.05


def test_banzhaf_msr_converges_to_enumerated_banzhaf():
    u = tiny_knn_utility()
    exact = enumerate_values(TINY, lambda S: u.per_test(_mask(S))[0], "banzhaf")
    res = msr_banzhaf(u, max_samples=60000, tol=0.005, window=4000, block=500)
    assert res.converged and res.draws < 60000
    np.testing.assert_allclose(res.values, exact, atol=0.02)
    game, U = tiny_table_game()
    exact_t = enumerate_values(TINY, U, "banzhaf")
    res_t = msr_banzhaf(game, max_samples=40000, tol=0.01, window=2000, block=500, seed=1)
    np.testing.assert_allclose(res_t.values, exact_t, atol=0.08)


def test_msr_banzhaf_matches_the_closed_form_on_a_larger_knn_game():
    """N = 60 (no enumeration possible): MSR against the exact KNN-Banzhaf values."""
    E, y, Et, yt = tie_game(12, n=60, T=5)
    E = E + 0.1 * torch.randn(60, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    game = KNNGame(E, y, Et, yt, np.full(5, 0.2), 5, 3, "euclidean")
    exact = knn_shapley_values(game, kind="banzhaf")
    res = msr_banzhaf(KNNUtility(game), max_samples=20000, block=1000, tol=0.0)
    assert np.abs(exact).max() > 0.1
    np.testing.assert_allclose(res.values, exact, atol=0.035)


def test_banzhaf_is_efficient_only_for_additive_games():
    """Banzhaf values sum to U(full) - U(empty) for an additive game (and MSR recovers it);
    for a general game they do not (unlike Shapley values) - a property of the semivalue."""
    w = np.array([0.3, -0.2, 0.5, 0.1, -0.4, 0.25])
    game = FunctionUtility(_Additive(w), TINY)
    res = msr_banzhaf(game, max_samples=20000, block=1000, tol=0.0)
    np.testing.assert_allclose(res.total, w, atol=0.03)
    assert abs(res.total.sum() - w.sum()) < 0.05
    _, U = tiny_table_game()
    b = enumerate_values(TINY, U, "banzhaf")
    assert abs(b.sum() - U(range(TINY))[0]) > 1e-3


class _Additive:
    def __init__(self, w: np.ndarray) -> None:
        self.w = w

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        return masks.astype(np.float64) @ self.w


def test_monte_carlo_is_deterministic_given_seed():
    u = tiny_knn_utility()
    for fn, kw in [(tmc_shapley, dict(max_permutations=100)), (msr_banzhaf, dict(max_samples=500))]:
        a, b = fn(u, seed=4, tol=0.0, **kw), fn(u, seed=4, tol=0.0, **kw)
        c = fn(u, seed=5, tol=0.0, **kw)
        np.testing.assert_array_equal(a.values, b.values)
        assert not np.array_equal(a.values, c.values)


def test_n_jobs_two_reproduces_itself_and_n_jobs_one():
    E, y, Et, yt = tie_game(9, n=25, T=4)
    u = KNNUtility(KNNGame(E, y, Et, yt, np.full(4, 0.25), 4, 3, "euclidean"))
    kw_t = dict(max_permutations=80, block=10, tol=0.0, seed=2)
    kw_b = dict(max_samples=800, block=100, tol=0.0, seed=2)
    two_a, two_b = tmc_shapley(u, n_jobs=2, **kw_t), tmc_shapley(u, n_jobs=2, **kw_t)
    np.testing.assert_array_equal(two_a.values, two_b.values)
    # blocks are seeded by their index, whichever process runs them: n_jobs does not matter
    np.testing.assert_array_equal(two_a.values, tmc_shapley(u, n_jobs=1, **kw_t).values)
    two = msr_banzhaf(u, n_jobs=2, **kw_b)
    np.testing.assert_array_equal(two.values, msr_banzhaf(u, n_jobs=1, **kw_b).values)
    # stopping by the criterion is also n_jobs-independent (blocks are checked in order)
    kw = dict(max_permutations=2000, block=10, tol=0.05, window=50, seed=2)
    one, two = tmc_shapley(u, n_jobs=1, **kw), tmc_shapley(u, n_jobs=2, **kw)
    assert one.converged and one.draws == two.draws < 2000
    np.testing.assert_array_equal(one.values, two.values)


# ----------------------------------------------------------------------------- registered methods


@pytest.mark.parametrize("method", ["knn_shapley", "tmc_shapley", "banzhaf"])
def test_planted_mislabelled_points_get_positive_scores(blobs, blobs_logreg, method):
    # se_z=0: scores = -value, so they equal the per-failure scores (test_shapley_select.py)
    opts = {
        "tmc_shapley": dict(max_permutations=200, se_z=0.0),
        "banzhaf": dict(max_samples=4000, se_z=0.0),
        "knn_shapley": dict(se_z=0.0),
    }
    ident = netmend.identify(
        blobs_logreg,
        (blobs.X, blobs.y),
        (blobs.Xf, blobs.yf),
        method=method,
        k="positive",
        valid=None,  # the failure alone (the default adds the training set, leave-one-out)
        **opts[method],
        **RUN,
    )
    assert ident.info["default_k"] == "positive"
    s = ident.scores
    assert (s[blobs.planted] > 0).all()
    # the planted points are the worst: the failure's K = 5 nearest neighbours are planted
    assert set(np.argsort(-s)[:5]) <= set(blobs.planted)
    assert set(np.argsort(-s)[:5]) <= set(ident.causes)
    pf = ident.per_failure
    assert pf.shape == (blobs.X.shape[0], 1)
    np.testing.assert_allclose(pf[:, 0], s, rtol=1e-6, atol=1e-9)  # one failure, no valid set


def test_knn_shapley_identify_matches_exact_game_and_efficiency(blobs, blobs_logreg):
    g = torch.Generator().manual_seed(11)
    Xv = torch.randn(20, 2, generator=g, dtype=DT) * 2
    yv = torch.randint(0, 3, (20,), generator=g)
    Xf = torch.cat([blobs.Xf, torch.tensor([[2.6, 0.2]], dtype=DT)])
    with torch.no_grad():
        yf = torch.cat([blobs.yf, (blobs_logreg(Xf[1:]).argmax(1) + 1) % 3])
    ident = netmend.identify(
        blobs_logreg, (blobs.X, blobs.y), (Xf, yf), method="knn_shapley", k="positive",
        valid=(Xv, yv), valid_weight=0.5, K=4, se_z=0.0, **RUN,  # se_z=0: scores = -value
    )  # fmt: skip
    # LogisticRegression: the head's input is the flattened input itself
    D = torch.cdist(torch.cat([Xf, Xv]), blobs.X)
    yt = torch.cat([yf, yv])
    V = knn_shapley_from_distances(D, blobs.y, yt, 4).numpy().T  # [N, T]
    w = np.concatenate([np.full(2, 0.5), np.full(20, 0.5 / 20)])
    np.testing.assert_allclose(ident.scores, -(V @ w), atol=1e-12)
    np.testing.assert_allclose(ident.per_failure, -V[:, :2], atol=1e-6)
    u_full = knn_utility_from_distances(D, blobs.y, yt, 4).numpy() @ w
    np.testing.assert_allclose(-ident.scores.sum(), u_full, atol=1e-12)  # U(empty) = 0
    np.testing.assert_array_equal(
        ident.causes, netmend.identification.select(ident.scores, "positive")
    )


def test_flipped_labels_selected_by_sign_with_high_precision():
    """Four 6-D Gaussian classes, 15% of training labels flipped; an MLP memorises them. Causes
    selected by sign (valued against the failures and a clean validation set) are mostly
    flipped points."""
    g = torch.Generator().manual_seed(0)
    centres = 2.2 * torch.randn(4, 6, generator=g, dtype=DT)

    def draw(n):
        y = torch.randint(0, 4, (n,), generator=g)
        return centres[y] + torch.randn(n, 6, generator=g, dtype=DT), y

    X, y = draw(400)
    Xt, yt = draw(400)
    flip = torch.rand(400, generator=g) < 0.15
    y_noisy = torch.where(flip, (y + torch.randint(1, 4, (400,), generator=g)) % 4, y)
    torch.manual_seed(0)
    model = MLP(6, 4, hidden=(32,)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y_noisy).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        wrong = (model(Xt[:200]).argmax(1) != yt[:200]).nonzero().squeeze(1)
    assert wrong.numel() >= 5
    rate = float(flip.double().mean())
    precision = {}
    for method, opts in [
        ("knn_shapley", {}),
        ("tmc_shapley", dict(max_permutations=200, n_jobs=1)),
        ("banzhaf", dict(max_samples=3000)),
        ("banzhaf", dict(estimator="exact")),
    ]:
        ident = netmend.identify(
            model, (X, y_noisy), (Xt[:200][wrong], yt[:200][wrong]), method=method,
            k="positive", valid=(Xt[200:], yt[200:]), **opts, **RUN,
        )  # fmt: skip
        c = ident.causes
        assert c.size > 0
        precision[method + opts.get("estimator", "")] = float(flip.numpy()[c].mean())
    print(f"flip rate {rate:.3f}; precision of r > 0: {precision}")
    assert precision["knn_shapley"] > 2.5 * rate
    assert precision["tmc_shapley"] > 2.5 * rate
    assert precision["banzhaf"] > 1.5 * rate
    assert precision["banzhafexact"] > 2.5 * rate


# ----------------------------------------------------------------------------- inputs


class _NoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 3, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def test_clear_errors(blobs, blobs_logreg):
    data, fail = (blobs.X, blobs.y), (blobs.Xf, blobs.yf)
    model = _NoLinear()
    with torch.no_grad():
        yf = (model(blobs.Xf).argmax(1) + 1) % 3
    with pytest.raises(ValueError, match="embed="):
        netmend.identify(model, data, (blobs.Xf, yf), method="knn_shapley", k=3, **RUN)
    # ... and embed= makes it work
    ok = netmend.identify(
        model, data, (blobs.Xf, yf), method="knn_shapley", k=3, embed=lambda x: x, **RUN
    )
    assert ok.scores.shape == (blobs.X.shape[0],)
    bad = [
        (dict(K=0), "K must be"),
        (dict(metric="manhattan"), "metric must be"),
        (dict(neighbours=3), "unknown option"),
        (dict(valid=(torch.zeros(3, 5, dtype=DT), torch.zeros(3, dtype=torch.long))), "shape"),
        (dict(valid=(torch.zeros(3, 2, dtype=DT), torch.full((3,), 7))), "labels must lie"),
        (dict(embed=lambda x: x[:1]), "rows"),
        (dict(embed="pixels"), "embed must be"),
    ]
    with pytest.raises(ValueError, match="estimator must be"):
        netmend.identify(blobs_logreg, data, fail, method="banzhaf", k=3, estimator="x", **RUN)
    for opts, msg in bad:
        with pytest.raises(ValueError, match=msg):
            netmend.identify(blobs_logreg, data, fail, method="knn_shapley", k=3, **opts, **RUN)
    with pytest.raises(ValueError, match="n_jobs"):
        netmend.identify(blobs_logreg, data, fail, method="tmc_shapley", k=3, n_jobs=0, **RUN)
    with pytest.raises(ValueError, match="unknown option"):
        netmend.identify(blobs_logreg, data, fail, method="banzhaf", k=3, patience=3, **RUN)


def test_embeddings_are_the_head_input_and_leave_the_model_alone(ref):
    torch.manual_seed(0)
    model = MLP(4, 3, hidden=(6, 5)).double().eval()
    before = ref.state_hash(model)
    X = torch.randn(11, 4, dtype=DT)
    E = penultimate_embeddings(model, X, chunk_size=4)
    with torch.no_grad():
        expected = model.net[:-1](X)
    np.testing.assert_allclose(E.numpy(), expected.numpy(), atol=1e-14)
    assert ref.state_hash(model) == before
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_n_jobs_refuses_a_script_without_a_main_guard(tmp_path, monkeypatch):
    """Each worker imports the caller's script again: without the guard, every worker reran
    it (an outside-in trial: 376 s against 25 s, all output repeated)."""
    import types

    from netmend.identification.shapley_mc import check_main_guard

    script = tmp_path / "audit.py"
    script.write_text("import netmend\nnetmend.identify(...)\n")
    fake = types.ModuleType("__main__")
    fake.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", fake)
    with pytest.raises(ValueError, match=r"audit.py again: it has no `if __name__"):
        check_main_guard()
    u = tiny_knn_utility()
    with pytest.raises(ValueError, match="or pass n_jobs=1"):
        tmc_shapley(u, n_jobs=2, max_permutations=2, seed=0)
    script.write_text('import netmend\nif __name__ == "__main__":\n    netmend.identify(...)\n')
    check_main_guard()  # guarded: fine
    del fake.__file__  # an interactive session: nothing to rerun
    check_main_guard()
