"""The class guard of the automatic K (:mod:`netmend.treatment.guard`): it halves K while a
trial fine-tune, measured on a held-out slice of the training set, loses a class."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import netmend
from netmend.data.source import as_source
from netmend.treatment import guard


class Rule(nn.Module):
    """Predicts the class written in the input's only feature; with ``collapse``, class 0 is
    predicted as class 1 (a fine-tune that forgot class 0)."""

    def __init__(self, collapse: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.collapse = collapse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x[:, 0].long()
        if self.collapse:
            c = torch.where(c == 0, torch.ones_like(c), c)
        return nn.functional.one_hot(c, 3).to(x.dtype) + 0 * self.w


def _train(per_class: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(3).repeat_interleave(per_class)
    return y[:, None].double(), y


def test_holdout_slice_is_stratified_seeded_and_leaves_out_small_classes() -> None:
    y = torch.cat([torch.zeros(2000), torch.ones(2000), torch.full((400,), 2)]).long()
    idx, classes = guard.holdout_slice(y, seed=3)
    assert classes == [0, 1]  # 5% of 400 = 20 < 50 examples: class 2 is not judged
    counts = np.bincount(y[idx].numpy(), minlength=3)
    assert counts.tolist() == [100, 100, 0]
    assert np.array_equal(idx, guard.holdout_slice(y, seed=3)[0])
    assert not np.array_equal(idx, guard.holdout_slice(y, seed=4)[0])
    state = torch.get_rng_state()
    guard.holdout_slice(y, seed=5)
    assert torch.equal(state, torch.get_rng_state())


def test_guard_halves_k_until_no_class_collapses_and_holds_the_slice_out() -> None:
    X, y = _train()
    train = as_source((X, y), "train")
    val, _ = guard.holdout_slice(y, seed=0)
    causes = np.arange(6000)[::-1][:1000].copy()  # any ranked set, most harmful first
    seen: list[np.ndarray] = []

    def treat_fn(c: np.ndarray) -> nn.Module:
        seen.append(c)
        removed = np.setdiff1d(c, val).size
        return Rule(collapse=removed > 300)  # removing more than 300 forgets class 0

    g = guard.guard_k(treat_fn, Rule(), train, causes, seed=0, device="cpu")
    assert [t["k"] for t in g.tries] == [1000, 500, 250]
    assert g.k == 250 and g.passed and g.skipped is None
    assert [t["worst_class"] for t in g.tries] == [0, 0, 0]
    assert g.tries[0]["worst_class_drop"] == pytest.approx(1.0)
    assert g.tries[-1]["worst_class_drop"] == pytest.approx(0.0)
    for c, t in zip(seen, g.tries, strict=True):
        assert np.isin(val, c).all()  # the slice is never fine-tuned on
        assert np.array_equal(np.setdiff1d(c, val), np.setdiff1d(causes[: t["k"]], val))


def test_guard_keeps_the_smallest_k_and_says_so_when_every_halving_fails() -> None:
    X, y = _train()
    with pytest.warns(UserWarning, match="class guard halved K from 64 to 8"):
        g = guard.guard_k(
            lambda c: Rule(collapse=True), Rule(), as_source((X, y), "t"), np.arange(64), 0, "cpu"
        )
    assert not g.passed and g.k == 8 and len(g.tries) == guard.MAX_HALVINGS + 1


class Forget(nn.Module):
    """Predicts the class in the input's first feature, except for the examples whose index
    (the second feature) is in ``forget``: those it calls class 1."""

    def __init__(self, forget: np.ndarray) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.forget = torch.as_tensor(forget, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x[:, 0].long()
        c = torch.where(torch.isin(x[:, 1], self.forget), torch.ones_like(c), c)
        return nn.functional.one_hot(c, 3).to(x.dtype) + 0 * self.w


def _noisy_train() -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """3 x 2,000 examples; half the true class 2 is labelled 0 (so a third of the label-0
    slice is really class 2). Returns X (true class, index), labels, the slice, and the slice's
    true-class-0 examples."""
    true = torch.arange(3).repeat_interleave(2000)
    y = true.clone()
    y[4000:5000] = 0
    X = torch.stack([true.double(), torch.arange(6000).double()], 1)
    val, _ = guard.holdout_slice(y, seed=0)
    return X, y, val, val[true[val].numpy() == 0]


def _causes(val: np.ndarray) -> np.ndarray:
    """1,000 ranked causes outside the slice (so that K of them are removed)."""
    return np.setdiff1d(np.arange(6000), val)[:1000]


def test_guard_reads_the_slice_against_the_original_when_noisy_labels_dilute_a_fall() -> None:
    """A fine-tune that makes the original's class 0 lose 14% of itself (one more point than
    the limit plus margin) shows only about 9 points by the slice's labels, a third of which
    are noisy: the labels alone would keep K; the agreement reading halves it."""
    X, y, val, zeros = _noisy_train()
    label0 = int((y[val] == 0).sum())
    m = int(np.ceil(0.14 * zeros.size))
    assert m / label0 <= guard.MAX_CLASS_DROP < m / zeros.size  # the case this test is about
    calls: list[int] = []

    def treat_fn(c: np.ndarray) -> nn.Module:
        removed = np.setdiff1d(c, val).size
        calls.append(removed)
        return Forget(zeros[:m] if removed > 300 else np.zeros(0))

    g = guard.guard_k(treat_fn, Forget(np.zeros(0)), as_source((X, y), "t"), _causes(val), 0, "cpu")
    assert [t["k"] for t in g.tries] == [1000, 500, 250]
    assert g.k == 250 and g.passed
    first = g.tries[0]
    assert first["label_drop"] == pytest.approx(m / label0)
    assert first["agree_drop"] == pytest.approx(m / zeros.size)
    assert first["worst_class"] == 0 and first["worst_class_drop"] == pytest.approx(m / zeros.size)
    assert g.churn == pytest.approx([0.0, 0.0, 0.0])
    assert calls.count(0) == 1  # the churn trial (no causes removed) ran once


def test_guard_discounts_the_churn_of_the_fine_tune_itself() -> None:
    """When the fine-tune with no causes removed moves class 0 as much, the causes are not to
    blame: K is kept, and the churn is recorded."""
    X, y, val, zeros = _noisy_train()
    m = int(np.ceil(0.14 * zeros.size))
    calls: list[int] = []

    def treat_fn(c: np.ndarray) -> nn.Module:
        calls.append(np.setdiff1d(c, val).size)
        return Forget(zeros[:m])  # the same examples move whatever is removed

    g = guard.guard_k(treat_fn, Forget(np.zeros(0)), as_source((X, y), "t"), _causes(val), 0, "cpu")
    assert g.k == 1000 and g.passed and len(g.tries) == 1
    assert g.churn is not None and g.churn[0] == pytest.approx(m / zeros.size)
    assert g.tries[0]["agree_drop"] == pytest.approx(0.0)
    assert calls == [1000, 0]


def test_guard_needs_no_churn_trial_when_the_agreement_reading_is_within_the_limit() -> None:
    X, y, val, zeros = _noisy_train()
    calls: list[int] = []

    def treat_fn(c: np.ndarray) -> nn.Module:
        calls.append(np.setdiff1d(c, val).size)
        return Forget(zeros[:2])

    g = guard.guard_k(treat_fn, Forget(np.zeros(0)), as_source((X, y), "t"), _causes(val), 0, "cpu")
    assert g.k == 1000 and g.churn is None and calls == [1000]


def test_guard_is_skipped_when_no_class_can_be_judged() -> None:
    X, y = _train(per_class=300)  # 5% = 15 per class
    calls: list[np.ndarray] = []
    src = as_source((X, y), "t")
    # said, with the fix, when the causes hold 10% of a class or more: an outside trial's
    # class fell 20 points behind a silent skip
    many = np.flatnonzero(y.numpy() == 1)[:40]  # 40 of 300
    with pytest.warns(UserWarning, match=r"did not run.*K = 40 causes \(13% of class 1\) was not"):
        g = guard.guard_k(calls.append, Rule(), src, many, 0, "cpu")  # type: ignore[arg-type]
    assert g.skipped and g.k == 40 and not calls
    few = np.flatnonzero(y.numpy() == 1)[:10]  # 3% of the class: cannot empty it, not said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = guard.guard_k(calls.append, Rule(), src, few, 0, "cpu")  # type: ignore[arg-type]
    assert g.skipped and g.k == 10 and not calls


def test_repair_default_guard_on_small_data_changes_nothing(blobs, blobs_logreg) -> None:
    """On a set too small to judge a class, the default repair is the unguarded one."""
    data, failures = (blobs.X, blobs.y), (blobs.Xf, blobs.yf)
    with pytest.warns(UserWarning, match="the class guard did not run"):
        a = netmend.repair(blobs_logreg, data, failures, seed=0, progress=False)
    b = netmend.repair(blobs_logreg, data, failures, seed=0, progress=False, guard=False)
    assert a.treatment_info["guard"]["skipped"]
    assert np.array_equal(a.causes, b.causes)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_repair_with_k_auto_guards_as_the_default_k_does(blobs, blobs_logreg) -> None:
    """k="auto" is the automatic K: the guard (and the gate) run as with k=None."""
    data, failures = (blobs.X, blobs.y), (blobs.Xf, blobs.yf)
    a = netmend.repair(blobs_logreg, data, failures, seed=0, progress=False)
    b = netmend.repair(blobs_logreg, data, failures, seed=0, progress=False, k="auto")
    assert b.treatment_info["guard"] == a.treatment_info["guard"]
    assert b.treatment_info["guard"] is not None
    assert np.array_equal(a.causes, b.causes)


def test_guard_refuses_other_treatments(blobs, blobs_logreg) -> None:
    data, failures = (blobs.X, blobs.y), (blobs.Xf, blobs.yf)
    with pytest.raises(ValueError, match="finetune"):
        netmend.repair(blobs_logreg, data, failures, treat="relabel", guard=True, progress=False)


# ------------------------------------------------------------------ guard_data: the user's split


def test_guard_data_trials_remove_only_the_causes_and_the_accepted_trial_is_kept() -> None:
    """With guard_data no slice is held out: each trial is the treatment call on causes[:K],
    measured on guard_data by its labels, and the model of the accepted K is returned."""
    X, y = _train()
    gX, gy = _train(per_class=60)  # 60 >= MIN_PER_CLASS examples of each class
    seen: list[np.ndarray] = []
    made: list[nn.Module] = []

    def treat_fn(c: np.ndarray) -> nn.Module:
        seen.append(c)
        made.append(Rule(collapse=c.size > 300))
        return made[-1]

    causes = np.arange(6000)[::-1][:1000].copy()
    gd = as_source((gX, gy), "guard_data")
    g = guard.guard_k(treat_fn, Rule(), as_source((X, y), "t"), causes, 0, "cpu", guard_data=gd)
    assert [t["k"] for t in g.tries] == [1000, 500, 250]
    assert g.k == 250 and g.passed and g.source == "guard_data"
    assert g.holdout == 180 and g.judged_classes == [0, 1, 2] and g.churn is None
    for c, t in zip(seen, g.tries, strict=True):
        assert np.array_equal(c, causes[: t["k"]])  # no training example is held out
    assert g.model is made[-1] and len(made) == 3  # no churn trial needed, no retraining
    assert "model" not in g.as_dict() and g.as_dict()["source"] == "guard_data"


def _validation(noisy: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A validation split of 3 x 100 examples (true class, index) with the first ``noisy`` of
    class 2 labelled 0. Returns inputs, labels and true classes."""
    true = torch.arange(3).repeat_interleave(100)
    y = true.clone()
    y[200 : 200 + noisy] = 0
    return torch.stack([true.double(), torch.arange(300).double()], 1), y, true


