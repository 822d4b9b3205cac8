"""Which class's thin half makes a selection-bias suite that actually fails?

The bench's ``subgroup`` corruption drops 90% of one class's thinner half (ink below the class
median). A suite only measures a repair if that bias makes the model fail on the subgroup. For
each data set of ``netmend bench`` (same subsets, model and recipe) and each class, this trains
the bench's model on the biased training set and on the unbiased one (same subset, same seed)
and counts, among the test set's members of the subgroup, the errors of each. The bias's effect
is the difference; ``netmend.lab.bench`` uses the class with the largest effect. Also counted: all
test errors of the biased model, of which the subgroup's are the share a suite drawing its
failures from the whole test set would have been about.

Usage: ``python benchmarks/subgroup_classes.py [--datasets digits mnist fashion]
[--seeds 0 1] [--json PATH]`` (on one CPU thread, beside other jobs: digits 15 s, MNIST and
Fashion-MNIST about 100 s each). Chosen: digits 8, MNIST 5, Fashion-MNIST 4 (coat); class 3,
used before, added 1 error in 46 test members on digits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from netmend.cli import write_json_atomic
from netmend.lab.bench import DATASETS, NUM_CLASSES, SUBGROUP_KEEP, _subset
from netmend.lab.corrupt import selection_bias, subgroup_mask
from netmend.lab.demo import machine
from netmend.model.training import fit, predict


def sweep(dataset: str, seeds: list[int]) -> dict[str, Any]:
    """Per class: subgroup test members and the errors on them, biased vs unbiased, summed
    over ``seeds``."""
    spec = DATASETS[dataset]
    train_all, test_all = spec.load()
    rows: dict[int, dict[str, int]] = {
        c: {"members": 0, "errors_biased": 0, "errors_unbiased": 0, "all_errors_biased": 0}
        for c in range(NUM_CLASSES)
    }
    for seed in seeds:
        train = _subset(train_all, spec.train_size, seed)
        test = _subset(test_all, spec.test_size, seed + 1)
        torch.manual_seed(seed)
        full = fit(spec.model(), train.X, train.y, spec.recipe, seed, "cpu", False, "unbiased")
        wrong_full = predict(full, test.X) != test.y
        for c in range(NUM_CLASSES):
            bias = selection_bias(train.X, train.y, c, SUBGROUP_KEEP, seed)
            if bias.inputs is None:  # selection_bias always returns the kept inputs
                raise RuntimeError("selection_bias returned no inputs")
            torch.manual_seed(seed)
            model = fit(spec.model(), bias.inputs, bias.labels, spec.recipe, seed, "cpu", False)
            sub = subgroup_mask(test.X, test.y, bias.info)
            wrong = predict(model, test.X) != test.y
            rows[c]["members"] += int(sub.sum())
            rows[c]["errors_biased"] += int((wrong & sub).sum())
            rows[c]["errors_unbiased"] += int((wrong_full & sub).sum())
            rows[c]["all_errors_biased"] += int(wrong.sum())
    effect = {c: (r["errors_biased"] - r["errors_unbiased"]) / max(r["members"], 1)
              for c, r in rows.items()}  # fmt: skip
    best = max(effect, key=lambda c: effect[c])
    return {
        "classes": {str(c): {**r, "effect": effect[c]} for c, r in rows.items()},
        "best": best,
    }


def main() -> None:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["digits", "mnist", "fashion"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    out: dict[str, Any] = {"seeds": args.seeds, "keep": SUBGROUP_KEEP, "machine": machine()}
    if args.json.exists():  # keep the data sets not rerun
        out = {**json.loads(args.json.read_text()), **out}
    for d in args.datasets:
        t0 = time.perf_counter()
        out[d] = {**sweep(d, args.seeds), "seconds": time.perf_counter() - t0}
        write_json_atomic(args.json, out)
        print(f"{d}: best class {out[d]['best']}")
        for c, r in out[d]["classes"].items():
            print(
                f"  {c}: {r['members']} subgroup test members, errors biased "
                f"{r['errors_biased']} / unbiased {r['errors_unbiased']}, effect "
                f"{r['effect']:+.2f}; all test errors (biased) {r['all_errors_biased']}"
            )


if __name__ == "__main__":
    main()
