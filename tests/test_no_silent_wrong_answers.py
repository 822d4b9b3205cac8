"""Misuses that used to give a silently wrong answer now raise (or warn) with a message that
says what to do (issue 14, scope 4; docs/safety.md)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import netmend
from netmend import identification, treatment
from netmend.api import PluginContractError
from netmend.model.training import TrainConfig

RUN = dict(progress=False, device="cpu")


def _train(blobs):
    return (blobs.X, blobs.y)


def _fail(blobs):
    return (blobs.Xf, blobs.yf)


# ----------------------------------------------------------------------------- model outputs


def test_probability_outputs_are_refused(blobs, blobs_logreg):
    probs = nn.Sequential(blobs_logreg, nn.Softmax(dim=1)).eval()
    with pytest.raises(ValueError, match="look like probabilities"):
        netmend.identify(probs, _train(blobs), _fail(blobs), "loss", k=5, **RUN)
    with pytest.raises(ValueError, match="look like probabilities"):
        netmend.treat(probs, _train(blobs), [0, 1], "newton", **RUN)


class _NaNWhereZero(nn.Module):
    """The blobs model, with NaN logits on an all-zero input (as torch's attention gives on
    a sequence that is all padding)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return torch.where((x == 0).all(1, keepdim=True), torch.nan, out)


