"""Why the default repair damaged a BatchNorm ResNet on the digits (issue 13), measured.

Usage: .venv/bin/python benchmarks/bn_repair.py [--seeds 0 1 2] [--out benchmarks/bn_repair.json]

A small ResNet (``netmend.lab.models.ResNet18``, width 8, BatchNorm after every conv, eval
mode when scored) trained on the scikit-learn digits (8x8) with the paper's pair flips
(1<->7 at 0.4, 6<->9 at 0.3). Per seed, in one process, with the same query/held-out failure
split (``netmend.evaluation.split_failures``):

* ``original``: the model as trained;
* ``default``: ``netmend.repair`` (EWC identification, auto-K, fine-tune on D \\ C);
* ``random-K``: fine-tune without K random examples, K the default's;
* ``oracle-K``: fine-tune without the truly corrupted examples (the identification's ceiling);
* ``finetune-only``: the same fine-tune on all of D (the treatment without any diagnosis);
* ``default-bn-eval``: the default's causes, fine-tuned with every BatchNorm kept in eval
  mode (running statistics frozen; tests "fine-tuning in train mode moves the statistics").

Reported: test accuracy, held-out failure accuracy, K, cause precision and AUROC.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

import netmend
from netmend.cli import write_json_atomic
from netmend.evaluation.protocol import accuracies, identification_metrics, split_failures
from netmend.lab.corrupt import pair_flips
from netmend.lab.datasets import load_digits
from netmend.lab.demo import machine
from netmend.lab.models import ResNet18
from netmend.model.training import TrainConfig, fit
from netmend.treatment.methods import finetune_recipe

RECIPE = TrainConfig(epochs=15, batch_size=32, lr=3e-3)


def bn_eval(model: nn.Module) -> nn.Module:
    """A copy whose BatchNorm layers stay in eval mode when ``train()`` is called."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train = lambda mode=True, m=m: m  # type: ignore[method-assign, misc]
    return model


def one_seed(seed: int) -> dict[str, Any]:
    train, test = load_digits(seed=seed)
    X, Xt = train.X.reshape(-1, 1, 8, 8), test.X.reshape(-1, 1, 8, 8)
    corruption = pair_flips(train.y, seed=seed)
    y, mask = corruption.labels, corruption.mask.numpy()
    torch.manual_seed(seed)
    model = fit(ResNet18(width=8), X, y, RECIPE, seed, progress=False).eval()
    split = split_failures(model, Xt, test.y, seed=seed)
    query = (Xt[split.query], test.y[split.query])
    common: dict[str, Any] = dict(seed=seed, device="cpu", progress=False)

    def acc(m: nn.Module) -> dict[str, float]:
        return accuracies(m, Xt, test.y, split, "cpu")

    out: dict[str, Any] = {"seed": seed, "corrupted": int(mask.sum()), "original": acc(model)}
    t = time.perf_counter()
    res = netmend.repair(model, (X, y), query, train_config=RECIPE, **common)
    K = len(res.causes)
    metrics = identification_metrics(res.scores, res.causes, mask)
    out["default"] = {
        **acc(res.model),
        "k": K,
        "precision": metrics["precision"],
        "auroc": metrics["auroc"],
        "seconds": time.perf_counter() - t,
        "removed_per_class": np.bincount(y.numpy()[res.causes], minlength=10).tolist(),
        "train_per_class": np.bincount(y.numpy(), minlength=10).tolist(),
    }
    rng = np.random.default_rng(seed)
    random_causes = rng.choice(len(y), size=K, replace=False)
    print("default", out["default"], flush=True)
    out["random-K"] = acc(
        netmend.treat(model, (X, y), random_causes, train_config=RECIPE, **common)
    )
    oracle = np.flatnonzero(mask)
    out["oracle-K"] = {
        **acc(netmend.treat(model, (X, y), oracle, train_config=RECIPE, **common)),
        "k": int(oracle.size),
    }
    cfg = finetune_recipe(RECIPE, len(y), len(y))
    out["finetune-only"] = acc(fit(copy.deepcopy(model), X, y, cfg, seed, progress=False).eval())
    keep = np.setdiff1d(np.arange(len(y)), res.causes)
    cfg_k = finetune_recipe(RECIPE, len(y), keep.size)
    tuned = fit(bn_eval(model), X[keep], y[keep], cfg_k, seed, progress=False)
    out["default-bn-eval"] = acc(tuned.eval())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="benchmarks/bn_repair.json")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    runs = []
    for s in args.seeds:
        runs.append(one_seed(s))
        print(runs[-1], flush=True)
        write_json_atomic(args.out, {"machine": machine(), "partial_runs": runs})
    arms = ["original", "default", "random-K", "oracle-K", "finetune-only", "default-bn-eval"]
    summary = {
        arm: {
            key: float(np.mean([r[arm][key] for r in runs]))
            for key in ("test_acc", "heldout_failure_acc")
        }
        for arm in arms
    }
    summary["default"].update(
        {k: float(np.mean([r["default"][k] for r in runs])) for k in ("k", "precision", "auroc")}
    )
    out = {
        "machine": machine(),
        "recipe": dataclasses.asdict(RECIPE),
        "model": "ResNet18(width=8), BatchNorm, eval mode when scored",
        "summary_mean_over_seeds": summary,
        "runs": runs,
    }
    write_json_atomic(args.out, out)
    print(summary)


if __name__ == "__main__":
    main()
