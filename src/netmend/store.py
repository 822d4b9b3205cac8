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
the new one.

A cache that cannot lie
-----------------------
* Every safetensors file carries, in its header, a **checksum** (blake2b of its tensors'
  names, dtypes, shapes and bytes, and of its JSON metadata) and, for a run's records, the
  hash of the run's settings. A record whose bytes, metadata or settings do not match (a
  damaged, truncated or edited file, or one copied from another run) is never reused: the
  run deletes it with a warning naming the file and recomputes it (:meth:`RunCache.has`);
  reading it directly (:func:`load_tensors`, :meth:`RunCache.load`) raises
  :class:`CacheRecordError` naming the file and the fix.
* A **lock file** ``DIR/.lock`` (created atomically with ``O_EXCL``; it holds the pid, the
  host and the settings hash) stops a second process from writing the directory with other
  settings while the first is alive; a lock left by a dead process (killed run) is taken
  over. Processes with the same settings may share the directory (their records are
  identical and written atomically).

How a method opts in to resuming
--------------------------------
Nothing to do for methods that go through :func:`netmend.model.functional.stream`,
:func:`netmend.model.functional.log_likelihoods` or :func:`netmend.curvature.fisher_diag_sum`:
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
import socket
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from netmend._version import __version__
from netmend._warnings import warn

log = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 10.0
"""A pass in progress is checkpointed at most this often (seconds; 0 = after every chunk)."""
CHECKPOINT_CHUNKS: int | None = None
"""If set, a pass in progress is also checkpointed every this many chunks."""

SETTINGS_FILE = "settings.json"
LOCK_FILE = ".lock"
FORMAT_VERSION = 2  # 2: records carry a checksum and the settings hash
_META_KEY = "netmend"
_CHECKSUM_KEY = "netmend_checksum"
_SETTINGS_KEY = "netmend_settings"


class CacheRecordError(ValueError):
    """A cached file is damaged, truncated, edited or from another run (the message names it)."""


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


def jsonable(value: Any, other: Callable[[Any], Any] | None = None) -> Any:
    """``value`` as JSON: plain values as they are, tensors/arrays/modules as hashes, and any
    other object as ``other(value)`` (default: a hash of its ``repr``)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):  # 2.0 as 2: an option given as 100 and as 100.0 is one run
        if not math.isfinite(value):
            return repr(value)
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return jsonable(value.item())
    if isinstance(value, torch.Tensor):
        return {"tensor": tensor_hash(value)}
    if isinstance(value, np.ndarray):
        return {"array": tensor_hash(torch.from_numpy(np.ascontiguousarray(value)))}
    if isinstance(value, nn.Module):
        return {"module": module_hash(value)}
    if callable(value) and hasattr(value, "__code__"):  # by its code: its repr holds an address
        return {"function": code_fingerprint(value)}
    if isinstance(value, Mapping):
        return {
            str(k): jsonable(v, other) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
        }
    if isinstance(value, (list, tuple)):
        return [jsonable(v, other) for v in value]
    if other is not None:
        return other(value)
    return {"repr": hashlib.blake2b(repr(value).encode(), digest_size=16).hexdigest()}


def finite_or_none(value: Any) -> Any:
    """``value`` (nested dicts, lists, tuples) with every NaN or infinite float as ``None``:
    JSON has no NaN (a class the test set lacks has no accuracy), and strict readers refuse
    the bare ``NaN`` token. Tuples come back as lists, as JSON reads them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def code_fingerprint(fn: Any) -> str:
    """``module.qualname`` and a hash of a function's code (its bytecode, constants and
    names), stable across processes: a method whose code is edited is another method, and its
    cached results are not reused (a plug-in author's sign fix returned the old causes). A
    wrapper made with ``functools.wraps`` counts as the function it wraps."""
    while hasattr(fn, "__wrapped__"):  # functools.wraps: the wrapped function's identity
        fn = fn.__wrapped__
    code = getattr(fn, "__code__", None)
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(type(fn)))}"
    if code is None:
        return name

    def stable(const: Any) -> str:  # a set constant's repr follows the process's str hashing
        if isinstance(const, (frozenset, set)):
            return "{" + ",".join(sorted(stable(v) for v in const)) + "}"
        if isinstance(const, tuple):
            return "(" + ",".join(stable(v) for v in const) + ")"
        return repr(const)

    def parts(c: Any) -> list[bytes]:
        out = [c.co_code, repr(c.co_names).encode(), repr(c.co_varnames).encode()]
        for const in c.co_consts:  # nested functions by their own code, not their address
            out += parts(const) if hasattr(const, "co_code") else [stable(const).encode()]
        return out

    digest = hashlib.blake2b(b"\0".join(parts(code)), digest_size=8).hexdigest()
    return f"{name}:{digest}"


