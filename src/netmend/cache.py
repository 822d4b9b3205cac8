"""Saved, resumable runs: a directory holding one identification run's results.

``netmend.identify(..., cache_dir=DIR)`` opens a :class:`RunCache` on ``DIR``:

* ``DIR/settings.json`` holds the run's **settings key**: hashes of the model's parameters and
  buffers, of the training set and of the failures (blake2b of the tensors' bytes), the method
  name and options (options that are not JSON, e.g. tensors, are hashed), ``l2``, ``seed``,
  the dtype, any precomputed Fisher (hashed) and the netmend version. ``chunk_size``,
  ``device``, ``progress`` and ``k`` are not part of it: they do not change the scores (``k``
  only selects among them, and is re-applied to the stored scores).
* every other file is a safetensors file: one per **pass** over the training set (a
  ``stream`` / ``log_likelihoods`` / ``fisher_diag_sum`` call, checkpointed while it runs)
  and one per finished method call (``result.call<i>``: scores, diagnostics, the Fisher).
  Their JSON metadata sits in the safetensors header under the key ``"netmend"``.

A later run with the same settings reuses what is stored: finished results are returned
without scoring, finished passes are read back, and a pass that was interrupted restarts
after its last checkpointed chunk. The result is bit-for-bit the one an uninterrupted run
gives (same ``chunk_size`` and device; a different ``chunk_size`` resumes at the same example
and differs at most by float rounding). A run with different settings in the same directory
is refused (``ValueError``), never mixed. Every file is written atomically (a temporary file
in the same directory, then ``os.replace``), so a killed run leaves either the old file or
the new one. One process at a time may use a directory (there is no lock).

How a method opts in to resuming
--------------------------------
Nothing to do for methods that go through :func:`netmend.functional.stream`,
:func:`netmend.functional.log_likelihoods` or :func:`netmend.curvature.fisher_diag_sum`:
while ``identify`` runs with a ``cache_dir``, these passes checkpoint themselves. A method
with its own loop over the training set replaces it by one call to :func:`map_chunks`::

    # before: for s in chunks(N, cs): total += work(X[s], y[s])
    total = map_chunks(N, cs, lambda s: work(X[s], y[s]), desc="mine", reduce="sum",
                       init=torch.zeros(P), fingerprint=lambda: tensor_hash(theta))
    # per-example outputs [N, ...]: reduce="cat" (outputs are concatenated on CPU)

Passes are identified by the method call they run in, their order in it and ``desc``: the
method must make the same passes in the same order given the same settings (deterministic
given the seed, as every method must be anyway). ``fingerprint`` (optional, evaluated only
when a cache is active) guards a pass against reusing a checkpoint made with other inputs,
e.g. another ``theta``: a mismatch discards the checkpoint with a warning and recomputes.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from .identification.base import Context, MethodOutput

log = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 10.0
"""A pass in progress is checkpointed at most this often (seconds; 0 = after every chunk)."""
CHECKPOINT_CHUNKS: int | None = None
"""If set, a pass in progress is also checkpointed every this many chunks."""

SETTINGS_FILE = "settings.json"
FORMAT_VERSION = 1
_META_KEY = "netmend"

_ACTIVE: contextvars.ContextVar[tuple[RunCache, str] | None] = contextvars.ContextVar(
    "netmend_active_cache", default=None
)


# ----------------------------------------------------------------------------- hashing


def tensor_hash(*tensors: torch.Tensor, block_bytes: int = 1 << 24) -> str:
    """blake2b hex digest of the tensors' dtypes, shapes and bytes (no full copy is made).

    Hashes a contiguous CPU view block by block, so a large training set costs one read of its
    memory and at most ``block_bytes`` extra.
    """
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.reshape(-1) if t.is_contiguous() else t.flatten()
        if flat.numel() == 0:
            continue
        step = max(1, block_bytes // max(1, flat.element_size()))
        for i in range(0, flat.numel(), step):
            part = flat[i : i + step].cpu().contiguous()
            h.update(part.view(torch.uint8).numpy().data)
    return h.hexdigest()


def module_hash(model: nn.Module) -> str:
    """Hash of a model's class name, parameters (with their ``requires_grad``) and buffers.

    The class's module is left out: the same class run as a script (``__main__``) and
    imported from a file hashes the same.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(type(model).__qualname__.encode())
    for name, p in model.named_parameters():
        h.update(f"|p:{name}:{p.requires_grad}:".encode())
        h.update(tensor_hash(p).encode())
    for name, b in model.named_buffers():
        h.update(f"|b:{name}:".encode())
        h.update(tensor_hash(b).encode())
    return h.hexdigest()


