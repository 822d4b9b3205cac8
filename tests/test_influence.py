"""The influence family (influence/ekfac, LiSSA, tracin, grad_dot/grad_cos, trak) against dense
float64 formulas, explicit loops and actual leave-one-out retraining."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from torch.func import jacrev

import netmend
from netmend.curvature import CURVATURE_KINDS
from netmend.identification import trak as trak_mod
from netmend.identification.tracin import Checkpoints
from netmend.lab.models import MLP, LogisticRegression
from netmend.model.functional import FunctionalModel
from netmend.model.training import TrainConfig, fit

DT = torch.float64
RUN = dict(progress=False, device="cpu", k=3)
needs = {
    kind: pytest.mark.skipif(kind not in CURVATURE_KINDS, reason=f"curvature {kind!r} not built")
    for kind in ("hessian", "ekfac", "kfac")
}


@pytest.fixture
def task(data4, mlp4, failures_for):
    g = torch.Generator().manual_seed(7)
    Xq = torch.randn(3, 4, generator=g, dtype=DT)
    return mlp4, data4.X, data4.y, Xq, failures_for(mlp4, Xq, 3)


def dense_curvature(ref, model, X, y, kind):
    fm = FunctionalModel.of(model)
    theta = fm.theta
    if kind == "fisher":
        G = ref.loop_grads(model, X, y)
        return G.T @ G
    if kind == "hessian":
        return torch.autograd.functional.hessian(lambda t: -fm.ll(t, X, y).sum(), theta)
    J = jacrev(lambda t: fm.logits(t, X))(theta)  # [N, C, P]
    p = torch.softmax(fm.logits(theta, X), 1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", J, H, J)


def dense_influence(ref, model, X, y, Xq, yq, kind, damping):
    """``-g_F^T A^{-1} g_z`` (summed and per failure) and ``g_z^T A^{-1} g_z``."""
    G, Gq = ref.loop_grads(model, X, y), ref.loop_grads(model, Xq, yq)
    A = dense_curvature(ref, model, X, y, kind) + damping * torch.eye(G.shape[1], dtype=DT)
    per = -(G @ torch.linalg.solve(A, Gq.T))
    self_ = (G * torch.linalg.solve(A, G.T).T).sum(1)
    return per.sum(1).numpy(), per.numpy(), self_.numpy()


def close(a, b, rtol=1e-7):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


# ----------------------------------------------------------------------------- influence


@pytest.mark.parametrize("solver", ["cg", "dense"])
@pytest.mark.parametrize("kind", ["ggn", "fisher", pytest.param("hessian", marks=needs["hessian"])])
def test_influence_solvers_match_dense_solve(ref, task, kind, solver):
    model, X, y, Xq, yq = task
    damping = 0.05
    if kind == "hessian":  # random init: make the damped Hessian positive definite
        H = dense_curvature(ref, model, X, y, kind)
        damping += max(0.0, -float(torch.linalg.eigvalsh(H)[0]))
    scores, per, self_ = dense_influence(ref, model, X, y, Xq, yq, kind, damping)
    opts = dict(curvature=kind, damping=damping, cg_tol=1e-12, solver=solver)
    r = netmend.identify(model, (X, y), (Xq, yq), method="influence", **RUN, **opts)
    assert r.info["solver"] == solver
    close(r.scores, scores)
    close(r.per_failure, per)
    if kind == "fisher":  # one CG solve per training example: once is enough
        s = netmend.identify(
            model, (X, y), (Xq, yq), method="influence", target="self", **RUN, **opts
        )
        close(s.scores, self_)
        assert (s.scores > 0).all()


def test_auto_damping_is_a_tenth_of_the_mean_fisher_eigenvalue(ref, task):
    model, X, y, Xq, yq = task
    r = netmend.identify(model, (X, y), (Xq, yq), method="influence", **RUN)
    G = ref.loop_grads(model, X, y)
    assert r.info["damping"] == pytest.approx(0.1 * float((G * G).sum(0).mean()), rel=1e-10)
    close(r.scores, dense_influence(ref, model, X, y, Xq, yq, "ggn", r.info["damping"])[0], 1e-6)


def test_lissa_matches_dense_solve(ref, task):
    model, X, y, Xq, yq = task
    A = dense_curvature(ref, model, X, y, "ggn")
    damping = 0.2 * float(torch.linalg.eigvalsh(A)[-1])  # keeps the auto depth short
    scores, per, _ = dense_influence(ref, model, X, y, Xq, yq, "ggn", damping)
    r = netmend.identify(
        model, (X, y), (Xq, yq), method="influence", solver="lissa", damping=damping, **RUN
    )
    assert not r.info["lissa_depth_capped"]
    close(r.scores, scores, 1e-5)  # full batch: the contraction guarantees 1e-6
    close(r.per_failure, per, 1e-5)


def test_stochastic_lissa_is_seeded_and_unbiased(ref, task):
    model, X, y, Xq, yq = task
    A = dense_curvature(ref, model, X, y, "ggn")
    damping = 0.2 * float(torch.linalg.eigvalsh(A)[-1])
    scores = dense_influence(ref, model, X, y, Xq, yq, "ggn", damping)[0]
    kw = dict(method="influence", solver="lissa", damping=damping, lissa_batch=10, **RUN)
    a = netmend.identify(model, (X, y), (Xq, yq), lissa_repeats=2, **kw)
    assert pearsonr(a.scores, scores)[0] > 0.95
    b = netmend.identify(model, (X, y), (Xq, yq), lissa_depth=10, **kw)
    c = netmend.identify(model, (X, y), (Xq, yq), lissa_depth=10, **kw)
    np.testing.assert_array_equal(b.scores, c.scores)
    d = netmend.identify(model, (X, y), (Xq, yq), lissa_depth=10, seed=1, **kw)
    assert not np.array_equal(b.scores, d.scores)


def test_influence_predicts_leave_one_out_retraining(ref, blobs, blobs_logreg, blobs_logreg_theta):
    """Strongly convex logistic regression: the influence of each removal vs the exact refit."""
    Xf = torch.cat([blobs.Xf, torch.tensor([[0.3, 2.0], [1.0, 1.2]], dtype=DT)])
    with torch.no_grad():
        yf = torch.cat([blobs.yf, (blobs_logreg(Xf[1:]).argmax(1) + 1) % 3])
    r = netmend.identify(
        blobs_logreg,
        (blobs.X, blobs.y),
        (Xf, yf),
        method="influence",
        damping=blobs.l2_train,  # A = the Hessian of the training objective exactly
        cg_tol=1e-12,
        **RUN,
    )
    loss_f = ref.logreg_flat_loss(Xf, yf, blobs.classes)
    base = float(loss_f(blobs_logreg_theta))
    n = blobs.X.shape[0]
    idx = np.unique(np.r_[blobs.planted, np.arange(0, n, 4)])  # 35 refits
    actual = []
    for i in idx:
        keep = torch.arange(n) != int(i)
        th = ref.fit_logreg_exact(
            blobs.X[keep], blobs.y[keep], blobs.classes, blobs.l2_train, blobs_logreg_theta
        )
        actual.append(base - float(loss_f(th)))  # drop of the failures' loss = harm
    actual = np.array(actual)
    assert spearmanr(r.scores[idx], actual)[0] > 0.9
    # most removals are first order: the typical relative error is small (a removal that
    # moves the boundary a lot, e.g. of an outlier, is not, which is what the rank test allows)
    rel = np.abs(r.scores[idx] - actual) / np.maximum(np.abs(actual), 1e-9)
    assert np.median(rel) < 1e-2


@pytest.mark.parametrize("kind", [pytest.param(k, marks=needs[k]) for k in ("ekfac", "kfac")])
def test_kronecker_influence_runs_through_the_same_formula(ref, task, kind):
    """``ekfac`` is ``influence(curvature="ekfac")``; both match the dense formula with the
    curvature's own dense matrix (A e_j column by column)."""
    model, X, y, Xq, yq = task
    r = netmend.identify(model, (X, y), (Xq, yq), method="influence", curvature=kind, **RUN)
    from netmend.curvature import Curvature

    fm = FunctionalModel.of(model)
    C = Curvature(kind, fm, fm.theta, X, y, r.info["damping"])
    Ad = torch.stack([C.matvec(e) for e in torch.eye(fm.num_params, dtype=DT)], 1)
    G, Gq = ref.loop_grads(model, X, y), ref.loop_grads(model, Xq, yq)
    close(r.scores, (-(G @ torch.linalg.solve(Ad, Gq.sum(0)))).numpy(), 1e-6)
    if kind == "ekfac":
        e = netmend.identify(model, (X, y), (Xq, yq), method="ekfac", **RUN)
        np.testing.assert_allclose(e.scores, r.scores, rtol=1e-12)


