"""The report builder and the file loaders against brute-force references."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from netmend import api, cli
from netmend.data.files import load_csv, load_data, load_image_folder, load_indices, load_jsonl
from netmend.evaluation import split_failures
from netmend.lab import demo
from netmend.lab.datasets import Split
from netmend.lab.models import MLP
from netmend.model.training import TrainConfig, fit
from netmend.report.html import culprit_table, score_histogram_svg


def test_culprit_table_matches_a_full_sort():
    pf = np.random.default_rng(0).normal(size=(50, 7))
    pf[3, 2] = pf[4, 2]  # a tie: the lower index first
    idx, sc = culprit_table(pf, 4)
    for m in range(7):
        order = np.argsort(-pf[:, m], kind="stable")[:4]
        np.testing.assert_array_equal(idx[m], order)
        np.testing.assert_array_equal(sc[m], pf[order, m])
    idx, _ = culprit_table(pf, 80)  # more than N: all of them, sorted
    assert idx.shape == (7, 50)
    with pytest.raises(ValueError, match="at least 1"):
        culprit_table(pf, 0)


def test_histogram_counts_every_score_and_marks_the_selected_causes():
    """Red counts the selected causes bin by bin: causes picked by rank and then thinned (label
    gate, guard) leave unselected examples above the least harmful cause, which a threshold
    line painted red (an outside-in trial: 677 examples at or above it, 32 selected)."""
    s = np.random.default_rng(1).normal(size=500)
    top = np.argsort(-s)[:40]
    selected = top[::4]  # every fourth of the top 40: thinned, as the gate does
    svg = score_histogram_svg(s, selected, bins=20)
    counts = [int(c) for c in re.findall(r": (\d+) examples", svg)]
    assert len(counts) == 20 and sum(counts) == 500
    red = [int(c) for c in re.findall(r'class="bad"><title>[^:]*: (\d+) selected', svg)]
    assert sum(red) == selected.size == 10
    assert "red: the 10 selected causes" in svg and "≥" not in svg
    assert 'class="bad"' not in score_histogram_svg(s, None, bins=20)


def test_loaders(tmp_path):
    X = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.savez(tmp_path / "a.npz", X=X, y=np.array([0, 1, 1, 0]))
    d = load_data(tmp_path / "a.npz")
    assert d.kind == "array" and torch.equal(d.X, torch.from_numpy(X))
    (tmp_path / "t.csv").write_text("x,y,label\n1,2,b\n3,4,a\n")
    c = load_csv(tmp_path / "t.csv")
    assert c.classes == ["a", "b"] and c.y.tolist() == [1, 0] and c.features == ["x", "y"]
    c2 = load_csv(tmp_path / "t.csv", classes=["b", "a"])  # the training set's mapping
    assert c2.y.tolist() == [0, 1]
    with pytest.raises(ValueError, match="not classes"):
        load_csv(tmp_path / "t.csv", classes=["a", "c"])
    (tmp_path / "bad.csv").write_text("x,label\nfoo,1\n")
    with pytest.raises(ValueError, match="line 2"):
        load_csv(tmp_path / "bad.csv")
    (tmp_path / "s.jsonl").write_text('{"ids": [3, 4], "label": 1}\n\n{"ids": [5], "label": 0}\n')
    j = load_jsonl(tmp_path / "s.jsonl", pad_id=9)
    assert j.X.tolist() == [[3, 4], [5, 9]] and j.y.tolist() == [1, 0]
    assert load_jsonl(tmp_path / "s.jsonl", length=4).X.shape == (2, 4)
    with pytest.raises(ValueError, match="padded to 1"):
        load_jsonl(tmp_path / "s.jsonl", length=1)
    for name in ("c0", "c1"):
        (tmp_path / "img" / name).mkdir(parents=True)
    rgb = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img" / "c1" / "x.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "img" / "c0" / "y.png")
    im = load_image_folder(tmp_path / "img")
    assert im.X.shape == (2, 3, 5, 4) and im.y.tolist() == [0, 1]  # mixed: all as RGB
    np.testing.assert_allclose(im.X[1].numpy(), rgb.transpose(2, 0, 1) / 255.0, atol=1e-7)
    np.testing.assert_allclose(im.X[0, 1].numpy(), rgb[..., 0] / 255.0, atol=1e-7)
    Image.fromarray(rgb[:3]).save(tmp_path / "img" / "c1" / "z.png")
    with pytest.raises(ValueError, match="resize"):
        load_image_folder(tmp_path / "img")
    (tmp_path / "i.txt").write_text("2, 0\n1")
    assert load_indices(tmp_path / "i.txt", 3).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="repeat"):
        (tmp_path / "r.txt").write_text("1 1")
        load_indices(tmp_path / "r.txt", 3)
    with pytest.raises(ValueError, match="unknown data format"):
        load_data(tmp_path / "i.txt")


def test_demo_writes_a_report(monkeypatch, tmp_path, capsys):
    """``netmend demo --report`` on a tiny stand-in for the demo's result."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.rand(120, 1, 4, 4, generator=g, dtype=torch.float64), torch.arange(120) % 3
    Xt, yt = torch.rand(60, 1, 4, 4, generator=g, dtype=torch.float64), torch.arange(60) % 3
    torch.manual_seed(0)
    model = fit(MLP(16, 3, (6,)).double(), X, y, TrainConfig(epochs=3), progress=False).eval()
    split = split_failures(model, Xt, yt)
    ident = api.identify(model, (X, y), (Xt[split.query], yt[split.query]), k=5, progress=False)
    row = {"test_acc": 0.5, "query_failure_acc": 0.1, "heldout_failure_acc": 0.2,
           "correct_acc": 0.9}  # fmt: skip
    result = {
        "config": {"seed": 0},
        "data": {"train": 120},
        "runs": [{"identify": "ewc", "treat": "finetune", "default": True, **row}],
        "references": {"original": row, "retrain": row},
        "_artifacts": {
            "model": model, "train": Split(X, y), "noisy_labels": y, "mask": np.zeros(120, bool),
            "test": Split(Xt, yt), "split": split, "identification": ident,
            "per_failure": ident.per_failure,
        },
    }  # fmt: skip
    monkeypatch.setattr(demo, "run", lambda config, progress=True: result)
    monkeypatch.setattr(demo, "table", lambda result: "TABLE")
    path = tmp_path / "r" / "report.html"
    assert cli.main(["demo", "--no-progress", "--report", str(path)]) == 0
    html = path.read_text()
    data = json.loads(re.search(r'id="nm-data">(.*?)</script>', html, re.S).group(1))
    assert len(data["failures"]) == len(split.query)
    first = data["failures"][0]
    top = ident.culprits(0, 5)
    assert [c["i"] for c in first["culprits"]] == top.indices.tolist()
    assert "report written to" in capsys.readouterr().out


