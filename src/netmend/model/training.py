"""A small, seeded trainer and batched prediction helpers.

The trainer is what the demo, the ``finetune``/``retrain`` treatments and the tests use.
It is deterministic given ``seed`` (the shuffling uses its own generator).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from netmend.data import distributed
from netmend.data.source import DataSource
from netmend.data.task import Task, batch_len, resolve_task
from netmend.model.functional import Data, check_finite_outputs, match_dtype, param_dtype


def task_of(X: Data, task: Task | None) -> Task:
    """``task``, else the source's own, else the default :class:`ClassificationTask`."""
    if task is None and isinstance(X, DataSource):
        return X.task
    return resolve_task(task)


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """How to train (or fine-tune) a classifier.

    Attributes:
        epochs: passes over the training data.
        batch_size: examples per optimiser step.
        lr: Adam learning rate.
        weight_decay: L2 coefficient added to the mean loss (``weight_decay/2 * ||theta||^2``).
        optimizer: "adam" or "sgd" (SGD with momentum 0.9).
        average_tail: return the mean of the parameters over this final share of the steps
            (Polyak-Ruppert tail averaging; 0 returns the last iterate). The last iterate of a
            short fine-tune is noisy; the average keeps what the model already got right.
        freeze_batchnorm: keep every BatchNorm layer in eval mode while training: its running
            statistics stay those of the trained model and each batch is normalised by them
            (the affine weights still train). Repair fine-tunes do this
            (:func:`netmend.treatment.methods.finetune_recipe`): re-estimating the statistics
            from minibatches of ``D \\ C`` cost a BatchNorm ResNet about 2 points of test
            accuracy on the digits (``benchmarks/bn_repair.json``).
    """

    epochs: float = 3.0
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    average_tail: float = 0.0
    freeze_batchnorm: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and math.isfinite(self.weight_decay)):
            raise ValueError(f"invalid TrainConfig {self}: lr and weight_decay must be finite")
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"invalid TrainConfig {self}: epochs, batch_size, lr must be > 0")
        if not 0 <= self.average_tail < 1:
            raise ValueError(f"average_tail must lie in [0, 1); got {self.average_tail}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd'; got {self.optimizer!r}")


def fit(
    model: nn.Module,
    X: Data,
    y: torch.Tensor,
    config: TrainConfig = TrainConfig(),
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "train",
    callback: Callable[[int, nn.Module], None] | None = None,
    task: Task | None = None,
    class_weight: torch.Tensor | None = None,
) -> nn.Module:
    """Train ``model`` in place with Adam on mean cross-entropy and return it.

    Under ``torch.distributed`` (e.g. ``torchrun``) each optimiser step is data-parallel,
    as with DDP: every rank draws the same batch (same seed), computes the loss of its
    share of it, and the gradients are all-reduced before the step, so every rank takes the
    step one process would (up to float rounding in the sum). Models with batch-norm layers
    are trained whole on every rank instead (their batch statistics would differ per share).
    Dropout masks are drawn per rank, so they differ from one process's.

    Args:
        model: classifier (its logits ``[B, C]`` read through ``task``).
        X: inputs ``[N, ...]``, or a :class:`DataSource` (each minibatch is read from it, so a
            ``Dataset`` on disk is never held in memory); y: labels ``[N]`` (or soft targets
            ``[N, C]``).
        config: epochs (fractions allowed), batch size, learning rate, weight decay.
        seed: seeds the shuffling order.
        device: where to train.
        progress: show a tqdm bar.
        desc: the bar's label.
        callback: called as ``callback(step, model)`` after every optimiser step (``step``
            from 0); e.g. :class:`netmend.identification.tracin.Checkpoints` keeps TracIn
            checkpoints. It must not modify the model.
        task: how to call the model and read its logits (default: ``X``'s, else
            :class:`netmend.data.task.ClassificationTask`).
        class_weight: ``[C]`` weights of each label's cross-entropy, or ``None`` (all 1). The
            loss of a batch is then the mean of ``class_weight[y_i] * CE_i`` (hard labels only).
    """
    task = task_of(X, task)
    if class_weight is not None and y.ndim != 1:
        raise ValueError("class_weight needs hard labels [N], not soft targets [N, C]")
    device = torch.device(device)
    weight = None if class_weight is None else class_weight.to(device)
    model.to(device).train()
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if config.freeze_batchnorm:
        for m in batchnorms:
            m.eval()  # normalise by the trained running statistics, never update them
    opt: torch.optim.Optimizer
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = len(X)
    steps = max(1, int(round(config.epochs * n / config.batch_size)))
    order = torch.empty(0, dtype=torch.long)
    rank, size = distributed.world()
    bar = tqdm(range(steps), desc=desc, disable=not progress or rank != 0, leave=False)
    pos = 0
    start_avg = steps - int(config.average_tail * steps) if config.average_tail > 0 else steps
    # frozen parameters stay bit for bit: the mean of equal values can round differently
    trained = [p for p in model.parameters() if p.requires_grad]
    avg = [torch.zeros_like(p) for p in trained] if start_avg < steps else []
    if size > 1 and batchnorms and not config.freeze_batchnorm:
        if rank == 0:  # said once, not once per rank
            log.warning("batch norm: each of the %d ranks trains on the whole batch", size)
        rank, size = 0, 1
    for step in bar:
        if pos + config.batch_size > order.numel():
            order = torch.cat([order[pos:], torch.randperm(n, generator=gen)])
            pos = 0
        idx = order[pos : pos + config.batch_size]
        pos += config.batch_size
        opt.zero_grad(set_to_none=True)
        if size == 1:
            xb, yb = X[idx].to(device), y[idx].to(device)
            _loss(task.forward(model, xb), yb, weight, "mean").backward()
        else:
            part = distributed.shard(idx.numel(), 1, rank, size)
            share = idx[part.start : part.stop]
            if share.numel():
                xb, yb = X[share].to(device), y[share].to(device)
                # this share's part of the batch's mean loss: the all-reduced sum is its gradient
                logits = task.forward(model, xb)
                (_loss(logits, yb, weight, "sum") / idx.numel()).backward()
            _all_reduce_grads(model)
        try:
            opt.step()
        except RuntimeError as exc:  # an update too large for the parameters' dtype
            if "overflow" not in str(exc):
                raise
            raise RuntimeError(
                f"training diverged at step {step} (lr={config.lr:g}): an update overflowed "
                "the parameters' dtype. Lower the learning rate."
            ) from exc
        if callback is not None:
            callback(step, model)
        if step >= start_avg:
            with torch.no_grad():
                for a, p in zip(avg, trained):
                    a.add_(p, alpha=1.0 / (steps - start_avg))
    if avg:
        with torch.no_grad():
            for a, p in zip(avg, trained):
                p.copy_(a)
    model.eval()
    return model