class _AddRow(nn.Module):
    def __init__(self, row: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("row", row.double())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.row


def test_nan_logits_are_named_not_read_as_class_0(blobs, blobs_logreg):
    m = _NaNWhereZero(blobs_logreg).eval()
    X = blobs.X.clone()
    X[[4, 17]] = 0
    # evaluate used to call the NaN rows class 0 (an all-zero test set labelled 0: 100%)
    with pytest.raises(ValueError, match=r"logits are NaN or infinite on 2 examples \(4, 17\)"):
        netmend.evaluate(m, (X, blobs.y), device="cpu")
    # -inf masks a class: argmax and softmax take it (refused by the first version of this
    # check); a row of -inf has no class at all
    masked = nn.Sequential(blobs_logreg, _AddRow(torch.tensor([0.0, 0.0, -torch.inf]))).eval()
    netmend.evaluate(masked, (blobs.X, blobs.y), device="cpu")
    dead = nn.Sequential(blobs_logreg, _AddRow(torch.full((3,), -torch.inf))).eval()
    with pytest.raises(ValueError, match="logits are NaN or infinite on"):
        netmend.evaluate(dead, (blobs.X, blobs.y), device="cpu")
    # scores used to fail later, as advice to raise l2
    with pytest.raises(ValueError, match=r"train: the model's log-probability is NaN .*\(4, 17\)"):
        netmend.identify(m, (X, blobs.y), _fail(blobs), "ewc", k=5, **RUN)


def test_log_probability_outputs_warn_and_score_as_logits(blobs, blobs_logreg):
    logp = nn.Sequential(blobs_logreg, nn.LogSoftmax(dim=1)).eval()
    with pytest.warns(UserWarning, match="look like log-probabilities"):
        got = netmend.identify(logp, _train(blobs), _fail(blobs), "linear", k=5, **RUN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plain logits: no warning
        ref = netmend.identify(blobs_logreg, _train(blobs), _fail(blobs), "linear", k=5, **RUN)
    # log_softmax is idempotent: the warning is the only difference
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- causes


def test_boolean_mask_causes_are_a_mask(blobs, blobs_logreg):
    n = blobs.X.shape[0]
    mask = np.zeros(n, dtype=bool)
    mask[blobs.planted] = True
    by_mask = netmend.treat(blobs_logreg, _train(blobs), mask, "newton", l2=1.0, **RUN)
    by_index = netmend.treat(blobs_logreg, _train(blobs), blobs.planted, "newton", l2=1.0, **RUN)
    # a mask read as indices would remove examples 0 and 1 instead of the planted ones
    by_01 = netmend.treat(blobs_logreg, _train(blobs), [0, 1], "newton", l2=1.0, **RUN)
    for a, b in zip(by_mask.parameters(), by_index.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not all(
        torch.allclose(a, b) for a, b in zip(by_mask.parameters(), by_01.parameters(), strict=True)
    )
    torch_mask = netmend.treat(
        blobs_logreg, _train(blobs), torch.from_numpy(mask), "newton", l2=1.0, **RUN
    )
    for a, b in zip(torch_mask.parameters(), by_index.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("causes", "error", "match"),
    [
        (np.zeros(5, dtype=bool), ValueError, "boolean mask of shape"),
        (np.array([0.0, 3.0]), TypeError, "integer training indices"),
        (torch.tensor([0.5, 2.0]), TypeError, "integer training indices"),
        ([0, 10_000], ValueError, r"in \[0, "),
        ([-1, 2], ValueError, r"in \[0, "),
        ([3, 4, 3], ValueError, "duplicate"),
        ([], ValueError, "no causes.*allow_no_causes=True"),
        # found by an outside-in trial: a matrix was flattened, a scalar taken as one cause
        (np.array([[1, 2], [3, 4]]), ValueError, r"1-D list .* shape \(2, 2\)"),
        (3, ValueError, r"1-D list .* shape \(\)"),
    ],
)
def test_bad_causes_are_refused(blobs, blobs_logreg, causes, error, match):
    with pytest.raises(error, match=match):
        netmend.treat(blobs_logreg, _train(blobs), causes, "newton", **RUN)


def test_retrain_on_nothing_is_refused(blobs, blobs_logreg):
    """Causes that cover the whole training set left 'retrain' nothing to fit, and it returned
    the freshly initialised model at chance accuracy (found by an outside-in trial); finetune
    already refused."""
    from netmend.model.training import TrainConfig

    everything = np.ones(len(_train(blobs)[1]), dtype=bool)
    for name in ("retrain", "finetune"):
        with pytest.raises(ValueError, match="cover the whole training set"):
            netmend.treat(blobs_logreg, _train(blobs), everything, name,
                          train_config=TrainConfig(epochs=2), **RUN)  # fmt: skip


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("method", identification.available())
def test_every_identification_method_refuses_unknown_options(blobs, blobs_logreg, method):
    assert identification.base._REGISTRY.options(method) is not None, "declare its options"
    with pytest.raises(ValueError, match="unknown option.*It accepts"):
        netmend.identify(
            blobs_logreg, _train(blobs), _fail(blobs), method, k=5, no_such_option=1, **RUN
        )


@pytest.mark.parametrize("method", treatment.available())
def test_every_treatment_refuses_unknown_options(blobs, blobs_logreg, method):
    assert treatment.base._REGISTRY.options(method) is not None, "declare its options"
    with pytest.raises(ValueError, match="unknown option.*It accepts"):
        netmend.treat(blobs_logreg, _train(blobs), [0, 1], method, no_such_option=1, **RUN)


def test_misspelt_options_suggest_the_right_name(blobs, blobs_logreg):
    with pytest.raises(ValueError, match="did you mean 'steps'"):
        netmend.identify(blobs_logreg, _train(blobs), _fail(blobs), "ewc", k=5, stepz=3, **RUN)
    with pytest.raises(ValueError, match="did you mean 'steps'"):
        netmend.treat(blobs_logreg, _train(blobs), [0, 1], "ewc", stepz=3, **RUN)
    with pytest.raises(ValueError, match="did you mean 'epochs'"):
        netmend.treat(blobs_logreg, _train(blobs), [0, 1], "finetune", epocs=3, **RUN)
    # a misspelt argument of the function itself was offered a method option, or nothing
    ident = "an argument of netmend.identify itself"
    for kw, name in ((dict(cache_directory="x"), "cache_dir"), (dict(seeds=1), "seed")):
        with pytest.raises(ValueError, match=f"did you mean '{name}', {ident}"):
            netmend.identify(blobs_logreg, _train(blobs), _fail(blobs), "ewc", k=5, **kw, **RUN)
    with pytest.raises(ValueError, match="'train_config', an argument of netmend.treat itself"):
        netmend.treat(blobs_logreg, _train(blobs), [0, 1], "finetune", train_cfg=None, **RUN)


def test_declared_options_are_accepted(blobs, blobs_logreg):
    """The declared list is what the method reads: a declared option changes the result."""
    kw = dict(k=5, l2=0.1, **RUN)
    a = netmend.identify(blobs_logreg, _train(blobs), _fail(blobs), "ewc", steps=1, **kw)
    b = netmend.identify(blobs_logreg, _train(blobs), _fail(blobs), "ewc", steps=30, **kw)
    assert np.abs(a.scores - b.scores).max() > 1e-2 * np.abs(b.scores).max()


# ----------------------------------------------------------------------------- scores


def test_all_equal_scores_are_refused(blobs, blobs_logreg):
    """A saturated softmax: every training log-likelihood is exactly 0, no gradient."""
    sat = nn.Sequential(blobs_logreg)
    with torch.no_grad():
        for p in sat.parameters():
            p.mul_(1e4)
        y_self = sat(blobs.X).argmax(1)  # labels the model fits: log p(y|x) == 0 exactly
        assert bool((torch.log_softmax(sat(blobs.X), 1).gather(1, y_self[:, None]) == 0).all())
    for method in ("loss", "ewc"):
        with pytest.raises(ValueError, match="same score.*saturated"):
            netmend.identify(sat, (blobs.X, y_self), _fail(blobs), method, k=5, **RUN)


# ----------------------------------------------------------------------------- NaN weights


def test_nan_weights_are_named(blobs, blobs_logreg):
    with torch.no_grad():
        next(blobs_logreg.parameters())[0, 0] = float("nan")
    with pytest.raises(ValueError, match="parameters contain NaN"):
        netmend.identify(blobs_logreg, _train(blobs), _fail(blobs), "ewc", k=5, **RUN)
    with pytest.raises(ValueError, match="parameters contain NaN"):
        netmend.treat(blobs_logreg, _train(blobs), [0, 1], "finetune", **RUN)


def test_treat_never_returns_a_nan_model(blobs, blobs_logreg):
    with pytest.raises(RuntimeError, match="diverged"):
        netmend.treat(
            blobs_logreg, _train(blobs), blobs.planted, "newton", step_size=1e308, l2=1e-6, **RUN
        )


# ----------------------------------------------------------------------------- k, n, seed


def test_k_above_n_is_refused(blobs, blobs_logreg):
    n = blobs.X.shape[0]
    with pytest.raises(ValueError, match=f"k={n + 1} is outside"):
        netmend.identify(blobs_logreg, _train(blobs), _fail(blobs), "loss", k=n + 1, **RUN)
    with pytest.raises(TypeError, match="k must be"):
        netmend.identify(blobs_logreg, _train(blobs), _fail(blobs), "loss", k=True, **RUN)


def test_numpy_and_torch_integer_k(blobs, blobs_logreg):
    ref = netmend.identify(blobs_logreg, _train(blobs), _fail(blobs), "loss", k=7, **RUN)
    for k in (np.int64(7), np.int32(7), torch.tensor(7)):
        got = netmend.identify(blobs_logreg, _train(blobs), _fail(blobs), "loss", k=k, **RUN)
        np.testing.assert_array_equal(got.causes, ref.causes)
    assert ref.causes.size == 7


def test_culprits_needs_a_positive_n(blobs, blobs_logreg):
    res = netmend.identify(blobs_logreg, _train(blobs), _fail(blobs), "linear", k=5, **RUN)
    for n in (0, -1):
        with pytest.raises(ValueError, match="n must be >= 1"):
            res.culprits(0, n)
    assert res.culprits(0, np.int64(3)).indices.size == 3


def test_seed_none_is_refused_and_numpy_seed_accepted(blobs, blobs_logreg):
    with pytest.raises(TypeError, match="seed must be an integer"):
        netmend.identify(blobs_logreg, _train(blobs), _fail(blobs), "random", k=5, seed=None)
    with pytest.raises(TypeError, match="seed must be an integer"):
        netmend.treat(blobs_logreg, _train(blobs), [0], "newton", seed=None, **RUN)
    a = netmend.identify(blobs_logreg, _train(blobs), _fail(blobs), "random", k=5, seed=3, **RUN)
    b = netmend.identify(
        blobs_logreg, _train(blobs), _fail(blobs), "random", k=5, seed=np.int64(3), **RUN
    )
    np.testing.assert_array_equal(a.scores, b.scores)


# ----------------------------------------------------------------------------- global RNG


def test_identify_and_treat_leave_the_global_rng_alone(blobs, blobs_logreg):
    torch.manual_seed(99)
    expected = torch.rand(5)
    torch.manual_seed(99)
    netmend.identify(blobs_logreg, _train(blobs), _fail(blobs), "ewc", k=5, seed=7, **RUN)
    torch.testing.assert_close(torch.rand(5), expected, rtol=0.0, atol=0.0)
    torch.manual_seed(99)
    netmend.treat(
        blobs_logreg,
        _train(blobs),
        [0, 1],
        "retrain",
        train_config=TrainConfig(epochs=1, batch_size=64),
        seed=7,
        **RUN,
    )
    torch.testing.assert_close(torch.rand(5), expected, rtol=0.0, atol=0.0)


def test_results_do_not_depend_on_the_global_rng(blobs, blobs_logreg):
    cfg = TrainConfig(epochs=1, batch_size=64)
    out = []
    for outer in (1, 2):
        torch.manual_seed(outer)
        m = netmend.treat(blobs_logreg, _train(blobs), [0, 1], "retrain", train_config=cfg, **RUN)
        out.append(torch.cat([p.detach().reshape(-1) for p in m.parameters()]))
    torch.testing.assert_close(out[0], out[1], rtol=0.0, atol=0.0)


# ----------------------------------------------------------------------------- pandas


class _Index:
    __module__ = "pandas.core.indexes.base"

    def __init__(self, values):
        self.values = list(values)

    def equals(self, other):
        return self.values == other.values


class _Frame:
    """Enough of a pandas DataFrame for netmend (recognised by its module; pandas itself is
    not needed, and netmend must not import it)."""

    __module__ = "pandas.core.frame"

    def __init__(self, data, index, dtypes=None):
        self.data, self.index = np.asarray(data), _Index(index)
        self.dtypes = dtypes or {f"c{i}": self.data.dtype for i in range(self.data.shape[1])}

    def to_numpy(self, dtype=None):
        return np.asarray(self.data, dtype=dtype)


class _Series:
    __module__ = "pandas.core.series"

    def __init__(self, data, index):
        self.data, self.index = np.asarray(data), _Index(index)
        self.dtype = self.data.dtype

    def to_numpy(self, dtype=None):
        return np.asarray(self.data, dtype=dtype)


def test_pandas_inputs_pair_by_position_and_warn_on_other_indexes(blobs, blobs_logreg):
    X, y = blobs.X.numpy(), blobs.y.numpy()
    n = len(y)
    ref = netmend.identify(blobs_logreg, (X, y), _fail(blobs), "loss", k=5, **RUN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same index: no warning
        same = netmend.identify(
            blobs_logreg,
            (_Frame(X, range(n)), _Series(y, range(n))),
            _fail(blobs),
            "loss",
            k=5,
            **RUN,
        )
    np.testing.assert_array_equal(same.scores, ref.scores)
    with pytest.warns(UserWarning, match="by position"):
        other = netmend.identify(
            blobs_logreg,
            (_Frame(X, range(n)), _Series(y, range(n)[::-1])),
            _fail(blobs),
            "loss",
            k=5,
            **RUN,
        )
    np.testing.assert_array_equal(other.scores, ref.scores)


def test_pandas_non_numeric_columns_are_refused(blobs, blobs_logreg):
    X = blobs.X.numpy()
    frame = _Frame(X, range(len(X)), dtypes={"a": np.float64, "b": object})
    with pytest.raises(TypeError, match="non-numeric column"):
        netmend.identify(blobs_logreg, (frame, blobs.y.numpy()), _fail(blobs), "loss", k=5, **RUN)


def test_real_pandas(blobs, blobs_logreg):
    pd = pytest.importorskip("pandas")
    X, y = blobs.X.numpy(), blobs.y.numpy()
    ref = netmend.identify(blobs_logreg, (X, y), _fail(blobs), "loss", k=5, **RUN)
    df, s = pd.DataFrame(X), pd.Series(y)
    got = netmend.identify(blobs_logreg, (df, s), _fail(blobs), "loss", k=5, **RUN)
    np.testing.assert_array_equal(got.scores, ref.scores)
    with pytest.warns(UserWarning, match="by position"):
        netmend.identify(blobs_logreg, (df, s.sort_values()), _fail(blobs), "loss", k=5, **RUN)


def test_repair_checks_treatment_options_before_identifying(blobs, blobs_logreg, monkeypatch):
    calls = []
    monkeypatch.setattr(netmend.api, "_identify", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="did you mean 'epochs'"):
        netmend.repair(blobs_logreg, _train(blobs), _fail(blobs), treat_options={"epocs": 1}, **RUN)
    assert calls == []  # refused before the (expensive) identification


def test_real_pandas_dtypes(blobs, blobs_logreg):
    pd = pytest.importorskip("pandas")
    X, y = blobs.X.numpy(), blobs.y.numpy()
    ref = netmend.identify(blobs_logreg, (X, y), _fail(blobs), "loss", k=5, **RUN)
    nullable = pd.Series(pd.array(y, dtype="Int64"))
    got = netmend.identify(
        blobs_logreg, (pd.DataFrame(X), nullable), _fail(blobs), "loss", k=5, **RUN
    )
    np.testing.assert_array_equal(got.scores, ref.scores)
    holed = pd.Series(pd.array([None, *y[1:]], dtype="Int64"))
    with pytest.raises(ValueError, match="missing values"):
        netmend.identify(blobs_logreg, (pd.DataFrame(X), holed), _fail(blobs), "loss", k=5, **RUN)
    frame = pd.DataFrame({"a": X[:, 0], "b": pd.Categorical(X[:, 1] > 0)})
    with pytest.raises(TypeError, match=r"non-numeric column\(s\) \['b'\]"):
        netmend.identify(blobs_logreg, (frame, y), _fail(blobs), "loss", k=5, **RUN)


def test_evaluate_refuses_labels_outside_the_models_classes(blobs, blobs_logreg):
    """evaluate() once scored labels outside a model's classes as plain misses (accuracy 0.0)."""
    for shift in (3, -5):
        with pytest.raises(ValueError, match=r"test: labels must lie in \[0, 3\)"):
            netmend.evaluate(blobs_logreg, (blobs.X, blobs.y + shift), device="cpu")
    assert 0 < netmend.evaluate(blobs_logreg, (blobs.X, blobs.y), device="cpu")["test_acc"] <= 1


def test_evaluate_refuses_a_split_of_another_test_set(blobs, blobs_logreg):
    """A split of the full test set against its first half was numpy's IndexError."""
    n = len(blobs.y)
    split = netmend.evaluation.FailureSplit(np.array([0]), np.array([n - 1]), np.arange(1, n - 1))
    with pytest.raises(ValueError, match=r"split\.heldout holds indices outside the test set"):
        netmend.evaluate(blobs_logreg, (blobs.X[: n // 2], blobs.y[: n // 2]), split, device="cpu")
    assert "heldout_failure_acc" in netmend.evaluate(blobs_logreg, (blobs.X, blobs.y), split,
                                                      device="cpu")  # fmt: skip


def test_a_single_logit_model_is_told_to_return_two(blobs):
    one = nn.Linear(2, 1).double()
    with pytest.raises(ValueError, match=r"one logit z must return two.*sigmoid"):
        netmend.identify(one, (blobs.X, blobs.y), (blobs.Xf, blobs.yf), k=2, **RUN)


def test_one_example_without_a_batch_dimension_is_told_to_add_one(blobs, blobs_logreg):
    with pytest.raises(ValueError, match=r"failures: the label is a single number.*x\[None\]"):
        netmend.identify(blobs_logreg, (blobs.X, blobs.y), (blobs.Xf[0], 1), k=2, **RUN)


def test_what_a_plugin_returns_is_checked(blobs, blobs_logreg, monkeypatch):
    """A user's method or treatment that returns the wrong thing is named, with what to return
    (an outside-in trial got AttributeError, or a per-failure matrix of the wrong width that
    failed later in culprits())."""
    from netmend.identification import MethodOutput
    from netmend.identification import base as ident_base
    from netmend.treatment import base as treat_base

    n = len(blobs.y)
    bad = {
        "plug_array": lambda ctx: np.linspace(1, -1, ctx.N),
        "plug_narrow": lambda ctx: MethodOutput(
            scores=np.linspace(1, -1, ctx.N), per_failure=np.zeros((ctx.N, 3))
        ),
        "plug_short": lambda ctx: MethodOutput(scores=np.zeros(ctx.N - 1)),
    }
    for name, fn in bad.items():
        monkeypatch.setitem(ident_base._REGISTRY._items, name, fn)
    failures = (blobs.Xf, blobs.yf)
    with pytest.raises(TypeError, match=r"returned a ndarray.*MethodOutput"):
        netmend.identify(blobs_logreg, (blobs.X, blobs.y), failures, "plug_array", k=2, **RUN)
    narrow = netmend.identify(blobs_logreg, (blobs.X, blobs.y), failures, "plug_narrow", k=2,
                              **RUN)  # fmt: skip
    with pytest.raises(PluginContractError, match=rf"shape \({n}, 3\); expected \[{n}, 1\]"):
        narrow.culprits(0)
    with pytest.raises(PluginContractError, match=rf"expected \({n},\), one per training example"):
        netmend.identify(blobs_logreg, (blobs.X, blobs.y), failures, "plug_short", k=2, **RUN)
    monkeypatch.setitem(treat_base._REGISTRY._items, "plug_none", lambda ctx: None)
    with pytest.raises(TypeError, match=r"returned a NoneType.*nn.Module"):
        netmend.treat(blobs_logreg, (blobs.X, blobs.y), [0, 1], "plug_none", **RUN)
    # a model of other outputs, and one in train mode, were handed back as they were
    monkeypatch.setitem(treat_base._REGISTRY._items, "plug_wide",
                        lambda ctx: nn.Linear(2, 7).double())  # fmt: skip
    with pytest.raises(
        PluginContractError, match="returned a model with 7 outputs; the model has 3"
    ):
        netmend.treat(blobs_logreg, (blobs.X, blobs.y), [0, 1], "plug_wide", **RUN)
    monkeypatch.setitem(treat_base._REGISTRY._items, "plug_train",
                        lambda ctx: nn.Sequential(ctx.model, nn.Dropout(0.5)).train())  # fmt: skip
    assert not netmend.treat(blobs_logreg, (blobs.X, blobs.y), [0, 1], "plug_train", **RUN).training
    with pytest.raises(ValueError, match=r"^an identification method named 'ewc' is already"):
        ident_base.register("ewc")(lambda ctx: None)


def test_a_model_on_the_meta_device_is_refused_with_the_fix(blobs, blobs_logreg):
    """identify raised 'Tensor.item() cannot be called on meta tensors', evaluate 'Cannot copy
    out of meta tensor' (an outside-in trial)."""
    meta = copy.deepcopy(blobs_logreg).to("meta")
    with pytest.raises(ValueError, match=r"on the 'meta' device.*to_empty"):
        netmend.identify(meta, (blobs.X, blobs.y), (blobs.Xf, blobs.yf), k=2, **RUN)
    with pytest.raises(ValueError, match=r"on the 'meta' device.*assign=True"):
        netmend.evaluate(meta, (blobs.X, blobs.y), device="cpu")


def test_treating_most_of_a_class_warns_as_identify_does(blobs, blobs_logreg):
    """Causes a user brings (cleanlab's, or a class) that empty a class: identify warned, treat
    did not (an outside-in trial: class 3 fell from 96% to 2%, no word)."""
    cls = np.flatnonzero(blobs.y.numpy() == 2)
    cfg = TrainConfig(epochs=1, batch_size=32)
    with pytest.warns(UserWarning, match="most of a class's training examples \\(class 2: 100%"):
        netmend.treat(blobs_logreg, _train(blobs), cls, train_config=cfg, **RUN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a few causes of a class, or correcting them: no word
        netmend.treat(blobs_logreg, _train(blobs), cls[:5], train_config=cfg, **RUN)
        netmend.treat(blobs_logreg, _train(blobs), cls, "relabel", train_config=cfg, **RUN)


def test_repair_says_a_class_emptying_selection_once(blobs, blobs_logreg):
    """identify warned, then treat warned again on the same causes (and on every guard
    trial): the warning is treat's only when a user calls it with causes of their own."""
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        netmend.repair(blobs_logreg, _train(blobs), _fail(blobs), "loss", k=70, guard=False,
                       train_config=TrainConfig(epochs=1, batch_size=32), **RUN)  # fmt: skip
    said = [w for w in got if "most of a class's training examples" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in said]
