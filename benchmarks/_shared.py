"""Helpers shared by the benchmark scripts that train their own models and record peers'
settings. The scripts import it as a sibling module: ``python benchmarks/NAME.py`` puts
``benchmarks/`` on ``sys.path`` (the tests' ``bench_script`` fixture does the same)."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sgd_epochs(
    net: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch: int,
    lr: float,
    momentum: float,
    generator: torch.Generator,
) -> None:
    """Train ``net`` in place: SGD with momentum on the mean cross-entropy, each epoch one
    permutation of ``X`` drawn from ``generator``, in batches of ``batch``."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for s in range(0, len(y), batch):
            idx = order[s : s + batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(X[idx]), y[idx]).backward()
            opt.step()


@torch.no_grad()
def losses(net: nn.Module, X: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-example cross-entropy ``[N]`` (float64)."""
    return F.cross_entropy(net(X), y, reduction="none").double().numpy()


def is_jsonable(v: Any) -> bool:
    """Whether ``json.dumps`` takes ``v`` as it is (to keep only such ``info`` entries)."""
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


class DevRun(NamedTuple):
    """One bench suite and seed, trained and diagnosed as ``netmend bench`` does (CPU)."""

    data: Any  # netmend.lab.bench.SuiteData
    spec: Any  # netmend.lab.bench.DatasetSpec
    model: nn.Module
    split: Any  # the failure split: query / held-out / correct indices into data.eval
    ident: Any  # netmend.identify on the query failures


def dev_run(suite: str, seed: int, gate: bool = False) -> DevRun:
    """Load and corrupt ``suite``'s data, train its model with the suite's recipe (seeded) and
    identify the causes of its query failures with the default method (the label gate off
    unless ``gate``)."""
    import netmend
    from netmend.lab import bench
    from netmend.model.training import fit

    data = bench.make_suite(suite, seed)
    spec = bench.DATASETS[bench.parse_suite(suite)[0]]
    X, y = data.train.X, data.train.y  # y: the noisy labels
    torch.manual_seed(seed)
    model = fit(spec.model(), X, y, spec.recipe, seed, "cpu", False)
    split = bench._split(model, data, "cpu")
    Xq, yq = data.eval.X[split.query], data.eval.y[split.query]
    ident = netmend.identify(model, (X, y), (Xq, yq), seed=seed, progress=False, gate=gate)
    return DevRun(data, spec, model, split, ident)


class ValidationRun(NamedTuple):
    """A validation problem of ``netmend.lab.validation`` with its ground truth."""

    problem: Any
    gt: Any
    k: int  # the number of flipped training labels
    data: tuple[torch.Tensor, torch.Tensor]
    fails: tuple[torch.Tensor, torch.Tensor]


def validation_run(model: str, n_loo: int | None, subsets: int) -> ValidationRun:
    """``make_problem(model, seed=0)`` and its ground truth (``n_loo`` LOO refits, ``subsets``
    random halves), as the sweeps over one method's setting use them."""
    from netmend.lab import validation

    problem = validation.make_problem(model=model, seed=0)
    gt = validation.ground_truth(problem, n_loo=n_loo, n_subsets=subsets, seed=0, progress=False)
    k = int(problem.corrupted.sum())
    return ValidationRun(problem, gt, k, (problem.X, problem.y), (problem.Xq, problem.yq))
