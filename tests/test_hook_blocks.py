"""The fast hook paths of issue 13 against loops in float64.

Per-example Conv2d weight gradients by a grouped backward-weight convolution and by unfold
(with and without a reused buffer), the diagonal Fisher and the products ``G V`` formed in
sub-batches (:func:`netmend.curvature.per_example_grad_products`), and ``grad_rows`` with
:class:`netmend.identification.base.NegDot`, which never forms ``G``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netmend
from netmend.curvature import fisher_diag_sum, hooks, per_example_grad_products, per_example_grads
from netmend.curvature.hooks import batch_blocks, conv_weight_grads
from netmend.model.functional import FunctionalModel

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-12)

CONVS = [
    dict(cin=2, cout=3, k=3, stride=1, padding=1, dilation=1, H=9, W=7),
    dict(cin=3, cout=2, k=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), H=8, W=9),
    dict(cin=2, cout=4, k=1, stride=2, padding=0, dilation=1, H=7, W=6),
    dict(cin=1, cout=2, k=(2, 3), stride=1, padding=(3, 2), dilation=2, H=5, W=6),
]


def _conv(cfg: dict, dtype: torch.dtype = DT) -> nn.Conv2d:
    torch.manual_seed(0)
    c = nn.Conv2d(cfg["cin"], cfg["cout"], cfg["k"], cfg["stride"], cfg["padding"], cfg["dilation"])
    return c.to(dtype)


def _loop_weight_grads(m: nn.Conv2d, x: torch.Tensor, d4: torch.Tensor) -> torch.Tensor:
    """grad of sum(conv(x_b) * d_b) w.r.t. the weight, one autograd call per example."""
    rows = []
    for b in range(x.shape[0]):
        (g,) = torch.autograd.grad((m(x[b : b + 1]) * d4[b : b + 1]).sum(), m.weight)
        rows.append(g.reshape(g.shape[0], -1))
    return torch.stack(rows)


@pytest.mark.parametrize("cfg", CONVS)
@pytest.mark.parametrize("method", ["grouped", "unfold", "auto"])
def test_conv_weight_grads_equal_a_loop(cfg, method):
    m = _conv(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, cfg["cin"], cfg["H"], cfg["W"], generator=g, dtype=DT)
    with torch.no_grad():
        d4 = torch.randn(m(x).shape, generator=g, dtype=DT)
    expected = _loop_weight_grads(m, x, d4)
    got = conv_weight_grads(m, x, d4.reshape(5, d4.shape[1], -1), method)
    torch.testing.assert_close(got, expected, **TOL)
    if method == "unfold":  # into a caller's buffer: the same numbers, in that buffer
        buf = torch.full_like(expected, float("nan"))
        out = conv_weight_grads(m, x, d4.reshape(5, d4.shape[1], -1), method, out=buf)
        assert out.data_ptr() == buf.data_ptr()
        torch.testing.assert_close(buf, expected, **TOL)


def test_conv_weight_grads_float32_grouped_path_matches_float64():
    """Float32 with many positions takes the grouped oneDNN kernel under "auto"."""
    cfg = dict(cin=3, cout=4, k=3, stride=1, padding=1, dilation=1, H=8, W=8)  # 64 positions
    m64 = _conv(cfg)
    m32 = _conv(cfg, torch.float32)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 8, 8, generator=g, dtype=DT)
    d4 = torch.randn(6, 4, 8, 8, generator=g, dtype=DT)
    expected = _loop_weight_grads(m64, x, d4)
    got = conv_weight_grads(m32, x.float(), d4.float().reshape(6, 4, -1))
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_conv_weight_grads_refuses_an_unknown_method():
    m = _conv(CONVS[0])
    x = torch.zeros(1, 2, 9, 7, dtype=DT)
    with pytest.raises(ValueError, match="'grouped' or 'unfold'"):
        conv_weight_grads(m, x, torch.zeros(1, 3, 63, dtype=DT), "im2col")


def test_batch_blocks_cover_the_batch_within_the_budget():
    assert batch_blocks(7, 54, 120) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 7)]
    assert batch_blocks(5, 1000, 10) == [slice(i, i + 1) for i in range(5)]  # one at least
    assert batch_blocks(5, 3) == [slice(0, 5)]


class ConvBN(nn.Module):
    """Conv2d + BatchNorm2d (eval, moved running statistics) + a 1x1 conv + Linear on
    positions [B, S, F] + LayerNorm + a head: every blocked layer kind of the hook path."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 4, 1, stride=2)
        self.pos = nn.Linear(4, 5)
        self.ln = nn.LayerNorm(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(torch.relu(self.bn(self.c1(x))))  # [B, 4, 3, 3]
        h = self.ln(torch.tanh(self.pos(h.flatten(2).transpose(1, 2))))  # [B, 9, 5]
        return self.fc(h.mean(1))


class Tokens(nn.Module):
    """Embedding with padding_idx and repeated ids, an EmbeddingBag ("mean"), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3, padding_idx=0)
        self.bag = nn.EmbeddingBag(6, 3, mode="mean")
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.emb(x).mean(1) + self.bag(x)))


def _model_and_data(kind: str):
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(4)
    if kind == "conv_bn":
        model = ConvBN().double().eval()
        with torch.no_grad():
            model.bn.running_mean.uniform_(-1, 1, generator=g)
            model.bn.running_var.uniform_(0.5, 2, generator=g)
            model.bn.weight.uniform_(0.5, 1.5, generator=g)
            model.bn.bias.uniform_(-0.5, 0.5, generator=g)
        X = torch.randn(7, 2, 5, 5, generator=g, dtype=DT)
    else:
        model = Tokens().double().eval()
        X = torch.randint(0, 6, (7, 5), generator=g)
    return model, X, torch.randint(0, 3, (7,), generator=g)


@pytest.mark.parametrize("kind", ["conv_bn", "tokens"])
@pytest.mark.parametrize("budget", [None, 120, 1])  # one block; partial blocks; one each
def test_blocked_fisher_and_products_equal_a_loop(ref, monkeypatch, kind, budget):
    if budget is not None:
        monkeypatch.setattr(hooks, "BLOCK_ELEMENTS", budget)
    model, X, y = _model_and_data(kind)
    fm = FunctionalModel.of(model)
    assert hooks.layer_slices(fm) is not None  # the hook path, not the vmap fallback
    G = ref.loop_grads(model, X, y)  # [N, P]
    g = torch.Generator().manual_seed(5)
    V = torch.randn(G.shape[1], 4, generator=g, dtype=DT)
    torch.testing.assert_close(per_example_grads(fm, fm.theta, X, y), G, **TOL)
    torch.testing.assert_close(per_example_grad_products(fm, fm.theta, X, y, V), G @ V, **TOL)
    v = V[:, 0].clone()
    torch.testing.assert_close(per_example_grad_products(fm, fm.theta, X, y, v), G @ v, **TOL)
    fisher = fisher_diag_sum(fm, fm.theta, X, y, chunk_size=3, method="hooks")
    torch.testing.assert_close(fisher, (G * G).sum(0), **TOL)


def test_products_refuse_a_wrong_shape_and_serve_the_vmap_fallback(ref):
    model = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(1, 4), nn.Linear(4, 2)).double()
    fm = FunctionalModel.of(model)
    g = torch.Generator().manual_seed(6)
    X, y = torch.randn(5, 3, generator=g, dtype=DT), torch.tensor([0, 1, 0, 1, 1])
    assert hooks.layer_slices(fm) is None
    V = torch.randn(fm.num_params, 2, generator=g, dtype=DT)
    G = ref.loop_grads(model, X, y)
    torch.testing.assert_close(per_example_grad_products(fm, fm.theta, X, y, V), G @ V, **TOL)
    with pytest.raises(ValueError, match=r"\[P\] or \[P, M\]"):
        per_example_grad_products(fm, fm.theta, X, y, V[:-1])


def test_grad_dot_through_products_equals_a_loop(ref):
    """grad_dot's scores and per-failure scores (NegDot in grad_rows) against the loop."""
    model, X, y = _model_and_data("conv_bn")
    g = torch.Generator().manual_seed(7)
    Xq = torch.randn(4, 2, 5, 5, generator=g, dtype=DT)
    with torch.no_grad():
        yq = (model(Xq).argmax(1) + 1) % 3  # failures: labels the model gets wrong
    G, Gf = ref.loop_grads(model, X, y), ref.loop_grads(model, Xq, yq)
    out = netmend.identify(
        model, (X, y), (Xq, yq), "grad_dot", k=2, progress=False, device="cpu", chunk_size=3
    )
    torch.testing.assert_close(torch.from_numpy(out.scores), -(G @ Gf.sum(0)), **TOL)
    per = torch.from_numpy(out.per_failure).double()  # stored as float32 or float64
    torch.testing.assert_close(per, -(G @ Gf.T), rtol=1e-6, atol=1e-9)
