"""Continual repair: repair a deployed model again each time new failures arrive.

The paper's premise is repairing a model *on the fly* as failures are encountered.
:class:`Repairer` keeps what does not change between rounds and scores only what is new:

* the summed diagonal Fisher at ``theta_hat`` (the EWC penalty's curvature; one pass of
  per-example gradients over the training set, computed in the first round only);
* the training log-likelihoods at ``theta_hat``, ``log p(z|theta_hat)`` ``[N]`` (one forward
  pass, first round only);
* the cause scores so far, and the scores of the halves of the random half-splits of the
  failures from which the automatic K is chosen.

A round fits ``theta_+F`` on the **new** failures only (from ``theta_hat``, with the stored
curvature) and adds their EWC-influence scores ``log p(z|theta_hat) - log p(z|theta_+F_b)``
to the running sum: one forward pass over the training set. The automatic K compares
disjoint halves of the failures: round 1 splits its failures at random, three times (as
:func:`netmend.identify`), and each later batch joins, in each split, the half with fewer
failures (if batches differ systematically, e.g. under drift, the halves do too; pass a
fixed ``k``).
The sum is the one-shot score under the quadratic approximation that EWC-influence rests
on (``theta_+F - theta_hat`` is linear in the failures' summed gradient); the first round is
exactly :func:`netmend.identify` with method "ewc" on its failures.

The causes are then re-selected from the summed scores, and the model treated: with the
"finetune" treatment and ``warm_start=True`` (default), later rounds continue from the
previous round's repaired model for ``continue_fraction`` of the first round's steps, on the
training set without the current causes, and the round's model mixes the previous model
with that continuation (weight ``mix``, default :func:`warm_mix`). A short fine-tune alone
is noisier than the first round's and undoes earlier fixes most where a round restores many
causes at once: on the demo's MNIST subset (seeds 0-2, benchmarks/continual.json) 96.0% of
the failures fixed in a round stayed fixed in every later round without the mixing, 98.9%
with it (a second one-shot fine-tune with another seed flips 2.6% of the one-shot's fixes).
With netmend 0.3's automatic K, whose K swung between rounds, the same figures were 89.7%
and 97.7%.
Other treatments restart from ``theta_hat`` each round. The history records which causes
were removed (or relabelled) and restored in which round, the accuracies per round, and the
time of each stage; :meth:`Repairer.save` and :meth:`Repairer.load` keep it (and the state)
on disk.

Sign convention: every score is positive = harmful.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn

from netmend import api, identification, store, treatment
from netmend._warnings import warn
from netmend.data import distributed
from netmend.data.checks import DataLike, as_tensors, check_labels, resolve_device, rows_in
from netmend.data.source import DataSource, as_source
from netmend.data.task import Task, overrides
from netmend.data.validate import _integer, check_causes, number_option
from netmend.identification import k_rules
from netmend.identification.base import (
    CULPRITS_PER_FAILURE,
    MAX_CLASS_SHARE,
    Context,
    class_capped,
    is_auto_k,
    per_failure_top,
)
from netmend.identification.ewc import fit_theta_plus_f
from netmend.identification.label_gate import gate_causes
from netmend.model.checks import check_failures, ids_in_range
from netmend.model.functional import FunctionalModel, log_likelihoods, match_dtype, param_dtype
from netmend.model.training import TrainConfig, predict
from netmend.treatment.base import check_options as check_treat_options
from netmend.treatment.guard import guard_k, resolve_guard
from netmend.treatment.methods import finetune_recipe

STATE_FILE = "state.safetensors"


def _as_dtype(X: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = match_dtype(X, dtype)
    assert isinstance(out, torch.Tensor)  # a tensor stays a tensor
    return out


MODEL_FILE = "model.safetensors"
"""Where netmend 0.3.6 kept the round's model, apart from the state (read when present)."""

MODEL_PREFIX = "model."
"""The round's model's tensors, in the state file since 0.3.7: one atomic write for both (a
save interrupted between two files paired one round's model with another's state)."""


_ROUND_STATE = (
    "scores", "_halves", "_half_sizes", "_failures_X", "_failures_y", "causes", "model",
    "_selection", "_first_steps", "history", "_round_call",
)  # fmt: skip
"""What a round of :meth:`Repairer.observe` changes, restored when it fails midway (the Fisher
and the training log-likelihoods it may compute first are the same whatever the round)."""


