"""Which automatic-K rule? Chosen on the *dev* suites, judged on the *test* suites (issue 11).

For each suite and seed: train the suite's model, take its failures, score the training set
with the default method ("ewc") on all query failures and on ``--splits`` random half-splits
of them (the evidence every automatic-K rule uses), then, for each candidate rule, treat the
model with the default recipe ("finetune") without the rule's K causes, next to the controls
measured in the same run: ``finetune-only``, ``random-K`` (the rule's own K, 3 draws) and
``oracle-causes``. Rules (``netmend.identification.k_rules``):

* ``argmax``: the K where two halves agree best (netmend 0.3's rule, one split);
* ``edge``: the largest K whose agreement, averaged over the splits, is at least
  ``REPRODUCIBLE`` of its maximum (the far edge of the plateau of reproducible culprits);
* ``crossfit``: the K whose top-K from one half most helps the other half, by its scores;
* ``mirror``: the negative scores as a null for the positive ones (FDR 0.1).

Writes ``k_rule.json`` (every figure, per suite and seed) and prints the per-rule summary:
coefficient of variation of K over seeds per suite, diagnosis gain (held-out failures and test
accuracy vs random-K), Pareto passes.

    python benchmarks/k_rule.py --suites digits --seeds 0 1 2 --out benchmarks/k_rule_dev.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netmend import api
from netmend.evaluation.controls import (
    Controls,
    class_accuracies,
    diagnosis_gain,
    random_causes,
    repaired,
)
from netmend.identification import class_capped, k_rules, select
from netmend.lab import bench
from netmend.lab.demo import machine
from netmend.model.training import fit


def half_scores(model, noisy, Xq, yq, seed: int, splits: int, common: dict) -> list:
    """Scores of the training set against each half of ``splits`` random half-splits."""
    m = len(yq)
    pairs = []
    for s in range(splits):
        perm = torch.from_numpy(np.random.default_rng([seed, s]).permutation(m))
        pair = []
        for part in (perm[: m // 2], perm[m // 2 :]):
            ident = api.identify(model, noisy, (Xq[part], yq[part]), "ewc", 0, **common)
            pair.append(ident.scores)
        pairs.append(pair)
    return pairs


def run_one(
    suite: str, seed: int, splits: int, draws: int, rules: list[str], max_share: float
) -> dict[str, Any]:
    data = bench.make_suite(suite, seed)
    dataset, _ = bench.parse_suite(suite)
    spec = bench.DATASETS[dataset]
    device = torch.device("cpu")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = fit(spec.model(), data.train.X, data.train.y, spec.recipe, seed, device, False)
    split = bench._split(model, data, device)
    Xq, yq = data.eval.X[split.query], data.eval.y[split.query]
    noisy = (data.train.X, data.train.y)
    common: dict[str, Any] = dict(seed=seed, device=device, progress=False)
    full = api.identify(model, noisy, (Xq, yq), "ewc", 0, **common)
    pairs = half_scores(model, noisy, Xq, yq, seed, splits, common) if len(yq) >= 4 else []
    positive = select(full.scores, "positive")

    def measure(m: torch.nn.Module) -> dict[str, Any]:
        acc = bench.suite_accuracies(m, data, split, device)
        return {**acc, "class_acc": class_accuracies(m, data.test.X, data.test.y, 10)}

    def treat(causes: np.ndarray) -> torch.nn.Module:
        return api.treat(
            model,
            noisy,
            causes,
            "finetune",
            train_config=spec.recipe,
            allow_no_causes=True,
            **common,
        )

    original = measure(model)
    only = measure(treat(np.zeros(0, np.int64)))
    truth = np.flatnonzero(data.mask)
    oracle = measure(treat(truth)) if truth.size else None
    out: dict[str, Any] = {
        "suite": suite,
        "seed": seed,
        "n_train": len(data.train),
        "corrupted": int(truth.size),
        "query_failures": len(split.query),
        "heldout_failures": len(split.heldout),
        "positive": int(positive.size),
        "original": original,
        "finetune_only": only,
        "oracle": oracle,
        "rules": {},
    }
    random_cache: dict[int, list[dict[str, Any]]] = {}
    for name in rules:
        rule = k_rules.RULES[name]
        if pairs:
            k, evidence = rule(
                [p[0] for p in pairs], [p[1] for p in pairs], positive.size, full.scores
            )
        else:
            k, evidence = 0, {}
        causes = class_capped(positive[:k], data.train.y, max_share)
        k = int(causes.size)
        figures = measure(treat(causes))
        if k not in random_cache:
            random_cache[k] = [
                measure(treat(random_causes(len(data.train), k, d, seed))) for d in range(draws)
            ]
        ctl = Controls(k, original, only, random_cache[k])
        out["rules"][name] = {
            "k": k,
            "precision": float(data.mask[causes].mean()) if k else None,
            "figures": figures,
            "random_k": ctl.as_dict()["random_k"],
            "gain": diagnosis_gain(figures, ctl),
            "verdict": repaired(figures, ctl).as_dict(),
            "evidence": {str(a): b for a, b in evidence.items()},
        }
        print(suite, seed, name, k, out["rules"][name]["gain"], file=sys.stderr, flush=True)
    out["seconds"] = time.perf_counter() - t0
    return out


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    rules = sorted({r for res in results for r in res["rules"]})
    suites = sorted({res["suite"] for res in results})
    summary: dict[str, Any] = {}
    for rule in rules:
        per_suite = {}
        for suite in suites:
            rows = [res["rules"][rule] for res in results if res["suite"] == suite]
            ks = np.array([r["k"] for r in rows], dtype=float)
            gains = np.array([r["gain"]["heldout_gain"] for r in rows])
            tgains = np.array([r["gain"]["test_gain"] for r in rows])
            se = lambda v: float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None  # noqa: E731
            per_suite[suite] = {
                "k": ks.tolist(),
                "k_cv": float(ks.std(ddof=1) / ks.mean()) if len(ks) > 1 and ks.mean() else None,
                "heldout_gain": float(gains.mean()),
                "heldout_gain_se": se(gains),
                "test_gain": float(tgains.mean()),
                "test_gain_se": se(tgains),
                "pareto": int(sum(r["verdict"]["passed"] for r in rows)),
                "runs": len(rows),
            }
        summary[rule] = per_suite
    return summary


def overall(summary: dict[str, Any]) -> dict[str, Any]:
    """Per rule, over the suites: what benchmarks/README.md's table shows."""
    out = {}
    for rule, per in summary.items():
        cvs = [v["k_cv"] for v in per.values() if v["k_cv"] is not None]
        held = [v["heldout_gain"] for v in per.values()]
        test = [v["test_gain"] for v in per.values()]
        out[rule] = {
            "suites": len(per),
            "suites_with_cv": len(cvs),
            "suites_cv_le_0.3": sum(c <= 0.3 for c in cvs),
            "mean_cv": float(np.mean(cvs)) if cvs else None,
            "mean_heldout_gain": float(np.mean(held)),
            "suites_with_positive_gain": sum(h > 0 for h in held),
            "mean_test_gain": float(np.mean(test)),
            "pareto_passes": sum(v["pareto"] for v in per.values()),
            "runs": sum(v["runs"] for v in per.values()),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suites", nargs="+", default=["digits"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--splits", type=int, default=3)
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rules", nargs="+", default=list(k_rules.RULES), choices=list(k_rules.RULES))
    p.add_argument(
        "--max-class-share", type=float, default=0.5, help="the class cap on the selected K"
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/k_rule_dev.json"))
    p.add_argument("--resummarise", type=Path, help="only recompute a JSON's summaries")
    a = p.parse_args(argv)
    if a.resummarise is not None:
        doc = json.loads(a.resummarise.read_text())
        doc["summary"] = summarise(doc["results"])
        doc["overall"] = overall(doc["summary"])
        tmp = a.resummarise.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=float))
        tmp.replace(a.resummarise)
        return
    torch.set_num_threads(a.threads)
    results = [
        run_one(s, seed, a.splits, a.draws, a.rules, a.max_class_share)
        for s in bench.expand_suites(a.suites)
        for seed in a.seeds
    ]
    doc = {
        "config": {**vars(a), "out": str(a.out)},
        "machine": machine(),
        "note": "2 CPU cores shared with other jobs while measured; no timings are claimed",
        "summary": summarise(results),
        "results": results,
    }
    doc = {
        **{key: doc[key] for key in ("config", "machine", "note", "summary")},
        "overall": overall(doc["summary"]),
        "results": results,
    }
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=float))
    tmp.replace(a.out)
    print(json.dumps(doc["summary"], indent=1))


if __name__ == "__main__":
    main()
