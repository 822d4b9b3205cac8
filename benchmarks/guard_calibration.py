"""How well each way of running the class guard reads a trial repair's class drop.

The class guard (:mod:`netmend.treatment.guard`) halves the automatic K while a trial
fine-tune makes some class fall by more than 10 points. What it reads that fall on decides
what it does: by default a 5% slice held out of the training set (the original model fitted
those examples, noisy labels included), or, with ``guard_data``, a validation split the
original never trained on. The bench runs both on the same suite instance
(``netmend bench --validation-share 0.05`` holds a stratified 5% of each noisy class out of
everything; ``finetune[guard=true]`` is today's guard, ``finetune[guard=data]`` the guard on
that split) and reads every trial model on the clean test set as well
(``guard.trial_test_class_acc``). This script compares, trial by trial:

* the guard's decisive reading (its worst class and that class's drop, in points), and
* the test set's reading of the same model: the largest class drop against the original,
  and the drop of the class the guard named,

and counts the trials where the guard's pass/fail (limit 10 points) differs from the test
set's. It also lists each pipeline's final cell (K, diagnosis gain, Pareto verdict), so the
calibration stands next to what the guard's choice did.

Usage::

    OMP_NUM_THREADS=1 netmend bench --suites fashion-full/pair \\
        --pipelines "ewc[gate=true]/finetune[guard=true]" "ewc[gate=true]/finetune[guard=data]" \\
        --references original finetune-only oracle-causes --seeds 0 1 --no-plots \\
        --validation-share 0.05 --out benchmarks/guard_data_dev/fashion_s01
    .venv/bin/python benchmarks/guard_calibration.py benchmarks/guard_data_dev/*/bench.json \\
        --out benchmarks/guard_calibration.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from netmend.cli import write_json_atomic

LIMIT = 10.0
"""The guard's class limit, in points (:data:`netmend.treatment.guard.MAX_CLASS_DROP`)."""


def trials(result: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per guard trial of one suite result: the guard's reading and the test set's (drops in
    points against the original model, as the guard reads them); and per guarded pipeline,
    its final cell."""
    cells = {c["pipeline"]: c for c in result["cells"]}
    original = np.asarray(cells["original"]["class_acc"], dtype=float)
    rows, finals = [], []
    for c in result["cells"]:
        g = c.get("guard")
        if c.get("status") != "ok" or not g or g.get("skipped"):
            continue
        for t, acc in zip(g["tries"], g["trial_test_class_acc"], strict=True):
            drop = 100 * (original - np.asarray(acc, dtype=float))
            rows.append(
                {
                    "seed": result["seed"],
                    "source": g["source"],
                    "k": t["k"],
                    "guard_class": t["worst_class"],
                    "guard_drop": 100 * t["worst_class_drop"],
                    "test_drop_same_class": float(drop[t["worst_class"]]),
                    "test_worst_class": int(np.nanargmax(drop)),
                    "test_worst_drop": float(np.nanmax(drop)),
                }
            )
        v, gain = c["verdict"], c["gain"]
        finals.append(
            {
                "seed": result["seed"],
                "source": g["source"],
                "k": c["k"],
                "precision": c["precision"],
                "heldout_gain": 100 * gain["heldout_gain"],
                "heldout_gain_se": 100 * gain["heldout_gain_se"],
                "test_gain": 100 * gain["test_gain"],
                "test_gain_se": 100 * gain["test_gain_se"],
                "test_acc": 100 * c["test_acc"],
                "test_floor": 100 * v["test_floor"],
                "passed": bool(v["passed"]),
                "reasons": v["reasons"],
            }
        )
    return rows, finals


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per guard source: mean |guard − test| on the worst class, and pass/fail agreement."""
    out: dict[str, Any] = {}
    for source in sorted({r["source"] for r in rows}):
        rs = [r for r in rows if r["source"] == source]
        err = np.array([r["guard_drop"] - r["test_worst_drop"] for r in rs])
        disagree = [r for r in rs if (r["guard_drop"] > LIMIT) != (r["test_worst_drop"] > LIMIT)]
        out[source] = {
            "trials": len(rs),
            "mean_abs_error_points": float(np.abs(err).mean()),
            "mean_error_points": float(err.mean()),
            "largest_abs_error_points": float(np.abs(err).max()),
            "decisions_differing_from_test": len(disagree),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="bench.json files of guarded pipelines")
    ap.add_argument("--out", default="benchmarks/guard_calibration.json")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    finals: list[dict[str, Any]] = []
    machine = None
    for path in args.runs:
        d = json.loads(Path(path).read_text())
        machine = d.get("machine", machine)
        for r in d["results"]:
            a, b = trials(r)
            rows += a
            finals += b
    out = {
        "runs": args.runs,
        "machine": machine,
        "limit_points": LIMIT,
        "trials": rows,
        "finals": finals,
        "summary": summarise(rows),
    }
    write_json_atomic(args.out, out)
    print(json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
