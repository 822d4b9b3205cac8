"""How long must the demo's CNN train? The validation curve behind ``DemoConfig.epochs``.

Issue 11 asks for models "trained until more epochs no longer improve validation accuracy",
so that a repair's gain is not simply more training (``finetune-only`` within 0.3 points of
the original's test accuracy). The demo's recipe (Adam at a constant 1e-3, parameters
averaged over the second half of the steps) is trained on 50,000 of MNIST's 60,000 training
images with the demo's corruption, for each length in ``--epochs``, and judged on the other
10,000 (their noisy labels: what a user has; and their true labels, for reference). The test
set is not looked at.

    python benchmarks/demo_convergence.py --epochs 1 2 4 6 8 --out benchmarks/demo_convergence.json

``--dataset fashion`` records the same curve for the converged Fashion-MNIST test suites of
``netmend bench`` (``fashion-full``: the same CNN and recipe, issue 11's pair flips
T-shirt<->Shirt 0.4, Pullover<->Coat 0.3):

    python benchmarks/demo_convergence.py --dataset fashion --epochs 2 4 6 9 12 \
        --out benchmarks/fashion_convergence.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from netmend.lab.corrupt import FASHION_PAIRS, PAPER_PAIRS, pair_flips
from netmend.lab.datasets import load_fashion_mnist, load_mnist
from netmend.lab.demo import machine
from netmend.lab.models import SmallCNN
from netmend.model.training import TrainConfig, fit, predict


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=("mnist", "fashion"), default="mnist")
    p.add_argument("--epochs", nargs="+", type=float, default=[1, 2, 4, 6, 8])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--average-tail", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/demo_convergence.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    train, _ = load_mnist() if a.dataset == "mnist" else load_fashion_mnist()
    pairs = PAPER_PAIRS if a.dataset == "mnist" else FASHION_PAIRS
    noisy = pair_flips(train.y, pairs, seed=a.seed).labels
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(a.seed + 99))
    fit_idx, val_idx = perm[:50_000], perm[50_000:]
    rows = []
    for epochs in a.epochs:
        recipe = TrainConfig(epochs=epochs, average_tail=a.average_tail)
        t0 = time.perf_counter()
        torch.manual_seed(a.seed)
        model = fit(SmallCNN(), train.X[fit_idx], noisy[fit_idx], recipe, a.seed, "cpu", False)
        seconds = time.perf_counter() - t0
        pred = predict(model, train.X[val_idx])
        rows.append(
            {
                "epochs": epochs,
                "val_acc_noisy_labels": float((pred == noisy[val_idx]).float().mean()),
                "val_acc_true_labels": float((pred == train.y[val_idx]).float().mean()),
                "seconds": seconds,
            }
        )
        print(rows[-1], flush=True)
    doc = {
        "config": {**vars(a), "out": str(a.out)},
        "machine": machine(),
        "note": "seconds were measured on a 2-core CPU shared with other jobs",
        "curve": rows,
    }
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(a.out)


if __name__ == "__main__":
    main()