def test_guard_data_reads_agreement_where_noisy_labels_dilute_a_fall() -> None:
    """A third of the validation split's label-0 examples are class 2: a trial that makes the
    original's class 0 lose 14% of itself reads as 9.3 points by the labels, under the limit.
    The agreement reading sees 14, net of the churn of the finetune-only repair (the trial
    with no causes, run once), and K is halved."""
    X, y, _ = _validation(noisy=50)
    gd = as_source((X, y), "guard_data")
    calls: list[int] = []

    def treat_fn(c: np.ndarray) -> nn.Module:
        calls.append(c.size)
        return Forget(np.arange(14) if c.size > 10 else np.zeros(0))

    train = as_source(_train(), "t")
    g = guard.guard_k(treat_fn, Forget(np.zeros(0)), train, np.arange(50), 0, "cpu", guard_data=gd)
    assert [t["k"] for t in g.tries] == [50, 25, 12, 6] and g.k == 6 and g.passed
    first = g.tries[0]
    assert first["label_drop"] == pytest.approx(14 / 150)  # under the limit
    assert guard.MAX_CLASS_DROP > 14 / 150
    assert first["agree_drop"] == pytest.approx(0.14) and first["worst_class"] == 0
    assert calls == [50, 0, 25, 12, 6]  # the churn trial: no causes removed, once
    assert g.churn == pytest.approx([0.0, 0.0, 0.0])


