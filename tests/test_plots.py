import numpy as np
import torch
from matplotlib.image import imread

from netmend.api import Culprits
from netmend.report.plots import accuracy_bars, culprit_grid


def test_culprit_grid_writes_one_row_per_failure(tmp_path):
    g = torch.Generator().manual_seed(0)
    train_X = torch.rand(20, 1, 8, 8, generator=g)
    fails = torch.rand(3, 64, generator=g)  # flat squares are reshaped
    culprits = [Culprits(np.array([i, i + 1, i + 2]), np.array([3.0, 2.0, 1.0])) for i in range(3)]
    mask = np.zeros(20, dtype=bool)
    mask[1] = True
    p = culprit_grid(
        fails,
        [1, 2, 3],
        [7, 7, 7],
        train_X,
        list(range(20)),
        culprits,
        tmp_path / "g" / "c.png",
        mask,
    )
    img = imread(p)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w = img.shape[:2]
    assert h > w * 0.8  # 3 rows x 4 columns at 1.8 x 1.6 inches per cell
    # the corrupted culprit's red frame is drawn: some strongly red pixels exist
    red = (img[..., 0] > 0.9) & (img[..., 1] < 0.2) & (img[..., 2] < 0.2)
    assert red.sum() > 20


def test_accuracy_bars(tmp_path):
    run = {
        "identify": "ewc",
        "treat": "finetune",
        "default": True,
        "test_acc": 0.98,
        "heldout_failure_acc": 0.5,
        "correct_acc": 0.99,
    }
    ref = {"test_acc": 0.97, "heldout_failure_acc": 0.0, "correct_acc": 1.0}
    p = accuracy_bars({"runs": [run], "references": {"original": ref}}, tmp_path / "a.png")
    assert imread(p).shape[1] > 300


def test_accuracy_bars_draw_the_defaults_controls(tmp_path, monkeypatch):
    """The demo's accuracy.png drew the default alone: 90.8% test against the original's 79.9%
    read as a large repair, while finetune-only (95.4%) and random-K were left out."""
    from netmend.report import plots

    drawn: list[list[str]] = []
    real = plots._save

    def spy(plt, fig, path):
        drawn.append([t.get_text() for t in fig.axes[0].get_yticklabels()])
        return real(plt, fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    fig_ = {"test_acc": 0.95, "heldout_failure_acc": 0.2, "correct_acc": 0.99}
    controls = {"k": 7, "finetune_only": fig_, "random_k": dict(fig_, draws=3)}
    run = {"identify": "ewc", "treat": "finetune", "default": True, **fig_, "controls": controls}
    accuracy_bars({"runs": [run], "references": {"original": fig_}}, tmp_path / "a.png")
    assert drawn[0] == [
        "ewc/finetune*", "  control: finetune only", "  control: random 7 causes", "original"
    ]  # fmt: skip
