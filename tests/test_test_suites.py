"""benchmarks/test_suites.py: issue 11's figures on the test suites are computed from the
bench JSONs (not typed), and its verdicts follow the Pareto criterion on hand-made cases."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _stored(mod: ModuleType) -> dict:
    return json.loads((ROOT / "benchmarks/test_suites.json").read_text())


def test_json_is_computed_from_the_bench_runs_and_the_doc_from_the_json(bench_script) -> None:
    mod = bench_script("test_suites")
    stored = _stored(mod)
    fresh = mod.build()
    assert {k: v for k, v in fresh.items() if k != "machine"} == {
        k: v for k, v in stored.items() if k != "machine"
    }
    text = mod.DOC_PATH.read_text()
    assert text.split(mod.BEGIN, 1)[1].split(mod.END, 1)[0].strip() == mod.render(stored).strip()


def _record(heldout: float, rk: float, test: float, floor: float, drop: float) -> dict:
    return {
        "k": 100,
        "precision": 0.9,
        "heldout": heldout,
        "test": test,
        "correct": 0.998,
        "rk_heldout": rk,
        "rk_test": test,
        "heldout_gain": heldout - rk,
        "test_gain": 0.0,
        "test_floor": floor,
        "worst_class_drop": drop,
        "passed": heldout > rk and test >= floor and drop <= 0.1,
        "original_test": floor + 0.002,
        "ft_only_test": floor + 0.002,
        "ft_only_heldout": 0.1,
    }


def test_a_held_out_gain_bought_by_a_collapsed_class_does_not_repair(bench_script) -> None:
    mod = bench_script("test_suites")
    good = {
        s: {"pipelines": {mod.DEFAULT: _record(0.4, 0.2, 0.9, 0.89, 0.02)}, "original_test": 0.892}
        for s in (0, 1)
    }
    assert mod.summarise("x/y", good)["pipelines"][mod.DEFAULT]["repairs"]
    collapsed = copy.deepcopy(good)
    for s in collapsed.values():
        s["pipelines"][mod.DEFAULT]["worst_class_drop"] = 0.5  # a class lost half its accuracy
    row = mod.summarise("x/y", collapsed)["pipelines"][mod.DEFAULT]
    assert not row["repairs"] and row["heldout_gain"]["mean"] > 0
    below = copy.deepcopy(good)
    for s in below.values():
        s["pipelines"][mod.DEFAULT]["test"] = 0.887  # 0.3 points under the floor
    assert not mod.summarise("x/y", below)["pipelines"][mod.DEFAULT]["repairs"]


def test_half_the_oracle_gain_is_judged_only_where_the_oracle_gain_is_significant(
    bench_script,
) -> None:
    mod = bench_script("test_suites")
    seeds = {
        s: {
            "pipelines": {mod.DEFAULT: _record(0.31, 0.20, 0.9, 0.89, 0.0)},
            "original_test": 0.892,
            "oracle-causes": {"heldout": h, "test": 0.9, "correct": 1.0, "k": 10},
        }
        for s, h in ((0, 0.40), (1, 0.42), (2, 0.38))
    }
    o = mod.summarise("x/y", seeds)["pipelines"][mod.DEFAULT]
    assert o["oracle_gain_significant"]  # +20 ± 1.2 points
    assert abs(o["share_of_oracle_gain"] - 0.55) < 1e-9 and o["meets_half_the_oracle_gain"]
    weak = copy.deepcopy(seeds)
    for s in weak.values():
        s["pipelines"][mod.DEFAULT] = _record(0.28, 0.20, 0.9, 0.89, 0.0)  # 8 of 20 points
    assert (
        mod.summarise("x/y", weak)["pipelines"][mod.DEFAULT]["meets_half_the_oracle_gain"] is False
    )
    noisy = copy.deepcopy(seeds)
    noisy[0]["oracle-causes"]["heldout"], noisy[1]["oracle-causes"]["heldout"] = 0.0, 0.9
    assert (
        mod.summarise("x/y", noisy)["pipelines"][mod.DEFAULT]["meets_half_the_oracle_gain"] is None
    )
