"""Shared machinery of treatments: the context and the registry.

A treatment takes the original model and the identified causes ``C`` (training indices) and
returns a **new** model; the user's model is never modified.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from netmend._registry import Registry
from netmend.curvature import fisher_diag_sum
from netmend.data.source import DataSource
from netmend.model.functional import Data, FunctionalModel
from netmend.model.training import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TreatContext:
    """Everything a treatment may use.

    Attributes:
        model: the original model (read-only: copy it before changing anything).
        fm: the same model, functionally; ``fm.theta`` is ``theta_hat``.
        X, y: the training set: its inputs (a :class:`netmend.data.source.DataSource` read
            batch by batch, or a tensor ``[N, ...]``) and labels ``[N]``. ``X[self.keep]``
            is ``D \\ C`` as a view (nothing is read until a batch is).
        causes: indices of the causes ``C`` (int64, ``[K]``).
        device, chunk_size, progress, seed: run settings.
        l2: ``lambda``, the L2 penalty towards ``theta_hat`` (also the damping).
        train_config: the recipe used to (re)train the model; fine-tuning scales it down.
        train_config_given: whether the user gave ``train_config`` (``False``: it is the
            default :class:`TrainConfig()`, which "retrain" refuses to use as a reference).
        fisher: the summed diagonal empirical Fisher over the whole training set, if known.
        options: method-specific keyword options.
        failures: the query failures ``(X_F [M, ...], y_F [M])`` with their correct labels, if
            known (treatments that adapt to the failures fit ``theta_+F`` from them).
        theta_plus_f: the failure-adapted parameters ``theta_+F`` ``[P]`` (the EWC fit of
            :func:`netmend.identification.ewc.fit_theta_plus_f`), if known.
        record: what the treatment did, filled in by the treatment (e.g. how far "align" moved
            each cause, which labels "relabel" changed); :func:`netmend.treat` hands it back.
    """

    model: nn.Module
    fm: FunctionalModel
    X: Data
    y: torch.Tensor
    causes: torch.Tensor
    device: torch.device
    chunk_size: int = 128
    progress: bool = True
    seed: int = 0
    l2: float | str = "auto"
    train_config: TrainConfig = field(default_factory=TrainConfig)
    fisher: torch.Tensor | None = None
    options: dict[str, Any] = field(default_factory=dict)
    failures: tuple[Data, torch.Tensor] | None = None
    theta_plus_f: torch.Tensor | None = None
    record: dict[str, Any] = field(default_factory=dict)
    train_config_given: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.l2, str) and self.l2 != "auto":
            raise ValueError(f"l2 must be a positive number or 'auto'; got {self.l2!r}")
        if not isinstance(self.l2, str) and not self.l2 > 0:
            raise ValueError(f"l2 must be > 0; got {self.l2}")

    def penalty_l2(self) -> float:
        """``lambda`` as a number ("auto" is resolved against the full training-set Fisher)."""
        from netmend.identification.base import resolve_l2

        def full() -> torch.Tensor:
            if self.fisher is None:
                self.fisher = fisher_diag_sum(
                    self.fm,
                    self.fm.theta.to(self.device),
                    self.X,
                    self.y,
                    self.chunk_size,
                    self.device,
                    self.progress,
                )
            return self.fisher

        return resolve_l2(self.l2, full)

    def retained_loss(self, sample: int = 2048) -> Callable[[torch.Tensor], float]:
        """``theta -> mean loss`` on a fixed, seeded sample of the retained data ``D \\ C``."""
        keep = torch.nonzero(self.keep).squeeze(1)
        gen = torch.Generator().manual_seed(self.seed)
        idx = keep[torch.randperm(keep.numel(), generator=gen)[:sample]]
        x, t = self.X[idx].to(self.device), self.y[idx].to(self.device)

        def loss(theta: torch.Tensor) -> float:
            with torch.no_grad():
                return float(-self.fm.ll(theta.to(self.device), x, t).mean())

        return loss

    @property
    def keep(self) -> torch.Tensor:
        """Boolean mask ``[N]`` of the retained examples ``D \\ C``."""
        mask = torch.ones(len(self.X), dtype=torch.bool)
        mask[self.causes] = False
        return mask

    def retained_fisher(self) -> torch.Tensor:
        """Summed diagonal empirical Fisher over ``D \\ C`` ``[P]`` (the full one minus ``C``'s)."""
        theta = self.fm.theta.to(self.device)
        kw: dict[str, Any] = dict(chunk_size=self.chunk_size, device=self.device)
        if self.fisher is None:
            keep = self.keep
            return fisher_diag_sum(self.fm, theta, self.X[keep], self.y[keep], **kw)
        removed = fisher_diag_sum(self.fm, theta, self.X[self.causes], self.y[self.causes], **kw)
        return (self.fisher.to(self.device) - removed).clamp_min(0)

    def tensor_inputs(self, why: str) -> torch.Tensor:
        """The training inputs as one tensor ``[N, ...]``, for a treatment that needs them so.

        Reads a ``Dataset`` source whole (logged: it then needs the memory of the set).

        Raises:
            TypeError: the inputs are not a tensor (e.g. dicts of token ids).
        """
        if not isinstance(self.X, DataSource):
            return self.X
        if not self.X.in_memory:
            log.info("%s reads all %d training inputs into memory as one tensor", why, len(self.X))
        x = self.X.read()
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{why} needs the training inputs as one tensor; these are "
                f"{type(x).__name__} (e.g. a dict of token ids): use another treatment"
            )
        return x

    def model_at(self, theta: torch.Tensor) -> nn.Module:
        """A deep copy of the model with its trainable parameters set to ``theta`` ``[P]``."""
        new = copy.deepcopy(self.model)
        params = self.fm.unflatten(theta.detach().to(self.fm.theta.device))
        with torch.no_grad():
            for name, p in new.named_parameters():
                if name in params:
                    p.copy_(params[name])
        return new.eval()