# ----------------------------------------------------------------------------- tracin, grads


def test_grad_dot_and_cos_match_a_loop(ref, task):
    model, X, y, Xq, yq = task
    G, Gq = ref.loop_grads(model, X, y), ref.loop_grads(model, Xq, yq)
    dot = netmend.identify(model, (X, y), (Xq, yq), method="grad_dot", **RUN)
    per = np.array([[-float(G[n] @ Gq[i]) for i in range(len(yq))] for n in range(len(y))])
    close(dot.per_failure, per)
    close(dot.scores, per.sum(1))
    cos = netmend.identify(model, (X, y), (Xq, yq), method="grad_cos", **RUN)
    per = np.array(
        [
            [-float(torch.cosine_similarity(G[n], Gq[i], 0)) for i in range(len(yq))]
            for n in range(len(y))
        ]
    )
    close(cos.per_failure, per)
    close(cos.scores, per.sum(1))
    self_ = netmend.identify(model, (X, y), (Xq, yq), method="grad_dot", target="self", **RUN)
    close(self_.scores, (G * G).sum(1).numpy())


def test_tracin_matches_a_loop_over_checkpoints(ref, data4, failures_for):
    X, y = data4.X, data4.y
    torch.manual_seed(0)
    model = MLP(4, 3, hidden=(5,)).double()
    ck = Checkpoints(every=2)
    fit(model, X, y, TrainConfig(epochs=2, batch_size=10, lr=0.05), progress=False, callback=ck)
    assert len(ck.states) == 3  # 6 steps, one kept every 2
    g = torch.Generator().manual_seed(3)
    Xq = torch.randn(4, 4, generator=g, dtype=DT)
    yq = failures_for(model, Xq, 3)
    snaps = [MLP(4, 3, hidden=(5,)).double() for _ in ck.states]
    for s, st in zip(snaps, ck.states):
        s.load_state_dict(st)
    checkpoints = [ck.states[0], snaps[1], ck.states[2]]  # state_dicts and modules mixed
    lrs = [0.05, 0.03, 0.01]
    r = netmend.identify(
        model, (X, y), (Xq, yq), method="tracin", checkpoints=checkpoints, lrs=lrs, **RUN
    )
    per, self_ = np.zeros((len(y), len(yq))), np.zeros(len(y))
    for s, lr in zip(snaps, lrs):
        G, Gq = ref.loop_grads(s, X, y), ref.loop_grads(s, Xq, yq)
        for n in range(len(y)):
            self_[n] += lr * float(G[n] @ G[n])
            for i in range(len(yq)):
                per[n, i] -= lr * float(G[n] @ Gq[i])
    close(r.per_failure, per)
    close(r.scores, per.sum(1))
    s = netmend.identify(
        model,
        (X, y),
        (Xq, yq),
        method="tracin",
        checkpoints=checkpoints,
        lrs=lrs,
        target="self",
        **RUN,
    )
    close(s.scores, self_)
    # no checkpoints: the final model alone, i.e. grad_dot
    r0 = netmend.identify(model, (X, y), (Xq, yq), method="tracin", lrs=2.0, **RUN)
    d = netmend.identify(model, (X, y), (Xq, yq), method="grad_dot", **RUN)
    close(r0.scores, 2.0 * d.scores)


