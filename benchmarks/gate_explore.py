"""Does a label-quality gate keep the diagnosis's held-out gain and stop its test-accuracy loss?
(exploratory, dev runs only)

On the converged test suites the default's causes are 25-58% clean (issue 11,
``docs/test-suites.md``): the failures blame hard, correctly labelled examples near the
boundary they cross as well as the flipped ones, and removing the clean ones costs test
accuracy that random-K does not lose. Issue 11's scope 4 suggests a combination: a
failure-conditioned score to pick *which* examples, a label-quality signal to decide *how
many*. The cheapest label-quality signal is the original model's own prediction on its
training example: keep a cause only when the model does not predict its given label
(cleanlab's ``predicted_neq_given`` test, in-sample, one forward pass).

For the default's causes (auto-K, then the class guard, as :func:`netmend.repair`), this
script compares, with the same fine-tune recipe as ``netmend.repair``:

* ``default``: the guarded causes;
* ``gated``: the automatic causes the original model disagrees with, then the guard;
* ``disagree-all``: every training example the model disagrees with (failure-blind);
* the controls: ``finetune-only`` (no causes), ``random-K`` for each K (``--draws`` draws),
  and ``oracle-causes`` (the corrupted set).

It runs on dev suites and seeds only (``mnist-full/pair`` seed 0 = the demo's seed 0, and
``fashion-full/pair`` seed 0, on which the guard was designed); the test seeds are judged by
``netmend bench`` afterwards.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gate_explore.py            # digits, 7 min
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/gate_explore.py \\
        --suites fashion-full/pair mnist-full/pair --seeds 0 --draws 2 \\
        --out benchmarks/gate_explore_full.json                                  # 12 min
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
from netmend.data.source import as_source
from netmend.evaluation.controls import TEST_TOLERANCE
from netmend.identification import class_capped
from netmend.lab import bench
from netmend.lab.bench import repairs_on_means
from netmend.lab.demo import machine
from netmend.model.training import class_accuracies, predict
from netmend.store import write_json_atomic
from netmend.treatment.guard import guard_k

PAIR_SHARE = 0.05
"""``--pairs`` keeps the (unordered) class confusions that name at least this share of the
gated causes."""


def explore(
    suite: str, seed: int, draws: int, wide: bool = False, pairs: bool = False
) -> dict[str, Any]:
    """One suite and seed: the candidate cause sets, each fine-tuned next to its random-K."""
    data, spec, model, split, ident = dev_run(suite, seed)
    X, y = data.train.X, data.train.y  # y: the noisy labels
    mask = np.asarray(data.mask, dtype=bool)
    pred, labels = predict(model, X).numpy(), y.numpy()
    disagree = pred != labels

    def treat(causes: np.ndarray) -> torch.nn.Module:
        return netmend.treat(
            model, (X, y), causes, "finetune", train_config=spec.recipe, seed=seed,
            progress=False, allow_no_causes=True,
        )  # fmt: skip

    def guarded(causes: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        g = guard_k(treat, model, as_source((X, y)), causes, seed, "cpu")
        return causes[: g.k], g.as_dict()

    original_cls = class_accuracies(model, data.test.X, data.test.y, bench.NUM_CLASSES)

    def figures(m: torch.nn.Module) -> dict[str, Any]:
        f: dict[str, Any] = bench.suite_accuracies(m, data, split, "cpu")
        drops = [o - r for o, r in zip(original_cls, class_accuracies(
            m, data.test.X, data.test.y, bench.NUM_CLASSES), strict=True)]  # fmt: skip
        f["worst_class_drop"], f["worst_class"] = max(drops), int(np.argmax(drops))
        return f

    rows: dict[str, Any] = {"original": figures(model)}
    auto = np.asarray(ident.causes)
    candidates = {
        "default": guarded(auto),
        "gated": guarded(auto[disagree[auto]]),
        "disagree-all": (np.flatnonzero(disagree), None),
        "oracle-causes": (np.flatnonzero(mask), None),
    }
    if pairs:  # every label-error candidate of the confusions the gated causes name
        c = bench.NUM_CLASSES

        def confusion(i: np.ndarray) -> np.ndarray:  # the unordered pair {label, prediction}
            return np.minimum(labels[i], pred[i]) * c + np.maximum(labels[i], pred[i])

        gated = auto[disagree[auto]]
        counts = np.bincount(confusion(gated), minlength=c * c)
        keep = counts >= PAIR_SHARE * max(1, gated.size)
        every = np.flatnonzero(disagree)
        chosen = every[keep[confusion(every)]]
        chosen = chosen[np.argsort(-ident.scores[chosen], kind="stable")]
        candidates["pairs"] = guarded(chosen)
    if wide:  # every positive-scored label-error candidate, most harmful first, class-capped
        positive = np.flatnonzero(ident.scores > 0)
        positive = positive[np.argsort(-ident.scores[positive], kind="stable")]
        candidates["wide"] = guarded(class_capped(positive[disagree[positive]], y))
    rows["finetune-only"] = {**figures(treat(np.zeros(0, np.int64))), "k": 0}
    rng = np.random.default_rng([seed, 0xC0DE])
    for name, (causes, guard) in candidates.items():
        k = int(causes.size)
        row = {**figures(treat(causes)), "k": k, "guard": guard}
        row["precision"] = float(mask[causes].mean()) if k else None
        row["recall"] = float(mask[causes].sum() / max(1, mask.sum()))
        if name != "oracle-causes":
            drawn = [figures(treat(rng.choice(len(y), k, replace=False))) for _ in range(draws)]
            row["random_k"] = {key: float(np.mean([d[key] for d in drawn])) for key in drawn[0]
                               if key != "worst_class"}  # fmt: skip
        rows[name] = row
        print(suite, seed, name, {key: v for key, v in row.items()
                                  if key not in ("guard", "random_k")}, flush=True)  # fmt: skip
    return {
        "suite": suite,
        "seed": seed,
        "auto_k": int(auto.size),
        "auto_precision": float(mask[auto].mean()) if auto.size else None,
        "gate_share": float(disagree[auto].mean()) if auto.size else 0.0,
        "in_sample_disagreement": float(disagree.mean()),
        "disagreement_precision": float(mask[disagree].mean()) if disagree.any() else None,
        "disagreement_recall": float(mask[disagree].sum() / max(1, mask.sum())),
        "rows": rows,
    }


def verdict(run: dict[str, Any], name: str) -> dict[str, float]:
    """Held-out gain over the row's own random-K, test margin over the Pareto floor
    (max(original, finetune-only) - 0.2 points) and worst class drop, all as fractions."""
    r = run["rows"]
    row = r[name]
    floor = max(r["original"]["test_acc"], r["finetune-only"]["test_acc"]) - TEST_TOLERANCE
    return {
        "heldout_gain": row["heldout_failure_acc"] - row["random_k"]["heldout_failure_acc"],
        "test_margin": row["test_acc"] - floor,
        "worst_class_drop": row["worst_class_drop"],
    }


def summarise(runs: list[dict[str, Any]], shares: list[float]) -> dict[str, Any]:
    """Per suite, on seed means: the Pareto rule for the ungated default and for the gate at
    each share (gated where the run's share of candidates reaches it, else the default)."""
    out: dict[str, Any] = {}
    for suite in dict.fromkeys(r["suite"] for r in runs):
        mine = [r for r in runs if r["suite"] == suite]
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in mine],
                                 "gate_share": [r["gate_share"] for r in mine]}  # fmt: skip
        choices = {"default": [("default", r) for r in mine]}
        if all("pairs" in r["rows"] for r in mine):  # the confusions' candidates, same share
            choices["pairs@0.3"] = [("pairs" if r["gate_share"] >= 0.3 else "default", r)
                                    for r in mine]  # fmt: skip
        if all("wide" in r["rows"] for r in mine):  # the wide gate, at the chosen share
            choices["wide@0.3"] = [("wide" if r["gate_share"] >= 0.3 else "default", r)
                                   for r in mine]  # fmt: skip
        for t in shares:
            choices[f"gate@{t:g}"] = [("gated" if r["gate_share"] >= t else "default", r)
                                      for r in mine]  # fmt: skip
        for label, picks in choices.items():
            v = [verdict(r, name) for name, r in picks]
            m = {key: float(np.mean([x[key] for x in v])) for key in v[0]}
            m["repairs"] = repairs_on_means(m["heldout_gain"], m["test_margin"],
                                            m["worst_class_drop"])  # fmt: skip
            entry[label] = m
        out[suite] = entry
    totals = {
        label: sum(e[label]["repairs"] for e in out.values())
        for label in next(iter(out.values()))
        if label not in ("seeds", "gate_share")
    }
    return {"suites": out, "repairs": totals}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suites", nargs="+", default=["digits"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--shares", nargs="+", type=float, default=[0.2, 0.25, 0.3, 0.4, 0.5])
    p.add_argument("--out", type=Path, default=Path("benchmarks/gate_explore_digits.json"))
    p.add_argument(
        "--pairs",
        action="store_true",
        help="also try every candidate of the class confusions the gated causes name",
    )
    p.add_argument(
        "--wide",
        action="store_true",
        help="also try every positive-scored candidate (class-capped), not only the auto-K's",
    )
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    runs = [
        explore(s, seed, a.draws, a.wide, a.pairs)
        for s in bench.expand_suites(a.suites)
        for seed in a.seeds
    ]
    doc = {
        "config": {**vars(a), "out": str(a.out)},
        "machine": machine(),
        "note": "exploratory dev runs (suites and seeds the default is chosen on)",
        "summary": summarise(runs, a.shares),
        "runs": runs,
        "seconds": time.perf_counter() - t_start,
    }
    write_json_atomic(a.out, bench._nan_to_none(doc))


if __name__ == "__main__":
    main()
