"""The benchmark harness (``netmend bench``): one quick digits suite, checked against the
models and masks it used, plus the cleanlab peer pipeline and the command line."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from netmend import cli
from netmend.evaluation import split_failures
from netmend.lab import bench
from netmend.lab.corrupt import FASHION_PAIRS, PAPER_PAIRS, apply_trigger, subgroup_mask
from netmend.model.training import fit, predict
from netmend.treatment.methods import finetune_recipe

HAS_CLEANLAB = bench.cleanlab_available()
PIPELINES = ("ewc/finetune", "loss/finetune")


@pytest.fixture(scope="module")
def result():
    torch.set_num_threads(1)
    refs = ("original", "retrain-clean", "oracle-causes", "finetune-only")
    refs += ("cleanlab",) if HAS_CLEANLAB else ()
    config = bench.BenchConfig.quick(
        suites=("digits/sym20",), pipelines=PIPELINES, references=refs, cv_folds=3
    )
    return bench.run(config, device="cpu", keep_artifacts=True)


def _cells(result):
    return {c["pipeline"]: c for c in result["results"][0]["cells"]}


def test_original_row_is_the_models_accuracy(result):
    res = result["results"][0]
    art = res["_artifacts"]
    model, data, split = art["model"], art["data"], art["split"]
    orig = _cells(result)["original"]
    ok = (predict(model, data.test.X) == data.test.y).numpy()
    assert orig["test_acc"] == pytest.approx(ok.mean())
    assert orig["heldout_failure_acc"] == 0.0 and orig["query_failure_acc"] == 0.0
    assert orig["correct_acc"] == 1.0
    # the failures are exactly the model's test errors, split as split_failures splits them
    np.testing.assert_array_equal(split.failures, np.flatnonzero(~ok))
    ref = split_failures(model, data.test.X, data.test.y, seed=0)
    np.testing.assert_array_equal(split.query, ref.query)
    assert res["data"]["failures"] == (~ok).sum() == len(split.query) + len(split.heldout)
    # and the model is the recipe trained on the corrupted labels: retraining reproduces it
    spec = bench.DATASETS["digits"]
    torch.manual_seed(0)
    again = fit(spec.model(), data.train.X, data.train.y, spec.recipe, 0, progress=False)
    assert torch.equal(predict(again, data.test.X), predict(model, data.test.X))


def test_identification_metrics_come_from_the_mask(result):
    res = result["results"][0]
    art = res["_artifacts"]
    mask = art["data"].mask
    clean = art["data"].clean
    assert mask.sum() == res["data"]["corrupted"] > 0
    np.testing.assert_array_equal(mask, (art["data"].train.y != clean.y).numpy())
    names = ["ewc/finetune", "loss/finetune"] + (["cleanlab"] if HAS_CLEANLAB else [])
    for name in names:
        cell, causes = _cells(result)[name], art["causes"][name]
        assert cell["k"] == len(causes) > 0
        assert cell["precision"] == pytest.approx(mask[causes].mean())
        assert cell["recall"] == pytest.approx(mask[causes].sum() / mask.sum())
        curve = cell["pr_curve"]
        i = curve["k"].index(int(mask.sum()))
        assert curve["precision"][i] == pytest.approx(cell["precision_at_true_k"])
        assert curve["recall"][-1] == pytest.approx(1.0) and curve["k"][-1] == len(mask)
    # the failure-blind baseline gets ewc's K
    assert _cells(result)["loss/finetune"]["k"] == _cells(result)["ewc/finetune"]["k"]


def test_references(result):
    cells = _cells(result)
    art = result["results"][0]["_artifacts"]
    clean_model, data, split = art["retrain-clean"], art["data"], art["split"]
    assert cells["retrain-clean"]["test_acc"] == pytest.approx(
        bench.suite_accuracies(clean_model, data, split)["test_acc"]
    )
    # clean labels help on these failures (a sanity check of the suite itself)
    assert cells["retrain-clean"]["heldout_failure_acc"] > 0.3
    np.testing.assert_array_equal(art["causes"]["oracle-causes"], np.flatnonzero(data.mask))
    # finetune-only is the finetune treatment with no cause removed
    spec = bench.DATASETS["digits"]
    n = len(data.train)
    cfg = finetune_recipe(spec.recipe, n, n)
    again = fit(copy.deepcopy(art["model"]), data.train.X, data.train.y, cfg, 0, progress=False)
    for p, q in zip(again.parameters(), art["finetune-only"].parameters(), strict=True):
        assert torch.equal(p, q)
    assert cells["finetune-only"]["test_acc"] == pytest.approx(
        bench.suite_accuracies(again, data, split)["test_acc"]
    )
    if HAS_CLEANLAB:
        assert cells["cleanlab"]["status"] == "ok"
        assert cells["cleanlab"]["precision"] > 0.5  # symmetric noise is cleanlab's home ground


@pytest.mark.parametrize(
    "pipeline, message",
    [
        ("nosuch/finetune", "unknown identification method 'nosuch'"),
        ("ewx/finetune", "did you mean 'ewc'"),
        ("ewc/finetun", "did you mean 'finetune'"),
        ("ewc[gte=true]/finetune", r"unknown option\(s\) \['gte'\].*also reads: gate"),
        ("ewc[k=30]/finetune", "'k' is not a step option"),
        ("ewc/finetune[guard=no]", "guard='no'; write guard=true, false, unbalanced or data"),
        ("ewc/finetune[guard=2]", "guard=2"),
        ("ewc/relabel[guard=true]", "finetune treatment only"),  # was an error per cell
    ],
)
def test_bad_pipelines_are_refused_before_any_suite_runs(pipeline, message):
    """A misspelt name or option, or guard=no (once read as bool('no'): the guard on), is
    refused when the config is built, not skipped or misread after the suites trained."""
    with pytest.raises(ValueError, match=message):
        bench.BenchConfig.quick(pipelines=(pipeline,))
    ok = bench.BenchConfig.quick(pipelines=("ewc[gate=true]/finetune[guard=unbalanced]",))
    assert ok.pipelines == ("ewc[gate=true]/finetune[guard=unbalanced]",)


def test_write_outputs(result, tmp_path):
    paths = bench.write(result, tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == sorted(
        ["bench.json", "bench.md", "pr_digits_sym20_s0.png", "accuracy.png", "time.png"]
    )
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert "_artifacts" not in saved["results"][0]
    assert saved["results"][0]["cells"] == result["results"][0]["cells"]
    md = (tmp_path / "out" / "bench.md").read_text()
    orig = _cells(result)["original"]
    assert "| digits/sym20 | 0 | original | - |" in md
    assert f"{100 * orig['test_acc']:.1f}" in md
    # each pipeline's controls show their own accuracies under it (they were JSON-only)
    ewc = _cells(result)["ewc/finetune"]["controls"]
    rk, fo = ewc["random_k"], ewc["finetune_only"]
    row = next(ln for ln in md.splitlines() if "| ↳ random-K (3 draws) |" in ln)
    assert f"| {100 * rk['heldout_failure_acc']:.1f} |" in row
    assert f"| {100 * rk['test_acc']:.1f} |" in row
    row = next(ln for ln in md.splitlines() if "| ↳ finetune-only | 0 |" in ln)
    assert f"| {100 * fo['test_acc']:.1f} |" in row


def test_backdoor_suite_failures_are_triggered_images():
    data = bench.make_suite("digits/backdoor", seed=0)
    target, patch, value = data.info["target"], data.info["patch"], data.info["value"]
    n = len(data.test)
    others = data.test.y != target
    assert torch.equal(data.eval.X[:n], data.test.X)
    assert torch.equal(data.eval.X[n:], apply_trigger(data.test.X[others], patch, value))
    assert torch.equal(data.eval.y[n:], data.test.y[others])  # true labels, not the target
    assert not data.pool[:n].any() and data.pool[n:].all()
    # the poisoned training examples carry the trigger and the target label
    poisoned = torch.from_numpy(data.mask)
    assert (data.train.y[poisoned] == target).all()
    assert torch.equal(data.train.X[poisoned], apply_trigger(data.train.X[poisoned], patch, value))


def test_subgroup_suite_retrains_on_the_full_set_and_fails_on_the_subgroup():
    """The clean reference has the dropped members back; the failures may come only from the
    test members of the subgroup (class ``subgroup_class``, thinner than the threshold)."""
    data = bench.make_suite("digits/subgroup", seed=0)
    assert len(data.clean) == len(data.train) + data.info["dropped"] > len(data.train)
    assert data.mask.sum() == data.info["kept"] > 0
    assert data.info["class"] == bench.DATASETS["digits"].subgroup_class
    sub = subgroup_mask(data.test.X, data.test.y, data.info).numpy()
    assert np.array_equal(data.pool, sub) and 0 < sub.sum() < len(sub)
    # a model that always answers 0 gets every test example outside class 0 wrong; only the
    # subgroup's count as failures
    always0 = nn.Linear(data.test.X.shape[1], 10)
    with torch.no_grad():
        always0.weight.zero_()
        always0.bias.copy_(torch.arange(10, 0, -1, dtype=torch.float32))
    split = bench._split(always0, data, torch.device("cpu"))
    got = np.sort(np.r_[split.query, split.heldout])
    assert np.array_equal(got, np.flatnonzero(sub))


def test_pr_curve_by_hand():
    scores = np.array([0.9, 0.8, 0.1, 0.5, -1.0])
    mask = np.array([True, False, True, False, False])
    c = bench.pr_curve(scores, mask, points=5)
    # order by score: 0 (hit), 1, 3, 2 (hit), 4
    expect = {1: (1.0, 0.5), 2: (0.5, 0.5), 3: (1 / 3, 0.5), 4: (0.5, 1.0), 5: (0.4, 1.0)}
    for k, p, r in zip(c["k"], c["precision"], c["recall"]):
        assert (p, r) == pytest.approx(expect[k])


def test_cross_val_probs_are_out_of_fold():
    # random labels on random features: a model that memorises its training folds predicts
    # its own training rows perfectly but the held-out fold at chance
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(120, 30, generator=g), torch.randint(0, 2, (120,), generator=g)
    recipe = bench.TrainConfig(epochs=200, lr=1e-2)
    probs = bench.cross_val_probs(lambda: bench.MLP(30, 2, (64,)), X, y, recipe, folds=3)
    assert probs.shape == (120, 2)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    torch.manual_seed(0)
    full = fit(bench.MLP(30, 2, (64,)), X, y, recipe, progress=False)
    assert (predict(full, X) == y).float().mean() > 0.95
    assert 0.3 < (probs.argmax(1) == y.numpy()).mean() < 0.7
    again = bench.cross_val_probs(lambda: bench.MLP(30, 2, (64,)), X, y, recipe, folds=3)
    np.testing.assert_array_equal(probs, again)
    with pytest.raises(ValueError, match="needs >= 3 examples of every class"):
        bench.cross_val_probs(bench.MLP, X[:3], torch.tensor([0, 1, 1]), recipe, folds=3)


@pytest.mark.skipif(not HAS_CLEANLAB, reason="cleanlab not installed (pip install cleanlab==2.9.0)")
def test_cleanlab_finds_planted_noise():
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 3, 600)
    probs = np.full((600, 3), 0.05)
    probs[np.arange(600), clean] = 0.9
    labels = clean.copy()
    flipped = rng.choice(600, 60, replace=False)
    labels[flipped] = (labels[flipped] + 1) % 3
    issues, scores = bench.cleanlab_issues(labels, probs)
    assert sorted(issues) == sorted(flipped)
    assert scores.shape == (600,) and (scores[flipped] > 0.5).all()
    assert (np.delete(scores, flipped) < 0.5).all()  # positive = harmful: higher on the flipped


def test_cleanlab_missing_names_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_cleanlab(name, *args, **kwargs):
        if name.startswith("cleanlab"):
            raise ImportError("no cleanlab here")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cleanlab)
    with pytest.raises(ImportError, match=r"pip install cleanlab==2\.9\.0"):
        bench.cleanlab_issues(np.zeros(3, dtype=int), np.full((3, 2), 0.5))


def test_cleanlab_is_not_imported_by_netmend():
    import subprocess
    import sys

    code = "import sys, netmend, netmend.lab.bench, netmend.cli; print('cleanlab' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_config_validation():
    with pytest.raises(ValueError, match="unknown suite 'digits/nope'"):
        bench.BenchConfig(suites=("digits/nope",))
    with pytest.raises(ValueError, match="unknown suite 'cifar/sym20'"):
        bench.BenchConfig(suites=("cifar/sym20",))
    with pytest.raises(ValueError, match="IDENTIFY/TREAT"):
        bench.BenchConfig(pipelines=("ewc",))
    with pytest.raises(ValueError, match="unknown references"):
        bench.BenchConfig(references=("oracle",))
    full = bench.BenchConfig(suites=("digits",))
    assert full.suites == tuple(f"digits/{c}" for c in bench.CORRUPTIONS)


def test_cli_bench(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--quick", "--suites", "--pipelines", "--seeds", "--out"):
        assert flag in out
    assert cli.main(["bench", "--suites", "digits/nope"]) == 2
    assert "unknown suite" in capsys.readouterr().err

    seen = {}

    def fake_run(config, device, progress, on_suite=None, on_result=None, resume=None):
        seen["config"] = config
        assert on_result is None and resume is None  # no --report: no page; no --resume
        partial = {"config": {}, "results": [], "skipped": [], "errors": [], "seconds": 0.0}
        on_suite(partial)  # the CLI writes the partial result after every suite
        seen["partial"] = json.loads((tmp_path / "bench.json").read_text())
        return partial

    monkeypatch.setattr(bench, "run", fake_run)
    argv = ["bench", "--quick", "--pipelines", "loss/finetune", "--seeds", "3", "4"]
    assert cli.main([*argv, "--out", str(tmp_path), "--no-plots", "--cv-folds", "3"]) == 0
    assert seen["partial"]["results"] == []
    assert seen["config"].cv_folds == 3
    assert seen["config"].pipelines == ("loss/finetune",)
    assert seen["config"].seeds == (3, 4)
    assert seen["config"].suites == bench.QUICK_SUITES
    assert json.loads((tmp_path / "bench.json").read_text())["results"] == []


def test_parse_step_reads_options():
    assert bench.parse_step("ewc") == ("ewc", {})
    name, opts = bench.parse_step("knn_shapley[embed=input,se_z=1,valid=None,K=3,tol=0.5,x=True]")
    assert name == "knn_shapley"
    assert opts == {"embed": "input", "se_z": 1, "valid": None, "K": 3, "tol": 0.5, "x": True}
    for bad in ("ewc[", "ewc[]", "ewc[l2]", "[K=3]"):
        with pytest.raises(ValueError, match="METHOD\\[opt=value|method name"):
            bench.parse_step(bad)
    with pytest.raises(ValueError, match="METHOD"):
        bench.BenchConfig(pipelines=("ewc[K=3/finetune",))
    with pytest.raises(ValueError, match="IDENTIFY/TREAT"):
        bench.BenchConfig(pipelines=("ewc[K=3]",))


def test_pipeline_options_reach_identify_and_treat(monkeypatch):
    from netmend import api

    calls = []
    real_identify = api.identify

    def identify(model, train, failures, method, k=None, **kw):
        calls.append(("identify", method, {k: v for k, v in kw.items() if k in ("K", "embed")}))
        return real_identify(
            model,
            train,
            failures,
            "loss",
            5,
            **{k: v for k, v in kw.items() if k in ("seed", "device", "progress")},
        )

    def treat(model, train, causes, method, **kw):
        calls.append(
            ("treat", method, {k: v for k, v in kw.items() if k in ("neighbours", "epochs")})
        )
        return model

    monkeypatch.setattr(api, "identify", identify)
    monkeypatch.setattr(api, "treat", treat)
    config = bench.BenchConfig(
        suites=("digits/sym20",),
        pipelines=(
            "knn_shapley[K=3,embed=input]/relabel[neighbours=7,epochs=0.5]",
            "knn_shapley/finetune",
        ),
        references=(),
        treat_options={"relabel": {"neighbours": 9, "epochs": 2}},
    )
    res = bench.run(config, device="cpu")
    assert [c["status"] for c in res["results"][0]["cells"]] == ["ok", "ok"]
    relabel = ("treat", "relabel", {"neighbours": 7, "epochs": 0.5})  # the pipeline's options
    # each pipeline's treatment, then its controls: the same call with no causes
    # (finetune-only) and 3 random-K draws, all with the pipeline's options
    assert calls == [
        ("identify", "knn_shapley", {"K": 3, "embed": "input"}),
        *[relabel] * 5,
        ("identify", "knn_shapley", {}),  # another spec: identified again, without options
        *[("treat", "finetune", {})] * 5,
    ]


def test_pipeline_cells_carry_controls_with_their_own_k_and_recipe(result):
    cells = _cells(result)
    ewc, loss = cells["ewc/finetune"], cells["loss/finetune"]
    for c in (ewc, loss):
        rk = c["controls"]["random_k"]
        assert rk["draws"] == 3
        assert c["gain"]["heldout_gain"] == pytest.approx(
            c["heldout_failure_acc"] - rk["heldout_failure_acc"]
        )
        assert c["verdict"]["passed"] == (not c["verdict"]["reasons"])
    # loss/finetune has ewc's K and the same treatment call: it shares ewc's random-K draws
    # and its oracle-at-K (K members of the corrupted set, the same call)
    assert ewc["controls"]["random_k"] == loss["controls"]["random_k"]
    at_k = ewc["controls"]["oracle_at_k"]
    assert at_k == loss["controls"]["oracle_at_k"]
    assert at_k["gain"]["heldout_gain"] == pytest.approx(
        at_k["heldout_failure_acc"] - ewc["controls"]["random_k"]["heldout_failure_acc"]
    )
    # the pipeline's finetune-only control is the finetune-only reference (same call)
    ft = cells["finetune-only"]
    assert ewc["controls"]["finetune_only"]["test_acc"] == pytest.approx(ft["test_acc"])
    assert ewc["verdict"]["test_floor"] == pytest.approx(
        max(ft["test_acc"], cells["original"]["test_acc"]) - 0.002
    )


def test_bench_report_shows_the_first_pipelines_culprits(result, tmp_path):
    import re

    from netmend.report.html import bench_report

    res = result["results"][0]
    art = res["_artifacts"]
    ident = art["identifications"]["ewc/finetune"]
    path = bench_report(res, art, tmp_path / "r.html")
    assert path is not None
    page = path.read_text()
    data = json.loads(re.search(r'id="nm-data">(.*?)</script>', page, re.S).group(1))
    assert len(data["failures"]) == len(art["split"].query)
    for i in (0, len(art["split"].query) - 1):  # each failure's culprits: a full sort's
        top = ident.culprits(i, 5)
        assert [c["i"] for c in data["failures"][i]["culprits"]] == top.indices.tolist()
    orig = _cells(result)["original"]
    assert f"{100 * orig['test_acc']:.1f}" in page  # the original row, among all cells
    assert "ewc/finetune (shown)" in page and "loss/finetune" in page
    assert "control of ewc/finetune: random K" in page
    no_pipeline = {**res, "cells": [c for c in res["cells"] if c["kind"] == "reference"]}
    assert bench_report(no_pipeline, art, tmp_path / "none.html") is None
    # a method without per-failure scores has no culprits to show: the next pipeline's are
    import dataclasses

    blind = dataclasses.replace(ident, _per_failure=None)
    idents = {**art["identifications"], "ewc/finetune": blind}
    page = bench_report(res, {**art, "identifications": idents}, tmp_path / "b.html").read_text()
    assert "loss/finetune (shown)" in page and "ewc/finetune (shown)" not in page


def test_cli_bench_report(result, monkeypatch, tmp_path, capsys):
    """``netmend bench --report`` writes one page per suite and seed through on_result."""
    res = result["results"][0]
    public = {k: v for k, v in res.items() if k != "_artifacts"}

    def fake_run(config, device, progress, on_suite=None, on_result=None, resume=None):
        on_result(public, res["_artifacts"])
        return {"config": {}, "results": [public], "skipped": [], "errors": [], "seconds": 0.0}

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "markdown", lambda r: "TABLE")
    argv = ["bench", "--quick", "--out", str(tmp_path), "--no-plots", "--report"]
    assert cli.main(argv) == 0
    page = tmp_path / "report_digits_sym20_s0.html"
    assert page.is_file() and "netmend bench: digits/sym20 (seed 0)" in page.read_text()
    assert str(page) in capsys.readouterr().out

    def broken(*a, **k):
        raise RuntimeError("cannot draw")

    # a page that cannot be drawn is named and fails the command, the figures are kept
    monkeypatch.setattr("netmend.report.html.bench_report", broken)
    assert cli.main([*argv[:3], str(tmp_path / "b"), *argv[4:]]) == 1
    assert "could not write report_digits_sym20_s0.html" in capsys.readouterr().err
    assert (tmp_path / "b" / "bench.json").is_file()


def test_pair_suites_flip_their_own_datasets_pairs():
    """``fashion-full/pair`` flips T-shirt<->Shirt and Pullover<->Coat, not the paper's MNIST
    pairs; the dev suites keep the paper's pairs."""
    y = torch.arange(10).repeat(400)
    split = bench.Split(torch.zeros(len(y), 1), y)
    for name, pairs in (("fashion-full", FASHION_PAIRS), ("fashion", PAPER_PAIRS)):
        c = bench.CORRUPTIONS["pair"](split, 0, bench.DATASETS[name])
        changed = set(zip(y[c.mask].tolist(), c.labels[c.mask].tolist(), strict=True))
        expected = {p for a, b in pairs for p in ((a, b), (b, a))}
        assert changed == expected, name
    assert bench.DATASETS["fashion-full"].train_size is None  # all 60,000


