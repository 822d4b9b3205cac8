"""Evaluation: the failure split, accuracies on it, the quality of selected causes, and the
controls and Pareto criterion that say whether a repair counts."""

from netmend.evaluation.controls import (
    Controls,
    Verdict,
    class_accuracies,
    class_share,
    diagnosis_gain,
    oracles_of_k,
    random_causes,
    repaired,
    run_controls,
    truth_at_k,
    truth_ranked,
)
from netmend.evaluation.protocol import (
    FailureSplit,
    accuracies,
    identification_metrics,
    split_failures,
)

__all__ = [
    "Controls",
    "FailureSplit",
    "Verdict",
    "accuracies",
    "class_accuracies",
    "class_share",
    "diagnosis_gain",
    "identification_metrics",
    "oracles_of_k",
    "random_causes",
    "repaired",
    "run_controls",
    "truth_at_k",
    "truth_ranked",
    "split_failures",
]
