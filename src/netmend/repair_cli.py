"""``netmend repair``: repair your own model from your own files.

::

    netmend repair --model mypkg.models:make_net --weights net.safetensors \\
        --train train.npz --failures failures.npz --out run/

The output folder holds ``repaired.safetensors`` (the repaired model's ``state_dict``),
``scores.csv`` (one row per training example: cause score, positive = harmful; label;
suggested label where the treatment relabels; selected), ``culprits.csv`` (each failure's top
training examples), ``summary.json`` (settings, versions, times, accuracies with controls),
``report.html`` (:mod:`netmend.report.html`) and ``cache/`` (the identification's passes,
reused by ``--resume``). See docs/cli.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import pickle
import platform
import shutil
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from netmend import api, treatment
from netmend._version import __version__
from netmend.continual import STATE_FILE, Repairer
from netmend.data import distributed
from netmend.data.checks import check_labels, resolve_device, rows_in
from netmend.data.files import FileData, SequenceTooLong, load_data, load_indices
from netmend.data.source import as_source
from netmend.data.validate import check_seed
from netmend.evaluation import split_failures
from netmend.evaluation.controls import (
    MAX_CLASS_DROP,
    MIN_DRAWS,
    TEST_TOLERANCE,
    Controls,
    recipe_loss,
    run_controls,
)
from netmend.evaluation.controls import repaired as pareto_repaired
from netmend.model.checks import num_classes_of
from netmend.model.functional import match_dtype, param_dtype
from netmend.model.training import (
    TrainConfig,
    check_resettable,
    class_accuracies_of,
    predict,
)
from netmend.report.html import ReportData, culprit_table, write_report
from netmend.store import (
    check_writable,
    finite_or_none,
    folder_lock,
    save_tensors,
    tensor_hash,
    write_json_atomic,
    write_text_atomic,
)
from netmend.treatment.guard import guard_k

DEFAULT_OUT = "netmend-repair"
OUT_OF_RANGE_ID = "an input id is out of range for an Embedding"
"""How :func:`netmend.model.checks.ids_in_range`'s refusal begins."""


class BadInput(Exception):
    """A problem with the command's arguments or files: exit code 2, no traceback."""


# ----------------------------------------------------------------------------- the model


class Exported(nn.Module):
    """A ``torch.export`` program's module as an ordinary ``nn.Module``.

    Exported modules refuse ``train()``/``eval()`` (they were traced in one mode, which they
    keep); this wrapper makes those calls set its own flag only, so netmend's copies work.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.program = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> Exported:
        self.training = mode
        return self

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """The program's own ``state_dict`` (names as in the exported model)."""
        return dict(self.program.state_dict())


def _check_dynamic_batch(program: Any, path: Path) -> None:
    """Refuse a ``torch.export`` program traced for one batch size: netmend calls the model
    on batches of every size (chunks, single examples), which such a program rejects."""
    sig = program.graph_signature
    first = next(
        (n for n in program.graph.nodes if n.op == "placeholder" and n.name in sig.user_inputs),
        None,
    )
    val = None if first is None else first.meta.get("val")
    shape = getattr(val, "shape", None)
    if not shape:
        return
    dim = shape[0]
    lower = 1
    if isinstance(dim, torch.SymInt):
        bounds = program.range_constraints.get(dim.node.expr)
        lower = 1 if bounds is None else int(bounds.lower)
    if isinstance(dim, int) or lower > 1:
        fixed = f"exactly {dim}" if isinstance(dim, int) else f"at least {lower}"
        raise BadInput(
            f"--model {path}: the program was exported for batches of {fixed} examples, but "
            "netmend calls the model on batches of any size (down to one example). Export it "
            "with a dynamic batch dimension: torch.export.export(model, (x,), dynamic_shapes="
            "({0: torch.export.Dim('batch', min=1)},))"
        )


def load_model(spec: str, weights: str | None) -> nn.Module:
    """Build the user's model: ``package.module:factory`` (+ weights) or a ``.pt2`` program.

    Args:
        spec: ``package.module:factory`` (a zero-argument callable returning the
            ``nn.Module``; the current folder is importable), or the path of a
            ``torch.export`` program (``.pt2``; TorchScript files are refused with the fix).
        weights: a ``.safetensors`` file or a ``state_dict`` saved with ``torch.save``
            (loaded with ``weights_only=True``: no code runs); optional for a factory.

    Returns:
        The model, in eval mode.
    """
    path = Path(spec)
    if ":" not in spec or path.is_file():
        if not path.is_file():
            raise BadInput(
                f"--model {spec!r}: expected package.module:factory or the path of a "
                "torch.export program (.pt2 file)"
            )
        if path.suffix != ".pt2":
            raise BadInput(
                f"--model {path}: not a torch.export program (.pt2). A pickled model "
                "(torch.save(model)) is not loaded, since loading it runs code from the file, "
                "and a TorchScript module cannot be differentiated with torch.func; pass "
                "package.module:factory with --weights (a state_dict), or save the model with "
                "torch.export.save(...) as a .pt2 file"
            )
        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            raise BadInput(f"--model {path}: not a torch.export program ({exc})") from exc
        _check_dynamic_batch(program, path)
        model = Exported(program.module())
    else:
        mod_name, _, attr = spec.partition(":")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as exc:
            raise BadInput(
                f"--model {spec!r}: cannot import {mod_name!r} ({exc}); run from the folder "
                "that holds the package or add it to PYTHONPATH"
            ) from exc
        factory = getattr(mod, attr, None)
        if not callable(factory):
            raise BadInput(f"--model {spec!r}: {mod_name} has no callable {attr!r}")
        model = factory()
        if not isinstance(model, nn.Module):
            raise BadInput(
                f"--model {spec!r}: the factory returned {type(model).__name__}, not an nn.Module"
            )
    if weights is not None:
        target = model.program if isinstance(model, Exported) else model
        state = _load_state_dict(weights)
        ours = set(target.state_dict())
        if set(state) != ours and all(k.startswith("module.") for k in state):
            stripped = {k[len("module.") :]: v for k, v in state.items()}
            if set(stripped) == ours:  # saved from nn.DataParallel / DistributedDataParallel
                state = stripped
        on_meta = any(t.is_meta for t in [*target.parameters(), *target.buffers()])
        try:  # a factory that builds on the "meta" device is given the weights' own tensors
            target.load_state_dict(state, assign=on_meta)
        except RuntimeError as exc:
            raise BadInput(f"--weights {weights}: does not fit the model ({exc})") from exc
    if isinstance(model, nn.Module) and not isinstance(model, Exported):
        tensors = [*model.named_parameters(), *model.named_buffers()]  # non-persistent too
        meta = [n for n, t in tensors if t.is_meta]
        if meta:
            raise BadInput(
                f"--model {spec!r}: {len(meta)} tensors ({', '.join(meta[:3])}) are on the "
                "'meta' device, with no values"
                + (" (--weights holds none for them)" if weights is not None else "")
                + ": build the model on a real device (a buffer that is not saved, e.g. "
                "register_buffer(..., persistent=False), must be computed there), or pass "
                "--weights with every tensor"
            )
    return model.eval()


