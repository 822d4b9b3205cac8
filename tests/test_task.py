"""The task adapter: model outputs that are tuples, dicts or objects with ``.logits``, and
batches that are dicts of keyword inputs (``input_ids``/``attention_mask``) with ``labels``.

Oracles: the same weights behind a plain tensor-returning model (scores must agree), and
per-example losses/gradients computed one example at a time with ``model(**item)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import netmend
from netmend.curvature import per_example_grads
from netmend.data.task import ClassificationTask, Task
from netmend.model.checks import num_classes_of
from netmend.model.functional import FunctionalModel

DT = torch.float64
RUN = dict(progress=False, device="cpu")


@dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor


class Wrapped(nn.Module):
    """The same linear model as ``inner``, returning its logits in another container."""

    def __init__(self, inner: nn.Module, kind: str) -> None:
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, x: torch.Tensor):  # noqa: ANN201 - the output type is the point
        z = self.inner(x)
        if self.kind == "tuple":
            return z, x
        if self.kind == "dict":
            return {"logits": z, "features": x}
        if self.kind == "object":
            return Output(z, x)
        if self.kind == "no-logits":
            return {"scores": z}
        if self.kind == "3d":
            return z.unsqueeze(1)
        raise AssertionError(self.kind)


@pytest.fixture
def failset(blobs, blobs_logreg, failures_for):
    extra = torch.tensor([[2.5, 0.3], [0.2, 3.1], [-2.0, 1.0]], dtype=DT)
    Xf = torch.cat([blobs.Xf, extra])
    return Xf, torch.cat([blobs.yf, failures_for(blobs_logreg, extra, blobs.classes)])


@pytest.mark.parametrize("kind", ["tuple", "dict", "object"])
def test_outputs_in_containers_score_as_the_plain_model(kind, blobs, blobs_logreg, failset):
    train = (blobs.X, blobs.y)
    plain = netmend.repair(blobs_logreg, train, failset, **RUN)
    wrapped = Wrapped(blobs_logreg, kind)
    got = netmend.repair(wrapped, train, failset, **RUN)
    np.testing.assert_allclose(got.scores, plain.scores, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(got.causes, plain.causes)
    for p, q in zip(got.model.inner.parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    acc = netmend.evaluate(got.model, (blobs.X, blobs.y), device="cpu")
    assert acc == netmend.evaluate(plain.model, (blobs.X, blobs.y), device="cpu")
    for method in ("grad_dot", "trak", "knn_shapley"):  # vmap, margins and embedding paths
        a = netmend.identify(wrapped, train, failset, method, k=5, **RUN)
        b = netmend.identify(blobs_logreg, train, failset, method, k=5, **RUN)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-10, atol=1e-12)


def test_unreadable_outputs_are_refused_clearly(blobs, blobs_logreg, failset):
    train = (blobs.X, blobs.y)
    with pytest.raises(TypeError, match="without 'logits'"):
        netmend.identify(Wrapped(blobs_logreg, "no-logits"), train, failset, **RUN)
    with pytest.raises(ValueError, match=r"logits of shape \[batch, classes\]"):
        netmend.identify(Wrapped(blobs_logreg, "3d"), train, failset, **RUN)

    class Strange(nn.Module):
        def forward(self, x: torch.Tensor) -> str:
            return "no tensor"

    with pytest.raises(TypeError, match="cannot read logits"):
        num_classes_of(Strange(), blobs.X, torch.device("cpu"))
    with pytest.raises(TypeError, match="task must be a netmend.data.task.Task"):
        netmend.identify(blobs_logreg, train, failset, task="classification", **RUN)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- dict batches


class TinyText(nn.Module):
    """Masked mean of token embeddings, then a linear head; called as ``model(**batch)``."""

    def __init__(self, vocab: int = 12, dim: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        assert input_ids.dtype == torch.long  # token ids reach the model as integers
        m = attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
        h = (self.emb(input_ids) * m).sum(1) / m.sum(1).clamp_min(1)
        return {"logits": self.head(torch.tanh(h))}


class TextSet(Dataset):
    """Items ``{"input_ids": [L], "attention_mask": [L], "labels": ()}`` (HF-style)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


