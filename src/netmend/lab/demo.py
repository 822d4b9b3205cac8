"""The paper's MNIST experiment, end to end (``netmend demo``).

Tanno et al. (2022), Sec. 5: corrupt MNIST labels (1<->7 with probability 0.4, 6<->9 with
0.3), train a CNN, take its test-set mistakes as the failure set F, split F into a query half
(used to identify causes) and a held-out half (used only to judge the repair), identify the
causes, treat the model, and compare with retraining without the causes and with the
clean-label oracle.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from netmend import api
from netmend.curvature import fisher_diag_sum
from netmend.evaluation import FailureSplit, accuracies, identification_metrics, split_failures
from netmend.lab.corrupt import pair_flips
from netmend.lab.datasets import Split, load_mnist
from netmend.lab.models import SmallCNN
from netmend.model.functional import FunctionalModel
from netmend.model.training import TrainConfig, fit

log = logging.getLogger(__name__)

ACC_KEYS = ("test_acc", "query_failure_acc", "heldout_failure_acc", "correct_acc")


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo; ``quick`` shrinks everything for a one-minute smoke run.

    Attributes:
        seed: seeds the corruption, initialisation, training order and failure split.
        train_size, test_size: how much of MNIST to use (``None`` = all 60k / 10k).
        epochs: training epochs of the corrupted model, the oracle and the retrain reference.
        finetune_epochs, finetune_lr_factor: the ``finetune`` treatment's length and rate (as
            a fraction of the training rate). The demo keeps the recipe its figures were
            measured with (``benchmarks/demo_seeds.json``: 0.5 epoch at a tenth of the rate)
            rather than the treatment's default (see
            :func:`netmend.treatment.methods.finetune_recipe`).
    """

    seed: int = 0
    train_size: int | None = None
    test_size: int | None = None
    epochs: float = 2.0
    finetune_epochs: float = 0.5
    finetune_lr_factor: float = 0.1

    @classmethod
    def quick_config(cls, seed: int = 0) -> DemoConfig:
        return cls(seed=seed, train_size=8000, test_size=4000, epochs=2.0)


# (identify, treat) pairs shown; the first is what netmend.repair does by default.
PIPELINES: tuple[tuple[str, str], ...] = (
    (api.DEFAULT_IDENTIFY, api.DEFAULT_TREAT),
    ("ewc", "newton"),
    ("ewc", "ewc"),
    ("linear", "finetune"),
    ("loss", "finetune"),
    ("random", "finetune"),
)


def _subset(s: Split, n: int | None, seed: int) -> Split:
    if n is None or n >= len(s):
        return s
    idx = torch.randperm(len(s), generator=torch.Generator().manual_seed(seed))[:n]
    return Split(s.X[idx], s.y[idx])