def test_guarded_pipeline_removes_the_guards_k_and_judges_it_at_that_k(monkeypatch):
    """``ewc/finetune[guard=true]`` is netmend.repair's default: the guard picks K with the
    pipeline's own treatment call, and the cell and its random-K control use that K."""
    from netmend.lab import bench as bench_mod
    from netmend.treatment.guard import GuardRecord

    seen = {}

    def fake_guard(treat_fn, model, train, causes, seed, device, guard_data=None, shrink=0.5):
        seen["k0"] = len(causes)
        return GuardRecord(len(causes), 3, [{"k": 3, "worst_class": 0, "worst_class_drop": 0}])

    monkeypatch.setattr(bench_mod, "guard_k", fake_guard)
    config = bench.BenchConfig(
        suites=("digits/sym20",),
        pipelines=("ewc/finetune", "ewc/finetune[guard=true]"),
        references=(),
    )
    res = bench.run(config, device="cpu")
    cells = {c["pipeline"]: c for c in res["results"][0]["cells"]}
    plain, guarded = cells["ewc/finetune"], cells["ewc/finetune[guard=true]"]
    assert guarded["status"] == "ok" and guarded["guard"]["k"] == 3
    assert seen["k0"] == plain["k"] > 3 and guarded["k"] == 3
    assert guarded["controls"]["finetune_only"] == plain["controls"]["finetune_only"]
    assert guarded["controls"]["random_k"] != plain["controls"]["random_k"]