def test_tracin_rejects_a_checkpoint_of_another_architecture(task):
    model, X, y, Xq, yq = task
    other = MLP(4, 3, hidden=(7,)).double().state_dict()
    with pytest.raises(ValueError, match="shape"):
        netmend.identify(model, (X, y), (Xq, yq), method="tracin", checkpoints=[other], **RUN)
    with pytest.raises(ValueError, match="list"):
        netmend.identify(model, (X, y), (Xq, yq), method="tracin", checkpoints=other, **RUN)
    with pytest.raises(ValueError, match="one each"):
        netmend.identify(
            model, (X, y), (Xq, yq), method="tracin", checkpoints=[model], lrs=[1, 2], **RUN
        )


# ----------------------------------------------------------------------------- trak


def dense_trak(model, X, y, Xq, yq, ridge, R=None):
    """TRAK's formula with margin gradients from jacrev (projected by ``R`` if given)."""
    fm = FunctionalModel.of(model)

    def margins(t, X, y):
        z = fm.logits(t, X)
        zy = z.gather(1, y[:, None])[:, 0]
        others = z.scatter(1, y[:, None], -torch.inf)
        return zy - torch.logsumexp(others, 1)

    Phi = jacrev(margins)(fm.theta, X, y)
    PhiF = jacrev(margins)(fm.theta, Xq, yq)
    if R is not None:
        Phi, PhiF = Phi @ R, PhiF @ R
    w = 1 - torch.softmax(fm.logits(fm.theta, X), 1).gather(1, y[:, None])[:, 0]
    K = Phi.T @ Phi + ridge * torch.eye(Phi.shape[1], dtype=DT)
    Kinv = torch.linalg.pinv(K, hermitian=True) if ridge == 0 else torch.linalg.inv(K)
    per = -(Phi @ Kinv @ PhiF.T) * w[:, None]
    self_ = (Phi @ Kinv * Phi).sum(1) * w
    return per.sum(1).numpy(), per.numpy(), self_.numpy()


