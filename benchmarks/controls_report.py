"""The figures of docs/evaluation-controls.md, generated from the benchmark JSONs (not typed).

Usage: .venv/bin/python benchmarks/controls_report.py \
           [--bench benchmarks/bench_controls_digits_all/bench.json] \
           [--demo benchmarks/demo_seeds.json] [--out benchmarks/controls_report.json] \
           [--doc docs/evaluation-controls.md]

Reads a ``netmend bench`` run with controls (every pipeline cell carries random-K,
finetune-only, the diagnosis gain and the Pareto verdict) and, if it exists, the demo over
seeds (``benchmarks/demo_seeds.py``); writes the summary JSON (with machine info) and the
markdown document: the protocol text below, then the tables.

The bench run behind the committed figures:

    OMP_NUM_THREADS=1 .venv/bin/netmend bench --out benchmarks/bench_controls_digits_all \
        --suites digits \
        --seeds 0 1 2 --pipelines ewc/finetune loss/finetune random/finetune \
        --references original finetune-only oracle-causes retrain-clean --no-plots
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from netmend.evaluation.controls import mean_se
from netmend.lab import bench
from netmend.lab.demo import machine
from netmend.store import write_json_atomic

PROTOCOL = """# Evaluation with controls

A repair is judged next to its **controls**, each made by the very same treatment call as
the repair (same method, options, training recipe, Fisher and seed), with only the causes
changed (`netmend.evaluation.controls`):

* **finetune-only**: the treatment with no causes removed (for the one-step deletions
  `newton`/`ewc`, which move nothing without causes, the original model);
* **random-K**: K uniformly drawn training examples, K = the pipeline's own K, over at least
  3 seeded draws (mean ± standard error);
* **oracle-causes**: the ground-truth corrupted set, where one is known (not on
  `digits/subgroup`, whose mask marks the under-represented members left in the training set:
  removing them is no oracle, so its oracle column is `-`);
* **retrain-clean**: the training recipe on the clean data (a reference, where one exists).

The **diagnosis gain** is the pipeline's held-out-failure (and test) accuracy minus the mean
of random-K: what finding the causes adds over removing as many examples at random.

## The Pareto criterion

A repair **counts** (`netmend.evaluation.repaired`) when

1. its held-out-failure accuracy is above random-K's mean;
2. its test accuracy is at least max(original, finetune-only) − 0.2 points;
3. no class's test accuracy falls by more than 10 points below the better of original and
   finetune-only on that class.

Rule 3 is what catches a repair that raises the held-out failures of class A only because
the model now predicts A for most of class B: a small class (or gains elsewhere) can hide
such a collapse from the overall test accuracy (`tests/test_controls.py` has the hand-made
case). Over seeds, `netmend bench` applies the same rule to the seed means
(`netmend.lab.bench.pareto_summary`).

## Caveats

* No default was chosen or tuned on the suites reported here, and the dev/test split of
  the suites (issue 11, scope 4) is not done: these tables judge today's default.
* The held-out failures of a digits suite are few (often 4–20), so one failure moves the
  held-out accuracy by 5–25 points; read the gains with their standard errors.
* The class-drop limit (10 points) is 4–5 test examples of a digits class: fine-tune noise
  alone comes near it (the `random/finetune` rows are K random causes with a different
  draw from random-K, i.e. what a diagnosis that knows nothing scores; their worst class
  drop is the noise level).

## For your own repair

```python
import netmend
from netmend import TrainConfig
from netmend.evaluation import split_failures

split = split_failures(model, X_test, y_test, seed=0)
failures = (X_test[split.query], y_test[split.query])
recipe = TrainConfig(epochs=20)  # how `model` was trained: the repair's fine-tune follows it
result = netmend.repair(model, (X_train, y_train), failures, train_config=recipe)
judged = netmend.with_controls(
    model, (X_train, y_train), (X_test, y_test), split, result,
    truth=None,            # known corrupted training indices, if any (oracle-causes)
    clean_train=None,      # a clean training set, if any (retrain-clean)
)
judged["gain"]     # held-out failures and test accuracy vs random-K, with s.e.
judged["verdict"]  # {"passed": ..., "reasons": [...], ...}
```

