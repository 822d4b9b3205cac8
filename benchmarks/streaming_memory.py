"""Peak memory of ``netmend.identify`` on a disk-backed Dataset of 100k vs 1M 28x28 images.

Usage: .venv/bin/python benchmarks/streaming_memory.py [--out benchmarks/streaming_memory.json]
       [--sizes 100000 1000000] [--scratch /tmp/netmend_streaming]

A preparation subprocess writes 1M synthetic 28x28 ``uint8`` images (784 MB, a raw
``numpy.memmap`` file) and their labels to a scratch directory (never committed): ten fixed
random templates plus uniform noise, labels uniform over 10 classes. It trains a logistic
regression briefly on 5k of them (memory does not depend on accuracy) and takes as the
failures 200 held-out images with labels the model gets wrong (their predicted class shifted
by one; for memory only their number matters).

Each measurement runs in a FRESH subprocess (the parent imports neither torch nor numpy: on
Linux a child's ``ru_maxrss`` starts at its parent's resident size). The training set is a
map-style ``Dataset`` that reads each image from the file with ``os.pread`` in
``__getitem__`` (how an image-folder Dataset works). Not through ``np.memmap`` indexing: the
pages of a mapping that a pass touches stay resident and count in the process's RSS (as
file-backed pages the kernel may drop), so a memmap Dataset's ``ru_maxrss`` grows with the
file whatever netmend keeps. The subprocess records its resident memory just
before ``identify`` (baseline: Python, torch, the model, the labels) and the peak
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after it. The identification is the default
one: "ewc" with the automatic ``l2`` and ``k`` (8 passes over the training set), chunk 1024,
CPU, one thread.

Control, same run: the in-memory path on 1M (the same pixels as one ``uint8`` tensor
``(X, y)``, 784 MB), which must grow by about the data; and the float copy that
``as_tensors`` would have needed before streaming (``N * 784 * 4`` bytes), as a number.
Timings are perturbed by other processes sharing the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SIDE = 28
PIX = SIDE * SIDE
CLASSES = 10
TRAIN_FIT = 5_000
FAILURES = 200
HERE = Path(__file__).resolve().parent


def prepare(scratch: Path, n: int) -> None:
    """Write ``n`` images + labels, a trained model and the failures to ``scratch``."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from netmend.lab.models import LogisticRegression
    from netmend.model.training import TrainConfig, fit, predict

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    templates = rng.integers(0, 160, size=(CLASSES, PIX), dtype=np.uint8)
    total = n + FAILURES
    labels = rng.integers(0, CLASSES, size=total).astype(np.uint8)
    images = np.memmap(scratch / "images.u8", dtype=np.uint8, mode="w+", shape=(total, PIX))
    for i in range(0, total, 20_000):
        y = labels[i : i + 20_000]
        images[i : i + len(y)] = templates[y] + rng.integers(0, 96, (len(y), PIX), np.uint8)
    images.flush()
    del images
    labels.tofile(scratch / "labels.u8")
    X = np.fromfile(scratch / "images.u8", dtype=np.uint8, count=TRAIN_FIT * PIX)
    Xt = torch.from_numpy(X.reshape(TRAIN_FIT, 1, SIDE, SIDE))
    model = LogisticRegression(PIX, CLASSES)
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1.0, batch_size=128, lr=1e-3)
    fit(model, Xt, torch.from_numpy(labels[:TRAIN_FIT].astype(np.int64)), cfg, 0, "cpu", False)
    raw = np.fromfile(scratch / "images.u8", dtype=np.uint8, offset=n * PIX, count=FAILURES * PIX)
    Xf = torch.from_numpy(raw.reshape(FAILURES, 1, SIDE, SIDE).copy())
    yf = (predict(model, Xf) + 1) % CLASSES
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, scratch / "model.st")
    save_file({"Xf": Xf, "yf": yf}, scratch / "failures.st")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(scratch: Path, n: int, storage: str) -> dict[str, Any]:
    """One identify run in this (fresh) process; returns the figures."""
    import resource

    import numpy as np
    import torch
    from safetensors.torch import load_file
    from torch.utils.data import Dataset

    import netmend
    from netmend.lab.demo import machine
    from netmend.lab.models import LogisticRegression

    torch.set_num_threads(1)
    labels = np.fromfile(scratch / "labels.u8", dtype=np.uint8, count=n)

    class DiskImages(Dataset):
        """Image ``i`` read from the file with ``os.pread`` (nothing mapped, nothing cached)."""

        def __init__(self, path: Path, labels: np.ndarray) -> None:
            self.path, self.labels, self.fd = path, labels, -1

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            if self.fd < 0:
                self.fd = os.open(self.path, os.O_RDONLY)
            buf = bytearray(os.pread(self.fd, PIX, i * PIX))
            x = torch.frombuffer(buf, dtype=torch.uint8).reshape(1, SIDE, SIDE)
            return x, int(self.labels[i])

    model = LogisticRegression(PIX, CLASSES)
    model.load_state_dict(load_file(scratch / "model.st"))
    model.eval()
    fail = load_file(scratch / "failures.st")
    train: Any
    if storage == "dataset":
        train = DiskImages(scratch / "images.u8", labels)
    else:
        raw = np.fromfile(scratch / "images.u8", dtype=np.uint8, count=n * PIX)
        train = (torch.from_numpy(raw.reshape(n, 1, SIDE, SIDE)), torch.from_numpy(labels))
    base = rss_mib()
    t0 = time.perf_counter()
    r = netmend.identify(
        model, train, (fail["Xf"], fail["yf"]), chunk_size=1024, progress=False, device="cpu"
    )
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "n": n,
        "storage": storage,
        "method": "ewc (default: auto l2, auto k)",
        "k": int(len(r.causes)),
        "baseline_rss_mib": round(base, 1),
        "peak_rss_mib": round(peak, 1),
        "increment_mib": round(peak - base, 1),
        "seconds": round(seconds, 1),
        "float_copy_mib_avoided": round(n * PIX * 4 / 2**20, 1),
        "machine": machine(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "streaming_memory.json"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--scratch", default="/tmp/netmend_streaming")
    ap.add_argument("--no-control", action="store_true", help="skip the in-memory control")
    ap.add_argument("--_prepare", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    scratch = Path(args.scratch)
    if args._prepare:
        prepare(scratch, args._prepare)
        return
    if args._measure:
        print(json.dumps(measure(scratch, int(args._measure[0]), args._measure[1])))
        return
    scratch.mkdir(parents=True, exist_ok=True)
    biggest = max(args.sizes)
    done = scratch / "images.u8"
    if not done.exists() or done.stat().st_size < (biggest + FAILURES) * PIX:
        subprocess.run([sys.executable, __file__, "--scratch", str(scratch), "--_prepare",
                        str(biggest)], check=True)  # fmt: skip
    runs = [(n, "dataset") for n in sorted(args.sizes)]
    if not args.no_control:
        runs.append((biggest, "memory"))
    results = []
    for n, storage in runs:
        out = subprocess.run(
            [sys.executable, __file__, "--scratch", str(scratch), "--_measure", str(n), storage],
            check=True,
            capture_output=True,
            text=True,
        )
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps({k: v for k, v in res.items() if k != "machine"}), flush=True)
        results.append(res)
    ds = {r["n"]: r for r in results if r["storage"] == "dataset"}
    small, big = ds[min(ds)], ds[max(ds)]
    summary = {
        "peak_ratio_big_vs_small": round(big["peak_rss_mib"] / small["peak_rss_mib"], 3),
        "data_on_disk_mib_big": round(big["n"] * PIX / 2**20, 1),
        "claim": "peak RSS of the Dataset run at the largest N <= 1.2x that at the smallest",
        "holds": big["peak_rss_mib"] <= 1.2 * small["peak_rss_mib"],
    }
    print(json.dumps(summary))
    git = ["git", "-C", str(HERE)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run([*git, "status", "--porcelain", "src"], capture_output=True, text=True)
    summary["commit"] = commit.strip() + (" (src modified)" if dirty.stdout.strip() else "")
    Path(args.out).write_text(
        json.dumps({"summary": summary, "runs": results, "script": __doc__}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
