"""KFAC, EK-FAC and the Hessian kind against dense float64 matrices built with torch.func."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, jacrev

import netmend
from netmend.curvature import Curvature
from netmend.curvature.kfac import KroneckerFactors, kronecker_factors
from netmend.lab.models import MLP
from netmend.model.functional import FunctionalModel

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-11)
RUN = dict(progress=False, device="cpu")


def close(got: torch.Tensor, want: torch.Tensor, **tol) -> None:
    """assert_close that names the worst entries when it fails."""
    tol = tol or TOL
    if not torch.allclose(got, want, **tol):
        err = (got - want).abs().reshape(-1)
        worst = torch.topk(err, min(5, err.numel())).indices
        rows = [
            f"  [{int(i)}] got {float(got.reshape(-1)[i]):.6g} want "
            f"{float(want.reshape(-1)[i]):.6g}"
            for i in worst
        ]
        raise AssertionError("mismatch, worst entries:\n" + "\n".join(rows))


def factors(model, X, y, kind="kfac", fisher_type="empirical", **kw) -> KroneckerFactors:
    fm = FunctionalModel.of(model)
    return kronecker_factors(fm, fm.theta, X, y, kind, fisher_type, **kw)


def block_mask(f: KroneckerFactors) -> torch.Tensor:
    """``[P, P]`` boolean mask of the per-layer diagonal blocks."""
    layer = torch.full((f.num_params,), -1)
    for i, lf in enumerate(f.layers):
        layer[lf.weight] = i
        if lf.bias is not None:
            layer[lf.bias] = i
    assert (layer >= 0).all()
    return layer[:, None] == layer[None, :]


def dense_ggn(model, X) -> torch.Tensor:
    """``sum_n J_n^T (diag p_n - p_n p_n^T) J_n`` from the logits' Jacobian (torch.func)."""
    fm = FunctionalModel.of(model)
    J = jacrev(lambda t: fm.logits(t, X))(fm.theta)  # [N, C, P]
    p = torch.softmax(fm.logits(fm.theta, X), 1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", J, H, J)


def frob(M: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(M))


# ----------------------------------------------------------------------------- exactness


def test_single_example_kfac_blocks_are_exact(mlp4, data4, ref):
    """One example: each block of g g^T is (d d^T) (x) (a a^T), which KFAC reproduces."""
    X, y = data4.X[:1], data4.y[:1]
    f = factors(mlp4, X, y)
    g = ref.loop_grads(mlp4, X, y)[0]
    mask = block_mask(f)
    close(f.dense(), torch.outer(g, g) * mask)
    assert (torch.outer(g, g) * ~mask).abs().max() > 1e-6  # the off-blocks are really dropped


def test_kfac_one_layer_structure(logreg4, data4, ref):
    """A one-layer model: the KFAC is G (x) A with A = mean [x,1][x,1]^T and G = sum d d^T
    (d = onehot - p), laid out like the flat parameter vector [W.flatten(), b]."""
    X, y = data4.X, data4.y
    f = factors(logreg4, X, y)
    xa = torch.cat([X, torch.ones(X.shape[0], 1, dtype=DT)], 1)
    p = torch.softmax(logreg4(X).detach(), 1)
    d = F.one_hot(y, 3).to(DT) - p
    A, G = xa.T @ xa / X.shape[0], d.T @ d
    close(f.layers[0].A, A)
    close(f.layers[0].G, G)
    dense = torch.kron(G, A)  # index [(o, i), (o', i')] on the matrix [W | b]
    idx = torch.arange(3 * 5).reshape(3, 5)
    order = torch.cat([idx[:, :4].reshape(-1), idx[:, 4]])  # flat order: W row-major, then b
    close(f.dense(), dense[order][:, order])


def test_kfac_exact_when_examples_share_the_input(logreg4, ref):
    """Examples with one common input (any labels): F = sum_n (d_n d_n^T) (x) a a^T exactly."""
    X = torch.randn(1, 4, dtype=DT).repeat(7, 1)
    y = torch.tensor([0, 1, 2, 0, 1, 1, 2])
    G = ref.loop_grads(logreg4, X, y)
    for kind in ("kfac", "ekfac"):
        close(factors(logreg4, X, y, kind).dense(), G.T @ G)


def test_exact_fisher_type_single_example_is_the_ggn(logreg4, data4):
    """The "exact" Fisher type sums over classes weighted by p: for one example of a linear
    layer KFAC is then exactly the GGN (= the Hessian of the NLL)."""
    X, y = data4.X[3:4], data4.y[3:4]
    f = factors(logreg4, X, y, fisher_type="exact")
    close(f.dense(), dense_ggn(logreg4, X))
    fm = FunctionalModel.of(logreg4)
    H = hessian(lambda t: -fm.ll(t, X, y).sum())(fm.theta)
    close(f.dense(), H)


# ----------------------------------------------------------------------------- EK-FAC


@pytest.mark.parametrize("net", ["mlp", "conv"])
@pytest.mark.parametrize("fisher_type", ["empirical", "exact"])
def test_ekfac_closer_than_kfac(net, fisher_type, mlp4, data4, tiny_conv, conv_data, ref):
    """EK-FAC is the best diagonal in KFAC's eigenbasis, so it is closer (Frobenius) to the
    Fisher than KFAC: to the empirical Fisher, and (exact-expectation path) to the GGN."""
    model, data = (mlp4, data4) if net == "mlp" else (tiny_conv, conv_data)
    if fisher_type == "empirical":
        Gr = ref.loop_grads(model, data.X, data.y)
        target = Gr.T @ Gr
    else:
        target = dense_ggn(model, data.X)
    kf = factors(model, data.X, data.y, "kfac", fisher_type).dense()
    ek = factors(model, data.X, data.y, "ekfac", fisher_type).dense()
    assert frob(ek - target) < frob(kf - target)
    # both drop the same off-diagonal blocks: on the blocks themselves the gain is clear
    mask = block_mask(factors(model, data.X, data.y, "kfac", fisher_type))
    b_kfac, b_ekfac = frob((kf - target) * mask), frob((ek - target) * mask)
    assert b_ekfac < 0.95 * b_kfac, (b_ekfac, b_kfac)


@pytest.mark.parametrize("net", ["mlp", "conv", "seq"])
@pytest.mark.parametrize("fisher_type", ["empirical", "exact"])
def test_ekfac_eigenvalues_are_the_diagonal_in_the_kronecker_basis(
    net, fisher_type, mlp4, data4, tiny_conv, conv_data, ref
):
    """Lambda = diag((Q_G (x) Q_A)^T F_block (Q_G (x) Q_A)), F from brute force (for the conv
    net the exact type takes the rotate-inputs-first route in one layer, the other one else)."""
    if net == "seq":  # a linear layer shared over 5 positions of each example
        torch.manual_seed(6)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3)).double()
        data = SimpleNamespace(X=torch.randn(8, 5, 3, dtype=DT), y=torch.arange(8) % 3)
    else:
        model, data = (mlp4, data4) if net == "mlp" else (tiny_conv, conv_data)
    X, y = data.X, data.y
    ek = factors(model, X, y, "ekfac", fisher_type)
    kf = factors(model, X, y, "kfac", fisher_type)
    if fisher_type == "empirical":
        Gr = ref.loop_grads(model, X, y)
        Fd = Gr.T @ Gr
    else:
        Fd = dense_ggn(model, X)
    for lf, lk in zip(ek.layers, kf.layers):
        close(lf.QA, lk.QA)  # EK-FAC keeps KFAC's eigenbasis
        rows = torch.zeros(1, ek.num_params, dtype=DT)
        Q = []  # the basis vectors, as flat vectors
        out, inn = lf.shape
        for o in range(out):
            for i in range(inn):
                M = torch.outer(lf.QG[:, o], lf.QA[:, i])[None]
                rows.zero_()
                lf.from_matrix(M, rows)
                Q.append(rows[0].clone())
        Qm = torch.stack(Q, 1)
        close(Qm.T @ Qm, torch.eye(out * inn, dtype=DT))  # orthonormal
        close(lf.eigenvalues.reshape(-1), torch.diagonal(Qm.T @ Fd @ Qm))
        # KFAC's eigenvalues are the products of the factors' eigenvalues
        close(lk.eigenvalues, torch.outer(lk.eigG, lk.eigA))
    if net == "seq":  # A averages over examples and sums over positions: [x, 1] per position
        xa = torch.cat([X, torch.ones(*X.shape[:2], 1, dtype=DT)], 2).reshape(-1, 4)
        close(kf.layers[0].A, xa.T @ xa / X.shape[0])


