"""Worker processes for tests/test_distributed.py (started with the ``spawn`` method).

Each worker joins a gloo process group (file rendezvous, short timeout), runs netmend on the
problem the test saved, and writes what it saw to ``OUT/rank<r>.pt``.
"""

from __future__ import annotations

import copy
import datetime
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

METHODS: dict[str, dict[str, Any]] = {
    "ewc": {},
    "grad_dot": {},
    "linear": {},
    "influence": {},
}
"""Methods (and options) scored in 1 and 2 processes; ``ewc`` also with the automatic K."""
CHUNK = 16
TIMEOUT_S = 20.0


def _join(rank: int, size: int, rendezvous: str, timeout_s: float = TIMEOUT_S) -> None:
    torch.set_num_threads(1)
    os.environ.pop("WORLD_SIZE", None)  # the group is handed over initialised, not from env
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def score_all(problem: dict[str, Any], cache_dir: str | None = None) -> dict[str, torch.Tensor]:
    """Scores of every method in :data:`METHODS` (and ewc's causes, culprits and a fit)."""
    import netmend
    from netmend.model.training import TrainConfig, fit

    model, train, fail = problem["model"], problem["train"], problem["failures"]
    out: dict[str, torch.Tensor] = {}
    for name, opts in METHODS.items():
        r = netmend.identify(
            model, train, fail, name, k=5, chunk_size=CHUNK, progress=False, **opts
        )
        out[name] = torch.as_tensor(r.scores)
    # a map-style Dataset: read batch by batch (each rank reads its own chunks only)
    ds = torch.utils.data.TensorDataset(*train)
    r = netmend.identify(model, ds, fail, "ewc", k=5, chunk_size=CHUNK, progress=False)
    out["ewc_dataset"] = torch.as_tensor(r.scores)
    auto = netmend.identify(model, train, fail, chunk_size=CHUNK, progress=False)
    out["ewc_auto_causes"] = torch.as_tensor(auto.causes)
    out["ewc_per_failure"] = torch.as_tensor(auto.per_failure)
    clone = copy.deepcopy(problem["fresh"])
    fit(clone, *train, TrainConfig(epochs=2, batch_size=25), seed=3, progress=False)
    out["fit"] = torch.cat([p.detach().reshape(-1) for p in clone.parameters()])
    if cache_dir is not None:
        first = netmend.identify(
            model, train, fail, k=5, chunk_size=CHUNK, progress=False, cache_dir=cache_dir
        )
        again = netmend.identify(
            model, train, fail, k=5, chunk_size=CHUNK, progress=False, cache_dir=cache_dir
        )
        out["cached_first"] = torch.as_tensor(first.scores)
        out["cached_again"] = torch.as_tensor(again.scores)
        out["cache_reused"] = torch.tensor(len(again.info["cache"]["results_reused"]))
    return out


def equal_scores(rank: int, size: int, rendezvous: str, problem_file: str, out: str) -> None:
    """Score with every method under a 2-process group; write the results of this rank."""
    _join(rank, size, rendezvous)
    problem = torch.load(problem_file, weights_only=False)
    cache_dir = str(Path(out) / "cache")
    res = score_all(problem, cache_dir)
    from netmend.data import distributed

    res["world"] = torch.tensor(distributed.world())
    torch.save(res, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


STALL_TIMEOUT_S = 8.0
"""The group's timeout in :func:`failing` (a stalled rank is given up on after it)."""


def failing(rank: int, size: int, rendezvous: str, out: str, mode: str) -> None:
    """Rank 1 fails inside a pass: first with an exception, then by ``mode``: "hard" (the
    process dies) or "stall" (it stops responding, then dies after the timeout has passed).

    Every rank records the exception it saw (type and message) and how long it waited.
    """
    from netmend.data.streaming import map_chunks

    _join(rank, size, rendezvous, STALL_TIMEOUT_S)
    seen: dict[str, Any] = {}

    def soft(s: slice) -> torch.Tensor:
        if rank == 1 and s.start >= 50:
            raise ValueError("chunk exploded on purpose")
        return torch.ones(s.stop - s.start)

    def hard(s: slice) -> torch.Tensor:
        if rank == 1:
            if mode == "stall":
                time.sleep(STALL_TIMEOUT_S + 10)
            os._exit(3)
        return torch.ones(s.stop - s.start)

    for name, fn in (("soft", soft), (mode, hard)):
        t0 = time.monotonic()
        try:
            map_chunks(101, 10, fn, desc=name)
            seen[name] = ("no error", "", time.monotonic() - t0)
        except BaseException as exc:  # noqa: BLE001 - recorded for the test
            seen[name] = (
                type(exc).__name__,
                f"{exc}\n{traceback.format_exc()}",
                time.monotonic() - t0,
            )
        torch.save(seen, Path(out) / f"rank{rank}.pt")


def rank_differences(rank: int, size: int, rendezvous: str, problem_file: str, out: str) -> None:
    """Rank 1 holds one thing different at a time (a BatchNorm-like buffer, labels or images
    of the same shape, the seed, a per-rank cache folder); every rank records the error it
    got. Then a Repairer saved and at once loaded on every rank, and the warnings each rank
    raised."""
    import warnings

    import netmend

    _join(rank, size, rendezvous)
    problem = torch.load(problem_file, weights_only=False)
    model, (X, y), fail = problem["model"], problem["train"], problem["failures"]
    seen: dict[str, Any] = {}

    def differing(what: str) -> dict[str, Any]:
        m, Xr, yr, kw = model, X, y, {}
        if rank == 1:
            if what == "buffer":
                m = copy.deepcopy(model)
                m.register_buffer("stat", torch.ones(1))  # e.g. BatchNorm's running mean
            elif what == "labels":
                yr = y.clone()
                yr[:5] = (yr[:5] + 1) % 3
            elif what == "images":
                Xr = X.flip(0)
            elif what == "seed":
                kw["seed"] = 1
            elif what == "cache":
                kw["cache_dir"] = str(Path(out) / "cache_rank1")
        if rank == 0 and what == "buffer":
            m = copy.deepcopy(model)
            m.register_buffer("stat", torch.zeros(1))
        if what == "cache" and rank == 0:
            kw["cache_dir"] = str(Path(out) / "cache_rank0")
        return {"model": m, "train": (Xr, yr), "kw": kw}

    for what in ("buffer", "labels", "images", "seed", "cache"):
        d = differing(what)
        try:
            netmend.identify(d["model"], d["train"], fail, k=5, chunk_size=CHUNK,
                             progress=False, **d["kw"])  # fmt: skip
            seen[what] = "no error"
        except ValueError as exc:
            seen[what] = str(exc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = netmend.Repairer(model, (X, y), k=5, chunk_size=CHUNK, progress=False,
                               train_config=netmend.TrainConfig(epochs=1))  # fmt: skip
        rep.observe(fail)
        state = Path(out) / "state"
        rep.save(state)
        again = netmend.Repairer.load(
            state,
            model,
            (X, y),
            k=5,
            chunk_size=CHUNK,
            progress=False,
            train_config=netmend.TrainConfig(epochs=1),
        )
        seen["loaded_causes"] = again.causes.tolist()
        seen["saved_causes"] = rep.causes.tolist()
        some_right = fail[1].clone()
        some_right[:2] = (some_right[:2] - 1) % 3  # the model's own predictions: 2 not failures
        netmend.identify(model, (X, y), (fail[0], some_right), k=5, progress=False)
    seen["warnings"] = [str(w.message) for w in caught]
    torch.save(seen, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()
