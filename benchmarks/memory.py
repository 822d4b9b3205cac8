"""Peak memory of ``netmend.identify`` on 10k, 30k and 60k MNIST training examples.

Usage: .venv/bin/python benchmarks/memory.py [--out benchmarks/memory.json]

The parent process loads MNIST once, trains the demo's SmallCNN briefly (memory does not
depend on accuracy), picks a fixed set of test examples it gets wrong as the failures, and
writes the model and the failures (safetensors) and the first 60k training examples (.npy)
to a scratch directory. Each measurement then runs in a FRESH subprocess, which reads only the first
``N`` training rows, records its resident memory just before ``identify`` (the baseline:
Python, torch, the model and the dataset itself) and the peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after it. ``increment = peak - baseline`` is
what netmend itself needs on top of the data. Methods: "ewc" and "linear" with default
settings (automatic ``l2`` and ``k``), on the CPU, one thread.

The parent imports neither torch nor netmend and the preparation runs in a subprocess too:
on Linux a child's ``ru_maxrss`` starts at its parent's resident size at ``fork`` (the
kernel keeps the high-water mark across ``execve``), so a big parent would mask the peaks.

Two storages of the same pixels: ``uint8`` (as MNIST ships and as torchvision keeps it; 47 MiB
at 60k; netmend converts chunk by chunk and never holds a float copy) and ``float32`` (the
pixels as floats, 180 MiB at 60k). The model starts with a fixed ``x / 255`` so both feed it
the same values. ``--storages`` picks them (default both).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SIZES = (10_000, 30_000, 60_000)
METHODS = ("ewc", "linear")
STORAGES = ("uint8", "float32")
FAILURES = 200


def make_model() -> Any:
    """The demo's SmallCNN behind a fixed ``x / 255`` (inputs are raw 0-255 pixel values)."""
    from torch import nn

    from netmend.lab.models import SmallCNN

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = SmallCNN()

        def forward(self, x: Any) -> Any:
            return self.net(x / 255.0)

    return Scaled()


def _rss_mib() -> float:
    """Current resident set size (MiB)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    """Peak resident set size of this process so far (MiB; ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _read_rows(path: Path, n: int) -> torch.Tensor:
    """The first ``n`` rows of a ``.npy`` file, read into ordinary (anonymous) memory.

    Not memory-mapped: the rows must be resident before ``identify`` so that the baseline
    includes the dataset (mapped file pages would only count once ``identify`` touched them).
    """
    import numpy as np
    import torch

    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        count = n * int(np.prod(shape[1:], dtype=np.int64))
        rows = np.fromfile(f, dtype=dtype, count=count).reshape((n, *shape[1:]))
    return torch.from_numpy(rows)


def child(scratch: Path, n: int, method: str, storage: str = "uint8") -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch

    torch.set_num_threads(1)
    from safetensors.torch import load_file

    import netmend

    X, y = _read_rows(scratch / "X.npy", n), _read_rows(scratch / "y.npy", n)
    if storage == "float32":
        X = X.float()
    fail = load_file(str(scratch / "failures.safetensors"))
    model = make_model()
    model.load_state_dict(load_file(str(scratch / "model.safetensors")))
    model.eval()
    data_mib = (X.numel() * X.element_size() + y.numel() * y.element_size()) / 2**20
    base_rss, base_peak = _rss_mib(), _peak_mib()
    t = time.perf_counter()
    res = netmend.identify(model, (X, y), (fail["X"], fail["y"]), method, progress=False,
                           device="cpu")  # fmt: skip
    seconds = time.perf_counter() - t
    peak = _peak_mib()
    return {
        "method": method,
        "storage": storage,
        "train_examples": n,
        "dataset_mib": data_mib,
        "rss_before_identify_mib": base_rss,
        "peak_before_identify_mib": base_peak,
        "peak_mib": peak,
        "increment_mib": peak - base_rss,
        "seconds": seconds,
        "causes": int(res.causes.size),
    }


def prepare(scratch: Path) -> dict[str, Any]:
    """Train briefly, choose the failures, write everything the children read."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from netmend.lab.datasets import load_mnist
    from netmend.lab.demo import machine
    from netmend.model.training import TrainConfig, fit, predict

    torch.set_num_threads(1)
    train, test = load_mnist()
    Xtr = (train.X[: max(SIZES)] * 255).round().to(torch.uint8)  # the pixels as MNIST ships them
    Xte = (test.X * 255).round().to(torch.uint8)
    torch.manual_seed(0)
    model = make_model()
    fit(model, Xtr[:5000], train.y[:5000], TrainConfig(epochs=1.0), seed=0, progress=False)
    model.eval()
    wrong = torch.nonzero(predict(model, Xte) != test.y).squeeze(1)[:FAILURES]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(scratch / "model.safetensors"))  # fmt: skip
    np.save(scratch / "X.npy", Xtr.numpy())
    np.save(scratch / "y.npy", train.y[: max(SIZES)].numpy())
    save_file({"X": Xte[wrong].contiguous(), "y": test.y[wrong].contiguous()},
              str(scratch / "failures.safetensors"))  # fmt: skip
    return {
        "machine": {**machine(), "torch_threads": 1},
        "failures": int(wrong.numel()),
        "failure_test_indices_first": wrong[:10].tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/memory.json")
    ap.add_argument("--child", nargs=4, metavar=("SCRATCH", "N", "METHOD", "STORAGE"))
    ap.add_argument("--prepare", metavar="SCRATCH")
    ap.add_argument("--storages", nargs="+", default=list(STORAGES), choices=STORAGES)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument(
        "--repeats", type=int, default=1, help="fresh processes per configuration (peaks vary)"
    )
    args = ap.parse_args()
    if args.child:
        scratch, n, method, storage = args.child
        print(json.dumps(child(Path(scratch), int(n), method, storage)))
        return
    if args.prepare:
        print(json.dumps(prepare(Path(args.prepare))))
        return

    def fresh(*argv: str) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, __file__, *argv], check=True, capture_output=True, text=True
        )
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        setup = fresh("--prepare", tmp)
        for storage in args.storages:
            for method in args.methods:
                for n in SIZES:
                    for _ in range(args.repeats):
                        runs.append(fresh("--child", tmp, str(n), method, storage))
                        print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for storage in args.storages:
        for method in args.methods:
            mine = [r for r in runs if r["method"] == method and r["storage"] == storage]

            def at(n: int, key: str, pick: Any, mine: list[dict[str, Any]] = mine) -> float:
                return float(pick([r[key] for r in mine if r["train_examples"] == n]))

            lo, hi = min(SIZES), max(SIZES)
            summary[f"{method}/{storage}"] = {
                # the median over the repeats, and the worst case (largest 60k peak over the
                # smallest 10k one)
                "peak_ratio_60k_over_10k": at(hi, "peak_mib", statistics.median)
                / at(lo, "peak_mib", statistics.median),
                "peak_ratio_worst": at(hi, "peak_mib", max) / at(lo, "peak_mib", min),
                "increment_ratio_60k_over_10k": at(hi, "increment_mib", statistics.median)
                / at(lo, "increment_mib", statistics.median),
                "peaks_mib": {
                    n: [r["peak_mib"] for r in mine if r["train_examples"] == n] for n in SIZES
                },  # fmt: skip
                "target_peak_ratio": 1.2,
            }
    result = {
        "machine": setup.pop("machine"),
        "setup": {
            **setup,
            "model": "x / 255 then SmallCNN, 1 epoch on 5k examples",
            "device": "cpu",
        },
        "parent_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "runs": runs,
        "summary": summary,
    }
    tmp_out = Path(args.out).with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
