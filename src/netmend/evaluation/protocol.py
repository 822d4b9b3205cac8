"""The evaluation protocol: failure split, accuracies, identification quality.

The failure set F is the test examples the original model misclassifies. It is split in two:
the **query** half is the only part used to identify causes and tune anything; the
**held-out** half measures whether the repair generalises to failures it never saw (the
original model scores 0 there by construction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from netmend.data.source import as_source
from netmend.data.task import Task
from netmend.model.checks import check_eval_mode, ids_in_range
from netmend.model.functional import Data
from netmend.model.training import predict


@dataclass(frozen=True)
class FailureSplit:
    """Indices into the test set.

    Attributes:
        query: failures used for identification (``[Mq]``).
        heldout: failures kept for evaluation only (``[Mh]``).
        correct: examples the original model classifies correctly.
    """

    query: np.ndarray
    heldout: np.ndarray
    correct: np.ndarray

    @property
    def failures(self) -> np.ndarray:
        return np.sort(np.concatenate([self.query, self.heldout]))


def split_failures(
    model: nn.Module,
    X: Any,
    y: torch.Tensor | None = None,
    seed: int = 0,
    query_fraction: float = 0.5,
    device: torch.device | str = "cpu",
    task: Task | None = None,
) -> FailureSplit:
    """Find the test examples ``model`` gets wrong and split them into query and held-out halves.

    Args:
        model: the original model (in eval mode: dropout or BatchNorm in train mode would
            draw another split at every call).
        X: test inputs ``[T, ...]`` with labels ``y`` ``[T]``; or, with ``y=None``, the test
            set in any form :func:`netmend.evaluate` takes (a ``Dataset``, a ``DataLoader``
            of dict batches, ``(X, y)``).
        seed: seeds the split. query_fraction: the share of failures netmend sees.
        device: where the model predicts. task: as in :func:`netmend.identify`.

    Returns:
        A :class:`FailureSplit` of test indices.

    Raises:
        ValueError: a stochastic model in train mode, an out-of-range token id, fewer than
            two failures, or ``query_fraction`` outside ``(0, 1)``.
    """
    if not 0 < query_fraction < 1:
        raise ValueError(f"query_fraction must lie in (0, 1); got {query_fraction}")
    check_eval_mode(model)
    if y is None:
        source = as_source(X, "test", task)
        X, y, task = source, source.labels, source.task
    with ids_in_range():
        wrong = (predict(model, X, device, task=task) != y).numpy()
    fail = np.flatnonzero(wrong)
    if fail.size < 2:
        raise ValueError(
            f"the model misclassifies {fail.size} test example(s); at least 2 are needed to "
            "split failures into query and held-out halves"
        )
    perm = np.random.default_rng(seed).permutation(fail)
    nq = max(1, min(fail.size - 1, int(round(query_fraction * fail.size))))
    return FailureSplit(np.sort(perm[:nq]), np.sort(perm[nq:]), np.flatnonzero(~wrong))


def accuracies(
    model: nn.Module,
    X: Data,
    y: torch.Tensor,
    split: FailureSplit | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Accuracy on the whole test set and, given a split, on its three parts.

    Returns:
        ``test_acc`` and, with a split, ``query_failure_acc``, ``heldout_failure_acc`` and
        ``correct_acc`` (the examples the original model got right), each in [0, 1].
    """
    ok = (predict(model, X, device) == y).numpy()
    out = {"test_acc": float(ok.mean())}
    if split is not None:
        out["query_failure_acc"] = float(ok[split.query].mean())
        out["heldout_failure_acc"] = float(ok[split.heldout].mean())
        out["correct_acc"] = float(ok[split.correct].mean())
    return out


def identification_metrics(
    scores: np.ndarray,
    causes: np.ndarray,
    corrupted: np.ndarray | torch.Tensor,
    per_failure: np.ndarray | None = None,
    n_culprits: int = 5,
) -> dict[str, float]:
    """How well cause scores (positive = harmful) and a cause set recover known corruptions.

    Args:
        scores: ``[N]`` cause scores.
        causes: selected training indices ``[K]``.
        corrupted: ground-truth mask ``[N]`` (True = corrupted).
        per_failure: optional ``[N, M]`` per-failure scores (positive = harmful to failure i).
        n_culprits: culprits per failure for ``culprit_precision_at_5``.

    Returns:
        ``precision`` and ``recall`` of ``causes``, ``k`` (its size), ``auroc`` of the scores,
        ``precision_at_true_k`` (precision of the top-K with K = number of corrupted examples)
        and, with ``per_failure``, ``culprit_precision_at_5`` (mean over failures of the share
        of each failure's top culprits that are corrupted).
    """
    mask = np.asarray(
        corrupted.cpu().numpy() if isinstance(corrupted, torch.Tensor) else corrupted, dtype=bool
    )
    scores = np.asarray(scores, dtype=np.float64)
    n_bad = int(mask.sum())
    hits = int(mask[causes].sum()) if len(causes) else 0
    out = {
        "k": float(len(causes)),
        "precision": hits / len(causes) if len(causes) else float("nan"),
        "recall": hits / n_bad if n_bad else float("nan"),
        "auroc": float(roc_auc_score(mask, scores)) if 0 < n_bad < mask.size else float("nan"),
        "precision_at_true_k": float(mask[np.argsort(-scores, kind="stable")[:n_bad]].mean())
        if n_bad
        else float("nan"),
    }
    if per_failure is not None:
        n = min(n_culprits, per_failure.shape[0])
        top = np.argpartition(-per_failure, n - 1, axis=0)[:n]  # [n, M]
        out["culprit_precision_at_5"] = float(mask[top].mean())
    return out
