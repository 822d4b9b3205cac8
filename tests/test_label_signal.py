"""benchmarks/label_signal.py: its signals match brute force and hand-made cases, and the
summaries in its JSONs are computed from the runs they hold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FILES = ("label_signal_digits.json", "label_signal_full.json")


def test_knn_label_probs_match_a_loop_over_examples(bench_script) -> None:
    mod = bench_script("label_signal")
    g = torch.Generator().manual_seed(0)
    E = torch.randn(37, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (37,), generator=g)
    got = mod.knn_label_probs(E, y, 6, 4, chunk=8)  # chunks that do not divide N
    En = E / E.norm(dim=1, keepdim=True)
    for i in range(37):
        sim = [float(En[i] @ En[j]) if j != i else -np.inf for j in range(37)]
        nb = np.argsort(sim)[::-1][:6].copy()
        want = np.bincount(y[nb].numpy(), minlength=4) / 6
        np.testing.assert_allclose(got[i].numpy(), want, rtol=0, atol=1e-12)


def test_confident_learning_flags_on_a_hand_made_case(bench_script) -> None:
    mod = bench_script("label_signal")
    P = np.array(
        [
            [0.9, 0.1],  # labelled 0, confidently 0: kept
            [0.75, 0.25],  # labelled 0, below t_0 and t_1: no confident class, kept
            [0.6, 0.4],  # labelled 1, below t_0, reaches t_1: its own label, kept
            [0.85, 0.15],  # labelled 1, reaches t_0 only: flagged by both readings
        ]
    )
    y = np.array([0, 0, 1, 1])
    # t_0 = mean(0.9, 0.75) = 0.825, t_1 = mean(0.4, 0.15) = 0.275
    f = mod.label_flags(P, y)
    assert f["cl"].tolist() == [False, False, False, True]
    assert f["argmax"].tolist() == [False, False, True, True]  # row 2: argmax 0 != 1


def test_crossfit_head_never_sees_the_examples_it_scores(bench_script) -> None:
    mod = bench_script("label_signal")
    g = torch.Generator().manual_seed(1)
    E = torch.randn(200, 3, generator=g, dtype=torch.float64)
    y = (E[:, 0] > 0).long()
    y_flipped = y.clone()
    y_flipped[:10] = 1 - y_flipped[:10]
    P = mod.crossfit_head(E, y_flipped, 2, folds=2, seed=0)
    # a separable problem: out-of-fold, the flipped examples get their true class back
    assert (P[:10].argmax(1) == y[:10]).float().mean() >= 0.9
    assert torch.allclose(P.sum(1), torch.ones(200, dtype=torch.float64))


@pytest.mark.parametrize("name", FILES)
def test_summaries_are_computed_from_the_runs(bench_script, name: str) -> None:
    mod = bench_script("label_signal")
    doc = json.loads((ROOT / "benchmarks" / name).read_text())
    assert json.loads(json.dumps(mod.summarise(doc["runs"]))) == doc["summary"]