`with_controls` refuses inputs that do not belong together, since the figures would be
measured on the wrong examples: a `result` that repaired another model, a training set of
another size than the repair scored, a split whose "failures" the model gets right (another
or reordered test set; a few disagreements are allowed for a split made on another device),
split indices past the test set, and a `truth` that is neither integer indices nor a mask.

`netmend demo` and `netmend bench` print the same controls, gain and verdict for every
pipeline (`--json` / `bench.json` hold them).

## The automatic K

* With 4 or more query failures, the failures are split into two random halves three times,
  the training set is scored against every half, and K is the **largest** K whose agreement
  between halves (the share of one half's top K that the other half also blames, above
  chance), averaged over the splits, is at least 0.9 of its best
  (`netmend.identification.k_rules.edge_rule`): the far edge of the plateau of culprits both
  halves blame. Where the halves agree on nothing beyond chance, the per-failure handful
  below is taken, with a warning.
* The rule was chosen on the *dev* suites (the 10 digits suites, seeds 0–2), against netmend
  0.3's argmax of one split's agreement and two others (`benchmarks/k_rule.py`, written
  down in `benchmarks/k_rule_dev.json`): by the most Pareto passes, then the highest mean
  held-out diagnosis gain. The demo (full MNIST) is a *test* suite: it reports only.
* With 1–3 failures there are no halves to compare: K is the union of each failure's top 5
  culprits (per-failure scores, positive only), a handful, never every r > 0.
* The automatic K never selects more than 30% of one class's training examples
  (`netmend.identification.base.class_capped`, `MAX_CLASS_SHARE`): a fine-tune without much
  of a class forgets it (on the demo's seed 0, half a class let 709 clean 1s in, and class 1
  fell from 99.4% to 73.3%). Any selection that holds more than half of a class (an explicit
  `k`) is warned about and recorded in `Identification.info["classes_over_half"]`.
* With the `finetune` treatment, `netmend.repair` then runs the **class guard**
  (`netmend.treatment.guard`): a trial fine-tune with 5% of each class held out, K halved
  while some class loses more than 10 points on that slice (by its labels, or by agreement
  with the original's predictions net of the churn of a fine-tune that removes nothing;
  with `guard_data`, a validation split the user supplies, by its labels there). It was
  added after the converged Fashion-MNIST test suite showed the automatic K collapsing a
  class; it judges no class of the digits (too few examples), so the digits figures below
  are unchanged by it.
"""


def bench_summary(result: dict[str, Any]) -> dict[str, Any]:
    """Pareto summary per pipeline and suite, plus the automatic K's spread over seeds."""
    pareto = bench.pareto_summary(result)
    ks: dict[str, dict[str, list[int]]] = {}
    oracle: dict[str, list[float]] = {}
    for r in result["results"]:
        cells = {c["pipeline"]: c for c in r["cells"] if c["status"] == "ok"}
        for name, c in cells.items():
            if c["kind"] == "pipeline" and c.get("k_rule") == "auto":
                ks.setdefault(name, {}).setdefault(r["suite"], []).append(int(c["k"]))
        o, ref = cells.get("oracle-causes"), cells.get("ewc/finetune")
        if not bench.masks_causes(r["suite"]):  # its mask marks members to keep, not causes
            o = None
        if o is not None and ref is not None and ref.get("controls"):
            rk = ref["controls"]["random_k"]["heldout_failure_acc"]
            oracle.setdefault(r["suite"], []).append(o["heldout_failure_acc"] - rk)
    cv = {
        name: {
            suite: {
                "k": v,
                "cv": float(np.std(v, ddof=1) / np.mean(v)) if len(v) > 1 and np.mean(v) else None,
            }
            for suite, v in per.items()
        }
        for name, per in ks.items()
    }
    return {
        "pareto": pareto,
        "auto_k": cv,
        "oracle_heldout_gain_vs_ewc_random_k": {s: mean_se(v) for s, v in oracle.items()},
        "machine": result.get("machine"),
        "seeds": sorted({r["seed"] for r in result["results"]}),
    }


