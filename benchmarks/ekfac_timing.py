"""EK-FAC factors over the 60k MNIST training set vs one training epoch, in the same run.

Usage: .venv/bin/python benchmarks/ekfac_timing.py [--out benchmarks/ekfac_timing.json]
    [--chunk 512] [--threads 1] [--fisher-type sampled] [--quick]

Times one epoch of training of the demo's SmallCNN (batch 128, Adam) on all 60k examples,
then, at the trained weights, EK-FAC in several configurations:

* ``full``: the KFAC factors from one streamed pass over all 60k examples (forward, backward,
  input/output covariances), then EK-FAC's eigenvalue correction, a second pass over all 60k
  in the Kronecker eigenbasis;
* subsampled (``covariance_max_examples`` / ``correction_max_examples``, kronfluence's
  ``covariance_max_examples`` / ``lambda_max_examples``): either pass on a seeded uniform
  subsample of the 60k, rescaled to estimate the sum over all 60k.

Each configuration reports its time over the epoch (target <= 2) and its fidelity to
``full``: the Spearman correlation of EK-FAC influence scores ``-g_z^T (C + damping I)^{-1} g_F``
(``damping`` = 0.1 x the mean eigenvalue of the full factors) for 2,000 training examples
``z`` against 100 misclassified test examples ``F``, and the relative error of the inverse
applied to ``g_F``. Both wall-clock and process CPU seconds are recorded: on a machine shared
with other jobs the wall-clock ratio moves with their load, the CPU-time ratio (one torch
thread by default) much less, so ``*_over_epoch`` is the CPU-time ratio. As a check it
compares the convolution input factor (computed without unfolding) with
``unfold(x) unfold(x)^T`` on one chunk.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from scipy.stats import spearmanr

from netmend.curvature import per_example_grads
from netmend.curvature.kfac import KroneckerFactors, _canonical_a, _input_cov, kronecker_factors
from netmend.lab.datasets import load_mnist
from netmend.lab.demo import machine
from netmend.lab.models import SmallCNN
from netmend.model.functional import FunctionalModel
from netmend.model.training import TrainConfig, fit, predict
from netmend.store import write_json_atomic

# (name, covariance_max_examples, correction_max_examples)
CONFIGS: list[tuple[str, int | None, int | None]] = [
    ("full", None, None),
    ("cov60k_corr20k", None, 20_000),
    ("cov20k_corr20k", 20_000, 20_000),
    ("cov10k_corr10k", 10_000, 10_000),
]


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``, its wall-clock seconds and its process CPU seconds."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def influence(f: KroneckerFactors, Gz: torch.Tensor, gF: torch.Tensor, damping: float) -> Any:
    """Scores ``-g_z^T (C + damping)^{-1} g_F`` ``[n]`` and the solve ``[P]``."""
    s = f.solve(gF, damping)
    return -(Gz @ s), s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/ekfac_timing.json")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fisher-type", default="sampled")
    ap.add_argument("--quick", action="store_true", help="10k examples (a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, test = load_mnist()
    X, y = train.X, train.y
    if args.quick:
        X, y = X[:10_000], y[:10_000]
    torch.manual_seed(0)
    model = SmallCNN()
    cfg = TrainConfig(epochs=1.0)
    _, epoch_wall, epoch_cpu = timed(lambda: fit(model, X, y, cfg, seed=0, progress=False))
    model.eval()
    fm = FunctionalModel.of(model)
    theta = fm.theta.detach()
    wrong = torch.nonzero(predict(model, test.X) != test.y).squeeze(1)[:100]
    gF = per_example_grads(fm, theta, test.X[wrong], test.y[wrong]).sum(0)
    zi = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(1))[:2000]
    Gz = per_example_grads(fm, theta, X[zi], y[zi])
    runs: dict[str, dict[str, Any]] = {}
    ref_scores = ref_solve = None
    damping = 0.0
    for name, cov_max, corr_max in CONFIGS:
        f, wall, cpu = timed(
            lambda cov_max=cov_max, corr_max=corr_max: kronecker_factors(
                fm,
                theta,
                X,
                y,
                "ekfac",
                args.fisher_type,
                chunk_size=args.chunk,
                covariance_max_examples=cov_max,
                correction_max_examples=corr_max,
            )
        )
        if ref_scores is None:  # the full configuration comes first
            lam = torch.cat([lf.eigenvalues.reshape(-1) for lf in f.layers])
            damping = 0.1 * float(lam.mean())
        scores, solve = influence(f, Gz, gF, damping)
        if ref_scores is None:
            ref_scores, ref_solve = scores, solve
        run = {
            "covariance_examples": f.covariance_examples,
            "correction_examples": f.correction_examples,
            "seconds": wall,
            "cpu_seconds": cpu,
            "over_epoch": cpu / epoch_cpu,
            "over_epoch_wall": wall / epoch_wall,
            "spearman_vs_full": float(spearmanr(scores.numpy(), ref_scores.numpy())[0]),
            "solve_relative_error_vs_full": float(
                (solve - ref_solve).norm() / ref_solve.norm()  # type: ignore[operator]
            ),
        }
        runs[name] = run
        print(name, run, flush=True)
    out = {
        "machine": machine(),
        "train_examples": int(X.shape[0]),
        "chunk_size": args.chunk,
        "fisher_type": args.fisher_type,
        "train_epoch_s": epoch_wall,
        "train_epoch_cpu_s": epoch_cpu,
        "damping": damping,
        "fidelity_setup": "EK-FAC influence of 2000 random training examples on 100 "
        "misclassified test examples; Spearman and solve error against the full factors",
        "configs": runs,
        "target_over_epoch": 2.0,
    }
    # check: the conv input factor without unfolding equals unfold(x) unfold(x)^T
    conv = model.features[3]
    x = model.features[:3](X[: args.chunk].reshape(-1, 1, 28, 28)).detach()
    a = _canonical_a(conv, x, True)
    af = a.transpose(0, 1).reshape(a.shape[1], -1)
    dense = af @ af.T
    diff = (_input_cov(conv, x, True) - dense).abs().max() / dense.abs().max()
    out["max_relative_difference_conv_factor_vs_unfold"] = float(diff)
    write_json_atomic(args.out, out)
    print({k: (v["over_epoch"], v["spearman_vs_full"]) for k, v in runs.items()})


if __name__ == "__main__":
    main()
