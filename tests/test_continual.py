"""Continual repair (netmend.continual.Repairer) against the one-shot API it must reproduce."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from torch import nn

import netmend
from netmend import api
from netmend.continual import Repairer
from netmend.identification import class_capped
from netmend.identification.label_gate import label_gate
from netmend.lab.models import MLP
from netmend.model.training import TrainConfig, fit, predict

RECIPE = TrainConfig(epochs=20, batch_size=32, lr=0.02)


@pytest.fixture(scope="module")
def problem():
    """Three noisy Gaussian classes, an MLP trained on flipped labels, its test failures."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1.2, (3, 5))

    def draw(n):
        y = rng.integers(0, 3, n)
        return torch.from_numpy(centres[y] + rng.normal(0, 1.0, (n, 5))), torch.from_numpy(y)

    X, y = draw(240)
    noisy = torch.where(torch.from_numpy(rng.random(240) < 0.2), (y + 1) % 3, y)
    Xt, yt = draw(400)
    torch.manual_seed(0)
    model = fit(MLP(5, 3, (8,)).double(), X, noisy, RECIPE, seed=0, progress=False).eval()
    wrong = torch.nonzero(predict(model, Xt) != yt).flatten()
    assert wrong.numel() >= 16
    return model, (X, noisy), (Xt[wrong], yt[wrong]), (Xt, yt)


def _repairer(problem, **kw):
    model, train, _, test = problem
    return Repairer(model, train, train_config=RECIPE, device="cpu", progress=False,
                    eval_sets={"test": test}, **kw)  # fmt: skip


