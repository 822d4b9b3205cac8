"""Sharding passes over a data set across ``torch.distributed`` processes.

When netmend runs under ``torchrun --nproc-per-node=W ...`` (or the caller has initialised a
default process group), every pass that goes through :func:`netmend.data.streaming.map_chunks`
(and so :func:`netmend.model.functional.stream`, ``log_likelihoods``, ``fisher_diag_sum``,
every per-example score) is split across the ``W`` ranks by index:

* the chunks of the pass are cut exactly as in one process (``[i, i + chunk_size)``), and
  rank ``r`` runs the contiguous block of chunks ``[C r / W, C (r + 1) / W)`` of the ``C``
  chunks (:func:`shard`): every index is computed by exactly one rank, for any ``N``;
* "sum" passes (Fisher diagonal, summed gradients) are added up with one all-reduce, so
  every rank holds the same sum (equal to the single-process one up to float rounding);
* "cat" passes (per-example outputs) are all-gathered into index order, so every rank holds
  the whole ``[N, ...]`` result, bit for bit what one process computes;
* before exchanging data the ranks agree on success: an exception on one rank is raised on
  every rank (:class:`RankFailedError` on the others, naming the rank and its error),
  instead of leaving the others blocked in a collective. A rank that dies outright is seen
  by the others as a broken connection, or after the process group's timeout
  (:data:`TIMEOUT_ENV`, default :data:`DEFAULT_TIMEOUT_SECONDS` when netmend initialises the
  group).

Everything outside these passes (fitting ``theta_+F`` on the failures, CG on small
systems, selection) runs replicated on every rank, which is why it must be deterministic
given the seed. The cache (:mod:`netmend.store`) is written by rank 0 only; every rank reads
it. Backend: ``gloo`` on CPU; ``cpu:gloo,cuda:nccl`` when CUDA is available (each rank
then uses ``cuda:LOCAL_RANK``).

Set ``NETMEND_DISTRIBUTED=0`` to make netmend ignore ``torchrun``'s environment (each
process then runs alone).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DISABLE_ENV = "NETMEND_DISTRIBUTED"
"""Environment variable: "0" makes netmend run each process alone, even under torchrun."""
TIMEOUT_ENV = "NETMEND_DIST_TIMEOUT"
"""Environment variable: seconds a collective may wait for a missing rank (netmend's group)."""
DEFAULT_TIMEOUT_SECONDS = 600.0


class RankFailedError(RuntimeError):
    """Raised on every rank when another rank failed during a sharded pass."""


def _env_world() -> tuple[int, int] | None:
    """``(rank, world_size)`` from torchrun's environment, or ``None`` when not set/disabled."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise ValueError(
            "WORLD_SIZE and RANK must be integers (set by torchrun); got "
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}, RANK={os.environ.get('RANK')!r}"
        ) from None
    if size <= 1:
        return None
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ValueError(
            f"WORLD_SIZE={size} but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun, "
            f"or set {DISABLE_ENV}=0 to run each process alone"
        )
    return rank, size


def timeout() -> datetime.timedelta:
    """How long a collective of netmend's own process group waits (:data:`TIMEOUT_ENV`)."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_SECONDS))
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds; got {raw!r}") from None
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0 seconds; got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def init_from_env() -> bool:
    """Initialise the default process group from torchrun's environment, if it asks for one.

    Returns:
        True when a process group is (now) initialised with more than one rank.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    env = _env_world()
    if env is None:
        return False
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)  # "cuda" (no index) now means this rank's GPU
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timeout())
    log.info("netmend: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def world() -> tuple[int, int]:
    """``(rank, world_size)``: of the default process group (initialised from torchrun's
    environment if it is not yet), ``(0, 1)`` in a single process."""
    if init_from_env():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_writer() -> bool:
    """True on the rank that writes files (rank 0; every process when not distributed)."""
    return world()[0] == 0


def shard(n: int, chunk_size: int, rank: int, world_size: int, start: int = 0) -> range:
    """The rows of ``range(start, n)`` that ``rank`` computes, chunk-aligned.

    The chunks ``[i, i + chunk_size)`` for ``i`` in ``range(start, n, chunk_size)`` (as one
    process cuts them) are split into ``world_size`` contiguous blocks whose sizes differ by
    at most one chunk; rank ``r`` gets block ``r``. Over the ranks the blocks cover every row
    of ``range(start, n)`` exactly once, in rank order (a rank may get none when there are
    fewer chunks than ranks).

    Returns:
        ``range(lo, hi)``: this rank's rows.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
    if n < start:
        raise ValueError(f"start ({start}) must not exceed n ({n})")
    count = -(-(n - start) // chunk_size)  # chunks
    first = count * rank // world_size
    last = count * (rank + 1) // world_size
    return range(min(start + first * chunk_size, n), min(start + last * chunk_size, n))


def _backend_devices() -> tuple[bool, bool]:
    """Whether the default group's backend takes ``(cpu, cuda)`` tensors."""
    backend = str(dist.get_backend()).lower()
    cpu = "gloo" in backend or "mpi" in backend
    cuda = "nccl" in backend
    return cpu, cuda


def _comm(t: torch.Tensor) -> torch.Tensor:
    """``t`` on a device the backend can communicate (a copy only when it must move)."""
    cpu, cuda = _backend_devices()
    if t.device.type == "cpu" and not cpu:
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    if t.device.type == "cuda" and not cuda:
        return t.cpu()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over the ranks (every rank gets the same tensor, on ``t``'s device)."""
    if world()[1] == 1:
        return t
    flat = t.to(torch.uint8) if t.dtype == torch.bool else t
    c = _comm(flat.contiguous())
    dist.all_reduce(c, op=dist.ReduceOp.SUM)
    return c.to(device=t.device, dtype=t.dtype)


class Captured:
    """A context that keeps an ``Exception`` raised in it when more than one rank runs, so
    that it can be shared with :func:`agree` (it propagates as usual in a single process).

    Attributes:
        error: the exception caught, or ``None``.
    """

    def __init__(self) -> None:
        self.error: Exception | None = None

    def __enter__(self) -> Captured:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, Exception) and world()[1] > 1:
            self.error = exc
            return True
        return False


def agree(error: BaseException | None, what: str, meta: Any = None) -> list[Any]:
    """Collective check that every rank succeeded; exchanges a small picklable ``meta``.

    Every rank must call it once per step, with the exception it caught (or ``None``).
    If any rank failed, every rank raises: the failed ranks re-raise their own exception,
    the others a :class:`RankFailedError` naming the failed ranks and their errors.

    Returns:
        Every rank's ``meta``, in rank order.
    """
    rank, size = world()
    if size == 1:
        if error is not None:
            raise error
        return [meta]
    note = None if error is None else f"{type(error).__name__}: {error}"
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, (note, meta))
    failed = [(r, g[0]) for r, g in enumerate(gathered) if g[0] is not None]
    if failed:
        if error is not None:
            raise error
        where = "; ".join(f"rank {r}: {msg}" for r, msg in failed)
        raise RankFailedError(f"{what} failed on another rank ({where}); rank {rank} stops too")
    return [g[1] for g in gathered]


def check_same(values: dict[str, Any], what: str) -> None:
    """Raise ``ValueError`` on every rank unless every rank passes equal ``values``.

    Args:
        values: named values that must agree, e.g. ``{"model parameters": hash, "training
            examples": N}``: sharded passes combine the ranks' work, so every rank must hold
            the same model and data (nothing in a single process).
        what: the step checked, for the messages.

    Raises:
        ValueError: on every rank, naming the values that differ and each rank's reading.
    """
    ranks = agree(None, what, values)
    differ = [k for k in values if any(r[k] != ranks[0][k] for r in ranks[1:])]
    if differ:
        readings = "; ".join(f"{k}: {[r[k] for r in ranks]}" for k in differ)
        raise ValueError(
            f"{what}: the ranks hold different {' and '.join(differ)} (by rank: {readings}). "
            "Every rank must load the same model and data (same seed, same files) before "
            "calling netmend"
        )


def gather_rows(buf: torch.Tensor, blocks: Sequence[range]) -> torch.Tensor:
    """Fill ``buf`` ``[n, ...]`` with every rank's rows, in index order (an all-gather).

    Args:
        buf: on every rank, a buffer holding this rank's rows ``blocks[rank]`` (other rows
            are overwritten).
        blocks: every rank's rows (from :func:`shard`), in rank order.

    Returns:
        ``buf``, now the same on every rank.
    """
    rank, size = world()
    if size == 1:
        return buf
    if len(blocks) != size:
        raise ValueError(f"need one block per rank ({size}); got {len(blocks)}")
    width = max(len(b) for b in blocks)
    if width == 0:
        return buf
    raw = buf.view(torch.uint8) if buf.dtype == torch.bool else buf
    mine = raw[blocks[rank].start : blocks[rank].stop]
    send = torch.zeros((width, *raw.shape[1:]), dtype=raw.dtype)
    send[: mine.shape[0]] = mine
    send = _comm(send)
    parts = [torch.empty_like(send) for _ in range(size)]
    dist.all_gather(parts, send)
    for r, b in enumerate(blocks):
        if r != rank and len(b):
            raw[b.start : b.stop] = parts[r][: len(b)].to(raw.device)
    return buf


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if world()[1] > 1:
        dist.barrier()
