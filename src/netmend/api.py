"""The public entry points: ``identify``, ``treat``, ``evaluate`` and the one-call ``repair``.

Sign convention: every score is the cause score ``r(z)`` of Tanno et al. (2022),
**positive = harmful** (fitting the failures lowers the likelihood of ``z``).
The user's model is never modified: all work happens on copies or functionally.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from netmend import identification, store, treatment
from netmend._warnings import called_by_user, warn
from netmend.data import distributed
from netmend.data.checks import check_labels, resolve_device
from netmend.data.source import PROBE_ROWS, DataSource, SourceLike, as_source
from netmend.data.task import Task, tensors_of, tree_map
from netmend.data.validate import check_causes, check_count, check_index, check_k, check_seed
from netmend.evaluation import FailureSplit, accuracies
from netmend.evaluation.controls import (
    MAX_CLASS_DROP,
    TEST_TOLERANCE,
    class_accuracies,
    class_share,
    diagnosis_gain,
    oracles_of_k,
    recipe_loss,
    run_controls,
)
from netmend.evaluation.controls import repaired as pareto_repaired
from netmend.identification import k_rules
from netmend.identification.base import (
    CULPRITS_PER_FAILURE,
    EMPTIED_CLASS_SHARE,
    IDENTIFY_ARGUMENTS,
    IGNORES_L2,
    MAX_CLASS_SHARE,
    Context,
    class_capped,
    is_auto_k,
    per_failure_top,
    top_indices,
)
from netmend.identification.base import check_options as check_identify_options
from netmend.identification.caching import cached_method
from netmend.identification.label_gate import all_gate, balance_gate, fill_gate, gate_causes
from netmend.model.checks import (
    check_failures,
    check_finite_parameters,
    check_logits,
    check_materialised,
    check_model,
    ids_in_range,
    num_classes_of,
)
from netmend.model.functional import FunctionalModel, match_dtype, param_dtype
from netmend.model.training import TrainConfig, check_resettable, model_device, predict
from netmend.treatment.base import TREAT_ARGUMENTS
from netmend.treatment.base import check_options as check_treat_options
from netmend.treatment.guard import guard_k, resolve_guard

DEFAULT_IDENTIFY = "ewc"
DEFAULT_TREAT = "finetune"
AUTO_K_SPLITS = 3
"""Random half-splits of the query failures whose agreement sets the automatic K."""
DEFAULT_L2 = "auto"

_F = TypeVar("_F", bound=Callable[..., Any])


@contextmanager
def _own_rng() -> Iterator[None]:
    """Run with the global torch RNG saved and restored: the library may seed it (code that
    draws from it, e.g. ``reset_parameters``, stays deterministic given the seed), but the
    caller's stream is left exactly where it was."""
    # CUDA's generators only once CUDA is up: saving them initialises it, which a process
    # that never asked for a GPU must not pay (and a forked child could not do again)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        yield


def _public(fn: _F) -> _F:
    """A public entry point: the caller's global RNG is kept (:func:`_own_rng`), and an
    Embedding's out-of-range input id is reported as bad input (:func:`ids_in_range`)."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _own_rng(), ids_in_range():
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


class Culprits(NamedTuple):
    """The training examples most to blame for one failure, most harmful first.

    Attributes:
        indices: training indices ``[n]``.
        scores: their per-failure cause scores ``[n]`` (positive = harmful to that failure).
    """

    indices: np.ndarray
    scores: np.ndarray


@dataclass(eq=False)  # compared by identity: field-wise == of arrays has no single truth value
class Identification:
    """Result of :func:`identify`.

    Attributes:
        method: the identification method's name.
        scores: ``[N]`` float64 cause scores, positive = harmful.
        causes: selected training indices, int64, most harmful first.
        seconds: wall time of scoring.
        info: method diagnostics (e.g. the EWC fit record).
        fisher: summed diagonal empirical Fisher over the training set ``[P]``, if computed
            (pass it to :func:`treat` to avoid recomputing it).
    """

    method: str
    scores: np.ndarray
    causes: np.ndarray
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    fisher: torch.Tensor | None = None
    _per_failure: np.ndarray | Callable[[], np.ndarray] | None = field(default=None, repr=False)
    _failures: int | None = field(default=None, repr=False)  # M, to check per-failure scores

    def __repr__(self) -> str:
        return (
            f"Identification(method={self.method!r}, examples={self.scores.shape[0]}, "
            f"failures={self._failures}, causes={self.causes.size}, "
            f"seconds={self.seconds:.3g})"
        )

    @property
    def per_failure(self) -> np.ndarray:
        """``[N, M]`` per-failure cause scores (positive = harmful to failure ``i``).

        Computed on first access (one more pass over the training set) and kept. That pass
        reads the training set and the failures as they are then: do not change them in
        place before (with a ``cache_dir``, a change is detected and refused).
        """
        if self._failures == 0:
            raise ValueError(
                "this identification audited the training set without failures "
                "(failures=None): it has no per-failure scores"
            )
        if self._per_failure is None:
            raise ValueError(f"method {self.method!r} gives no per-failure scores")
        if callable(self._per_failure):
            with _own_rng(), ids_in_range():  # a pass as the entry points' are (a DataLoader's
                self._per_failure = self._per_failure()  # workers drew from the global RNG)
        pf = self._per_failure
        if isinstance(pf, torch.Tensor):  # a plug-in's tensor, read as the array it holds
            pf = self._per_failure = pf.detach().cpu().numpy()
        n, m = self.scores.shape[0], self._failures
        if (
            not isinstance(pf, np.ndarray)
            or pf.ndim != 2
            or pf.shape[0] != n
            or (m is not None and pf.shape[1] != m)
        ):
            raise _broken(
                "identification method",
                self.method,
                f"method {self.method!r} returned per-failure scores of shape "
                f"{getattr(pf, 'shape', type(pf).__name__)}; expected [{n}, {m}] (training "
                "examples x failures)",
            )
        if pf.dtype.kind == "f" and not np.isfinite(pf).all():  # culprits would skip or top NaN
            bad = np.flatnonzero(~np.isfinite(pf).all(0))
            raise _broken(
                "identification method",
                self.method,
                f"method {self.method!r} returned per-failure scores with NaN or inf (failure "
                f"columns {bad[:5].tolist()}): its culprits would be meaningless",
            )
        return pf

    def culprits(self, i: int, n: int = 5) -> Culprits:
        """The ``n`` training examples most to blame for failure ``i`` (index into the failures).

        Summed scores can hide what holds failure by failure (an example may harm one failure
        and help another); this is the per-failure view.
        """
        n = check_count(n, "n")
        if self._failures == 0:
            raise ValueError(
                "this identification audited the training set without failures "
                "(failures=None): it has no culprits per failure; its scores and causes rank "
                "the training set itself"
            )
        pf = self.per_failure
        col = pf[:, check_index(i, pf.shape[1], "failure index i")]
        top = top_indices(col, n)  # ties by index, as select() breaks them
        return Culprits(top, col[top].astype(np.float64))


@dataclass(eq=False)
class RepairResult:
    """Result of :func:`repair`.

    Attributes:
        model: the repaired copy (the input model is untouched).
        identification: the full identification result.
        treatment: the treatment's name.
        seconds: wall time per stage (``identify``, ``treat``).
        treatment_info: the treatment's record (see the ``record`` argument of :func:`treat`;
            empty for treatments that record nothing).
        recipe: every keyword argument the :func:`treat` call received besides the model, the
            training set, the causes and the method (what :func:`with_controls` repeats).
        original: a hash of the model that was repaired (:func:`netmend.store.module_hash`),
            so that :func:`with_controls` refuses another model.
    """

    model: nn.Module
    identification: Identification
    treatment: str
    seconds: dict[str, float]
    treatment_info: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict, repr=False)
    original: str | None = field(default=None, repr=False)  # hash of the model repaired

    def __repr__(self) -> str:
        secs = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, (int, float)) else f"{k}=..."
            for k, v in self.seconds.items()
        )
        return (
            f"RepairResult(model={type(self.model).__name__}, identification="
            f"{self.identification!r}, treatment={self.treatment!r}, seconds={{{secs}}})"
        )

    @property
    def scores(self) -> np.ndarray:
        """``[N]`` cause scores, positive = harmful."""
        return self.identification.scores

    @property
    def causes(self) -> np.ndarray:
        """Training indices of the causes, most harmful first."""
        return self.identification.causes

    def culprits(self, i: int, n: int = 5) -> Culprits:
        """The ``n`` training examples most to blame for failure ``i``, with their scores."""
        return self.identification.culprits(i, n)


DataLike = SourceLike
"""A map-style ``Dataset``, a non-shuffled ``DataLoader``, a pair ``(X, y)`` or a
:class:`netmend.data.source.DataSource`."""


def _prepare(
    model: nn.Module,
    train: DataLike,
    device: torch.device,
    task: Task | None,
    chunk_size: int = 64,
) -> tuple[nn.Module, DataSource, torch.Tensor, int]:
    check_model(model)
    check_finite_parameters(model)
    distributed.world()  # under torchrun: join the process group before any pass or write
    src = as_source(train, "train", task)
    work = _private_copy(model, device)
    X = match_dtype(src, param_dtype(work))
    assert isinstance(X, DataSource)  # match_dtype keeps a source a source
    probe = X.head(min(PROBE_ROWS, max(chunk_size, 1)))  # kept by as_source: no re-read
    classes = num_classes_of(work, probe, device, X.task)
    check_logits(work, probe, device, "train", X.task)
    check_labels(X.labels, classes, "train")
    return work, X, X.labels, classes


OUTPUT_ROWS = 8
"""Training examples whose logits name the model's function in a cache key."""


