"""Every architecture family x every identification method and treatment (issue 13).

Tiny float64 models of each family: a CNN with BatchNorm2d in eval mode (a residual block), a
LayerNorm transformer encoder over token ids, nn.Embedding and nn.EmbeddingBag bags of words,
GRU and LSTM classifiers, a model with a frozen layer and a weight-tied model. Each method
either works (finite scores or a new model, the user's model unmodified) or refuses with an
error that names the layer and the alternative; :data:`REFUSALS` is the list of the refusals
(docs/architectures.md is written from it). Oracles: the unrolled GRU/LSTM and the plain
EmbeddingBag compute the same function as torch's kernels, and per-example gradients through
them equal a loop of single-example backward passes.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import netmend
from netmend.curvature.fisher import fisher_diag_sum, per_example_grads
from netmend.identification import available as identification_methods
from netmend.model.functional import FunctionalModel
from netmend.model.training import TrainConfig, fit, predict
from netmend.model.twin import functional_twin, no_fastpath
from netmend.treatment import available as treatments

V, C = 20, 3
RUN = dict(progress=False, device="cpu", seed=0)
OPTIONS: dict[str, dict] = {
    "tmc_shapley": {"max_permutations": 4, "n_jobs": 1},
    "banzhaf": {"max_samples": 16},
}
RECIPE = TrainConfig(epochs=5, lr=1e-2, batch_size=16)


class ResBlockCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(h + self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(8, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.enc(self.emb(x)).mean(1))


class BagEmb(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 4)
        self.fc = nn.Linear(4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(x).mean(1))


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(V, 4, mode="mean")
        self.fc = nn.Linear(4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(x))


class RNN(nn.Module):
    def __init__(self, cell: type[nn.RNNBase], **kw: object) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 4)
        self.rnn = cell(4, 5, batch_first=True, **kw)
        self.fc = nn.Linear(5 * (2 if kw.get("bidirectional") else 1), C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(x))
        return self.fc(out[:, -1])


class Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 8)
        self.l2 = nn.Linear(8, C)
        for p in self.l1.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 6)
        self.l2 = nn.Linear(6, 6)
        self.l2.weight = self.l1.weight
        self.fc = nn.Linear(6, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


class Unused(nn.Module):
    """An auxiliary head the forward never calls (its gradients are zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 8)
        self.aux = nn.Linear(8, 3)
        self.l2 = nn.Linear(8, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


FAMILIES = {
    "cnn_bn": (ResBlockCNN, "image"),
    "transformer": (Transformer, "tokens"),
    "embedding": (BagEmb, "tokens"),
    "embedding_bag": (Bag, "tokens"),
    "gru": (lambda: RNN(nn.GRU), "tokens"),
    "lstm": (lambda: RNN(nn.LSTM), "tokens"),
    "frozen": (Frozen, "dense"),
    "tied": (Tied, "dense"),
    "unused": (Unused, "dense"),
}

_KFAC = r"KFAC/EK-FAC cover only nn.Linear, nn.Conv2d, nn.Embedding.*curvature='diag'"
REFUSALS: dict[tuple[str, str], tuple[type[Exception], str]] = {
    ("cnn_bn", "ekfac"): (ValueError, r"BatchNorm2d layer 'bn1'.*" + _KFAC),
    ("transformer", "ekfac"): (ValueError, r"MultiheadAttention layer 'enc.self_attn'.*" + _KFAC),
    ("gru", "ekfac"): (ValueError, r"GRU layer 'rnn'.*" + _KFAC),
    ("lstm", "ekfac"): (ValueError, r"LSTM layer 'rnn'.*" + _KFAC),
    ("tied", "ekfac"): (ValueError, r"'l1.weight'.*'l2.weight'.*weight tying.*curvature='diag'"),
    ("unused", "ekfac"): (ValueError, r"layer 'aux' is not used.*requires_grad_\(False\)"),
    ("transformer", "align"): (TypeError, r"discrete inputs.*'relabel'"),
    ("embedding", "align"): (TypeError, r"discrete inputs.*'relabel'"),
    ("embedding_bag", "align"): (TypeError, r"discrete inputs.*'relabel'"),
    ("gru", "align"): (TypeError, r"discrete inputs.*'relabel'"),
    ("lstm", "align"): (TypeError, r"discrete inputs.*'relabel'"),
}
"""(family, method) -> the error it raises, and what its message must say. Everything else
works."""


def make_data(kind: str, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "image":
        X = torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
        y = (X[:, 0, :3].sum((1, 2)) > 0).long() + (X[:, 0, 0, 0] > 1).long()
    elif kind == "tokens":
        X = torch.randint(0, V, (n, 5), generator=g)
        y = (X[:, 0] % 3).long()
    else:
        X = torch.randn(n, 6, generator=g, dtype=torch.float64)
        y = (X[:, 0] > 0).long() + (X[:, 1] > 1).long()
    return X, y


@pytest.fixture(scope="module")
def tasks() -> dict:
    out = {}
    for fam, (ctor, kind) in FAMILIES.items():
        g = torch.Generator().manual_seed(0)
        X, y = make_data(kind, 48, g)
        torch.manual_seed(0)
        model = fit(ctor().double(), X, y, RECIPE, 0, progress=False).eval()
        Xt, yt = make_data(kind, 80, g)
        wrong = predict(model, Xt) != yt
        assert int(wrong.sum()) >= 4, fam
        out[fam] = (model, X, y, Xt[wrong][:4], yt[wrong][:4])
    return out


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", identification_methods())
def test_identify_every_family(tasks, family, method):
    model, X, y, Xf, yf = tasks[family]
    before = _state(model)
    kw = dict(k=4, chunk_size=16, **OPTIONS.get(method, {}), **RUN)
    if method == "tracin":
        kw.update(checkpoints=[model], lrs=[1.0])
    refusal = REFUSALS.get((family, method))
    if refusal is not None:
        with pytest.raises(refusal[0], match=refusal[1]):
            netmend.identify(model, (X, y), (Xf, yf), method, **kw)
    else:
        res = netmend.identify(model, (X, y), (Xf, yf), method, **kw)
        assert res.scores.shape == (X.shape[0],) and np.isfinite(res.scores).all()
        if method not in ("random",):
            assert np.ptp(res.scores) > 0  # not a constant vector
    assert _unchanged(model, before)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", treatments())
def test_treat_every_family(tasks, family, method):
    model, X, y, Xf, yf = tasks[family]
    before = _state(model)
    kw: dict = dict(train_config=RECIPE, **RUN)
    if method in ("relabel", "align"):
        kw["failures"] = (Xf, yf)
    causes = np.arange(0, 48, 8)
    refusal = REFUSALS.get((family, method))
    if refusal is not None:
        with pytest.raises(refusal[0], match=refusal[1]):
            netmend.treat(model, (X, y), causes, method, **kw)
    else:
        new = netmend.treat(model, (X, y), causes, method, **kw)
        assert new is not model and not new.training
        assert type(new) is type(model)  # the user's layers, not netmend's functional twin
        for p in new.parameters():
            assert torch.isfinite(p).all()
        assert not _unchanged(new, before)
    assert _unchanged(model, before)


# ---- oracles: the functional twin computes torch's function, and its gradients --------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.GRU(3, 4, batch_first=True),
        lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True),
        lambda: nn.LSTM(3, 4, batch_first=True, proj_size=2),
        lambda: nn.RNN(3, 4, nonlinearity="relu", bias=False, batch_first=True),
        lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True),
    ],
)
def test_unrolled_rnn_equals_torch(make):
    torch.manual_seed(0)
    rnn = make().double().eval()
    twin = functional_twin(rnn)
    assert twin is not rnn
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    h0 = torch.randn(rnn.num_layers * (2 if rnn.bidirectional else 1), 2, rnn.proj_size or 4)
    for args in [(x,), (x[0],)]:
        a, b = rnn(*args), twin(*args)
        torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a[1], b[1], rtol=1e-10, atol=1e-12)
    if isinstance(rnn, nn.GRU):
        a, b = rnn(x, h0.double()), twin(x, h0.double())
        torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=1e-12)


