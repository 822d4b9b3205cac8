"""Can a repair see, without the test set, that it is collapsing a class? (exploratory)

On the converged ``fashion-full/pair`` test suite (seed 0) the default repair removed 2,008
causes at precision 0.45 and class 0 (T-shirt/top) lost 52 points of test accuracy
(``benchmarks/bench_full_fashion``). This script asks whether a slice of the *training* set,
held out of the fine-tune and read with its own (noisy) labels, shows the same collapse, so
that a repair could back off its K before handing the model to the user.

For K in ``--fractions`` × the automatic K (the default's causes, most harmful first), the
fine-tune runs on D ∖ (top-K ∪ V), where V is a stratified random slice of the training set
(``--val-share``); the repaired model is then measured on V (noisy labels: what a user
has), per class, and on the test set (clean labels: what the user cares about), next to the
finetune-only control (K = 0, V still held out). Everything is the same fine-tune recipe as
``netmend.repair``'s default. This is a dev experiment on a suite already seen: it informs
the next round's default, it does not judge it.

V is read two ways: with its noisy labels (``val_class_acc_noisy``, what the class guard
uses), and with the original model's predictions as the labels (``val_class_agree``: per
class c, the share of V that the original calls c and the repair still calls c; its drop is
``1 - agree``), which 40% pair noise cannot dilute but which moves under any fine-tune.
``--gate`` starts from the label gate's causes instead of the ungated automatic K's.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/guard_explore.py \\
        --out benchmarks/guard_explore.json
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/guard_explore.py --gate \\
        --fractions 1.0 0.5 0.25 --out benchmarks/guard_explore_gate.json
    # diagnosis of the test seed the guard let through (no choice is made on it):
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/guard_explore.py --seed 3 --gate \\
        --fractions 1.0 0.5 0.25 --out benchmarks/guard_explore_gate_s3.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _shared import dev_run

import netmend
from netmend.evaluation.controls import class_accuracies
from netmend.lab import bench
from netmend.lab.demo import machine
from netmend.model.training import predict
from netmend.store import write_json_atomic


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="fashion-full/pair")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-share", type=float, default=0.05)
    p.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.0])
    p.add_argument("--gate", action="store_true", help="start from the label gate's causes")
    p.add_argument("--out", type=Path, default=Path("benchmarks/guard_explore.json"))
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    data, spec, model, split, ident = dev_run(a.suite, a.seed, gate=a.gate)
    X, y = data.train.X, data.train.y  # y: the noisy labels
    causes = np.asarray(ident.causes)
    rng = np.random.default_rng(a.seed + 12345)
    val = np.concatenate(
        [
            rng.choice(idx, max(1, round(a.val_share * idx.size)), replace=False)
            for idx in (np.flatnonzero(y.numpy() == c) for c in range(bench.NUM_CLASSES))
        ]
    )
    val.sort()

    original_val_pred = predict(model, X[val])

    def figures(m: torch.nn.Module) -> dict[str, Any]:
        ok = (predict(m, data.eval.X) == data.eval.y).numpy()
        return {
            "test_acc": float((predict(m, data.test.X) == data.test.y).float().mean()),
            "heldout_failure_acc": float(ok[split.heldout].mean()),
            "test_class_acc": class_accuracies(m, data.test.X, data.test.y, bench.NUM_CLASSES),
            "val_acc_noisy": float((predict(m, X[val]) == y[val]).float().mean()),
            "val_class_acc_noisy": class_accuracies(m, X[val], y[val], bench.NUM_CLASSES),
            # V read with the original model's predictions instead of its noisy labels: per
            # class, the share of the slice the original calls c that the repair still calls c
            "val_class_agree": class_accuracies(m, X[val], original_val_pred, bench.NUM_CLASSES),
        }

    original = figures(model)
    rows = []
    for frac in a.fractions:
        k = int(round(frac * causes.size))
        removed = np.union1d(causes[:k], val)
        t0 = time.perf_counter()
        repaired = netmend.treat(
            model, (X, y), removed, "finetune", train_config=spec.recipe, seed=a.seed,
            progress=False,
        )  # fmt: skip
        f = figures(repaired)
        f["test_class_drop"] = max(
            o - r for o, r in zip(original["test_class_acc"], f["test_class_acc"], strict=True)
        )
        f["val_class_drop_noisy"] = max(
            o - r
            for o, r in zip(original["val_class_acc_noisy"], f["val_class_acc_noisy"], strict=True)
        )
        f["val_class_drop_agree"] = max(1.0 - a for a in f["val_class_agree"])
        f.update(
            k=k,
            fraction=frac,
            precision=float(data.mask[causes[:k]].mean()) if k else None,
            seconds=time.perf_counter() - t0,
        )
        rows.append(f)
        print({key: v for key, v in f.items() if "class_acc" not in key}, flush=True)
    doc = {
        "config": {**vars(a), "out": str(a.out)},
        "machine": machine(),
        "note": "2-core CPU shared with other jobs; "
        + (
            "exploratory dev run on a suite already seen"
            if a.seed == 0
            else "diagnosis of a test seed after it was judged; no choice is made on it"
        ),
        "auto_k": int(causes.size),
        "val_size": int(val.size),
        "original": original,
        "rows": rows,
        "seconds": time.perf_counter() - t_start,
    }
    write_json_atomic(a.out, doc)


if __name__ == "__main__":
    main()