def test_first_round_is_the_one_shot_repair(problem):
    model, train, (Xf, yf), _ = problem
    before = [p.detach().clone() for p in model.parameters()]
    r = _repairer(problem)
    repaired = r.observe((Xf, yf))
    ref = netmend.repair(model, train, (Xf, yf), train_config=RECIPE, device="cpu",
                         progress=False)  # fmt: skip
    np.testing.assert_allclose(r.scores, ref.scores, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(r.causes, ref.causes)
    for a, b in zip(repaired.parameters(), ref.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)  # the user's model is untouched


def test_rounds_add_the_new_failures_scores_and_reuse_the_fisher(problem, monkeypatch):
    model, train, (Xf, yf), _ = problem
    r = _repairer(problem, k=10)
    batches = [slice(0, 5), slice(5, 9), slice(9, None)]
    r.observe((Xf[batches[0]], yf[batches[0]]))

    def no_fisher(*a, **k):
        raise AssertionError("the Fisher is recomputed in a later round")

    monkeypatch.setattr("netmend.identification.base.fisher_diag_sum", no_fisher)
    for b in batches[1:]:
        r.observe((Xf[b], yf[b]))
    monkeypatch.undo()
    fisher = r.fisher
    expected = sum(
        netmend.identify(model, train, (Xf[b], yf[b]), "ewc", k=1, device="cpu", progress=False,
                         fisher=fisher).scores
        for b in batches
    )  # fmt: skip
    np.testing.assert_allclose(r.scores, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(r.causes, np.argsort(-expected, kind="stable")[:10])
    h = r.history
    assert [e["round"] for e in h] == [1, 2, 3] and [e["failures"] for e in h] == [5, 9, len(yf)]
    assert "fisher" in h[0]["seconds"] and "fisher" not in h[1]["seconds"]
    causes: set[int] = set()
    for e in h:  # the history's additions and restorations replay to the final causes
        assert not set(e["added"]) & causes and set(e["restored"]) <= causes
        causes = (causes | set(e["added"])) - set(e["restored"])
    assert causes == set(r.causes.tolist())
    assert all(0 <= e["accuracy"]["test"] <= 1 for e in h)
    ok = (predict(r.model, Xf) == yf).numpy()
    assert h[-1]["fixed"] == np.flatnonzero(ok).tolist()


def test_a_state_saved_with_k_auto_by_0_3_6_resumes(problem, tmp_path, monkeypatch):
    """0.3.6 saved k="auto" as given; 0.3.7 saves the default's name, None, and must still
    resume the folders 0.3.6 wrote (a review)."""
    model, train, (Xf, yf), _ = problem
    a = _repairer(problem, k="auto")
    a.observe((Xf[:8], yf[:8]))
    plain = Repairer._fingerprint
    monkeypatch.setattr(Repairer, "_fingerprint", lambda self: {**plain(self), "k": "auto"})
    a.save(tmp_path / "state")
    monkeypatch.undo()
    for k in ("auto", None):
        b = Repairer.load(tmp_path / "state", model, train, k=k, train_config=RECIPE,
                          device="cpu", progress=False)  # fmt: skip
        assert [h["k"] for h in b.history] == [h["k"] for h in a.history] == [a.causes.size]


def test_a_save_writes_the_model_and_the_state_as_one(problem, tmp_path):
    """save() wrote model.safetensors, then state.safetensors: interrupted between them, or
    saved over by a Repairer with no model, a load paired one round's model with another's
    state (an outside-in trial)."""
    model, train, (Xf, yf), _ = problem
    a = _repairer(problem)
    a.observe((Xf[:8], yf[:8]))
    a.save(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "history.json",
        "state.safetensors",
    ]
    b = Repairer.load(tmp_path / "s", model, train, train_config=RECIPE, device="cpu",
                      progress=False)  # fmt: skip
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)
    _repairer(problem).save(tmp_path / "s")  # no round yet: no model either
    c = Repairer.load(tmp_path / "s", model, train, train_config=RECIPE, device="cpu",
                      progress=False)  # fmt: skip
    assert c.history == [] and c.model is None


def test_save_load_continues_exactly(problem, tmp_path):
    model, train, (Xf, yf), _ = problem
    a = _repairer(problem, treat="relabel")
    a.observe((Xf[:8], yf[:8]))
    a.save(tmp_path / "state")
    a.observe((Xf[8:], yf[8:]))
    kw = dict(treat="relabel", train_config=RECIPE, device="cpu", progress=False)
    with pytest.warns(UserWarning, match=r"evaluated every round on eval_sets \['test'\]"):
        Repairer.load(tmp_path / "state", model, train, **kw)  # dropped them, silently
    b = Repairer.load(tmp_path / "state", model, train, eval_sets={"test": problem[3]}, **kw)
    assert b.history == a.history[:1]
    assert b.last_round_was((Xf[:8], yf[:8])) and not b.last_round_was((Xf[8:], yf[8:]))
    b.observe((Xf[8:], yf[8:]))
    assert b.last_round_was((Xf[8:], yf[8:])) and not b.last_round_was((Xf[:8], yf[:8]))
    assert not b.last_round_was((Xf[:12], yf[:12]))  # part of the last round's batch
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(b.causes, a.causes)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert (tmp_path / "state" / "history.json").is_file()
    with pytest.raises(ValueError, match=r"other seed \(0 there, 1 here\)"):
        Repairer.load(tmp_path / "state", model, train, treat="relabel", seed=1)
    with pytest.raises(ValueError, match="no continual-repair state"):
        Repairer.load(tmp_path, model, train)
    # k="auto" names the default k=None: netmend repair --resume --k auto was refused
    c = Repairer.load(tmp_path / "state", model, train, treat="relabel", k="auto",
                      train_config=RECIPE, device="cpu", progress=False)  # fmt: skip
    assert c.history == a.history[:1]
    # the treatment's recipe is a setting too (netmend repair --resume --lr 0.01 was taken)
    faster = dataclasses.replace(RECIPE, lr=RECIPE.lr * 10)
    with pytest.raises(
        ValueError, match=r"saved with other train_config \(\{'lr': 0\.0\d+\} there"
    ):
        Repairer.load(tmp_path / "state", model, train, treat="relabel", train_config=faster,
                      device="cpu", progress=False)  # fmt: skip


def test_a_rounds_failures_must_look_like_the_training_inputs(problem):
    """uint8 failures for a float model were refused by the first run but reached the model
    in a continual round, which failed inside torch (an internal error in the CLI)."""
    _, _, (Xf, yf), _ = problem
    rep = _repairer(problem)
    rep.observe((Xf[:8], yf[:8]))
    with pytest.raises(ValueError, match="failures have inputs int but train has real"):
        rep.observe(((Xf[8:] * 50).clamp(0, 255).to(torch.uint8), yf[8:]))


def test_bad_settings_refused(problem):
    model, train, _, _ = problem
    with pytest.raises(ValueError, match="continue_fraction"):
        Repairer(model, train, continue_fraction=0)
    with pytest.raises(ValueError, match="unknown identify option"):
        Repairer(model, train, identify_options={"stepz": 3})


def test_adopting_a_one_shot_repair_continues_like_round_one(problem):
    model, train, (Xf, yf), _ = problem
    a = _repairer(problem)
    a.observe((Xf[:8], yf[:8]))
    halves_1 = a._halves.copy()
    a.observe((Xf[8:], yf[8:]))
    ref = netmend.repair(model, train, (Xf[:8], yf[:8]), train_config=RECIPE, device="cpu",
                         progress=False)  # fmt: skip
    b = _repairer(problem)
    b.adopt((Xf[:8], yf[:8]), ref.scores, ref.causes, ref.model)
    np.testing.assert_allclose(b._halves, halves_1, rtol=1e-9, atol=1e-12)
    b.observe((Xf[8:], yf[8:]))
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(b.causes, a.causes)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="adopt"):
        b.adopt((Xf[:8], yf[:8]), ref.scores, ref.causes, ref.model)