def run_settings(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor] | str,
    failures: tuple[torch.Tensor, torch.Tensor] | str,
    method: str,
    options: Mapping[str, Any],
    l2: float | str,
    seed: int,
    fisher: torch.Tensor | None = None,
    outputs: str | None = None,
    task: str | None = None,
    method_code: str | None = None,
) -> dict[str, Any]:
    """The settings key of an identification run (what must match for results to be reused).

    Args:
        model: the (private copy of the) model; train, failures: ``(X, y)`` as scored
            (after conversion to the model's dtype), or a hash of their content (a data
            source's ``fingerprint()``).
        method, options, l2, seed: as passed to :func:`netmend.identify`.
        fisher: a precomputed Fisher passed by the user, if any.
        outputs: a hash of the model's logits on the first training examples. The
            parameters do not name the function: a swapped activation, a temperature kept as
            a plain attribute or another ``task=`` change the scores and not
            :func:`module_hash` (found by an outside-in trial). On another device the
            logits differ at rounding level, so a cache is not reused across devices.
        task: the ``task=``'s class and attributes (:func:`task_key`).
        method_code: the registered function's :func:`code_fingerprint`: a method edited
            between runs is not read back from the cache.
    """
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return {
        "format": FORMAT_VERSION,
        "netmend_version": __version__,
        "method": method,
        "method_code": method_code,
        "options": jsonable(dict(options)),
        "l2": jsonable(l2),
        "seed": int(seed),
        "dtype": str(dtype),
        "model": module_hash(model),
        "train": train if isinstance(train, str) else tensor_hash(*train),
        "failures": failures if isinstance(failures, str) else tensor_hash(*failures),
        "fisher": None if fisher is None else tensor_hash(fisher),
        "model_outputs": outputs,
        "task": task,
    }


def task_key(task: Any) -> str:
    """A task's class and attributes: plain values, tensors, arrays and modules by content,
    other objects by their type (their ``repr`` may hold a memory address, new in every
    process)."""
    attrs = jsonable(dict(getattr(task, "__dict__", {})), lambda v: f"<{type(v).__qualname__}>")
    return f"{type(task).__qualname__}:{json.dumps(attrs, sort_keys=True)}"


# ----------------------------------------------------------------------------- atomic files


def _ranks() -> tuple[int, int]:
    """``(rank, world_size)`` of an initialised default process group, else ``(0, 1)``.

    Under ``torchrun`` netmend initialises the group before its first write (see
    :mod:`netmend.data.distributed`); only rank 0 writes files, every rank reads them.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _on_rank0(work: Callable[[], None]) -> None:
    """``work()`` on rank 0 only; then every rank raises if it failed there (a barrier)."""
    rank, size = _ranks()
    if size == 1:
        work()
        return
    note: list[str | None] = [None]
    error: Exception | None = None
    if rank == 0:
        try:
            work()
        except Exception as exc:
            error, note[0] = exc, f"{type(exc).__name__}: {exc}"
    dist.broadcast_object_list(note, src=0)
    if error is not None:
        raise error
    if note[0] is not None:
        raise ValueError(f"rank 0 failed: {note[0]}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file in ``path``'s directory, then rename it to ``path``.

    Under ``torch.distributed`` only rank 0 writes (the others return at once).
    """
    if _ranks()[0] != 0:
        return
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # mkstemp makes the file 0600 (and a writer may replace it): give it open()'s mode
        os.chmod(tmp, 0o666 & ~umask)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def settings_hash(settings: Mapping[str, Any]) -> str:
    """blake2b hex digest of a settings key (canonical JSON)."""
    text = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _checksum(tensors: Mapping[str, torch.Tensor], meta_json: str, settings: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        h.update(f"{name}|{tensor_hash(tensors[name])}|".encode())
    h.update(f"meta|{meta_json}|settings|{settings}".encode())
    return h.hexdigest()


def save_tensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any] | None = None,
    settings: str = "",
) -> None:
    """Write ``tensors`` (and JSON ``meta``) to a safetensors file, atomically.

    The header also holds a checksum of the tensors and ``meta`` (and ``settings``, a
    settings hash, for a run's records), which :func:`load_tensors` verifies.
    """
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta_json = json.dumps(meta or {})
    header = {
        _META_KEY: meta_json,
        _SETTINGS_KEY: settings,
        _CHECKSUM_KEY: _checksum(data, meta_json, settings),
    }
    _atomic_write(Path(path), lambda tmp: save_file(data, str(tmp), metadata=header))