def test_hold_out_validation_is_a_stratified_seeded_split_of_the_noisy_training_set():
    data = bench.make_suite("digits/pair", seed=0)
    n = len(data.train)
    tag = torch.arange(n, dtype=torch.float64)[:, None]  # inputs that name their row
    tagged = dataclasses.replace(
        data, train=bench.Split(tag, data.train.y), clean=bench.Split(tag, data.clean.y)
    )
    kept, val = bench.hold_out_validation(tagged, 0.2)
    counts = np.bincount(data.train.y.numpy(), minlength=10)
    assert np.bincount(val.y.numpy(), minlength=10).tolist() == [round(0.2 * c) for c in counts]
    held = val.X[:, 0].long().numpy()
    keep = np.setdiff1d(np.arange(n), held)
    assert len(keep) + len(held) == n and len(kept.train) == len(keep)
    assert torch.equal(val.y, data.train.y[held])  # the noisy labels, as a user's split has
    assert torch.equal(kept.train.X[:, 0].long(), torch.from_numpy(keep))
    assert torch.equal(kept.train.y, data.train.y[keep])
    assert np.array_equal(kept.mask, data.mask[keep])
    assert torch.equal(kept.clean.y, data.clean.y[keep]) and kept.info["validation"] == len(held)
    assert torch.equal(bench.hold_out_validation(tagged, 0.2)[1].X, val.X)
    other = bench.hold_out_validation(dataclasses.replace(tagged, seed=1), 0.2)[1]
    assert not torch.equal(other.X, val.X)