# ----------------------------------------------------------------------------- solve, damping


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_solve_inverts_matvec_and_matches_dense(kind, tiny_conv, conv_data):
    f = factors(tiny_conv, conv_data.X, conv_data.y, kind)
    P = f.num_params
    D = f.dense()
    close(D, D.T)
    assert float(torch.linalg.eigvalsh(D).min()) > -1e-10  # PSD
    v = torch.randn(P, dtype=DT)
    V = torch.randn(P, 3, dtype=DT)
    for damping in (1e-3, 0.7, 50.0):
        A = D + damping * torch.eye(P, dtype=DT)
        close(f.solve(f.matvec(v) + damping * v, damping), v, rtol=1e-8, atol=1e-9)
        close(f.solve(V, damping), torch.linalg.solve(A, V), rtol=1e-8, atol=1e-10)
    close(f.matvec(V), D @ V)
    close(f.quadratic(v), v @ D @ v)
    close(f.quadratic(V), torch.einsum("pm,pq,qm->m", V, D, V))
    close(f.diagonal(), torch.diagonal(D))
    # damping -> infinity: damping * A^{-1} b -> b
    b = torch.randn(P, dtype=DT)
    close(1e9 * f.solve(b, 1e9), b, rtol=1e-6, atol=1e-8)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="damping must be > 0"):
            f.solve(b, bad)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_curvature_kind_uses_the_factors(kind, mlp4, data4):
    fm = FunctionalModel.of(mlp4)
    damping = 0.3
    C = Curvature(
        kind, fm, fm.theta, data4.X, data4.y, damping, fisher_type="empirical", chunk_size=7
    )
    D = factors(mlp4, data4.X, data4.y, kind).dense()
    A = D + damping * torch.eye(fm.num_params, dtype=DT)
    v = torch.randn(fm.num_params, dtype=DT)
    close(C.matvec(v), A @ v)
    close(C.solve(C.matvec(v)), v, rtol=1e-8, atol=1e-10)
    B = torch.randn(fm.num_params, 2, dtype=DT)
    close(C.solve(B), torch.linalg.solve(A, B), rtol=1e-8, atol=1e-10)
    close(C.quadratic(v), v @ D @ v)
    # the default Fisher type is the sampled one; precomputed factors are taken as given
    C2 = Curvature(kind, fm, fm.theta, data4.X, data4.y, damping)
    assert C2.factors is not None and C2.factors.fisher_type == "sampled"
    C3 = Curvature(kind, fm, fm.theta, data4.X, data4.y, damping, factors=C.factors)
    close(C3.matvec(v), A @ v)
    other = "ekfac" if kind == "kfac" else "kfac"
    with pytest.raises(ValueError, match="recompute"):
        Curvature(other, fm, fm.theta, data4.X, data4.y, damping, factors=C.factors)