def _outputs_hash(work: nn.Module, X: DataSource, device: torch.device) -> str:
    """A hash of ``work``'s logits on the first :data:`OUTPUT_ROWS` training examples (read
    through the task): the function, not only the parameters, for the cache key."""
    x = X.head(min(OUTPUT_ROWS, len(X))).to(device)
    with torch.no_grad():
        z = X.task.logits(X.task.call(work, x))
    return store.tensor_hash(z.detach().cpu())


def _failures(
    failures: DataLike, X: DataSource, classes: int, dtype: torch.dtype, task: Task | None
) -> DataSource:
    """The failures as a source like the training set's (same input structure and dtype)."""
    F = as_source(failures, "failures", task)
    fx, tx = F.head(1).read(), X.head(1).read()  # one example each (kept by as_source)
    check_input_layout(fx, tx)
    if F.signature is not None and X.signature is not None and _shapes(fx) != _shapes(tx):
        raise ValueError(
            f"failures have input shape {F.signature} but train has {X.signature}: pass "
            "failures with inputs like the training set's"
        )
    check_labels(F.labels, classes, "failures")
    _check_scale(F, X)
    out = match_dtype(F, dtype)
    assert isinstance(out, DataSource)
    return out


SCALE_RATIO = 10.0
"""The failures' largest input magnitude may differ from the training set's by this factor
before :func:`_check_scale` warns."""


def _check_scale(F: DataSource, X: DataSource) -> None:
    """Warn when the failures' real-valued inputs are scaled unlike the training set's (images
    in 0-255 against 0-1: the scores would be about inputs the model never saw, and an
    outside-in trial's held-out figure counted the repaired failures as unseen). Compares the
    largest magnitude of each input tensor over the first examples of each (their probes)."""
    fx = F.head(min(PROBE_ROWS, len(F))).read()
    tx = X.head(min(PROBE_ROWS, len(X))).read()
    for a, b in zip(tensors_of(fx), tensors_of(tx), strict=False):
        if not (_real(a) and _real(b)):
            continue
        ma, mb = float(a.detach().abs().max()), float(b.detach().abs().max())
        if ma > 0 and mb > 0 and not 1 / SCALE_RATIO <= ma / mb <= SCALE_RATIO:
            warn(
                f"the failures' inputs reach |x| = {ma:.4g} where the training set's reach "
                f"{mb:.4g} (first {min(PROBE_ROWS, len(X))} examples): are they scaled "
                "differently (e.g. images in 0-255 against 0-1)? Pass failures prepared as the "
                "training inputs were"
            )
            return


def _real(t: torch.Tensor) -> bool:
    """Whether a tensor holds real values (not integer ids or codes)."""
    return t.is_floating_point() or t.is_complex()


def input_layout(x: Any) -> Any:
    """The structure of a batch of inputs: its containers and keys, and for each tensor whether
    it holds integers (token ids, codes) or real values."""
    return tree_map(lambda t: "real" if _real(t) else "int", x)


def check_input_layout(failures: Any, train: Any, name: str = "failures") -> None:
    """Refuse failures whose inputs are laid out unlike the training set's (batches of either;
    :func:`input_layout`): other keys, or uint8 images against float ones, refused rather than
    cast. :func:`identify` and every continual round (:class:`netmend.Repairer`) check this;
    the Repairer checks its ``guard_data`` and ``eval_sets`` the same way (``name``).

    Raises:
        ValueError: both layouts, and what to pass.
    """
    seen, want = input_layout(failures), input_layout(train)
    if seen != want:
        verb = "have" if name == "failures" else "has"
        raise ValueError(
            f"{name} {verb} inputs {seen} but train has {want}: pass {name} with inputs like "
            "the training set's (the same keys, integer ids where it has them, images scaled "
            "as in training)"
        )


def _shapes(x: Any) -> list[Any]:
    """The per-example shapes of a batch's inputs that a pair must share with the training
    set: a real tensor's whole shape, an integer tensor's rank only (a model over token ids
    may take sequences of any length)."""
    return [tuple(t.shape[1:]) if _real(t) else t.ndim for t in tensors_of(x)]


LOW_PRECISION = (torch.bfloat16, torch.float16)
"""Parameter dtypes netmend computes in float32 instead (with a warning): their 8- or 11-bit
mantissas lose squared gradients (a bfloat16 EWC Fisher was all zeros) and many of the kernels
netmend needs have no bfloat16/float16 version."""