def test_a_later_batch_joins_the_smaller_half(problem):
    model, train, (Xf, yf), _ = problem
    r = _repairer(problem)
    r.observe((Xf[:7], yf[:7]))  # round 1: in every split, halves of 3 and 4 failures
    assert len(r._half_sizes) == netmend.api.AUTO_K_SPLITS
    assert all(sorted(sizes) == [3, 4] for sizes in r._half_sizes)
    h1, sizes1 = r._halves.copy(), [list(sizes) for sizes in r._half_sizes]
    r.observe((Xf[7:10], yf[7:10]))
    s_b = netmend.identify(model, train, (Xf[7:10], yf[7:10]), "ewc", k=1, device="cpu",
                           progress=False, fisher=r.fisher).scores  # fmt: skip
    for split, (a, b) in enumerate(sizes1):
        small = int(b < a)
        np.testing.assert_allclose(r._halves[split, small], h1[split, small] + s_b, rtol=1e-9,
                                   atol=1e-12)  # fmt: skip
        np.testing.assert_array_equal(r._halves[split, 1 - small], h1[split, 1 - small])
        assert sorted(r._half_sizes[split]) == [4, 6]
    positive = np.flatnonzero(r.scores > 0)
    k, _ = netmend.identification.k_rules.edge_rule(
        list(r._halves[:, 0]), list(r._halves[:, 1]), positive.size
    )
    assert k > 0
    top = np.argsort(-r.scores, kind="stable")[:k]
    capped = class_capped(top, train[1])
    pred = predict(model, train[0][capped])
    gated, info = label_gate(capped, pred, train[1][capped])
    assert info["of"] == capped.size
    np.testing.assert_array_equal(r.causes, gated)


def test_first_round_selects_like_identify_when_the_class_cap_binds(problem, monkeypatch):
    """The automatic K's class cap (at most half of a class) applies to the rounds too."""
    model, train, (Xf, yf), _ = problem
    edge = netmend.identification.k_rules.edge_rule

    def every_positive(a, b, max_k, scores=None):
        return int(max_k), edge(a, b, max_k)[1]  # K = every positive score

    monkeypatch.setattr(netmend.identification.k_rules, "edge_rule", every_positive)
    r = _repairer(problem)
    r.observe((Xf, yf))
    ref = netmend.identify(model, train, (Xf, yf), device="cpu", progress=False)
    assert ref.info["auto_k"]["uncapped_k"] > ref.causes.size  # the cap binds
    np.testing.assert_array_equal(r.causes, ref.causes)
    assert r.history[0]["selection"]["uncapped_k"] == ref.info["auto_k"]["uncapped_k"]
    y = train[1].numpy()
    assert max(np.mean(np.isin(np.flatnonzero(y == c), r.causes)) for c in range(3)) <= 0.5


