"""TRAK's ridge on single models: was ``ridge_ratio=0.01`` (the default until 0.3.5) right?

On dattri's MNIST-MLP protocol an ensemble of 50 models scored best with ``ridge_ratio``
0.1-0.2, chosen on a development problem (``dattri_protocol.py --problem dev``). This script
asks the same of the single-model ``trak`` on the validation problems of
``benchmarks/validate.py``: digits, 20% symmetric flips, float64 models trained to convergence,
ground truth from actual retraining. For each ``ridge_ratio`` (λ = ratio × the mean
eigenvalue of ``Phi^T Phi``) it reports the Spearman correlation with the exact leave-one-out
effects (logistic regression only: the MLP's refits are at the noise floor of retraining,
see benchmarks/README.md), the LDS over random halves, precision@K and AUROC against the
flipped labels. ``trak`` with ``projection="auto"`` uses exact gradients on these models
(P < ``proj_dim``), so the ridge is the only approximation left. ``grad_dot``, ``ekfac`` and
``random`` are scored on the same ground truth as references.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trak_ridge.py       # ~12 min on one thread
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _shared import validation_run

import netmend
from netmend.lab import validation
from netmend.lab.demo import machine
from netmend.store import write_json_atomic

RATIOS = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
REFERENCES = ("grad_dot", "ekfac", "random")
"""Methods scored on the same ground truth: the large-ridge limit's kin, the strongest
curvature method on these problems, and chance."""
KEYS = ("spearman_loo", "lds", "precision_at_k", "auroc")


def _num(v: float) -> float | None:
    """A figure for the JSON: ``None`` where it is undefined (no LOO refits)."""
    return None if np.isnan(v) else float(v)


def sweep(model: str, ratios: list[float], n_loo: int | None, subsets: int) -> dict[str, Any]:
    """One validation problem: ``trak`` at every ridge ratio, against retraining."""
    t0 = time.perf_counter()
    problem, gt, k, data, fails = validation_run(model, n_loo, subsets)

    def scored(method: str, **options: Any) -> tuple[Any, dict[str, float | None]]:
        """``identify`` (its warnings silenced) and its figures against the ground truth."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ident = netmend.identify(
                problem.model, data, fails, method, k=k, device="cpu", progress=False, seed=0,
                **options,
            )  # fmt: skip
        q = validation.score_quality(problem, gt, ident.scores, np.asarray(ident.per_failure))
        figures = {key: _num(q[key]) for key in KEYS}
        print(model, method, options, figures, flush=True)
        return ident, figures

    rows = []
    for ratio in ratios:
        ident, figures = scored("trak", ridge_ratio=ratio)
        rows.append(
            {
                "ridge_ratio": ratio,
                "ridge": float(ident.info["ridge"][0]),
                "projection": ident.info["projection"],
                **figures,
            }
        )
    # in the same run, on the same ground truth
    references = {method: scored(method)[1] for method in REFERENCES}
    return {
        "problem": problem.describe(),
        "references": references,
        "ground_truth": gt.summary(),
        "k": k,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["logreg", "mlp"])
    p.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("benchmarks/trak_ridge.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    runs = {}
    for m in a.models:  # every LOO refit for logreg; none for the MLP (noise floor)
        runs[m] = sweep(m, a.ratios, None if m == "logreg" else 0, a.subsets)
    doc = {"config": {**vars(a), "out": str(a.out)}, "machine": machine(), "runs": runs}
    write_json_atomic(a.out, doc)


if __name__ == "__main__":
    main()