def jsonable(value: Any) -> Any:
    """``value`` as JSON: plain values as they are, tensors/arrays/modules/others as hashes."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return jsonable(value.item())
    if isinstance(value, torch.Tensor):
        return {"tensor": tensor_hash(value)}
    if isinstance(value, np.ndarray):
        return {"array": tensor_hash(torch.from_numpy(np.ascontiguousarray(value)))}
    if isinstance(value, nn.Module):
        return {"module": module_hash(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return {"repr": hashlib.blake2b(repr(value).encode(), digest_size=16).hexdigest()}


def run_settings(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    failures: tuple[torch.Tensor, torch.Tensor],
    method: str,
    options: Mapping[str, Any],
    l2: float | str,
    seed: int,
    fisher: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The settings key of an identification run (what must match for results to be reused).

    Args:
        model: the (private copy of the) model; train, failures: ``(X, y)`` as scored
            (after conversion to the model's dtype).
        method, options, l2, seed: as passed to :func:`netmend.identify`.
        fisher: a precomputed Fisher passed by the user, if any.
    """
    from . import __version__

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return {
        "format": FORMAT_VERSION,
        "netmend_version": __version__,
        "method": method,
        "options": jsonable(dict(options)),
        "l2": jsonable(l2),
        "seed": int(seed),
        "dtype": str(dtype),
        "model": module_hash(model),
        "train": tensor_hash(*train),
        "failures": tensor_hash(*failures),
        "fisher": None if fisher is None else tensor_hash(fisher),
    }


