"""Malformed inputs fail early with a ValueError/TypeError that says what to do (never an
AssertionError, never a deep torch error)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import netmend
from netmend import TrainConfig
from netmend.data.checks import as_tensors
from netmend.model.training import fit

DT = torch.float64
RUN = dict(progress=False, device="cpu")


@pytest.fixture
def setup(blobs, blobs_logreg):
    return blobs_logreg, (blobs.X, blobs.y), (blobs.Xf, blobs.yf)


def _with_nan(X, i=3, value=float("nan")):
    X = X.clone()
    X[i, 0] = value
    return X


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_train_inputs(setup, value):
    model, (X, y), fail = setup
    with pytest.raises(ValueError, match=r"train: 1 input\(s\) contain NaN or inf"):
        netmend.identify(model, (_with_nan(X, value=value), y), fail, **RUN)
    with pytest.raises(ValueError, match=r"train: 1 input\(s\) contain NaN or inf"):
        netmend.treat(model, (_with_nan(X, value=value), y), [0], **RUN)


def test_non_finite_failures(setup):
    model, train, (Xf, yf) = setup
    Xf = torch.cat([Xf, Xf])
    yf = torch.cat([yf, yf])
    with pytest.raises(ValueError, match=r"failures: 1 input\(s\) contain NaN"):
        netmend.identify(model, train, (_with_nan(Xf, i=1), yf), **RUN)


def test_mismatched_lengths(setup):
    model, (X, y), (Xf, yf) = setup
    msg = r"train: inputs and labels have different lengths \(126 vs 125\)"
    with pytest.raises(ValueError, match=msg):
        netmend.identify(model, (X, y[:-1]), (Xf, yf), **RUN)
    with pytest.raises(ValueError, match="failures: inputs and labels have different lengths"):
        netmend.identify(model, (X, y), (Xf, torch.cat([yf, yf])), **RUN)


@pytest.mark.parametrize("bad", [3, -1])
def test_labels_out_of_range(setup, bad):
    model, (X, y), (Xf, yf) = setup
    y_bad = y.clone()
    y_bad[0] = bad
    with pytest.raises(ValueError, match=r"train: labels must lie in \[0, 3\)"):
        netmend.identify(model, (X, y_bad), (Xf, yf), **RUN)
    with pytest.raises(ValueError, match=r"failures: labels must lie in \[0, 3\)"):
        netmend.identify(model, (X, y), (Xf, torch.tensor([bad])), **RUN)
    with pytest.raises(ValueError, match=r"train: labels must lie in \[0, 3\)"):
        netmend.treat(model, (X, y_bad), [0], **RUN)


def test_labels_not_integers_or_not_1d(setup):
    model, (X, y), fail = setup
    with pytest.raises(ValueError, match=r"integer class indices \(0, 1, ...\); found \[0.5, "):
        netmend.identify(model, (X, y.double() + 0.5), fail, **RUN)
    with pytest.raises(ValueError, match=r"labels must have shape \[N\]"):
        netmend.identify(model, (X, torch.nn.functional.one_hot(y, 3)), fail, **RUN)


def test_empty_failures_and_empty_train(setup):
    model, (X, y), (Xf, _) = setup
    empty = (torch.empty(0, 2, dtype=DT), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match="failures is empty"):
        netmend.identify(model, (X, y), empty, **RUN)
    with pytest.raises(ValueError, match="failures is empty"):
        netmend.identify(model, (X, y), TensorDataset(*empty), **RUN)
    with pytest.raises(ValueError, match="train is empty"):
        netmend.identify(model, empty, (Xf, torch.tensor([0])), **RUN)


def test_failures_the_model_gets_right(setup):
    model, train, (Xf, _) = setup
    X = train[0][:5]
    with torch.no_grad():
        right = model(X).argmax(1)
    with pytest.raises(ValueError, match="already classifies every example of the failure set"):
        netmend.identify(model, train, (X, right), **RUN)
    # a mix is accepted with a warning
    mixed_y = right.clone()
    mixed_y[0] = (mixed_y[0] + 1) % 3
    with pytest.warns(UserWarning, match="4 of 5 failure examples are already classified"):
        netmend.identify(model, train, (X, mixed_y), k=2, **RUN)


def test_failure_input_shape_mismatch(setup):
    model, train, _ = setup
    with pytest.raises(ValueError, match=r"failures have input shape \(3,\) but train has \(2,\)"):
        netmend.identify(model, train, (torch.zeros(2, 3, dtype=DT), torch.tensor([0, 1])), **RUN)


def test_shuffled_dataloader(setup):
    model, (X, y), (Xf, yf) = setup
    shuffled = DataLoader(TensorDataset(X, y), batch_size=16, shuffle=True)
    with pytest.raises(ValueError, match="train: the DataLoader shuffles or samples"):
        netmend.identify(model, shuffled, (Xf, yf), **RUN)
    with pytest.raises(ValueError, match="shuffle=False"):
        netmend.treat(model, shuffled, [0], **RUN)
    fail_loader = DataLoader(TensorDataset(Xf, yf), batch_size=1, shuffle=True)
    with pytest.raises(ValueError, match="failures: the DataLoader shuffles"):
        netmend.identify(model, (X, y), fail_loader, **RUN)


def test_dataloader_dropping_last_batch(setup):
    """A DataLoader with drop_last=True would leave examples without a score: refused."""
    model, (X, y), (Xf, yf) = setup
    loader = DataLoader(TensorDataset(X, y), batch_size=50, drop_last=True)
    with pytest.raises(ValueError, match=r"train: the DataLoader drops its last batch"):
        netmend.identify(model, loader, (Xf, yf), k=3, **RUN)
    with pytest.raises(ValueError, match="drop_last=False"):
        netmend.treat(model, loader, [0], **RUN)
    fail_loader = DataLoader(TensorDataset(Xf, yf), batch_size=1, drop_last=True)
    with pytest.raises(ValueError, match="failures: the DataLoader drops its last batch"):
        netmend.identify(model, (X, y), fail_loader, k=3, **RUN)
    # drop_last=True with batches that divide N evenly drops nothing, but is refused all the
    # same; drop_last=False is accepted and scores every example
    ok = netmend.identify(
        model, DataLoader(TensorDataset(X, y), batch_size=50), (Xf, yf), k=3, **RUN
    )
    assert ok.scores.shape == (X.shape[0],)


def test_unsupported_containers(setup):
    model, (X, y), fail = setup
    with pytest.raises(TypeError, match="train: expected a torch Dataset"):
        netmend.identify(model, {"X": X, "y": y}, fail, **RUN)
    with pytest.raises(TypeError, match="train: expected a torch Dataset"):
        netmend.identify(model, X, fail, **RUN)
    dicts = DataLoader([{"x": X[i], "y": y[i]} for i in range(4)], batch_size=2)
    with pytest.raises(TypeError, match=r"each batch must be \(x, y\)"):
        as_tensors(dicts, "train")


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("layer", [nn.Dropout(0.5), nn.BatchNorm1d(4), nn.AlphaDropout(0.1)])
def test_stochastic_model_in_train_mode(blobs, layer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), layer, nn.Linear(4, 3)).double().train()
    msg = r"train mode with dropout/BatchNorm layers \(1\).*model\.eval\(\)"
    with pytest.raises(ValueError, match=msg):
        netmend.identify(model, (blobs.X, blobs.y), (blobs.Xf, blobs.yf), **RUN)
    with pytest.raises(ValueError, match="model.eval()"):
        netmend.treat(model, (blobs.X, blobs.y), [0], **RUN)
    with pytest.raises(ValueError, match="model.eval()"):
        netmend.repair(model, (blobs.X, blobs.y), (blobs.Xf, blobs.yf), **RUN)
    assert model.training  # the check does not switch modes behind the user's back


def test_not_a_model_or_nothing_trainable(setup):
    model, train, fail = setup
    with pytest.raises(TypeError, match="torch.nn.Module"):
        netmend.identify(lambda x: x, train, fail, **RUN)
    frozen = nn.Linear(2, 3).double()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        netmend.identify(frozen, train, fail, **RUN)


def test_model_output_not_logits(setup):
    _, train, fail = setup

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 3)

        def forward(self, x):
            return self.lin(x)[:, :, None]

    with pytest.raises(ValueError, match=r"logits of shape \[batch, classes\]"):
        netmend.identify(Bad().double(), train, fail, **RUN)


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("l2", [0.0, -1e-3, float("nan")])
def test_l2_must_be_positive(setup, l2):
    model, train, fail = setup
    with pytest.raises(ValueError, match="l2 must be > 0"):
        netmend.identify(model, train, fail, l2=l2, **RUN)
    with pytest.raises(ValueError, match="l2 must be > 0"):
        netmend.treat(model, train, [0], l2=l2, **RUN)
    with pytest.raises(ValueError, match="l2 must be > 0"):
        netmend.repair(model, train, fail, l2=l2, **RUN)


def test_unknown_method_names(setup):
    model, train, fail = setup
    msg = r"unknown identification method 'no_such_method'; choose one of \["
    with pytest.raises(ValueError, match=msg):
        netmend.identify(model, train, fail, method="no_such_method", **RUN)
    with pytest.raises(ValueError, match="unknown treatment 'prune'; choose one of"):
        netmend.treat(model, train, [0], method="prune", **RUN)
    with pytest.raises(ValueError, match="unknown identification method"):
        netmend.repair(model, train, fail, identify="no_such_method", **RUN)
    with pytest.raises(ValueError, match="unknown treatment"):
        netmend.repair(model, train, fail, treat="prune", k=2, **RUN)
    with pytest.raises(ValueError, match="unknown curvature"):
        netmend.treat(model, train, [0], method="newton", curvature="kronecker", **RUN)


def test_bad_k(setup):
    model, train, fail = setup
    for k in (-2, 1.5, "most"):
        with pytest.raises(ValueError, match="k"):
            netmend.identify(model, train, fail, k=k, **RUN)


@pytest.mark.parametrize(
    "causes, match",
    [
        ([0, 126], r"causes must be training indices in \[0, 126\)"),
        ([-1], r"causes must be training indices in \[0, 126\)"),
        ([], "no causes to treat"),
        (np.array([], dtype=np.int64), "no causes to treat"),
    ],
)
def test_bad_causes(setup, causes, match):
    model, train, _ = setup
    with pytest.raises(ValueError, match=match):
        netmend.treat(model, train, causes, **RUN)


def test_repair_with_no_selected_causes(setup):
    model, train, fail = setup
    with pytest.raises(ValueError, match="no causes to treat") as exc:
        netmend.repair(model, train, fail, k=0, **RUN)
    assert "allow_no_causes" not in str(exc.value)  # a treat() flag repair does not take


@pytest.mark.parametrize(
    "kw",
    [
        dict(epochs=0),
        dict(batch_size=0),
        dict(lr=-1.0),
        dict(weight_decay=-0.1),
        dict(lr=float("nan")),  # nan <= 0 is False: a plain sign check let it through
        dict(lr=float("inf")),
        dict(weight_decay=float("nan")),
    ],
)
def test_bad_train_config(kw):
    with pytest.raises(ValueError, match="invalid TrainConfig"):
        TrainConfig(**kw)


def test_an_overflowing_learning_rate_is_said_to_diverge(setup):
    """lr=1e38 is finite, but Adam's update overflows float32: torch's own message named
    neither the training nor the fix."""
    model, (X, y), _ = setup
    model = copy.deepcopy(model).float()
    with pytest.raises(RuntimeError, match="diverged at step 0.*Lower the learning rate"):
        fit(model, X.float(), y, TrainConfig(epochs=1, lr=1e38), progress=False)


@pytest.mark.parametrize("opt", ["rmsprop", "Adam", "SGD", ""])
def test_bad_optimizer(opt):
    with pytest.raises(ValueError, match="optimizer must be 'adam' or 'sgd'"):
        TrainConfig(optimizer=opt)
    assert TrainConfig(optimizer="sgd").optimizer == "sgd"
    assert TrainConfig().optimizer == "adam"


@pytest.mark.parametrize("l2", ["big", "AUTO", "0.1"])
def test_l2_string_must_be_auto(setup, l2):
    model, train, fail = setup
    msg = "l2 must be a positive number or 'auto'"
    with pytest.raises(ValueError, match=msg):
        netmend.identify(model, train, fail, k=3, l2=l2, **RUN)
    with pytest.raises(ValueError, match=msg):
        netmend.treat(model, train, [0], l2=l2, **RUN)
    with pytest.raises(ValueError, match=msg):
        netmend.repair(model, train, fail, k=3, l2=l2, **RUN)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_cuda_requested_without_cuda(setup, device):
    model, train, fail = setup
    msg = "CUDA is not available here; use device='cpu'"
    with pytest.raises(ValueError, match=msg):
        netmend.identify(model, train, fail, k=3, device=device, progress=False)
    with pytest.raises(ValueError, match=msg):
        netmend.treat(model, train, [0], device=device, progress=False)
    with pytest.raises(ValueError, match=msg):
        netmend.evaluate(model, train, device=device)


def test_a_negative_seed_is_refused_up_front(setup):
    """numpy's generators refuse negative seeds; the error came from deep inside a run
    (numpy's '_coerce_to_uint32_array'), after the identification (found by an outside-in
    trial)."""
    model, (X, y), fail = setup
    for call in (netmend.identify, netmend.repair):
        with pytest.raises(ValueError, match="seed must be a whole number >= 0; got -1"):
            call(model, (X, y), fail, seed=-1, **RUN)


def test_predictions_run_where_the_model_is_whatever_device_is_asked():
    """``predict(model, X, device)`` moved the batches to ``device`` even when the model sat
    elsewhere: the reports and plots pass the model's own inputs with the default "cpu",
    and ``netmend repair --device cuda`` predicted with its CPU copy, so on a GPU both failed
    with torch's device-mismatch error. The batches now go where the model's parameters are
    (here a CPU model asked for the "meta" device, which would compute nothing)."""
    from netmend.model.training import logits, model_device, predict

    torch.manual_seed(0)
    model = nn.Linear(3, 2).eval()
    X = torch.randn(5, 3)
    expected = model(X).argmax(1)
    assert torch.equal(predict(model, X, device="meta"), expected)
    assert logits(model, X, device="meta").device.type == "cpu"
    assert model_device(nn.ReLU(), "meta") == torch.device("meta")  # no parameters: as asked


def test_predict_takes_each_batchs_argmax_without_an_n_by_c_buffer(monkeypatch):
    """predict once held every logit ([N, C]: 5 GB for 1.28M examples of 1,000 classes) to
    take one argmax; it now reads each batch's, with the same classes as the logits'."""
    from netmend.data.source import as_source
    from netmend.model.training import logits, predict

    torch.manual_seed(0)
    model = nn.Linear(3, 7).eval()
    X = torch.randn(23, 3)
    want = logits(model, X).argmax(1)
    for data in (X, as_source((X, torch.zeros(23, dtype=torch.long)), "x")):
        got = predict(model, data, batch_size=5)  # 23 = 4 batches of 5 and one of 3
        assert got.dtype == torch.int64 and torch.equal(got, want)
    sizes: list[tuple[int, ...]] = []
    real_empty = torch.empty

    def empty(*a, **k):
        sizes.append(tuple(a[0]) if isinstance(a[0], tuple) else tuple(a))
        return real_empty(*a, **k)

    monkeypatch.setattr(torch, "empty", empty)
    predict(model, X, batch_size=5)
    assert (23,) in sizes and (23, 7) not in sizes  # one [N] buffer, never [N, C]
    logits(model, X, batch_size=5)
    assert (23, 7) in sizes  # (the check sees the buffer when there is one)
    monkeypatch.undo()
    none = predict(model, X[:0])
    assert none.dtype == torch.int64 and none.shape == (0,)


def test_predictions_and_the_class_guard_take_a_half_precision_model_and_float32_data():
    """The class guard read its slice in float32 with a bf16 model (torch: "mat1 and mat2
    must have the same dtype"), so netmend.repair(bf16_model, ..., k=None) failed: found by a
    code audit. Predictions now cast floating inputs to the model's dtype batch by batch."""
    from netmend.data.source import as_source
    from netmend.model.training import predict
    from netmend.treatment.guard import guard_k

    torch.manual_seed(0)
    X = torch.randn(600, 4)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    half = copy.deepcopy(model).to(torch.bfloat16)
    expected = half(X.to(torch.bfloat16)).argmax(1)
    assert torch.equal(predict(half, X), expected)
    record = guard_k(lambda c: half, half, as_source((X, y), "train"), np.arange(30), 0, "cpu")
    assert record.k == 30 and record.passed  # the trial is the original: no class falls


def test_fit_trains_on_the_device_it_is_given():
    """fit(..., device=D) trains on D (a regression, found by a code audit: for one commit it
    trained wherever the model already was, so the demo and the bench would have trained on
    the CPU of a GPU machine). The "meta" device stands in for a GPU on this CPU."""
    from netmend.model.training import TrainConfig, fit

    model = nn.Linear(3, 2)
    X, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    fit(model, X, y, TrainConfig(epochs=1), device="meta", progress=False)
    assert next(model.parameters()).device.type == "meta"


def test_failures_scaled_unlike_the_training_inputs_are_flagged():
    """Failures in 0-255 for a model trained on 0-1 inputs ran without a word (an outside-in
    trial); netmend now warns, and says nothing for failures on the training scale."""
    import warnings

    torch.manual_seed(0)
    X = torch.rand(80, 4)
    y = (X[:, 0] > 0.5).long()
    model = nn.Sequential(nn.Linear(4, 2)).eval()
    from netmend.model.training import predict

    wrong = predict(model, X) != y
    Xf, yf = X[wrong][:5], y[wrong][:5]
    kw = dict(method="grad_dot", k=3, device="cpu", progress=False)
    with pytest.warns(UserWarning, match="scaled differently"):
        netmend.identify(model, (X, y), (Xf * 255, yf), **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*scaled differently")
        netmend.identify(model, (X, y), (Xf, yf), **kw)


@pytest.mark.parametrize("labels", [np.array(["cat", "dog"] * 10), ["cat", "dog"] * 10])
def test_class_names_as_labels_are_refused_with_the_fix(labels):
    """String labels reached torch, whose message named numpy.str_ (an outside-in trial)."""
    model = nn.Linear(3, 2).eval()
    X = torch.randn(20, 3)
    with pytest.raises(TypeError, match="class index in the model's output order"):
        netmend.identify(model, (X, labels), (X[:3], torch.tensor([0, 1, 0])), "grad_dot", k=3,
                         device="cpu", progress=False)  # fmt: skip


def test_self_influence_with_k_positive_is_refused_before_scoring():
    """target='self' scores are never negative: k='positive' selected the whole training set
    at the noise rate's precision, found by an outside-in trial."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).eval()
    X, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    with pytest.raises(ValueError, match="never negative"):
        netmend.identify(model, (X, y), (X[:3], 1 - y[:3]), "grad_dot", k="positive",
                         target="self", device="cpu", progress=False)  # fmt: skip


def test_an_ewc_fit_that_runs_out_of_steps_warns(setup):
    """ewc's theta_+F fit stopped at its step limit with no word (an outside trial: 5% from the
    optimum of its own objective at l2=1, scores 2.9% off); it now says so, with the fix."""
    model, train, fail = setup
    with pytest.warns(UserWarning, match="used all its steps=1 .* Raise the option steps"):
        netmend.identify(model, train, fail, "ewc", k=3, l2=1.0, steps=1, **RUN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        netmend.identify(model, train, fail, "ewc", k=3, l2=1.0, steps=500, **RUN)


def test_l2_given_to_a_method_that_ignores_it_warns(setup):
    """influence took l2=5.0 and ignored it silently (its damping stayed 'auto'): a user
    passing their weight decay got no signal that it was dropped."""
    model, train, fail = setup
    with pytest.warns(UserWarning, match="l2=5.0 is not used by method 'influence'.*damping"):
        netmend.identify(model, train, fail, "influence", k=3, l2=5.0, **RUN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        netmend.identify(model, train, fail, "linear", k=3, l2=5.0, **RUN)  # it reads l2
        netmend.identify(model, train, fail, "influence", k=3, damping=5.0, **RUN)
    # repair's l2 is the treatment's too: handed to the identification only where read
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        netmend.repair(model, train, fail, "grad_dot", k=3, treat="newton", l2=5.0, **RUN)
    assert not [w for w in seen if "is not used by method" in str(w.message)]


def test_a_repair_argument_given_to_identify_is_named_as_such(setup):
    """identify(..., guard=False) said "unknown option(s) ['guard'] for identification method
    'ewc'. It accepts: step_size, steps", blaming the method."""
    model, train, fail = setup
    with pytest.raises(ValueError, match=r"guard: an argument of netmend\.repair"):
        netmend.identify(model, train, fail, k=3, guard=False, **RUN)
    with pytest.raises(ValueError, match=r"unknown option.*'stepz'"):
        netmend.identify(model, train, fail, k=3, stepz=3, **RUN)
