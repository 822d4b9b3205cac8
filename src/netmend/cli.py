"""Command line: ``netmend repair`` (your model, your files), ``netmend demo``,
``netmend validate`` and ``netmend bench``.

Exit codes: 0 done; 2 bad input (the message says what to fix, no traceback); 1 an internal
error (with its traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from netmend._version import __version__
from netmend.data import distributed
from netmend.store import check_writable, write_json_atomic


def _outputs_writable(files: list[str | None], folders: list[str | None]) -> None:
    """Refuse output paths that cannot be written before any work: a --json under a file
    failed after the whole run, as an internal error, and its figures were lost.

    Raises:
        ValueError: a path under a file, or a folder that cannot be created or written to.
    """
    for path, is_dir in [(f, False) for f in files] + [(d, True) for d in folders]:
        if path is None:
            continue
        p = Path(path)
        folder = p if is_dir else p.parent
        if is_dir and p.exists() and not p.is_dir():
            raise ValueError(f"{path}: exists and is not a folder; choose another output folder")
        if not is_dir and p.is_dir():
            raise ValueError(f"{path}: is a folder; give a file name")
        check_writable(folder, path)


def _earlier_bench_files(out: Path) -> list[Path]:
    """The pages and plots an earlier ``netmend bench`` wrote in ``out`` (only where its
    ``bench.json`` says one ran there): ``report_*.html``, ``pr_*.png``, ``accuracy.png``,
    ``time.png``."""
    if not (out / "bench.json").is_file():
        return []
    names = ("report_*.html", "pr_*.png", "accuracy.png", "time.png")
    return sorted(p for pattern in names for p in out.glob(pattern) if p.is_file())


def _demo(args: argparse.Namespace) -> int:
    from netmend.lab import demo
    from netmend.lab.datasets import DatasetMissingError

    _outputs_writable([args.json, args.report], [args.plots])

    config = demo.DemoConfig.quick_config(args.seed) if args.quick else demo.DemoConfig(args.seed)
    try:
        result = demo.run(config, progress=not args.no_progress)
    except DatasetMissingError as exc:
        print(f"netmend: {exc}", file=sys.stderr)
        return 2
    artifacts = result.pop("_artifacts")
    print(demo.table(result))
    if args.json:
        write_json_atomic(args.json, result)
        print(f"\nfigures written to {args.json}")
    if args.plots and distributed.is_writer():
        from netmend.report.plots import demo_plots

        for p in demo_plots(result, artifacts, args.plots):
            print(f"plot written to {p}")
    if args.report:
        from netmend.report.html import demo_report

        print(f"report written to {demo_report(result, artifacts, args.report)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from netmend.lab import bench
    from netmend.lab.datasets import DatasetMissingError
    from netmend.lab.demo import machine

    chosen: dict[str, Any] = {
        k: tuple(v)
        for k, v in (
            ("suites", args.suites),
            ("pipelines", args.pipelines),
            ("references", args.references),
            ("seeds", args.seeds),
        )
        if v is not None
    }
    for key, values in chosen.items():  # one seed given twice was counted as two, s.e. 0
        twice = sorted({str(v) for v in values if list(values).count(v) > 1})
        if twice:
            raise ValueError(f"--{key} lists {', '.join(twice)} more than once; give each once")
    _outputs_writable([], [args.out])
    resume = None
    if args.resume:  # the interrupted run's record: its finished suites and their pages stay
        record = Path(args.out) / "bench.json"
        if not record.is_file():
            raise ValueError(f"--resume: no bench.json in --out {args.out} to resume")
        try:
            resume = json.loads(record.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"--resume: {record} cannot be read ({exc}); rerun without --resume"
            ) from None
    stale = [] if resume is not None else _earlier_bench_files(Path(args.out))
    if stale:  # an earlier run's pages and plots would sit beside this run's bench.json
        for p in stale:
            p.unlink()
        print(
            f"netmend bench: removed {len(stale)} report/plot file(s) of an earlier run in "
            f"{args.out} (its bench.json and bench.md are replaced)",
            file=sys.stderr,
        )
    if args.cv_folds is not None:
        chosen["cv_folds"] = args.cv_folds
    if args.draws is not None:
        chosen["draws"] = args.draws
    if args.validation_share is not None:
        chosen["validation_share"] = args.validation_share
    # a bad suite, pipeline or reference name is a ValueError: _dispatch says it, exit 2
    config = bench.BenchConfig.quick(**chosen) if args.quick else bench.BenchConfig(**chosen)
    reports: list[Path] = []
    report_errors: list[str] = []

    def report(res: dict[str, Any], artifacts: dict[str, Any]) -> None:
        from netmend.report.html import bench_report

        name = f"report_{res['suite'].replace('/', '_')}_s{res['seed']}.html"
        try:  # a page that cannot be drawn must not lose the benchmark's figures
            written = bench_report(res, artifacts, Path(args.out) / name)
        except Exception as exc:
            report_errors.append(f"{name}: {exc!r}")
            print(f"netmend bench: could not write {name}: {exc!r}", file=sys.stderr)
            return
        if written is None:
            print(f"netmend bench: no {name}: no pipeline of {res['suite']} ran with "
                  "per-failure scores", file=sys.stderr)  # fmt: skip
        else:
            reports.append(written)

    if resume is not None:
        try:
            bench.check_resumable(resume, config, machine())
        except ValueError as exc:
            raise ValueError(f"--resume {args.out}: {exc}") from None
        left = len(config.suites) * len(config.seeds) - len(resume["results"])
        left -= len(resume["skipped_suites"])
        print(f"netmend bench: resuming {args.out}: {resume['suites_done']} kept, {left} to run",
              file=sys.stderr)  # fmt: skip
    try:
        result = bench.run(
            config,
            args.device,
            progress=not args.no_progress,
            resume=resume,
            on_suite=lambda partial: (
                bench.write(partial, args.out, with_plots=False) if distributed.is_writer() else []
            ),
            on_result=report if args.report and distributed.is_writer() else None,
        )
    except DatasetMissingError as exc:
        print(f"netmend: {exc}", file=sys.stderr)
        return 2
    if not distributed.is_writer():
        return 1 if result["errors"] else 0
    paths = bench.write(result, args.out, with_plots=not args.no_plots) + reports
    print(bench.markdown(result))
    print(f"written: {', '.join(str(p) for p in paths)}")
    return 1 if result["errors"] or report_errors else 0


def _validate(args: argparse.Namespace) -> int:
    from netmend.lab import validation
    from netmend.lab.bench import parse_step

    quick = args.quick
    methods, options = None, {}
    if args.methods is not None:  # METHOD or METHOD[opt=value,...], comma-separated
        if args.methods.count("[") != args.methods.count("]"):
            raise ValueError(
                f"--methods {args.methods!r}: a bracket is not closed; write each method's "
                "options as METHOD[opt=value,...]"
            )
        methods = [m.strip() for m in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", args.methods)]
        methods = [m for m in methods if m]
        for spec in methods:
            name, opts = parse_step(spec)
            if spec != name:
                options[spec] = {"method": name, **opts}
    if methods is not None and not methods:
        raise ValueError("--methods is empty: name at least one method, or leave it out (all)")
    # before any retraining: a misspelt name or option costs nothing
    validation.check_methods(methods, options)
    _outputs_writable([args.json], [])
    try:
        ks = [int(c) for c in args.ks.split(",") if c] if args.ks else None
    except ValueError:
        raise ValueError(f"--ks takes whole numbers separated by commas; got {args.ks!r}") from None
    for flag, value in (("--n-loo", args.n_loo), ("--subsets", args.subsets)):
        if value is not None and value < 3:
            raise ValueError(
                f"{flag} {value}: a rank correlation over fewer than 3 refits is undefined; "
                "pass 3 or more (the defaults: every example, 100 subsets)"
            )
    n_train = args.n_train if args.n_train is not None else (300 if quick else None)
    try:
        problem = validation.make_problem(
            model=args.model, seed=args.seed, n_train=n_train, flips=args.flips
        )
    except ValueError as exc:  # named by the flag the user typed
        raise ValueError(str(exc).replace("n_train", "--n-train")) from None
    if args.n_loo is not None and args.n_loo > problem.N:
        raise ValueError(f"--n-loo {args.n_loo}: must lie in [3, {problem.N}] (the training set)")
    for k in [args.k, *(ks or [])]:
        if k is not None and not 0 < k < problem.N:
            raise ValueError(f"--k and --ks must lie in [1, {problem.N - 1}]; got {k}")
    # --quick on the MLP: 30 LOO refits (each a full training run, unlike logistic
    # regression's warm-started solves), so the smoke run stays a smoke run
    n_loo = 30 if quick and args.n_loo is None and args.model == "mlp" else args.n_loo
    gt = validation.ground_truth(
        problem,
        n_loo=n_loo,
        n_subsets=30 if quick and args.subsets is None else (args.subsets or 100),
        seed=args.seed,
        progress=not args.no_progress,
    )
    report = validation.validate(
        methods,
        problem,
        gt,
        k=args.k,
        counterfactual_repeats=2 if quick else 5,
        options=options or None,
        progress=not args.no_progress,
        seed=args.seed,
        counterfactual_ks=ks,
    )
    print(validation.table(report))
    if "counterfactual_curve" in report:
        print("\nheld-out accuracy change vs random removal, by examples removed:\n")
        print(validation.curve_table(report))
    if args.json:
        write_json_atomic(args.json, report)
        print(f"\nfigures written to {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``netmend`` console script."""
    parser = argparse.ArgumentParser(
        prog="netmend",
        description="Find the training examples behind a classifier's failures and repair it.",
    )
    parser.add_argument("--version", action="version", version=f"netmend {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from netmend.repair_cli import add_parser as add_repair_parser
    from netmend.repair_cli import seed_argument

    add_repair_parser(sub)
    d = sub.add_parser(
        "demo",
        help="reproduce the MNIST experiment of Tanno et al. (2022) end to end",
        description="Corrupt MNIST labels (1<->7 p=0.4, 6<->9 p=0.3), train a CNN, identify "
        "the causes of its test failures, repair it, and print one table.",
    )
    d.add_argument(
        "--seed", type=seed_argument, default=0, help="seed of everything random (default 0)"
    )
    d.add_argument("--quick", action="store_true", help="small subset: a ~1 minute smoke run")
    d.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    d.add_argument("--plots", metavar="DIR", help="also write PNG plots (culprit grid, bars)")
    d.add_argument("--report", metavar="PATH", help="also write a self-contained report.html")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.set_defaults(func=_demo)
    v = sub.add_parser(
        "validate",
        help="measure each identification method against actual retraining",
        description="Train a float64 model to convergence on digits with flipped labels "
        "(symmetric or pair flips), "
        "measure leave-one-out and subset-retraining effects on its failures, and score every "
        "identification method (Spearman with LOO, LDS, precision, AUROC, counterfactual).",
    )
    v.add_argument("--model", choices=("logreg", "mlp"), default="logreg")
    v.add_argument(
        "--flips",
        choices=("symmetric", "pair"),
        default="symmetric",
        help="the label noise: 20%% symmetric flips (default) or the paper's pair flips "
        "(1<->7 with probability 0.4, 6<->9 with 0.3)",
    )
    v.add_argument(
        "--methods",
        help="comma-separated methods, each with its options in brackets if any, e.g. "
        "'ewc[steps=300],loss' (default: all registered)",
    )
    v.add_argument(
        "--seed", type=seed_argument, default=0, help="seed of everything random (default 0)"
    )
    v.add_argument("--n-train", type=int, help="subsample the training set (--quick: 300)")
    v.add_argument("--n-loo", type=int, help="examples with an exact LOO refit (default all)")
    v.add_argument("--subsets", type=int, help="random subsets for the LDS (default 100)")
    v.add_argument("--k", type=int, help="examples removed in the counterfactual test")
    v.add_argument("--ks", help="more removal sizes for a counterfactual curve, e.g. 50,100,400")
    v.add_argument(
        "--quick",
        action="store_true",
        help="300 training examples (unless --n-train), 30 LDS subsets, and for the MLP 30 "
        "LOO refits (unless --n-loo): a smoke run",
    )
    v.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    v.add_argument("--no-progress", action="store_true", help="hide progress bars")
    v.set_defaults(func=_validate)
    b = sub.add_parser(
        "bench",
        help="benchmark matrix: corruption suites x identify/treat pipelines",
        description="Corrupt a data set (label noise, corrupted inputs, outliers, subgroup, "
        "backdoor), train, and compare repair pipelines with the original model, retraining "
        "on clean data and cleanlab. Writes bench.json, bench.md and PNG plots.",
    )
    b.add_argument("--quick", action="store_true", help="digits only, one seed: ~1 minute")
    b.add_argument(
        "--suites",
        nargs="+",
        metavar="DATASET/CORRUPTION",
        help="e.g. digits/sym20; a bare DATASET runs all its corruptions",
    )
    b.add_argument(
        "--pipelines",
        nargs="+",
        metavar="IDENTIFY/TREAT",
        help="e.g. ewc/finetune or knn_shapley[embed=input]/relabel",
    )
    b.add_argument(
        "--references",
        nargs="*",
        metavar="REF",
        help="original finetune-only oracle-causes retrain-clean cleanlab",
    )
    b.add_argument("--seeds", nargs="+", type=seed_argument, metavar="S", help="one run per seed")
    b.add_argument("--out", metavar="DIR", default="bench-out", help="output folder")
    b.add_argument(
        "--cv-folds", type=int, metavar="K", help="cleanlab's cross-validation folds (5)"
    )
    b.add_argument(
        "--draws",
        type=int,
        metavar="N",
        help="random-K control draws per pipeline (3, at least 3; 0: no controls)",
    )
    b.add_argument(
        "--validation-share",
        type=float,
        metavar="S",
        help="hold this share of each class out of the training set as a validation split "
        "(0: none); finetune[guard=data] gives it to the class guard",
    )
    b.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --out (its bench.json) with the same flags: its "
        "finished suite runs are kept, the others run",
    )
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    b.add_argument(
        "--report",
        action="store_true",
        help="also write a self-contained report_<suite>_s<seed>.html per suite and seed",
    )
    b.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    b.add_argument("--no-progress", action="store_true", help="hide progress bars")
    b.set_defaults(func=_bench)
    for p in (sub.choices["repair"], v, b):
        p.add_argument(
            "--import",
            dest="plugins",
            action="append",
            default=[],
            metavar="MODULE",
            help="import MODULE first (from the current folder or the path): a module that "
            "registers your own identification methods or treatments; repeatable",
        )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if getattr(args, "plugins", None):
        code = _import_plugins(args.plugins, args.command)
        if code:
            return code
    with _said_as_warnings(args.command):
        # under torchrun every rank runs the command (its passes are sharded); rank 0 reports
        if not distributed.is_writer():
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                return _dispatch(args)
        return _dispatch(args)