def _loss(
    logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, reduction: str
) -> torch.Tensor:
    """The batch's cross-entropy (``reduction`` "mean" or "sum"), each example's times
    ``weight[y_i]`` when class weights are given (without them, exactly ``F.cross_entropy``)."""
    if weight is None:
        return F.cross_entropy(logits, y, reduction=reduction)
    loss = F.cross_entropy(logits, y, reduction="none") * weight.to(logits.dtype)[y]
    return loss.mean() if reduction == "mean" else loss.sum()


def _all_reduce_grads(model: nn.Module) -> None:
    """Sum every trainable parameter's gradient over the ranks, in one all-reduce.

    A parameter keeps ``grad=None`` (skipped by the optimiser, as in one process) only when
    no rank gave it a gradient.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        + [
            torch.tensor([float(p.grad is not None) for p in params], dtype=params[0].dtype).to(
                params[0].device
            )
        ]
    )
    flat = distributed.all_reduce_sum(flat)
    i = 0
    has = flat[-len(params) :].tolist()
    for j, p in enumerate(params):
        k = p.numel()
        p.grad = flat[i : i + k].view_as(p).to(p.dtype) if has[j] > 0 else None
        i += k


def model_device(model: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """The device of ``model``'s first parameter or buffer, else ``default``."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device(default)


@torch.no_grad()
def logits(
    model: nn.Module,
    X: Data,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
    task: Task | None = None,
) -> torch.Tensor:
    """Logits ``[N, C]`` of ``model`` on ``X`` (on CPU), computed in batches without gradients.

    ``X`` is a tensor ``[N, ...]`` or a :class:`DataSource` (read batch by batch); ``task``
    calls the model and reads its logits (default: ``X``'s, else the default task). The
    batches go where the model's parameters (or buffers) are; ``device`` is used only for a
    module that has neither (a model on one device cannot compute on another, and moving it
    would change the caller's model). Floating inputs are cast to the model's floating dtype
    batch by batch (a bf16 model and float32 data, as everywhere in netmend).
    """
    return _per_batch(model, X, device, batch_size, task, lambda z: z, torch.empty(0))


def predict(
    model: nn.Module,
    X: Data,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
    task: Task | None = None,
) -> torch.Tensor:
    """Predicted classes ``[N]`` (int64, CPU), as :func:`logits` reads them, each batch's
    argmax taken where it is computed (no ``[N, C]`` buffer: 5 GB for 1.28M examples of 1,000
    classes)."""
    empty = torch.empty(0, dtype=torch.int64)
    return _per_batch(model, X, device, batch_size, task, lambda z: z.argmax(1), empty)