# ----------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("fisher_type", ["empirical", "sampled", "exact"])
def test_chunk_size_does_not_change_the_factors(fisher_type, tiny_conv, conv_data):
    ref_f = factors(tiny_conv, conv_data.X, conv_data.y, "ekfac", fisher_type, chunk_size=1000)
    for cs in (1, 4):
        f = factors(tiny_conv, conv_data.X, conv_data.y, "ekfac", fisher_type, chunk_size=cs)
        for a, b in zip(f.layers, ref_f.layers):
            close(a.A, b.A)
            close(a.G, b.G)
            close(a.eigenvalues, b.eigenvalues)


def test_sampled_fisher_converges_to_the_exact_expectation(mlp4, data4):
    """Sampled labels: a seeded, unbiased MC estimate of the exact-expectation (GGN) factors."""
    X, y = data4.X, data4.y
    exact = factors(mlp4, X, y, "ekfac", "exact")

    def err(S: int, seed: int = 0) -> float:
        f = factors(mlp4, X, y, "ekfac", "sampled", mc_samples=S, seed=seed)
        for a, b in zip(f.layers, exact.layers):
            close(a.A, b.A)  # the inputs do not depend on the labels
        return max(frob(a.G - b.G) / frob(b.G) for a, b in zip(f.layers, exact.layers))

    few, many = err(4), err(2000)
    assert many < 0.05, many
    assert many < few / 5, (many, few)
    # deterministic given the seed, different for another seed
    a = factors(mlp4, X, y, "kfac", "sampled", mc_samples=3, seed=1)
    b = factors(mlp4, X, y, "kfac", "sampled", mc_samples=3, seed=1)
    c = factors(mlp4, X, y, "kfac", "sampled", mc_samples=3, seed=2)
    assert torch.equal(a.layers[0].G, b.layers[0].G)
    assert not torch.allclose(a.layers[0].G, c.layers[0].G)