def test_plain_embedding_bag_equals_torch():
    torch.manual_seed(0)
    for mode in ("sum", "mean", "max"):
        bag = nn.EmbeddingBag(V, 4, mode=mode).double()
        x = torch.randint(0, V, (6, 5))
        torch.testing.assert_close(functional_twin(bag)(x), bag(x), rtol=1e-10, atol=1e-12)
    bag = nn.EmbeddingBag(V, 4, mode="sum").double()
    w = torch.rand(6, 5, dtype=torch.float64)
    torch.testing.assert_close(
        functional_twin(bag)(x, per_sample_weights=w), bag(x, per_sample_weights=w)
    )


def _loop_grads(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = []
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(X.shape[0]):
        ll = -nn.functional.cross_entropy(model(X[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(ll, params, allow_unused=True, materialize_grads=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "family",
    ["gru", "lstm", "embedding", "embedding_bag", "transformer", "cnn_bn", "tied", "unused"],
)
def test_per_example_grads_and_fisher_equal_a_loop(tasks, family):
    model, X, y, _, _ = tasks[family]
    fm = FunctionalModel.of(model)
    G = per_example_grads(fm, fm.theta, X[:12], y[:12])
    expected = _loop_grads(model, X[:12], y[:12])
    torch.testing.assert_close(G, expected, rtol=1e-8, atol=1e-10)
    diag = fisher_diag_sum(fm, fm.theta, X[:12], y[:12], chunk_size=5)
    torch.testing.assert_close(diag, (expected**2).sum(0), rtol=1e-8, atol=1e-10)


def test_no_fastpath_restores_the_global_setting():
    mha = torch.backends.mha
    before = mha.get_fastpath_enabled()
    try:
        for value in (True, False):
            mha.set_fastpath_enabled(value)
            with no_fastpath():
                assert not mha.get_fastpath_enabled()
            assert mha.get_fastpath_enabled() is value
    finally:
        mha.set_fastpath_enabled(before)


def test_linear_on_transformer_equals_the_regular_path(tasks):
    """Forward-mode through the encoder layer (fast path off) is exact: ``g.v`` vs a loop."""
    model, X, y, _, _ = tasks["transformer"]
    fm = FunctionalModel.of(model)
    v = torch.randn(fm.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, gv = fm.ll_jvp(fm.theta, v, X[:8], y[:8])
    torch.testing.assert_close(gv, _loop_grads(model, X[:8], y[:8]) @ v, rtol=1e-8, atol=1e-10)


# ---- references that are what they claim ----------------------------------------------------


def test_retrain_refuses_without_the_training_recipe(tasks):
    model, X, y, _, _ = tasks["frozen"]
    with pytest.raises(ValueError, match="train_config=TrainConfig"):
        netmend.treat(model, (X, y), [0, 1], "retrain", **RUN)


def test_retrain_keeps_frozen_layers_and_retrains_the_rest(tasks):
    model, X, y, _, _ = tasks["frozen"]
    new = netmend.treat(model, (X, y), [0, 1], "retrain", train_config=RECIPE, **RUN)
    torch.testing.assert_close(new.l1.weight, model.l1.weight, rtol=0.0, atol=0.0)
    assert not new.l1.weight.requires_grad
    # the trainable layer was re-initialised: a different seed gives a different model
    other = netmend.treat(model, (X, y), [0, 1], "retrain", train_config=RECIPE, seed=1,
                          progress=False, device="cpu")  # fmt: skip
    assert not torch.allclose(new.l2.weight, other.l2.weight)


def test_retrain_resets_multihead_attention(tasks):
    model, X, y, _, _ = tasks["transformer"]
    new = netmend.treat(model, (X, y), [0, 1], "retrain", train_config=RECIPE, **RUN)
    w_new, w_old = new.enc.self_attn.in_proj_weight, model.enc.self_attn.in_proj_weight
    assert not torch.allclose(w_new, w_old)


def test_align_refuses_token_ids_but_aligns_uint8_pixels(tasks):
    model, X, y, Xf, yf = tasks["embedding"]
    with pytest.raises(TypeError, match="discrete inputs"):
        netmend.treat(model, (X, y), [0], "align", failures=(Xf, yf), **RUN)
    from netmend.treatment.align import check_continuous

    check_continuous(torch.zeros(2, 3, dtype=torch.uint8))
    check_continuous(torch.zeros(2, 3))
    for dtype in (torch.int64, torch.int32, torch.bool):
        with pytest.raises(TypeError):
            check_continuous(torch.zeros(2, 3, dtype=dtype))


# ---- low precision: computed in float32, and said so ---------------------------------------


@pytest.fixture(scope="module")
def bf16_task(tasks):
    model, X, y, _, _ = tasks["frozen"]
    m16 = copy.deepcopy(model).bfloat16()
    g = torch.Generator().manual_seed(5)
    Xt, yt = make_data("dense", 200, g)
    wrong = predict(m16, Xt.bfloat16()) != yt
    return m16, X.bfloat16(), y, Xt[wrong][:4].bfloat16(), yt[wrong][:4]


@pytest.mark.parametrize("method", ["ewc", "grad_dot", "influence", "trak"])
def test_bfloat16_model_is_scored_in_float32_with_a_warning(bf16_task, method):
    m16, X, y, Xf, yf = bf16_task
    with pytest.warns(UserWarning, match="bfloat16.*float32"):
        res = netmend.identify(m16, (X, y), (Xf, yf), method, k=4, **RUN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = netmend.identify(
            copy.deepcopy(m16).float(), (X.float(), y), (Xf.float(), yf), method, k=4, **RUN
        )
    assert np.ptp(res.scores) > 0  # ewc in bfloat16 gave all-zero scores
    np.testing.assert_allclose(res.scores, ref.scores, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["relabel", "ewc"])
def test_bfloat16_treatment_returns_a_bfloat16_model(bf16_task, method):
    m16, X, y, Xf, yf = bf16_task
    with pytest.warns(UserWarning, match="float32"):
        new = netmend.treat(m16, (X, y), [0, 1, 2], method, failures=(Xf, yf), **RUN)
    assert all(p.dtype == torch.bfloat16 for p in new.parameters())


# ---- the layer-hook path: BatchNorm, LayerNorm, Embedding rows, in closed form ---------------


class NormsAndBags(nn.Module):
    """Every hook layer kind at once: Embedding with padding_idx and repeated ids, an
    EmbeddingBag (sum), LayerNorm over positions, BatchNorm1d on [B, C] and on [B, C, L]."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 4, padding_idx=0)
        self.bag = nn.EmbeddingBag(V, 4, mode="sum")
        self.ln = nn.LayerNorm(4)
        self.bn_seq = nn.BatchNorm1d(4)
        self.lin = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.emb(x))  # [B, L, 4]
        h = self.bn_seq(h.transpose(1, 2)).transpose(1, 2)  # BatchNorm1d over [B, C, L]
        h = torch.tanh(self.lin(h.mean(1) + self.bag(x)))
        return self.fc(torch.relu(self.bn(h)))


@pytest.fixture(scope="module")
def norms_task():
    g = torch.Generator().manual_seed(2)
    X = torch.randint(0, 6, (24, 7), generator=g)  # 6 ids in 7 positions: repeats, and pads
    y = (X[:, 0] % 3).long()
    torch.manual_seed(0)
    model = fit(NormsAndBags().double(), X, y, RECIPE, 0, progress=False).eval()
    with torch.no_grad():  # running statistics and affine parameters away from 0/1
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)):
                m.weight.add_(torch.rand(m.weight.shape, generator=g, dtype=torch.float64))
                m.bias.add_(torch.rand(m.bias.shape, generator=g, dtype=torch.float64))
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.add_(torch.rand(m.running_mean.shape, generator=g).double())
                m.running_var.mul_(1 + torch.rand(m.running_var.shape, generator=g).double())
    return model, X, y


def test_hook_path_serves_norm_and_embedding_layers(norms_task, tasks):
    from netmend.curvature.hooks import layer_slices

    model, X, y = norms_task
    assert layer_slices(FunctionalModel.of(model)) is not None
    for fam in ("cnn_bn", "embedding", "embedding_bag"):
        assert layer_slices(FunctionalModel.of(tasks[fam][0])) is not None, fam
    train_mode = copy.deepcopy(model).train()  # batch statistics couple the examples: vmap
    assert layer_slices(FunctionalModel.of(train_mode)) is None


def test_hook_grads_of_norms_and_embeddings_equal_a_loop(norms_task):
    model, X, y = norms_task
    fm = FunctionalModel.of(model)
    expected = _loop_grads(model, X, y)
    assert expected[:, : V * 4].reshape(-1, V, 4)[:, 0].abs().max() == 0  # the padding row
    torch.testing.assert_close(
        per_example_grads(fm, fm.theta, X, y), expected, rtol=1e-8, atol=1e-10
    )
    hooks = fisher_diag_sum(fm, fm.theta, X, y, chunk_size=7, method="hooks")
    torch.testing.assert_close(hooks, (expected**2).sum(0), rtol=1e-8, atol=1e-10)
    vmapped = fisher_diag_sum(fm, fm.theta, X, y, chunk_size=7, method="vmap")
    torch.testing.assert_close(hooks, vmapped, rtol=1e-8, atol=1e-10)


def test_docs_list_exactly_the_refusals():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "architectures.md").read_text()
    rows = {
        tuple(cell.strip() for cell in line.split("|")[1:3])
        for line in doc.splitlines()
        if line.startswith("| ") and line.split("|")[1].strip() in FAMILIES
    }
    rows = {r for r in rows if r[1] in (*identification_methods(), *treatments())}
    assert rows == set(REFUSALS)