def load_tensors(
    path: str | Path, settings: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`: ``(tensors, meta)``, checksum verified.

    Args:
        path: the file.
        settings: the settings hash the file must carry (``None``: not checked).

    Raises:
        CacheRecordError: the file cannot be read as safetensors (truncated, damaged), has no
            checksum or a wrong one (edited bytes or metadata), or carries other settings.
            The message names the file and says what to do.
    """
    fix = "delete it (or its cache directory) and rerun: netmend recomputes what is missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error types (and OSError)
        raise CacheRecordError(
            f"cannot read {path} as a safetensors file ({type(exc).__name__}: {exc}); it is "
            f"damaged or truncated: {fix}"
        ) from None
    meta_json = header.get(_META_KEY, "{}")
    stored = header.get(_SETTINGS_KEY, "")
    if header.get(_CHECKSUM_KEY) != _checksum(tensors, meta_json, stored):
        what = "no checksum" if _CHECKSUM_KEY not in header else "a wrong checksum"
        raise CacheRecordError(
            f"{path} has {what}: its tensors or metadata were changed after netmend wrote it "
            f"(or an older netmend wrote it); it is not used: {fix}"
        )
    if settings is not None and stored != settings:
        raise CacheRecordError(
            f"{path} was written by a run with other settings or as another record (key "
            f"{stored!r}, expected {settings!r}), e.g. copied from another cache directory or "
            f"over another file; it is not used: {fix}"
        )
    try:
        meta = json.loads(meta_json)
    except json.JSONDecodeError as exc:  # pragma: no cover - the checksum covers the text
        raise CacheRecordError(f"{path}: unreadable metadata ({exc}): {fix}") from None
    return tensors, meta


def check_writable(folder: str | Path, what: str) -> None:
    """Create ``folder`` and prove that a file can be written in it, before any work: a
    read-only folder, or one under a file, otherwise failed only at the first write, after
    the work, as an internal error.

    Args:
        folder: the folder to write in (created with its parents).
        what: how the message names it (e.g. ``"--out run/"``).

    Raises:
        ValueError: it cannot be created or written to, with the reason.
    """
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".netmend-probe-"):
            pass
    except OSError as exc:
        raise ValueError(
            f"{what}: cannot write there ({exc.strerror or exc}); choose a folder you can write to"
        ) from exc


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (an existing directory) while the block runs, so
    that two processes never write one run's folder at once: two rounds of a continual repair
    resumed together would each read round N and save their own round N + 1, and one of the
    two sets of failures would be lost without a word.

    The lock is the operating system's advisory ``flock`` on the folder itself (no lock file
    is left behind, and a killed process releases it). Where ``fcntl`` does not exist
    (Windows), or the file system does not lock (Lustre without ``-o flock``, some network
    and FUSE mounts), or the folder cannot be opened for reading, the block runs unlocked,
    with a warning in the last two cases.

    Args:
        folder: the folder (it must exist: :func:`check_writable` creates it).
        what: how the message names it (e.g. ``"--out run/"``).

    Raises:
        ValueError: another process holds the lock, with what to do.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    why_unlocked = None  # the block runs outside the except clauses: its own errors unchained
    fd = -1
    try:
        fd = os.open(folder, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(
            f"{what}: another netmend process is writing to this folder (a run, or a "
            "--resume of it); wait for it to end, or choose another folder"
        ) from None
    except OSError as exc:  # unreadable folder; ENOSYS, EOPNOTSUPP, ENOLCK: no locking there
        if fd < 0:
            why_unlocked = f"the folder cannot be opened: {exc.strerror or exc}"
        else:
            why_unlocked = f"its file system does not lock: {exc.strerror or exc}"
            os.close(fd)
    if why_unlocked is not None:
        warn(
            f"{what}: running without the folder lock ({why_unlocked}): do not run two "
            "netmend processes on this folder at once"
        )
        yield
        return
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (missing parent folders are created);
    ``indent=None`` writes it compactly (large benchmark records)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")

    _atomic_write(path, write)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (missing parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    _atomic_write(path, write)


# ----------------------------------------------------------------------------- the run cache


def _differences(a: Any, b: Any, where: str, limit: int = 3) -> list[tuple[str, Any, Any]]:
    """Where two JSON values differ, down to the first differing leaves (at most ``limit``):
    ``options.valid[1]`` rather than two long values cut at the same prefix."""
    out: list[tuple[str, Any, Any]] = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:  # absent, not None: said as such
                out.append((f"{where}.{k}", a.get(k, "(absent)"), b.get(k, "(absent)")))
            elif a[k] != b[k]:
                out += _differences(a[k], b[k], f"{where}.{k}", limit - len(out))
            if len(out) >= limit:
                break
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                out += _differences(x, y, f"{where}[{i}]", limit - len(out))
            if len(out) >= limit:
                break
    return out or [(where, a, b)]  # 1 against 1.0, or a leaf: the values themselves


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
            differing fields), or files that are not a netmend cache, or another live process
            is using it with other settings (its lock file ``DIR/.lock``).
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
        self.settings_hash = settings_hash(self.settings)
        self._verified: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
        self._unlock: Callable[[], Any] = lambda: None  # rank 0 (or a lone process) locks
        _on_rank0(lambda: self._prepare(overwrite))

    def _prepare(self, overwrite: bool) -> None:
        """Create or check the directory and lock it (rank 0 only, under ``torch.distributed``:
        it holds the lock for the group)."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"cache_dir {str(self.path)!r} is a file; pass a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        _acquire_lock(self.path, self.settings_hash)
        self._unlock = weakref.finalize(self, _release_lock, self.path)
        try:
            self._open(overwrite)
        except BaseException:
            self._unlock()  # refused: leave no lock behind
            raise

    def close(self) -> None:
        """Release the directory's lock now (otherwise when this object is garbage-collected
        or the process ends)."""
        self._unlock()

    def _open(self, overwrite: bool) -> None:
        for tmp in self.path.glob(".*.tmp"):  # left by a run killed while writing
            tmp.unlink(missing_ok=True)
        try:
            stored = self._stored_settings()
        except ValueError:  # garbled: what overwrite replaces (the message advised it)
            if not overwrite:
                raise
            stored = {"garbled": True}
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
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"{f} is not valid JSON ({exc}); delete {str(self.path)!r} or pass "
                "overwrite_cache=True"
            ) from None

    def _mismatch_message(self, stored: Mapping[str, Any]) -> str:
        keys = sorted(set(stored) | set(self.settings))
        diff = [k for k in keys if stored.get(k) != self.settings.get(k)]
        parts = ", ".join(
            ", ".join(
                f"{where} ({_short(a)} there, {_short(b)} here)"
                for where, a, b in _differences(stored.get(k), self.settings.get(k), k)
            )
            for k in diff
        )
        return (
            f"cache_dir {str(self.path)!r} holds a run with different settings: {parts}. "
            "Results of different runs are never mixed: pass another cache_dir, or delete "
            "this one (or pass overwrite_cache=True) to replace it."
        )

    def clear(self) -> None:
        """Delete this cache's files (settings, safetensors, temporaries); keep the directory."""
        self._verified.clear()
        for p in self.path.iterdir():
            if p.name == LOCK_FILE:
                continue
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
        """Whether a **valid** record ``name`` is stored.

        A record that fails its checksum or carries other settings is deleted with a warning
        naming the file, and reported missing, so the run recomputes it.
        """
        path = self.file(name)
        if not path.exists():
            return False
        try:
            self._verified[name] = load_tensors(path, self._record_key(name))
        except CacheRecordError as exc:
            # said once, as a warning (a log line as well made the CLI print it twice)
            warn(f"{exc.args[0].split(': delete')[0]}; recomputing it")
            if _ranks()[0] == 0:  # under torch.distributed rank 0 deletes; all recompute
                path.unlink(missing_ok=True)
            return False
        return True

    def save(
        self, name: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None
    ) -> None:
        """Write the record ``name`` atomically, with its checksum and the settings hash
        (rank 0 only, under ``torch.distributed``; every rank waits for it)."""
        self._verified.pop(name, None)
        _on_rank0(lambda: save_tensors(self.file(name), tensors, meta, self._record_key(name)))

    def _record_key(self, name: str) -> str:
        """The settings hash and the record's own name, both checksummed: a record copied
        over another of the same run is not reused either (found by an outside-in trial)."""
        return f"{self.settings_hash}/{name}"

    def load(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Read the record ``name``: ``(tensors, meta)``, verified.

        Raises:
            CacheRecordError: the record is damaged or from other settings (use :meth:`has`
                first to have it discarded and recomputed instead).
        """
        if name in self._verified:
            return self._verified.pop(name)
        return load_tensors(self.file(name), self._record_key(name))

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

    @contextlib.contextmanager
    def activated(self, scope: str) -> Iterator[RunCache]:
        """Make this cache the active one (for :func:`map_chunks`) under ``scope``."""
        token = _ACTIVE.set((self, scope))
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


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


# ----------------------------------------------------------------------------- the lock

_HELD: dict[Path, int] = {}  # lock files this process holds -> number of open RunCaches


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read_lock(lock: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(lock.read_text()))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, TypeError, ValueError):
        return {}  # half-written or foreign: treated as stale below


def _acquire_lock(path: Path, settings: str) -> None:
    """Take ``path/.lock`` for this process (see the module docstring).

    Raises:
        ValueError: a live process holds the lock with other settings.
    """
    lock = (path / LOCK_FILE).resolve()
    if lock in _HELD:
        _HELD[lock] += 1  # this process already holds it; settings.json guards the settings
        return
    body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "settings": settings})
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except PermissionError as exc:
            raise ValueError(
                f"cache_dir {str(path)!r} is not writable ({exc.strerror}): a run writes its "
                "lock and records there, even to reuse them. Pass a writable cache_dir (copy "
                "the cache there to reuse it)"
            ) from exc
        except FileExistsError:
            held = _read_lock(lock)
            if held is None:
                continue  # released meanwhile: try again
            pid = held.get("pid")
            other_host = held.get("host") not in (None, socket.gethostname())
            alive = isinstance(pid, int) and (other_host or _pid_alive(pid))
            if not alive:
                log.warning("taking over the stale lock %s of dead process %s", lock, pid)
                lock.unlink(missing_ok=True)
                continue
            if held.get("settings") == settings:
                return  # a live process with the same settings: its records are ours too
            raise ValueError(
                f"cache_dir {str(path)!r} is in use by process {pid} on {held.get('host')} with "
                f"other settings (lock file {lock}). Two runs with different settings never "
                "share a directory: wait for it to finish, or pass another cache_dir. If that "
                "process is gone, delete the lock file."
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(body)
        _HELD[lock] = 1
        return
    raise ValueError(f"could not take the lock {lock}: another process keeps taking it")


def _release_lock(path: Path) -> None:
    lock = (path / LOCK_FILE).resolve()
    if lock not in _HELD:
        return
    _HELD[lock] -= 1
    if _HELD[lock] > 0:
        return
    del _HELD[lock]
    held = _read_lock(lock)
    if held is not None and held.get("pid") == os.getpid():
        lock.unlink(missing_ok=True)