def test_sampled_correction_is_unbiased_given_the_eigenbasis(data4):
    """EK-FAC with sampled labels: given the eigenbasis, ``E[Lambda]`` is the exact Fisher's
    diagonal in it, ``sum_n sum_c p_nc (Q_G^T g_nc Q_A)**2`` (brute force with torch.func).

    Three examples and hidden layers wider than that: each sampled ``G`` has a null space.
    Labels reused from the covariance pass would give ``Lambda = 0`` there for every seed
    (every sampled output gradient lies in the range of ``G``), where the exact diagonal is
    not; independent labels are unbiased. Over seeds 0-149 the summed gap ``Lambda - exact``
    in those null spaces must average to zero within 4 standard errors (reused labels: the
    gap is minus the exact sum, about 16 standard errors away)."""
    torch.manual_seed(5)
    model = MLP(4, 3, hidden=(7, 6)).double().eval()
    X, y = data4.X[:3], data4.y[:3]
    fm = FunctionalModel.of(model)
    J = jacrev(lambda t: torch.log_softmax(fm.logits(t, X), 1))(fm.theta)  # [N, C, P]
    p = torch.softmax(fm.logits(fm.theta, X), 1).detach()
    gaps, exacts = [], []
    for seed in range(150):
        f = factors(model, X, y, "ekfac", "sampled", seed=seed)
        gap = exact = 0.0
        for lf in f.layers:
            null = lf.eigG <= 1e-10 * lf.eigG.max()
            if not null.any():
                continue
            rot = lf.rotate(lf.to_matrix(J.reshape(-1, f.num_params)))  # [N*C, out, in']
            want = (p.reshape(-1, 1, 1) * rot**2).sum(0)  # exact diagonal in this basis
            gap += float((lf.eigenvalues - want)[null].sum())
            exact += float(want[null].sum())
        gaps.append(gap)
        exacts.append(exact)
    gap_t, exact_t = torch.tensor(gaps), torch.tensor(exacts)
    scale = float(exact_t.mean())
    assert scale > 1e-3  # the null spaces carry real curvature
    se = float(gap_t.std() / len(gaps) ** 0.5)
    assert abs(float(gap_t.mean())) <= 4 * se + 1e-12, (float(gap_t.mean()), se, scale)
    assert se < 0.25 * scale  # precise enough to tell a -scale bias (reused labels) from 0
    # the covariance pass's labels are unchanged by this: same G as drawn by the seed alone
    a = factors(model, X, y, "kfac", "sampled", seed=7)
    b = factors(model, X, y, "ekfac", "sampled", seed=7)
    assert all(torch.equal(u.G, v.G) for u, v in zip(a.layers, b.layers))
    c = factors(model, X, y, "ekfac", "sampled", seed=7)
    assert all(torch.equal(u.eigenvalues, v.eigenvalues) for u, v in zip(b.layers, c.layers))


# ----------------------------------------------------------------------------- convolutions