def _private_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``model`` on ``device`` in eval mode; float32 if ``model`` is bfloat16/float16.

    A low-precision model is computed in float32 (a lossless upcast of its parameters) and the
    user is told so by a ``UserWarning``; treatments cast the repaired copy back.
    """
    check_materialised(model)
    work = copy.deepcopy(model).to(device).eval()
    dtype = param_dtype(work)
    if dtype in LOW_PRECISION:
        warn(
            f"the model's parameters are {dtype}: netmend computes in float32 (squared "
            f"gradients and curvature underflow or have no {dtype} kernels); the scores are "
            "those of the float32 upcast of the model",
        )
        work = work.float()
    return work


_REPAIR_ARGUMENTS = (TREAT_ARGUMENTS - IDENTIFY_ARGUMENTS) | {
    "treat", "identify", "identify_options", "treat_options", "guard", "guard_data"
}  # fmt: skip
"""Keywords of :func:`repair` / :func:`treat` that :func:`identify` does not take."""


def check_ranks_agree(
    what: str,
    model: nn.Module,
    X: DataSource,
    seed: int,
    failures: DataSource | tuple[torch.Tensor, torch.Tensor] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Under ``torchrun``, refuse ranks that hold other inputs (nothing in one process).

    Sharded passes combine the ranks' work, and every rank returns the whole result: ranks
    with other BatchNorm statistics, other labels or images of the same shape, another seed
    (a common data-parallel habit) or another cache folder once chose other causes with no
    word, or waited on different collectives until the group's timeout.

    Args:
        what: the step checked, for the message.
        model: the model (its parameters and buffers are compared).
        X, failures: the training set and the failures (sizes and content hashes; a pair of
            tensors is made a source only under torchrun).
        seed: the run's seed.
        cache_dir: the run's cache folder: the same folder (a shared file system) with the
            same files on every rank.

    Raises:
        ValueError: on every rank, naming what differs and each rank's reading.
    """
    if distributed.world()[1] == 1:
        return
    values: dict[str, Any] = {
        "model parameters and buffers": store.module_hash(model),
        "training examples": len(X),
        "training data (content hash)": X.fingerprint(),
        "seed": seed,
    }
    if failures is not None:
        if not isinstance(failures, DataSource):
            failures = as_source(failures, "failures")
        values["failures"] = len(failures)
        values["failures (content hash)"] = failures.fingerprint()
    if cache_dir is not None:
        folder = Path(cache_dir).resolve()
        values["cache_dir"] = str(folder)
        values["cache_dir's files"] = sorted(os.listdir(folder)) if folder.is_dir() else []
    distributed.check_same(values, what)


@_public
def identify(
    model: nn.Module,
    train: DataLike,
    failures: DataLike | None,
    method: str = DEFAULT_IDENTIFY,
    k: int | float | str | None = None,
    *,
    l2: float | str = DEFAULT_L2,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    chunk_size: int = 128,
    progress: bool = True,
    fisher: torch.Tensor | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    overwrite_cache: bool = False,
    task: Task | None = None,
    gate: bool | str | None = None,
    **options: Any,
) -> Identification:
    """Score every training example for how much it caused the failures.

    Args:
        model: a classifier ``nn.Module`` (not modified) whose output holds logits ``[B, C]``
            (a tensor, a tuple starting with it, a dict with ``"logits"`` or an object with
            ``.logits``; see ``task``).
        train: the training set, ``N`` examples: a map-style ``Dataset`` (items ``(x, y)``
            or dicts with ``"labels"``; read batch by batch in index order, never held in
            memory), an unshuffled ``DataLoader`` over one (its ``collate_fn`` and
            ``num_workers`` are used), or ``(X, y)`` tensors (see
            :func:`netmend.data.source.as_source`).
        failures: inputs the model gets wrong, with their **correct** labels, ``M`` examples.
            ``None`` audits the training set without failures (as a label-issue finder
            does): only with a method that ignores them ("loss", "random", or "grad_dot",
            "influence", "ekfac", "tracin" with ``target="self"``) and an explicit ``k``.
        method: a registered method (``netmend.identification.available()``): "ewc"
            (EWC-influence, default), "linear"; the influence family "influence", "ekfac",
            "tracin", "grad_dot", "grad_cos", "trak"; Data Shapley "knn_shapley",
            "tmc_shapley", "banzhaf"; baselines "loss", "random".
        k: how to select causes: an int in ``[0, N]`` (top-k; numpy/torch integers too), a
            fraction of ``N`` in ``(0, 1)``, "positive" (``r > 0``)
            or ``None``/"auto" (default): the largest K on which random halves of the
            failures still agree (at least 0.9 of their best agreement, averaged over
            ``AUTO_K_SPLITS`` = 3 half-splits: :func:`netmend.identification.k_rules.
            edge_rule`; it scores the training set six times more, and needs at least 4
            failures; with fewer, or halves that agree on nothing, each failure's top 5
            culprits). For the Data-Shapley methods
            ("knn_shapley", "tmc_shapley", "banzhaf") ``None`` means "positive": every example
            of negative value, with no K to choose.
        l2: ``lambda`` of the penalty ``(lambda/2)||theta - theta_hat||^2`` (also the damping
            of the Fisher): a positive number, or "auto" (default) for ``1e4`` times the mean
            diagonal of the summed Fisher (see :func:`netmend.identification.base.resolve_l2`).
        seed: seeds anything random: an int (``None`` is refused: there is no unseeded
            mode). The caller's global torch RNG is left untouched.
        device: "cpu", "cuda", or "auto" (CUDA when available).
        chunk_size: examples per batched pass (changes the scores only at float rounding
            level: sums are taken in another order).
        progress: show progress bars.
        fisher: a precomputed summed diagonal Fisher ``[P]`` (from an earlier result).
        cache_dir: a directory in which to save this run (see :mod:`netmend.store`): the
            Fisher, every pass over the training set (checkpointed while it runs) and the
            scores. Rerunning with the same settings reuses them, and resumes an interrupted
            run where it stopped, with bit-for-bit the same scores. ``chunk_size``,
            ``progress`` and ``k`` may change between runs; any other setting may not. The
            key holds the model's logits on a few examples, which differ at rounding level
            between devices: a cache made on one device is refused on another.
        overwrite_cache: replace a ``cache_dir`` that holds a run with other settings
            (otherwise that raises ``ValueError``).
        task: a :class:`netmend.data.task.Task`: how a batch splits into inputs and labels,
            how the model is called and where its logits are (default
            :class:`netmend.data.task.ClassificationTask`).
        gate: the label gate (:mod:`netmend.identification.label_gate`): when at least 30%
            of the automatic causes are examples the model does not predict the given label
            of, keep only those (the failures come from label errors; the others are hard,
            correctly labelled examples whose removal costs test accuracy). ``None``
            (default): on with the automatic K, off with an explicit ``k``; ``True`` with an
            explicit ``k`` gates its top-k; ``"fill"`` keeps the count instead, replacing the
            dropped causes by the next candidates down the ranking
            (:func:`netmend.identification.label_gate.fill_gate`; measured on dev runs, not
            the default); ``"balance"`` also removes as many label errors of the reverse
            direction of each confused pair of classes
            (:func:`netmend.identification.label_gate.balance_gate`; not the default);
            ``"all"``, once the gate applies, replaces the causes (an explicit ``k``'s too) by
            every training example the model does not predict the given label of
            (:func:`netmend.identification.label_gate.all_gate`; not the default). Its record
            is ``info["label_gate"]``.
        **options: method options (e.g. ``steps`` for "ewc", ``curvature`` for "linear").

    Returns:
        An :class:`Identification`; ``scores`` are ``[N]``, positive = harmful. With a
        ``cache_dir``, ``info["cache"]`` says what was reused and what was computed.

    Raises:
        ValueError: malformed inputs (NaN, mismatched shapes, labels out of range, empty
            failures, failures the model already gets right, a stochastic model in train mode,
            NaN parameters, outputs that are probabilities instead of logits, ``k > N``, an
            option the method does not take); scores that are all equal; a ``cache_dir``
            holding a run with other settings (see ``docs/safety.md``).
        TypeError: a ``seed`` that is not an integer.
    """
    fn = identification.get(method)
    misplaced = sorted(set(options) & _REPAIR_ARGUMENTS)
    if misplaced:  # "unknown option(s) ['guard'] for method 'ewc'" blamed the method
        raise ValueError(
            f"{', '.join(misplaced)}: an argument of netmend.repair (or netmend.treat), not of "
            "identify; pass it there, or drop it"
        )
    check_identify_options(method, options)
    if method in IGNORES_L2 and not (isinstance(l2, str) and l2 == DEFAULT_L2):
        hint = (
            " Its curvature is damped by the option damping (give the model's weight decay "
            "of the summed objective for the exact influence function)"
            if method in ("influence", "ekfac", "trak")
            else ""
        )
        warn(f"l2={l2!r} is not used by method {method!r} (only 'ewc' and 'linear' use it).{hint}")
    if not (gate is None or isinstance(gate, bool) or gate in ("fill", "balance", "all")):
        raise ValueError(
            f"gate must be None, True, False, 'fill', 'balance' or 'all'; got {gate!r}"
        )
    seed = check_seed(seed)
    dev = resolve_device(device)
    work, X, y, classes = _prepare(model, train, dev, task, chunk_size)
    k = check_k(k, len(X))
    if k == "positive" and options.get("target") == "self":
        raise ValueError(
            "target='self' scores self-influence, which is never negative: k='positive' would "
            "select the whole training set. Pass a count or a fraction (k=100, k=0.05), or "
            "k='auto' (with a warning: self-influence ignores the failures)"
        )
    if failures is None:  # auditing a training set: only the methods that ignore failures
        _check_audit(method, options, k)
        Xf = X.head(0)
    else:
        Xf = _failures(failures, X, classes, param_dtype(work), task)
        check_failures(work, Xf, Xf.labels, dev, 1024, Xf.task)
    yf = Xf.labels
    fm = FunctionalModel.of(work, X.task)
    _check_fisher(fisher, fm)
    check_ranks_agree("identify", work, X, seed, Xf, cache_dir)
    torch.manual_seed(seed)
    run, data_fps = None, ("", "")
    if cache_dir is not None:
        data_fps = (X.fingerprint(), Xf.fingerprint())
        key = store.run_settings(
            work, *data_fps, method, options, l2, seed, fisher,
            outputs=_outputs_hash(work, X, dev), task=store.task_key(X.task),
            method_code=store.code_fingerprint(fn),
        )  # fmt: skip
        run = store.RunCache(cache_dir, key, overwrite=overwrite_cache)
        fn = cached_method(fn, run)
    with store.activated(run, "setup"):
        ctx = Context(fm, X, y, Xf, yf, dev, chunk_size, progress, seed, l2, options, fisher)
    t0 = time.perf_counter()
    out = fn(ctx)
    if not isinstance(out, identification.MethodOutput):
        raise TypeError(
            f"identification method {method!r} returned a {type(out).__name__}; a method "
            "returns netmend.identification.MethodOutput(scores=..., per_failure=...)"
        )
    scores = _checked_scores(out.scores, len(X), method, ctx.l2)
    info = dict(out.info, l2=None if isinstance(ctx.l2, str) else float(ctx.l2))
    if is_auto_k(k) and out.info.get("default_k") == "positive":
        causes = identification.select(scores, "positive")  # valued methods: no K to choose
        info["auto_k"] = {"rule": "positive", "k": int(causes.size)}
    elif is_auto_k(k):
        causes, info["auto_k"] = _auto_causes(fn, ctx, scores, method, seed, out.per_failure)
        capped = class_capped(causes, y)
        if capped.size < causes.size:
            info["auto_k"].update(k=int(capped.size), uncapped_k=int(causes.size))
            info["auto_k"]["rule"] += f", at most {MAX_CLASS_SHARE:.0%} of a class"
            causes = capped
    else:
        causes = identification.select(scores, k)
    auto = is_auto_k(k) and info["auto_k"]["rule"] != "positive"
    if gate == "fill":
        causes, info["label_gate"] = fill_gate(
            work, X, y, scores, causes, dev, max_class_share=MAX_CLASS_SHARE if auto else None
        )
    elif gate == "balance":
        causes, info["label_gate"] = balance_gate(
            work, X, y, scores, causes, dev, max_class_share=MAX_CLASS_SHARE if auto else None
        )
    elif gate == "all":
        causes, info["label_gate"] = all_gate(work, X, y, scores, causes, dev)
    elif gate or (gate is None and auto):
        causes, info["label_gate"] = gate_causes(work, X, y, causes, dev)
    _warn_emptied_classes(causes, y, info)
    per_failure = out.per_failure
    if run is not None:
        info["cache"] = run.summary()
        if callable(per_failure):  # computed later, and saved under this run's settings
            per_failure = _on_unchanged_data(per_failure, X, Xf, data_fps)
    return Identification(
        method,
        scores,
        causes,
        time.perf_counter() - t0,
        info,
        ctx.fisher.cpu() if ctx.fisher is not None else None,
        per_failure,
        len(Xf),
    )