def test_trak_without_projection_is_the_exact_formula(task):
    model, X, y, Xq, yq = task
    kw = dict(method="trak", projection="none", ridge=0.3, **RUN)
    r = netmend.identify(model, (X, y), (Xq, yq), **kw)
    scores, per, self_ = dense_trak(model, X, y, Xq, yq, 0.3)
    close(r.scores, scores)
    close(r.per_failure, per)
    s = netmend.identify(model, (X, y), (Xq, yq), target="self", **kw)
    close(s.scores, self_)
    assert (s.scores >= 0).all()


def test_trak_full_rank_projection_changes_nothing(ref, data4, failures_for):
    """With k = P, ``phi_f^T (Phi^T Phi)^+ phi_z`` is invariant to an invertible projection:
    the projected estimator equals the exact one as the ridge vanishes. (Margin gradients are
    orthogonal to the softmax's shift direction, so ``Phi^T Phi`` is singular: pseudo-inverse.)
    """
    model = LogisticRegression(4, 3).double().eval()  # P = 15 < N = 30
    X, y = data4.X, data4.y
    Xq = torch.randn(2, 4, generator=torch.Generator().manual_seed(9), dtype=DT)
    yq = failures_for(model, Xq, 3)
    kw = dict(method="trak", ridge=1e-9, proj_dim=15, **RUN)
    proj = netmend.identify(model, (X, y), (Xq, yq), projection="gaussian", **kw)
    plain = netmend.identify(model, (X, y), (Xq, yq), projection="none", **kw)
    exact = dense_trak(model, X, y, Xq, yq, 0.0)
    close(proj.scores, exact[0], 1e-6)
    close(proj.per_failure, exact[1], 1e-6)
    close(plain.scores, exact[0], 1e-6)
    # and with k < P it is the formula on the projected gradients, R from the seed
    R = trak_mod.GaussianProjection(15, 6, [0, 0], DT, torch.device("cpu")).matrix()
    small = netmend.identify(
        model, (X, y), (Xq, yq), method="trak", projection="gaussian", proj_dim=6, ridge=0.1, **RUN
    )
    close(small.scores, dense_trak(model, X, y, Xq, yq, 0.1, R)[0])


class _ConvMLP(torch.nn.Module):
    """A conv layer (padding, stride 1), a hidden Linear wider than the projection side and
    a 3-class head narrower than it: every branch of the Kronecker projection."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.fc1 = torch.nn.Linear(6 * 4 * 4, 9)
        self.fc2 = torch.nn.Linear(9, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(h)))


def test_trak_kronecker_projection_is_the_formula_on_kronecker_projected_gradients():
    """projection='kronecker' (LoGra's per-layer factored projection): the features are the
    exact margin gradients (jacrev) times the block-diagonal matrix of Kronecker products
    P_out (x) P_in (bias: P_out), so the scores are TRAK's formula with that R; float64."""
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = _ConvMLP().double().eval()
    X = torch.randn(40, 1, 4, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (40,), generator=g)
    Xq = torch.randn(3, 1, 4, 4, generator=g, dtype=DT)
    with torch.no_grad():
        yq = (model(Xq).argmax(1) + 1) % 3
    fm = FunctionalModel.of(model)
    proj = trak_mod.KroneckerProjection(fm, 16, [0, 0], DT, torch.device("cpu"))  # side 4
    R = proj.matrix()
    # conv: 6 out (projected to 4) x 9 in (to 4) + bias 4; fc1: 9 x 96 -> 4 x 4 + 4;
    # fc2: 3 out (kept) x 9 in (to 4), no bias
    assert R.shape == (fm.num_params, 16 + 4 + 16 + 4 + 12) and proj.dim == R.shape[1]
    kw = dict(method="trak", projection="kronecker", proj_dim=16, ridge=0.1, **RUN)
    r = netmend.identify(model, (X, y), (Xq, yq), chunk_size=7, **kw)
    scores, per, _ = dense_trak(model, X, y, Xq, yq, 0.1, R)
    close(r.scores, scores, 1e-9)
    close(r.per_failure, per, 1e-9)
    assert r.info["proj_dim"] == R.shape[1]
    # seeded per layer and side; entries ~ N(0, 1/side)
    again = trak_mod.KroneckerProjection(fm, 16, [0, 0], DT, torch.device("cpu")).matrix()
    np.testing.assert_array_equal(again.numpy(), R.numpy())
    other = trak_mod.KroneckerProjection(fm, 16, [1, 0], DT, torch.device("cpu")).matrix()
    assert not torch.equal(other, R)
    with pytest.raises(ValueError, match=r"kronecker.*Linear and Conv2d.*'gaussian'"):
        ln = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.LayerNorm(5)).double()
        trak_mod.KroneckerProjection(FunctionalModel.of(ln), 16, [0], DT, torch.device("cpu"))


