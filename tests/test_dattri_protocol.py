"""benchmarks/dattri_protocol.py scores every attribution with one LDS function: it must equal
dattri's definition (Spearman, per test point, of the helpful scores summed over the *kept*
examples with minus the retrained loss), computed here by a plain loop over test points."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]


def _dattri_lds_loop(helpful: np.ndarray, masks: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """dattri.metric.lds, written out: kept-sum of helpful scores vs minus the loss."""
    out = []
    for i in range(helpful.shape[1]):
        kept = np.array([helpful[m, i].sum() for m in masks])
        out.append(spearmanr(kept, -loss[:, i]).correlation)
    return np.array(out)


def test_lds_equals_dattri_definition_with_harmful_sign(bench_script):
    mod = bench_script("dattri_protocol")
    rng = np.random.default_rng(3)
    N, M, S = 40, 7, 25
    masks = np.zeros((S, N), dtype=bool)
    for s in range(S):
        masks[s, rng.choice(N, N // 2, replace=False)] = True
    harm = rng.standard_normal((N, M))
    # losses that the harmful scores partly predict: dropping harmful examples lowers the loss
    loss = -((~masks).astype(float) @ harm) + 0.5 * rng.standard_normal((S, M))
    got = mod.lds_per_test(harm, masks, loss)
    want = _dattri_lds_loop(-harm, masks, loss)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert np.nanmean(got) > 0.5  # the informative scores are recognised as such
    # the sign matters: helpful-positive scores passed unconverted give the opposite LDS
    np.testing.assert_allclose(mod.lds_per_test(-harm, masks, loss), -want, atol=1e-12)


def test_lds_of_constant_scores_is_nan_and_summary_drops_it(bench_script):
    mod = bench_script("dattri_protocol")
    masks = np.zeros((6, 4), dtype=bool)
    masks[:, :2] = True  # every subset keeps the same examples: no variation to rank
    lds = mod.lds_per_test(np.ones((4, 3)), masks, np.arange(18.0).reshape(6, 3))
    assert np.isnan(lds).all()
    s = mod.summarise(np.array([0.2, np.nan, 0.4]))
    assert s["n_test"] == 2
    assert s["mean"] == pytest.approx(0.3)
    assert s["se"] == pytest.approx(np.std([0.2, 0.4], ddof=1) / np.sqrt(2))


def test_trak_rows_keep_the_ridge_ratio_they_were_measured_at(bench_script):
    """The stored ``trak`` rows were measured at ``ridge_ratio`` 0.01, netmend's default until
    0.3.5: a rerun of a row named without a ratio must use 0.01, not today's default, and a
    row that names its ratio or reads it from dev keeps that one."""
    from netmend.identification.trak import AUTO_RIDGE_RATIO

    dp = bench_script("dattri_protocol")
    assert AUTO_RIDGE_RATIO != 0.01  # otherwise this test checks nothing
    for name in ("netmend trak", "netmend trak x10 half", "netmend trak kron512 x50 half"):
        assert dp.netmend_spec(name)["ridge_ratio"] == 0.01, name
    assert dp.netmend_spec("netmend trak kron1024 x50 half ridge_ratio 0.2")["ridge_ratio"] == 0.2
    chosen = dp.chosen_ratios(dp.json.loads(dp.DEV_JSON.read_text())["methods"])
    assert dp.netmend_spec("netmend trak kron768 x50 half dev")["ridge_ratio"] == chosen["768"]
