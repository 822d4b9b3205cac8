"""Diagonal Fisher over the 60k MNIST training set vs one training epoch, in the same run.

Usage: .venv/bin/python benchmarks/fisher_timing.py [--out benchmarks/fisher_timing.json]
Times one epoch of training of the demo's SmallCNN (batch 128, Adam), then the summed
diagonal empirical Fisher at the trained weights with the layer-hook path (chunk 128) and the
generic vmap path (chunk 32), and checks that the two agree.
"""

from __future__ import annotations

import argparse
import time

import torch

from netmend.cli import write_json_atomic
from netmend.curvature import fisher_diag_sum
from netmend.lab.datasets import load_mnist
from netmend.lab.demo import machine
from netmend.lab.models import SmallCNN
from netmend.model.functional import FunctionalModel
from netmend.model.training import TrainConfig, fit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/fisher_timing.json")
    args = ap.parse_args()
    train, _ = load_mnist()
    torch.manual_seed(0)
    model = SmallCNN()
    t = time.perf_counter()
    fit(model, train.X, train.y, TrainConfig(epochs=1.0), seed=0, progress=False)
    epoch = time.perf_counter() - t
    fm = FunctionalModel.of(model)
    out = {"machine": machine(), "train_examples": len(train), "train_epoch_s": epoch}
    results = {}
    for method, chunk in (("hooks", 128), ("vmap", 32)):
        t = time.perf_counter()
        results[method] = fisher_diag_sum(fm, fm.theta, train.X, train.y, chunk, method=method)
        out[f"fisher_{method}_s"] = time.perf_counter() - t
        out[f"fisher_{method}_over_epoch"] = out[f"fisher_{method}_s"] / epoch
    diff = (results["hooks"] - results["vmap"]).abs().max() / results["vmap"].abs().max()
    out["max_relative_difference_hooks_vs_vmap"] = float(diff)
    write_json_atomic(args.out, out)
    print(out)


if __name__ == "__main__":
    main()