AUDIT_METHODS = ("loss", "random")
"""Methods that score the training set without failures: :func:`identify` takes
``failures=None`` for them, and for :data:`SELF_AUDIT_METHODS` with ``target="self"``."""
SELF_AUDIT_METHODS = ("grad_dot", "influence", "ekfac", "tracin")
"""Methods whose ``target="self"`` (self-influence) reads no failures (``trak``'s still
builds failure features)."""


def _check_audit(method: str, options: Mapping[str, Any], k: Any) -> None:
    """Refuse ``failures=None`` for a method that scores against failures, or without a K.

    Raises:
        ValueError: what to pass instead.
    """
    self_audit = method in SELF_AUDIT_METHODS and options.get("target") == "self"
    if method not in AUDIT_METHODS and not self_audit:
        raise ValueError(
            f"failures=None: method {method!r}"
            + (" with these options" if method in SELF_AUDIT_METHODS else "")
            + " scores the training set against failures. To audit a training set without "
            "failures, pass method='loss' (each example's own loss), or target='self' "
            f"(self-influence) with one of {', '.join(SELF_AUDIT_METHODS)}; and a k"
        )
    if is_auto_k(k):
        raise ValueError(
            "failures=None needs a k (a count, k=100, or a fraction, k=0.05): the automatic K "
            "is read from the failures"
        )


def _on_unchanged_data(
    fn: Callable[[], np.ndarray], X: DataSource, Xf: DataSource, fps: tuple[str, str]
) -> Callable[[], np.ndarray]:
    """``fn`` (a lazy per-failure pass), refused if the data changed in place since the run:
    its result would not match the scores, and would be saved in the cache under the run's
    settings, for later runs on the original data (found by an outside-in trial)."""

    def checked() -> np.ndarray:  # a Dataset is read again to hash it: its first hash is kept
        now = (X.fingerprint(fresh=True, name="train"), Xf.fingerprint(fresh=True, name="failures"))
        if now != fps:
            raise ValueError(
                "the training set or the failures were changed in place after identify(): "
                "per-failure scores computed now would not match its scores (and would be "
                "saved in cache_dir as that run's). Call identify again on the data as it is"
            )
        return fn()

    return checked


