"""Render benchmarks/demo_seeds.json as markdown tables (demo_seeds.md; benchmarks/README.md
through make_readme.py, without the mean row, which is derived rather than stored).

Usage: .venv/bin/python benchmarks/render.py [benchmarks/demo_seeds.json] > benchmarks/demo_seeds.md
"""

from __future__ import annotations

import json
import sys

import numpy as np


def pct(v: float) -> str:
    return f"{100 * v:.2f}"


def render(data: dict, mean_row: bool = True) -> str:
    seeds = data["seeds"]
    s = data["summary"]
    out = []
    m = seeds[0]["machine"]
    out.append(
        f"Full MNIST (60k/10k), SmallCNN, paper's corruption; mean over seeds "
        f"{[r['config']['seed'] for r in seeds]}; {m['processor']}, {m['cpus']} CPUs, "
        f"{m['torch_threads']} torch threads, torch {m['torch']}, no GPU.\n"
    )
    out.append(
        "| pipeline | K | cause precision | recall | AUROC | prec@K=#corrupted | culprit prec@5 "
        "| test acc | held-out F acc | query F acc | correct acc | seconds |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in s["runs_mean"].items():
        star = " (default)" if seeds[0]["runs"][list(s["runs_mean"]).index(name)]["default"] else ""
        out.append(
            f"| {name}{star} | {r['k']:.0f} | {r['precision']:.3f} | {r['recall']:.3f} | "
            f"{r['auroc']:.3f} | {r['precision_at_true_k']:.3f} | "
            f"{r['culprit_precision_at_5']:.3f} | {pct(r['test_acc'])} | "
            f"{pct(r['heldout_failure_acc'])} | {pct(r['query_failure_acc'])} | "
            f"{pct(r['correct_acc'])} | {r['seconds']:.0f} |"
        )
    for name, r in s["references_mean"].items():
        out.append(
            f"| *{name}* | | | | | | | {pct(r['test_acc'])} | {pct(r['heldout_failure_acc'])} | "
            f"{pct(r['query_failure_acc'])} | {pct(r['correct_acc'])} | |"
        )
    out.append("\nTargets of issue 2, per seed (default pipeline):\n")
    out.append(
        "| seed | gap to oracle closed | correct-set drop (points) | held-out F vs oracle "
        "| cause precision | Fisher / epoch | demo seconds |"
    )
    out.append("|---|---|---|---|---|---|---|")
    for c in s["targets"]:
        out.append(
            f"| {c['seed']} | {c['gap_closed']:.2f} | {c['correct_drop_points']:.2f} | "
            f"{c['heldout_vs_oracle']:.2f} | {c['precision']:.3f} | "
            f"{c['fisher_over_epoch']:.2f} | {c['demo_seconds']:.0f} |"
        )
    t = s["targets"]
    if not mean_row:
        return "\n".join(out)
    out.append(
        f"| mean | {np.mean([c['gap_closed'] for c in t]):.2f} | "
        f"{np.mean([c['correct_drop_points'] for c in t]):.2f} | "
        f"{np.mean([c['heldout_vs_oracle'] for c in t]):.2f} | "
        f"{np.mean([c['precision'] for c in t]):.3f} | "
        f"{np.mean([c['fisher_over_epoch'] for c in t]):.2f} | "
        f"{np.mean([c['demo_seconds'] for c in t]):.0f} |"
    )
    return "\n".join(out)


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/demo_seeds.json"
    with open(path) as f:
        print(render(json.load(f)))
