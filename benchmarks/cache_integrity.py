"""What the cache's checksums cost: checked vs plain safetensors writes and reads, same run.

Usage: .venv/bin/python benchmarks/cache_integrity.py [--out benchmarks/cache_integrity.json]

For records the size of a run's on MNIST (60,000 training examples): the scores ``[N]``
float64, a pass over the training set ``[N]`` float32, per-failure scores ``[N, 100]``
float32. Each is written with ``netmend.store.save_tensors`` (checksum and settings hash in the
header) and read with ``netmend.store.load_tensors`` (checksum verified). The controls are
the same files written with ``safetensors.torch.save_file`` plus an fsync and rename (what
``save_tensors`` did before) and read with ``safe_open`` without verification (then summed,
so that both reads touch every byte). The median of
``--repeats`` runs is reported, with the checked/plain ratio. The machine is shared, so
absolute times are noisy; the ratios are measured in the same process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from netmend import store
from netmend.lab.demo import machine

N = 60_000


def _plain_save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"netmend": "{}"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _plain_load(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for t in tensors.values():  # touch the bytes (a lazily mapped read would cost nothing)
        t.clone()
    return tensors


def _median(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _measure(
    folder: Path, tensors: dict[str, torch.Tensor], settings: str, repeats: int
) -> dict[str, object]:
    checked, plain = folder / "checked.safetensors", folder / "plain.safetensors"
    row: dict[str, float | bool] = {
        "megabytes": sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6,
        "write_checked_s": _median(
            lambda: store.save_tensors(checked, tensors, {"done": N}, settings), repeats
        ),
        "write_plain_s": _median(lambda: _plain_save(plain, tensors), repeats),
        "read_checked_s": _median(lambda: store.load_tensors(checked, settings), repeats),
        "read_plain_s": _median(lambda: _plain_load(plain), repeats),
    }
    back, _ = store.load_tensors(checked, settings)
    row["round_trip_equal"] = all(torch.equal(back[k], v) for k, v in tensors.items())
    row["write_ratio"] = row["write_checked_s"] / row["write_plain_s"]
    row["read_ratio"] = row["read_checked_s"] / row["read_plain_s"]
    row["checked_read_megabytes_per_s"] = float(row["megabytes"]) / row["read_checked_s"]
    return dict(row)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/cache_integrity.json")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    # one intra-op thread: with the cores shared, torch's thread pool makes a 0.2 MB copy cost
    # 20 ms (the test suite does the same, tests/conftest.py)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    records = {
        "scores [60000] float64": {"scores": torch.randn(N, generator=g, dtype=torch.float64)},
        "pass [60000] float32": {"value": torch.randn(N, generator=g)},
        "per_failure [60000, 100] float32": {"scores": torch.randn(N, 100, generator=g)},
    }
    settings = store.settings_hash({"bench": 1})
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        for name, tensors in records.items():
            rows[name] = _measure(Path(d), tensors, settings, args.repeats)
    out = {"machine": machine(), "repeats": args.repeats, "records": rows}
    store.write_json_atomic(args.out, out)
    print(out)


if __name__ == "__main__":
    main()