def _check_fisher(fisher: torch.Tensor | None, fm: FunctionalModel) -> None:
    if fisher is not None and tuple(fisher.shape) != (fm.num_params,):
        raise ValueError(
            f"fisher has shape {tuple(fisher.shape)} but the model has {fm.num_params} trainable "
            "parameters: pass the Fisher computed for this model (Identification.fisher)"
        )


class PluginContractError(ValueError):
    """A method or treatment registered outside netmend returned something its contract
    excludes: bad input from the plug-in, not an internal error (the command line exits 2)."""


def _broken(kind: str, name: str, message: str) -> Exception:
    """The error for ``message``: a built-in's broken output is netmend's bug
    (``RuntimeError``); a plug-in's names the plug-in (:class:`PluginContractError`)."""
    get = identification.get if kind == "identification method" else treatment.get
    module = str(getattr(get(name), "__module__", ""))
    if module == "netmend" or module.startswith("netmend."):
        return RuntimeError(message)
    return PluginContractError(
        f"{message} (the {kind} {name!r} is registered by {module}: fix it there)"
    )


def _checked_scores(raw: np.ndarray, n: int, method: str, l2: float | str) -> np.ndarray:
    scores = np.asarray(raw, dtype=np.float64)
    if scores.shape != (n,):
        raise _broken(
            "identification method",
            method,
            f"method {method!r} returned scores of shape {scores.shape}; expected ({n},), one "
            "per training example",
        )
    if not np.isfinite(scores).all():
        bad = np.flatnonzero(~np.isfinite(scores))
        shown = ", ".join(map(str, bad[:5].tolist())) + (" ..." if bad.size > 5 else "")
        raise _broken(
            "identification method",
            method,
            f"method {method!r} produced non-finite scores for {bad.size} training example(s) "
            f"({shown}): check the model's outputs there for NaN or overflow (netmend.evaluate "
            "on those examples names them)"
            + (f", or increase l2 (now {l2})" if method not in IGNORES_L2 else ""),
        )
    if n > 1 and float(scores.max()) == float(scores.min()):
        raise ValueError(
            f"method {method!r} gave all {n} training examples the same score "
            f"({float(scores[0]):.3g}): nothing tells the examples apart, so any top-K would be "
            "arbitrary. This happens when the softmax is saturated (log-likelihoods of exactly 0 "
            "or -inf and zero gradients: rescale the logits, e.g. undo a large temperature) or "
            "when the parameters are in a low precision such as bfloat16/float16 whose "
            "log-likelihoods round to the same value (pass model.float() or model.double())."
        )
    return scores


DELETING = ("finetune", "newton", "ewc", "retrain")
"""The built-in treatments that remove the causes (``align`` and ``relabel`` correct them)."""


def _warn_emptied_classes(causes: np.ndarray, y: torch.Tensor, info: dict[str, Any]) -> None:
    """Record (``info["classes_over_half"]``) and warn when the causes hold more than half of
    a class's training examples: a fine-tune without them forgets the class."""
    if causes.size == 0:
        return
    over = {c: s for c, s in class_share(causes, y).items() if s > EMPTIED_CLASS_SHARE}
    info["classes_over_half"] = over
    if over:
        listed = ", ".join(f"class {c}: {s:.0%}" for c, s in sorted(over.items()))
        warn(
            f"the causes hold most of a class's training examples ({listed}); a treatment "
            "that deletes them may empty the class. Check the causes' precision, or use a "
            "smaller k or the 'relabel' treatment",
        )


def _say_once(said: list[warnings.WarningMessage], runs: int) -> None:
    """Warn once for each kind of warning the automatic K's ``runs`` refits raised (a method's
    warning came 7 times per call, the full fit's and the six halves'), its numbers read as
    one and the count said."""
    kinds: dict[tuple[type[Warning], str], tuple[str, int]] = {}
    for w in said:
        text = str(w.message)
        key = (w.category, re.sub(r"[-+]?\d[\d.,e+-]*", "#", text))
        first, n = kinds.get(key, (text, 0))
        kinds[key] = (first, n + 1)
    for (category, _), (text, n) in kinds.items():
        warn(f"{text} (on {n} of the automatic K's {runs} half-failure refits)", category)


