"""Does the curvature matter? EWC-influence and the linear estimator against λ (issue 11, scope 8).

With ``l2="auto"`` (λ = 10⁴ × the mean diagonal of the summed Fisher) the issue found that
``ewc``, ``linear``, ``grad_dot`` and ``tracin`` rank the training set identically: when λ
dwarfs the curvature, ``(F + λI)⁻¹ ≈ I/λ`` and the paper's EWC-influence collapses into a
gradient dot product. This script measures where that happens and what λ buys, on the
validation problems of ``benchmarks/validate.py`` (digits, 20% symmetric flips, float64 models
trained to convergence, ground truth from actual retraining):

* for λ = ratio × the mean Fisher diagonal, ratio in ``--ratios`` (10⁴ is ``"auto"``), and for
  the problem's own weight decay (the true objective's regulariser);
* per method: Spearman with the actual leave-one-out effects, the LDS (per failure, from the
  per-failure scores, 100 random halves retrained; and from the summed scores),
  precision@K against the flipped labels;
* between methods: Spearman of the score vectors and the overlap of their top 50.

``grad_dot`` and ``tracin`` take no λ: they are the reference every curvature method should
differ from where curvature matters.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lambda_sweep.py --models logreg
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lambda_sweep.py --models mlp --n-loo 100 \\
        --out benchmarks/lambda_sweep_mlp.json
"""

from __future__ import annotations

import argparse
import itertools
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _shared import validation_run
from scipy.stats import spearmanr

import netmend
from netmend.identification.base import AUTO_L2_RATIO
from netmend.lab import validation
from netmend.lab.demo import machine
from netmend.store import write_json_atomic

METHODS = ("ewc", "linear", "grad_dot", "tracin")
TOP = 50


def sweep(model: str, ratios: list[float], n_loo: int | None, subsets: int) -> dict[str, Any]:
    """One validation problem: every method at every λ, against retraining and each other."""
    t0 = time.perf_counter()
    problem, gt, k, data, fails = validation_run(model, n_loo, subsets)
    kw: dict[str, Any] = dict(k=k, device="cpu", progress=False, seed=0)
    auto = netmend.identify(problem.model, data, fails, "ewc", l2="auto", **kw).info["l2"]
    mean_fisher = auto / AUTO_L2_RATIO
    settings = [(f"{r:g} x mean Fisher", r * mean_fisher) for r in ratios]
    settings.append(("training weight decay", float(problem.l2)))
    rows = []
    for label, lam in settings:
        scores = {}
        quality = {}
        for method in METHODS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ident = netmend.identify(problem.model, data, fails, method, l2=lam, **kw)
                per_failure = np.asarray(ident.per_failure)  # the LDS is per failure
            scores[method] = ident.scores
            q = validation.score_quality(problem, gt, ident.scores, per_failure)
            keys = ("spearman_loo", "lds", "lds_summed", "precision_at_k", "auroc")
            quality[method] = {key: float(q[key]) for key in keys}
        agreement = {}
        for a, b in itertools.combinations(METHODS, 2):
            rho = float(spearmanr(scores[a], scores[b]).statistic)
            top_a = set(np.argsort(-scores[a], kind="stable")[:TOP].tolist())
            top_b = set(np.argsort(-scores[b], kind="stable")[:TOP].tolist())
            agreement[f"{a}~{b}"] = {"spearman": rho, f"top{TOP}_overlap": len(top_a & top_b)}
        rows.append(
            {
                "setting": label,
                "l2": lam,
                "ratio_to_mean_fisher": lam / mean_fisher,
                "methods": quality,
                "agreement": agreement,
            }
        )
        print(model, label, {m: round(q["lds"], 3) for m, q in quality.items()},
              round(agreement["ewc~grad_dot"]["spearman"], 4), flush=True)  # fmt: skip
    return {
        "problem": problem.describe(),
        "ground_truth": gt.summary(),
        "k": k,
        "mean_fisher_diag": mean_fisher,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["logreg"])
    p.add_argument("--ratios", nargs="+", type=float, default=[1e4, 1e3, 1e2, 10, 1, 0.1])
    p.add_argument("--n-loo", type=int, help="LOO refits (default: all for logreg)")
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("benchmarks/lambda_sweep.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    doc = {
        "config": {**vars(a), "out": str(a.out)},
        "machine": machine(),
        "runs": {m: sweep(m, a.ratios, a.n_loo, a.subsets) for m in a.models},
    }
    write_json_atomic(a.out, doc)


if __name__ == "__main__":
    main()