def test_guard_data_discounts_what_the_fine_tune_itself_changes_and_sees_a_fall() -> None:
    """The original calls 40 of class 0's examples class 1; any fine-tune fixes them (40/140
    of what it called class 1 moves). That is churn, not forgetting: K is kept. A trial that
    breaks 20% of class 2 fails by the labels."""
    X, y, _ = _validation()
    gd = as_source((X, y), "guard_data")
    wrong = np.arange(0, 40)
    original = Forget(wrong)
    train = as_source(_train(), "t")
    g = guard.guard_k(lambda c: Forget(np.zeros(0)), original, train, np.arange(50), 0, "cpu",
                      guard_data=gd)  # fmt: skip
    assert g.passed and g.k == 50 and len(g.tries) == 1
    assert g.tries[0]["label_drop"] == 0.0  # class 0 rose 40 points, no class fell
    assert g.tries[0]["agree_raw_drop"] == pytest.approx(40 / 140)  # what it called class 1
    assert g.churn is not None and g.tries[0]["agree_drop"] == pytest.approx(0.0)

    broken = np.arange(200, 220)  # 20% of class 2, right before, called class 1 after
    g = guard.guard_k(
        lambda c: Forget(np.r_[wrong, broken]) if c.size > 10 else original,
        original, train, np.arange(50), 0, "cpu", guard_data=gd,
    )  # fmt: skip
    assert [t["k"] for t in g.tries] == [50, 25, 12, 6] and g.k == 6 and g.passed
    assert g.tries[0]["worst_class"] == 2 and g.tries[0]["worst_class_drop"] == pytest.approx(0.2)


