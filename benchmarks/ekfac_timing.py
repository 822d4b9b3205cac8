"""EK-FAC factors over the 60k MNIST training set vs one training epoch, in the same run.

Usage: .venv/bin/python benchmarks/ekfac_timing.py [--out benchmarks/ekfac_timing.json]
    [--chunk 512] [--threads 1] [--fisher-type sampled]

Times one epoch of training of the demo's SmallCNN (batch 128, Adam), then, at the trained
weights, the KFAC factors (one streamed pass: forward, backward, input/output covariances)
and EK-FAC's eigenvalue correction (a second pass in the Kronecker eigenbasis), and reports
their sum over the epoch (target: <= 2). Both wall-clock and process CPU seconds are recorded:
on a machine shared with other jobs the wall-clock ratio moves with their load, the CPU-time
ratio (one torch thread by default) much less, so ``ekfac_over_epoch`` is the CPU-time ratio.
As a check it compares the convolution input factor (computed without unfolding) with
``unfold(x) unfold(x)^T`` on one chunk.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from netmend.cli import write_json_atomic
from netmend.datasets import load_mnist
from netmend.demo import machine
from netmend.functional import FunctionalModel
from netmend.kfac import _canonical_a, _input_cov, eigencorrect, kronecker_factors
from netmend.models import SmallCNN
from netmend.training import TrainConfig, fit


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``, its wall-clock seconds and its process CPU seconds."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/ekfac_timing.json")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fisher-type", default="sampled")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, _ = load_mnist()
    torch.manual_seed(0)
    model = SmallCNN()
    cfg = TrainConfig(epochs=1.0)
    _, epoch_wall, epoch_cpu = timed(
        lambda: fit(model, train.X, train.y, cfg, seed=0, progress=False)
    )
    fm = FunctionalModel.of(model)
    X, y = train.X, train.y
    f, kfac_wall, kfac_cpu = timed(
        lambda: kronecker_factors(
            fm, fm.theta, X, y, "kfac", args.fisher_type, chunk_size=args.chunk
        )
    )
    _, corr_wall, corr_cpu = timed(
        lambda: eigencorrect(f, fm, fm.theta, X, y, chunk_size=args.chunk)
    )
    out = {
        "machine": machine(),
        "train_examples": len(train),
        "chunk_size": args.chunk,
        "fisher_type": args.fisher_type,
        "train_epoch_s": epoch_wall,
        "train_epoch_cpu_s": epoch_cpu,
        "kfac_factors_s": kfac_wall,
        "kfac_factors_cpu_s": kfac_cpu,
        "ekfac_correction_s": corr_wall,
        "ekfac_correction_cpu_s": corr_cpu,
        "ekfac_total_s": kfac_wall + corr_wall,
        "ekfac_total_cpu_s": kfac_cpu + corr_cpu,
        "kfac_over_epoch": kfac_cpu / epoch_cpu,
        "ekfac_over_epoch": (kfac_cpu + corr_cpu) / epoch_cpu,
        "ekfac_over_epoch_wall": (kfac_wall + corr_wall) / epoch_wall,
    }
    # check: the conv input factor without unfolding equals unfold(x) unfold(x)^T
    conv = model.features[3]
    x = model.features[:3](train.X[: args.chunk].reshape(-1, 1, 28, 28)).detach()
    a = _canonical_a(conv, x, True)
    af = a.transpose(0, 1).reshape(a.shape[1], -1)
    dense = af @ af.T
    diff = (_input_cov(conv, x, True) - dense).abs().max() / dense.abs().max()
    out["max_relative_difference_conv_factor_vs_unfold"] = float(diff)
    write_json_atomic(args.out, out)
    print(out)


if __name__ == "__main__":
    main()
