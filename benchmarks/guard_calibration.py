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
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from netmend.cli import write_json_atomic
from netmend.evaluation.controls import mean_se

LIMIT = 10.0
"""The guard's class limit, in points (:data:`netmend.treatment.guard.MAX_CLASS_DROP`)."""


Returned = dict[tuple[int, int], list[float]]
"""``(seed, K)`` -> the test class accuracies of the model the repair returns at that K: the
treatment call on ``causes[:K]`` with nothing held out (deterministic given the seed, so the
same in every run of that suite instance)."""


def _source(g: dict[str, Any], pipeline: str = "") -> str:
    """How the guard ran: where it read (``source``), and for records from before its
    ``readings`` field, the earlier variants (labels only on guard_data; the slice read against
    the untreated trial, commit 10176ac); a back-off other than halving is named from the
    pipeline's ``guard_shrink`` option."""
    if g.get("baseline") == "untreated":
        return "training slice, untreated"
    if g["source"] == "guard_data" and "readings" not in g:
        return "guard_data, labels only"
    shrink = re.search(r"guard_shrink=([0-9.]+)", pipeline)
    return str(g["source"]) + (f", shrink {shrink.group(1)}" if shrink else "")


def returned_models(results: list[dict[str, Any]]) -> Returned:
    """Every model-at-K the runs measured: the ``guard_data`` trials (each is that call) and
    each guarded pipeline's final cell."""
    out: Returned = {}
    for r in results:
        for c in r["cells"]:
            g = c.get("guard")
            if c.get("status") != "ok" or not g:
                continue
            out[(r["seed"], c["k"])] = c["class_acc"]
            if g.get("source") == "guard_data" and not g.get("skipped"):
                for t, acc in zip(g["tries"], g["trial_test_class_acc"], strict=True):
                    out[(r["seed"], t["k"])] = acc
    return out


def _drop(original: np.ndarray, acc: list[float] | None) -> tuple[float | None, int | None]:
    if acc is None:
        return None, None
    d = 100 * (original - np.asarray(acc, dtype=float))
    return float(np.nanmax(d)), int(np.nanargmax(d))


def trials(
    result: dict[str, Any], returned: Returned
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per guard trial of one suite result: the guard's reading, the test set's reading of the
    trial model, and of the model the repair would return at that K (where some run measured
    it); drops in points against the original model, as the guard reads them. And per guarded
    pipeline, its final cell."""
    cells = {c["pipeline"]: c for c in result["cells"]}
    original = np.asarray(cells["original"]["class_acc"], dtype=float)
    rows, finals = [], []
    for c in result["cells"]:
        g = c.get("guard")
        if c.get("status") != "ok" or not g or g.get("skipped"):
            continue
        source = _source(g, c["pipeline"])
        for t, acc in zip(g["tries"], g["trial_test_class_acc"], strict=True):
            worst, cls = _drop(original, acc)
            ret, ret_cls = _drop(original, returned.get((result["seed"], t["k"])))
            rows.append(
                {
                    "seed": result["seed"],
                    "source": source,
                    "k": t["k"],
                    "guard_class": t["worst_class"],
                    "guard_drop": 100 * t["worst_class_drop"],
                    "test_worst_class": cls,
                    "test_worst_drop": worst,
                    "returned_worst_class": ret_cls,
                    "returned_worst_drop": ret,
                }
            )
        v, gain = c["verdict"], c["gain"]
        finals.append(
            {
                "seed": result["seed"],
                "source": source,
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


def _errors(rs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    rs = [r for r in rs if r[key] is not None]
    if not rs:
        return {"trials": 0}
    err = np.array([r["guard_drop"] - r[key] for r in rs])
    return {
        "trials": len(rs),
        "mean_abs_error_points": float(np.abs(err).mean()),
        "mean_error_points": float(err.mean()),
        "largest_abs_error_points": float(np.abs(err).max()),
        "decisions_differing_from_test": sum(
            (r["guard_drop"] > LIMIT) != (r[key] > LIMIT) for r in rs
        ),
    }


def _mean_se(v: list[float]) -> tuple[float, float | None]:
    """:func:`netmend.evaluation.controls.mean_se`, with ``None`` (JSON) for one seed's s.e."""
    mean, se = mean_se(v)
    return mean, None if math.isnan(se) else se


def repairs(finals: list[dict[str, Any]]) -> dict[str, Any]:
    """Per way of running the guard, what its final cells did over the seeds: K per seed,
    the diagnosis gains over random-K (points, mean and s.e.) and the Pareto passes."""
    out: dict[str, Any] = {}
    for source in sorted({f["source"] for f in finals}):
        fin = sorted((f for f in finals if f["source"] == source), key=lambda f: f["seed"])
        held, held_se = _mean_se([f["heldout_gain"] for f in fin])
        test, test_se = _mean_se([f["test_gain"] for f in fin])
        out[source] = {
            "seeds": [f["seed"] for f in fin],
            "k": [f["k"] for f in fin],
            "heldout_gain": held,
            "heldout_gain_se": held_se,
            "test_gain": test,
            "test_gain_se": test_se,
            "passed": sum(f["passed"] for f in fin),
        }
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per way of running the guard: its error against the test set's reading of the trial
    model (``trial``) and of the model returned at that K (``returned``): mean |guard − test|
    and the trials whose pass/fail at the limit differs."""
    return {
        source: {
            "trial": _errors([r for r in rows if r["source"] == source], "test_worst_drop"),
            "returned": _errors([r for r in rows if r["source"] == source], "returned_worst_drop"),
        }
        for source in sorted({r["source"] for r in rows})
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="bench.json files of guarded pipelines")
    ap.add_argument("--out", default="benchmarks/guard_calibration.json")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    finals: list[dict[str, Any]] = []
    machine = None
    results = []
    for path in args.runs:
        d = json.loads(Path(path).read_text())
        machine = d.get("machine", machine)
        results += d["results"]
    returned = returned_models(results)
    for r in results:
        a, b = trials(r, returned)
        rows += a
        finals += b
    out = {
        "runs": args.runs,
        "machine": machine,
        "limit_points": LIMIT,
        "trials": rows,
        "finals": finals,
        "summary": summarise(rows),
        "repairs": repairs(finals),
    }
    write_json_atomic(args.out, out)
    print(json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