def _auto_causes(
    fn: Callable[[Context], identification.MethodOutput],
    ctx: Context,
    scores: np.ndarray,
    method: str,
    seed: int,
    per_failure: np.ndarray | Callable[[], np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Top-K causes with K from the agreement of random halves of the query failures;
    with fewer than 4 failures, each failure's top culprits (a handful, never every r > 0).

    The query failures are split in two at random ``AUTO_K_SPLITS`` times; the training set is
    scored against every half, and K is the largest K whose excess agreement, averaged over
    the splits, is at least ``REPRODUCIBLE`` of its best (:func:`netmend.identification.
    k_rules.edge_rule`; the rule was chosen on the digits dev suites, ``benchmarks/k_rule.py``).
    """
    m = len(ctx.Xq)
    positive = identification.select(scores, "positive")

    def handful(why: str, summed_positive: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
        n = CULPRITS_PER_FAILURE
        if per_failure is not None:
            pf = per_failure() if callable(per_failure) else per_failure
            causes = per_failure_top(pf, scores, n, summed_positive)
            rule = f"top {n} culprits per failure"
        else:
            causes = positive[: n * m]
            rule = f"top {n} x {m} failures by score"
        warn(f"{why}; selecting the {causes.size} top culprits ({rule})")
        return causes, {"rule": rule, "k": int(causes.size)}

    if m < 4:
        return handful(f"only {m} failure(s): too few to choose K from two halves")
    halves: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    bar = tqdm(  # the six passes' own bars are off: one bar for the automatic K's work
        total=2 * AUTO_K_SPLITS, desc="automatic K: scoring halves", unit="half",
        disable=not ctx.progress or distributed.world()[0] != 0, leave=False,
    )  # fmt: skip
    with bar, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")  # each refit says what the full fit said: once, below
        for split in range(AUTO_K_SPLITS):
            perm = torch.from_numpy(np.random.default_rng([seed, split]).permutation(m))
            for side, part in zip(halves, (perm[: m // 2], perm[m // 2 :]), strict=True):
                sub = dataclasses.replace(ctx, Xq=ctx.Xq[part], yq=ctx.yq[part], progress=False)
                side.append(_checked_scores(fn(sub).scores, scores.shape[0], method, ctx.l2))
                bar.update()
    _say_once(said, 2 * AUTO_K_SPLITS)
    if all(np.array_equal(a, b) for a, b in zip(*halves, strict=True)):
        warn(
            f"method {method!r} scores the training set the same for every half of the "
            "failures (it does not read them, e.g. 'loss' or target='self'), so the automatic "
            "K has no evidence: the halves agree perfectly at every K and K comes out near "
            "10% of N by construction. Pass k= (a count, a fraction or 'positive')"
        )
    k, excess = k_rules.edge_rule(halves[0], halves[1], positive.size)
    if k == 0:  # no K is blamed by both halves more than by chance
        causes, info = handful(
            "random halves of the failures agree on no culprits beyond chance (the failures "
            "may have unrelated causes)",
            summed_positive=True,
        )
        return causes, {**info, "splits": AUTO_K_SPLITS, "excess_agreement": excess}
    rule = f"reproducible: edge of {k_rules.REPRODUCIBLE:g} x the best agreement"
    info = {"rule": rule, "k": k, "splits": AUTO_K_SPLITS, "excess_agreement": excess}
    return positive[:k], info


@_public
def treat(
    model: nn.Module,
    train: DataLike,
    causes: np.ndarray | torch.Tensor | list[int],
    method: str = DEFAULT_TREAT,
    *,
    l2: float | str = DEFAULT_L2,
    train_config: TrainConfig | None = None,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    chunk_size: int = 128,
    progress: bool = True,
    fisher: torch.Tensor | None = None,
    failures: DataLike | None = None,
    theta_plus_f: torch.Tensor | None = None,
    record: dict[str, Any] | None = None,
    task: Task | None = None,
    allow_no_causes: bool = False,
    **options: Any,
) -> nn.Module:
    """Make a repaired copy of ``model`` that forgets (or is retrained without) ``causes``.

    Args:
        model: the classifier to repair (not modified).
        train: the training set it was trained on, ``N`` examples.
        causes: training indices to forget (unique, in ``[0, N)``), or a boolean mask ``[N]``.
        method: "finetune" (default), "newton", "ewc", "retrain", "align" or "relabel".
        l2: ``lambda`` (penalty towards ``theta_hat`` and Fisher damping): > 0, or "auto"
            (as in :func:`identify`; used by "newton" and "ewc").
        train_config: the recipe the model was trained with ("finetune" uses a shortened
            copy; default :class:`TrainConfig()`). "retrain" requires it: retraining with
            another recipe is no reference.
        seed, device, chunk_size, progress, fisher: as in :func:`identify`.
        failures: the query failures (inputs with their correct labels). "align" and
            "relabel" with ``source="theta_plus_f"`` fit the failure-adapted model ``theta_+F``
            from them when ``theta_plus_f`` is not given ("relabel"'s default source, "knn",
            needs neither); the other treatments ignore them.
        theta_plus_f: the failure-adapted parameters ``theta_+F`` ``[P]``, e.g.
            ``Identification.info["theta_plus_f"]`` of the "ewc" identification.
        record: a dict that the treatment fills in place with what it did ("align": how far
            each cause moved, its energy and label before and after; "relabel": which labels
            changed). Left untouched by treatments that record nothing.
        task: as in :func:`identify`. The retained set ``D \\ C`` is a view of ``train``
            read batch by batch (``TreatContext.X[keep]``; ``.dataset()`` gives it as a torch
            ``Subset``).
        allow_no_causes: accept an empty ``causes`` (the ``finetune-only`` control: the same
            treatment with nothing removed). Off by default, where an empty selection is
            refused as a likely mistake.
        **options: treatment options (e.g. ``epochs`` for "finetune", ``step_size`` for "newton").

    Returns:
        A new ``nn.Module`` in eval mode, on the device of ``model`` (the work runs on
        ``device``) and, for a bf16/fp16 ``model``, in its dtype: a drop-in replacement.
    """
    fn = treatment.get(method)
    if method in treatment.research_only():
        warn(
            f"treatment {method!r} is research-only: {treatment.research_only()[method]}",
        )
    check_treat_options(method, options)
    seed = check_seed(seed)
    dev = resolve_device(device)
    work, X, y, classes = _prepare(model, train, dev, task, chunk_size)
    if allow_no_causes and _no_causes(causes):
        idx = torch.zeros(0, dtype=torch.int64)  # a control: the treatment with nothing removed
    else:
        idx = check_causes(causes, len(X))
        if method in DELETING and called_by_user():  # a user's own causes (cleanlab's, a
            _warn_emptied_classes(idx.numpy(), y, {})  # class); identify's were said there
    fm = FunctionalModel.of(work, X.task)
    _check_fisher(fisher, fm)
    fail = None
    if failures is not None:
        Xf = _failures(failures, X, classes, param_dtype(work), task)
        fail = (Xf, Xf.labels)
    if theta_plus_f is not None and tuple(theta_plus_f.shape) != (fm.num_params,):
        raise ValueError(
            f"theta_plus_f has shape {tuple(theta_plus_f.shape)} but the model has "
            f"{fm.num_params} trainable parameters: pass Identification.info['theta_plus_f'] "
            "of an 'ewc' identification of this model"
        )
    torch.manual_seed(seed)
    ctx = treatment.TreatContext(
        work,
        fm,
        X,
        y,
        torch.unique(idx),
        dev,
        chunk_size,
        progress,
        seed,
        l2,
        train_config or TrainConfig(),
        fisher,
        options,
        failures=fail,
        theta_plus_f=(
            None if theta_plus_f is None else theta_plus_f.detach().to(param_dtype(work))
        ),
        train_config_given=train_config is not None,
    )
    out = fn(ctx)
    _check_treated(out, method)
    out.eval()  # as documented: a treatment handing back train mode changed its predictions
    with torch.no_grad():  # the repaired model must still classify into the same classes
        width = num_classes_of(out, X.head(1), model_device(out, dev), X.task)
    if width != classes:
        raise _broken(
            "treatment",
            method,
            f"treatment {method!r} returned a model with {width} outputs; the model has "
            f"{classes} classes",
        )
    if record is not None:
        record.update(ctx.record)
    dtype = param_dtype(model)
    out = out.to(model_device(model, dev))
    return out.to(dtype) if dtype in LOW_PRECISION else out


def _check_treated(model: nn.Module, method: str) -> None:
    """Never hand back something other than a model, or a model with NaN/inf parameters."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"treatment {method!r} returned a {type(model).__name__}; a treatment returns the "
            "repaired copy of ctx.model (an nn.Module)"
        )
    try:
        check_finite_parameters(model, f"the {method!r} treatment's result")
    except ValueError as exc:
        raise RuntimeError(
            f"{exc.args[0].split(':')[0]}: the treatment diverged. Lower its learning rate or "
            "step size (options lr/step_size), use a larger l2, or choose another treatment; "
            "no model is returned rather than a broken one."
        ) from None


def _no_causes(causes: Any) -> bool:
    if isinstance(causes, torch.Tensor):
        return causes.numel() == 0
    try:
        return np.asarray(causes).size == 0
    except Exception:  # check_causes says what is wrong with it
        return False


@_public
def evaluate(
    model: nn.Module,
    test: DataLike,
    split: FailureSplit | None = None,
    device: str | torch.device | None = "auto",
    task: Task | None = None,
) -> dict[str, float]:
    """Accuracies of ``model`` on the test set and, given a :class:`FailureSplit`, on the
    query failures, held-out failures and examples the original model got right.

    ``test`` is read batch by batch (any form :func:`identify` takes for ``train``);
    ``task`` as in :func:`identify`."""
    X = as_source(test, "test", task)
    if split is not None:
        _check_split_indices(split, len(X))
    dev = resolve_device(device)
    work = _private_copy(model, dev)
    Xm = match_dtype(X, param_dtype(work))
    assert isinstance(Xm, DataSource)  # match_dtype keeps a source a source
    probe = Xm.head(min(PROBE_ROWS, len(Xm)))
    check_labels(X.labels, num_classes_of(work, probe, dev, X.task), "test")
    return accuracies(work, Xm, X.labels, split, dev)


def available() -> dict[str, list[str]]:
    """The method names :func:`identify` and :func:`treat` accept.

    Returns:
        ``{"identify": [...], "treat": [...], "research_only": [...]}``, each sorted; the
        research-only treatments (listed under both "treat" and "research_only") warn when
        used, with the measured reason (``netmend.treatment.research_only()``).
    """
    return {
        "identify": identification.available(),
        "treat": treatment.available(),
        "research_only": sorted(treatment.research_only()),
    }


_identify, _treat = identify, treat  # repair()'s arguments shadow these names


@_public
def repair(
    model: nn.Module,
    train: DataLike,
    failures: DataLike,
    identify: str = DEFAULT_IDENTIFY,
    treat: str = DEFAULT_TREAT,
    k: int | float | str | None = None,
    seed: int = 0,
    *,
    l2: float | str = DEFAULT_L2,
    train_config: TrainConfig | None = None,
    device: str | torch.device | None = "auto",
    chunk_size: int = 128,
    progress: bool = True,
    identify_options: dict[str, Any] | None = None,
    treat_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    task: Task | None = None,
    gate: bool | str | None = None,
    guard: bool | None = None,
    guard_data: DataLike | None = None,
) -> RepairResult:
    """Find the training examples behind ``failures`` and return a repaired copy of ``model``.

    The default pipeline is EWC-influence identification with the automatic cause threshold,
    then fine-tuning on the training set without the causes. The treatment is given the
    failures and the identification's ``theta_+F`` (``info["theta_plus_f"]``, when the method
    fits one), which "align" and "relabel" use; its record is ``treatment_info``.

    Args:
        model: classifier returning logits (not modified).
        train: training set, ``N`` examples.
        failures: inputs the model gets wrong, with their correct labels.
        identify: identification method name. treat: treatment name.
        k: cause selection (see :func:`identify`).
        seed: seeds everything random (same seed, same result).
        l2, train_config, device, chunk_size, progress: see :func:`identify` / :func:`treat`.
        identify_options, treat_options: method-specific options.
        cache_dir: save (and reuse, or resume) the identification there (see :func:`identify`).
        task: how batches and outputs are read (see :func:`identify`).
        gate: the label gate of :func:`identify` (default: on with the automatic K).
        guard: back off the automatic K when the fine-tune would make a class forget itself
            (:mod:`netmend.treatment.guard`: a 5% slice of each class held out of trial
            fine-tunes; K is halved while some class falls by more than 10 points on it, by
            the slice's labels or by agreement with the original's predictions net of the
            churn of a trial that removes nothing). ``None`` (default): on for the automatic
            K (``k=None``) with the "finetune" treatment, off otherwise. Its record is
            ``treatment_info["guard"]``; ``causes`` are the ones finally removed.
        guard_data: labelled examples the original model never trained on (a validation
            split, e.g. the set the failures were found in). If given, the guard measures its
            trials there, the same two ways, instead of on a slice held out of the training
            set; the accepted trial is the returned model, so the model handed back is the
            one measured, and the guard costs one fine-tune fewer (see
            :mod:`netmend.treatment.guard`). Implies ``guard=True``; refused with
            ``guard=False`` or a treatment other than "finetune".

    Returns:
        A :class:`RepairResult` with ``scores`` (``[N]``, positive = harmful), ``causes``,
        ``model`` (the repaired copy) and ``culprits(i, n)``.
    """
    seed = check_seed(seed)
    if failures is None:
        raise ValueError(
            "repair needs failures: they are what it repairs and how its repair is judged. To "
            "clean a training set without failures, call identify(model, train, None, 'loss', "
            "k=...) and treat(model, train, result.causes)"
        )
    treatment.get(treat)  # a wrong treatment name or option fails now, not after identifying
    check_treat_options(treat, treat_options or {})
    common: dict[str, Any] = dict(
        l2=l2, seed=seed, device=device, chunk_size=chunk_size, progress=progress, task=task
    )
    # a bad guard setting fails now, not after identifying
    guard = resolve_guard(guard, guard_data is not None, is_auto_k(k), treat)
    # read (and check) each data set once: the treatment reuses the identification's sources
    train = as_source(train, "train", task)
    failures = as_source(failures, "failures", task)
    held = None if guard_data is None else as_source(guard_data, "guard_data", task)
    opts = dict(identify_options or {}, cache_dir=cache_dir, gate=gate)
    # l2 is the identification's only for the methods that read it; the treatment's always
    l2_identify = DEFAULT_L2 if identify in IGNORES_L2 else l2
    ident = _identify(model, train, failures, identify, k, **dict(common, l2=l2_identify), **opts)
    t0 = time.perf_counter()
    record: dict[str, Any] = {}
    recipe: dict[str, Any] = dict(
        train_config=train_config,
        fisher=ident.fisher,
        failures=failures,
        theta_plus_f=ident.info.get("theta_plus_f"),
        **common,
        **(treat_options or {}),
    )
    if len(ident.causes) == 0:  # treat()'s message would name its allow_no_causes=
        raise ValueError(
            f"no causes to treat: {identify!r} selected none (k={k!r}: no training example "
            "scores as harmful enough). Try a larger k, or another identify method"
        )
    repaired: nn.Module | None = None
    if guard:
        g = guard_k(
            lambda c: _treat(model, train, c, treat, allow_no_causes=True, **recipe),
            model,
            train,
            ident.causes,
            seed,
            resolve_device(device),
            guard_data=held,
        )
        record["guard"] = g.as_dict()
        repaired = g.model  # with guard_data: the accepted trial, the same treatment call
        if g.k < len(ident.causes):
            if not is_auto_k(k):  # the user's own K: say that it was not kept
                warn(
                    f"the class guard cut k={k!r} ({len(ident.causes)} causes) to {g.k}: "
                    f"removing more made a class fall by more than the guard's limit on "
                    f"{g.source}; pass guard=False to remove the {len(ident.causes)} as asked"
                )
            ident = dataclasses.replace(
                ident, causes=ident.causes[: g.k], info={**ident.info, "guard": g.as_dict()}
            )
    if repaired is None:
        repaired = _treat(model, train, ident.causes, treat, record=record, **recipe)
    return RepairResult(
        repaired,
        ident,
        treat,
        {"identify": ident.seconds, "treat": time.perf_counter() - t0},
        record,
        recipe,
        store.module_hash(model),
    )


def _check_split_indices(split: FailureSplit, n: int) -> None:
    """Refuse a split with indices outside a test set of ``n`` examples (numpy's IndexError
    from deep inside the accuracies, or a silent wrap for negative ones, before)."""
    parts = {"query": split.query, "heldout": split.heldout, "correct": split.correct}
    for name, idx in parts.items():
        idx = np.asarray(idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(
                f"split.{name} holds indices outside the test set's [0, {n}): pass the test set "
                "the split was drawn from"
            )


def _check_split(model: nn.Module, X: DataSource, split: FailureSplit, dev: torch.device) -> None:
    """Refuse a split that is not this model's on this test set (indices out of range, or
    'failures' the model gets right and 'correct' examples it gets wrong): the figures
    would be measured on the wrong examples (found by an outside-in trial). A few
    disagreements are allowed, for a split made on another device."""
    _check_split_indices(split, len(X))
    work = _private_copy(model, dev)
    Xm = match_dtype(X, param_dtype(work))
    assert isinstance(Xm, DataSource)  # match_dtype keeps a source a source
    right = (predict(work, Xm, dev, task=X.task) == X.labels).numpy()
    failures = np.concatenate([np.asarray(split.query), np.asarray(split.heldout)]).astype(int)
    correct = np.asarray(split.correct, dtype=int)
    got_right, got_wrong = int(right[failures].sum()), int((~right[correct]).sum())
    if got_right + got_wrong > max(2, 0.01 * (failures.size + correct.size)):
        raise ValueError(
            f"the split does not belong to this model and test set: the model gets {got_right} "
            f"of the split's {failures.size} failures right and {got_wrong} of its correct "
            "examples wrong. Pass the original model and the test set the split was drawn "
            "from, in the same order"
        )


@_public
def with_controls(
    model: nn.Module,
    train: DataLike,
    test: DataLike,
    split: FailureSplit,
    result: RepairResult,
    *,
    truth: np.ndarray | torch.Tensor | list[int] | None = None,
    clean_train: DataLike | None = None,
    draws: int = 3,
    seed: int | None = None,
    device: str | torch.device | None = "auto",
    tolerance: float = TEST_TOLERANCE,
    max_class_drop: float = MAX_CLASS_DROP,
    model_factory: Callable[[], nn.Module] | None = None,
    k_oracles: bool = True,
) -> dict[str, Any]:
    """A repair next to its controls, and whether it counts (the Pareto criterion).

    Every control is the repair's own :func:`treat` call (``result.recipe``: the same method,
    options, training recipe, Fisher and seed), with only the causes changed:
    ``finetune-only`` (no causes), ``random-K`` (``draws`` sets of K random training
    examples, K = ``len(result.causes)``), ``oracle-causes`` (``truth``, if given),
    ``oracle-at-K`` (K random members of ``truth``: perfect precision at the repair's own K),
    ``oracle-ranked`` (the K members of ``truth`` the repair's scores rank highest: its
    ranking with the clean picks skipped) and ``retrain-clean`` (the "retrain" treatment on
    ``clean_train``, if given). See
    :mod:`netmend.evaluation.controls`.

    Args:
        model: the original model (not modified).
        train: the training set the repair used.
        test: the test set from which ``split`` was drawn.
        split: the failure split (query failures = the ones the repair saw).
        result: what :func:`repair` returned.
        truth: ground-truth corrupted training indices, if known.
        clean_train: a clean version of the training set, if there is one.
        model_factory: for ``retrain-clean``, a zero-argument callable returning a new,
            untrained model (the "retrain" treatment's option): needed when a submodule with
            trainable parameters has no ``reset_parameters()`` (e.g. a top-level
            ``nn.Parameter``); checked before any control runs.
        draws: random-K draws (>= 3). seed: seeds the draws (default: the repair's seed).
        k_oracles: with ``truth``, also run ``oracle-at-K`` and ``oracle-ranked`` (two more
            treatments).
        device: where to measure.
        tolerance, max_class_drop: the Pareto criterion's thresholds
            (:func:`netmend.evaluation.repaired`).

    Returns:
        ``{"pipeline": figures, "controls": Controls.as_dict() (with ``oracle_ranked``;
        the two K-sized oracles with their ``gain``), "gain": diagnosis gain
        (held-out failures and test accuracy vs random-K, with s.e.), "verdict":
        Verdict.as_dict()}``; figures are ``test_acc``, ``heldout_failure_acc``,
        ``query_failure_acc``, ``correct_acc`` and ``class_acc`` (per class), as fractions.
    """
    recipe = dict(result.recipe)
    task = recipe.get("task")
    X = as_source(test, "test", task)
    y = X.labels
    dev = resolve_device(device)
    classes = int(y.max()) + 1 if len(y) else 0
    train = as_source(train, "train", task)  # read once: every control reuses it
    n_train = len(train)
    if result.original is not None and store.module_hash(model) != result.original:
        raise ValueError(
            "result is the repair of another model (its parameters differ from model's): pass "
            "the model that netmend.repair repaired"
        )
    if n_train != len(result.scores):
        raise ValueError(
            f"train has {n_train} examples but the repair scored {len(result.scores)}: pass "
            "the training set the repair used"
        )
    _check_split(model, X, split, dev)
    truth_idx = None
    if not isinstance(k_oracles, bool):
        raise TypeError(f"k_oracles must be True or False; got {k_oracles!r}")
    if truth is not None:  # said as truth: the messages about "causes" named treat()'s flags
        t = np.asarray(truth.cpu() if isinstance(truth, torch.Tensor) else truth)
        if t.size == 0 or (t.dtype == bool and not t.any()):
            raise ValueError(
                "truth is empty: it is the ground-truth corrupted set for the oracle-causes "
                "control; pass truth=None when none is known"
            )
        try:
            truth_idx = check_causes(truth, n_train).numpy()
        except (TypeError, ValueError) as exc:
            raise type(exc)(
                f"truth (the ground-truth corrupted set, as indices or a mask): {exc}"
            ) from None

    def measure(m: nn.Module) -> dict[str, Any]:
        work = _private_copy(m, dev)
        Xm = match_dtype(X, param_dtype(work))
        return {
            **accuracies(work, Xm, y, split, dev),
            "class_acc": class_accuracies(work, Xm, y, classes, dev),
        }

    def treat_with(causes: np.ndarray) -> nn.Module:
        if causes.size == 0 and result.treatment in ("newton", "ewc"):
            return model  # a one-step deletion of nothing is the original model
        return _treat(model, train, causes, result.treatment, allow_no_causes=True, **recipe)

    clean: Callable[[], nn.Module] | None = None
    if clean_train is not None:
        clean_data = clean_train

        # the repair's recipe without its treatment's own options (a fine-tune's "steps"
        # is not retrain's): retrain takes the shared settings and the options it declares
        shared = set(inspect.signature(_treat).parameters)
        own = treatment.base.options("retrain")
        retrain = {k: v for k, v in recipe.items() if k in shared or k in own}
        if model_factory is not None:
            retrain["model_factory"] = model_factory
        elif "model_factory" not in retrain:  # refused now, not after every other control
            try:
                check_resettable(model)
            except ValueError as exc:
                why = exc.args[0].split(";")[0]
                raise ValueError(
                    f"clean_train asks for the retrain-clean reference, but the model cannot "
                    f"be retrained from scratch ({why}): pass with_controls(..., "
                    "model_factory=...), a callable returning a new, untrained model"
                ) from None

        def clean() -> nn.Module:
            return _treat(model, clean_data, [], "retrain", allow_no_causes=True, **retrain)

    ctl = run_controls(
        treat_with,
        measure,
        model,
        n_train,
        int(len(result.causes)),
        truth=truth_idx,
        clean_model=clean,
        draws=draws,
        seed=recipe.get("seed", 0) if seed is None else seed,
        oracle_at_k=k_oracles and truth_idx is not None and len(result.causes) > 0,
    )
    controls = ctl.as_dict()
    if ctl.oracle_at_k is not None and truth_idx is not None:
        controls.update(
            oracles_of_k(ctl, ctl.oracle_at_k, truth_idx, result.scores, treat_with, measure)
        )
    if ctl.finetune_only is not None:  # the same check as netmend repair's
        lost = recipe_loss(
            ctl.original.get("test_acc"),
            ctl.finetune_only.get("test_acc"),
            "netmend.repair's train_config= (TrainConfig: epochs, lr, batch_size)",
        )
        if lost is not None:
            warn(lost)
    ours = measure(result.model)
    return {
        "pipeline": ours,
        "controls": controls,
        "gain": diagnosis_gain(ours, ctl),
        "verdict": pareto_repaired(
            ours, ctl, tolerance=tolerance, max_class_drop=max_class_drop
        ).as_dict(),
    }
