"""Ground-truth validation of every identification method (``netmend.validate``).

Usage: .venv/bin/python benchmarks/validate.py [--models logreg mlp] [--methods a b ...]
       [--ks 0.25 0.5 2] [--flips symmetric|pair] [--out benchmarks/validate.json]
       [--md benchmarks/validate.md]

For each model on digits (20% symmetric label flips, or with ``--flips pair`` the paper's
1<->7 at 0.4 and 6<->9 at 0.3; float64, trained to convergence): the
actual leave-one-out effect of every training example (logreg; a random 100 for the MLP) on
the query failures' loss, the actual query losses after retraining on 100 random halves, and
per method: Spearman with LOO, the LDS, precision@K and AUROC against the flipped labels,
per-failure culprit precision@5, the change of held-out failure accuracy when its top-K is
removed and the model retrained (minus the same for K random removals), and scoring seconds.
A method that raises is recorded with its error; the run goes on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from netmend import identification
from netmend.cli import write_json_atomic
from netmend.lab import validation
from netmend.lab.demo import machine

# variants worth a row of their own: the exact-curvature influence functions, and KNN-Shapley
# valued on the failures alone (the default also validates on the training set, leave-one-out)
EXTRA: dict[str, dict[str, Any]] = {
    "linear-ggn": {"method": "linear", "curvature": "ggn", "cg_tol": 1e-10, "cg_maxiter": 1000},
    "knn_shapley-failures": {"method": "knn_shapley", "valid": None},
    "trak-ratio0.01": {"method": "trak", "ridge_ratio": 0.01},  # the default until 0.3.5
}


FLIPS = {"symmetric": "20% symmetric label flips", "pair": "pair flips 1<->7 (0.4), 6<->9 (0.3)"}


def header(flips: str) -> list[str]:
    """The markdown report's title and protocol, for this kind of label noise."""
    return [
        "# Identification methods against actual retraining (`benchmarks/validate.py`)",
        "",
        f"digits, {FLIPS[flips]}, float64 model trained to convergence "
        "(L-BFGS, logreg polished by Newton). Scores positive = harmful. Spearman LOO: with "
        "the actual leave-one-out effect on the query failures' summed loss; LDS: Park et al. "
        "(2023), per failure, 100 random halves; precision@K/AUROC: vs the flipped labels; "
        "counterfactual: change of held-out failure accuracy after retraining without the "
        "method's top-K (K = number flipped), minus the mean over random K-removals.",
        "",
    ]


def section(model: str, report: dict[str, Any]) -> list[str]:
    """The markdown lines of one model's run."""
    g = report["ground_truth"]
    cf = report["counterfactual"]["random"]["heldout_acc"]
    p = report["problem"]
    lines = [
        f"## {model}",
        "",
        f"N = {p['train']}, {p['corrupted']} flipped, {p['query_failures']} query / "
        f"{p['heldout_failures']} held-out failures, {p['params']} parameters, l2 = {p['l2']}. "
        f"LOO refits: {g['n_loo']} in {g['seconds']['loo']:.1f} s; median |LOO effect| "
        f"{g['loo_abs_median']:.2e}, optimisation noise floor {g['noise_floor']:.1e} "
        f"(ratio {g['noise_floor_over_median_loo']:.1e}); largest refit gradient norm "
        f"{g['max_grad_norm']:.1e}. Random removal of K = {report['k']}: Δ held-out acc "
        f"{cf['mean']:+.3f} ± {cf['sd']:.3f}.",
        "",
    ]
    if report.get("note"):
        lines += [report["note"], ""]
    lines += [validation.table(report), ""]
    if "counterfactual_curve" in report:
        lines += [
            "Counterfactual curve: Δ held-out failure accuracy vs random removal, by the "
            "number of top-scored examples removed:",
            "",
            validation.curve_table(report),
            "",
        ]
    return lines


def markdown(result: dict[str, Any]) -> str:
    """``validate.md``: the header and every model's section."""
    lines = header(result.get("flips", "symmetric"))
    for model, report in sorted(result["runs"].items()):
        lines += section(model, report)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["logreg", "mlp"])
    ap.add_argument("--methods", nargs="+", help="default: all registered, plus linear-ggn")
    ap.add_argument("--subsets", type=int, default=100)
    ap.add_argument("--n-loo", type=int, help="LOO refits (default: all for logreg, 100 for mlp)")
    ap.add_argument("--skip", nargs="*", default=[], help="methods to leave out")
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="start a new --out (by default the models not run now are kept from it)",
    )
    ap.add_argument(
        "--ks",
        nargs="*",
        type=float,
        default=[],
        help="counterfactual curve: removal sizes as multiples of K, e.g. 0.25 0.5 2",
    )
    ap.add_argument("--flips", choices=sorted(FLIPS), default="symmetric")
    ap.add_argument("--seed", type=int, default=0, help="the problem's seed (split, flips, model)")
    ap.add_argument("--out", default="benchmarks/validate.json")
    ap.add_argument("--md", default="benchmarks/validate.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    methods = [
        m for m in args.methods or [*identification.available(), *EXTRA] if m not in args.skip
    ]
    result: dict[str, Any] = {
        "machine": machine(), "methods": methods, "flips": args.flips, "seed": args.seed,
        "runs": {},
    }  # fmt: skip
    if Path(args.out).exists() and not args.fresh:  # keep the models not rerun now
        old = json.loads(Path(args.out).read_text())
        if old.get("flips", "symmetric") != args.flips:
            raise SystemExit(
                f"{args.out} holds {old.get('flips', 'symmetric')} flips, not {args.flips}: "
                "pass another --out, or --fresh to replace it"
            )
        result["runs"] = {m: r for m, r in old.get("runs", {}).items() if m not in args.models}
        result["methods"] = list(dict.fromkeys([*old.get("methods", []), *methods]))
    for model in args.models:
        t0 = time.perf_counter()
        problem = validation.make_problem(model=model, seed=args.seed, flips=args.flips)
        gt = validation.ground_truth(
            problem, n_loo=args.n_loo, n_subsets=args.subsets, seed=args.seed, progress=False
        )
        n_bad = int(problem.corrupted.sum())
        ks = [max(1, round(f * n_bad)) for f in args.ks] or None
        report = validation.validate(
            methods,
            problem,
            gt,
            options=EXTRA,
            progress=False,
            seed=args.seed,
            counterfactual_ks=ks,
        )
        report["seconds_total"] = time.perf_counter() - t0
        report["methods_run"] = methods
        report["machine"] = machine()
        result["runs"][model] = report
        write_json_atomic(args.out, result)  # keep what is done if a later model fails
        Path(args.md).write_text(markdown(result))
        print(section(model, report)[-2], flush=True)
    result["done"] = True
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
