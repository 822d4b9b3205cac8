"""Load a labelled data set from the user's files: ``.npz``, an image folder, CSV or JSONL.

Every loader returns a :class:`FileData`: the inputs ``X`` ``[N, ...]``, the labels ``y``
``[N]`` (int64), the class names, and what kind of data it is (so a report can show it:
images as thumbnails, tabular rows as feature tables, token ids as text). A malformed file
raises :class:`ValueError` naming the file and what to fix.

Formats (chosen by :func:`load_data` from the path):

* ``.npz``: arrays ``X`` ``[N, ...]`` and ``y`` ``[N]`` (integer labels).
* a folder in the ImageFolder layout, ``root/<class name>/<image>``: class ``c`` is the
  ``c``-th class folder in sorted order (as ``torchvision.datasets.ImageFolder``); images are
  decoded with Pillow into float32 tensors in ``[0, 1]`` of shape ``[C, H, W]`` (``C = 1`` if
  every image is greyscale, else 3) and must all have the same size.
* ``.csv``: a header row, one example per row; the label column is ``label_column``
  (default ``"label"``) and every other column is a numeric feature (float32).
* ``.jsonl``: one JSON object per line, ``{"ids": [int, ...], "label": k}``; the id lists
  are right-padded with ``pad_id`` to the longest (or to ``length``), giving int64 ``[N, L]``.

Labels in CSV and JSONL may be integers or class names; names are mapped to indices through
``classes`` (the training set's, so that the failures use the same indices) or, for the
training set, by sorting the distinct names.
"""

from __future__ import annotations

import csv
import json
import os
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
KINDS = ("array", "images", "tabular", "tokens")


@dataclass
class FileData:
    """A labelled data set read from files.

    Attributes:
        X: inputs ``[N, ...]`` (float32 images ``[N, C, H, W]`` in [0, 1], float32 features
            ``[N, F]``, int64 token ids ``[N, L]``, or the ``.npz`` array as stored).
        y: labels ``[N]`` int64.
        kind: "array", "images", "tabular" or "tokens".
        classes: class names, index = label (``None`` when the labels were integers).
        features: feature (column) names of tabular data.
        paths: the image file of each example (image folders only).
        source: the path it was read from.
    """

    X: torch.Tensor
    y: torch.Tensor
    kind: str
    classes: list[str] | None = None
    features: list[str] | None = None
    paths: list[str] | None = field(default=None, repr=False)
    source: str = ""

    def __len__(self) -> int:
        return int(self.y.shape[0])