def _patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Brute-force patches of one input ``[C, H, W]``: ``[C*kh*kw, L]`` by explicit loops."""
    (ph, pw), (sh, sw), (dh, dw), (kh, kw) = (
        conv.padding,
        conv.stride,
        conv.dilation,
        conv.kernel_size,
    )
    xp = F.pad(x, (pw, pw, ph, ph))
    Ho = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    Wo = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    cols = []
    for i in range(Ho):
        for j in range(Wo):
            win = xp[
                :,
                i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                j * sw : j * sw + dw * (kw - 1) + 1 : dw,
            ]
            cols.append(win.reshape(-1))
    return torch.stack(cols, 1)


def test_conv_factors_match_brute_force_patches(tiny_conv, conv_data):
    m, X, y = tiny_conv, conv_data.X, conv_data.y
    N = X.shape[0]
    o1 = m.c1(X)
    h1 = torch.tanh(o1)
    o2 = m.c2(h1)
    h2 = torch.tanh(o2).flatten(1)
    z = m.fc(h2)
    ll = -F.cross_entropy(z, y, reduction="sum")
    d1, d2, dz = torch.autograd.grad(ll, [o1, o2, z])
    layers = [(m.c1, X, d1), (m.c2, h1.detach(), d2)]
    f = factors(m, X, y)
    for lf, (conv, inp, d) in zip(f.layers, layers):
        A = 0
        G = 0
        for n in range(N):
            pa = _patches(inp[n], conv)
            pa = torch.cat([pa, torch.ones(1, pa.shape[1], dtype=DT)])  # bias column
            dn = d[n].reshape(d.shape[1], -1)  # [out, L]
            assert dn.shape[1] == pa.shape[1]
            A = A + pa @ pa.T
            G = G + dn @ dn.T / dn.shape[1]
            # the patches are right: sum_l d_l a_l^T is the autograd weight gradient
            gw = torch.autograd.grad(-F.cross_entropy(m(X[n : n + 1]), y[n : n + 1]), conv.weight)[
                0
            ]
            close((dn @ pa[:-1].T).reshape(gw.shape), gw)
        close(lf.A, A / N)
        close(lf.G, G)
    ha = torch.cat([h2, torch.ones(N, 1, dtype=DT)], 1).detach()
    close(f.layers[2].A, ha.T @ ha / N)
    close(f.layers[2].G, dz.T @ dz)


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=(2, 3), stride=1, padding=(1, 2), dilation=(1, 2), bias=False),
        dict(kernel_size=3, stride=(2, 1), padding=0, dilation=1, bias=True),
        dict(kernel_size=(3, 1), stride=3, padding=(2, 1), dilation=(2, 1), bias=True),
    ],
)
def test_conv_input_factor_matches_brute_force(conv):
    """The input factor without unfolding (row-offset products) equals the patch sum, for
    stride, padding, dilation and bias variants."""
    torch.manual_seed(0)
    c = nn.Conv2d(2, 3, **conv).double()
    X = torch.randn(5, 2, 7, 6, dtype=DT)
    L = c(X[:1]).shape[2] * c(X[:1]).shape[3]
    model = nn.Sequential(c, nn.Tanh(), nn.Flatten(), nn.Linear(3 * L, 4)).double()
    f = factors(model, X, torch.tensor([0, 1, 2, 3, 0]))
    A = 0
    for n in range(X.shape[0]):
        pa = _patches(X[n], c)
        if c.bias is not None:
            pa = torch.cat([pa, torch.ones(1, pa.shape[1], dtype=DT)])
        A = A + pa @ pa.T
    close(f.layers[0].A, A / X.shape[0])


# ----------------------------------------------------------------------------- hessian kind


def test_hessian_kind_matches_torch_func_hessian(mlp4, data4):
    fm = FunctionalModel.of(mlp4)
    X, y = data4.X, data4.y
    H = hessian(lambda t: -fm.ll(t, X, y).sum())(fm.theta)
    P = fm.num_params
    lam_min = float(torch.linalg.eigvalsh(H).min())
    damping = abs(lam_min) + 0.5
    C = Curvature(
        "hessian", fm, fm.theta, X, y, damping, chunk_size=7, cg_tol=1e-12, cg_maxiter=1000
    )
    A = H + damping * torch.eye(P, dtype=DT)
    V = torch.randn(P, 2, dtype=DT)
    for j in range(2):
        close(C.matvec(V[:, j]), A @ V[:, j])
    close(C.solve(V), torch.linalg.solve(A, V), rtol=1e-7, atol=1e-9)
    # it is not the GGN: a ReLU net away from a minimum has a different (indefinite) Hessian
    assert not torch.allclose(H, dense_ggn(mlp4, X), rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------- serialisation


def test_to_from_tensors_round_trip(tiny_conv, conv_data, tmp_path):
    f = factors(tiny_conv, conv_data.X, conv_data.y, "ekfac", "sampled", mc_samples=2, seed=3)
    tensors, meta = f.to_tensors()
    assert all(isinstance(v, str) for v in meta.values())
    safetensors = pytest.importorskip("safetensors.torch")
    path = tmp_path / "f.safetensors"
    safetensors.save_file(tensors, str(path), metadata=meta)
    with safetensors.safe_open(str(path), "pt") as fh:
        meta2 = fh.metadata()
    g = KroneckerFactors.from_tensors(safetensors.load_file(str(path)), meta2)
    assert (g.kind, g.fisher_type, g.num_examples, g.mc_samples, g.seed) == (
        "ekfac",
        "sampled",
        9,
        2,
        3,
    )
    v = torch.randn(f.num_params, dtype=DT)
    for k, t in g.to_tensors()[0].items():
        assert torch.equal(t, tensors[k])
    close(g.solve(v, 0.1), f.solve(v, 0.1), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="incomplete"):
        KroneckerFactors.from_tensors({k: t for k, t in tensors.items() if "fc" not in k}, meta)
    with pytest.raises(ValueError, match="format"):
        KroneckerFactors.from_tensors(tensors, {**meta, "format": "other"})


# ----------------------------------------------------------------------------- subsampling


def test_subsampled_factors_are_the_rescaled_factors_of_the_subsample(mlp4, data4):
    """covariance_max_examples=n: A and the eigenbases are those of the n drawn rows, G is
    rescaled by N/n; correction_max_examples=m: Lambda is the correction over the m drawn rows
    (another draw) in that basis, rescaled by N/m. Checked against explicit subsets."""
    from netmend.curvature.kfac import _subsample, eigencorrect

    X, y = data4.X, data4.y
    N, n, m = X.shape[0], 12, 17
    sub = factors(mlp4, X, y, "ekfac", covariance_max_examples=n, correction_max_examples=m, seed=4)
    assert (sub.num_examples, sub.covariance_examples, sub.correction_examples) == (N, n, m)
    i1, i2 = _subsample(N, n, 4, 0, "c"), _subsample(N, m, 4, 1, "l")
    assert i1 is not None and i2 is not None and not torch.equal(i1[:n], i2[:n])
    part = factors(mlp4, X[i1], y[i1], "kfac")
    fm = FunctionalModel.of(mlp4)
    lam = eigencorrect(factors(mlp4, X[i1], y[i1], "kfac"), fm, fm.theta, X[i2], y[i2])
    for ls, lp, ll in zip(sub.layers, part.layers, lam.layers):
        close(ls.A, lp.A)
        close(ls.G, lp.G * (N / n))
        close(ls.eigenvalues, ll.eigenvalues * (N / m))
    # at or above N: no subsample, the full factors exactly
    full = factors(mlp4, X, y, "ekfac")
    same = factors(mlp4, X, y, "ekfac", covariance_max_examples=N, correction_max_examples=99)
    for a, b in zip(full.layers, same.layers):
        close(a.eigenvalues, b.eigenvalues)
    assert (same.covariance_examples, same.correction_examples) == (N, N)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="covariance_max_examples"):
            factors(mlp4, X, y, "kfac", covariance_max_examples=bad)


def test_subsampled_ekfac_reaches_identify(blobs_mlp):
    """The options reach the factors through identify (and change the scores)."""
    b = blobs_mlp
    kw = dict(k=5, progress=False, seed=0)
    full = netmend.identify(b.model, (b.X, b.y), (b.Xf, b.yf), "ekfac", **kw)
    sub = netmend.identify(
        b.model, (b.X, b.y), (b.Xf, b.yf), "ekfac", correction_max_examples=20, **kw
    )
    assert not np.allclose(full.scores, sub.scores)
    assert np.corrcoef(full.scores, sub.scores)[0, 1] > 0.5


# ----------------------------------------------------------------------------- bad input


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.relu(self.lin(x)))


def test_unsupported_models_raise():
    X, y = torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 2, 0])
    ln = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    with pytest.raises(ValueError, match=r"LayerNorm layer '1'.*curvature='diag'"):
        factors(ln, X, y)
    with pytest.raises(ValueError, match=r"'lin' is called more than once"):
        factors(_Twice().double(), X, y)
    shared = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3)).double()
    shared[2].weight = shared[0].weight
    with pytest.raises(ValueError, match="shared"):
        factors(shared, X, y)
    grouped = nn.Sequential(nn.Conv2d(2, 2, 1, groups=2), nn.Flatten()).double()
    with pytest.raises(ValueError, match="groups"):
        factors(grouped, torch.randn(4, 2, 1, 2, dtype=DT), torch.tensor([0, 1, 0, 1]))
    fm = FunctionalModel.of(ln)
    with pytest.raises(ValueError, match="LayerNorm"):
        Curvature("ekfac", fm, fm.theta, X, y, 1.0)
    lin = nn.Linear(3, 3).double()
    with pytest.raises(ValueError, match="fisher_type"):
        factors(lin, X, y, fisher_type="true")
    with pytest.raises(ValueError, match="mc_samples"):
        factors(lin, X, y, fisher_type="sampled", mc_samples=0)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def blobs_mlp(blobs) -> SimpleNamespace:
    """A tiny MLP trained (full batch, L-BFGS) on blobs with a planted mislabelled cluster."""
    b = SimpleNamespace(**vars(blobs))
    torch.manual_seed(0)
    model = MLP(2, 3, hidden=(8,)).double()
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        reg = sum((p * p).sum() for p in model.parameters())
        loss = F.cross_entropy(model(b.X), b.y, reduction="sum") + 0.5 * b.l2_train * reg
        loss.backward()
        return loss

    opt.step(closure)
    model.eval()
    with torch.no_grad():
        assert int(model(b.Xf).argmax(1)) != int(b.yf)  # a real failure
    b.model = model
    return b


def test_identify_linear_ekfac_blames_planted_examples(blobs_mlp):
    b = blobs_mlp
    ident = netmend.identify(
        b.model,
        (b.X, b.y),
        (b.Xf, b.yf),
        "linear",
        k=len(b.planted),
        l2=0.1,
        curvature="ekfac",
        **RUN,
    )
    s = ident.scores
    assert (s[b.planted] > 0).all()
    # the planted examples rank far above the rest (most of them in the top K)
    assert len(set(ident.causes) & set(b.planted)) >= len(b.planted) - 1
    assert np.median(s[b.planted]) > np.quantile(s, 0.9)


@pytest.mark.parametrize("method, kind", [("newton", "kfac"), ("ewc", "kfac"), ("ewc", "ekfac")])
def test_treat_with_kronecker_curvature_forgets_the_causes(blobs_mlp, method, kind):
    b = blobs_mlp
    causes = b.planted
    new = netmend.treat(b.model, (b.X, b.y), causes, method, l2=0.1, curvature=kind, **RUN)
    with torch.no_grad():
        before = F.cross_entropy(b.model(b.X[causes]), b.y[causes])
        after = F.cross_entropy(new(b.X[causes]), b.y[causes])
        fail_before = F.cross_entropy(b.model(b.Xf), b.yf)
        fail_after = F.cross_entropy(new(b.Xf), b.yf)
    assert float(after) > float(before) + 0.05
    assert float(fail_after) < float(fail_before)  # the failure improves
    theta0 = FunctionalModel.of(b.model).theta
    assert not torch.equal(FunctionalModel.of(new).theta, theta0)


def test_ewc_treatment_uses_the_kronecker_penalty(blobs_mlp):
    """One accepted step from theta_hat is grad(gain) / (diag(K) + l2) (the penalty's gradient
    vanishes there), and the objective with the dense Kronecker penalty increases."""
    b = blobs_mlp
    causes = b.planted
    keep = torch.ones(b.X.shape[0], dtype=torch.bool)
    keep[causes] = False
    l2, cap = 0.1, 2 * np.log(3)
    K = factors(b.model, b.X[keep], b.y[keep], "kfac", "empirical").dense()
    fm = FunctionalModel.of(b.model)
    theta0 = fm.theta

    def gain(t):
        ce = F.cross_entropy(fm.logits(t, b.X[causes]), b.y[causes], reduction="none")
        return ce.clamp(max=cap).sum()

    def J(t):
        d = t - theta0
        return gain(t) - 0.5 * d @ K @ d - 0.5 * l2 * d @ d

    kw = dict(l2=l2, curvature="kfac", max_retained_increase=1e9, **RUN)
    new = netmend.treat(b.model, (b.X, b.y), causes, "ewc", steps=1, step_size=1.0, **kw)
    theta1 = FunctionalModel.of(new).theta
    step = torch.func.grad(gain)(theta0) / (torch.diagonal(K) + l2)
    assert float(J(theta1)) > float(J(theta0))
    eta = float((theta1 - theta0) @ step / (step @ step))  # the backtracked step size
    assert eta > 0
    close(theta1 - theta0, eta * step, rtol=1e-8, atol=1e-10)
    more = netmend.treat(b.model, (b.X, b.y), causes, "ewc", steps=20, **kw)
    assert float(J(FunctionalModel.of(more).theta)) > float(J(theta1))
    with pytest.raises(ValueError, match="unknown curvature"):
        netmend.treat(b.model, (b.X, b.y), causes, "ewc", curvature="ggn", **RUN)


# ----------------------------------------------------------------------------- embeddings


class _TokenNet(nn.Module):
    """An embedding (or bag) over token ids, then tanh and a linear head."""

    def __init__(self, bag: str | None = None, padding_idx: int | None = None) -> None:
        super().__init__()
        self.emb = (
            nn.Embedding(7, 3, padding_idx=padding_idx)
            if bag is None
            else nn.EmbeddingBag(7, 3, mode=bag)
        )
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        return self.fc(torch.tanh(h if h.ndim == 2 else h.sum(1)))


def _token_data(n: int, length: int | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if length is None else (n, length)
    X = torch.randint(0, 7, shape, generator=g)
    return X, torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize(
    "bag, length", [(None, None), ("sum", 4), ("mean", 4)], ids=["embedding", "sum", "mean"]
)
def test_single_example_kfac_blocks_are_exact_for_embeddings(bag, length, ref):
    """One token (Embedding on [B] ids) or one bag: g = d a^T with a the one-hot / count
    vector, so KFAC's G (x) A is the exact Fisher block (repeated ids in a bag included)."""
    torch.manual_seed(0)
    model = _TokenNet(bag).double()
    X, y = _token_data(1, length)
    if length is not None:
        X[0, 1] = X[0, 0]  # a repeated id
    f = factors(model, X, y)
    g = ref.loop_grads(model, X, y)[0]
    mask = block_mask(f)
    close(f.dense(), torch.outer(g, g) * mask)
    assert g[: 7 * 3].abs().max() > 1e-3  # the embedding block is really tested


