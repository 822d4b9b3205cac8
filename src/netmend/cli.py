"""Command line: ``netmend demo``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _demo(args: argparse.Namespace) -> int:
    from . import demo
    from .datasets import DatasetMissingError

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
    if args.plots:
        from .plots import demo_plots

        for p in demo_plots(result, artifacts, args.plots):
            print(f"plot written to {p}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``netmend`` console script."""
    parser = argparse.ArgumentParser(
        prog="netmend",
        description="Find the training examples behind a classifier's failures and repair it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="reproduce the MNIST experiment of Tanno et al. (2022) end to end",
        description="Corrupt MNIST labels (1<->7 p=0.4, 6<->9 p=0.3), train a CNN, identify "
        "the causes of its test failures, repair it, and print one table.",
    )
    d.add_argument("--seed", type=int, default=0, help="seed of everything random (default 0)")
    d.add_argument("--quick", action="store_true", help="small subset: a ~1 minute smoke run")
    d.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    d.add_argument("--plots", metavar="DIR", help="also write PNG plots (culprit grid, bars)")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
