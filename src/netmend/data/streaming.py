"""Streaming over a data set in chunks, resumable inside a saved run.

:func:`chunks` cuts ``range(n)`` into consecutive slices; :func:`map_chunks` runs a function
over them and concatenates or sums the results. While a run with a ``cache_dir`` is active
(:func:`netmend.store.active`), :func:`map_chunks` checkpoints the finished chunks there and a
rerun resumes after the last one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from tqdm.auto import tqdm

from netmend._warnings import warn
from netmend.data import distributed
from netmend.store import RunCache, active

log = logging.getLogger(__name__)


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``size`` elements."""
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def map_chunks(
    n: int,
    chunk_size: int,
    fn: Callable[[slice], torch.Tensor],
    *,
    desc: str = "",
    reduce: Literal["cat", "sum"] = "cat",
    init: torch.Tensor | None = None,
    progress: bool = False,
    fingerprint: Callable[[], str] | None = None,
) -> torch.Tensor:
    """Run ``fn`` over the slices ``[i, i + chunk_size)`` of ``range(n)``; resumable.

    Args:
        n: number of examples.
        chunk_size: examples per call of ``fn``.
        fn: ``slice -> [b, ...]`` (for ``reduce="cat"``) or a tensor to add up (``"sum"``).
        desc: a short name of the pass (progress bar, checkpoint label).
        reduce: "cat": concatenate the outputs on the CPU along dim 0 (``[n, ...]``);
            "sum": ``init + sum of the outputs``, accumulated in chunk order.
        init: the starting value of a "sum" (required for it; e.g. zeros ``[P]``).
        progress: show a progress bar.
        fingerprint: a string naming the pass's inputs (e.g. ``tensor_hash(theta)``), called
            only when a cache is active; a checkpoint with another fingerprint is discarded.

    Returns:
        The concatenation ``[n, ...]`` (CPU) or the sum (on ``fn``'s device).

    With no active cache (see :class:`RunCache`) this is a plain loop. Within an
    ``identify(..., cache_dir=...)`` run, the completed chunks are saved every
    :data:`CHECKPOINT_SECONDS` (and every :data:`CHECKPOINT_CHUNKS` chunks, if set) and when
    the pass ends; a rerun starts after the last saved chunk, so its result is bit-for-bit
    that of an uninterrupted pass with the same ``chunk_size``.
    """
    if reduce not in ("cat", "sum"):
        raise ValueError(f"reduce must be 'cat' or 'sum'; got {reduce!r}")
    if reduce == "sum" and init is None:
        raise ValueError("reduce='sum' needs init (the value the sum starts from)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    current = active()
    run, label, fp = None, "", ""
    done = 0
    # "cat": one [n, ...] buffer filled chunk by chunk. Keeping the chunks' small outputs alive
    # in a list between the passes' large transient buffers fragments the heap: glibc could
    # then not give back 20-200 MiB after a 60k-example pass (benchmarks/memory.py).
    buf: torch.Tensor | None = None

    def put(start: int, t: torch.Tensor) -> None:
        nonlocal buf
        if buf is None:
            buf = torch.empty((n, *t.shape[1:]), dtype=t.dtype)
        buf[start : start + t.shape[0]] = t

    acc = init.clone() if init is not None else None
    if current is not None:
        run, scope = current
        label = run.next_label(scope, desc)
        fp = fingerprint() if fingerprint is not None else ""
        resumed = _resume(run, label, n, reduce, fp)
        if resumed is not None:
            done, value, complete = resumed
            run.passes.append({"label": label, "skipped": done, "computed": n - done})
            if complete:
                return value.to(acc.device) if acc is not None else value
            if reduce == "cat":
                put(0, value)
            else:
                acc = value.to(acc.device if acc is not None else value.device)
        else:
            run.passes.append({"label": label, "skipped": 0, "computed": n})
    # under torch.distributed each rank runs its own block of the chunks (netmend.data.distributed)
    rank, size = distributed.world()
    blocks = [distributed.shard(n, chunk_size, r, size, start=done) for r in range(size)]
    base = None
    if size > 1 and acc is not None:
        base, acc = acc, torch.zeros_like(acc)  # this rank's share, added to base once reduced
    last, since = time.monotonic(), 0
    bar = tqdm(
        total=math.ceil(len(blocks[rank]) / chunk_size) + math.ceil(done / chunk_size),
        initial=math.ceil(done / chunk_size),
        desc=desc,
        disable=not progress or rank != 0,
        leave=False,
    )
    with bar, distributed.Captured() as failure:  # a rank's error is raised on every rank
        for i in range(blocks[rank].start, blocks[rank].stop, chunk_size):
            r = fn(slice(i, min(i + chunk_size, n)))
            if reduce == "cat":
                put(i, r.detach().cpu())
            else:
                assert acc is not None  # checked above (internal invariant)
                acc += r.detach().to(acc.device)
            bar.update(1)
            if run is None or size > 1:  # a sharded pass is saved when complete
                continue
            since += 1
            end = min(i + chunk_size, n)
            due = time.monotonic() - last >= run.checkpoint_seconds or (
                run.checkpoint_chunks is not None and since >= run.checkpoint_chunks
            )
            if due and end < n:
                part = [buf[:end]] if buf is not None else []
                _save_pass(run, label, n, end, chunk_size, reduce, fp, part, acc, False)
                last, since = time.monotonic(), 0
    if size > 1:
        err = failure.error
        buf, acc = _combine(desc, n, chunk_size, done, reduce, blocks, err, buf, acc, base)
    out = (buf if buf is not None else torch.empty(0)) if reduce == "cat" else acc
    assert out is not None
    if run is not None:
        _save_pass(run, label, n, n, chunk_size, reduce, fp, [out], out, True)
    return out


def _combine(
    desc: str,
    n: int,
    chunk_size: int,
    done: int,
    reduce: str,
    blocks: list[range],
    error: Exception | None,
    buf: torch.Tensor | None,
    acc: torch.Tensor | None,
    base: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Every rank's share of a sharded pass, combined: rows gathered in index order ("cat"),
    sums all-reduced and added to ``base`` ("sum"). Raises on every rank if one failed."""
    layout = None if buf is None else (tuple(buf.shape[1:]), buf.dtype)
    metas = distributed.agree(error, f"pass {desc!r}", ((n, chunk_size, done, reduce), layout))
    if len({m[0] for m in metas}) > 1:
        raise ValueError(
            f"the ranks ran different passes at {desc!r} ((n, chunk_size, done, reduce) per "
            f"rank: {[m[0] for m in metas]}): every rank must run the same code on the same data"
        )
    if reduce == "sum":
        assert acc is not None and base is not None  # set by map_chunks (internal invariant)
        return buf, base + distributed.all_reduce_sum(acc)
    layouts = [m[1] for m in metas if m[1] is not None]
    if buf is None and layouts:  # this rank computed no chunk: learn the rows' shape
        buf = torch.empty((n, *layouts[0][0]), dtype=layouts[0][1])
    if buf is not None:
        distributed.gather_rows(buf, blocks)
    return buf, acc


def _save_pass(
    run: RunCache,
    label: str,
    n: int,
    done: int,
    chunk_size: int,
    reduce: str,
    fp: str,
    parts: list[torch.Tensor],
    acc: torch.Tensor | None,
    complete: bool,
) -> None:
    value = parts[0] if reduce == "cat" else acc
    assert value is not None
    meta = {
        "n": n,
        "done": done,
        "chunk_size": chunk_size,
        "reduce": reduce,
        "fingerprint": fp,
        "complete": complete,
    }
    run.save(label, {"value": value}, meta)
    log.debug("checkpointed %s: %d/%d examples", label, done, n)


def _resume(
    run: RunCache, label: str, n: int, reduce: str, fp: str
) -> tuple[int, torch.Tensor, bool] | None:
    if not run.has(label):
        return None
    tensors, meta = run.load(label)
    if meta.get("n") != n or meta.get("reduce") != reduce or meta.get("fingerprint") != fp:
        warn(
            f"checkpoint {label} in {run.path} was made with other inputs "
            f"(n={meta.get('n')}, fingerprint={meta.get('fingerprint')!r}); recomputing it",
        )
        return None
    return int(meta["done"]), tensors["value"], bool(meta["complete"])
