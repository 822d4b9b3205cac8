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
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from netmend._version import __version__

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
