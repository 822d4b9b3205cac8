"""Treatments that correct the causes: energy-based "align" and "relabel"."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import netmend
from netmend import TrainConfig
from netmend.evaluation import split_failures
from netmend.lab.corrupt import pair_flips
from netmend.lab.datasets import load_digits
from netmend.lab.models import MLP
from netmend.model.functional import FunctionalModel
from netmend.model.training import fit, predict
from netmend.treatment import available as treat_available
from netmend.treatment.align import align_inputs, energy, energy_grad
from netmend.treatment.methods import finetune_recipe

DT = torch.float64
RUN = dict(progress=False, device="cpu")
L2 = 1.0  # small enough that theta_+F changes the planted points' predictions on blobs
CFG = TrainConfig(epochs=2.0, batch_size=32, lr=0.05)


@pytest.fixture(scope="module")
def blobs_mlp(blobs):
    """A float64 MLP trained on the blobs (planted points included); shared, so tests check
    that it is never changed."""
    torch.manual_seed(0)
    model = MLP(2, 3, hidden=(8, 6)).double()
    return fit(
        model, blobs.X, blobs.y, TrainConfig(epochs=30, batch_size=32, lr=0.02), 0, "cpu", False
    )


def _at(ref, model: nn.Module, theta: torch.Tensor) -> nn.Module:
    return ref.set_flat_params(copy.deepcopy(model), theta).eval()


def _causes(blobs) -> np.ndarray:
    """The planted points and six clean points of other classes."""
    clean = np.setdiff1d(np.arange(blobs.X.shape[0]), blobs.planted)[::20][:6]
    return np.sort(np.concatenate([blobs.planted, clean]))


# ----------------------------------------------------------------------------- the energy


@pytest.fixture
def tanh4() -> nn.Module:
    """A smooth tiny network (no dead ReLU regions, where the energy gradient is zero)."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def test_energy_gradient_matches_autograd_and_finite_differences(tanh4, data4):
    fm = FunctionalModel.of(tanh4)
    x = data4.X[:5]
    g = energy_grad(fm, fm.theta, x)
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        e = -torch.logsumexp(tanh4(xi), dim=1).sum()
        (ref_g,) = torch.autograd.grad(e, xi)
        torch.testing.assert_close(g[i : i + 1], ref_g, rtol=1e-12, atol=1e-14)
        h = 1e-6
        for j in range(x.shape[1]):
            d = torch.zeros_like(x[i : i + 1])
            d[0, j] = h
            with torch.no_grad():
                fd = energy(fm, fm.theta, x[i : i + 1] + d) - energy(fm, fm.theta, x[i : i + 1] - d)
            assert abs(float(fd) / (2 * h) - float(g[i, j])) < 1e-7


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("clip", ["global", "feature"])
def test_alignment_lowers_energy_monotonically_within_the_ball_and_range(tanh4, data4, norm, clip):
    fm = FunctionalModel.of(tanh4)
    X0 = data4.X[:12]
    lo, hi = (
        (data4.X.min(), data4.X.max())
        if clip == "global"
        else (
            data4.X.amin(0),
            data4.X.amax(0),
        )
    )
    eps = 0.3
    X, trace = align_inputs(
        fm, fm.theta, X0, steps=15, step_size=0.1, eps=eps, norm=norm, lo=lo, hi=hi, chunk_size=5
    )
    assert trace.shape == (16, 12)
    assert bool((trace[1:] <= trace[:-1]).all())
    assert bool((trace[-1] < trace[0]).all()), "every input should move down the energy"
    with torch.no_grad():
        torch.testing.assert_close(trace[-1], energy(fm, fm.theta, X), rtol=1e-12, atol=1e-12)
    d = X - X0
    dist = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert bool((dist <= eps + 1e-12).all())
    assert bool((lo - 1e-15 <= X).all() and (hi + 1e-15 >= X).all())
    # the chunking does not change anything
    X2, trace2 = align_inputs(
        fm, fm.theta, X0, steps=15, step_size=0.1, eps=eps, norm=norm, lo=lo, hi=hi
    )
    torch.testing.assert_close(X2, X, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(trace2, trace, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- align


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_align_record_soft_labels_and_bounds(ref, blobs, blobs_logreg, norm):
    ident = netmend.identify(
        blobs_logreg, (blobs.X, blobs.y), (blobs.Xf, blobs.yf), "ewc", 12, l2=L2, **RUN
    )
    theta_f = ident.info["theta_plus_f"]
    record: dict = {}
    netmend.treat(
        blobs_logreg,
        (blobs.X, blobs.y),
        ident.causes,
        "align",
        l2=L2,
        train_config=CFG,
        theta_plus_f=theta_f,
        record=record,
        norm=norm,
        eps=0.5,
        temperature=2.0,
        **RUN,
    )
    causes = torch.as_tensor(np.sort(ident.causes))
    torch.testing.assert_close(record["causes"], causes)
    Xc = blobs.X[causes]
    aligned = record["aligned"]
    moved = aligned - Xc
    torch.testing.assert_close(record["linf_moved"], moved.abs().amax(1))
    torch.testing.assert_close(record["l2_moved"], moved.norm(dim=1))
    dist = record["linf_moved"] if norm == "linf" else record["l2_moved"]
    assert bool((dist <= 0.5 + 1e-12).all()) and bool((dist > 0).any())
    assert bool((aligned >= blobs.X.min()).all() and (aligned <= blobs.X.max()).all())
    model_f = _at(ref, blobs_logreg, theta_f)
    with torch.no_grad():
        z_before, z_after = model_f(Xc), model_f(aligned)
    torch.testing.assert_close(record["energy_before"], -torch.logsumexp(z_before, 1))
    torch.testing.assert_close(record["energy_after"], -torch.logsumexp(z_after, 1))
    assert bool((record["energy_after"] <= record["energy_before"]).all())
    soft = record["soft_labels"]
    torch.testing.assert_close(soft.sum(1), torch.ones(len(causes), dtype=DT))
    torch.testing.assert_close(soft, torch.softmax(z_after / 2.0, 1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(record["label_before"], blobs.y[causes])
    torch.testing.assert_close(record["label_after"], z_after.argmax(1))


def test_align_fine_tunes_on_retained_plus_aligned_with_soft_targets(ref, blobs, blobs_logreg):
    """The result is exactly fit() from theta_hat on D minus C plus (aligned, soft label)."""
    causes = _causes(blobs)
    record: dict = {}
    kw = dict(l2=L2, train_config=CFG, failures=(blobs.Xf, blobs.yf), **RUN)
    new = netmend.treat(blobs_logreg, (blobs.X, blobs.y), causes, "align", record=record, **kw)
    keep = np.setdiff1d(np.arange(blobs.X.shape[0]), causes)
    X = torch.cat([blobs.X[keep], record["aligned"]])
    T = torch.cat([torch.eye(3, dtype=DT)[blobs.y[keep]], record["soft_labels"]])
    cfg = finetune_recipe(CFG, blobs.X.shape[0], X.shape[0])  # the "finetune" default
    expected = fit(copy.deepcopy(blobs_logreg), X, T, cfg, 0, "cpu", False)
    torch.testing.assert_close(
        ref.flat_params(new), ref.flat_params(expected), rtol=1e-10, atol=1e-12
    )
    # hard labels: the argmax of theta_+F at the aligned input
    rec_h: dict = {}
    new_h = netmend.treat(
        blobs_logreg, (blobs.X, blobs.y), causes, "align", record=rec_h, hard=True, **kw
    )
    y_all = torch.cat([blobs.y[keep], rec_h["label_after"]])
    expected_h = fit(copy.deepcopy(blobs_logreg), X, y_all, cfg, 0, "cpu", False)
    torch.testing.assert_close(
        ref.flat_params(new_h), ref.flat_params(expected_h), rtol=1e-10, atol=1e-12
    )


def test_align_with_no_causes_is_its_finetune_only_control(ref, blobs, blobs_logreg):
    """The controls call the treatment with no causes: "align" then fine-tunes on D with its
    own labels (nothing to move), exactly fit() from theta_hat on D."""
    record: dict = {}
    kw = dict(l2=L2, train_config=CFG, failures=(blobs.Xf, blobs.yf), **RUN)
    new = netmend.treat(
        blobs_logreg, (blobs.X, blobs.y), [], "align", record=record, allow_no_causes=True, **kw
    )
    assert record["aligned"].shape == (0, *blobs.X.shape[1:]) and record["causes"].numel() == 0
    cfg = finetune_recipe(CFG, blobs.X.shape[0], blobs.X.shape[0])
    T = torch.eye(3, dtype=DT)[blobs.y]
    expected = fit(copy.deepcopy(blobs_logreg), blobs.X, T, cfg, 0, "cpu", False)
    torch.testing.assert_close(
        ref.flat_params(new), ref.flat_params(expected), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize(
    "layers, changed",
    [
        (None, {"net.5"}),
        (2, {"net.3", "net.5"}),
        (["net.1"], {"net.1"}),
        ("all", {"net.1", "net.3", "net.5"}),
    ],
)
def test_only_the_chosen_layers_change(ref, blobs, blobs_mlp, layers, changed):
    before = ref.state_hash(blobs_mlp)
    new = netmend.treat(
        blobs_mlp,
        (blobs.X, blobs.y),
        _causes(blobs),
        "align",
        l2=L2,
        train_config=CFG,
        failures=(blobs.Xf, blobs.yf),
        layers=layers,
        **RUN,
    )
    assert ref.state_hash(blobs_mlp) == before
    after = ref.state_hash(new)
    differ = {name.rsplit(".", 1)[0] for name in before if before[name] != after[name]}
    assert differ == changed
    assert all(p.requires_grad for p in new.parameters())


def test_fitting_theta_plus_f_from_failures_equals_passing_it(ref, blobs, blobs_logreg):
    ident = netmend.identify(
        blobs_logreg, (blobs.X, blobs.y), (blobs.Xf, blobs.yf), "ewc", 12, l2=L2, **RUN
    )
    kw = dict(l2=L2, train_config=CFG, source="theta_plus_f", **RUN)
    for method in ("align", "relabel"):
        a = netmend.treat(
            blobs_logreg,
            (blobs.X, blobs.y),
            ident.causes,
            method,
            theta_plus_f=ident.info["theta_plus_f"],
            **kw,
        )
        b = netmend.treat(
            blobs_logreg,
            (blobs.X, blobs.y),
            ident.causes,
            method,
            failures=(blobs.Xf, blobs.yf),
            **kw,
        )
        torch.testing.assert_close(ref.flat_params(a), ref.flat_params(b), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- relabel


def test_relabel_changes_exactly_the_causes_theta_plus_f_disagrees_with(ref, blobs, blobs_logreg):
    ident = netmend.identify(
        blobs_logreg, (blobs.X, blobs.y), (blobs.Xf, blobs.yf), "ewc", 12, l2=L2, **RUN
    )
    theta_f = ident.info["theta_plus_f"]
    causes = _causes(blobs)
    record: dict = {}
    new = netmend.treat(
        blobs_logreg,
        (blobs.X, blobs.y),
        causes,
        "relabel",
        l2=L2,
        train_config=CFG,
        theta_plus_f=theta_f,
        record=record,
        source="theta_plus_f",
        **RUN,
    )
    with torch.no_grad():
        pred_f = _at(ref, blobs_logreg, theta_f)(blobs.X).argmax(1)
    c = torch.as_tensor(causes)
    expected_changed = pred_f[c] != blobs.y[c]
    assert 0 < int(expected_changed.sum()) < len(causes), "the test needs both kinds of cause"
    torch.testing.assert_close(record["changed"], expected_changed)
    assert record["n_changed"] == int(expected_changed.sum())
    torch.testing.assert_close(record["old_labels"], blobs.y[c])
    torch.testing.assert_close(record["new_labels"], pred_f[c])
    pairs: dict = {}
    for o, n in zip(blobs.y[c][expected_changed].tolist(), pred_f[c][expected_changed].tolist()):
        pairs[(o, n)] = pairs.get((o, n), 0) + 1
    assert record["transitions"] == pairs
    # the fine-tune saw every training example with exactly these labels
    y_new = blobs.y.clone()
    y_new[c] = torch.where(expected_changed, pred_f[c], blobs.y[c])
    cfg = finetune_recipe(CFG, blobs.X.shape[0], blobs.X.shape[0])
    expected = fit(copy.deepcopy(blobs_logreg), blobs.X, y_new, cfg, 0, "cpu", False)
    torch.testing.assert_close(
        ref.flat_params(new), ref.flat_params(expected), rtol=1e-10, atol=1e-12
    )


def test_soft_relabel_uses_theta_plus_f_distribution(ref, blobs, blobs_logreg):
    ident = netmend.identify(
        blobs_logreg, (blobs.X, blobs.y), (blobs.Xf, blobs.yf), "ewc", 12, l2=L2, **RUN
    )
    theta_f = ident.info["theta_plus_f"]
    causes = _causes(blobs)
    record: dict = {}
    new = netmend.treat(
        blobs_logreg,
        (blobs.X, blobs.y),
        causes,
        "relabel",
        l2=L2,
        train_config=CFG,
        theta_plus_f=theta_f,
        record=record,
        hard=False,
        temperature=0.5,
        source="theta_plus_f",
        **RUN,
    )
    c = torch.as_tensor(causes)
    with torch.no_grad():
        probs = torch.softmax(_at(ref, blobs_logreg, theta_f)(blobs.X[c]) / 0.5, 1)
    torch.testing.assert_close(record["soft_labels"], probs, rtol=1e-12, atol=1e-14)
    T = torch.eye(3, dtype=DT)[blobs.y]
    T[c] = probs
    cfg = finetune_recipe(CFG, blobs.X.shape[0], blobs.X.shape[0])
    expected = fit(copy.deepcopy(blobs_logreg), blobs.X, T, cfg, 0, "cpu", False)
    torch.testing.assert_close(
        ref.flat_params(new), ref.flat_params(expected), rtol=1e-10, atol=1e-12
    )


# ----------------------------------------------------------------------------- both


@pytest.mark.parametrize("method", ["align", "relabel"])
def test_user_model_untouched_and_deterministic(ref, blobs, blobs_mlp, method):
    before = ref.state_hash(blobs_mlp)
    kw = dict(l2=L2, train_config=CFG, failures=(blobs.Xf, blobs.yf), **RUN)
    a = netmend.treat(blobs_mlp, (blobs.X, blobs.y), _causes(blobs), method, seed=3, **kw)
    b = netmend.treat(blobs_mlp, (blobs.X, blobs.y), _causes(blobs), method, seed=3, **kw)
    c = netmend.treat(blobs_mlp, (blobs.X, blobs.y), _causes(blobs), method, seed=4, **kw)
    assert ref.state_hash(blobs_mlp) == before
    assert ref.state_hash(a) == ref.state_hash(b)
    assert ref.state_hash(a) != ref.state_hash(c)
    assert ref.state_hash(a) != before
    assert not a.training


@pytest.mark.parametrize(
    "method, opts, match",
    [
        ("align", {"norm": "l1"}, "norm"),
        ("align", {"clip": "box"}, "clip"),
        ("align", {"eps": -1.0}, "eps"),
        ("align", {"steps": -1}, "steps"),
        ("align", {"steps": 2.5}, "steps"),
        ("align", {"step_size": 0.0}, "step_size"),
        ("align", {"temperature": 0.0}, "temperature"),
        ("align", {"hard": "yes"}, "hard"),
        ("align", {"layers": ["nope"]}, "layers"),
        ("align", {"layers": 0}, "layers"),
        ("align", {"epsilon": 0.1}, "unknown option"),
        ("relabel", {"hard": 1}, "hard"),
        ("relabel", {"layers": 7}, "layers"),
        ("relabel", {"steps": 3}, "unknown option"),
    ],
)
def test_bad_options_raise(blobs, blobs_mlp, method, opts, match):
    with pytest.raises(ValueError, match=match):
        netmend.treat(
            blobs_mlp,
            (blobs.X, blobs.y),
            _causes(blobs),
            method,
            failures=(blobs.Xf, blobs.yf),
            l2=L2,
            **opts,
            **RUN,
        )


@pytest.mark.parametrize("method", ["align", "relabel"])
def test_needs_failures_or_theta_plus_f(blobs, blobs_mlp, method):
    with pytest.raises(ValueError, match="failures="):
        netmend.treat(
            blobs_mlp, (blobs.X, blobs.y), _causes(blobs), method, source="theta_plus_f", **RUN
        )
    with pytest.raises(ValueError, match="theta_plus_f"):
        netmend.treat(
            blobs_mlp,
            (blobs.X, blobs.y),
            _causes(blobs),
            method,
            theta_plus_f=torch.zeros(5, dtype=DT),
            **RUN,
        )
    with pytest.raises(ValueError, match="input shape"):
        netmend.treat(
            blobs_mlp,
            (blobs.X, blobs.y),
            _causes(blobs),
            method,
            failures=(torch.zeros(2, 3, dtype=DT), torch.zeros(2, dtype=torch.long)),
            **RUN,
        )


def test_repair_passes_failures_and_theta_plus_f(blobs, blobs_logreg):
    assert {"align", "relabel"} <= set(treat_available())
    res = netmend.repair(
        blobs_logreg,
        (blobs.X, blobs.y),
        (blobs.Xf, blobs.yf),
        treat="relabel",
        k=12,
        l2=L2,
        train_config=CFG,
        treat_options={"source": "theta_plus_f"},
        progress=False,
        device="cpu",
    )
    assert res.treatment_info["n_changed"] > 0
    direct = netmend.treat(
        blobs_logreg,
        (blobs.X, blobs.y),
        res.causes,
        "relabel",
        l2=L2,
        train_config=CFG,
        theta_plus_f=res.identification.info["theta_plus_f"],
        source="theta_plus_f",
        **RUN,
    )
    for p, q in zip(res.model.parameters(), direct.parameters()):
        assert torch.equal(p, q)
    # an identification without theta_+F: the treatment fits it from the failures
    res2 = netmend.repair(
        blobs_logreg,
        (blobs.X, blobs.y),
        (blobs.Xf, blobs.yf),
        identify="loss",
        treat="align",
        k=12,
        l2=L2,
        train_config=CFG,
        progress=False,
        device="cpu",
    )
    assert res2.treatment_info["aligned"].shape == (12, 2)


# ----------------------------------------------------------------------------- align vs delete


def _digits_run(seed: int) -> dict[str, dict[str, float]]:
    """Digits with the paper's 1<->7 / 6<->9 flips; causes = EWC top K with K = #flips, about
    half of them clean; every treatment fine-tunes for 3 epochs. Returns, per treatment, the
    test accuracy and the test accuracy on the clean causes' classes (each clean cause weighs
    its class in)."""
    train, test = load_digits(seed=seed)
    noisy = pair_flips(train.y, seed=seed)
    cfg = TrainConfig(epochs=40, batch_size=64, lr=3e-3)
    torch.manual_seed(seed)
    model = fit(MLP(64, 10, hidden=(64,)), train.X, noisy.labels, cfg, seed, "cpu", False)
    split = split_failures(model, test.X, test.y, seed=seed)
    q = torch.as_tensor(split.query)
    flipped = noisy.mask.numpy()
    ident = netmend.identify(
        model,
        (train.X, noisy.labels),
        (test.X[q], test.y[q]),
        "ewc",
        int(flipped.sum()),
        seed=seed,
        **RUN,
    )
    clean = ident.causes[~flipped[ident.causes]]
    assert 0.3 < clean.size / ident.causes.size < 0.7
    weights = np.bincount(train.y.numpy()[clean], minlength=10)

    def score(m: nn.Module) -> dict[str, float]:
        pred = predict(m, test.X)
        acc = np.array([float((pred[test.y == c] == c).float().mean()) for c in range(10)])
        return {
            "clean_class_acc": float((weights * acc).sum() / weights.sum()),
            "test_acc": float((pred == test.y).float().mean()),
        }

    out = {}
    for method in ("finetune", "relabel", "align"):
        new = netmend.treat(
            model,
            (train.X, noisy.labels),
            ident.causes,
            method,
            seed=seed,
            train_config=cfg,
            fisher=ident.fisher,
            theta_plus_f=ident.info["theta_plus_f"],
            epochs=3.0,
            **RUN,
        )
        out[method] = score(new)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_align_and_relabel_keep_the_clean_causes_class_better_than_deleting(seed):
    """With half the causes clean, deleting them (fine-tune on D minus C) costs their classes
    most of their accuracy; correcting them costs far less. Over seeds 0-9 the smallest gains
    were 0.02 (relabel, default "knn" source; 0.23 with source="theta_plus_f", which
    corrects fewer flipped causes) and 0.18 (align), 0.65-0.79 on seeds 0 and 1, and both
    beat deletion on test accuracy every time (benchmarks/align_vs_delete.py --epochs 3)."""
    r = _digits_run(seed)
    for method in ("relabel", "align"):
        assert r[method]["clean_class_acc"] > r["finetune"]["clean_class_acc"] + 0.1, r
        assert r[method]["test_acc"] > r["finetune"]["test_acc"], r