def _load_state_dict(weights: str) -> dict[str, torch.Tensor]:
    p = Path(weights)
    if not p.is_file():
        raise BadInput(f"--weights {p}: no such file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        if zipfile.is_zipfile(p) and any(
            n.endswith("/constants.pkl") or "/code/" in n for n in zipfile.ZipFile(p).namelist()
        ):
            raise BadInput(
                f"--weights {p}: a TorchScript archive, which netmend does not load (its code "
                "runs outside Python's reach); pass --model package.module:factory with "
                "--weights holding torch.save(model.state_dict(), path), or a torch.export "
                ".pt2 program as --model"
            )
        with warnings.catch_warnings():  # torch's own advice would be weights_only=False
            warnings.simplefilter("ignore", UserWarning)
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except BadInput:
        raise
    except pickle.UnpicklingError as exc:  # torch's text advises weights_only=False: not here
        raise BadInput(
            f"--weights {p}: holds pickled Python objects (e.g. a whole model saved with "
            "torch.save(model)), which netmend does not unpickle (that would run code from the "
            "file); save torch.save(model.state_dict(), path) or a .safetensors file instead"
        ) from exc
    except Exception as exc:
        raise BadInput(
            f"--weights {p}: cannot read it ({exc}); pass a .safetensors file or a state_dict "
            "saved with torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(sd, dict) and not all(isinstance(v, torch.Tensor) for v in sd.values()):
        # a training checkpoint: the weights under one of the usual keys, beside the optimiser
        inner = [k for k in CHECKPOINT_KEYS if _is_state_dict(sd.get(k))]
        if not inner:
            raise BadInput(
                f"--weights {p}: a dict with keys {sorted(map(str, sd))[:8]} and no state_dict "
                f"under {', '.join(repr(k) for k in CHECKPOINT_KEYS)}; save the weights alone "
                "with torch.save(model.state_dict(), path)"
            )
        sd = sd[inner[0]]
    if not _is_state_dict(sd):
        raise BadInput(f"--weights {p}: holds a {type(sd).__name__}, not a state_dict")
    return sd


CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")
"""Where a training checkpoint (a dict with the optimiser's state, the epoch, ...) keeps the
model's weights: the first of these keys that holds a state_dict is read."""


def _is_state_dict(d: Any) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


# ----------------------------------------------------------------------------- the data


def _recipe(args: argparse.Namespace) -> TrainConfig:
    """The recipe the model was trained with, from --epochs/--batch-size/--lr (each missing
    one from ``TrainConfig()``); with none of them, said once: the fine-tune runs at the
    training rate for a length sized by the training's steps, as the Python API warns."""
    given = {
        k: v
        for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr))
        if v is not None
    }
    if not given:
        c = TrainConfig()
        print(
            f"netmend repair: warning: no --epochs/--batch-size/--lr: the fine-tune assumes "
            f"the model was trained with Adam at lr {c.lr:g}, batch {c.batch_size}, "
            f"{c.epochs:g} epochs; pass the recipe it was trained with, or a model trained at "
            "another rate may barely move",
            file=sys.stderr,
        )
    bad = [k for k, v in given.items() if not (v > 0 and math.isfinite(v))]
    if bad:
        flags = ", ".join(f"--{k.replace('_', '-')} {given[k]:g}" for k in bad)
        raise BadInput(f"{flags}: the training recipe's values must be > 0")
    return TrainConfig(**given)