@torch.no_grad()
def _per_batch(
    model: nn.Module,
    X: Data,
    device: torch.device | str,
    batch_size: int,
    task: Task | None,
    read: Callable[[torch.Tensor], torch.Tensor],
    empty: torch.Tensor,
) -> torch.Tensor:
    """``read`` of the model's logits on every batch of ``X``, stacked on CPU (``empty`` for
    an empty ``X``); see :func:`logits`."""
    task = task_of(X, task)
    device = model_device(model, device)
    dtype = param_dtype(model)
    out: torch.Tensor | None = None
    n = len(X)
    for i in range(0, n, batch_size):
        x = match_dtype(X[i : i + batch_size], dtype).to(device)
        logit = task.forward(model, x)
        # -inf masks a class (argmax and softmax take it); NaN, +inf or a row of -inf do not
        bad = logit.isnan() | (logit == torch.inf) | (logit == -torch.inf).all(1, keepdim=True)
        if bool(bad.any()):
            check_finite_outputs(bad, None, offset=i)
        z = read(logit).cpu()
        if out is None:  # one buffer, no list of chunks
            out = torch.empty((n, *z.shape[1:]), dtype=z.dtype)
        out[i : i + batch_len(x)] = z
    return out if out is not None else empty


def accuracy(
    model: nn.Module,
    X: Data,
    y: torch.Tensor,
    device: torch.device | str = "cpu",
    task: Task | None = None,
) -> float:
    """Share of ``X`` that ``model`` classifies as ``y`` (nan for an empty set)."""
    if y.numel() == 0:
        return float("nan")
    return float((predict(model, X, device, task=task) == y).float().mean())


def class_accuracies(
    model: nn.Module,
    X: Data,
    y: torch.Tensor,
    num_classes: int,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Test accuracy of ``model`` per class ``[C]`` (NaN for a class absent from ``y``)."""
    return class_accuracies_of(predict(model, X, device), y, num_classes)


def class_accuracies_of(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float]:
    """Accuracy per class ``[C]`` of predictions ``pred`` ``[N]`` against labels ``y`` ``[N]``
    (NaN for a class absent from ``y``)."""
    ok = (pred.cpu() == y.cpu()).numpy().astype(np.float64)
    labels = y.cpu().numpy().astype(np.int64)
    total = np.bincount(labels, minlength=num_classes).astype(np.float64)
    right = np.bincount(labels, weights=ok, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return [float(v) for v in right / total]


def check_resettable(model: nn.Module) -> None:
    """Raise unless every submodule of ``model`` that owns trainable parameters has a
    ``reset_parameters()`` (or ``_reset_parameters()``): what :func:`fresh_copy` needs, checked
    without copying the model.

    Raises:
        ValueError: names the first submodule that cannot be re-initialised.
    """
    for name, m in model.named_modules():
        if not any(p.requires_grad for p in m.parameters(recurse=False)):
            continue
        if (
            getattr(m, "reset_parameters", None) is None
            and getattr(m, "_reset_parameters", None) is None
        ):
            raise ValueError(
                f"cannot re-initialise submodule {name!r} ({type(m).__name__}): it has no "
                "reset_parameters(); pass model_factory= to build a fresh model for "
                "retraining"
            )


def fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """A deep copy of ``model`` with every trainable parameter re-initialised (for retraining).

    Every submodule that owns trainable parameters must define ``reset_parameters()`` (all
    torch layers do; ``nn.MultiheadAttention``'s ``_reset_parameters()`` is used too);
    otherwise retraining from scratch is not defined and this raises. Frozen parameters
    (``requires_grad=False``, e.g. a pretrained backbone) keep their values: retraining could
    not train them, so re-initialising them would leave them random. A module whose
    parameters are all frozen is not reset at all (its buffers, e.g. BatchNorm running
    statistics, stay too). The global RNG is seeded with ``seed`` for the re-initialisation
    and restored afterwards.

    Raises:
        ValueError: a submodule with trainable parameters cannot be re-initialised (named).
    """
    check_resettable(model)
    clone = copy.deepcopy(model)
    on_gpu = {t.device.index or 0 for t in clone.parameters() if t.device.type == "cuda"}
    with torch.random.fork_rng(devices=sorted(on_gpu)):  # reset_parameters draws there
        torch.manual_seed(seed)
        for m in clone.modules():
            own = list(m.named_parameters(recurse=False))
            if not any(p.requires_grad for _, p in own):
                continue
            reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
            assert reset is not None  # check_resettable above
            frozen = {n: p.detach().clone() for n, p in own if not p.requires_grad}
            reset()
            with torch.no_grad():
                for n, value in frozen.items():
                    getattr(m, n).copy_(value)
    return clone
