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