def test_embedding_input_factor_is_the_token_frequencies(ref):
    torch.manual_seed(1)
    model = _TokenNet(padding_idx=0).double()
    X, y = _token_data(9, 5, seed=3)
    f = factors(model, X, y, kind="ekfac")
    counts = torch.bincount(X.reshape(-1), minlength=7).to(DT)
    counts[0] = 0  # the padding row has no gradient
    close(f.layers[0].A, torch.diag(counts) / 9)
    # EK-FAC's eigenvalues: the per-example gradients' second moments in the Kronecker basis
    G = ref.loop_grads(model, X, y)[:, : 7 * 3].reshape(9, 7, 3).transpose(1, 2)  # [N, D, V]
    lf = f.layers[0]
    close(lf.eigenvalues, ((lf.QG.T @ G @ lf.QA) ** 2).sum(0))
    # the layout: the flat weight is [V, D] row-major
    v = torch.randn(f.num_params, dtype=DT)
    M = lf.to_matrix(v[None])
    close(M[0], v[: 7 * 3].reshape(7, 3).T)
    back = torch.zeros(1, f.num_params, dtype=DT)
    lf.from_matrix(M, back)
    close(back[0, : 7 * 3], v[: 7 * 3])
    again = KroneckerFactors.from_tensors(*f.to_tensors())
    assert again.layers[0].transposed
    close(again.dense(), f.dense())


def test_large_vocabulary_refused_by_name():
    model = nn.Sequential(nn.Embedding(5000, 2), nn.Flatten(), nn.Linear(2, 2)).double()
    with pytest.raises(ValueError, match=r"embedding '0' has 5000 rows.*curvature='diag'"):
        factors(model, torch.zeros(2, 1, dtype=torch.long), torch.tensor([0, 1]))