def test_demo_report_shows_the_defaults_controls(tmp_path):
    """The demo report's table is titled 'with controls' but held none, and its note named
    rows that were not there ('random/finetune', 'oracle_clean') (found by an outside-in
    trial)."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from netmend.evaluation import FailureSplit
    from netmend.report.html import demo_report

    stored = json.loads((Path(__file__).parents[1] / "benchmarks/demo_seeds.json").read_text())
    result = stored["seeds"][0]
    g = torch.Generator().manual_seed(0)
    train = SimpleNamespace(X=torch.rand(20, 1, 28, 28, generator=g), y=torch.arange(20) % 10)
    test = SimpleNamespace(X=torch.rand(6, 1, 28, 28, generator=g), y=torch.arange(6) % 10)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).eval()
    split = FailureSplit(np.arange(3), np.arange(3, 5), np.arange(5, 6))
    ident = SimpleNamespace(scores=np.linspace(1, -1, 20), causes=np.arange(4))
    artifacts = {
        "split": split, "test": test, "identification": ident, "train": train, "model": model,
        "per_failure": np.random.default_rng(0).normal(size=(20, 3)), "noisy_labels": train.y,
    }  # fmt: skip
    html = demo_report(result, artifacts, tmp_path / "r.html").read_text()
    assert "control: finetune only" in html and "control: oracle causes" in html
    c = next(r for r in result["runs"] if r["default"])["controls"]
    assert f"control: random {c['k']} causes (mean of {c['random_k']['draws']} draws)" in html
    assert "oracle_clean" not in html and "random/finetune" not in html
    # the verdict and the gain beside the table (the page had neither: an outside-in trial)
    run = next(r for r in result["runs"] if r["default"])
    assert ("): passed." if run["verdict"]["passed"] else "): failed: ") in html
    assert f"held-out failures {100 * run['gain']['heldout_gain']:+.1f} ± " in html
