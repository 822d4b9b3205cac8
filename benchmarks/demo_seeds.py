"""Run `netmend demo` (full MNIST) for several seeds and check the figures of issue 2.

Usage: .venv/bin/python benchmarks/demo_seeds.py [--seeds 0 1 2] [--out benchmarks/demo_seeds.json]
Writes every seed's result plus a summary (mean over seeds) and the targets met or missed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from netmend.cli import write_json_atomic
from netmend.lab import demo
from netmend.report.plots import demo_plots


def summarise(results: list[dict]) -> dict:
    """Mean over seeds of each run's figures, and the issue's targets for the default run."""
    names = [(r["identify"], r["treat"]) for r in results[0]["runs"]]
    runs = {}
    for i, (ident, treat) in enumerate(names):
        rows = [res["runs"][i] for res in results]
        keys = [k for k, v in rows[0].items() if isinstance(v, float)]
        runs[f"{ident}/{treat}"] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    refs = {
        name: {
            k: float(np.mean([res["references"][name][k] for res in results]))
            for k in results[0]["references"][name]
        }
        for name in results[0]["references"]
    }
    checks = []
    for res in results:
        d = next(r for r in res["runs"] if r["default"])
        o, c = res["references"]["original"], res["references"]["oracle_clean"]
        checks.append(
            {
                "seed": res["config"]["seed"],
                "halfway_to_oracle": d["test_acc"] - o["test_acc"]
                >= 0.5 * (c["test_acc"] - o["test_acc"]),
                "gap_closed": (d["test_acc"] - o["test_acc"]) / (c["test_acc"] - o["test_acc"]),
                "correct_drop_points": 100 * (o["correct_acc"] - d["correct_acc"]),
                "correct_drop_at_most_0.3": 100 * (o["correct_acc"] - d["correct_acc"]) <= 0.3,
                "heldout_vs_oracle": d["heldout_failure_acc"] / c["heldout_failure_acc"],
                "heldout_at_least_80pct_of_oracle": d["heldout_failure_acc"]
                >= 0.8 * c["heldout_failure_acc"],
                "precision": d["precision"],
                "precision_at_least_0.9": d["precision"] >= 0.9,
                "fisher_over_epoch": res["timing"]["fisher"] / res["timing"]["train_epoch"],
                "demo_seconds": res["timing"]["total"],
            }
        )
    return {"runs_mean": runs, "references_mean": refs, "targets": checks}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="benchmarks/demo_seeds.json")
    ap.add_argument("--plots", default="benchmarks/plots")
    args = ap.parse_args()
    results = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        res = demo.run(demo.DemoConfig(seed=seed), progress=False)
        art = res.pop("_artifacts")
        if seed == args.seeds[0] and args.plots:
            demo_plots(res, art, Path(args.plots))
        results.append(res)
        print(demo.table(res), flush=True)
        write_json_atomic(args.out, {"seeds": results, "summary": summarise(results)})
    print(f"total {time.perf_counter() - t0:.0f}s")
    for c in summarise(results)["targets"]:
        print(c)


if __name__ == "__main__":
    main()
