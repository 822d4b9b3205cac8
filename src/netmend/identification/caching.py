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

            def rerun() -> Any:
                """The method again in its own scope, as its first run saw the context (no
                Fisher if it computed one, nothing shared), so that its passes take the same
                numbers and are read back; a loaded Fisher or a pass shared by a later call
                shifted them onto other passes' records, recomputed and overwrote those."""
                saved = ctx.fisher, ctx.shared
                if meta.get("fisher_computed"):
                    ctx.fisher = None
                ctx.shared = {}
                try:
                    with run.activated(name):
                        return fn(ctx).per_failure
                finally:
                    loaded = ctx.fisher
                    ctx.fisher, ctx.shared = saved
                    if ctx.fisher is None:
                        ctx.fisher = loaded

            per_failure = _per_failure(run, name, rerun, f"{name}.per_failure")
        return MethodOutput(tensors["scores"].numpy(), per_failure, info)
    fisher_computed = ctx.fisher is None
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
    meta = {
        "info": info_json,
        "per_failure": out.per_failure is not None,
        "fisher_computed": fisher_computed and ctx.fisher is not None,
    }
    run.save(record, tensors, meta)
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
