"""Does ``trak``'s new default ``ridge_ratio`` (0.1) cost the MLP's top-K removal? Three seeds.

``validate.json`` (seed 0, the former ReLU MLP) showed the digits MLP's ``trak`` counterfactual
(held-out failures fixed by retraining without the top-K, minus K random removals) falling
from +0.409 at the old default ``ridge_ratio=0.01`` to +0.231 at 0.1, about two standard
deviations of the random removals' spread, while its LDS rose. Rerun in 0.3.6 on the converged
tanh MLP of ``make_problem(model="mlp")``. This gathers the same problem on seeds 0, 1 and 2, each
run with both ratios (``trak`` and ``trak-ratio0.01``) and ``grad_dot`` and ``ekfac`` as
references, into one JSON with per-seed figures and their means over seeds::

    for s in 0 1 2; do OMP_NUM_THREADS=1 .venv/bin/python benchmarks/validate.py --models mlp \\
        --seed $s --n-loo 0 --methods trak trak-ratio0.01 grad_dot ekfac random --fresh \\
        --out benchmarks/validate_trak_s$s.json --md /tmp/validate_trak_s$s.md; done  # ~16 min each
    .venv/bin/python benchmarks/trak_default_seeds.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from netmend.evaluation import controls
from netmend.store import write_json_atomic

HERE = Path(__file__).resolve().parent
SEEDS = (0, 1, 2)
METHODS = ("trak", "trak-ratio0.01", "grad_dot", "ekfac")


def mean_se(values: list[float]) -> dict[str, float]:
    """Mean and standard error of the mean over seeds (:func:`controls.mean_se`), as JSON."""
    m, se = controls.mean_se(values)
    return {"mean": m, "se": se}


def main() -> None:
    seeds: list[dict[str, Any]] = []
    for s in SEEDS:
        run = json.loads((HERE / f"validate_trak_s{s}.json").read_text())["runs"]["mlp"]
        seeds.append(
            {
                "seed": s,
                "heldout_failures": run["problem"]["heldout_failures"],
                "random_removal_sd": run["counterfactual"]["random"]["heldout_acc"]["sd"],
                "methods": {
                    m: {
                        "lds": run["methods"][m]["lds"],
                        "counterfactual": run["methods"][m]["counterfactual"][
                            "delta_heldout_acc_vs_random"
                        ],
                    }
                    for m in METHODS
                },
                "machine": run["machine"],
            }
        )
    summary = {
        m: {
            key: mean_se([s["methods"][m][key] for s in seeds]) for key in ("lds", "counterfactual")
        }
        for m in METHODS
    }

    def new_minus_old(key: str) -> dict[str, float]:
        """Paired over seeds: the new default's figure minus the old one's."""
        m = [s["methods"] for s in seeds]
        return mean_se([r["trak"][key] - r["trak-ratio0.01"][key] for r in m])

    doc = {
        "seeds": seeds,
        "summary": summary,
        "new_minus_old": {key: new_minus_old(key) for key in ("lds", "counterfactual")},
    }
    write_json_atomic(HERE / "trak_default_seeds.json", doc)


if __name__ == "__main__":
    main()
