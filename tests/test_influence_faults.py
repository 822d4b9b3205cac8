"""Faults seen in peers' influence code, pinned for every method of the influence family:
silent NaN at default settings, dependence on the chunk size, batches larger than the chunk
size, top-k instead of all N scores, and the sign of a planted conflicting example."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import netmend
from netmend.lab.models import MLP, LogisticRegression

DT = torch.float64
METHODS = [
    ("influence", {}),
    ("influence", {"curvature": "fisher"}),
    ("influence", {"curvature": "kfac"}),
    ("influence", {"solver": "lissa", "lissa_depth": 40}),  # the auto depth runs ~1e4 steps
    ("ekfac", {}),
    ("tracin", {}),
    ("grad_dot", {}),
    ("grad_cos", {}),
    ("trak", {}),
    ("trak", {"projection": "gaussian", "proj_dim": 8}),
    ("ekfac", {"target": "self"}),
    ("influence", {"curvature": "diag", "target": "self"}),  # CG self-influence: test_influence
    ("tracin", {"target": "self"}),
    ("grad_dot", {"target": "self"}),
    ("trak", {"target": "self"}),
]
IDS = [name + "".join(f"-{v}" for v in opts.values()) for name, opts in METHODS]


@pytest.fixture(scope="module")
def dead_task():
    """An MLP with a dead hidden unit (zero gradient and zero curvature along its weights) and
    a training example so far out that its softmax saturates (its gradient is exactly 0)."""
    torch.manual_seed(11)
    model = MLP(2, 3, hidden=(4,)).double().eval()
    with torch.no_grad():
        model.net[1].weight[0] = 0.0
        model.net[1].bias[0] = -1.0  # ReLU(-1) = 0 for every input
    g = torch.Generator().manual_seed(12)
    X = torch.randn(29, 2, generator=g, dtype=DT)
    X = torch.cat([X, torch.tensor([[4e3, -3e3]], dtype=DT)])
    with torch.no_grad():
        y = torch.randint(0, 3, (30,), generator=g)
        y[-1] = model(X[-1:]).argmax(1)[0]
        assert float(torch.softmax(model(X[-1:]), 1).max()) == 1.0
    Xq = torch.randn(3, 2, generator=g, dtype=DT)
    with torch.no_grad():
        yq = (model(Xq).argmax(1) + 1) % 3
    return model, X, y, Xq, yq


_cache: dict = {}


def run(task, name, opts, chunk_size):
    key = (name, tuple(opts.items()), chunk_size)
    if key not in _cache:
        model, X, y, Xq, yq = task
        sizes: list[int] = []
        h = model.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
        try:
            r = netmend.identify(
                model, (X, y), (Xq, yq), method=name, k=2, chunk_size=chunk_size,
                progress=False, device="cpu", **opts,
            )  # fmt: skip
            pf = r.per_failure
        finally:
            h.remove()
        _cache[key] = (r, pf, sizes)
    return _cache[key]


@pytest.mark.parametrize(("name", "opts"), METHODS, ids=IDS)
def test_no_nan_with_dead_units_and_saturated_examples(dead_task, name, opts):
    r, pf, _ = run(dead_task, name, opts, 128)  # 128: the default chunk size
    assert np.isfinite(r.scores).all() and np.isfinite(pf).all()
    assert np.abs(r.scores).max() > 0  # not silently zeroed either


@pytest.mark.parametrize(("name", "opts"), METHODS, ids=IDS)
def test_scores_do_not_depend_on_chunk_size(dead_task, name, opts):
    a, pa, _ = run(dead_task, name, opts, 7)
    b, pb, _ = run(dead_task, name, opts, 128)
    scale = np.abs(b.scores).max()
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-7, atol=1e-9 * scale)
    np.testing.assert_allclose(pa, pb, rtol=1e-7, atol=1e-9 * np.abs(pb).max())


@pytest.mark.parametrize(("name", "opts"), METHODS, ids=IDS)
def test_no_batch_larger_than_chunk_size_reaches_the_model(dead_task, name, opts):
    _, _, sizes = run(dead_task, name, opts, 7)
    assert sizes and max(sizes) <= 7


@pytest.mark.parametrize(
    ("name", "opts"),
    [("ewc", {}), ("linear", {}), ("linear", {"curvature": "ggn"}), ("loss", {})],
    ids=["ewc", "linear", "linear-ggn", "loss"],
)
def test_paper_methods_honour_chunk_size_too(dead_task, name, opts):
    """The forward-only passes of the older methods once ran at max(chunk_size, 512/1024)."""
    _, _, sizes = run(dead_task, name, opts, 7)
    assert sizes and max(sizes) <= 7


@pytest.mark.parametrize(("name", "opts"), METHODS, ids=IDS)
def test_scores_cover_every_training_example(dead_task, name, opts):
    r, pf, _ = run(dead_task, name, opts, 7)
    n = dead_task[1].shape[0]
    assert r.scores.shape == (n,) and pf.shape == (n, 3) and len(r.causes) == 2


XF = torch.tensor([[-0.5, -0.5]], dtype=DT)  # class 0's side of the 0/1 boundary


@pytest.fixture(scope="module")
def conflict(blobs, ref):
    """Blobs without their planted cluster, plus one duplicate of the failure input ``XF``
    with the wrong label 1; logistic regression at its exact optimum, which the duplicate
    alone makes misclassify ``XF``."""
    keep = torch.ones(blobs.X.shape[0], dtype=torch.bool)
    keep[blobs.planted] = False
    X = torch.cat([blobs.X[keep], XF])
    y = torch.cat([blobs.y[keep], torch.tensor([1])])
    theta = ref.fit_logreg_exact(X, y, blobs.classes, blobs.l2_train)
    model = ref.set_flat_params(LogisticRegression(2, 3).double(), theta).eval()
    with torch.no_grad():
        assert int(model(XF).argmax(1)[0]) == 1  # the failure (XF, 0) is a failure
        clean = ref.fit_logreg_exact(X[:-1], y[:-1], blobs.classes, blobs.l2_train)
        ref.set_flat_params(model, clean)
        assert int(model(XF).argmax(1)[0]) == 0  # ... because of the duplicate
        ref.set_flat_params(model, theta)
    return model, X, y, X.shape[0] - 1


SIGN_METHODS = [(n, o) for n, o in METHODS if o.get("target") != "self"]


@pytest.mark.parametrize(
    ("name", "opts"), SIGN_METHODS, ids=[i for i, m in zip(IDS, METHODS) if m in SIGN_METHODS]
)
def test_planted_conflicting_duplicate_scores_large_and_positive(conflict, name, opts):
    model, X, y, dup = conflict
    r = netmend.identify(
        model, (X, y), (XF, torch.tensor([0])), method=name, k=3, progress=False, device="cpu",
        **opts,
    )  # fmt: skip
    first, second = np.sort(r.scores)[::-1][:2]
    assert r.scores[dup] == first > 0  # the most harmful of all
    assert first > 2 * abs(second)  # by far
    assert r.per_failure[dup, 0] == pytest.approx(first)
