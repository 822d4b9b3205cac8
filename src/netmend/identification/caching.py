"""Identification results in a saved run: each method call's scores, diagnostics and Fisher.

The storage layer (:mod:`netmend.store`) knows named tensors and settings; this module knows
what an identification method returns (:class:`~netmend.identification.base.MethodOutput`)
and how to store and read back one call of it. ``identify`` wraps the method with
:func:`cached_method` when it is given a ``cache_dir``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from netmend.identification.base import Context, MethodOutput
from netmend.store import RunCache


def call_method(
    run: RunCache, name: str, fn: Callable[[Context], MethodOutput], ctx: Context
) -> MethodOutput:
    """``fn(ctx)`` with its passes checkpointed under ``name``; stored result if finished.

    The result record holds the scores, the tensors and arrays of ``info``, its JSON-able
    rest (other values are not kept), and ``ctx.fisher``. Per-failure scores (lazy) are
    saved the first time they are computed.
    """
    record = f"result.{name}"
    if run.has(record):
        tensors, meta = run.load(record)
        run.results_reused.append(name)
        if ctx.fisher is None and "fisher" in tensors:
            ctx.fisher = tensors["fisher"].to(ctx.device)
        info = dict(meta.get("info", {}))
        info.update({k[5:]: v for k, v in tensors.items() if k.startswith("info.")})
        info.update({k[8:]: v.numpy() for k, v in tensors.items() if k.startswith("info_np.")})
        per_failure = None
        if meta.get("per_failure"):
            # rerun the method in its own scope: its finished passes are read back
            per_failure = _per_failure(run, name, lambda: fn(ctx).per_failure, name)
        return MethodOutput(tensors["scores"].numpy(), per_failure, info)
    with run.activated(name):
        out = fn(ctx)
    tensors = {"scores": torch.as_tensor(np.asarray(out.scores, dtype=np.float64))}
    if ctx.fisher is not None:
        tensors["fisher"] = ctx.fisher
    info_json: dict[str, Any] = {}
    for k, v in out.info.items():
        if isinstance(v, torch.Tensor):
            tensors[f"info.{k}"] = v
        elif isinstance(v, np.ndarray) and v.dtype != object:
            tensors[f"info_np.{k}"] = torch.from_numpy(np.ascontiguousarray(v))
        elif _is_json(v):
            info_json[k] = v
    run.save(record, tensors, {"info": info_json, "per_failure": out.per_failure is not None})
    pf = out.per_failure
    per_failure = None
    if pf is not None:
        per_failure = _per_failure(run, name, lambda: pf, f"{name}.per_failure")
    return MethodOutput(out.scores, per_failure, out.info)


def _per_failure(
    run: RunCache,
    name: str,
    source: Callable[[], np.ndarray | Callable[[], np.ndarray] | None],
    scope: str,
) -> Callable[[], np.ndarray]:
    record = f"per_failure.{name}"

    def compute() -> np.ndarray:
        if run.has(record):
            return run.load(record)[0]["scores"].numpy()
        with run.activated(scope):
            pf = source()
            arr = np.asarray(pf() if callable(pf) else pf)
        run.save(record, {"scores": torch.from_numpy(np.ascontiguousarray(arr))})
        return arr

    return compute


def _is_json(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


def cached_method(
    fn: Callable[[Context], MethodOutput], run: RunCache | None
) -> Callable[[Context], MethodOutput]:
    """``fn`` whose successive calls are stored as ``call0``, ``call1``, ... in ``run``.

    ``identify`` calls the method on all the query failures first, then (for the automatic
    ``k``) on each half; the call number tells the calls apart. With ``run`` ``None``: ``fn``.
    """
    if run is None:
        return fn
    calls = [0]

    def wrapped(ctx: Context) -> MethodOutput:
        name = f"call{calls[0]}"
        calls[0] += 1
        return call_method(run, name, fn, ctx)

    return wrapped