def test_guard_data_option_gives_the_validation_split_to_the_guard(monkeypatch):
    """``finetune[guard=data]`` hands the held-out split to the guard as guard_data; the
    split is out of the training set everything else sees; without one it is an error."""
    from netmend.lab import bench as bench_mod
    from netmend.treatment.guard import GuardRecord

    seen = {}

    def fake_guard(treat_fn, model, train, causes, seed, device, guard_data=None, shrink=0.5):
        seen["train"], seen["guard_data"] = len(train), guard_data
        return GuardRecord(len(causes), len(causes))

    monkeypatch.setattr(bench_mod, "guard_k", fake_guard)
    config = bench.BenchConfig(
        suites=("digits/sym20",),
        pipelines=("ewc/finetune[guard=data]",),
        references=(),
        validation_share=0.1,
        draws=0,
    )
    res = bench.run(config, device="cpu")
    r = res["results"][0]
    assert r["cells"][0]["status"] == "ok"
    assert (
        seen["train"] == r["data"]["train"]
        and len(seen["guard_data"]) == r["data"]["info"]["validation"] > 0
    )
    full = len(bench.make_suite("digits/sym20", seed=0).train)
    assert r["data"]["train"] + r["data"]["info"]["validation"] == full
    # without a split it is refused before any suite is trained (it used to train every
    # suite, fail every cell and exit 1: an outside-in trial)
    with pytest.raises(ValueError, match="guard=data measures on a validation split"):
        dataclasses.replace(config, validation_share=0.0)


