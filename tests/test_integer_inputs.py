"""Integer inputs (e.g. uint8 images) reach the model as they are.

The reference MLP converts integer pixels itself, so netmend must give exactly the results it
gives on ``X.to(model dtype)`` for every identification method and treatment, without ever
holding a floating copy of the whole set.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import netmend
from netmend.data.checks import as_tensors
from netmend.identification import available as identification_methods
from netmend.lab.models import MLP
from netmend.model.training import TrainConfig, fit, predict
from netmend.treatment import available as treatments

RUN = dict(progress=False, device="cpu", seed=0)
# options that keep the slow estimators small
OPTIONS: dict[str, dict] = {
    "tmc_shapley": {"max_permutations": 8, "n_jobs": 1},
    "banzhaf": {"max_samples": 32},
    "tracin": {},
}


@pytest.fixture(scope="module")
def task():
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, 17, (90, 6), generator=g, dtype=torch.uint8)  # digits-like pixel values
    y = (X[:, :3].sum(1) > X[:, 3:].sum(1)).long() + (X[:, 0] > 12).long()
    flip = torch.arange(0, 90, 9)
    y[flip] = (y[flip] + 1) % 3  # some label noise, so there are failures
    torch.manual_seed(0)
    model = fit(MLP(6, 3, hidden=(8,)), X, y, TrainConfig(epochs=30, lr=1e-2), 0, progress=False)
    Xt = torch.randint(0, 17, (60, 6), generator=g, dtype=torch.uint8)
    yt = (Xt[:, :3].sum(1) > Xt[:, 3:].sum(1)).long() + (Xt[:, 0] > 12).long()
    wrong = predict(model, Xt) != yt
    assert int(wrong.sum()) >= 3
    return model, X, y, Xt[wrong][:6], yt[wrong][:6]


def test_as_tensors_keeps_integer_inputs_without_a_float_copy():
    X = torch.randint(0, 255, (10, 3), dtype=torch.uint8)
    Xo, _ = as_tensors((X, torch.zeros(10, dtype=torch.long)))
    assert Xo.dtype == torch.uint8 and Xo.data_ptr() == X.data_ptr()
    with pytest.raises(ValueError, match="complex"):
        as_tensors((torch.zeros(2, 2, dtype=torch.complex64), torch.zeros(2, dtype=torch.long)))


@pytest.mark.parametrize("method", identification_methods())
def test_identify_integer_inputs_equal_float_inputs(task, method):
    model, X, y, Xf, yf = task
    kw = dict(k=5, chunk_size=16, **OPTIONS.get(method, {}), **RUN)
    if method == "tracin":
        kw.update(checkpoints=[model], lrs=[1.0])
    a = netmend.identify(model, (X, y), (Xf, yf), method, **kw)
    b = netmend.identify(model, (X.float(), y), (Xf.float(), yf), method, **kw)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("treatment", treatments())
def test_treat_integer_inputs_equal_float_inputs(task, treatment):
    model, X, y, Xf, yf = task
    causes = np.arange(0, 90, 9)
    kw: dict = dict(**RUN)
    if treatment == "retrain":
        kw["train_config"] = TrainConfig(epochs=3, lr=1e-2)
    if treatment in ("relabel", "align"):
        kw["failures"] = (Xf, yf)
    a = netmend.treat(model, (X, y), causes, treatment, **kw)
    b = netmend.treat(
        model, (X.float(), y), causes, treatment, **{**kw, **(
            {"failures": (Xf.float(), yf)} if "failures" in kw else {})},
    )  # fmt: skip
    pa, pb = predict(a, X.float()), predict(b, X.float())
    assert torch.equal(pa, pb)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["knn_shapley", "tmc_shapley", "banzhaf"])
def test_shapley_on_raw_integer_inputs(task, method):
    """embed="input": the distances between integer pixels, exactly as between their floats."""
    model, X, y, Xf, yf = task
    kw = dict(k=5, embed="input", **OPTIONS.get(method, {}), **RUN)
    a = netmend.identify(model, (X, y), (Xf, yf), method, **kw)
    b = netmend.identify(model, (X.float(), y), (Xf.float(), yf), method, **kw)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-7)


class BagOfWords(torch.nn.Module):
    """An ``nn.EmbeddingBag`` classifier over int64 token ids (refuses them cast to floats)."""

    def __init__(self, vocab: int = 20, classes: int = 3) -> None:
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(vocab, 4, mode="mean")
        self.out = torch.nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            raise TypeError("token ids were cast to floats")
        return self.out(self.emb(x))


def test_token_ids_reach_an_embedding_model_as_integers():
    """An ``nn.EmbeddingBag`` classifier over int64 token ids: netmend never casts them."""
    g = torch.Generator().manual_seed(3)
    X = torch.randint(0, 20, (60, 5), generator=g)
    y = (X[:, 0] % 3).long()
    torch.manual_seed(0)
    model = fit(BagOfWords().double(), X, y, TrainConfig(epochs=20, lr=5e-2), 0, progress=False)
    Xt = torch.randint(0, 20, (40, 5), generator=g)
    yt = (Xt[:, 0] % 3 + 1).long() % 3  # labels the model gets wrong
    wrong = predict(model, Xt) != yt
    res = netmend.identify(model, (X, y), (Xt[wrong], yt[wrong]), method="grad_dot", k=5, **RUN)
    assert res.scores.shape == (60,) and np.isfinite(res.scores).all()
    assert len(set(res.causes.tolist())) == 5


def test_a_token_id_out_of_vocabulary_is_bad_input_not_an_index_error():
    """An id >= the Embedding's ``num_embeddings`` past the first example used to surface as
    torch's ``IndexError: index out of range in self`` from inside a pass (and in the CLI as
    an internal error, exit 1); it is bad input, said as such, wherever it sits. An
    ``IndexError`` that does not come from an Embedding lookup is not relabelled."""
    from torch import nn

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 30, (120, 6), generator=g)
    y = (ids == 5).any(1).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 4), nn.Flatten(), nn.Linear(24, 2)).eval()
    wrong = predict(model, ids) != y
    Xf, yf = ids[wrong][:6].clone(), y[wrong][:6]
    bad_f = Xf.clone()
    bad_f[3, 2] = 31  # a failure's id past the vocabulary
    bad_train = ids.clone()
    bad_train[100, 1] = 40  # a training row's, far from the first example
    msg = "out of range for an Embedding of the model"
    with pytest.raises(ValueError, match=msg):
        netmend.identify(model, (ids, y), (bad_f, yf), "ewc", k=5, **RUN)
    with pytest.raises(ValueError, match=msg):
        netmend.identify(model, (bad_train, y), (Xf, yf), "grad_dot", k=5, **RUN)
    with pytest.raises(ValueError, match=msg):
        netmend.evaluate(model, (bad_train, y), device="cpu")
    netmend.identify(model, (ids, y), (Xf, yf), "ewc", k=5, **RUN)  # the clean data run
    # a continual round said it as an internal error too (an outside-in trial)
    rep = netmend.Repairer(model, (ids, y), k=5, device="cpu", progress=False)
    rep.observe((Xf[:3], yf[:3]))
    with pytest.raises(ValueError, match=msg):
        rep.observe((bad_f[3:], yf[3:]))

    class Picky(nn.Module):  # an IndexError of the model's own, on the 51st example
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if (x[:, 0] < 0).any():
                raise IndexError("a negative first feature")
            return self.lin(x.float())

    Xp = torch.rand(80, 6, generator=g)
    Xp[50, 0] = -1.0
    with pytest.raises(IndexError, match="a negative first feature"):
        netmend.evaluate(Picky().eval(), (Xp, torch.zeros(80, dtype=torch.long)), device="cpu")


def test_an_embedding_bags_out_of_range_id_is_bad_input():
    """An Embedding's out-of-range id was named; an EmbeddingBag's came out as torch's raw
    RuntimeError."""
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, 10, (40, 5), generator=g)
    y = torch.randint(0, 2, (40,), generator=g)
    X[30, 2] = 12  # past the 10-id vocabulary, not in the first example the probe tries
    with pytest.raises(ValueError, match="an input id is out of range for an Embedding"):
        netmend.identify(BagOfWords(10, 2).eval(), (X, y), None, "loss", k=3, **RUN)
