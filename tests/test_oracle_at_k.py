"""benchmarks/oracle_at_k.py: the default's gain next to an oracle of its own K is computed
from the bench runs (not typed), and a share is read only where that oracle's gain is
significant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_json_is_computed_from_the_bench_runs(bench_script) -> None:
    mod = bench_script("oracle_at_k")
    stored = json.loads(mod.OUT.read_text())
    assert mod.build() == stored
    assert stored["runs"], "no bench run under benchmarks/oracle_at_k/"
    assert len(stored["records"]) == sum(len(s["seeds"]) for s in stored["suites"])


def _rec(seed: int, gain: float, at_k: float, full: float) -> dict:
    return {
        "suite": "s", "seed": seed, "k": 10, "corrupted": 100, "precision": 0.5,
        "heldout_gain": gain, "test_gain": 0.0, "at_k_heldout_gain": at_k,
        "at_k_test_gain": 0.0, "ranked_heldout_gain": at_k, "ranked_test_gain": 0.0,
        "full_heldout_gain": full, "passed": gain > 0, "test_margin": 0.001,
        "worst_class_drop": 0.02,
    }  # fmt: skip


def test_shares_of_each_oracle_and_where_they_are_not_read(bench_script) -> None:
    mod = bench_script("oracle_at_k")
    # the default gains 0.02 a seed; oracle-at-K 0.03 (two-thirds: met), the full oracle 0.1
    recs = [_rec(s, 0.02 + 0.001 * s, 0.03 + 0.001 * s, 0.1 + 0.002 * s) for s in range(3)]
    s = mod.summarise(recs)["suites"][0]
    assert s["heldout_gain"]["mean"] == pytest.approx(0.021)
    assert s["share_of_at_k"] == pytest.approx(0.021 / 0.031)
    assert s["half_of_at_k"] is True
    assert s["share_of_full"] == pytest.approx(0.021 / 0.102)
    assert s["half_of_full"] is False
    assert s["passed"] == 3 and s["repairs"] is True  # on the seed means
    # an oracle gain within two standard errors of zero: no share is read
    noisy = [_rec(s, 0.02, g, 0.1) for s, g in enumerate([0.05, -0.04, 0.01])]
    s = mod.summarise(noisy)["suites"][0]
    assert s["share_of_at_k"] is None and s["half_of_at_k"] is None
    assert s["half_of_full"] is False  # 0.1 on every seed: se 0, significant
    # one seed: no standard error, no share
    s = mod.summarise([_rec(0, 0.02, 0.03, 0.1)])["suites"][0]
    assert s["share_of_at_k"] is None and s["share_of_full"] is None