def test_first_round_selects_like_identify_when_the_halves_agree_on_nothing(problem, monkeypatch):
    """The fallback after halves that agree on nothing (per-failure top culprits with a
    positive summed score) is identify's, so round 1 is still the one-shot selection."""
    model, train, (Xf, yf), _ = problem
    edge = netmend.identification.k_rules.edge_rule

    def nothing(a, b, max_k, scores=None):
        return 0, edge(a, b, max_k)[1]

    monkeypatch.setattr(netmend.identification.k_rules, "edge_rule", nothing)
    r = _repairer(problem)
    r.observe((Xf, yf))
    with pytest.warns(UserWarning, match="agree on no culprits"):
        ref = netmend.identify(model, train, (Xf, yf), device="cpu", progress=False)
    assert ref.causes.size > 0 and (ref.scores[ref.causes] > 0).all()
    np.testing.assert_array_equal(r.causes, ref.causes)


def test_first_round_with_few_failures_takes_each_failures_top_culprits(problem):
    model, train, (Xf, yf), _ = problem
    r = _repairer(problem)
    r.observe((Xf[:3], yf[:3]))
    with pytest.warns(UserWarning, match="only 3 failure"):
        ref = netmend.identify(model, train, (Xf[:3], yf[:3]), device="cpu", progress=False)
    assert 0 < ref.causes.size <= 15
    np.testing.assert_array_equal(r.causes, ref.causes)


def test_a_warm_round_mixes_the_previous_model_with_its_fine_tune(problem):
    import copy
    import math

    from netmend.continual import warm_mix

    model, train, (Xf, yf), _ = problem
    r = _repairer(problem, k=10)
    r.observe((Xf[:8], yf[:8]))
    previous = copy.deepcopy(r.model)
    r.observe((Xf[8:], yf[8:]))
    w = warm_mix(0.25)
    assert w == pytest.approx(0.4) and r.history[1]["seconds"]["treat"] > 0
    assert (1 - w) ** 2 + w**2 / 0.25 == pytest.approx(1.0)  # the first round's noise
    tuned = netmend.treat(
        previous, train, r.causes, "finetune", train_config=RECIPE, seed=1, device="cpu",
        progress=False, steps=math.ceil(0.25 * r._first_steps), failures=(Xf, yf),
    )  # fmt: skip
    for p, a, b in zip(r.model.parameters(), previous.parameters(), tuned.parameters()):
        torch.testing.assert_close(p, (1 - w) * a + w * b, rtol=1e-9, atol=1e-12)
    assert not any(torch.equal(p, b) for p, b in zip(r.model.parameters(), tuned.parameters()))
    one = _repairer(problem, k=10, mix=1.0)  # no mixing: the fine-tune itself
    one.observe((Xf[:8], yf[:8]))
    one.observe((Xf[8:], yf[8:]))
    for p, b in zip(one.model.parameters(), tuned.parameters()):
        torch.testing.assert_close(p, b, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="mix"):
        _repairer(problem, mix=0)