def load_data(
    path: str | os.PathLike[str],
    *,
    label_column: str = "label",
    classes: Sequence[str] | None = None,
    pad_id: int = 0,
    length: int | None = None,
    workers: int | None = None,
) -> FileData:
    """Read a labelled data set from ``path`` (format chosen by its suffix or being a folder).

    Args:
        path: an ``.npz`` file, an ImageFolder-layout folder, a ``.csv`` or a ``.jsonl`` file.
        label_column: the CSV column holding the labels.
        classes: class names of the training set, so that another split maps names to the same
            indices (image folders: sub-folder names; CSV/JSONL: string labels).
        pad_id: padding token of JSONL id lists.
        length: pad JSONL id lists to this length (default: the longest list).
        workers: threads decoding images (default: ``min(8, cpu count)``).

    Returns:
        A :class:`FileData`.

    Raises:
        ValueError: a missing file, an unknown format, or malformed content (the message names
            the file and what to fix).
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such file or folder")
    if p.is_dir():
        return load_image_folder(p, classes=classes, workers=workers)
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return load_npz(p, classes=classes)
    if suffix == ".csv":
        return load_csv(p, label_column=label_column, classes=classes)
    if suffix in (".jsonl", ".ndjson"):
        return load_jsonl(p, classes=classes, pad_id=pad_id, length=length)
    raise ValueError(
        f"{p}: unknown data format {suffix!r}; pass an .npz file (X, y), a folder of images in "
        "class sub-folders, a .csv file (with --label-column) or a .jsonl file of token ids"
    )


def load_npz(path: str | os.PathLike[str], classes: Sequence[str] | None = None) -> FileData:
    """Read arrays ``X`` ``[N, ...]`` and ``y`` ``[N]`` from an ``.npz`` file (no pickles).

    ``y`` holds class indices, or class names (a string array) numbered through ``classes``
    (the training set's) or in sorted order, as the CSV and JSONL labels are.
    """
    p = Path(path)
    if p.is_file() and not zipfile.is_zipfile(p):  # numpy would call it "pickled data"
        raise ValueError(
            f"{p}: not an .npz archive (numpy.savez writes one: numpy.savez(path, X=X, y=y))"
        )
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in ("X", "y") if k not in z.files]
            if missing:
                raise ValueError(
                    f"{p}: the .npz file has arrays {z.files} but needs 'X' (inputs [N, ...]) "
                    "and 'y' (labels [N]); save it with numpy.savez(path, X=X, y=y)"
                )
            X, y = z["X"], z["y"]
    except ValueError as exc:
        if str(p) in str(exc):
            raise
        raise ValueError(f"{p}: cannot read it as an .npz of numeric arrays ({exc})") from exc
    except (OSError, EOFError) as exc:
        raise ValueError(f"{p}: cannot read it as an .npz file ({exc})") from exc
    if X.dtype.kind not in "biuf":
        raise ValueError(f"{p}: X must be a numeric array; got {X.dtype}")
    if y.dtype.kind not in "biufUS":
        raise ValueError(
            f"{p}: y must hold class indices (integers) or class names (strings); got {y.dtype}"
        )
    if y.ndim != 1 or X.ndim < 1 or X.shape[0] != y.shape[0]:
        raise ValueError(
            f"{p}: X must be [N, ...] and y [N] with the same N; got {X.shape} and {y.shape}"
        )
    names = None
    if y.dtype.kind in "US":
        raw = [v.decode() if isinstance(v, bytes) else str(v) for v in y.tolist()]
        labels, names = _label_indices(raw, classes, str(p))
    elif y.dtype.kind == "f" and not np.all(y == np.round(y)):
        raise ValueError(f"{p}: y must hold integer class indices")
    else:
        labels = torch.from_numpy(y.astype(np.int64))
    return FileData(torch.from_numpy(X.copy()), labels, "array", classes=names, source=str(p))


def _label_indices(
    raw: list[Any], classes: Sequence[str] | None, where: str
) -> tuple[torch.Tensor, list[str] | None]:
    """Integer labels as they are; string labels through ``classes`` (or sorted names)."""
    ints: list[int] = []
    for v in raw:
        digits = isinstance(v, str) and v.strip().lstrip("-").isdigit() and classes is None
        whole = isinstance(v, float) and v.is_integer()
        if isinstance(v, int) and not isinstance(v, bool):
            ints.append(v)
        elif digits or whole:
            ints.append(int(v))
        else:
            break
    else:
        if ints and min(ints) < 0:
            raise ValueError(f"{where}: labels must be class indices >= 0; found {min(ints)}")
        return torch.tensor(ints, dtype=torch.int64), list(classes) if classes else None
    names = [str(v) for v in raw]
    if classes is None:
        classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise ValueError(
            f"{where}: label(s) {unknown[:5]} are not classes of the training set {list(classes)}"
        )
    return torch.tensor([index[n] for n in names], dtype=torch.int64), list(classes)


def load_csv(
    path: str | os.PathLike[str],
    *,
    label_column: str = "label",
    classes: Sequence[str] | None = None,
) -> FileData:
    """Read a CSV with a header: ``label_column`` is the label, the rest numeric features."""
    p = Path(path)
    with open(p, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{p}: the CSV file is empty; it needs a header row and data rows")
    header, body = rows[0], [r for r in rows[1:] if r]
    if label_column not in header:
        raise ValueError(
            f"{p}: no column {label_column!r} (columns: {header}); name the label column with "
            "--label-column"
        )
    if not body:
        raise ValueError(f"{p}: the CSV file has a header but no data rows")
    li = header.index(label_column)
    features = [h for i, h in enumerate(header) if i != li]
    if not features:
        raise ValueError(f"{p}: the CSV file has no feature columns besides {label_column!r}")
    values = np.empty((len(body), len(features)), dtype=np.float32)
    labels: list[Any] = []
    for r, row in enumerate(body):
        if len(row) != len(header):
            raise ValueError(
                f"{p}, line {r + 2}: {len(row)} fields but the header has {len(header)}"
            )
        labels.append(row[li])
        try:
            values[r] = [float(v) for i, v in enumerate(row) if i != li]
        except ValueError as exc:
            raise ValueError(
                f"{p}, line {r + 2}: a feature is not a number ({exc}); encode categorical "
                "columns as numbers before calling netmend"
            ) from exc
    y, names = _label_indices(labels, classes, str(p))
    return FileData(torch.from_numpy(values), y, "tabular", names, features, source=str(p))


class SequenceTooLong(ValueError):
    """A JSONL file holds a sequence longer than the width it is to be padded to.

    Attributes:
        longest: the file's longest sequence, in ids.
        width: the width asked for (``length``).
    """

    def __init__(self, path: Path, longest: int, width: int) -> None:
        self.longest, self.width = longest, width
        super().__init__(
            f"{path}: a sequence has {longest} ids but the training sequences are padded to "
            f"{width}; truncate it or pad the training set to the same length"
        )


def load_jsonl(
    path: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    pad_id: int = 0,
    length: int | None = None,
) -> FileData:
    """Read ``{"ids": [...], "label": k}`` lines into right-padded int64 ids ``[N, L]``."""
    p = Path(path)
    seqs: list[list[int]] = []
    labels: list[Any] = []
    with open(p) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}, line {n}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict) or "ids" not in obj or "label" not in obj:
                raise ValueError(f'{p}, line {n}: each line must be {{"ids": [...], "label": k}}')
            ids = obj["ids"]
            if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
            ):
                raise ValueError(f'{p}, line {n}: "ids" must be a list of token ids (ints >= 0)')
            if obj["label"] is None or isinstance(obj["label"], (bool, list, dict)):
                raise ValueError(
                    f'{p}, line {n}: "label" is {json.dumps(obj["label"])}: every example needs '
                    "its class (an index, or a name); leave unlabelled lines out"
                )
            seqs.append(ids)
            labels.append(obj["label"])
    if not seqs:
        raise ValueError(f"{p}: no examples; write one JSON object per line")
    longest = max(len(s) for s in seqs)
    width = longest if length is None else length
    if width < longest:
        raise SequenceTooLong(p, longest, width)
    X = torch.full((len(seqs), max(width, 1)), pad_id, dtype=torch.int64)
    for r, s in enumerate(seqs):
        X[r, : len(s)] = torch.tensor(s, dtype=torch.int64)
    y, names = _label_indices(labels, classes, str(p))
    return FileData(X, y, "tokens", names, source=str(p))


def _decode(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = "L" if im.mode in ("L", "1", "I", "I;16", "F") else "RGB"
            return np.asarray(im.convert(mode))
    except OSError as exc:  # a truncated file fails in convert(), with no path in the message
        if str(path) in str(exc):
            raise
        raise OSError(f"{path}: {exc}") from exc


def load_image_folder(
    root: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    workers: int | None = None,
) -> FileData:
    """Read ``root/<class>/<image>`` into float32 ``[N, C, H, W]`` in [0, 1] and labels."""
    root = Path(root)
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise ValueError(
            f"{root}: no class sub-folders; put each image in a folder named after its class "
            "(root/<class>/<image>.png)"
        )
    if classes is None:
        classes = found
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise ValueError(f"{root}: class folder(s) {unknown} are not training classes {classes}")
    paths: list[Path] = []
    labels: list[int] = []
    for c in found:
        files = sorted(
            f for f in (root / c).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
        )
        paths += files
        labels += [index[c]] * len(files)
    if not paths:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    n_workers = workers or min(8, os.cpu_count() or 1)
    try:
        with ThreadPoolExecutor(n_workers) as pool:
            arrays = list(pool.map(_decode, paths, chunksize=256))
    except OSError as exc:
        raise ValueError(f"{root}: an image cannot be decoded ({exc})") from exc
    grey = all(a.ndim == 2 for a in arrays)
    shape = arrays[0].shape[:2]
    out = np.empty((len(arrays), 1 if grey else 3, *shape), dtype=np.uint8)
    for i, a in enumerate(arrays):
        if a.shape[:2] != shape:
            raise ValueError(
                f"{paths[i]}: size {a.shape[1]}x{a.shape[0]} differs from {shape[1]}x{shape[0]} "
                "of the first image; resize all images to one size"
            )
        if a.ndim == 2:
            out[i] = a if grey else a[None]
        else:
            out[i] = a.transpose(2, 0, 1)
    X = torch.from_numpy(out).float().div_(255.0)
    return FileData(
        X,
        torch.tensor(labels, dtype=torch.int64),
        "images",
        list(classes),
        paths=[str(p) for p in paths],
        source=str(root),
    )


def load_indices(path: str | os.PathLike[str], n: int) -> np.ndarray:
    """Read example indices (``.npy``, or text: one per line or comma-separated) in ``[0, n)``."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such file of failure indices")
    try:
        if p.suffix.lower() == ".npy":
            idx = np.load(p, allow_pickle=False)
        else:
            text = p.read_text().replace(",", " ").split()
            idx = np.array([int(t) for t in text], dtype=np.int64)
    except ValueError as exc:
        raise ValueError(f"{p}: failure indices must be integers ({exc})") from exc
    idx = np.asarray(idx).reshape(-1)
    if idx.dtype.kind not in "iu":
        raise ValueError(f"{p}: failure indices must be integers; got {idx.dtype}")
    idx = idx.astype(np.int64)
    if idx.size == 0:
        raise ValueError(f"{p}: no failure indices")
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"{p}: failure indices must lie in [0, {n}) (the test set's size)")
    if np.unique(idx).size != idx.size:
        raise ValueError(f"{p}: failure indices repeat; list each test example once")
    return idx