def run(config: DemoConfig = DemoConfig(), progress: bool = True) -> dict[str, Any]:
    """Run the experiment and return every figure as a JSON-ready dict.

    Returns:
        ``{"config", "machine", "data", "timing", "runs": [...], "references": {...}}`` where
        each run has ``identify``, ``treat``, ``default``, identification metrics
        (``precision``, ``recall``, ``auroc``, ``precision_at_true_k``,
        ``culprit_precision_at_5``, ``k``) and accuracies (``test_acc``,
        ``heldout_failure_acc``, ``query_failure_acc``, ``correct_acc``) and ``seconds``.
    """
    t_start = time.perf_counter()
    seed = config.seed
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train, test = load_mnist()
    train = _subset(train, config.train_size, seed)
    test = _subset(test, config.test_size, seed + 1)
    corruption = pair_flips(train.y, seed=seed)
    noisy = (train.X, corruption.labels)
    mask = corruption.mask.numpy()
    recipe = TrainConfig(epochs=config.epochs)

    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = fit(SmallCNN(), train.X, corruption.labels, recipe, seed, device, progress, "train")
    timing["train"] = time.perf_counter() - t0
    timing["train_epoch"] = timing["train"] / config.epochs

    split = split_failures(model, test.X, test.y, seed=seed, device=device)
    Xq, yq = test.X[split.query], test.y[split.query]

    def acc(m: torch.nn.Module) -> dict[str, float]:
        return accuracies(m, test.X, test.y, split, device)

    t0 = time.perf_counter()
    fm = FunctionalModel.of(model)
    fisher = fisher_diag_sum(
        fm,
        fm.theta.to(device),
        train.X,
        corruption.labels,
        128,
        device,
        progress,
    ).cpu()
    timing["fisher"] = time.perf_counter() - t0

    common: dict[str, Any] = dict(seed=seed, device=device, progress=progress, fisher=fisher)
    idents: dict[str, api.Identification] = {}
    per_failure_cache: dict[str, np.ndarray] = {}

    def identification_for(method: str) -> tuple[api.Identification, dict[str, float]]:
        if method not in idents:
            # failure-blind baselines get the default method's K (they have no K of their own)
            k = None if method in ("ewc", "linear") else len(idents[api.DEFAULT_IDENTIFY].causes)
            t = time.perf_counter()
            idents[method] = api.identify(model, noisy, (Xq, yq), method, k, **common)
            timing[f"identify_{method}"] = time.perf_counter() - t
        ident = idents[method]
        # ewc and linear(diag) linearise per failure with the same curvature: compute once
        key = "fisher-linearised" if method in ("ewc", "linear") else method
        if key not in per_failure_cache:
            t = time.perf_counter()
            per_failure_cache[key] = ident.per_failure
            timing[f"culprits_{key}"] = time.perf_counter() - t
        metrics = identification_metrics(ident.scores, ident.causes, mask, per_failure_cache[key])
        return ident, metrics

    runs = []
    for ident_name, treat_name in PIPELINES:
        ident, metrics = identification_for(ident_name)
        extra: dict[str, Any] = (
            {"epochs": config.finetune_epochs, "lr": recipe.lr * config.finetune_lr_factor}
            if treat_name == "finetune"
            else {}
        )
        t = time.perf_counter()
        repaired = api.treat(
            model,
            noisy,
            ident.causes,
            treat_name,
            train_config=recipe,
            **common,
            **extra,
        )
        seconds = time.perf_counter() - t + ident.seconds
        runs.append(
            {
                "identify": ident_name,
                "treat": treat_name,
                "default": (ident_name, treat_name) == (api.DEFAULT_IDENTIFY, api.DEFAULT_TREAT),
                **{k: metrics[k] for k in sorted(metrics)},
                **acc(repaired),
                "seconds": seconds,
            }
        )
        log.info("%s/%s: %s", ident_name, treat_name, runs[-1])

    default_causes = idents[api.DEFAULT_IDENTIFY].causes
    t0 = time.perf_counter()
    retrained = api.treat(model, noisy, default_causes, "retrain", train_config=recipe, **common)
    timing["retrain"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    oracle = fit(SmallCNN(), train.X, train.y, recipe, seed, device, progress, "oracle")
    timing["oracle"] = time.perf_counter() - t0
    references = {"original": acc(model), "retrain": acc(retrained), "oracle_clean": acc(oracle)}
    timing["total"] = time.perf_counter() - t_start
    return {
        "config": asdict(config),
        "machine": machine(),
        "data": {
            "train": len(train),
            "test": len(test),
            "corrupted": int(mask.sum()),
            "failures": int(len(split.failures)),
            "query_failures": int(len(split.query)),
            "heldout_failures": int(len(split.heldout)),
        },
        "timing": timing,
        "runs": runs,
        "references": references,
        "_artifacts": {  # not JSON: for plots
            "model": model,
            "train": train,
            "noisy_labels": corruption.labels,
            "mask": mask,
            "test": test,
            "split": split,
            "identification": idents[api.DEFAULT_IDENTIFY],
            "per_failure": per_failure_cache["fisher-linearised"],
        },
    }


def machine() -> dict[str, Any]:
    """Where a figure was measured."""
    import os

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def table(result: dict[str, Any]) -> str:
    """The demo's figures as a fixed-width text table."""
    head = (
        f"{'pipeline':<22}{'K':>6}{'prec':>7}{'recall':>8}{'cul@5':>7}"
        f"{'test':>8}{'heldout F':>11}{'query F':>9}{'correct':>9}{'sec':>7}"
    )
    lines = [head, "-" * len(head)]

    def pct(v: float) -> str:
        return f"{100 * v:.2f}" if v == v else "-"

    for r in result["runs"]:
        name = f"{r['identify']}/{r['treat']}" + (" *" if r["default"] else "")
        lines.append(
            f"{name:<22}{int(r['k']):>6}{r['precision']:>7.3f}{r['recall']:>8.3f}"
            f"{r['culprit_precision_at_5']:>7.3f}{pct(r['test_acc']):>8}"
            f"{pct(r['heldout_failure_acc']):>11}{pct(r['query_failure_acc']):>9}"
            f"{pct(r['correct_acc']):>9}{r['seconds']:>7.1f}"
        )
    lines.append("-" * len(head))
    for name, r in result["references"].items():
        lines.append(
            f"{name:<22}{'':>6}{'':>7}{'':>8}{'':>7}{pct(r['test_acc']):>8}"
            f"{pct(r['heldout_failure_acc']):>11}{pct(r['query_failure_acc']):>9}"
            f"{pct(r['correct_acc']):>9}"
        )
    d, t = result["data"], result["timing"]
    lines.append(
        f"\n* = netmend.repair's default. {d['train']} training examples, {d['corrupted']} "
        f"corrupted; {d['failures']} test failures ({d['query_failures']} query, "
        f"{d['heldout_failures']} held out). Accuracies in %; prec/recall of the selected "
        f"causes against the corruption mask; cul@5 = share of each query failure's top-5 "
        f"culprits that are corrupted.\nTimes: train epoch {t['train_epoch']:.1f}s, diagonal "
        f"Fisher {t['fisher']:.1f}s, total {t['total']:.0f}s."
    )
    return "\n".join(lines)


__all__ = ["DemoConfig", "FailureSplit", "PIPELINES", "machine", "run", "table"]
