"""benchmarks/guard_calibration.py: each guard trial's reading against the test set's reading
of the same model, on hand-made bench results."""

from __future__ import annotations

import pytest


def _result(seed: int) -> dict:
    """A suite result with both guards: the slice guard reads 15 points where the test set
    sees 5 (one decision unlike the test set's), the data guard 11 where it sees 12."""
    original = [0.9, 0.8, 0.7]

    def cell(source: str, tries: list[tuple[int, float, int]], accs: list[list[float]]) -> dict:
        return {
            "pipeline": source,
            "status": "ok",
            "k": tries[-1][0],
            "precision": 0.5,
            "test_acc": 0.88,
            "class_acc": accs[-1],
            "guard": {
                "source": source,
                "readings": ["labels", "agreement net of churn"],
                "skipped": None,
                "tries": [
                    {"k": k, "worst_class_drop": d, "worst_class": c} for k, d, c in tries
                ],
                "trial_test_class_acc": accs,
            },
            "gain": {"heldout_gain": 0.02, "heldout_gain_se": 0.01, "test_gain": -0.001,
                     "test_gain_se": 0.001},
            "verdict": {"passed": True, "test_floor": 0.88, "reasons": []},
        }  # fmt: skip

    return {
        "seed": seed,
        "cells": [
            {"pipeline": "original", "status": "ok", "class_acc": original},
            cell("training slice", [(100, 0.15, 0), (50, 0.02, 0)],
                 [[0.85, 0.8, 0.7], [0.9, 0.79, 0.7]]),
            cell("guard_data", [(100, 0.11, 1), (50, 0.03, 1)],
                 [[0.9, 0.68, 0.7], [0.9, 0.78, 0.7]]),
        ],
    }  # fmt: skip


def test_trials_pair_each_guard_reading_with_the_test_reading_of_the_same_model(bench_script):
    gc = bench_script("guard_calibration")
    result = _result(3)
    returned = gc.returned_models([result])
    # the data guard's trials are the returned models at their K; each final cell is too
    assert returned[(3, 100)] == [0.9, 0.68, 0.7] and returned[(3, 50)] == [0.9, 0.78, 0.7]
    rows, finals = gc.trials(result, returned)
    assert [(r["source"], r["k"]) for r in rows] == [
        ("training slice", 100), ("training slice", 50), ("guard_data", 100), ("guard_data", 50)
    ]  # fmt: skip
    first = rows[0]
    assert first["guard_drop"] == pytest.approx(15.0)
    assert first["test_worst_drop"] == pytest.approx(5.0) and first["test_worst_class"] == 0
    # the slice's trial at K=100 is not the model returned at K=100 (the data guard's trial)
    assert first["returned_worst_drop"] == pytest.approx(12.0)
    assert first["returned_worst_class"] == 1
    assert rows[2]["test_worst_drop"] == pytest.approx(12.0) and rows[2]["test_worst_class"] == 1
    assert [f["k"] for f in finals] == [50, 50] and finals[0]["heldout_gain"] == pytest.approx(2)
    s = gc.summarise(rows)
    assert s["training slice"]["trial"]["decisions_differing_from_test"] == 1  # 15 > 10, test 5
    assert s["training slice"]["returned"]["decisions_differing_from_test"] == 0  # 15 and 12
    assert s["guard_data"]["trial"]["decisions_differing_from_test"] == 0  # 11 and 12: both fail
    assert s["training slice"]["trial"]["mean_abs_error_points"] == pytest.approx((10 + 1) / 2)
    assert s["guard_data"]["trial"]["mean_error_points"] == pytest.approx((-1 + 1) / 2)
    assert s["guard_data"]["returned"]["largest_abs_error_points"] == pytest.approx(1.0)


def test_a_trial_whose_returned_model_no_run_measured_is_left_out_of_that_comparison(
    bench_script,
):
    gc = bench_script("guard_calibration")
    result = _result(3)
    result["cells"] = result["cells"][:2]  # no data guard: K=100's returned model unknown
    rows, _ = gc.trials(result, gc.returned_models([result]))
    assert rows[0]["returned_worst_drop"] is None and rows[1]["returned_worst_drop"] is not None
    s = gc.summarise(rows)["training slice"]
    assert s["trial"]["trials"] == 2 and s["returned"]["trials"] == 1


def test_records_from_before_the_readings_field_name_the_earlier_variants(bench_script):
    gc = bench_script("guard_calibration")
    assert gc._source({"source": "guard_data"}) == "guard_data, labels only"
    assert gc._source({"source": "training slice", "baseline": "untreated"}) == (
        "training slice, untreated"
    )
    assert gc._source({"source": "training slice"}) == "training slice"
    assert gc._source({"source": "guard_data", "readings": ["labels"]}) == "guard_data"


def test_repairs_summarise_each_guards_final_cells_over_seeds(bench_script):
    gc = bench_script("guard_calibration")
    finals = []
    for seed, gain in ((3, 0.02), (4, 0.04)):
        result = _result(seed)
        for c in result["cells"][1:]:
            c["gain"]["heldout_gain"] = gain
        finals += gc.trials(result, gc.returned_models([result]))[1]
    rep = gc.repairs(finals)["guard_data"]
    assert rep["seeds"] == [3, 4] and rep["k"] == [50, 50] and rep["passed"] == 2
    assert rep["heldout_gain"] == pytest.approx(3.0) and rep["heldout_gain_se"] == pytest.approx(
        1.0
    )
    one = gc.repairs(finals[:1])["training slice"]
    assert one["heldout_gain_se"] is None  # one seed: no standard error


def test_a_finer_back_off_is_told_apart_by_the_pipelines_option(bench_script):
    gc = bench_script("guard_calibration")
    g = {"source": "training slice", "readings": ["labels"]}
    assert gc._source(g, "ewc[gate=true]/finetune[guard=true,guard_shrink=0.71]") == (
        "training slice, shrink 0.71"
    )
    assert gc._source(g, "ewc[gate=true]/finetune[guard=true]") == "training slice"
