"""Per-example gradients and the functional helpers, against per-example autograd loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netmend.curvature import fisher_diag_sum
from netmend.curvature import per_example_grads as hook_grads
from netmend.curvature.hooks import layer_slices
from netmend.data.streaming import chunks
from netmend.lab.models import SmallCNN
from netmend.model.functional import FunctionalModel, log_likelihoods, summed_grad

TOL = dict(rtol=1e-10, atol=1e-12)


def _rand(n, g):
    X = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 3, (n,), generator=g)


def _models(request, name):
    return request.getfixturevalue(name)


@pytest.mark.parametrize(
    "model_name, data_name",
    [
        ("logreg4", "data4"),
        ("mlp4", "data4"),
        ("tiny_conv", "conv_data"),
    ],
)
def test_per_example_grads_vmap_and_hooks_match_autograd_loop(request, ref, model_name, data_name):
    model, data = _models(request, model_name), _models(request, data_name)
    fm = FunctionalModel.of(model)
    assert layer_slices(fm) is not None  # the hook path is really taken
    expected = ref.loop_grads(model, data.X, data.y)
    vm = fm.per_example_grads(fm.theta, data.X, data.y)
    hk = hook_grads(fm, fm.theta, data.X, data.y)
    assert vm.shape == expected.shape == hk.shape
    assert expected.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(vm, expected, **TOL)
    torch.testing.assert_close(hk, expected, **TOL)


def test_per_example_grads_small_cnn(ref):
    torch.manual_seed(6)
    model = SmallCNN(num_classes=3, side=16).double().eval()
    g = torch.Generator().manual_seed(7)
    X = torch.randn(4, 256, generator=g, dtype=torch.float64)  # flat inputs, reshaped inside
    y = torch.tensor([0, 1, 2, 1])
    fm = FunctionalModel.of(model)
    expected = ref.loop_grads(model, X, y)
    torch.testing.assert_close(hook_grads(fm, fm.theta, X, y), expected, **TOL)
    torch.testing.assert_close(fm.per_example_grads(fm.theta, X, y), expected, **TOL)


def test_hooks_path_linear_on_sequence_inputs(ref):
    """A Linear applied to [B, S, in] (per-example gradient summed over positions)."""

    class SeqNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(3, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):  # x [B, S, 3]
            return self.out(torch.tanh(self.emb(x)).mean(1))

    torch.manual_seed(8)
    model = SeqNet().double()
    X = torch.randn(5, 6, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1])
    fm = FunctionalModel.of(model)
    torch.testing.assert_close(hook_grads(fm, fm.theta, X, y), ref.loop_grads(model, X, y), **TOL)


def test_hooks_fall_back_to_vmap_for_other_layers(ref):
    """A GroupNorm has parameters the hook path does not handle: vmap must be used, exactly.
    (LayerNorm, BatchNorm and Embedding layers are hooked: tests/test_architectures.py.)"""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 5), nn.GroupNorm(1, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(10)
    X, y = _rand(7, g)
    fm = FunctionalModel.of(model)
    assert layer_slices(fm) is None
    torch.testing.assert_close(hook_grads(fm, fm.theta, X, y), ref.loop_grads(model, X, y), **TOL)


def test_frozen_parameters_are_excluded(ref):
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    for p in model[0].parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(12)
    X, y = _rand(6, g)
    fm = FunctionalModel.of(model)
    assert fm.names == ["2.weight", "2.bias"]
    assert fm.num_params == 5 * 3 + 3
    expected = ref.loop_grads(model, X, y)
    torch.testing.assert_close(fm.per_example_grads(fm.theta, X, y), expected, **TOL)
    torch.testing.assert_close(hook_grads(fm, fm.theta, X, y), expected, **TOL)


def test_frozen_weight_trainable_bias(ref):
    """A Linear with a frozen weight but a trainable bias: the hook path falls back to vmap."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[0].weight.requires_grad_(False)
    g = torch.Generator().manual_seed(14)
    X, y = _rand(6, g)
    fm = FunctionalModel.of(model)
    assert fm.names == ["0.bias", "2.weight", "2.bias"]
    assert layer_slices(fm) is None
    expected = ref.loop_grads(model, X, y)
    torch.testing.assert_close(fm.per_example_grads(fm.theta, X, y), expected, **TOL)
    torch.testing.assert_close(hook_grads(fm, fm.theta, X, y), expected, **TOL)
    for cs in (1, 4):
        got = fisher_diag_sum(fm, fm.theta, X, y, chunk_size=cs)
        torch.testing.assert_close(got, (expected * expected).sum(0), **TOL)


class _Twice(nn.Module):
    """The same Linear applied twice (weight sharing through reuse of a module)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.a(torch.tanh(self.a(x)))))


class _Tied(nn.Module):
    """Two Linear modules sharing one weight Parameter."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("cls", [_Twice, _Tied])