def _retrain_factory(
    model: nn.Module, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """``--treat retrain``'s fresh model: ``{}`` when every trained layer of ``model`` has a
    ``reset_parameters()`` (the treatment re-initialises a copy), else ``{"model_factory":
    ...}`` building it from ``--model``.

    Raises:
        BadInput: ``--model`` cannot give an untrained model: a ``.pt2`` program holds its
            trained weights, and a factory may load them.
    """
    try:
        check_resettable(model)
        return {}
    except ValueError as exc:
        why = exc.args[0].split(";")[0]
    if isinstance(model, Exported):
        raise BadInput(
            f"--treat retrain needs an untrained model, and {why}: a .pt2 program holds its "
            "trained weights. Pass --model package.module:factory (returning the untrained "
            "model) with --weights"
        )
    fresh = load_model(args.model, None)
    trained, new = model.state_dict(), fresh.state_dict()
    if all(torch.equal(trained[k].cpu(), new[k].cpu()) for k in trained if k in new):
        raise BadInput(
            f"--treat retrain needs an untrained model, and {why}; --model {args.model} "
            "returns the trained weights, so 'retraining' would only fine-tune them. Pass a "
            "factory that returns the untrained model"
        )
    return {"model_factory": lambda: load_model(args.model, None).to(device)}


def _writable(out: Path, flag: str) -> None:
    """Create ``out`` (once the inputs are read: bad ones leave nothing) and prove that files
    can be written in it, before any pass: a read-only folder failed only when the cache was
    first written, as an internal error."""
    try:
        check_writable(out, f"{flag} {out}")
    except ValueError as exc:
        raise BadInput(str(exc)) from exc


def _parse_k(k: str | None) -> int | float | str | None:
    if k is None or k in ("auto", "positive"):
        return k
    try:
        n = int(k)
    except ValueError:
        pass
    else:
        if n < 1:
            raise BadInput(f"--k {k!r}: a count of causes is at least 1 (or auto, positive)")
        return n
    try:
        v = float(k)
    except ValueError:
        raise BadInput(
            f"--k {k!r}: pass an integer, a fraction in (0, 1), auto or positive"
        ) from None
    if not 0 < v < 1:
        raise BadInput(f"--k {k!r}: a fraction must lie in (0, 1)")
    return v


def _subset(d: FileData, idx: np.ndarray) -> FileData:
    t = torch.from_numpy(idx)
    return FileData(
        d.X[t],
        d.y[t],
        d.kind,
        d.classes,
        d.features,
        None if d.paths is None else [d.paths[i] for i in idx],
        d.source,
    )


def _class_names(args: argparse.Namespace) -> list[str] | None:
    """``--classes``: one name per line, in the model's output order."""
    if args.classes is None:
        return None
    try:
        names = [line.strip() for line in Path(args.classes).read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"--classes {args.classes}: cannot be read ({exc})") from exc
    names = [n for n in names if n]
    if not names or len(set(names)) != len(names):
        raise BadInput(
            f"--classes {args.classes}: give each class name once, one per line, in the "
            "model's output order"
        )
    return names


ORDER_CHECK_ROWS = 2000
"""Training examples on which the model's predictions test the order of named classes."""


def check_class_order(model: nn.Module, d: FileData, device: torch.device, seed: int) -> None:
    """Refuse named classes whose order the model contradicts.

    Names are numbered in sorted order unless ``--classes`` says otherwise, and nothing in
    the files says which output of the model is which name. A model trained with another
    order agrees with the numbered labels at about chance level, and the repair would then
    fine-tune it onto the wrong labels and report a large "gain" (an outside-in trial: test
    accuracy 94% -> 12% in truth, shown as a repair to 91%). On a seeded sample of the
    training set the order is wrong when either

    * the labels agree with the model's predictions less than half as often as the best
      label-by-label matching would; or
    * some names are permuted among themselves: each of them is given one other output by
      most of its examples, and those outputs are the same names' (two names swapped in a
      ``--classes`` file: 75% agreement against 92%, which the first test let through, and the
      repair fell from 94% to 76% in truth). "Most" is more than half of a name's examples
      and at least twice as many as the model gives that name: two classes a correctly ordered
      model cannot tell apart split about evenly both ways, and sampling noise took both over
      half in 22% of draws (a review); label noise under a third leaves each name's examples
      predicted mostly as itself.

    Raises:
        BadInput: with the order the model's predictions suggest.
    """
    if d.classes is None:
        return
    rows = torch.from_numpy(
        np.sort(np.random.default_rng(seed).permutation(len(d))[:ORDER_CHECK_ROWS])
    )
    pred = predict(model, d.X[rows], device).numpy()
    labels = d.y[rows].numpy()
    c = max(int(pred.max()), int(labels.max())) + 1
    table = np.zeros((c, c), dtype=np.int64)  # [label, predicted]
    np.add.at(table, (labels, pred), 1)
    agree, best = np.trace(table), table.max(1).sum()
    permuted = _permuted_names(table)
    if agree >= 0.5 * best and not permuted:
        return
    guess = table.argmax(1)  # per name index: the output the model gives it most
    order = ["?"] * c
    for name_index, out in enumerate(guess):
        if name_index < len(d.classes) and order[out] == "?":
            order[out] = d.classes[name_index]
    which = (
        f"the names {', '.join(d.classes[i] for i in permuted)} are each predicted as "
        "another of them"
        if permuted and agree >= 0.5 * best
        else f"its outputs read in another order would agree on up to {best / len(rows):.0%}"
    )
    raise BadInput(
        f"the model agrees with these class names on {agree / len(rows):.0%} of "
        f"{len(rows)} training examples, and {which}: the names were numbered "
        f"{', '.join(f'{i}={n}' for i, n in enumerate(d.classes[:10]))}, which is not the "
        "model's order (or the model is not the trained one: check --weights). Pass "
        "--classes FILE with one name per line in the model's output order (its predictions "
        f"suggest {', '.join(order[:10])})"
    )


def _permuted_names(table: np.ndarray, min_rows: int = 5) -> list[int]:
    """The label indices whose examples the model mostly gives one other output, where those
    outputs form cycles among the same indices (a swap or a rotation of names); else ``[]``.

    Args:
        table: ``[C, C]`` counts of (label, predicted output) on a sample.
        min_rows: labels with fewer sampled examples are not judged.
    """
    rows = table.sum(1)
    top = table.argmax(1)
    moved = {  # most examples go to one other output, at least twice as many as stay
        i: int(top[i])
        for i in range(len(table))
        if rows[i] >= min_rows
        and top[i] != i
        and table[i, top[i]] > 0.5 * rows[i]
        and table[i, top[i]] >= 2 * table[i, i]
    }
    cycles: set[int] = set()
    for start in moved:  # follow each moved label; a return to it closes a cycle of names
        path, i = [start], moved[start]
        while i in moved and i not in path:
            path.append(i)
            i = moved[i]
        if i == start:
            cycles.update(path)
    return sorted(cycles)


def _load(path: str, args: argparse.Namespace, like: FileData | None, what: str) -> FileData:
    length = getattr(args, "length", None)
    if like is not None and like.kind == "tokens":
        length = int(like.X.shape[1])
    try:
        d = load_data(
            path,
            label_column=args.label_column,
            classes=_class_names(args) if like is None else like.classes,
            pad_id=args.pad_id,
            length=length,
        )
    except ValueError as exc:
        hint = ""
        if like is None and isinstance(exc, SequenceTooLong):  # --length is the short one
            raise BadInput(
                f"--length {exc.width} is shorter than the longest sequence of --train {path} "
                f"({exc.longest} ids): pass --length {exc.longest} or more, or leave it out"
            ) from exc
        if like is None and args.classes is not None and "are not" in str(exc):
            hint = (
                f" (the classes are the lines of --classes {args.classes}: list every class "
                "name there, in the model's output order)"
            )
        if isinstance(exc, SequenceTooLong):  # a file other than --train
            hint = (
                f" (pass --length {exc.longest} or more to pad every file's sequences to one "
                "length; netmend gives every file the training set's width)"
            )
        raise BadInput(f"--{what}: {exc}{hint}") from exc
    if like is not None and like.classes is None and d.classes is not None:
        # names here cannot be mapped: sorting this file's own names would invent indices
        raise BadInput(
            f"--{what} {path}: its labels are class names ({', '.join(d.classes[:5])}) but the "
            "training set's labels are class indices (integers); give this file the same "
            "integer labels as the training set"
            + (
                " (an image folder's labels are its sub-folders' names: pass the training set "
                "as an image folder with the same class folders, or this file as an .npz)"
                if Path(path).is_dir()
                else ""
            )
        )
    if like is not None and d.X.shape[1:] != like.X.shape[1:]:
        a, b = tuple(d.X.shape[1:]), tuple(like.X.shape[1:])
        colour = len(a) == len(b) == 3 and a[1:] == b[1:] and {a[0], b[0]} == {1, 3}
        raise BadInput(
            f"--{what} {path}: inputs have shape {a} but the training inputs have {b}"
            + (
                ": one is in colour (3 channels), the other grey (1); convert the images to "
                "the training set's mode (e.g. PIL's Image.convert('L') or 'RGB')"
                if colour
                else ""
            )
        )
    return d


def _as_dtype(X: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = match_dtype(X, dtype)
    assert isinstance(out, torch.Tensor)  # a tensor stays a tensor
    return out


class Inputs:
    """The training set, the failures and (optionally) the test set of one run."""

    def id_ranges(self) -> str:
        """Which file holds which token ids, and which ids the model's Embedding layers take:
        said when a pass meets an id out of range ("in the training set or the failures"
        left the user to search every file)."""
        files = [("--train", self.train), ("--test", self.test),
                 ("--failures", getattr(self, "failures", None)),
                 ("--guard-data", self.guard_data)]  # fmt: skip
        seen = [
            f"{flag} {int(d.X.min())}..{int(d.X.max())}"
            for flag, d in files
            if d is not None and len(d) and not d.X.is_floating_point()
        ]
        layers = [
            f"{name or 'the model'} 0..{m.num_embeddings - 1}"
            for name, m in self.model.named_modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        ]
        return (
            f"The ids in each file: {', '.join(seen) or 'none (no integer inputs)'}; the "
            f"model's Embedding layers take {', '.join(layers) or 'none'}"
        )

    def __init__(self, args: argparse.Namespace, model: nn.Module, device: torch.device):
        self.model = model
        dt = param_dtype(model)  # floating inputs in the model's dtype, as netmend.identify does
        self.train = _load(args.train, args, None, "train")
        self.train.X = _as_dtype(self.train.X, dt)
        self.test: FileData | None = None
        self.query: np.ndarray | None = None  # failure indices into the test set
        self.heldout: np.ndarray | None = None
        if args.test is not None:
            self.test = _load(args.test, args, self.train, "test")
            self.test.X = _as_dtype(self.test.X, dt)
        self.guard_data: FileData | None = None
        if args.guard_data is not None:
            if (
                args.test is not None
                and Path(args.guard_data).resolve() == Path(args.test).resolve()
            ):
                raise BadInput(
                    "--guard-data is the --test file: the test figures would then judge the "
                    "data the guard chose K on; pass a separate validation split"
                )
            if args.no_guard:
                raise BadInput("--guard-data is read only by the class guard: drop --no-guard")
            if args.treat != "finetune":
                raise BadInput(f"--guard-data needs --treat finetune, not {args.treat!r}")
            self.guard_data = _load(args.guard_data, args, self.train, "guard-data")
            self.guard_data.X = _as_dtype(self.guard_data.X, dt)
            # by content, not by path: a copy of --test (or --train) under another name
            for flag, other in (("--train", self.train), ("--test", self.test)):
                if other is not None and _same_content(self.guard_data, other):
                    raise BadInput(
                        f"--guard-data holds the same examples as the {flag} file: the guard "
                        "must measure on labelled data the model never trained on, and that "
                        "the test figures do not judge; pass a separate validation split"
                    )
        if args.classes is not None and self.train.classes is None:
            raise BadInput(
                "--classes names the classes of files labelled by name; the training set's "
                "labels are already class indices: drop --classes"
            )
        # said before any pass: found later, a bad label left a cache that refused the rerun
        if self.train.kind == "tokens":
            pads = sorted(
                {
                    int(m.padding_idx)
                    for m in model.modules()
                    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.padding_idx is not None
                }
            )
            if pads and args.pad_id not in pads:
                print(
                    f"netmend repair: warning: --pad-id {args.pad_id} pads the token ids, but "
                    f"the model's Embedding pads with id {pads[0]} (padding_idx): pass "
                    f"--pad-id {pads[0]}, or the padding is read as a real token",
                    file=sys.stderr,
                )
        try:
            self.num_classes = classes = num_classes_of(model, self.train.X, device)
        except ValueError as exc:  # the library's fix names task=, which no flag sets
            msg = str(exc).replace(
                ", or convert them in the model or a task=",
                ". Token ids must be integers: pass a .jsonl file of ids or an .npz with an "
                "integer X (a .csv is read as float features); other conversions belong in "
                "the model",
            )
            raise BadInput(f"--train {args.train}: {msg}") from exc
        names = self.train.classes
        if args.classes is not None and names is not None and len(names) != classes:
            raise BadInput(
                f"--classes {args.classes} lists {len(names)} names but the "
                f"model has {classes} outputs: give one name per output, in its order"
            )
        named = (("--train", self.train), ("--test", self.test), ("--guard-data", self.guard_data))
        for flag, d in named:
            if d is not None:
                check_labels(d.y, classes, flag)
        check_class_order(model, self.train, device, args.seed)  # a --classes file too
        if args.failure_indices is not None:
            if self.test is None:
                raise BadInput("--failure-indices needs --test (the set the indices point into)")
            if args.failures is not None:
                raise BadInput("pass either --failures or --failure-indices, not both")
            if args.failure_indices == "auto":
                split = split_failures(
                    model, self.test.X, self.test.y, seed=args.seed, device=device
                )
                self.query, self.heldout = split.query, split.heldout
            else:
                self.query = load_indices(args.failure_indices, len(self.test))
            self.failures = _subset(self.test, self.query)
            self.failure_names = [f"test #{int(i)}" for i in self.query]
        elif args.failures is not None:
            self.failures = _load(args.failures, args, self.train, "failures")
            self.failures.X = _as_dtype(self.failures.X, dt)
            self.failure_names = [str(i) for i in range(len(self.failures))]
        else:
            raise BadInput("pass the failures: --failures FILE, or --test FILE --failure-indices")
        if self.test is not None and self.heldout is None:
            wrong = (predict(model, self.test.X, device) != self.test.y).numpy()
            taken = np.zeros(len(self.test), dtype=bool)
            if self.query is not None:
                taken[self.query] = True
            else:  # --failures: test rows that are the given failures are not held out
                taken = rows_in(self.test.X, self.failures.X)
            self.heldout = np.flatnonzero(wrong & ~taken)
            self.correct = np.flatnonzero(~wrong)
        elif self.test is not None:
            wrong = (predict(model, self.test.X, device) != self.test.y).numpy()
            self.correct = np.flatnonzero(~wrong)

    def not_held_out(self, X: torch.Tensor) -> None:
        """Take the test rows equal to ``X`` out of the held-out failures: a continual round's
        earlier failures were repair inputs, not failures the repair never saw."""
        if self.test is not None and self.heldout is not None and self.heldout.size:
            self.heldout = self.heldout[~rows_in(self.test.X[self.heldout], X)]

    def accuracies(
        self, model: nn.Module, device: torch.device, classes: int | None = None
    ) -> dict[str, Any]:
        """Accuracy on the failures and, with a test set, on the test set and its parts; with
        ``classes``, also ``"class_acc"``: each class's test accuracy (a list, NaN for a class
        the test set lacks), for the Pareto criterion's class rule."""
        f = self.failures
        out: dict[str, Any] = {
            "failures": float((predict(model, f.X, device) == f.y).double().mean())
        }
        if self.test is not None:
            pred = predict(model, self.test.X, device)
            ok = (pred == self.test.y).numpy()
            out["test"] = float(ok.mean())
            if classes is not None:
                out["class_acc"] = class_accuracies_of(pred, self.test.y, classes)
            if self.heldout is not None and self.heldout.size:
                out["held-out failures"] = float(ok[self.heldout].mean())
            if self.correct.size:
                out["originally correct"] = float(ok[self.correct].mean())
        return out


# ----------------------------------------------------------------------------- outputs


def _recipe_loss(original: dict[str, float], finetune_only: dict[str, float]) -> str | None:
    """:func:`netmend.evaluation.controls.recipe_loss` on the run's accuracies, naming the flags."""
    return recipe_loss(
        original.get("test"), finetune_only.get("test"), "--epochs, --lr and --batch-size"
    )


def _same_content(a: FileData, b: FileData) -> bool:
    """Whether two data files hold the same examples (inputs and labels, in any dtype)."""
    if len(a) != len(b) or a.X.shape[1:] != b.X.shape[1:]:
        return False
    return bool(torch.equal(a.y, b.y) and torch.equal(a.X, b.X.to(a.X.dtype)))


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    lines = [",".join(header)]
    lines += [",".join("" if v is None else str(v) for v in r) for r in rows]
    return "\n".join(lines) + "\n"


def _fmt(v: float) -> str:
    return f"{v:.9g}"


def _previous_summary(out: Path) -> dict[str, Any] | None:
    path = out / "summary.json"
    if not path.is_file():
        return None
    try:
        prev: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path}: not valid JSON ({exc}); rerun without --resume") from exc
    return prev


def run(args: argparse.Namespace) -> int:
    """The ``repair`` subcommand (see the module docstring)."""
    read: dict[str, Inputs] = {}  # the files, once read: an out-of-range id names its file
    try:
        with contextlib.ExitStack() as hold:  # the output folder's lock, once it exists
            return _run(args, hold, read)
    except ValueError as exc:
        if not str(exc).startswith(OUT_OF_RANGE_ID) or "inputs" not in read:
            raise
        raise BadInput(f"{exc}. {read['inputs'].id_ranges()}") from None


def _run(args: argparse.Namespace, hold: contextlib.ExitStack, read: dict[str, Inputs]) -> int:
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    if args.resume is not None and args.out is not None and Path(args.out) != Path(args.resume):
        raise BadInput(
            f"--resume {args.resume} writes this round into that folder; --out {args.out} "
            "would be ignored: leave --out out"
        )
    if args.resume is not None:  # its plug-ins first: without them its method is "unknown"
        saved = ((_previous_summary(Path(args.resume)) or {}).get("settings") or {}).get("import")
        missing = [m for m in saved or [] if m not in getattr(args, "plugins", [])]
        if missing:
            raise BadInput(
                f"--resume {args.resume}: the run imported {', '.join(missing)}; pass "
                + " ".join(f"--import {m}" for m in missing)
                + " again"
            )
    _check_choices(args)
    out = Path(args.out or DEFAULT_OUT)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: exists and is not a folder")
    if args.resume is not None:
        out = Path(args.resume)
        if not (out / "summary.json").is_file() and not (out / "cache").is_dir():
            raise BadInput(f"--resume {out}: no earlier run there (no summary.json or cache/)")
    elif out.exists() and any(out.iterdir()) and not args.overwrite:
        raise BadInput(
            f"--out {out}: the folder is not empty; pass --resume {out} to reuse its cache, "
            "--overwrite to replace it, or choose a new folder"
        )
    if args.chunk_size < 1:  # said before any pass (later, it left a cache behind)
        raise BadInput(f"--chunk-size must be >= 1; got {args.chunk_size}")
    device = resolve_device(args.device)
    # bars redraw with carriage returns: in a log file they are one long line of noise
    progress = not args.no_progress and sys.stderr.isatty()
    k = _parse_k(args.k)
    config = _recipe(args)

    t0 = time.perf_counter()
    model = load_model(args.model, args.weights)
    if args.weights is None and not isinstance(model, Exported):
        print(
            f"netmend repair: warning: no --weights: repairing the model as {args.model} "
            "returns it (random parameters, unless the factory loads trained ones)",
            file=sys.stderr,
        )
    # the CLI's own copy (loaded from files): it computes where the run does
    model = model.to(device)
    data = Inputs(args, model, device)
    read["inputs"] = data
    train, fails = data.train, data.failures
    if isinstance(k, int) and k >= len(train) and args.treat in ("finetune", "retrain"):
        # said before the identification, so no cache is left behind to refuse the rerun
        raise BadInput(
            f"--k {k}: the causes would be the whole training set ({len(train)} examples), and "
            f"'{args.treat}' would have nothing left to train on; pass a smaller --k"
        )
    times["load"] = time.perf_counter() - t0
    vocab = None
    if args.vocab is not None:
        try:
            vocab = Path(args.vocab).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:  # missing, a folder, not text
            raise BadInput(f"--vocab {args.vocab}: cannot be read as text ({exc})") from exc
    flag = "--resume" if args.resume is not None else "--out"
    taken = distributed.Captured()
    with taken:  # under torchrun the rank that writes makes and holds the folder for them all
        if distributed.is_writer():
            _writable(out, flag)
            hold.enter_context(folder_lock(out, f"{flag} {out}"))
    try:
        distributed.agree(taken.error, "making and locking the output folder")
    except (ValueError, distributed.RankFailedError) as exc:
        raise BadInput(str(exc)) from exc

    common: dict[str, Any] = dict(
        seed=args.seed, device=device, chunk_size=args.chunk_size, progress=progress
    )
    state_dir = out / "continual"
    finishing = False  # a continual round saved before an interruption, its outputs unwritten
    failures_hash = tensor_hash(fails.X, fails.y)
    previous = _previous_summary(out) if args.resume is not None else None
    observed: list[str] = list((previous or {}).get("observed_failures", []))
    continual = previous is not None and failures_hash not in observed
    if previous is not None and failures_hash in observed and len(observed) > 1:
        raise BadInput(
            f"--resume {out}: these failures were already observed (round "
            f"{observed.index(failures_hash) + 1} of {len(observed)}); pass new failures"
        )
    if args.resume is None:  # --overwrite: an earlier run's continual state is stale
        if distributed.is_writer() and state_dir.is_dir():
            shutil.rmtree(state_dir)  # rank 0 alone: every rank deleting it raced
        distributed.barrier()  # (every rank: each read is_dir() at another moment)
    observed = [*observed, failures_hash] if continual else [failures_hash]
    repairer_kw: dict[str, Any] = dict(
        treat=args.treat,
        k=k,
        train_config=config,
        gate=False if args.no_gate else None,
        guard=False if args.no_guard else None,
        guard_data=None if data.guard_data is None else (data.guard_data.X, data.guard_data.y),
        identify_options=args.identify_options,
        treat_options=args.treat_options,
        **common,
    )
    record: dict[str, Any] = {}
    per_failure: Any = None
    theta_plus_f = None
    fisher: torch.Tensor | None = None

    factory: dict[str, Any] = {}
    if args.treat == "retrain" and "model_factory" not in args.treat_options:
        factory = _retrain_factory(model, args, device)

    def treat_with(c: np.ndarray, **extra: Any) -> nn.Module:
        """The repair's treatment call; the controls repeat it with only the causes changed."""
        return api.treat(
            model,
            (train.X, train.y),
            c,
            args.treat,
            train_config=config,
            fisher=fisher,
            failures=(fails.X, fails.y),
            theta_plus_f=theta_plus_f,
            **args.treat_options,
            **factory,
            **extra,
            **common,
        )

    if continual:  # new failures for an earlier run: one more round of continual repair
        first = (previous or {}).get("settings", {}).get("identify", "ewc")
        if args.identify != first:  # the round scores with the saved state's method, ewc
            raise BadInput(
                f"--resume {out}: the saved run identified with {first!r}; a continual round "
                f"continues it, so --identify {args.identify} would be recorded but not used. "
                f"Drop --identify (or pass --identify {first}), or start a new folder"
            )
        if not (state_dir / STATE_FILE).is_file():
            raise BadInput(
                f"--resume {out} with new failures needs the continual-repair state of an "
                f"'ewc' run ({state_dir}/{STATE_FILE}); this run used --identify "
                f"{previous['settings']['identify'] if previous else '?'}"
            )
        t0 = time.perf_counter()
        try:
            rep = Repairer.load(state_dir, model, (train.X, train.y), **repairer_kw)
        except ValueError as exc:
            was = ((previous or {}).get("settings") or {}).get("length", "unset")
            if "other train" in str(exc) and was != "unset" and was != args.length:
                first = f"--length {was}" if was is not None else "the longest training sequence"
                again = f"pass --length {was}" if was is not None else "leave --length out"
                raise ValueError(  # the training set differs only in its padded width
                    f"{exc} (the first run padded the token ids to {first}, this one to "
                    f"{'--length ' + str(args.length) if args.length else 'another width'}: a "
                    f"continual run keeps its training set, so {again}; failures longer than "
                    "that need a new run with a larger --length)"
                ) from None
            raise
        # the state a round ahead of summary.json, on this batch: saved, then interrupted
        ahead = len(rep.history) == len((previous or {}).get("observed_failures", [])) + 1
        finishing = ahead and rep.last_round_was((fails.X, fails.y))
        if finishing:  # saved, then interrupted while its outputs were written
            print(
                f"netmend repair: round {len(rep.history)} of {out} was saved before an "
                "interruption; writing its outputs from the saved state",
                file=sys.stderr,
            )
            if rep.model is None:  # load() restores the last round's model
                raise RuntimeError(f"{state_dir}: the saved state holds no repaired model")
            repaired = rep.model
        else:
            repaired = rep.observe((fails.X, fails.y))
        data.not_held_out(rep.failures[0])  # every round's failures, not only this one's
        scores, causes, fisher = rep.scores, rep.causes, rep.fisher
        for i, lab in rep.history[-1]["relabelled"]:
            record.setdefault("suggested", {})[i] = lab
        times["identify"] = rep.history[-1]["seconds"]["identify"]
        times["treat"] = rep.history[-1]["seconds"]["treat"]
        t = time.perf_counter()
        per_failure = rep.per_failure((fails.X, fails.y))
        times["culprits"] = time.perf_counter() - t
        times["round"] = time.perf_counter() - t0  # saved with the outputs, below
    else:
        t0 = time.perf_counter()
        ident = api.identify(
            model,
            (train.X, train.y),
            (fails.X, fails.y),
            args.identify,
            k,
            cache_dir=out / "cache",
            overwrite_cache=args.resume is None,
            gate=False if args.no_gate else None,
            **args.identify_options,
            **common,
        )
        times["identify"] = time.perf_counter() - t0
        scores, causes, fisher = ident.scores, ident.causes, ident.fisher
        theta_plus_f = ident.info.get("theta_plus_f")
        if causes.size == 0:
            raise BadInput(
                "the identification selected no causes (no training example scores as "
                "harmful); try another --identify method"
                + (" or a fixed --k" if k is None or k in ("auto", "positive") else "")
            )
        t0 = time.perf_counter()
        guard_data = data.guard_data
        guarded = (k is None or guard_data is not None) and not args.no_guard
        accepted: nn.Module | None = None
        if guarded and args.treat == "finetune":  # as netmend.repair
            g = guard_k(
                lambda c: treat_with(c, allow_no_causes=True),
                model,
                as_source((train.X, train.y), "train"),
                causes,
                args.seed,
                device,
                guard_data=None
                if guard_data is None
                else as_source((guard_data.X, guard_data.y), "guard data"),
            )
            record["guard"] = g.as_dict()
            causes = causes[: g.k]
            accepted = g.model  # with --guard-data: the accepted trial, the same call
        repaired = accepted if accepted is not None else treat_with(causes, record=record)
        times["treat"] = time.perf_counter() - t0  # with the class guard's trials
        t0 = time.perf_counter()
        try:
            per_failure = ident.per_failure  # one more pass over the training set
        except ValueError:
            per_failure = None
        times["culprits"] = time.perf_counter() - t0
        if args.identify == "ewc":  # keep the state for continual repair (--resume, new failures)
            t0 = time.perf_counter()
            rep = Repairer(model, (train.X, train.y), fisher=fisher, **repairer_kw)
            rep.adopt((fails.X, fails.y), scores, causes, repaired)
            rep.save(state_dir)
            times["continual_state"] = time.perf_counter() - t0

    t0 = time.perf_counter()

    def measure(m: nn.Module) -> dict[str, Any]:
        return data.accuracies(m, device, classes=data.num_classes)

    before, ours = measure(model), measure(repaired)
    accuracies = {"original": _scalars(before), "repaired": _scalars(ours)}
    times["accuracies"] = time.perf_counter() - t0
    control_note = []
    controls_summary: dict[str, Any] | None = None
    verdict: dict[str, Any] | None = None
    if continual and finishing and not args.no_controls:
        # the round's call started from the previous round's model, which the state no
        # longer holds: controls from the original would not be this round's controls
        control_note = [
            "No controls: this round was finished from the state saved before an "
            "interruption, and its treatment call (warm-started from the previous round's "
            "model) cannot be repeated."
        ]
        print(f"netmend repair: warning: {control_note[0]}", file=sys.stderr)
    elif not args.no_controls:
        t0 = time.perf_counter()
        kk = int(causes.size)
        # a continual round's own call starts from the previous round's model (warm, mixed):
        # its controls repeat that call, not a fresh fine-tune of the original
        round_call = continual and rep.controllable
        ctl = run_controls(
            rep.control if round_call else (lambda c: treat_with(c, allow_no_causes=True)),
            measure,
            model,
            len(train),
            kk,
            draws=args.draws,
            seed=args.seed,
        )
        accuracies["control: finetune only"] = _scalars(ctl.finetune_only or {})
        accuracies[f"control: random {kk} causes (mean of {args.draws} draws)"] = {
            key: ctl.random_k_mean(key)[0]
            for key in ctl.random_k[0]
            if key not in ("causes", "class_acc")
        }
        controls_summary = ctl.as_dict()
        times["controls"] = time.perf_counter() - t0
        own = f"the repair's own treatment call ({args.treat})"
        if round_call:
            own = (
                f"this round's own treatment call ({args.treat}, continuing from the previous "
                "round's repaired model as the round does)"
            )
        control_note = [
            f"Controls: {own} with only the causes changed: none removed ('finetune only') "
            f"and {kk} random training examples ('random causes', mean of {args.draws} seeded "
            "draws). A repair counts (the Pareto criterion) when it fixes more held-out "
            "failures than the random causes, keeps test accuracy within "
            f"{100 * TEST_TOLERANCE:.1f} points of the better of the original and "
            f"'finetune only', and no class loses more than {100 * MAX_CLASS_DROP:.0f} points. "
            "The failures the causes were chosen from do not count: they are not held out."
        ]
        verdict = _verdict(ours, ctl)
        if verdict is None:
            control_note.append(
                "No verdict: the criterion reads held-out failures and the test set; "
                + (
                    "this run holds none out (every test failure was among the failures "
                    "given or observed in earlier rounds)."
                    if args.test is not None and args.failure_indices is not None
                    else "pass --test with --failure-indices auto (failures found in the test "
                    "set and split into the ones netmend sees and the ones held out)."
                )
            )
        else:
            said = "passed" if verdict["passed"] else "failed: " + "; ".join(verdict["reasons"])
            control_note.append(
                f"Verdict: {said} (held-out failures {100 * verdict['heldout_gain']:+.1f} points "
                "over the random causes"
                + (
                    f"; worst class {verdict['worst_class']} "
                    f"{-100 * verdict['worst_class_drop'] + 0.0:+.1f} points"  # no "-0.0"
                    if verdict["worst_class"] is not None
                    else ""
                )
                + ")."
            )
            print(f"netmend repair: {control_note[-1]}", file=sys.stderr)
        lost = _recipe_loss(accuracies["original"], accuracies["control: finetune only"])
        if lost is not None:
            print(f"netmend repair: warning: {lost}", file=sys.stderr)
            control_note.append(lost)

    # ---- outputs
    t0 = time.perf_counter()
    if continual and not finishing:
        # saved once the round is measured: interrupted before this, a rerun of the same
        # command redoes the round; after it, the rerun finishes the outputs from the state
        rep.save(state_dir)
    state = (
        repaired.original_state_dict() if isinstance(repaired, Exported) else repaired.state_dict()
    )
    sd = {k_: v.detach().cpu().clone() for k_, v in state.items()}
    save_tensors(out / "repaired.safetensors", sd, {"netmend": __version__})
    suggested: dict[int, int] = dict(record.get("suggested", {}))
    if "new_labels" in record and "causes" in record:
        dropped = record.get("dropped")
        for j, (i, lab) in enumerate(zip(record["causes"].tolist(), record["new_labels"].tolist())):
            if dropped is None or not bool(dropped[j]):
                suggested[int(i)] = int(lab)
    selected = np.zeros(len(train), dtype=bool)
    selected[causes] = True
    ylist = train.y.tolist()
    # where a training example came from: its class name and its file, when the files say
    class_names, paths = train.classes, train.paths

    def origin(i: int) -> list[Any]:
        return ([class_names[ylist[i]]] if class_names is not None else []) + (
            [paths[i]] if paths is not None else []
        )

    origin_head = (["label_name"] if class_names is not None else []) + (
        ["path"] if paths is not None else []
    )

    def suggested_name(i: int) -> list[Any]:  # the suggested index read as a name, beside it
        if class_names is None:
            return []
        lab = suggested.get(i)
        return [None if lab is None else class_names[lab]]

    rows = [
        [i, _fmt(s), ylist[i], suggested.get(i), int(selected[i]), *origin(i), *suggested_name(i)]
        for i, s in enumerate(scores.tolist())
    ]
    named = ["suggested_label_name"] if class_names is not None else []
    write_text_atomic(
        out / "scores.csv",
        _csv(
            ["index", "score", "label", "suggested_label", "selected", *origin_head, *named], rows
        ),
    )
    m = len(fails)
    if per_failure is not None:
        cidx, cscore = culprit_table(per_failure, args.culprits)
    else:
        cidx, cscore = np.zeros((m, 0), np.int64), np.zeros((m, 0))
    test_index = data.query.tolist() if data.query is not None else None  # joins to --test
    fail_paths = fails.paths  # a failure's own file, when it came from an image folder
    crow = [
        [f, r + 1, int(cidx[f, r]), _fmt(float(cscore[f, r])), ylist[int(cidx[f, r])]]
        + ([test_index[f]] if test_index is not None else [])
        + origin(int(cidx[f, r]))
        + ([fail_paths[f]] if fail_paths is not None else [])
        for f in range(m)
        for r in range(cidx.shape[1])
    ]
    head = ["failure", "rank", "training_index", "score", "label"]
    head += ["test_index"] if test_index is not None else []
    head += origin_head + (["failure_path"] if fail_paths is not None else [])
    write_text_atomic(out / "culprits.csv", _csv(head, crow))
    settings = {
        "model": args.model,
        "weights": args.weights,
        "train": args.train,
        "failures": args.failures,
        "test": args.test,
        "guard_data": args.guard_data,
        "classes": args.classes,
        "length": args.length,  # JSONL token ids' width: a resume needs the same
        "failure_indices": args.failure_indices,
        "identify": args.identify,
        "import": list(getattr(args, "plugins", [])) or None,  # a resume needs them again
        "identify_options": args.identify_options or None,
        "treat": args.treat,
        "treat_options": args.treat_options or None,
        "k": k,  # parsed: 50, 0.1, "auto", "positive" or null (the automatic K)
        "seed": args.seed,
        "device": str(device),
        "chunk_size": args.chunk_size,
        "train_config": {"epochs": config.epochs, "batch_size": config.batch_size, "lr": config.lr},
        "no_gate": args.no_gate,
        "no_guard": args.no_guard,
        "controls": not args.no_controls,
        "draws": args.draws,
    }
    research = treatment.research_only().get(args.treat)
    selection = rep.history[-1]["selection"] if continual else {**ident.info, **record}
    gate_record: dict[str, Any] | None = selection.get("label_gate")
    guard_record: dict[str, Any] | None = selection.get("guard")
    summary = {
        "settings": settings,
        "ranks": distributed.world()[1],  # the repaired model varies with it (data-parallel)
        "versions": {
            "netmend": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "data": {
            "kind": train.kind,
            "train": len(train),
            "failures": m,
            "test": None if data.test is None else len(data.test),
            "classes": train.classes,
            # --failure-indices: which test rows the failures and the held-out failures are
            "failure_test_indices": test_index,
            "heldout_test_indices": None if data.heldout is None else data.heldout.tolist(),
        },
        "causes": int(causes.size),
        "research_only": research,  # why the treatment is research-only, or null
        "auto_k": rep.history[-1]["selection"] if continual else ident.info.get("auto_k"),
        "label_gate": gate_record,
        "guard": guard_record,
        "observed_failures": observed,
        "continual": None
        if not (state_dir / STATE_FILE).is_file()
        else [
            {key: e[key] for key in ("round", "new_failures", "failures", "k", "accuracy")}
            | {"added": len(e["added"]), "restored": len(e["restored"])}
            for e in rep.history
        ],
        "relabelled": len([i for i, s in suggested.items() if s != ylist[i]]),
        "accuracies": accuracies,
        "class_accuracies": {
            "original": before.get("class_acc"),
            "repaired": ours.get("class_acc"),
        },
        "controls": controls_summary,
        "verdict": verdict,
        "cache": None if continual else ident.info.get("cache"),
        "times": times,
    }
    pred_after = predict(repaired, fails.X, device).numpy()
    report = ReportData(
        title=f"netmend repair: {Path(args.train).name}",
        kind=train.kind,
        train_X=train.X,
        train_y=train.y,
        failures_X=fails.X,
        failures_y=fails.y,
        scores=scores,
        causes=causes,
        culprit_indices=cidx,
        culprit_scores=cscore,
        accuracies=accuracies,
        pred_before=predict(model, fails.X, device).numpy(),
        pred_after=pred_after,
        suggested=suggested,
        classes=train.classes,
        features=train.features,
        vocab=vocab,
        pad_id=args.pad_id if train.kind == "tokens" else None,
        failure_names=data.failure_names,
        settings={k_: v for k_, v in settings.items() if v is not None},
        notes=[
            *([f"Research-only treatment '{args.treat}': {research}."] if research else []),
            *_round_note(rep if continual else None),
            *control_note,
            *_selection_notes(gate_record, guard_record),
        ],  # fmt: skip
    )
    write_report(out / "report.html", report)
    times["write"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_start
    write_json_atomic(out / "summary.json", finite_or_none(summary))
    if guard_record and guard_record.get("k", 0) < guard_record.get("k_start", 0):
        print(
            f"The class guard cut K from {guard_record['k_start']} to {guard_record['k']} "
            "(a class fell too far in its trial fine-tune; report.html says which)."
        )
    _print_summary(accuracies, causes.size, out)
    return 0


def _check_choices(args: argparse.Namespace) -> None:
    """Refuse misspelt method names, their options and too few control draws before any data
    is read or pass is run (docs/safety.md: options are checked before the identification)."""
    from netmend import identification
    from netmend.lab.bench import parse_step

    # METHOD[opt=value,...], as netmend bench takes them: the method's own options
    args.identify, args.identify_options = parse_step(args.identify)
    args.treat, args.treat_options = parse_step(args.treat)
    identification.get(args.identify)  # ValueError with "did you mean ...?"
    treatment.get(args.treat)
    identification.base.check_options(args.identify, args.identify_options)
    treatment.base.check_options(args.treat, args.treat_options)
    if not args.no_controls and args.draws < MIN_DRAWS:
        raise BadInput(
            f"--draws {args.draws}: the random-causes control needs at least {MIN_DRAWS} draws "
            f"(a mean and its standard error); pass --draws {MIN_DRAWS} or more, or --no-controls"
        )


def _round_note(rep: Repairer | None) -> list[str]:
    """A continual round says which round it is and how it does on every failure so far."""
    if rep is None:
        return []
    h = rep.history[-1]
    return [
        f"Continual repair, round {h['round']}: {h['new_failures']} new failures, "
        f"{h['failures']} observed in all. The 'failures' column is this round's new ones; on "
        f"all {h['failures']} the repaired model gets {100 * h['accuracy']['failures']:.1f}% "
        "right. Held-out failures leave out every round's failures."
    ]


def _scalars(figures: dict[str, Any]) -> dict[str, float]:
    """The accuracies shown in the tables (the per-class list goes to the verdict)."""
    return {k: v for k, v in figures.items() if k != "class_acc"}


def _verdict(ours: dict[str, Any], ctl: Controls) -> dict[str, Any] | None:
    """The Pareto criterion (:func:`netmend.evaluation.controls.repaired`) on this run's
    figures, or ``None`` without held-out failures and a test set to read it on."""

    def figures(d: dict[str, Any]) -> dict[str, Any]:
        return {
            "heldout_failure_acc": d["held-out failures"],
            "test_acc": d["test"],
            "class_acc": d.get("class_acc"),
        }

    runs = [ours, ctl.original, *ctl.random_k] + ([ctl.finetune_only] if ctl.finetune_only else [])
    if not all("held-out failures" in r and "test" in r for r in runs):
        return None
    view = Controls(
        ctl.k,
        figures(ctl.original),
        None if ctl.finetune_only is None else figures(ctl.finetune_only),
        [figures(r) for r in ctl.random_k],
    )
    return pareto_repaired(figures(ours), view).as_dict()


def _selection_notes(gate: dict[str, Any] | None, guard: dict[str, Any] | None) -> list[str]:
    """What the label gate and the class guard did to the automatic causes, in words."""
    notes = []
    if gate and gate["applied"]:
        notes.append(
            f"Label gate: {gate['candidates']} of the {gate['of']} automatic causes are examples "
            "the model does not predict the given label of (likely label errors); only those "
            "were removed (--no-gate keeps all)."
        )
    elif gate:
        notes.append(
            f"Label gate: only {gate['candidates']} of the {gate['of']} automatic causes are "
            "likely label errors, so the causes are something the model learned; all were kept."
        )
    if guard and guard.get("skipped") and guard["skipped"] != "no causes":
        fix = (
            "pass a --guard-data with at least 50 examples of each class"
            if guard.get("source") == "guard_data"
            else "or pass --guard-data (a labelled validation split)"
        )
        notes.append(
            f"Class guard: did not run ({guard['skipped']}), so no trial checked whether "
            f"removing the {guard['k']} causes empties a class: read each class's accuracy, "
            f"{fix}."
        )
    if guard and guard.get("tries") and guard["k"] < guard["k_start"]:
        last = guard["tries"][-1]
        notes.append(
            f"Class guard: a trial fine-tune without {guard['k_start']} causes made class "
            f"{guard['tries'][0]['worst_class']} lose "
            f"{100 * guard['tries'][0]['worst_class_drop']:.0f} points on "
            + ("--guard-data" if guard.get("source") == "guard_data" else "held-out training data")
            + f", so K was cut to {guard['k']} (the worst class then lost "
            f"{100 * last['worst_class_drop']:.0f} points"
            + ("" if guard["passed"] else "; still over the 10-point limit: check each class")
            + ")."
        )
    return notes


def _print_summary(acc: dict[str, dict[str, float]], k: int, out: Path) -> None:
    cols: list[str] = []
    for r in acc.values():
        cols += [c for c in r if c not in cols]
    width = max(len(n) for n in acc) + 2
    print(f"{k} causes selected. Accuracy (%):")
    print(" " * width + "".join(f"{c:>20}" for c in cols))
    for name, r in acc.items():
        vals = "".join(f"{100 * r[c]:>20.2f}" if c in r else f"{'-':>20}" for c in cols)
        print(f"{name:<{width}}{vals}")
    print(
        f"written to {out}/: repaired.safetensors scores.csv culprits.csv summary.json report.html"
    )


def _positive_int(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {n}")
    return n


def seed_argument(text: str) -> int:
    """A command-line seed (every command's), by :func:`netmend.data.validate.check_seed`'s
    rule (a whole number >= 0: numpy's generators refuse negative ones), as argparse says it."""
    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed is a whole number >= 0, not {text}") from None


def add_parser(sub: Any) -> None:
    """Add the ``repair`` subcommand to the CLI's subparsers."""
    r = sub.add_parser(
        "repair",
        help="repair your own model from its failures (your files in, repaired model out)",
        description="Score every training example for how much it caused the failures "
        "(positive = harmful), select the causes, treat the model, and write repaired weights, "
        "scores, culprits, a summary with controls and a self-contained report.html.",
    )
    r.add_argument(
        "--model",
        required=True,
        help="package.module:factory (returns the nn.Module; use with --weights) or a "
        "torch.export program (.pt2 file)",
    )
    r.add_argument("--weights", help=".safetensors or a torch.save'd state_dict")
    r.add_argument(
        "--train",
        required=True,
        help="training set: .npz (X, y), image folder (root/<class>/<img>), .csv or .jsonl",
    )
    r.add_argument("--failures", help="failures with their correct labels (same formats)")
    r.add_argument("--test", help="a test set (same formats): accuracies, --failure-indices")
    r.add_argument(
        "--guard-data",
        help="a labelled validation split the model never trained on (same formats): the class "
        "guard measures its trial repairs there instead of on a slice of the training set; "
        "with it the guard also runs for a fixed --k, and may cut it",
    )
    r.add_argument(
        "--failure-indices",
        metavar="FILE|auto",
        help="failures as indices into --test (.npy or text), or 'auto': the model's test "
        "mistakes split in two halves, one to repair from and one held out",
    )
    r.add_argument(
        "--classes",
        metavar="FILE",
        help="class names in the model's output order, one per line (line 0 is output 0): how "
        "names in folders and CSV/JSONL labels map to the model's classes (default: sorted "
        "names, which are refused when the model's predictions say another order)",
    )
    r.add_argument("--label-column", default="label", help="label column of CSV files")
    r.add_argument("--pad-id", type=int, default=0, help="padding id of JSONL token ids (0)")
    r.add_argument(
        "--length",
        type=_positive_int,
        metavar="N",
        help="pad the token ids of every JSONL file to N (default: the longest training "
        "sequence; failures or test sequences longer than that need a larger N)",
    )
    r.add_argument("--vocab", help="a text file of tokens, one per line (id = line number)")
    names = api.available()
    r.add_argument(
        "--identify",
        default=api.DEFAULT_IDENTIFY,
        metavar="METHOD[opt=value,...]",
        help=f"identification method, with its options in brackets, e.g. 'trak[proj_dim=512]' "
        f"(default {api.DEFAULT_IDENTIFY}; one of {', '.join(names['identify'])})",
    )
    r.add_argument(
        "--treat",
        default=api.DEFAULT_TREAT,
        metavar="METHOD[opt=value,...]",
        help=f"treatment, with its options in brackets, e.g. 'finetune[steps=200]' (default "
        f"{api.DEFAULT_TREAT}; one of {', '.join(names['treat'])}; research-only: "
        f"{', '.join(names['research_only'])})",
    )
    r.add_argument("--k", help="causes: an int, a fraction, 'positive' or 'auto' (default)")
    r.add_argument("--seed", type=seed_argument, default=0, help="seed of everything random (0)")
    r.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    r.add_argument("--chunk-size", type=int, default=128, help="examples per batched pass")
    r.add_argument("--epochs", type=float, help="epochs the model trained for (3)")
    r.add_argument("--batch-size", type=int, help="its training batch size (128)")
    r.add_argument("--lr", type=float, help="its Adam learning rate (1e-3)")
    r.add_argument(
        "--culprits", type=_positive_int, default=5, help="culprits listed per failure (5)"
    )
    r.add_argument("--no-controls", action="store_true", help="skip the control repairs")
    r.add_argument(
        "--no-gate",
        action="store_true",
        help="keep every automatic cause even when most are label errors (see docs/methods.md)",
    )
    r.add_argument(
        "--no-guard",
        action="store_true",
        help="keep the automatic K even if a trial fine-tune loses a class (see docs/methods.md)",
    )
    r.add_argument("--draws", type=int, default=3, help="random-causes control draws (at least 3)")
    r.add_argument("--out", help=f"output folder ({DEFAULT_OUT})")
    r.add_argument(
        "--resume",
        metavar="DIR",
        help="continue an earlier run in DIR (its cache; with new --failures, a continual round)",
    )
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out, replacing its outputs (its cache is reused where "
        "the settings match, replaced where they differ)",
    )
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    r.set_defaults(func=run)