def _pm(mean: float, se: float | None) -> str:
    se_text = "-" if se is None or (isinstance(se, float) and math.isnan(se)) else f"{100 * se:.1f}"
    return f"{100 * mean:+.1f} ± {se_text}"


def bench_markdown(s: dict[str, Any]) -> str:
    m = s["machine"] or {}
    lines = [
        "## Digits suites (`netmend bench`, MLP, seeds " + f"{s['seeds']})",
        "",
        f"Measured on {m.get('processor')}, {m.get('cpus')} CPUs, torch {m.get('torch')}; "
        "generated by `benchmarks/controls_report.py` from `benchmarks/bench_controls_digits_all/"
        "bench.json`. Gains in points of %, mean ± s.e. over seeds.",
        "",
        "| suite | pipeline | diagnosis gain, held-out F | gain, test | oracle-causes gain, "
        "held-out F | test margin | worst class drop | repairs | seeds passing | auto-K per "
        "seed | K's CV |",
        "|" + "---|" * 11,
    ]
    for name, row in s["pareto"].items():
        for suite, v in row["suites"].items():
            k = s["auto_k"].get(name, {}).get(suite)
            o = s["oracle_heldout_gain_vs_ewc_random_k"].get(suite)
            oracle = _pm(*o) if o is not None and name == "ewc/finetune" else "-"
            cv = "-" if not k or k["cv"] is None else f"{k['cv']:.2f}"
            drop = v["worst_class_drop"]
            drop_text = "-" if drop is None or drop != drop else f"{100 * drop:.1f}"
            lines.append(
                f"| {suite} | {name} | {_pm(v['heldout_gain'], v['heldout_gain_se'])} "
                f"| {_pm(v['test_gain'], v['test_gain_se'])} | {oracle} "
                f"| {100 * v['test_margin']:+.1f} "
                f"| {drop_text} "
                f"| {'yes' if v['repairs'] else 'no'} | {v['seed_passes']} of {v['seeds']} "
                f"| {', '.join(map(str, k['k'])) if k else '-'} | {cv} |"
            )
    lines.append("")
    for name, row in s["pareto"].items():
        lines.append(f"* `{name}` repairs {row['repairs']} of {row['of']} suites.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", default="benchmarks/bench_controls_digits_all/bench.json")
    ap.add_argument("--demo", default="benchmarks/demo_seeds.json")
    ap.add_argument("--out", default="benchmarks/controls_report.json")
    ap.add_argument("--doc", default="docs/evaluation-controls.md")
    args = ap.parse_args()
    doc = PROTOCOL
    out: dict[str, Any] = {"machine": machine()}
    demo_ready = Path(args.demo).exists() and "pipelines" in json.loads(
        Path(args.demo).read_text()
    ).get("summary", {})
    if demo_ready:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "demo_seeds", Path(__file__).with_name("demo_seeds.py")
        )
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        demo_doc = json.loads(Path(args.demo).read_text())
        out["demo"] = demo_doc["summary"]
        doc += "\n## The demo (`benchmarks/demo_seeds.py`)\n\n" + mod.render(demo_doc)
    if Path(args.bench).exists():
        s = bench_summary(json.loads(Path(args.bench).read_text()))
        out["bench"] = s
        doc += "\n" + bench_markdown(s)
    write_json_atomic(args.out, out)
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text(doc)
    print(doc)


if __name__ == "__main__":
    main()