def test_validation_share_is_checked():
    with pytest.raises(ValueError, match="validation_share"):
        bench.BenchConfig(suites=("digits/sym20",), validation_share=0.6)


def test_guard_trials_are_read_on_the_test_set_one_per_try_without_the_churn_trial():
    from netmend.lab.bench import _trial_readings
    from netmend.treatment.guard import GuardRecord, holdout_slice

    y = torch.arange(10).repeat(2000)
    val = holdout_slice(y, seed=4)[0]
    trial = [np.union1d(np.arange(k), val) for k in (40, 20)]
    calls = [(trial[0], [0.1]), (val.copy(), [0.2]), (trial[1], [0.3])]  # try, churn, try
    g = GuardRecord(40, 20, tries=[{"k": 40}, {"k": 20}])
    assert _trial_readings(calls, g, y, seed=4) == [[0.1], [0.3]]
    g = GuardRecord(40, 20, tries=[{"k": 40}, {"k": 20}], source="guard_data")
    calls = [(np.arange(40), [0.1]), (np.zeros(0, np.int64), [0.2]), (np.arange(20), [0.3])]
    assert _trial_readings(calls, g, y, seed=4) == [[0.1], [0.3]]


def test_a_record_written_midway_says_it_is_partial():
    """bench.json is written after every suite; interrupted after the first of three, it read
    as complete ("repairs 0 of 1 suites") with no mark that the rest never ran."""
    config = bench.BenchConfig.quick()
    planned = len(config.suites) * len(config.seeds)
    assert planned >= 2
    skipped = [{"suite": config.suites[0], "seed": config.seeds[0], "reason": "x"}]
    partial = bench._collect(config, {}, [], skipped, 0.0)
    assert partial["complete"] is False and partial["suites_done"] == f"1 of {planned} suite runs"
    assert f"partial run: 1 of {planned} suite runs finished" in bench.markdown(partial)
    whole = bench._collect(config, {}, [], skipped * planned, 0.0)
    assert bench.markdown(partial).startswith(f"**Partial run: 1 of {planned} suite runs")
    assert whole["complete"] is True and "partial run" not in bench.markdown(whole).lower()


