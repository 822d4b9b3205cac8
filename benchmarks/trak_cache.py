"""TRAK's Gaussian projection kept whole against regenerated for every chunk (same scores).

``trak`` with ``projection="gaussian"`` (the default when ``P > proj_dim``) keeps its seeded
``[P, k]`` matrix ``R`` when it fits ``trak.CACHE_BYTES``; otherwise every chunk of examples
regenerates it block by block. Until this round the budget counted entries (2^25), so a
float32 ``R`` of dattri's MNIST MLP at ``k = 512`` (109,386 × 512 = 56M entries, 224 MB) was
regenerated for every chunk. This script times ``identify(..., "trak")`` both ways on that
shape: the MLP 784-128-64-10, the first 5,000 MNIST training images, 500 test images as
failures, three checkpoints (independently initialised models: the timing does not depend
on training), ``proj_dim`` 512, chunks of 500, one thread; and checks that the scores agree.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trak_cache.py      # ~3 min
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import netmend
from netmend.identification import trak as trak_mod
from netmend.lab.datasets import load_mnist
from netmend.lab.demo import machine
from netmend.store import write_json_atomic


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
        nn.Linear(64, 10),
    ).eval()  # fmt: skip


def run(cache_bytes: int, models: list[nn.Module], data: Any, fails: Any) -> dict[str, Any]:
    """One ``identify`` with ``CACHE_BYTES`` set to ``cache_bytes``: CPU/wall s and scores."""
    saved = trak_mod.CACHE_BYTES
    trak_mod.CACHE_BYTES = cache_bytes
    try:
        t, c = time.perf_counter(), time.process_time()
        ident = netmend.identify(
            models[0], data, fails, "trak", k=10, proj_dim=512, projection="gaussian",
            checkpoints=[m.state_dict() for m in models], chunk_size=500, device="cpu",
            progress=False, seed=0,
        )  # fmt: skip
        return {
            "cpu_s": time.process_time() - c,
            "wall_s": time.perf_counter() - t,
            "per_failure": np.asarray(ident.per_failure, dtype=np.float64),
        }
    finally:
        trak_mod.CACHE_BYTES = saved


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/trak_cache.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    # untrained models: some "failures" are classified correctly, which identify warns about
    warnings.filterwarnings("ignore", message=".*already classified correctly")
    tr, te = load_mnist()
    data = (((tr.X[:5000] - 0.1307) / 0.3081).contiguous(), tr.y[:5000].contiguous())
    fails = (((te.X[:500] - 0.1307) / 0.3081).contiguous(), te.y[:500].contiguous())
    models = [mlp(s) for s in range(a.models)]
    P = sum(q.numel() for q in models[0].parameters())
    regenerated = run(0, models, data, fails)
    kept = run(trak_mod.CACHE_BYTES, models, data, fails)
    diff = np.abs(kept["per_failure"] - regenerated["per_failure"]).max()
    scale = np.abs(regenerated["per_failure"]).max()
    doc = {
        "what": __doc__.split("\n")[0],
        "parameters": P,
        "proj_dim": 512,
        "r_bytes_float32": P * 512 * 4,
        "r_mib_float32": round(P * 512 * 4 / 2**20),
        "cache_bytes": trak_mod.CACHE_BYTES,
        "models": a.models,
        "regenerated": {k: v for k, v in regenerated.items() if k != "per_failure"},
        "kept": {k: v for k, v in kept.items() if k != "per_failure"},
        "speedup_cpu": regenerated["cpu_s"] / kept["cpu_s"],
        "max_abs_score_difference_relative": float(diff / scale),
        "machine": machine(),
    }
    print({k: v for k, v in doc.items() if k != "machine"})
    write_json_atomic(a.out, doc)


if __name__ == "__main__":
    main()
