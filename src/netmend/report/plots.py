"""Pictures of a repair: culprit image grids and before/after accuracy bars (PNG, matplotlib).

Uses the non-interactive Agg backend, so it works on machines without a screen.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netmend.api import Culprits


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _image(x: torch.Tensor) -> np.ndarray:
    a = x.detach().cpu().float().numpy()
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    elif a.ndim == 1:
        side = int(round(a.size**0.5))
        a = a.reshape(side, side) if side * side == a.size else a[None, :]
    return a


def culprit_grid(
    failure_X: torch.Tensor,
    failure_y: Sequence[int],
    failure_pred: Sequence[int],
    train_X: torch.Tensor,
    train_labels: Sequence[int],
    culprits: Sequence[Culprits],
    path: str | Path,
    corrupted: np.ndarray | None = None,
) -> Path:
    """One row per failure: the failure, then its culprits (most harmful first).

    Args:
        failure_X: ``[R, ...]`` failure inputs (images ``[1, H, W]`` or flat squares).
        failure_y, failure_pred: their correct labels and the model's predictions ``[R]``.
        train_X: training inputs ``[N, ...]``; train_labels: the labels trained on ``[N]``.
        culprits: one :class:`Culprits` per failure row.
        path: PNG file to write.
        corrupted: optional ``[N]`` mask; corrupted culprits get a red frame.

    Returns:
        The path written.
    """
    plt = _pyplot()
    rows = len(culprits)
    cols = 1 + max((len(c.indices) for c in culprits), default=0)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for r, c in enumerate(culprits):
        ax = axes[r, 0]
        ax.imshow(_image(failure_X[r]), cmap="gray")
        ax.set_title(f"failure\ntrue {failure_y[r]}, said {failure_pred[r]}", fontsize=8)
        for j in range(1, cols):
            ax = axes[r, j]
            if j - 1 >= len(c.indices):
                ax.axis("off")
                continue
            i = int(c.indices[j - 1])
            ax.imshow(_image(train_X[i]), cmap="gray")
            ax.set_title(f"#{i} label {int(train_labels[i])}\nr={c.scores[j - 1]:.2g}", fontsize=8)
            if corrupted is not None and corrupted[i]:
                for s in ax.spines.values():
                    s.set_edgecolor("red")
                    s.set_linewidth(3)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Failures and the training examples most to blame (red frame = corrupted)")
    return _save(plt, fig, path)


def accuracy_bars(result: dict[str, Any], path: str | Path) -> Path:
    """Grouped bars: test, held-out-failure and correct-set accuracy for each pipeline.

    Args:
        result: a demo result (``runs`` and ``references``, see :func:`netmend.lab.demo.run`).
        path: PNG file to write.
    """
    plt = _pyplot()
    names, rows, colours = [], [], []
    for r in result["runs"]:
        names.append(f"{r['identify']}/{r['treat']}" + ("*" if r["default"] else ""))
        rows.append(r)
        colours.append("C0")
        c = r.get("controls") if r["default"] else None
        if c:  # the default's controls beside it: a bar alone read as a large repair
            for label, fig_ in (
                ("  control: finetune only", c.get("finetune_only")),
                (f"  control: random {c['k']} causes", c.get("random_k")),
                ("  control: oracle at K", c.get("oracle_at_k")),
                ("  control: oracle ranked", c.get("oracle_ranked")),
                ("  control: oracle causes", c.get("oracle_causes")),
            ):
                if fig_:
                    names.append(label)
                    rows.append(fig_)
                    colours.append("C1")
    for name, ref in result["references"].items():
        names.append(name)
        rows.append(ref)
        colours.append("C7")
    keys = [
        ("test_acc", "whole test set"),
        ("heldout_failure_acc", "held-out failures"),
        ("correct_acc", "originally correct"),
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 0.45 * len(names) + 1.5))
    for ax, (key, title) in zip(axes, keys):
        vals = [100 * float(r.get(key, float("nan"))) for r in rows]
        ax.barh(range(len(names)), vals, color=colours)
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names))
        ax.invert_yaxis()
        ax.set_title(f"{title} (%)")
        lo = min(v for v in vals if v == v) if any(v == v for v in vals) else 0.0
        ax.set_xlim(max(0.0, lo - (100 - lo) * 0.3 - 1), 100)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    fig.suptitle(
        "Accuracy after each repair (* = netmend.repair default; orange = its controls, the "
        "same treatment with other causes; grey = references)"
    )
    return _save(plt, fig, path)


def demo_plots(
    result: dict[str, Any], artifacts: dict[str, Any], out_dir: str | Path
) -> list[Path]:
    """The demo's pictures: ``accuracy.png`` and ``culprits.png`` (8 query failures)."""
    out = Path(out_dir)
    paths = [accuracy_bars(result, out / "accuracy.png")]
    split, test = artifacts["split"], artifacts["test"]
    ident, train = artifacts["identification"], artifacts["train"]
    rows = np.arange(min(8, len(split.query)))
    fx, fy = test.X[split.query[rows]], test.y[split.query[rows]]
    from netmend.model.training import predict

    pred = predict(artifacts["model"], fx.to(next(artifacts["model"].parameters()).device))
    culprits = [ident.culprits(int(i), 6) for i in rows]
    paths.append(
        culprit_grid(
            fx,
            fy.tolist(),
            pred.tolist(),
            train.X,
            artifacts["noisy_labels"].tolist(),
            culprits,
            out / "culprits.png",
            artifacts["mask"],
        )
    )
    return paths