@pytest.mark.parametrize("block", [1, 3, 7, 50])
def test_trak_gram_is_phi_transpose_phi(block):
    """The block-triangular ``Phi^T Phi`` equals the plain product (a tolerance: the blocks
    are summed by other kernels), and is exactly symmetric."""
    Phi = torch.randn(40, 17, generator=torch.Generator().manual_seed(2), dtype=DT)
    K = trak_mod.gram(Phi, block)
    close(K.numpy(), (Phi.T @ Phi).numpy(), 1e-12)
    np.testing.assert_array_equal(K.numpy(), K.T.numpy())


def test_trak_ridge_ratio_is_that_fraction_of_the_mean_eigenvalue(task):
    """``ridge_ratio=r`` (with ``ridge="auto"``) is ``ridge = r * trace(Phi^T Phi) / k``: the
    same scores as the explicit ridge, the exact formula's; the default ratio is 0.1."""
    model, X, y, Xq, yq = task
    kw = dict(method="trak", projection="none", **RUN)
    fm = FunctionalModel.of(model)
    _, G = trak_mod.margins_and_grads(SimpleNamespace(fm=fm), fm.theta, X, y)  # [N, P]
    mean_eig = float((G * G).sum()) / G.shape[1]
    r = netmend.identify(model, (X, y), (Xq, yq), ridge_ratio=0.3, **kw)
    close(r.info["ridge"][0], 0.3 * mean_eig)
    close(r.scores, dense_trak(model, X, y, Xq, yq, 0.3 * mean_eig)[0])
    default = netmend.identify(model, (X, y), (Xq, yq), **kw)
    close(default.info["ridge"][0], 0.1 * mean_eig)
    assert not np.allclose(default.scores, r.scores)
    for bad in (0, -1.0, "big", True, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="ridge_ratio must be a finite number > 0"):
            netmend.identify(model, (X, y), (Xq, yq), ridge_ratio=bad, **kw)
    with pytest.raises(ValueError, match="not both"):
        netmend.identify(model, (X, y), (Xq, yq), ridge=0.1, ridge_ratio=0.3, **kw)


def test_trak_projection_is_seeded_blockwise_and_chunk_independent(monkeypatch):
    dev = torch.device("cpu")
    whole = trak_mod.GaussianProjection(50, 8, [3, 0], DT, dev).matrix()
    monkeypatch.setattr(trak_mod, "BLOCK_ELEMENTS", 8 * 7)  # 7 rows per block: 8 blocks
    blocks = trak_mod.GaussianProjection(50, 8, [3, 0], DT, dev, cache=False)
    assert blocks.full is None and blocks.num_blocks == 8
    G = torch.randn(5, 50, dtype=DT)
    other_blocking = G @ blocks.matrix()
    # a different blocking draws different numbers; but each projection is a fixed function
    # of its seed, and block-by-block application equals the whole matrix
    close(blocks(G).numpy(), other_blocking.numpy(), 1e-12)
    again = trak_mod.GaussianProjection(50, 8, [3, 0], DT, dev, cache=True).matrix()
    np.testing.assert_array_equal(again.numpy(), blocks.matrix().numpy())
    assert not torch.equal(
        whole[:7], trak_mod.GaussianProjection(50, 8, [4, 0], DT, dev).matrix()[:7]
    )
    # entries ~ N(0, 1/k)
    big = trak_mod.GaussianProjection(400, 50, [0], DT, dev).matrix()
    assert abs(float(big.var()) * 50 - 1) < 0.05 and abs(float(big.mean())) < 0.01


