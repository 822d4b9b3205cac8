"""Diagonal Fisher, Fisher/GGN products, CG and damped solves against dense float64 matrices."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from netmend.curvature import SOLVER_OPTIONS, Curvature, cg, fisher_diag_sum, solver_options
from netmend.model.functional import FunctionalModel

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def dense(op, P: int) -> torch.Tensor:
    """The matrix of a linear operator ``v -> op(v)`` on ``R^P``, column by column."""
    eye = torch.eye(P, dtype=DT)
    return torch.stack([op(eye[:, j]) for j in range(P)], 1)


# ----------------------------------------------------------------------------- diagonal Fisher


@pytest.mark.parametrize(
    "model_name, data_name",
    [
        ("logreg4", "data4"),
        ("mlp4", "data4"),
        ("tiny_conv", "conv_data"),
    ],
)
@pytest.mark.parametrize("method", ["hooks", "vmap", "auto"])
def test_fisher_diag_sum_matches_brute_force(request, ref, model_name, data_name, method):
    model = request.getfixturevalue(model_name)
    data = request.getfixturevalue(data_name)
    fm = FunctionalModel.of(model)
    G = ref.loop_grads(model, data.X, data.y)
    expected = (G * G).sum(0)  # summed, not averaged
    for cs in (1, 4, 1000):
        got = fisher_diag_sum(fm, fm.theta, data.X, data.y, chunk_size=cs, method=method)
        torch.testing.assert_close(got, expected, **TOL)


def test_fisher_diag_hooks_refuses_other_layers():
    model = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(1, 4), nn.Linear(4, 2)).double()
    fm = FunctionalModel.of(model)
    X, y = torch.randn(3, 3, dtype=DT), torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match="hooks.*method='vmap'"):
        fisher_diag_sum(fm, fm.theta, X, y, method="hooks")


# ----------------------------------------------------------------------------- matvecs


def test_fisher_matvec_is_dense_empirical_fisher(mlp4, data4, ref):
    fm = FunctionalModel.of(mlp4)
    G = ref.loop_grads(mlp4, data4.X, data4.y)
    damping = 0.37
    A_dense = G.T @ G + damping * torch.eye(fm.num_params, dtype=DT)
    for cs in (7, 256):
        A = Curvature("fisher", fm, fm.theta, data4.X, data4.y, damping, chunk_size=cs)
        V = torch.randn(fm.num_params, 4, dtype=DT)
        for j in range(V.shape[1]):
            torch.testing.assert_close(A.matvec(V[:, j]), A_dense @ V[:, j], **TOL)


def test_fisher_matvec_full_matrix_logreg(logreg4, data4, ref):
    fm = FunctionalModel.of(logreg4)
    G = ref.loop_grads(logreg4, data4.X, data4.y)
    A = Curvature("fisher", fm, fm.theta, data4.X, data4.y, 0.5, chunk_size=8)
    torch.testing.assert_close(
        dense(A.matvec, fm.num_params), G.T @ G + 0.5 * torch.eye(fm.num_params, dtype=DT), **TOL
    )


def test_ggn_equals_hessian_for_logistic_regression(logreg4, data4, ref):
    fm = FunctionalModel.of(logreg4)
    damping = 0.2
    loss = ref.logreg_flat_loss(data4.X, data4.y, data4.classes)
    H = torch.autograd.functional.hessian(loss, fm.theta.clone())
    A = Curvature("ggn", fm, fm.theta, data4.X, data4.y, damping, chunk_size=11)
    expected = H + damping * torch.eye(fm.num_params, dtype=DT)
    torch.testing.assert_close(dense(A.matvec, fm.num_params), expected, **TOL)
    # the GGN is not the empirical Fisher (a different matrix: the test can tell them apart)
    G = ref.loop_grads(logreg4, data4.X, data4.y)
    assert not torch.allclose(G.T @ G, H, rtol=1e-3)


def test_ggn_matvec_mlp_is_jt_h_j(mlp4, data4):
    """For a non-linear model the GGN is sum_n J_n^T (diag p_n - p_n p_n^T) J_n (not the
    Hessian)."""
    fm = FunctionalModel.of(mlp4)
    J = torch.autograd.functional.jacobian(lambda t: fm.logits(t, data4.X), fm.theta.clone())
    p = torch.softmax(mlp4(data4.X).detach(), 1)
    ggn = sum(
        J[n].T @ (torch.diag(p[n]) - torch.outer(p[n], p[n])) @ J[n] for n in range(p.shape[0])
    )
    A = Curvature("ggn", fm, fm.theta, data4.X, data4.y, 1e-3, chunk_size=13)
    V = torch.randn(fm.num_params, 3, dtype=DT)
    for j in range(3):
        torch.testing.assert_close(A.matvec(V[:, j]), ggn @ V[:, j] + 1e-3 * V[:, j], **TOL)


def test_diag_matvec_and_default_diag(mlp4, data4, ref):
    fm = FunctionalModel.of(mlp4)
    G = ref.loop_grads(mlp4, data4.X, data4.y)
    A = Curvature("diag", fm, fm.theta, data4.X, data4.y, 0.3)
    torch.testing.assert_close(A.diag, (G * G).sum(0), **TOL)
    v = torch.randn(fm.num_params, dtype=DT)
    torch.testing.assert_close(A.matvec(v), ((G * G).sum(0) + 0.3) * v, **TOL)


# ----------------------------------------------------------------------------- solves


def test_cg_matches_dense_solve():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(25, 25, generator=g, dtype=DT)
    A = M @ M.T + 0.5 * torch.eye(25, dtype=DT)
    b = torch.randn(25, generator=g, dtype=DT)
    x, iters = cg(lambda v: A @ v, b, tol=1e-12, maxiter=500)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    assert 1 <= iters <= 500
    # warm start from a nearby point converges too, in fewer iterations
    x_true = torch.linalg.solve(A, b)
    x2, it2 = cg(lambda v: A @ v, b, tol=1e-12, maxiter=500, x0=x_true + 1e-6)
    torch.testing.assert_close(x2, x_true, rtol=1e-9, atol=1e-10)
    assert it2 <= iters


def test_cg_zero_rhs_and_indefinite():
    A = torch.diag(torch.tensor([1.0, 2.0], dtype=DT))
    x, it = cg(lambda v: A @ v, torch.zeros(2, dtype=DT))
    assert it == 0 and torch.equal(x, torch.zeros(2, dtype=DT))
    B = torch.diag(torch.tensor([1.0, -2.0], dtype=DT))
    with pytest.raises(ValueError, match="non-positive curvature"):
        cg(lambda v: B @ v, torch.tensor([1.0, 1.0], dtype=DT))


@pytest.mark.parametrize("solver", ["cg", "dense"])
@pytest.mark.parametrize("kind", ["diag", "fisher", "ggn"])
def test_curvature_solve_matches_dense(logreg4, data4, ref, kind, solver):
    fm = FunctionalModel.of(logreg4)
    P = fm.num_params
    damping = 0.05
    G = ref.loop_grads(logreg4, data4.X, data4.y)
    if kind == "diag":
        A_dense = torch.diag((G * G).sum(0) + damping)
    elif kind == "fisher":
        A_dense = G.T @ G + damping * torch.eye(P, dtype=DT)
    else:
        loss = ref.logreg_flat_loss(data4.X, data4.y, data4.classes)
        A_dense = torch.autograd.functional.hessian(loss, fm.theta.clone()) + damping * torch.eye(
            P, dtype=DT
        )
    A = Curvature(
        kind, fm, fm.theta, data4.X, data4.y, damping, cg_tol=1e-13, cg_maxiter=500, solver=solver
    )
    b = torch.randn(P, dtype=DT)
    torch.testing.assert_close(A.solve(b), torch.linalg.solve(A_dense, b), rtol=1e-8, atol=1e-10)
    B = torch.randn(P, 3, dtype=DT)
    torch.testing.assert_close(A.solve(B), torch.linalg.solve(A_dense, B), rtol=1e-8, atol=1e-10)


def test_an_unconverged_cg_solve_warns(logreg4, data4):
    """`linear` (and every method solving through a Curvature) stopped CG at cg_maxiter with
    no word: an outside trial measured its scores 22% off the dense solve. influence warned."""
    fm = FunctionalModel.of(logreg4)
    b = torch.randn(fm.num_params, dtype=DT)
    kw = dict(solver="cg", cg_tol=1e-13)
    short = Curvature("ggn", fm, fm.theta, data4.X, data4.y, 1e-3, cg_maxiter=2, **kw)
    with pytest.warns(UserWarning, match="stopped at cg_maxiter=2 .* the ggn solve is inexact"):
        short.solve(b)
    full = Curvature("ggn", fm, fm.theta, data4.X, data4.y, 1e-3, cg_maxiter=500, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full.solve(b)
        # converged on its last allowed iteration: cg returns maxiter then too, not a miss
        needed = cg(full.matvec, b, tol=1e-13, maxiter=500)[1]
        exact = Curvature("ggn", fm, fm.theta, data4.X, data4.y, 1e-3, cg_maxiter=needed, **kw)
        exact.solve(b)


def test_curvature_rejects_bad_kind_and_damping(logreg4, data4):
    fm = FunctionalModel.of(logreg4)
    with pytest.raises(ValueError, match="solver must be"):
        Curvature("ggn", fm, fm.theta, data4.X, data4.y, 1.0, solver="lu")
    with pytest.raises(ValueError, match="unknown curvature"):
        Curvature("kronecker", fm, fm.theta, data4.X, data4.y, 1.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="damping must be > 0"):
            Curvature("fisher", fm, fm.theta, data4.X, data4.y, bad)


def test_solver_options_default_to_the_curvature_defaults():
    """A method given no solver options builds the same Curvature as one built with none;
    given some, they arrive typed."""
    defaults = {f.name: f.default for f in dataclasses.fields(Curvature)}
    defaults = {k: v for k, v in defaults.items() if k in SOLVER_OPTIONS}
    assert solver_options({}) == defaults and set(defaults) == set(SOLVER_OPTIONS)
    got = solver_options({"cg_maxiter": "7", "cg_tol": "1e-3", "mc_samples": 2, "other": 1})
    assert (got["cg_maxiter"], got["cg_tol"], got["mc_samples"]) == (7, 1e-3, 2)
    assert "other" not in got
