"""The benchmark's summary (best netmend pipeline vs cleanlab, paired over seeds) and the
fine-tune length the harness gives the treatments that fine-tune inside."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from netmend.lab import bench
from netmend.treatment.methods import finetune_recipe


def _cell(name, kind, heldout, test):
    return {
        "pipeline": name,
        "kind": kind,
        "status": "ok",
        "heldout_failure_acc": heldout,
        "test_acc": test,
    }


def _result():
    """Two suites x three seeds; on suite a, pipeline p beats cleanlab on both, q only on
    held-out failures in the mean; on suite b, nothing beats it on test accuracy."""
    table = {  # suite -> pipeline -> [(heldout, test) per seed]
        "x/a": {
            "p": [(0.5, 0.95), (0.4, 0.96), (0.6, 0.94)],
            "q": [(0.7, 0.90), (0.1, 0.91), (0.2, 0.90)],
            "r": [(0.9, 0.50), (0.9, 0.50), (0.9, 0.50)],  # best held-out, collapsed test
            "cleanlab": [(0.3, 0.93), (0.3, 0.95), (0.4, 0.93)],
            "oracle-causes": [(0.8, 0.97), (0.8, 0.97), (0.8, 0.97)],
        },
        "x/b": {
            "p": [(0.2, 0.90), (0.2, 0.90), (0.2, 0.90)],
            "cleanlab": [(0.1, 0.91), (0.1, 0.92), (0.1, 0.93)],
        },
    }
    results = []
    for suite, pipes in table.items():
        for seed in range(3):
            cells = [
                _cell(n, "pipeline" if len(n) == 1 else "reference", *v[seed])
                for n, v in pipes.items()
            ]
            cells.append({"pipeline": "skipped/one", "kind": "pipeline", "status": "skipped"})
            results.append({"suite": suite, "seed": seed, "cells": cells})
    # a seed with no cleanlab cell is left out of the pairs
    results.append({"suite": "x/b", "seed": 9, "cells": [_cell("p", "pipeline", 1.0, 1.0)]})
    return {"results": results}


def test_paired_differences_by_hand():
    res = bench.paired_vs(_result())
    p = res["x/a"]["p"]
    d = np.array([0.2, 0.1, 0.2])  # held-out: p - cleanlab per seed
    assert p["seeds"] == 3
    assert p["heldout_failure_acc"] == pytest.approx(0.5)
    assert p["heldout_failure_acc_diff"] == pytest.approx(d.mean())
    assert p["heldout_failure_acc_se"] == pytest.approx(d.std(ddof=1) / math.sqrt(3))
    dt = np.array([0.02, 0.01, 0.01])
    assert p["test_acc_diff"] == pytest.approx(dt.mean())
    assert p["test_acc_se"] == pytest.approx(dt.std(ddof=1) / math.sqrt(3))
    assert res["x/b"]["p"]["seeds"] == 3  # seed 9 has no cleanlab cell
    assert res["x/a"]["cleanlab"]["heldout_failure_acc_diff"] == 0.0


def test_summary_picks_the_best_pipeline_and_says_if_the_figure_is_met():
    rows = {r["suite"]: r for r in bench.summary(_result())}
    a, b = rows["x/a"], rows["x/b"]
    # r has the highest held-out accuracy but loses on test: p, which beats cleanlab on both,
    # is the best
    assert a["best"] == "p" and a["met"] is True
    assert a["cleanlab_heldout_failure_acc"] == pytest.approx(1 / 3)
    assert a["oracle-causes_heldout_failure_acc"] == pytest.approx(0.8)
    assert b["best"] == "p" and b["met"] is False  # better held-out, worse test
    assert b["test_acc_diff"] == pytest.approx(-0.02)
    md = bench.summary_markdown(_result())
    assert "| x/a | 3 | p |" in md and "| yes |" in md and "| no |" in md
    assert "+16.7 ± 3.3" in md  # p's held-out difference on x/a, in points
    assert "* `p`: 1 of 2 (x/a)" in md and "* `r`: 0 of 1" in md
    assert bench.summary({"results": []}) == []


def test_relabel_gets_the_finetune_length(monkeypatch):
    """relabel/align fine-tune as long and at the rate the finetune treatment would."""
    torch.set_num_threads(1)
    seen: list[tuple[str, dict]] = []

    def fake_treat(model, train, causes, method, **kw):
        seen.append((method, kw))
        return model

    monkeypatch.setattr(bench.api, "treat", fake_treat)
    data = bench.make_suite("digits/sym20", 0)
    spec = bench.DATASETS["digits"]
    for options, expected in (
        ({}, finetune_recipe(spec.recipe, len(data.train), len(data.train))),
        ({"relabel": {"epochs": 2.0}}, None),
    ):
        seen.clear()
        config = bench.BenchConfig(
            suites=("digits/sym20",),
            pipelines=("ewc/relabel", "ewc/finetune"),
            references=("original",),
            treat_options=options,
        )
        bench.run_suite(data, config, torch.device("cpu"))
        kw = dict(seen)
        if expected is None:  # the user's options win
            assert kw["relabel"]["epochs"] == 2.0 and "lr" not in kw["relabel"]
        else:
            assert kw["relabel"]["epochs"] == pytest.approx(expected.epochs)
            assert kw["relabel"]["lr"] == spec.recipe.lr
            assert round(expected.epochs * len(data.train) / 128) == 421  # 40 epochs
        assert "epochs" not in kw["finetune"]  # finetune keeps its own default


def test_latest_runs_keeps_each_suite_in_the_last_result_that_ran_it():
    def res(*suites):
        return {"machine": {}, "results": [{"suite": s, "seed": 0} for s in suites]}

    first, second, third = res("x/a", "x/b", "x/a"), res("x/b"), res("x/c")
    out = bench.latest_runs({"one": first, "two": second, "three": third})
    assert list(out) == ["one", "two", "three"]
    assert [r["suite"] for r in out["one"]["results"]] == ["x/a", "x/a"]  # x/b rerun later
    assert [r["suite"] for r in out["two"]["results"]] == ["x/b"]
    assert [r["suite"] for r in out["three"]["results"]] == ["x/c"]
    assert len(first["results"]) == 3  # the inputs are not modified


def _judged_cell(name, heldout, test, gain, floor, drop, passed):
    return {
        "pipeline": name,
        "kind": "pipeline",
        "status": "ok",
        "heldout_failure_acc": heldout,
        "test_acc": test,
        "gain": {"heldout_gain": gain, "heldout_gain_se": 0.01, "test_gain": 0.0},
        "verdict": {"test_floor": floor, "worst_class_drop": drop, "passed": passed},
    }


def test_pareto_summary_by_hand():
    res = {
        "results": [
            {
                "suite": "d/a",
                "seed": 0,
                "cells": [_judged_cell("p", 0.5, 0.9, 0.10, 0.89, 0.0, True)],
            },
            {
                "suite": "d/a",
                "seed": 1,
                "cells": [_judged_cell("p", 0.4, 0.9, -0.02, 0.905, 0.0, False)],
            },
            # a class collapse: large held-out gain, test above the floor, one class -30 points
            {
                "suite": "d/b",
                "seed": 0,
                "cells": [_judged_cell("p", 0.9, 0.95, 0.5, 0.9, 0.3, False)],
            },
        ]
    }
    out = bench.pareto_summary(res)["p"]
    a, b = out["suites"]["d/a"], out["suites"]["d/b"]
    assert a["heldout_gain"] == pytest.approx(0.04)
    assert a["test_margin"] == pytest.approx(0.0025)  # (0.01 - 0.005) / 2
    assert a["repairs"] and a["seed_passes"] == 1
    assert not b["repairs"] and b["worst_class_drop"] == pytest.approx(0.3)
    assert (out["repairs"], out["of"]) == (1, 2)
    md = bench.pareto_markdown(res)
    assert "`p`: repairs 1 of 2 suites" in md