def _with_labels(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each example's input bytes followed by its label's, ``[N, bytes]`` uint8: rows that are
    equal exactly when input and label both are."""
    x = X.detach().cpu().contiguous().reshape(len(X), math.prod(X.shape[1:]))
    return torch.cat(
        [x.view(torch.uint8), y.detach().cpu().long().reshape(-1, 1).view(torch.uint8)], 1
    )


def warm_mix(continue_fraction: float) -> float:
    """The weight ``w = 2 f / (1 + f)`` of a warm round's fine-tune against the previous model.

    A fine-tune's result is the Polyak-Ruppert average of its last half of iterates, whose
    noise variance scales as ``1 / steps``; a warm round of ``f`` times the first round's
    steps alone has ``1 / f`` times the first round's variance, enough to flip failures that
    an earlier round fixed. Mixing ``(1 - w) * previous + w * new`` (independent noises) has
    variance ``(1 - w)^2 + w^2 / f`` times the first round's: ``w = 2 f / (1 + f)`` makes it
    exactly the first round's (``f = 1``: no mixing; ``f = 0.25``: ``w = 0.4``).
    """
    return 2 * continue_fraction / (1 + continue_fraction)


def _interpolate(previous: nn.Module, new: nn.Module, w: float) -> nn.Module:
    """A copy of ``new`` with every floating parameter and buffer ``(1 - w) * previous + w * new``
    (integer buffers, e.g. BatchNorm's step counts, are ``new``'s)."""
    old = previous.state_dict()
    mixed = {
        k: torch.lerp(old[k].to(v.dtype), v, w) if v.is_floating_point() else v
        for k, v in new.state_dict().items()
    }
    out = copy.deepcopy(new)
    out.load_state_dict(mixed)
    return out.eval()


_M = TypeVar("_M", bound=Callable[..., Any])


def _ids_said(fn: _M) -> _M:
    """A Repairer method whose out-of-vocabulary token ids are said as bad input, as in the
    one-shot calls (:func:`netmend.model.checks.ids_in_range`)."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with ids_in_range():
            return fn(*args, **kwargs)

    return cast(_M, wrapped)


class Repairer:
    """Repairs ``model`` round after round from batches of new failures (EWC-influence).

    Args:
        model: the deployed classifier (never modified).
        train: its training set, ``N`` examples (as :func:`netmend.identify` accepts: a
            map-style ``Dataset`` is read in batches on every pass, never held in memory).
            The failures of every round are kept, so their inputs must be one tensor per
            batch (not dicts).
        treat: the treatment ("finetune" default; any of :func:`netmend.treat`'s).
        k: cause selection over the summed scores: ``None``/"auto" (the K on which two random
            halves of all failures so far agree, as :func:`netmend.identify`), an int, a
            fraction or "positive".
        seed: seeds the halves and the treatments.
        l2: ``lambda`` (as :func:`netmend.identify`).
        train_config: the recipe the model was trained with (for the treatment).
        device, chunk_size, progress: as :func:`netmend.identify`.
        identify_options: options of the "ewc" fit (``steps``, ``step_size``).
        treat_options: options of the treatment.
        warm_start: with "finetune", continue later rounds from the previous repaired model.
        continue_fraction: a warm round's steps as a fraction of the first round's (0.25).
        mix: a warm round's model is ``(1 - mix) * previous + mix * fine-tuned`` (every
            floating parameter and buffer); default :func:`warm_mix` (0.4 for 0.25), which
            keeps a short round's fine-tune noise at the first round's (1: no mixing).
        eval_sets: ``{name: data}`` on which every round's model is evaluated (e.g. a test set).
        task: how batches and outputs are read (see :func:`netmend.identify`).
        gate: the label gate of :func:`netmend.identify` on every round's causes (``None``,
            default: on with the automatic K, off with an explicit ``k``). Its record is the
            round's ``history[i]["selection"]["label_gate"]``.
        guard: the class guard of :func:`netmend.repair` (:mod:`netmend.treatment.guard`), run
            every round against the original model. ``None`` (default): on with the automatic
            K and the "finetune" treatment. Its record is the round's
            ``history[i]["selection"]["guard"]``.
        guard_data: a labelled validation split the original never trained on, as
            :func:`netmend.repair`'s: every round's guard measures its trials there, and the
            accepted trial is the round's model (no second fine-tune). Implies the guard; part
            of the saved settings (:meth:`load` needs the same split).
        pad_id: the padding id of token-id inputs (what the user's ``collate_fn`` pads with).
            The Repairer keeps every round's failures in one tensor: batches of token ids of
            other widths (sequences padded to each batch's longest) are right-padded with it
            to one width. Without it, such a batch is refused. Part of the saved settings.

    Attributes:
        model: the current repaired model (``None`` before the first round).
        scores: ``[N]`` summed cause scores of all failures so far (positive = harmful).
        causes: the current causes, most harmful first.
        history: one dict per round (see :meth:`observe`).
    """

    def __init__(
        self,
        model: nn.Module,
        train: DataLike,
        *,
        treat: str = api.DEFAULT_TREAT,
        k: int | float | str | None = None,
        seed: int = 0,
        l2: float | str = api.DEFAULT_L2,
        train_config: TrainConfig | None = None,
        device: str | torch.device | None = "auto",
        chunk_size: int = 128,
        progress: bool = True,
        identify_options: Mapping[str, Any] | None = None,
        treat_options: Mapping[str, Any] | None = None,
        warm_start: bool = True,
        continue_fraction: float = 0.25,
        mix: float | None = None,
        eval_sets: Mapping[str, DataLike] | None = None,
        fisher: torch.Tensor | None = None,
        gate: bool | None = None,
        guard: bool | None = None,
        guard_data: DataLike | None = None,
        task: Task | None = None,
        pad_id: int | None = None,
    ):
        if not 0 < continue_fraction <= 1:
            raise ValueError(f"continue_fraction must lie in (0, 1]; got {continue_fraction}")
        if mix is not None and not 0 < mix <= 1:
            raise ValueError(f"mix must lie in (0, 1] (1: no mixing); got {mix}")
        if not is_auto_k(k):
            identification.select(np.zeros(2), k)  # validates k
        self.guard = resolve_guard(guard, guard_data is not None, is_auto_k(k), treat)
        self.gate = gate
        unknown = set(identify_options or {}) - {"steps", "step_size"}
        if unknown:
            raise ValueError(
                f"unknown identify option(s) {sorted(unknown)}; the ewc fit takes steps, step_size"
            )
        # said now, not after a round's passes (steps=-3 gave all-zero scores and no repair;
        # a misspelt treat option failed once the round had scored its failures)
        number_option(identify_options or {}, "steps", 30, integer=True, low=1)
        number_option(identify_options or {}, "step_size", 1.0, strict=True)
        treatment.get(treat)
        check_treat_options(treat, treat_options or {})
        if task is not None and overrides(task, "inputs"):
            raise ValueError(
                "the Repairer keeps every round's failures as tensors and passes them on, so a "
                "task that converts inputs (a Task.inputs override) would convert them twice; "
                "convert them in the model's forward or in the Dataset instead"
            )
        self.device = resolve_device(device)
        self.original = model
        self._work, src, self._y, self.num_classes = api._prepare(model, train, self.device, task)
        self._X: DataSource = src  # read in batches on every pass, never held whole
        self.task = src.task
        probe = src.head(1).read()
        if not isinstance(probe, torch.Tensor):
            raise TypeError(
                f"the Repairer keeps every round's failures as one tensor, so it needs tensor "
                f"inputs; got {type(probe).__name__} batches. Call netmend.repair on all the "
                "failures so far each round instead"
            )
        self._guard_data = None
        if guard_data is not None:
            gX, gy = as_tensors(guard_data, "guard_data", task=self.task)
            self._guard_data = (_as_dtype(gX, param_dtype(self._work)), gy)
        if pad_id is not None:
            pid = _integer(pad_id)
            if pid is None or pid < 0:
                raise TypeError(f"pad_id must be a token id (an integer >= 0); got {pad_id!r}")
            pad_id = pid
        self.pad_id = pad_id
        self.treat, self.k, self.seed, self.l2 = treat, k, seed, l2
        self.train_config = train_config or TrainConfig()
        self.chunk_size, self.progress = chunk_size, progress
        self.identify_options = dict(identify_options or {})
        self.treat_options = dict(treat_options or {})
        self.warm_start, self.continue_fraction = warm_start, continue_fraction
        self.mix = warm_mix(continue_fraction) if mix is None else float(mix)
        self.eval_sets = {
            name: as_tensors(d, name, task=self.task) for name, d in (eval_sets or {}).items()
        }
        held = [("guard_data", self._guard_data)] if self._guard_data is not None else []
        for name, (eX, ey) in held + list(self.eval_sets.items()):
            self._check_like_train(name, eX, ey)  # as the failures are: now, not as a round ends
        fm = FunctionalModel.of(self._work)
        api._check_fisher(fisher, fm)
        n = len(self._X)
        empty_x, empty_y = probe[:0], self._y[:0]
        self._ctx = Context(
            fm, self._X, self._y, empty_x, empty_y, self.device, chunk_size, progress, seed, l2,
            self.identify_options, fisher,
        )  # fmt: skip
        self._before: torch.Tensor | None = None
        self.scores = np.zeros(n)
        # [splits, 2, N]: the scores of each half of each random half-split of the failures
        self._halves = np.zeros((api.AUTO_K_SPLITS, 2, n))
        self._half_sizes = [[0, 0] for _ in range(api.AUTO_K_SPLITS)]  # failures behind each
        self._failures_X = empty_x
        self._failures_y = empty_y
        self.causes = np.zeros(0, dtype=np.int64)
        self._round_call: tuple[nn.Module, int, dict[str, Any]] | None = None
        self.model: nn.Module | None = None
        self.history: list[dict[str, Any]] = []
        self._first_steps: int | None = None
        self._selection: dict[str, Any] = {}

    # ------------------------------------------------------------------ scoring
    @property
    def fisher(self) -> torch.Tensor:
        """The summed diagonal Fisher at ``theta_hat`` ``[P]`` (computed once)."""
        return self._ctx.fisher_diag().cpu()

    def _ewc_scores(self, Xb: torch.Tensor, yb: torch.Tensor) -> np.ndarray:
        """EWC-influence scores ``[N]`` of one set of failures (positive = harmful)."""
        assert self._before is not None
        ctx = dataclasses.replace(self._ctx, Xq=Xb, yq=yb, progress=False)
        theta_f, _ = fit_theta_plus_f(
            ctx,
            steps=number_option(self.identify_options, "steps", 30, integer=True, low=1),
            step_size=number_option(self.identify_options, "step_size", 1.0, strict=True),
        )
        after = log_likelihoods(
            ctx.fm, theta_f, self._X, self._y, self.chunk_size, self.device, self.progress
        )
        return (self._before - after).double().numpy()

    @property
    def failures(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every failure observed so far, ``(X [M, ...], y [M])``, in the order observed."""
        return self._failures_X, self._failures_y

    def _read_batch(self, failures: DataLike) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of failures as tensors, checked against the training inputs' layout and the
        model's classes (a round's, or :meth:`per_failure`'s)."""
        Xb, yb = as_tensors(failures, "failures", task=self.task)
        self._check_like_train("failures", Xb, yb)
        return _as_dtype(Xb, param_dtype(self._work)), yb

    def _check_like_train(self, name: str, X: torch.Tensor, y: torch.Tensor) -> None:
        """Refuse inputs laid out or shaped unlike the training inputs (the Repairer stacks
        them as tensors), and labels outside the model's classes: failures as
        :func:`netmend.identify` checks them, and ``guard_data`` and ``eval_sets`` alike."""
        train = self._X.head(1).read()
        api.check_input_layout(X[:1], train, name)
        tokens = X.ndim == train.ndim == 2 and not api._real(X) and not api._real(train)
        if not tokens and X.shape[1:] != train.shape[1:]:  # token ids [n, L]: any length
            verb = "have" if name == "failures" else "has"
            raise ValueError(
                f"{name} {verb} input shape {tuple(X.shape[1:])} but train has "
                f"{tuple(train.shape[1:])}"
            )
        check_labels(y, self.num_classes, name)

    def _widths(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``a`` and ``b`` right-padded with ``pad_id`` to one width, when both are token ids
        ``[n, L]`` of other widths; unchanged otherwise.

        Raises:
            ValueError: they differ and there is no ``pad_id``.
        """
        if a.shape[1:] == b.shape[1:] or api._real(a) or a.ndim != 2:
            return a, b
        if not len(a) or not len(b):  # no rows to pad: the empty one takes the other's width
            return (a.new_empty((0, *b.shape[1:])) if not len(a) else a), (
                b.new_empty((0, *a.shape[1:])) if not len(b) else b
            )
        if self.pad_id is None:
            raise ValueError(
                f"these failures are token ids {a.shape[1]} wide and the earlier rounds' "
                f"{b.shape[1]}: the Repairer keeps every failure in one tensor, so it pads them "
                "to one width. Pass Repairer(..., pad_id=P), the id your collate_fn pads with "
                "(or pad every batch to one length)"
            )
        width = max(a.shape[1], b.shape[1])

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=self.pad_id)

        return pad(a), pad(b)

    def _check_batch(self, failures: DataLike) -> tuple[torch.Tensor, torch.Tensor]:
        Xb, yb = self._read_batch(failures)
        # token ids of another width than the stored failures': both padded to one (refused
        # here without a pad_id); the stored ones are widened in place only as the round ends
        Xb, stored = self._widths(Xb, self._failures_X)
        rows = _with_labels(Xb, yb)
        first = np.unique(rows.numpy(), axis=0, return_index=True)[1]
        if first.size < len(yb):  # a repeat within the batch would count twice as well
            warn(
                f"{len(yb) - first.size} of {len(yb)} failures repeat others of this batch; "
                "each is counted once"
            )
            keep = torch.from_numpy(np.sort(first))
            Xb, yb = Xb[keep], yb[keep]
        seen = rows_in(_with_labels(Xb, yb), _with_labels(stored, self._failures_y))
        if seen.all():
            raise ValueError(
                f"all {len(yb)} failures of this batch were observed in earlier rounds; pass "
                "new failures (one still wrong needs no repeating: its scores are in the sum)"
            )
        if seen.any():  # counted once: a repeat would add its scores to the sum twice
            warn(
                f"{int(seen.sum())} of {len(yb)} failures (rows {np.flatnonzero(seen)[:5].tolist()}"
                f"{'...' if seen.sum() > 5 else ''}) were observed in earlier rounds; they are "
                "left out of this round, so that each failure counts once"
            )
            keep = torch.from_numpy(~seen)
            Xb, yb = Xb[keep], yb[keep]
        check_failures(self._work, Xb, yb, self.device, 1024, self.task)
        api.check_ranks_agree(  # under torchrun: the same batch on every rank
            "Repairer.observe", self._work, self._X, self.seed, (Xb, yb)
        )
        return Xb, yb

    def _select(self) -> np.ndarray:
        """The causes from the summed scores, by the rules of :func:`netmend.identify`.

        The automatic K is the edge of the halves' agreement
        (:func:`netmend.identification.k_rules.edge_rule`), never more than 30% of a class's
        training examples (:func:`netmend.identification.base.class_capped`), with fewer
        than 4 failures each failure's top culprits, then the label gate
        (:mod:`netmend.identification.label_gate`): round 1 selects exactly what the
        one-shot :func:`netmend.identify` with method "ewc" selects.
        """
        if not is_auto_k(self.k):
            causes = identification.select(self.scores, self.k)
            self._selection = {"rule": str(self.k), "k": int(causes.size)}
            return self._gated(causes) if self.gate else causes
        m = int(self._failures_y.shape[0])
        kk = 0
        if m >= 4:
            positive = identification.select(self.scores, "positive")
            kk, _ = k_rules.edge_rule(
                list(self._halves[:, 0]), list(self._halves[:, 1]), positive.size
            )
            causes, rule = positive[:kk], "reproducible"
        if kk == 0:  # too few failures, or halves that agree on nothing: a handful
            pf = self.per_failure((self._failures_X, self._failures_y))
            # as identify: after halves that agree on nothing, positive summed scores only
            causes = per_failure_top(pf, self.scores, CULPRITS_PER_FAILURE, m >= 4)
            rule = f"top {CULPRITS_PER_FAILURE} culprits per failure"
        capped = class_capped(causes, self._y)
        self._selection = {"rule": rule, "k": int(capped.size)}
        if capped.size < causes.size:
            self._selection.update(uncapped_k=int(causes.size))
            self._selection["rule"] += f", at most {MAX_CLASS_SHARE:.0%} of a class"
        return capped if self.gate is False else self._gated(capped)

    def _gated(self, causes: np.ndarray) -> np.ndarray:
        """As identify: the label gate, on the original model's predictions."""
        gated, self._selection["label_gate"] = gate_causes(
            self._work, self._X, self._y, causes, self.device
        )
        self._selection["k"] = int(gated.size)
        return gated

    def _start(self, seconds: dict[str, float]) -> None:
        """First round only: the Fisher (through ``lambda``) and ``log p(z|theta_hat)``."""
        t0 = time.perf_counter()
        self._ctx.lam()  # resolves l2 (computing the Fisher) once, for every later round
        seconds["fisher"] = time.perf_counter() - t0
        t = time.perf_counter()
        self._before = log_likelihoods(
            self._ctx.fm, self._ctx.theta, self._X, self._y, self.chunk_size, self.device,
            self.progress,
        )  # fmt: skip
        seconds["base_likelihoods"] = time.perf_counter() - t

    def _score_round(self, Xb: torch.Tensor, yb: torch.Tensor, rnd: int) -> None:
        """Add the new failures' scores to the running sum and to one half of each split.

        Round 1 splits its failures into two random halves ``AUTO_K_SPLITS`` times (as
        :func:`netmend.identify`'s automatic K) and scores each half (one fit and forward
        pass each). A later round scores its batch once (one fit, one forward pass) and adds
        the scores, in every split, to the half with fewer failures so far: the halves stay
        disjoint sets of failures of nearly equal size, which is all the automatic K
        (:func:`netmend.identification.k_rules.edge_rule`) needs.
        """
        s_b = self._ewc_scores(Xb, yb)
        self.scores = self.scores + s_b
        if rnd == 1:
            self._score_halves(Xb, yb, rnd)
        else:
            for split, sizes in enumerate(self._half_sizes):
                h = int(sizes[1] < sizes[0])
                self._halves[split, h] += s_b
                sizes[h] += int(yb.shape[0])
        Fw, Xw = self._widths(self._failures_X, Xb)
        self._failures_X = torch.cat([Fw, Xw])
        self._failures_y = torch.cat([self._failures_y, yb])

    def _score_halves(self, Xb: torch.Tensor, yb: torch.Tensor, rnd: int) -> None:
        m = int(yb.shape[0])
        # the same halves as netmend.identify, so round 1 is the one-shot call
        for split, sizes in enumerate(self._half_sizes):
            perm = torch.from_numpy(np.random.default_rng([self.seed, split]).permutation(m))
            for h, part in enumerate((perm[: m // 2], perm[m // 2 :])):
                sizes[h] += int(part.numel())
                if part.numel():
                    self._halves[split, h] += self._ewc_scores(Xb[part], yb[part])

    @_ids_said
    def adopt(
        self,
        failures: DataLike,
        scores: np.ndarray,
        causes: np.ndarray,
        repaired: nn.Module,
        seconds: Mapping[str, float] | None = None,
    ) -> None:
        """Take a finished one-shot "ewc" repair as round 1 (e.g. ``netmend repair``'s first run).

        ``scores``/``causes`` must be :func:`netmend.identify`'s with method "ewc" on
        ``failures`` and this Repairer's settings, and ``repaired`` its treatment. Costs one
        forward pass over the training set, plus two for the halves of the automatic K.
        """
        if self.history:
            raise ValueError("adopt() starts a Repairer: this one has observed failures already")
        Xb, yb = self._check_batch(failures)
        secs: dict[str, float] = dict(seconds or {})
        self._start(secs)
        self.scores = np.asarray(scores, dtype=np.float64).copy()
        if self.scores.shape != (len(self._X),):
            raise ValueError(f"scores must have shape [{len(self._X)}]")
        self._score_halves(Xb, yb, 1)
        self._failures_X, self._failures_y = Xb, yb
        self.causes = np.asarray(causes, dtype=np.int64).copy()
        self.model = repaired
        kk = int(self.causes.size)
        self._selection = {"rule": "adopted", "k": kk}
        if self.treat == "finetune" and self.warm_start and kk:
            self._set_first_steps(kk)
        self._record(int(yb.shape[0]), set(), {}, secs)

    def last_round_was(self, failures: DataLike) -> bool:
        """Whether the last round observed exactly this batch: every row of it had been
        observed, and every row new in that round is in it.

        A caller that saves the state and then writes outputs of its own (``netmend repair
        --resume``) may be interrupted in between; rerun with the same batch, it finishes the
        round from the state instead of having the batch refused as already observed.
        """
        if not self.history:
            return False
        Xb, yb = as_tensors(failures, "failures", task=self.task)
        Xb = _as_dtype(Xb, param_dtype(self._work))
        try:
            Xb, stored = self._widths(Xb, self._failures_X)
        except ValueError:  # other widths and no pad_id: not the batch it stored
            return False
        if Xb.shape[1:] != stored.shape[1:]:
            return False
        batch = _with_labels(Xb, yb)
        m = int(self.history[-1]["new_failures"])
        new = _with_labels(stored[-m:], self._failures_y[-m:]) if m else batch[:0]
        every = _with_labels(stored, self._failures_y)
        return bool(rows_in(batch, every).all() and rows_in(new, batch).all())

    @_ids_said
    def per_failure(self, failures: DataLike) -> np.ndarray:
        """Per-failure cause scores ``[N, M]`` of ``failures`` (positive = harmful to failure i).

        Linearised with the stored curvature (as "ewc"'s culprits): one pass of per-example
        gradients over the training set.
        """
        Xb, yb = self._read_batch(failures)
        ctx = dataclasses.replace(self._ctx, Xq=Xb, yq=yb)
        return ctx.per_failure_scores(ctx.diag_curvature())

    # ------------------------------------------------------------------ a round
    @_ids_said
    def observe(self, failures: DataLike) -> nn.Module:
        """Take a batch of new failures (with their correct labels) and return the repaired model.

        Scores only the new failures (reusing the Fisher and ``log p(z|theta_hat)``), adds
        them to the summed scores, re-selects the causes and treats the model. Appends to
        :attr:`history` a dict with ``round``, ``new_failures``, ``failures`` (so far),
        ``k``, ``added`` / ``restored`` (training indices that became / stopped being causes
        this round), ``relabelled`` (``[index, new label]`` pairs when the treatment relabels),
        ``accuracy`` (on all failures so far and on every ``eval_sets`` entry), ``fixed``
        (the failures this round's model gets right, as indices into all failures so far)
        and ``seconds`` per stage.

        A round is all or nothing: one that fails or is interrupted (an error in the
        treatment, Ctrl-C) leaves the state as it was, so the same batch can be observed again.

        Returns:
            The repaired copy (also :attr:`model`); the model given at construction is untouched.
        """
        Xb, yb = self._check_batch(failures)
        # copied where a round changes them in place; the rest it only reassigns
        kept = {
            a: copy.deepcopy(v) if a in ("_halves", "_half_sizes", "_selection", "history") else v
            for a in _ROUND_STATE
            for v in [getattr(self, a)]
        }
        try:
            return self._round(Xb, yb)
        except BaseException:  # an error or an interrupt mid-round: the state before it
            for a, v in kept.items():
                setattr(self, a, v)
            raise

    def _round(self, Xb: torch.Tensor, yb: torch.Tensor) -> nn.Module:
        """:meth:`observe` on a checked batch (see there)."""
        self._round_call = None  # this round's, once it treats
        t0 = time.perf_counter()
        seconds: dict[str, float] = {}
        if self._before is None:
            self._start(seconds)
        t = time.perf_counter()
        rnd = len(self.history) + 1
        m = int(yb.shape[0])
        self._score_round(Xb, yb, rnd)
        old = set(self.causes.tolist())
        self.causes = self._select()
        seconds["identify"] = time.perf_counter() - t
        accepted: tuple[nn.Module, dict[str, Any]] | None = None
        if self.guard and self.causes.size:
            t = time.perf_counter()
            trials: list[tuple[nn.Module, dict[str, Any]]] = []

            def trial(c: np.ndarray) -> nn.Module:
                rec: dict[str, Any] = {}
                trials.append((self._treat(rec, c), rec))
                return trials[-1][0]

            g = guard_k(
                trial,
                self._work,
                self._X,
                self.causes,
                self.seed,
                self.device,
                guard_data=None if self._guard_data is None else as_source(self._guard_data),
            )
            self._selection["guard"] = g.as_dict()
            self.causes = self.causes[: g.k]
            if g.model is not None:  # guard_data: the accepted trial is this round's call
                accepted = next((m, rec) for m, rec in trials if m is g.model)
            seconds["guard"] = time.perf_counter() - t

        t = time.perf_counter()
        if accepted is not None:
            self.model, record = accepted
            if self._first_steps is None and self.treat == "finetune" and self.warm_start:
                self._set_first_steps(int(self.causes.size))  # as the round's own call would
        else:
            record = {}
            self.model = self._treat(record)
        seconds["treat"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t0
        self._record(m, old, record, seconds)
        return self.model

    def _record(
        self, m: int, old: set[int], record: Mapping[str, Any], seconds: dict[str, float]
    ) -> None:
        assert self.model is not None
        new = set(self.causes.tolist())
        relabelled: list[list[int]] = []
        if "new_labels" in record:
            for i, lab, ch in zip(
                record["causes"].tolist(), record["new_labels"].tolist(), record["changed"].tolist()
            ):
                if ch:
                    relabelled.append([int(i), int(lab)])
        ok = (
            predict(self.model, self._failures_X, self.device, task=self.task) == self._failures_y
        ).numpy()
        acc = {"failures": float(ok.mean())}
        for name, (X, y) in self.eval_sets.items():
            X = _as_dtype(X, param_dtype(self._work))
            pred = predict(self.model, X, self.device, task=self.task)
            acc[name] = float((pred == y).double().mean())
        self.history.append(
            {
                "round": len(self.history) + 1,
                "new_failures": m,
                "failures": int(self._failures_y.shape[0]),
                "k": int(self.causes.size),
                "selection": dict(self._selection),
                "added": sorted(new - old),
                "restored": sorted(old - new),
                "relabelled": relabelled,
                "accuracy": acc,
                "fixed": np.flatnonzero(ok).tolist(),
                "seconds": dict(seconds),
            }
        )

    def _treat(self, record: dict[str, Any], causes: np.ndarray | None = None) -> nn.Module:
        """This round's treatment of ``causes`` (default: :attr:`causes`; the class guard's
        trials pass theirs, and the same call is made with only the causes changed)."""
        trial = causes is not None
        causes = self.causes if causes is None else causes
        if causes.size == 0 and not trial:  # nothing to remove: the model stays as it is
            base = self.model if self.model is not None else self._work
            return copy.deepcopy(base).eval()
        opts = dict(self.treat_options)
        start: nn.Module = self._work
        if self.treat == "finetune" and self.warm_start:
            if self._first_steps is None:
                if not trial:  # a warm round's length follows the first real round's
                    self._set_first_steps(int(causes.size))
            elif self.model is not None:
                start = self.model
                opts.pop("epochs", None)
                opts["steps"] = max(1, math.ceil(self.continue_fraction * self._first_steps))
        # the guard's trials and the round's own call share start, seed and options
        self._round_call = (start, self.seed + len(self.history), opts)
        return self._call(causes, record, allow_no_causes=trial)

    def _call(self, causes: np.ndarray, record: dict[str, Any], allow_no_causes: bool) -> nn.Module:
        """The treatment call of :attr:`_round_call` on ``causes`` (mixed with a warm start)."""
        assert self._round_call is not None  # set by _treat (internal invariant)
        start, seed, opts = self._round_call
        treated = api.treat(
            start,
            self._X,
            causes,
            self.treat,
            l2=self._ctx.l2,
            train_config=self.train_config,
            seed=seed,
            device=self.device,
            chunk_size=self.chunk_size,
            progress=self.progress,
            fisher=self.fisher if start is self._work else None,
            failures=(self._failures_X, self._failures_y),
            record=record,
            task=self.task,
            allow_no_causes=allow_no_causes,  # the guard's churn trial, the controls
            **opts,
        )
        if start is not self._work and self.mix < 1:
            record["mix"] = self.mix
            return _interpolate(start, treated, self.mix)
        return treated

    @property
    def controllable(self) -> bool:
        """Whether :meth:`control` has a round's treatment call to repeat."""
        return self._round_call is not None

    @_ids_said
    def control(self, causes: np.ndarray) -> nn.Module:
        """The last round's treatment call again with only the causes changed: its controls.

        Same start (in a warm round, the previous round's model), length, seed, failures and
        mixing as the round's own call, so ``control([])`` is the round's fine-tune with
        nothing removed and ``control(random K)`` its random-K control (see
        :func:`netmend.evaluation.controls.run_controls`).

        Raises:
            ValueError: no round has made a treatment call (none observed yet, or the last
                round selected no causes and kept the model as it was).
        """
        if self._round_call is None:
            if not self.history:
                why = "no round yet (observe failures first)"
            elif self.causes.size == 0:
                why = "the last round selected no causes and kept the model as it was"
            else:  # loaded: the round's start, the previous round's model, is not saved
                why = (
                    "the last round's call started from the previous round's model, which a "
                    "saved state does not keep; controls are made in the session that "
                    "observed the round"
                )
            raise ValueError(f"no treatment call to repeat: {why}")
        empty = np.asarray(causes).size == 0  # finetune-only: nothing removed
        # checked as treat() checks them: 1.5 was truncated to 1
        picked = np.zeros(0, np.int64) if empty else check_causes(causes, len(self._X)).numpy()
        return self._call(picked, {}, allow_no_causes=True)

    def _set_first_steps(self, kk: int) -> None:
        """The first real round's fine-tune length in optimiser steps (``kk`` causes removed),
        which later warm rounds take a fraction of."""
        n = len(self._X)
        cfg = finetune_recipe(self.train_config, n, n - kk, self.treat_options)
        self._first_steps = max(1, round(cfg.epochs * (n - kk) / cfg.batch_size))

    # ------------------------------------------------------------------ persistence
    def _train_hash(self) -> str:
        """Names the training set in the saved settings: in memory, the hash of its tensors
        (as netmend 0.3 saved it, so its folders resume); streamed, the source's fingerprint
        (the content hash its checking pass computed: no further read)."""
        if self._X.in_memory:
            X = self._X.read()
            assert isinstance(X, torch.Tensor)  # checked at construction
            return store.tensor_hash(X, self._y)
        return self._X.fingerprint()

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "model": store.module_hash(self._work),
            "train": self._train_hash(),
            "treat": self.treat,
            "k": None if is_auto_k(self.k) else self.k,  # "auto" is the default's name
            "guard": self.guard,
            "guard_data": None
            if self._guard_data is None
            else store.tensor_hash(*self._guard_data),
            "gate": self.gate,
            "seed": self.seed,
            "l2": self.l2 if isinstance(self.l2, str) else float(self.l2),
            "identify_options": store.jsonable(self.identify_options),
            "treat_options": store.jsonable(self.treat_options),
            "warm_start": self.warm_start,
            "continue_fraction": self.continue_fraction,
            "mix": self.mix,
            # the treatment's recipe: a round at another learning rate is another repair
            "train_config": dataclasses.asdict(self.train_config),
            "pad_id": self.pad_id,
        }

    def save(self, directory: str | Path) -> Path:
        """Write the state, the current model and the history to ``directory`` (atomically).

        Under ``torchrun`` rank 0 writes, and every rank returns once it has: a
        :meth:`load` right after reads the new state on every rank (rank 1 read the folder
        before rank 0 had written it, and resumed another round's state with no word).
        """
        d = Path(directory)
        writer = distributed.is_writer()
        if writer:
            d.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {
            "scores": torch.from_numpy(self.scores),
            "halves": torch.from_numpy(self._halves),
            "failures_X": self._failures_X,
            "failures_y": self._failures_y,
            "causes": torch.from_numpy(np.asarray(self.causes, dtype=np.int64)),
        }
        if self._before is not None:
            tensors["before"] = self._before
            tensors["fisher"] = self.fisher
        meta = {
            "settings": self._fingerprint(),
            "l2": self._ctx.l2 if isinstance(self._ctx.l2, str) else float(self._ctx.l2),
            "first_steps": self._first_steps,
            "half_sizes": self._half_sizes,
            "history": self.history,
            "eval_sets": sorted(self.eval_sets),  # names only: load warns when they are not given
        }
        if self.model is not None:  # in the state's own file: one atomic write for both
            for k, v in self.model.state_dict().items():
                tensors[MODEL_PREFIX + k] = v.detach().cpu().clone()
        store.save_tensors(d / STATE_FILE, tensors, meta)
        if writer:
            (d / MODEL_FILE).unlink(missing_ok=True)  # 0.3.6 kept the model apart: now stale
        store.write_json_atomic(d / "history.json", self.history)
        distributed.barrier()
        return d

    @classmethod
    def load(
        cls, directory: str | Path, model: nn.Module, train: DataLike, **kwargs: Any
    ) -> Repairer:
        """A :class:`Repairer` continuing from :meth:`save`'s ``directory``.

        ``model``, ``train`` and the settings (``kwargs``, as for the constructor) must be the
        ones it was saved with; otherwise :class:`ValueError` names what differs. The
        constructor's other arguments (``eval_sets``, ``progress``, ``device``, ...) are not
        saved: pass them again (a warning names ``eval_sets`` the saved run had and this call
        lacks).
        """
        d = Path(directory)
        if not (d / STATE_FILE).is_file():
            raise ValueError(f"{d}: no continual-repair state ({STATE_FILE}) to resume from")
        try:
            tensors, meta = store.load_tensors(d / STATE_FILE)
            model_sd = {
                k[len(MODEL_PREFIX) :]: tensors.pop(k)
                for k in list(tensors)
                if k.startswith(MODEL_PREFIX)
            } or None
            if model_sd is None and (d / MODEL_FILE).is_file():  # saved by 0.3.6
                model_sd = store.load_tensors(d / MODEL_FILE)[0]
        except store.CacheRecordError as exc:  # unlike a cache, a round's state is not recomputed
            raise ValueError(
                f"{str(exc).split(': delete it')[0]}. The continual-repair state cannot be "
                "recomputed: start a new run (a new folder) with all the failures so far"
            ) from None
        if "fisher" in kwargs:  # the saved run's own Fisher is loaded with it
            raise ValueError("Repairer.load takes the Fisher from the saved state: drop fisher=")
        self = cls(model, train, fisher=tensors.get("fisher"), **kwargs)
        now, saved = self._fingerprint(), dict(meta["settings"])
        if is_auto_k(saved.get("k")):  # 0.3.6 saved k="auto" as given; the name of None
            saved["k"] = None
        diff = [key for key in saved if saved[key] != store.jsonable(now.get(key))]
        if diff:
            hashed = ("model", "train", "guard_data")  # content hashes: the values say nothing

            def said(key: str) -> str:
                if key in hashed:  # say at least whether one side had none
                    there, here = saved[key] is not None, now.get(key) is not None
                    if there != here:
                        return f"{key} ({'given' if there else 'none'} there, " + (
                            "given here)" if here else "none here)"
                        )
                    return key
                was: Any = saved[key]
                now_: Any = store.jsonable(now.get(key))
                if isinstance(was, dict) and isinstance(now_, dict):  # name the fields
                    fields = sorted(f for f in {*was, *now_} if was.get(f) != now_.get(f))
                    was = {f: was.get(f) for f in fields}
                    now_ = {f: now_.get(f) for f in fields}
                return f"{key} ({was!r} there, {now_!r} here)"

            raise ValueError(
                f"{d}: saved with other {', '.join(said(k) for k in diff)}; pass the model, "
                "training set and settings of the saved run, or start a new folder"
            )
        dropped = sorted(set(meta.get("eval_sets", [])) - set(self.eval_sets))
        if dropped:  # they only measure, so not refused; but every later round lacks them
            warn(
                f"{d}: the saved run evaluated every round on eval_sets {dropped}, which this "
                "load was not given: later rounds' history will lack them. Pass "
                "Repairer.load(..., eval_sets={...}) to keep them"
            )
        if not isinstance(meta["l2"], str):
            self._ctx.l2 = float(meta["l2"])
        self.scores = tensors["scores"].numpy().copy()
        self._halves = tensors["halves"].numpy().copy()
        if self._halves.shape[0] != api.AUTO_K_SPLITS or self._halves.ndim != 3:
            raise ValueError(
                f"{d}: saved by an older netmend (one half-split of the failures; this one "
                f"keeps {api.AUTO_K_SPLITS}); start a new folder"
            )
        self._failures_X, self._failures_y = tensors["failures_X"], tensors["failures_y"]
        self.causes = tensors["causes"].numpy().copy()
        self._before = tensors.get("before")
        self._first_steps = meta["first_steps"]
        self._half_sizes = [[int(v) for v in pair] for pair in meta["half_sizes"]]
        self.history = list(meta["history"])
        if model_sd is not None:
            repaired = copy.deepcopy(self._work)
            repaired.load_state_dict(model_sd)
            self.model = repaired.eval()
        return self