@contextlib.contextmanager
def _said_as_warnings(command: str) -> Iterator[None]:
    """Warnings printed as ``netmend COMMAND: warning: ...``, each text once, in flags.

    Python's own format points at the console script's ``sys.exit(main())`` line, which
    says nothing, and shows a warning raised from two places twice (found by an outside-in
    trial)."""
    seen: set[str] = set()

    def show(message: Warning | str, *_: Any, **__: Any) -> None:
        text = _as_flags(str(message))
        if text not in seen:
            seen.add(text)
            print(f"netmend {command}: warning: {text}", file=sys.stderr)

    before = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = before


_FLAGS = (
    ("(or pass overwrite_cache=True) to replace it", "(or pass --overwrite) to replace it"),
    ("or pass overwrite_cache=True", "or pass --overwrite"),
    ("pass another cache_dir", "choose another --out"),
    ("use device='cpu' or 'auto'", "use --device cpu or --device auto"),
    # found by an outside-in trial: the library's argument names, said in a CLI's error
    ("chunk_size must be", "--chunk-size must be"),
    ("guard_data: ", "--guard-data: "),
    ("Pass k= (a count", "Pass --k (a count"),
    ("or k='auto'", "or --k auto"),
)
"""The library's advice in Python terms, and the same advice in the command's flags."""