def test_hook_path_handles_weight_sharing(ref, cls):
    """A module called twice, or a Parameter shared by two modules: the vmap path is right, and
    the hook path falls back to it, for per-example gradients and the diagonal Fisher alike."""
    torch.manual_seed(15)
    model = cls().double()
    g = torch.Generator().manual_seed(16)
    X, y = _rand(6, g)
    fm = FunctionalModel.of(model)
    expected = ref.loop_grads(model, X, y)
    torch.testing.assert_close(fm.per_example_grads(fm.theta, X, y), expected, **TOL)
    torch.testing.assert_close(hook_grads(fm, fm.theta, X, y), expected, **TOL)
    for cs in (1, 4, 100):
        got = fisher_diag_sum(fm, fm.theta, X, y, chunk_size=cs)
        torch.testing.assert_close(got, (expected * expected).sum(0), **TOL)
    if cls is _Tied:
        assert layer_slices(fm) is None  # the shared Parameter is detected up front
    with pytest.raises(ValueError, match="hooks"):
        fisher_diag_sum(fm, fm.theta, X, y, method="hooks")


def test_ll_jvp_vjp_and_summed_grad(mlp4, data4, ref):
    fm = FunctionalModel.of(mlp4)
    G = ref.loop_grads(mlp4, data4.X, data4.y)
    v = torch.randn(fm.num_params, dtype=torch.float64)
    u = torch.randn(data4.X.shape[0], dtype=torch.float64)
    ll, gv = fm.ll_jvp(fm.theta, v, data4.X, data4.y)
    expected_ll = -F.cross_entropy(mlp4(data4.X), data4.y, reduction="none").detach()
    torch.testing.assert_close(ll, expected_ll, **TOL)
    torch.testing.assert_close(gv, G @ v, **TOL)
    torch.testing.assert_close(fm.ll_vjp(fm.theta, u, data4.X, data4.y), G.T @ u, **TOL)
    for cs in (1, 7, 1000):
        torch.testing.assert_close(summed_grad(fm, fm.theta, data4.X, data4.y, cs), G.sum(0), **TOL)
        lls = log_likelihoods(fm, fm.theta, data4.X, data4.y, cs)
        torch.testing.assert_close(lls, expected_ll, **TOL)


def test_functional_model_does_not_touch_module(mlp4, data4):
    fm = FunctionalModel.of(mlp4)
    before = [p.detach().clone() for p in mlp4.parameters()]
    shifted = fm.theta + 1.0
    out_shift = fm.logits(shifted, data4.X)
    assert not torch.allclose(out_shift, mlp4(data4.X))
    for p, b in zip(mlp4.parameters(), before, strict=True):
        assert torch.equal(p, b)
    torch.testing.assert_close(fm.logits(fm.theta, data4.X), mlp4(data4.X).detach(), **TOL)
    # unflatten inverts the flattening
    parts = fm.unflatten(fm.theta)
    for name, p in mlp4.named_parameters():
        assert torch.equal(parts[name], p.detach())


def test_chunks_cover_range_once():
    for n, size in [(0, 3), (10, 3), (9, 3), (5, 100)]:
        idx = [i for s in chunks(n, size) for i in range(n)[s]]
        assert idx == list(range(n))
        assert all(s.stop - s.start <= size for s in chunks(n, size))


def test_hooks_path_without_biases(ref):
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = _rand(6, torch.Generator().manual_seed(18))
    fm = FunctionalModel.of(model)
    assert layer_slices(fm) is not None
    torch.testing.assert_close(hook_grads(fm, fm.theta, X, y), ref.loop_grads(model, X, y), **TOL)


@pytest.mark.parametrize(
    "conv",
    [
        dict(padding="same"),
        dict(padding=1, padding_mode="reflect"),
        dict(padding=1, groups=2),
        dict(padding=1, bias=False),
    ],
)
def test_conv_variants(ref, conv):
    """Convolutions the hook path does not handle fall back to vmap; all stay exact."""
    torch.manual_seed(19)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, **conv), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    ).double()
    g = torch.Generator().manual_seed(20)
    X = torch.randn(5, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    fm = FunctionalModel.of(model)
    torch.testing.assert_close(hook_grads(fm, fm.theta, X, y), ref.loop_grads(model, X, y), **TOL)


@pytest.mark.parametrize("side", [12, 15, 1])
def test_small_cnn_small_side_is_rejected(side):
    with pytest.raises(ValueError, match=f"side >= 16.*got {side}"):
        SmallCNN(num_classes=3, side=side)


def test_small_cnn_side_16_works():
    model = SmallCNN(num_classes=3, side=16)
    assert model(torch.randn(2, 256)).shape == (2, 3)