def test_every_round_runs_the_class_guard_with_the_rounds_own_treatment_call(problem, monkeypatch):
    """As netmend.repair: the automatic K with "finetune" is cut to the guard's K; the guard's
    trials make the round's treatment call with only the causes changed."""
    from netmend.treatment import guard as guard_mod

    model, _, (Xf, yf), _ = problem
    calls = []

    def halving(treat_fn, original, train, causes, seed, device, guard_data=None):  # noqa: ANN001, ANN202
        assert original is r._work
        k = len(causes) // 2
        calls.append((treat_fn(causes[:k]), causes.copy()))  # a trial on the kept causes
        return guard_mod.GuardRecord(len(causes), k, passed=True)

    monkeypatch.setattr("netmend.continual.guard_k", halving)
    r = _repairer(problem)
    r.observe((Xf[:8], yf[:8]))
    trial, full = calls[-1]
    assert full.size >= 2
    np.testing.assert_array_equal(r.causes, full[: full.size // 2])
    assert r.history[-1]["k"] == r.causes.size
    assert r.history[-1]["selection"]["guard"]["k"] == full.size // 2
    # a trial on the round's causes is the round's own model, parameter for parameter
    for p, q in zip(trial.parameters(), r.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    r.observe((Xf[8:], yf[8:]))  # a warm round runs it too, against the original model
    trial, full = calls[-1]
    assert len(calls) == 2 and r.history[-1]["selection"]["guard"]["k"] == full.size // 2
    for p, q in zip(trial.parameters(), r.model.parameters(), strict=True):  # warm, mixed
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)

    n = len(calls)
    _repairer(problem, k=10).observe((Xf[:8], yf[:8]))  # an explicit k: no guard
    _repairer(problem, treat="relabel").observe((Xf[:8], yf[:8]))  # not a fine-tune: none
    assert len(calls) == n
    with pytest.raises(ValueError, match="class guard works with the 'finetune' treatment"):
        _repairer(problem, treat="relabel", guard=True)


def test_the_real_guard_says_when_it_cannot_judge_a_small_training_set(problem):
    model, _, (Xf, yf), _ = problem
    r = _repairer(problem)
    r.observe((Xf[:8], yf[:8]))
    g = r.history[-1]["selection"]["guard"]
    assert g["skipped"] and "50 examples" in g["skipped"] and g["k"] == r.causes.size


def test_the_label_gate_follows_identify_and_can_be_turned_off(problem):
    """Round 1 selects what netmend.identify selects with the same gate setting: on with the
    automatic K, off with gate=False (netmend repair --no-gate), on an explicit k with True."""
    model, train, (Xf, yf), _ = problem
    kw = dict(device="cpu", progress=False)
    for gate, k in ((None, None), (False, None), (True, 10)):
        r = _repairer(problem, gate=gate, k=k, guard=False)
        r.observe((Xf, yf))
        ref = netmend.identify(model, train, (Xf, yf), "ewc", k=k, gate=gate, **kw)
        np.testing.assert_array_equal(r.causes, ref.causes)
        assert r.history[-1]["selection"].get("label_gate") == ref.info.get("label_gate")
    assert ref.info["label_gate"]["applied"]  # the gate changes the selection here
    off = _repairer(problem, gate=False, guard=False)
    off.observe((Xf, yf))
    on = _repairer(problem, guard=False)
    on.observe((Xf, yf))
    assert on.history[-1]["selection"]["label_gate"]["applied"]
    assert on.causes.size < off.causes.size


def test_with_guard_data_a_round_is_the_guards_accepted_trial(problem, monkeypatch, tmp_path):
    """Round 1 with a validation split is netmend.repair(..., guard_data=...): the same causes
    and model. Each round makes one treatment call per guard trial and none after (the
    accepted trial is the round's model); a saved state resumes exactly, and only with the
    same split."""
    import netmend.api as api_mod

    model, train, (Xf, yf), test = problem
    calls: list[int] = []
    real = api_mod.treat

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(api_mod, "treat", counted)
    r = _repairer(problem, guard_data=test)
    r.observe((Xf[:8], yf[:8]))
    g = r.history[-1]["selection"]["guard"]
    assert g["source"] == "guard_data" and not g["skipped"] and g["holdout"] == len(test[1])
    assert len(calls) == len(g["tries"]) + (g["churn"] is not None)
    monkeypatch.setattr(api_mod, "treat", real)
    ref = netmend.repair(model, train, (Xf[:8], yf[:8]), train_config=RECIPE, device="cpu",
                         progress=False, guard_data=test)  # fmt: skip
    np.testing.assert_array_equal(r.causes, ref.causes)
    for a, b in zip(r.model.parameters(), ref.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert r._first_steps is not None  # set as the round's own treatment call sets it
    r.save(tmp_path / "state")
    r.observe((Xf[8:], yf[8:]))  # a warm round, guarded on the split as well
    assert r.history[-1]["selection"]["guard"]["source"] == "guard_data"
    kw = dict(train_config=RECIPE, device="cpu", progress=False, eval_sets={"test": test})
    b = Repairer.load(tmp_path / "state", model, train, guard_data=test, **kw)
    b.observe((Xf[8:], yf[8:]))
    np.testing.assert_array_equal(b.causes, r.causes)
    for p, q in zip(b.model.parameters(), r.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="guard_data"):
        Repairer.load(tmp_path / "state", model, train, **kw)  # without the split
    with pytest.raises(ValueError, match="guard_data is read only by the class guard"):
        _repairer(problem, guard=False, guard_data=test)
    with pytest.raises(ValueError, match="finetune"):
        _repairer(problem, treat="relabel", guard_data=test)


class _Counted(torch.utils.data.Dataset):
    """A map-style Dataset yielding ``(label, x)`` (labels first) that counts its reads."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y, self.reads = X, y, 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):  # noqa: ANN204
        self.reads += 1
        return self.y[i], self.X[i]


class _LabelsFirst(netmend.data.task.ClassificationTask):
    def inputs_and_labels(self, batch):  # noqa: ANN001, ANN201
        return batch[1], torch.as_tensor(batch[0])


def test_a_streamed_dataset_and_a_task_repair_like_tensors(problem, tmp_path):
    """The Repairer reads a map-style Dataset in batches through the task (it once read the
    whole training set into one tensor and took no task=), with the same rounds as tensors,
    and saves and resumes with it."""
    model, (X, y), (Xf, yf), test = problem
    ref = _repairer(problem)
    data = _Counted(X, y)
    kw = dict(train_config=RECIPE, device="cpu", progress=False, task=_LabelsFirst())
    got = Repairer(model, data, eval_sets={"test": _Counted(*test)}, **kw)
    for part in (slice(0, 8), slice(8, None)):
        ref.observe((Xf[part], yf[part]))
        got.observe(_Counted(Xf[part], yf[part]))
        np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(got.causes, ref.causes)
        assert got.history[-1]["accuracy"] == ref.history[-1]["accuracy"]
    assert data.reads > 3 * len(y)  # read again on every pass: never kept as one tensor
    got.save(tmp_path / "state")
    again = Repairer.load(tmp_path / "state", model, data, eval_sets={"test": test}, **kw)
    np.testing.assert_array_equal(again.causes, got.causes)
    with pytest.raises(ValueError, match=r"Task.inputs override.*twice"):

        class Scaled(netmend.data.task.ClassificationTask):
            def inputs(self, x):  # noqa: ANN001, ANN201
                return x * 2

        Repairer(model, (X, y), task=Scaled())


def test_a_damaged_state_says_to_start_again_not_to_rerun(problem, tmp_path):
    """A cache's advice ("delete it and rerun: netmend recomputes what is missing") is wrong
    for a round's state, which nothing recomputes (found by an outside-in trial)."""
    from netmend.continual import STATE_FILE

    model, train, (Xf, yf), _ = problem
    r = _repairer(problem)
    r.observe((Xf[:8], yf[:8]))
    r.save(tmp_path / "state")
    f = tmp_path / "state" / STATE_FILE
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0xFF  # a flipped byte in the tensors
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"checksum.*cannot be recomputed: start a new run") as e:
        Repairer.load(tmp_path / "state", model, train, train_config=RECIPE, device="cpu")
    assert "recomputes what is missing" not in str(e.value)


def test_a_failure_observed_before_counts_once(problem):
    """A batch that repeats earlier failures would add their scores to the sum twice (found
    by an outside-in trial): a wholly repeated batch is refused, a partly repeated one is
    scored on its new failures only, with a warning naming the repeats. The same input with
    another label is a new failure."""
    model, train, (Xf, yf), _ = problem
    r = _repairer(problem, k=10)
    r.observe((Xf[:6], yf[:6]))
    before = r.scores.copy()
    with pytest.raises(ValueError, match="all 6 failures of this batch were observed"):
        r.observe((Xf[:6], yf[:6]))
    np.testing.assert_array_equal(r.scores, before)  # a refused batch changes nothing
    assert len(r.history) == 1
    mixed = (torch.cat([Xf[3:5], Xf[6:9]]), torch.cat([yf[3:5], yf[6:9]]))
    with pytest.warns(UserWarning, match=r"2 of 5 failures \(rows \[0, 1\]\) were observed"):
        r.observe(mixed)
    expected = before + netmend.identify(
        model, train, (Xf[6:9], yf[6:9]), "ewc", k=1, device="cpu", progress=False,
        fisher=r.fisher,
    ).scores  # fmt: skip
    np.testing.assert_allclose(r.scores, expected, rtol=1e-9, atol=1e-12)
    assert r.history[-1]["new_failures"] == 3 and r.history[-1]["failures"] == 9
    assert torch.equal(r.failures[0], Xf[:9]) and torch.equal(r.failures[1], yf[:9])
    # another label for an input seen before is not a repeat (the model gets it wrong too)
    wrong = predict(model, Xf[:1])
    other = torch.tensor([next(c for c in range(3) if c not in (int(yf[0]), int(wrong[0])))])
    r.observe((Xf[:1], other))
    assert r.history[-1]["new_failures"] == 1


def test_control_repeats_the_rounds_own_call_with_only_the_causes_changed(problem):
    """A warm round starts from the previous model, runs a fraction of the first round's
    steps and mixes: its controls must be that call, not a fresh fine-tune of the original
    (the CLI's were, found by an outside-in trial). Given the round's own causes, the
    control call rebuilds the round's model exactly."""
    _, _, (Xf, yf), _ = problem
    r = _repairer(problem, k=10)
    with pytest.raises(ValueError, match="no treatment call to repeat"):
        r.control(np.arange(3))
    r.observe((Xf[:6], yf[:6]))
    first = r.model
    r.observe((Xf[6:12], yf[6:12]))
    assert r.warm_start and r.mix < 1  # a warm, mixed round

    def params(m):
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    assert torch.equal(params(r.control(r.causes)), params(r.model))
    none = r.control(np.zeros(0, dtype=np.int64))
    assert not torch.equal(params(none), params(r.model))
    # warm: the control starts from the previous round's model, not from the original
    fresh = netmend.treat(problem[0], problem[1], np.zeros(0, dtype=np.int64), "finetune",
                          train_config=RECIPE, allow_no_causes=True, device="cpu", progress=False,
                          seed=r.seed + 1)  # fmt: skip
    assert (params(none) - params(first)).norm() < (params(none) - params(fresh)).norm()


def test_a_round_that_fails_midway_leaves_the_state_as_it_was(problem, monkeypatch):
    """observe() added the batch's scores, failures and causes before treating: a treatment
    error or Ctrl-C left them in, and the same batch was then refused as already observed."""
    model, train, (Xf, yf), _ = problem
    plain = _repairer(problem)
    plain.observe((Xf[:8], yf[:8]))
    plain.observe((Xf[8:], yf[8:]))
    rep = _repairer(problem)
    rep.observe((Xf[:8], yf[:8]))
    real = api.treat

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "treat", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rep.observe((Xf[8:], yf[8:]))
    assert len(rep.history) == 1 and len(rep.failures[1]) == 8
    monkeypatch.setattr(api, "treat", real)
    rep.observe((Xf[8:], yf[8:]))  # the same batch again: the round as if never interrupted
    np.testing.assert_array_equal(rep.scores, plain.scores)
    np.testing.assert_array_equal(rep.causes, plain.causes)
    for p, q in zip(rep.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "kw, said",
    [
        (dict(identify_options={"steps": -3}), "steps must be an integer >= 1"),
        (dict(identify_options={"step_size": 0}), "step_size must be a number > 0"),
        (dict(treat_options={"bogus": 1}), "bogus"),
    ],
)
def test_settings_a_round_would_fail_on_are_refused_at_construction(problem, kw, said):
    """steps=-3 gave all-zero scores and no repair, silently; a misspelt treatment option
    failed once a round had scored its failures."""
    with pytest.raises(ValueError, match=re.escape(said)):
        _repairer(problem, **kw)


def test_eval_sets_and_guard_data_are_checked_at_construction(problem):
    model, train, _, (Xt, yt) = problem
    with pytest.raises(ValueError, match="labels must lie in"):
        Repairer(model, train, device="cpu", progress=False, eval_sets={"t": (Xt, yt + 10)})
    with pytest.raises(ValueError, match="input shape"):
        Repairer(model, train, device="cpu", progress=False, guard_data=(Xt[:, :1], yt))


def test_control_and_per_failure_check_their_inputs(problem):
    """control([1.5, 2.0]) trained on causes [1, 2]; per_failure with labels out of range
    was torch's IndexError; a batch holding a failure twice counted it twice."""
    model, train, (Xf, yf), _ = problem
    rep = _repairer(problem)
    rep.observe((Xf[:8], yf[:8]))
    with pytest.raises(TypeError, match="causes must be integer training indices"):
        rep.control(np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="labels must lie in"):
        rep.per_failure((Xf[:3], yf[:3] + 10))
    twice = _repairer(problem)
    with pytest.warns(UserWarning, match="1 of 9 failures repeat others of this batch"):
        twice.observe((torch.cat([Xf[:8], Xf[:1]]), torch.cat([yf[:8], yf[:1]])))
    np.testing.assert_array_equal(twice.scores, rep.scores)


class _MeanOfTokens(nn.Module):
    """Embedding mean over the non-padding tokens (id 0): padding changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 4, padding_idx=0)
        self.out = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = (ids != 0).unsqueeze(-1).to(self.emb.weight.dtype)
        pooled = (self.emb(ids) * keep).sum(1) / keep.sum(1).clamp(min=1)
        return self.out(pooled)


def _pad(X: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(X, (0, width - X.shape[1]), value=0)


def test_token_batches_of_other_widths_are_padded_with_pad_id(tmp_path):
    """A collate_fn pads each batch to its longest sequence: the Repairer refused every batch
    not as wide as the training set's first item. With pad_id it right-pads the failures to
    one width, which a model that ignores padding scores exactly as failures padded first."""
    g = torch.Generator().manual_seed(0)
    n = 150
    lengths = torch.randint(1, 7, (n,), generator=g)
    ids = torch.randint(1, 12, (n, 6), generator=g)
    X = torch.where(torch.arange(6) < lengths[:, None], ids, 0)
    y = (ids[:, 0] % 3).long()
    y[:15] = (y[:15] + 1) % 3  # flipped labels to blame
    torch.manual_seed(0)
    model = fit(_MeanOfTokens().double(), X, y, RECIPE, seed=0, progress=False).eval()
    Xf = torch.where(torch.arange(8) < torch.randint(1, 9, (20,), generator=g)[:, None],
                     torch.randint(1, 12, (20, 8), generator=g), 0)  # fmt: skip
    yf = (Xf[:, 0] % 3).long()
    a, b = (_pad(Xf[:10, :4], 4), yf[:10]), (Xf[10:], yf[10:])  # 4 ids wide, then 8
    kw = dict(train_config=RECIPE, device="cpu", progress=False, k=10, gate=False, guard=False)
    plain = Repairer(model, (X, y), **kw)
    plain.observe(a)
    with pytest.raises(ValueError, match=r"token ids 8 wide and the earlier rounds' 4.*pad_id="):
        plain.observe(b)
    padded = Repairer(model, (X, y), pad_id=0, **kw)
    padded.observe(a)
    padded.observe(b)
    assert padded.failures[0].shape == (20, 8)
    same = Repairer(model, (X, y), pad_id=0, **kw)  # every batch padded to 8 by the user
    same.observe((_pad(a[0], 8), a[1]))
    same.observe(b)
    np.testing.assert_allclose(padded.scores, same.scores, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(padded.causes, same.causes)
    # a batch seen before is known again at its own width; pad_id is a saved setting
    assert padded.last_round_was(b) and not padded.last_round_was(a)
    padded.save(tmp_path / "s")
    with pytest.raises(ValueError, match="pad_id"):
        Repairer.load(tmp_path / "s", model, (X, y), pad_id=3, **kw)
    for bad in (0.5, -1):
        with pytest.raises(TypeError, match="pad_id must be a token id"):
            Repairer(model, (X, y), pad_id=bad, **kw)
    assert Repairer(model, (X, y), pad_id=np.int64(0), **kw).pad_id == 0  # as k takes them


def test_integer_images_of_another_shape_are_still_refused_clearly():
    """Only token ids [n, L] may differ in length: uint8 images of another size passed the
    loosened check and crashed in torch.cat."""
    g = torch.Generator().manual_seed(1)
    X = torch.randint(0, 255, (60, 4, 4), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (60,), generator=g)

    class Scaled(nn.Module):  # uint8 images, scaled in the model
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 3).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x.flatten(1).double() / 255)

    model = Scaled().eval()
    rep = Repairer(model, (X, y), train_config=RECIPE, device="cpu", progress=False, pad_id=0)
    bad = torch.randint(0, 255, (6, 5, 5), generator=g, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"failures have input shape \(5, 5\) but train has"):
        rep.observe((bad, torch.zeros(6, dtype=torch.long)))
