"""Evaluation: the failure split, accuracies on it and the quality of selected causes."""

from netmend.evaluation.protocol import (
    FailureSplit,
    accuracies,
    identification_metrics,
    split_failures,
)

__all__ = ["FailureSplit", "accuracies", "identification_metrics", "split_failures"]