Treatment = Callable[[TreatContext], nn.Module]
TREAT_ARGUMENTS = frozenset(
    {"model", "train", "causes", "method", "l2", "train_config", "seed", "device"}
    | {"chunk_size", "progress", "fisher", "failures", "theta_plus_f", "record", "task"}
    | {"allow_no_causes"}
)
""":func:`netmend.treat`'s own keywords: a treatment option of one of these names could never
reach the treatment (``tests/test_architecture.py`` holds it to the signature)."""

_REGISTRY: Registry[Treatment] = Registry("treatment", TREAT_ARGUMENTS, "netmend.treat")


def register(
    name: str, options: Iterable[str] | None = None, research: str | None = None
) -> Callable[[Treatment], Treatment]:
    """Register a treatment ``(TreatContext) -> new nn.Module`` under ``name``.

    ``options`` names the keyword options it reads from ``ctx.options`` (``()``: none); an
    option outside them is refused by :func:`netmend.treat` (see :func:`check_options`).
    ``research`` marks it research-only, with the measured reason (:func:`research_only`).
    """
    return _REGISTRY.register(name, options, research)


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming any option treatment ``name`` does not declare (with the
    valid names and the closest match)."""
    _REGISTRY.check_options(name, options)


def options(name: str) -> frozenset[str]:
    """The options treatment ``name`` declares (empty when it declares none or is unchecked)."""
    return _REGISTRY.options(name) or frozenset()


def get(name: str) -> Treatment:
    """The registered treatment ``name``; raises with the list of known names otherwise."""
    return _REGISTRY.get(name)


def available(research: bool = True) -> list[str]:
    """Names of the registered treatments (``research=False``: without the research-only)."""
    return _REGISTRY.available(research)


def research_only() -> dict[str, str]:
    """The research-only treatments, each with the measured reason it is not recommended."""
    return _REGISTRY.research_only()