def _as_flags(message: str) -> str:
    """A library error message with its Python-argument advice said in the CLI's flags."""
    for python, flag in _FLAGS:
        message = message.replace(python, flag)
    return message


def _import_plugins(modules: list[str], command: str) -> int:
    """Import the ``--import`` modules (their ``register`` decorators run); 2 on failure."""
    import importlib

    if "" not in sys.path:
        sys.path.insert(0, "")  # the current folder, as `python -m` would
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or the module's own error
            print(
                f"netmend {command}: --import {name}: {type(exc).__name__}: {exc}", file=sys.stderr
            )
            return 2
    return 0


@contextlib.contextmanager
def _quiet(on: bool) -> Iterator[None]:
    """Send the block's output (tables, warnings, bars) nowhere when ``on``: every rank of a
    ``torchrun`` runs the command, and each printed the same lines, bars and warnings."""
    if not on:
        yield
        return
    with (
        open(os.devnull, "w") as null,
        contextlib.redirect_stdout(null),
        contextlib.redirect_stderr(null),
    ):
        yield


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command; bad input (netmend raises ValueError/TypeError with what to fix) exits
    2 with its message, an interrupt 130, anything else 1 with the traceback."""
    bad_input: tuple[type[Exception], ...] = (ValueError, TypeError, FileNotFoundError)
    interrupted = ""
    if args.command == "repair":
        from netmend.repair_cli import DEFAULT_OUT, BadInput

        bad_input = (BadInput, *bad_input)
        out = args.resume or args.out or DEFAULT_OUT
        interrupted = (
            f" The passes that finished are kept in {out}/cache: run the same command with "
            f"--resume {out} (instead of --out) to continue from them"
        )
    if args.command == "bench":
        interrupted = (
            f" The suite runs that finished are kept in {args.out}/bench.json: run the same "
            "command with --resume added to run the rest"
        )
    name = f"netmend {args.command}"
    rank = distributed.world()[0]
    if rank != 0:  # under torchrun: rank 0 speaks for all, the others only of their own errors
        name = f"{name} (rank {rank})"
    try:
        with _quiet(rank != 0):
            return int(args.func(args))
    except bad_input as exc:
        print(f"{name}: {_as_flags(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted.{interrupted}", file=sys.stderr)
        return 130
    except Exception:  # an internal error: say so, with the traceback
        import traceback

        traceback.print_exc()
        print(f"{name}: internal error (please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