# ----------------------------------------------------------------------------- atomic files


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file in ``path``'s directory, then rename it to ``path``."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)  # mkstemp makes the file 0600; give it the mode open() would
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_tensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None
) -> None:
    """Write ``tensors`` (and JSON ``meta``) to a safetensors file, atomically."""
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {_META_KEY: json.dumps(meta or {})}
    _atomic_write(Path(path), lambda tmp: save_file(data, str(tmp), metadata=header))


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`: ``(tensors, meta)``."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118 (not a dict)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (missing parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    _atomic_write(path, write)


# ----------------------------------------------------------------------------- the run cache


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


class RunCache:
    """A directory holding one run's results, keyed by its settings (see the module docstring).

    Args:
        path: the directory (created if missing). It must be new, empty, or a cache of a run
            with the same ``settings``.
        settings: the settings key (JSON; see :func:`run_settings`).
        overwrite: if the directory holds a run with other settings, delete its files and
            start afresh instead of raising.
        checkpoint_seconds, checkpoint_chunks: how often a pass in progress is saved
            (defaults: :data:`CHECKPOINT_SECONDS`, :data:`CHECKPOINT_CHUNKS`).

    Raises:
        ValueError: the directory holds a run with different settings (the message names the
            differing fields), or files that are not a netmend cache.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        settings: Mapping[str, Any],
        overwrite: bool = False,
        checkpoint_seconds: float | None = None,
        checkpoint_chunks: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.settings = json.loads(json.dumps(dict(settings)))
        self.checkpoint_seconds = (
            CHECKPOINT_SECONDS if checkpoint_seconds is None else float(checkpoint_seconds)
        )
        self.checkpoint_chunks = checkpoint_chunks or CHECKPOINT_CHUNKS
        self._counters: dict[str, int] = {}
        self.passes: list[dict[str, Any]] = []
        self.results_reused: list[str] = []
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"cache_dir {str(self.path)!r} is a file; pass a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        for tmp in self.path.glob(".*.tmp"):  # left by a run killed while writing
            tmp.unlink(missing_ok=True)
        stored = self._stored_settings()
        if stored is not None and stored != self.settings:
            if not overwrite:
                raise ValueError(self._mismatch_message(stored))
            self.clear()
            stored = None
        if stored is None:
            others = [p.name for p in self.path.iterdir() if not p.name.startswith(".")]
            if others and not overwrite:
                raise ValueError(
                    f"cache_dir {str(self.path)!r} is not empty and holds no netmend "
                    f"{SETTINGS_FILE} ({', '.join(sorted(others)[:3])}, ...): pass a new or "
                    "empty directory"
                )
            if others:
                self.clear()
            write_json_atomic(self.path / SETTINGS_FILE, self.settings)

    def _stored_settings(self) -> dict[str, Any] | None:
        f = self.path / SETTINGS_FILE
        if not f.exists():
            return None
        try:
            return dict(json.loads(f.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(
                f"{f} is not valid JSON ({exc}); delete {str(self.path)!r} or pass "
                "overwrite_cache=True"
            ) from None

    def _mismatch_message(self, stored: Mapping[str, Any]) -> str:
        keys = sorted(set(stored) | set(self.settings))
        diff = [k for k in keys if stored.get(k) != self.settings.get(k)]
        parts = ", ".join(
            f"{k} ({_short(stored.get(k))} there, {_short(self.settings.get(k))} here)"
            for k in diff
        )
        return (
            f"cache_dir {str(self.path)!r} holds a run with different settings: {parts}. "
            "Results of different runs are never mixed: pass another cache_dir, or delete "
            "this one (or pass overwrite_cache=True) to replace it."
        )

    def clear(self) -> None:
        """Delete this cache's files (settings, safetensors, temporaries); keep the directory."""
        for p in self.path.iterdir():
            if p.is_file() and (p.name == SETTINGS_FILE or p.suffix in (".safetensors", ".tmp")):
                p.unlink()
            elif p.is_file() or p.is_dir():
                raise ValueError(
                    f"cache_dir {str(self.path)!r} holds {p.name!r}, which netmend did not "
                    "write; pass a new or empty directory"
                )

    # -- records

    def file(self, name: str) -> Path:
        """Path of the record ``name``."""
        return self.path / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.safetensors"

    def has(self, name: str) -> bool:
        return self.file(name).exists()

    def save(
        self, name: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None
    ) -> None:
        """Write the record ``name`` atomically."""
        save_tensors(self.file(name), tensors, meta)

    def load(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Read the record ``name``: ``(tensors, meta)``."""
        return load_tensors(self.file(name))

    def next_label(self, scope: str, desc: str) -> str:
        """A label for the next pass in ``scope``: the scope, a per-scope counter and ``desc``."""
        i = self._counters.get(scope, 0)
        self._counters[scope] = i + 1
        return f"pass.{scope}.{i:03d}.{desc or 'stream'}"

    def summary(self) -> dict[str, Any]:
        """What this run reused and computed (examples per pass), for ``Identification.info``."""
        return {
            "dir": str(self.path),
            "results_reused": list(self.results_reused),
            "examples_computed": sum(p["computed"] for p in self.passes),
            "examples_skipped": sum(p["skipped"] for p in self.passes),
            "passes": [dict(p) for p in self.passes],
        }

    # -- method calls

    def call_method(
        self, name: str, fn: Callable[[Context], MethodOutput], ctx: Context
    ) -> MethodOutput:
        """``fn(ctx)`` with its passes checkpointed under ``name``; stored result if finished.

        The result record holds the scores, the tensors and arrays of ``info``, its JSON-able
        rest (other values are not kept), and ``ctx.fisher``. Per-failure scores (lazy) are
        saved the first time they are computed.
        """
        from .identification.base import MethodOutput

        record = f"result.{name}"
        if self.has(record):
            tensors, meta = self.load(record)
            self.results_reused.append(name)
            if ctx.fisher is None and "fisher" in tensors:
                ctx.fisher = tensors["fisher"].to(ctx.device)
            info = dict(meta.get("info", {}))
            info.update({k[5:]: v for k, v in tensors.items() if k.startswith("info.")})
            info.update({k[8:]: v.numpy() for k, v in tensors.items() if k.startswith("info_np.")})
            per_failure = None
            if meta.get("per_failure"):
                # rerun the method in its own scope: its finished passes are read back
                per_failure = self._per_failure(name, lambda: fn(ctx).per_failure, name)
            return MethodOutput(tensors["scores"].numpy(), per_failure, info)
        with self.activated(name):
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
        self.save(record, tensors, {"info": info_json, "per_failure": out.per_failure is not None})
        pf = out.per_failure
        per_failure = None
        if pf is not None:
            per_failure = self._per_failure(name, lambda: pf, f"{name}.per_failure")
        return MethodOutput(out.scores, per_failure, out.info)

    def _per_failure(
        self,
        name: str,
        source: Callable[[], np.ndarray | Callable[[], np.ndarray] | None],
        scope: str,
    ) -> Callable[[], np.ndarray]:
        record = f"per_failure.{name}"

        def compute() -> np.ndarray:
            if self.has(record):
                return self.load(record)[0]["scores"].numpy()
            with self.activated(scope):
                pf = source()
                arr = np.asarray(pf() if callable(pf) else pf)
            self.save(record, {"scores": torch.from_numpy(np.ascontiguousarray(arr))})
            return arr

        return compute

    @contextlib.contextmanager
    def activated(self, scope: str) -> Iterator[RunCache]:
        """Make this cache the active one (for :func:`map_chunks`) under ``scope``."""
        token = _ACTIVE.set((self, scope))
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


def _is_json(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


@contextlib.contextmanager
def activated(run: RunCache | None, scope: str) -> Iterator[RunCache | None]:
    """``run.activated(scope)``, or nothing when ``run`` is ``None``."""
    if run is None:
        yield None
        return
    with run.activated(scope):
        yield run


def active() -> tuple[RunCache, str] | None:
    """The active cache and scope, or ``None`` (no ``cache_dir`` run in progress)."""
    return _ACTIVE.get()


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
        return run.call_method(name, fn, ctx)

    return wrapped


# ----------------------------------------------------------------------------- resumable passes


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
    starts = range(done, n, chunk_size)
    last, since = time.monotonic(), 0
    bar = tqdm(
        total=math.ceil(n / chunk_size),
        initial=math.ceil(done / chunk_size),
        desc=desc,
        disable=not progress,
        leave=False,
    )
    with bar:
        for i in starts:
            r = fn(slice(i, min(i + chunk_size, n)))
            if reduce == "cat":
                put(i, r.detach().cpu())
            else:
                assert acc is not None  # checked above (internal invariant)
                acc += r.detach().to(acc.device)
            bar.update(1)
            if run is None:
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
    out = (buf if buf is not None else torch.empty(0)) if reduce == "cat" else acc
    assert out is not None
    if run is not None:
        _save_pass(run, label, n, n, chunk_size, reduce, fp, [out], out, True)
    return out


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
        warnings.warn(
            f"checkpoint {label} in {run.path} was made with other inputs "
            f"(n={meta.get('n')}, fingerprint={meta.get('fingerprint')!r}); recomputing it",
            stacklevel=3,
        )
        return None
    return int(meta["done"]), tensors["value"], bool(meta["complete"])