def test_trak_projection_cache_is_a_byte_budget(monkeypatch):
    """``R`` is kept whole when it fits ``CACHE_BYTES`` in the features' dtype: float32 keeps
    twice the entries float64 does, and both give the same numbers as regenerating it."""
    dev = torch.device("cpu")
    monkeypatch.setattr(trak_mod, "CACHE_BYTES", 50 * 8 * 4)  # [50, 8] in float32
    f32 = trak_mod.GaussianProjection(50, 8, [1, 0], torch.float32, dev)
    f64 = trak_mod.GaussianProjection(50, 8, [1, 0], DT, dev)
    assert f32.full is not None and f64.full is None
    G = torch.randn(3, 50, dtype=DT)
    close(f64(G).numpy(), (G @ f32.full.double()).numpy(), 1e-6)  # float32 rounding of R


def test_trak_ensemble_averages_kernel_and_reweighting(task):
    model, X, y, Xq, yq = task
    other = MLP(4, 3, hidden=(6, 5)).double().eval()
    kw = dict(method="trak", projection="none", ridge=0.2, **RUN)
    r = netmend.identify(model, (X, y), (Xq, yq), checkpoints=[model, other], **kw)
    parts = []
    for m in (model, other):
        fm = FunctionalModel.of(m)
        w = 1 - torch.softmax(fm.logits(fm.theta, X), 1).gather(1, y[:, None])[:, 0]
        parts.append((dense_trak(m, X, y, Xq, yq, 0.2)[1] / w[:, None].numpy(), w.numpy()))
    kern = (parts[0][0] + parts[1][0]) / 2
    wbar = (parts[0][1] + parts[1][1]) / 2
    close(r.per_failure, kern * wbar[:, None])


def test_bad_options_raise(task):
    model, X, y, Xq, yq = task
    data, fail = (X, y), (Xq, yq)
    with pytest.raises(ValueError, match="unknown option"):
        netmend.identify(model, data, fail, method="influence", dampnig=0.1, **RUN)
    with pytest.raises(ValueError, match="self-influence"):
        netmend.identify(model, data, fail, method="grad_cos", target="self", **RUN)
    with pytest.raises(ValueError, match="target"):
        netmend.identify(model, data, fail, method="grad_dot", target="mine", **RUN)
    with pytest.raises(ValueError, match="damping"):
        netmend.identify(model, data, fail, method="influence", damping=0.0, **RUN)
    with pytest.raises(ValueError, match="solver"):
        netmend.identify(model, data, fail, method="influence", solver="newton", **RUN)
    with pytest.raises(ValueError, match="not positive definite"):  # indefinite at random init
        netmend.identify(
            model,
            data,
            fail,
            method="influence",
            curvature="hessian",
            solver="dense",
            damping=1e-12,
            **RUN,
        )
    # the same through conjugate gradients: it said only "increase damping", with no value
    with pytest.raises(ValueError, match=r"not positive definite \(conjugate gradients met .* "
                       r"at damping 1e-12\): increase damping, or use 'ggn'"):  # fmt: skip
        netmend.identify(model, data, fail, method="influence", curvature="hessian",
                         solver="cg", damping=1e-12, **RUN)  # fmt: skip
    with pytest.raises(ValueError, match="projection"):
        netmend.identify(model, data, fail, method="trak", projection="srht", **RUN)


def test_self_influence_by_an_iterative_solver_warns_of_its_cost(task, monkeypatch):
    """One CG solve per training example ran past 10 minutes on 1,348 digits with no word
    (outside-in trial); a direct solve stays quiet."""
    import warnings

    from netmend.identification import influence as influence_mod

    model, X, y, Xq, yq = task
    monkeypatch.setattr(influence_mod, "SELF_ITERATIVE_MAX", 5)
    kw = dict(method="influence", target="self", **RUN)
    with pytest.warns(UserWarning, match=r"one iterative solve per training example.*ekfac"):
        slow = netmend.identify(model, (X, y), (Xq, yq), solver="cg", cg_maxiter=50, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = netmend.identify(model, (X, y), (Xq, yq), solver="dense", **kw)
    close(slow.scores, fast.scores, 1e-5)  # the same quantity, only the solve differs
