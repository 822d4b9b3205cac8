"""`netmend repair` on a folder of MNIST PNGs vs the same repair through the Python API.

Writes MNIST (a subset by default: ``--n-train``/``--n-test``) as PNG files in the
ImageFolder layout under a temporary folder (never committed), with the demo's label flips
(1<->7 p=0.4, 6<->9 p=0.3) as the training labels; trains the reference SmallCNN (2 epochs)
on them; then, in the same process:

* **API**: ``netmend.repair`` on the in-memory tensors (plus the per-failure culprits, which
  the CLI writes too);
* **CLI**: ``netmend repair --train DIR --test DIR --failure-indices FILE --no-controls`` with
  the same failures, which also decodes every PNG, writes the CSVs, the continual state and
  report.html.

Target (issue 14): CLI wall time <= 1.5x the API's; report.html <= 10 MB.
Usage: .venv/bin/python benchmarks/cli_folder.py [--n-train 10000] [--n-test 2000]
Timings share 2 CPU cores with other processes: the ratio is measured in one process.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import netmend
from netmend import cli
from netmend.data.files import load_image_folder
from netmend.evaluation import split_failures
from netmend.lab.corrupt import pair_flips
from netmend.lab.datasets import load_mnist
from netmend.lab.demo import _subset, machine
from netmend.lab.models import SmallCNN
from netmend.model.training import TrainConfig, fit
from netmend.store import write_json_atomic


def write_folder(root: Path, X: torch.Tensor, y: torch.Tensor) -> None:
    pixels = np.round(X[:, 0].numpy() * 255).astype(np.uint8)
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(pixels, y.tolist())):
        Image.fromarray(img).save(root / str(label) / f"{i:05d}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU is shared)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seed = args.seed
    train, test = load_mnist()
    train = _subset(train, args.n_train, seed)
    test = _subset(test, args.n_test, seed + 1)
    noisy = pair_flips(train.y, seed=seed).labels
    tmp = Path(tempfile.mkdtemp(prefix="netmend-mnist-png-"))
    try:
        result = measure(args, seed, train, test, noisy, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the PNGs are never kept
    write_json_atomic(args.out, result)
    print(result)


def _peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(
    args: argparse.Namespace, seed: int, train: Any, test: Any, noisy: torch.Tensor, tmp: Path
) -> dict[str, Any]:
    t = time.perf_counter()
    write_folder(tmp / "train", train.X, noisy)
    write_folder(tmp / "test", test.X, test.y)
    write_seconds = time.perf_counter() - t
    # the folder's order (by class, then file name) is the order the CLI reads
    tr = load_image_folder(tmp / "train")
    te = load_image_folder(tmp / "test")
    recipe = TrainConfig(epochs=2.0)
    torch.manual_seed(seed)
    model = fit(SmallCNN(), tr.X, tr.y, recipe, seed, "cpu", False, "train").eval()
    weights = tmp / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    split = split_failures(model, te.X, te.y, seed=seed)
    np.savetxt(tmp / "idx.txt", split.query, fmt="%d")
    rss_before = _peak_rss_mib()

    t = time.perf_counter()
    res = netmend.repair(model, (tr.X, tr.y), (te.X[split.query], te.y[split.query]),
                         seed=seed, train_config=recipe, device="cpu", progress=False)  # fmt: skip
    _ = res.identification.per_failure
    api_seconds = time.perf_counter() - t
    rss_api = _peak_rss_mib()
    api_scores, api_causes = res.scores, int(res.causes.size)
    del res, _  # the CLI's run starts without the API's per-failure matrix

    out = tmp / "run"
    t = time.perf_counter()
    code = cli.main([
        "repair", "--model", "netmend.lab.models:SmallCNN", "--weights", str(weights),
        "--train", str(tmp / "train"), "--test", str(tmp / "test"),
        "--failure-indices", str(tmp / "idx.txt"), "--epochs", "2", "--no-controls",
        "--no-progress", "--device", "cpu", "--out", str(out), "--seed", str(seed),
    ])  # fmt: skip
    cli_seconds = time.perf_counter() - t
    assert code == 0
    rss_cli = _peak_rss_mib()
    scores = np.loadtxt(out / "scores.csv", delimiter=",", skiprows=1, usecols=1)
    html_bytes = (out / "report.html").stat().st_size
    return {
        "machine": machine(),
        "note": "timings share 2 CPU cores with other processes; the ratio is same-process",
        "n_train": len(tr),
        "n_test": len(te),
        "query_failures": int(len(split.query)),
        "causes": api_causes,
        "write_png_seconds": write_seconds,
        "api_seconds": api_seconds,
        "cli_seconds": cli_seconds,
        "cli_over_api": cli_seconds / api_seconds,
        "cli_times": json.loads((out / "summary.json").read_text())["times"],
        "report_html_bytes": html_bytes,
        "peak_rss_mib": {
            "before_repairs": rss_before,
            "after_api": rss_api,
            "after_cli": rss_cli,
            "note": "the process's peak so far (ru_maxrss): the CLI's run added "
            "after_cli - after_api on top of the API's peak",
        },
        "scores_match_api": bool(np.allclose(scores, api_scores, rtol=1e-6, atol=1e-9)),
        "targets": {
            "cli_le_1.5x_api": cli_seconds / api_seconds <= 1.5,
            "report_le_10MB": html_bytes <= 10 * 2**20,
        },
    }


if __name__ == "__main__":
    main()