def test_the_subgroup_suites_mask_is_not_scored_as_causes():
    """digits/subgroup's mask marks the under-represented members left in the training set:
    'oracle-causes' removed them (the opposite of a fix: 0% held-out) and precision was
    scored against them (an outside-in trial)."""
    assert not bench.masks_causes("digits/subgroup") and bench.masks_causes("digits/pair")
    config = bench.BenchConfig.quick(
        suites=("digits/subgroup",), pipelines=("ewc/finetune",),
        references=("original", "oracle-causes"), draws=0,
    )  # fmt: skip
    cells = {c["pipeline"]: c for c in bench.run(config, device="cpu")["results"][0]["cells"]}
    assert cells["oracle-causes"]["status"] == "skipped"
    assert cells["oracle-causes"]["reason"] == bench.NOT_CAUSES
    ewc = cells["ewc/finetune"]
    assert ewc["status"] == "ok" and ewc["precision"] is None and ewc["pr_curve"] is None
    assert ewc["k"] > 0


def test_guard_unbalanced_is_skipped_when_the_all_gate_added_causes():
    """finetune[guard=unbalanced] runs the class guard unless a gate added causes to make
    the removal balanced: the balance gate's reverse errors, or the all gate's candidates."""
    config = bench.BenchConfig(
        suites=("digits/sym20",), references=("original",), seeds=(0,), draws=0,
        pipelines=(
            "ewc[gate=all]/finetune[guard=unbalanced]", "ewc[gate=all]/finetune[guard=true]"
        ),
    )  # fmt: skip
    cells = {c["pipeline"]: c for c in bench.run(config, "cpu")["results"][0]["cells"]}
    skipped, guarded = (cells[p] for p in config.pipelines)
    assert skipped["label_gate"]["added"] > 0 and skipped["k"] == guarded["k"]
    assert "guard" not in skipped and guarded["guard"] is not None