def test_guard_data_too_small_to_judge_skips_the_guard() -> None:
    X, y = _train()
    gX, gy = _train(per_class=20)
    calls: list[np.ndarray] = []
    gd = as_source((gX, gy), "guard_data")
    with pytest.warns(UserWarning, match=r"did not run.*K = 10 was not checked"):  # not silent
        g = guard.guard_k(calls.append, Rule(), as_source((X, y), "t"), np.arange(10), 0, "cpu",  # type: ignore[arg-type]
                          guard_data=gd)  # fmt: skip
    assert g.skipped and "guard_data" in g.skipped and g.k == 10 and not calls


def test_repair_with_guard_data_returns_the_accepted_trial_and_trains_it_once(
    blobs, blobs_logreg, blobs_validation, monkeypatch
) -> None:
    """The repaired model is the repair's own treatment call on the chosen causes (what the
    controls repeat), made once: the accepted trial is not trained again."""
    import netmend.api as api_mod

    data, failures = (blobs.X, blobs.y), (blobs.Xf, blobs.yf)
    before = [p.detach().clone() for p in blobs_logreg.parameters()]
    calls: list[int] = []
    real = api_mod._treat

    def counted(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(api_mod, "_treat", counted)
    r = netmend.repair(
        blobs_logreg, data, failures, seed=0, progress=False, guard_data=blobs_validation
    )
    g = r.treatment_info["guard"]
    assert g["source"] == "guard_data" and g["holdout"] == 180 and not g["skipped"]
    assert len(calls) == len(g["tries"])  # one treatment call per trial, none after
    again = real(blobs_logreg, data, r.causes, r.treatment, allow_no_causes=True, **r.recipe)
    for p, q in zip(r.model.parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    for p, b in zip(blobs_logreg.parameters(), before, strict=True):
        assert torch.equal(p, b)  # the user's model is untouched


def test_repair_refuses_guard_data_it_would_not_read(
    blobs, blobs_logreg, blobs_validation, monkeypatch
) -> None:
    """Refused before any identification runs (a bad setting costs nothing)."""
    import netmend.api as api_mod

    def never(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("identified before refusing the guard setting")

    monkeypatch.setattr(api_mod, "_identify", never)
    data, failures = (blobs.X, blobs.y), (blobs.Xf, blobs.yf)
    with pytest.raises(ValueError, match="guard_data is read only by the class guard"):
        netmend.repair(
            blobs_logreg, data, failures, guard=False, guard_data=blobs_validation, progress=False
        )
    with pytest.raises(ValueError, match="finetune"):
        netmend.repair(
            blobs_logreg, data, failures, treat="relabel", guard_data=blobs_validation,
            progress=False,
        )  # fmt: skip


def test_guard_data_may_be_a_dataset_read_in_batches(
    blobs, blobs_logreg, blobs_validation, ref
) -> None:
    """guard_data goes through the same data layer as the training set: a map-style Dataset
    gives the same guard and the same repaired model as tensors."""
    Items = ref.ItemDataset

    data, failures = (blobs.X, blobs.y), (blobs.Xf, blobs.yf)
    kw = dict(seed=0, progress=False, chunk_size=16)
    a = netmend.repair(blobs_logreg, data, failures, guard_data=blobs_validation, **kw)
    b = netmend.repair(blobs_logreg, data, failures, guard_data=Items(*blobs_validation), **kw)
    assert a.treatment_info["guard"] == b.treatment_info["guard"]
    assert not a.treatment_info["guard"]["skipped"]
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_a_finer_back_off_tries_more_ks_down_to_the_same_smallest() -> None:
    X, y = _train()
    train = as_source((X, y), "train")
    val, _ = guard.holdout_slice(y, seed=0)
    causes = np.arange(6000)[::-1][:1000].copy()

    def treat_fn(c: np.ndarray) -> nn.Module:
        return Rule(collapse=np.setdiff1d(c, val).size > 300)

    g = guard.guard_k(treat_fn, Rule(), train, causes, 0, "cpu", shrink=0.71)
    assert [t["k"] for t in g.tries] == [1000, 710, 504, 357, 254] and g.passed
    with pytest.warns(UserWarning, match="from 64 to 8"):  # six steps, the same K/8 at the end
        g = guard.guard_k(lambda c: Rule(collapse=True), Rule(), train, np.arange(64), 0, "cpu",
                          shrink=0.71)  # fmt: skip
    assert len(g.tries) == 7
    with pytest.raises(ValueError, match="shrink"):
        guard.guard_k(treat_fn, Rule(), train, causes, 0, "cpu", shrink=1.0)


def test_no_halvings_tries_the_automatic_k_only() -> None:
    X, y = _train()
    with pytest.warns(UserWarning, match="from 64 to 64"):
        g = guard.guard_k(lambda c: Rule(collapse=True), Rule(), as_source((X, y), "t"),
                          np.arange(64), 0, "cpu", max_halvings=0)  # fmt: skip
    assert [t["k"] for t in g.tries] == [64] and not g.passed


def test_resolve_guard_takes_only_booleans() -> None:
    """``guard="no"`` was accepted as truthy, i.e. on (found by an outside-in trial; the bench
    had the same bug once, GUARD_VALUES)."""
    from netmend.treatment.guard import resolve_guard

    for bad in ("no", "yes", 1, 0.0):
        with pytest.raises(TypeError, match="guard must be True, False or None"):
            resolve_guard(bad, False, True, "finetune")  # type: ignore[arg-type]
    assert resolve_guard(np.bool_(False), False, True, "finetune") is False
    assert resolve_guard(None, False, True, "finetune") is True
    with pytest.raises(ValueError, match="drop it or pass guard=True"):
        resolve_guard(np.bool_(False), True, True, "finetune")


def test_repair_says_when_the_guard_cuts_the_users_own_k(
    blobs, blobs_logreg, blobs_validation, monkeypatch
) -> None:
    """With guard_data the guard runs for a fixed k too, and may cut it: it did so without a
    word (an outside-in trial asked for k=300 and got 75). The automatic K is cut silently
    (choosing it is the guard's job); a k the user gave is said to have been cut."""
    import netmend.api as api_mod

    def cutting(treat_fn, model, train, causes, seed, device, guard_data=None):
        return guard.GuardRecord(len(causes), 2, source="guard_data")

    monkeypatch.setattr(api_mod, "guard_k", cutting)
    data, failures = (blobs.X, blobs.y), (blobs.Xf, blobs.yf)
    kw = dict(seed=0, progress=False, guard_data=blobs_validation)
    with pytest.warns(UserWarning, match=r"the class guard cut k=6 \(6 causes\) to 2"):
        r = netmend.repair(blobs_logreg, data, failures, k=6, **kw)
    assert r.causes.size == 2
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the class guard cut")
        netmend.repair(blobs_logreg, data, failures, **kw)