@pytest.fixture
def text():
    g = torch.Generator().manual_seed(7)
    n, L = 40, 6
    ids = torch.randint(1, 12, (n, L), generator=g)
    lengths = torch.randint(2, L + 1, (n,), generator=g)
    mask = (torch.arange(L) < lengths[:, None]).long()
    ids = ids * mask  # padding id 0
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(8)
    model = TinyText().double().eval()
    with torch.no_grad():
        pred = model(ids[:6], mask[:6])["logits"].argmax(1)
    fail = {"input_ids": ids[:6], "attention_mask": mask[:6], "labels": (pred + 1) % 3}
    return model, TextSet(ids, mask, y), fail, (ids, mask, y)


def test_dict_batches_per_example_quantities_match_a_loop(text):
    model, data, fail, (ids, mask, y) = text
    # self-loss scores are -log p(y|x) - log 2: compare with one model(**item) call per example
    r = netmend.identify(model, data, TextSet(*fail.values()), "loss", k=5, **RUN)
    with torch.no_grad():
        loop = [
            float(F.cross_entropy(model(ids[i : i + 1], mask[i : i + 1])["logits"], y[i : i + 1]))
            for i in range(len(y))
        ]
    np.testing.assert_allclose(r.scores, np.array(loop) - np.log(2.0), rtol=1e-10, atol=1e-12)
    # per-example gradients of dict inputs (vmap over every tensor of the dict) vs autograd
    fm = FunctionalModel.of(model)
    G = per_example_grads(fm, fm.theta, {"input_ids": ids, "attention_mask": mask}, y)
    params = list(model.parameters())
    for i in (0, 7, 39):
        ll = -F.cross_entropy(model(ids[i : i + 1], mask[i : i + 1])["logits"], y[i : i + 1])
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(ll, params)])
        torch.testing.assert_close(G[i], g, rtol=1e-10, atol=1e-12)


def test_dict_batches_repair_end_to_end(text):
    """A Dataset of dict items and the in-memory dict pair give the same default repair."""
    model, data, fail, (ids, mask, y) = text
    fset = TextSet(*fail.values())
    a = netmend.repair(model, data, fset, k=5, **RUN)
    pair = ({"input_ids": ids, "attention_mask": mask}, y)
    fpair = ({"input_ids": fail["input_ids"], "attention_mask": fail["attention_mask"]},
             fail["labels"])  # fmt: skip
    b = netmend.repair(model, pair, fpair, k=5, **RUN)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(a.causes, b.causes)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert not torch.equal(a.model.head.weight, model.head.weight)  # it did fine-tune
    acc = netmend.evaluate(a.model, data, device="cpu")
    with torch.no_grad():
        pred = a.model(ids, mask)["logits"].argmax(1)
    assert acc["test_acc"] == pytest.approx(float((pred == y).double().mean()))


def test_failures_must_have_the_training_sets_keys_but_not_its_sequence_length(text):
    """Failures missing a dict key are refused before the model sees them (the user once got
    the model's own ``forward() missing ... 'attention_mask'``); token-id failures of another
    length are scored, as the model takes them (they were refused as a wrong shape)."""
    model, data, fail, (ids, mask, y) = text

    class IdsOnly(Dataset):
        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": fail["input_ids"][i], "labels": fail["labels"][i]}

    with pytest.raises(ValueError, match=r"failures have inputs.*'input_ids'.*but train has"):
        netmend.identify(model, data, IdsOnly(), k=5, **RUN)
    pair = ({"input_ids": ids, "attention_mask": mask}, y)
    pad = torch.zeros(6, 3, dtype=torch.long)  # three more padding positions
    longer = (
        {
            "input_ids": torch.cat([fail["input_ids"], pad], 1),
            "attention_mask": torch.cat([fail["attention_mask"], pad], 1),
        },
        fail["labels"],
    )
    same = ({"input_ids": fail["input_ids"], "attention_mask": fail["attention_mask"]},
            fail["labels"])  # fmt: skip
    a = netmend.identify(model, pair, longer, k=5, **RUN)
    b = netmend.identify(model, pair, same, k=5, **RUN)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-10, atol=1e-12)
    real = ({"input_ids": fail["input_ids"].double(), "attention_mask": fail["attention_mask"]},
            fail["labels"])  # fmt: skip
    with pytest.raises(ValueError, match=r"integer ids where it has them"):
        netmend.identify(model, pair, real, k=5, **RUN)


