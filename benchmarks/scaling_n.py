"""Time and peak memory of netmend's default identification in N, the data streamed.

Usage (from the repository root)::

    nice -n 5 .venv/bin/python benchmarks/scaling_n.py [--sizes 10000,60000,600000]
        [--out benchmarks/scaling_n.json]

The training set is never materialised: ``TiledMNIST(n)`` is a map-style ``Dataset`` over the
60k MNIST training images held once (float32, 188 MB whatever ``n``); item ``i`` is image
``i mod 60000`` shifted by one pixel in a direction set by its tile ``i // 60000`` (tile 0 is
the image itself), so 600k examples are 10 differently augmented copies. netmend reads it
through a :class:`netmend.data.source.DataSource`, chunk by chunk.

For each ``n``, in a fresh process (so its peak RSS, ``VmHWM`` of ``/proc/self/status``, is
its own), one thread: ``netmend.identify(model, TiledMNIST(n), failures, k=100)`` with the
defaults ("ewc": the automatic ``l2`` from the summed diagonal Fisher, the fit of
``theta_+F`` on the failures, the log-likelihood passes; ``k`` an int so the automatic K's two
extra scorings are left out). The model is the ``benchmarks/scaling.py`` MLP 784-1024-256-10
(1,068,810 parameters) trained for one epoch on 10k images; the failures are the first 1,000
misclassified test images. Recorded per ``n``: wall and process CPU seconds, per example, the
peak RSS and the RSS after loading (before ``identify``).

The machine is shared with other users: wall time moves with their load (the load average is
recorded before and after each run); CPU seconds per example are the figure to compare.
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

import torch
from torch.utils.data import Dataset

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work" / "scaling_n"
HIDDEN = (1024, 256)
FAILURES = 1000
PREP_TRAIN = 10_000
SHIFTS = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)]


class TiledMNIST(Dataset):
    """``n`` examples over a base set ``[B, ...]``: item ``i`` is ``X[i % B]`` rolled by the
    pixel shift of tile ``i // B`` (no copy of the tiled set is ever made)."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, n: int) -> None:
        self.X, self.y, self.n = X, y, int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        b, t = i % len(self.y), i // len(self.y)
        x = self.X[b]
        if t:
            dy, dx = SHIFTS[1 + (t - 1) % (len(SHIFTS) - 1)]
            x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
        return x, self.y[b]


def status_mib() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(line.split()[1]) / 1024
    return out


def prepare() -> None:
    from netmend.lab.datasets import load_mnist
    from netmend.lab.models import MLP
    from netmend.model.training import TrainConfig, fit, predict

    torch.set_num_threads(1)
    train, test = load_mnist()
    torch.manual_seed(0)
    model = MLP(784, 10, HIDDEN)
    fit(model, train.X[:PREP_TRAIN], train.y[:PREP_TRAIN], TrainConfig(epochs=1), progress=False)
    wrong = (predict(model, test.X) != test.y).nonzero().squeeze(1)[:FAILURES]
    WORK.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state": model.state_dict(), "Xf": test.X[wrong], "yf": test.y[wrong]},
        WORK / "problem.pt",
    )


def worker(n: int, out: Path) -> None:
    import netmend
    from netmend.lab.datasets import load_mnist
    from netmend.lab.models import MLP

    torch.set_num_threads(1)
    d = torch.load(WORK / "problem.pt", weights_only=True)
    model = MLP(784, 10, HIDDEN)
    model.load_state_dict(d["state"])
    model.eval()
    train, _ = load_mnist()
    data = TiledMNIST(train.X, train.y, n)
    before = status_mib()
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    ident = netmend.identify(
        model, data, (d["Xf"], d["yf"]), k=100, seed=0, device="cpu", progress=False,
        chunk_size=256,
    )  # fmt: skip
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    after = status_mib()
    rec: dict[str, Any] = {
        "n": n,
        "method": ident.method,
        "params": sum(p.numel() for p in model.parameters()),
        "failures": int(d["yf"].numel()),
        "seconds": wall,
        "cpu_seconds": cpu,
        "seconds_per_example_ms": 1e3 * wall / n,
        "cpu_per_example_ms": 1e3 * cpu / n,
        "rss_before_identify_mib": before["VmRSS"],
        "peak_rss_mib": after["VmHWM"],
        "peak_above_loaded_mib": after["VmHWM"] - before["VmRSS"],
        "tiled_data_if_in_memory_mib": n * 784 * 4 / 2**20,
        "load": [load0, os.getloadavg()[0]],
        "checksum_scores_sum": float(ident.scores.sum()),
    }
    out.write_text(json.dumps(rec))


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per N: CPU per example and peak RSS over the smallest N's, and the CPU time predicted by
    the straight line ``a + b N`` through the two smallest N (a: the fixed cost, e.g. the fit
    on the failures) over the measured one: 1 when the time is linear in N."""
    ns = sorted(runs, key=int)
    first = runs[ns[0]]
    out: dict[str, Any] = {}
    if len(ns) >= 2:
        n0, n1 = int(ns[0]), int(ns[1])
        c0, c1 = runs[ns[0]]["cpu_seconds"], runs[ns[1]]["cpu_seconds"]
        b = (c1 - c0) / (n1 - n0)
        out["line_through_two_smallest"] = {
            "fixed_cpu_s": c0 - b * n0,
            "cpu_ms_per_example": 1e3 * b,
        }
    for k in ns:
        r = runs[k]
        row = {
            "cpu_per_example_over_smallest": r["cpu_per_example_ms"] / first["cpu_per_example_ms"],
            "peak_rss_over_smallest": r["peak_rss_mib"] / first["peak_rss_mib"],
        }
        if "line_through_two_smallest" in out and k not in ns[:2]:  # those define the line
            line = out["line_through_two_smallest"]
            pred = line["fixed_cpu_s"] + 1e-3 * line["cpu_ms_per_example"] * int(k)
            row["measured_over_line"] = r["cpu_seconds"] / pred
        out[k] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(HERE / "scaling_n.json"))
    ap.add_argument("--sizes", default="10000,60000,600000")
    ap.add_argument("--worker", nargs=2, metavar=("N", "OUT"))
    ap.add_argument("--resummarize", action="store_true", help="recompute --out's summary")
    args = ap.parse_args()
    if args.resummarize:
        from netmend.store import write_json_atomic

        result = json.loads(Path(args.out).read_text())
        result["summary"] = summarize(result["runs"])
        write_json_atomic(args.out, result)
        return
    if args.worker:
        worker(int(args.worker[0]), Path(args.worker[1]))
        return
    from netmend.lab.demo import machine
    from netmend.store import write_json_atomic

    torch.set_num_threads(1)
    prepare()
    runs = {}
    for n in [int(s) for s in args.sizes.split(",")]:
        tmp = WORK / f"run_{n}.json"
        subprocess.run([sys.executable, __file__, "--worker", str(n), str(tmp)], check=True)
        runs[str(n)] = json.loads(tmp.read_text())
        print(json.dumps(runs[str(n)]), flush=True)
    result = {
        "machine": machine(),
        "shared_machine": True,
        "command": " ".join(sys.argv),
        "model": f"MLP 784-{HIDDEN[0]}-{HIDDEN[1]}-10, trained 1 epoch on {PREP_TRAIN} images",
        "data": "TiledMNIST: the 60k MNIST training images, tile t shifted by one pixel; read "
        "through a DataSource (map-style Dataset), never materialised",
        "call": "netmend.identify(model, TiledMNIST(n), failures, k=100, chunk_size=256) "
        "(default method, automatic l2), one thread",
        "runs": runs,
        "summary": summarize(runs),
    }
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