def test_oracle_at_k_is_the_pipelines_call_with_k_corrupted_examples(monkeypatch):
    """Beside random-K, where the oracle reference runs: the very same treatment call, its
    causes K members of the corrupted set (K = the pipeline's own)."""
    from netmend import api
    from netmend.evaluation.controls import truth_at_k, truth_ranked

    calls = []
    real_identify = api.identify

    def identify(model, train, failures, method, k=None, **kw):
        kw = {k: v for k, v in kw.items() if k in ("seed", "device", "progress")}
        return real_identify(model, train, failures, "loss", 6, **kw)

    def treat(model, train, causes, method, **kw):
        calls.append((np.asarray(causes).copy(), kw.get("neighbours")))
        return model

    monkeypatch.setattr(api, "identify", identify)
    monkeypatch.setattr(api, "treat", treat)
    config = bench.BenchConfig(
        suites=("digits/sym20",),
        pipelines=("loss/relabel[neighbours=7]",),
        references=("oracle-causes",),
    )
    res = bench.run(config, device="cpu", keep_artifacts=True)
    cell = res["results"][0]["cells"][0]
    truth = np.flatnonzero(bench.make_suite("digits/sym20", seed=0).mask)
    # the pipeline, finetune-only, 3 random-K draws, oracle-at-K, oracle-ranked; then the
    # oracle reference
    assert [c.size for c, _ in calls] == [6, 0, 6, 6, 6, 6, 6, truth.size]
    assert [n for _, n in calls[:7]] == [7] * 7  # every control with the pipeline's options
    assert np.array_equal(calls[5][0], truth_at_k(truth, 6, seed=0))
    assert set(calls[5][0]) <= set(truth)
    # oracle-ranked: the corrupted examples the pipeline's own scores put first
    ident = res["results"][0]["_artifacts"]["identifications"]["loss/relabel[neighbours=7]"]
    assert np.array_equal(calls[6][0], truth_ranked(truth, ident.scores, 6))
    assert np.array_equal(calls[7][0], truth)
    ranked = cell["controls"]["oracle_ranked"]
    assert ranked["gain"]["test_gain"] == pytest.approx(
        ranked["test_acc"] - cell["controls"]["random_k"]["test_acc"]
    )
    assert cell["controls"]["oracle_at_k"]["gain"]["heldout_gain"] == pytest.approx(
        cell["controls"]["oracle_at_k"]["heldout_failure_acc"]
        - cell["controls"]["random_k"]["heldout_failure_acc"]
    )