def test_a_task_subclass_reads_other_batches(blobs, blobs_logreg, failset):
    """Batches ``(y, x)`` (labels first) read by a Task subclass score as ``(x, y)``."""

    class LabelsFirst(ClassificationTask):
        def inputs_and_labels(self, batch):  # noqa: ANN001, ANN201
            return batch[1], torch.as_tensor(batch[0])

    class Swapped(Dataset):
        def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
            self.X, self.y = X, y

        def __len__(self) -> int:
            return len(self.y)

        def __getitem__(self, i: int):  # noqa: ANN204
            return self.y[i], self.X[i]

    train, fail = Swapped(blobs.X, blobs.y), Swapped(*failset)
    a = netmend.identify(blobs_logreg, train, fail, k=5, task=LabelsFirst(), **RUN)
    b = netmend.identify(blobs_logreg, (blobs.X, blobs.y), failset, k=5, **RUN)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-10, atol=1e-12)
    assert isinstance(LabelsFirst(), Task)
    with pytest.raises(TypeError, match="labels"):
        ClassificationTask().inputs_and_labels({"input_ids": torch.zeros(2, 3)})


def test_a_task_subclass_reads_a_tensor_dataset_too(blobs, blobs_logreg, failset):
    """A ``TensorDataset(labels, inputs)`` goes through the task like any Dataset: the (x, y)
    shortcut for two-tensor TensorDatasets once bypassed an overriding task, scoring the
    labels as inputs (found by an outside-in trial)."""
    from torch.utils.data import DataLoader, TensorDataset

    class LabelsFirst(ClassificationTask):
        def inputs_and_labels(self, batch):  # noqa: ANN001, ANN201
            return batch[1], torch.as_tensor(batch[0])

    reference = netmend.identify(blobs_logreg, (blobs.X, blobs.y), failset, k=5, **RUN)
    train = TensorDataset(blobs.y, blobs.X)
    fail = TensorDataset(failset[1], failset[0])
    for data in (train, DataLoader(train, batch_size=7)):
        got = netmend.identify(blobs_logreg, data, fail, k=5, task=LabelsFirst(), **RUN)
        np.testing.assert_allclose(got.scores, reference.scores, rtol=1e-10, atol=1e-12)
    acc = netmend.evaluate(blobs_logreg, TensorDataset(*failset[::-1]), task=LabelsFirst())
    assert acc == netmend.evaluate(blobs_logreg, failset)


def test_a_task_inputs_override_applies_to_tensor_pairs(blobs, blobs_logreg, failset, ref):
    """docs/data.md: scale uint8 pixels in a ``Task.inputs`` override. It applies to ``(X, y)``
    pairs as it does to a Dataset's batches (it was once skipped for pairs)."""

    class Halved(ClassificationTask):
        def inputs(self, x):  # noqa: ANN001, ANN201
            return x / 2

    Items = ref.ItemDataset
    doubled = (blobs.X * 2, blobs.y)
    fail2 = (failset[0] * 2, failset[1])
    reference = netmend.identify(blobs_logreg, (blobs.X, blobs.y), failset, k=5, **RUN)
    pair = netmend.identify(blobs_logreg, doubled, fail2, k=5, task=Halved(), **RUN)
    items = netmend.identify(
        blobs_logreg, Items(*doubled), Items(*fail2), k=5, task=Halved(), **RUN
    )
    np.testing.assert_allclose(pair.scores, reference.scores, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(items.scores, reference.scores, rtol=1e-10, atol=1e-12)


def test_docs_data_example_runs(capsys):
    """docs/data.md's Hugging Face-style example (dict batches, padding collate, ``.logits``
    outputs) runs as written."""
    import re
    import warnings
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, flags=re.S)[-1]
    ns: dict = {}
    with warnings.catch_warnings():  # it passes the recipe: no "no train_config" warning
        warnings.filterwarnings("error", message="no train_config")
        exec(compile(block, "docs/data.md example", "exec"), ns)
    result = ns["result"]
    assert result.scores.shape == (len(ns["train_set"]),)
    assert len(result.causes) > 0 and (result.scores[result.causes] > 0).all()
    assert "test_acc" in capsys.readouterr().out
