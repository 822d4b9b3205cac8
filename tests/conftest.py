"""Shared fixtures: tiny float64 models, small seeded synthetic data, exact reference helpers.

Everything is float64 (models are built with ``.double()``; the global default dtype is left
alone) and tiny, so that estimators can be compared with their exact counterparts at tight
tolerances and the whole suite stays fast on two CPU cores.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netmend.lab.models import MLP, LogisticRegression

DT = torch.float64

# The tensors here are tiny: intra-op threads only add OpenMP synchronisation, which costs
# 100x when another process competes for the two cores. One thread keeps the suite fast.
torch.set_num_threads(1)


# ----------------------------------------------------------------------------- exact references


def loop_grads(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example gradients of ``log p(y_n|x_n)``, one ``torch.autograd.grad`` per example.

    Flattened in ``model.parameters()`` order (trainable only), ``[N, P]``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(X.shape[0]):
        ll = -F.cross_entropy(model(X[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(ll, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).detach()


def logreg_flat_loss(X: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 0.0):
    """Summed cross-entropy (+ ``l2/2 ||theta||^2``) of a logistic regression as a function of
    the flat vector ``theta = [W.flatten(), b]`` (the order of ``LogisticRegression``)."""
    d = X.reshape(X.shape[0], -1).shape[1]
    Xf = X.reshape(X.shape[0], -1)

    def loss(theta: torch.Tensor) -> torch.Tensor:
        W = theta[: classes * d].reshape(classes, d)
        b = theta[classes * d :]
        return F.cross_entropy(Xf @ W.T + b, y, reduction="sum") + 0.5 * l2 * (theta * theta).sum()

    return loss


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def set_flat_params(model: nn.Module, theta: torch.Tensor) -> nn.Module:
    i = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                k = p.numel()
                p.copy_(theta[i : i + k].view_as(p))
                i += k
    return model


def fit_logreg_exact(
    X: torch.Tensor, y: torch.Tensor, classes: int, l2: float, theta0: torch.Tensor | None = None
) -> torch.Tensor:
    """The exact optimum of ``sum CE + l2/2 ||theta||^2`` for a logistic regression.

    L-BFGS to get close, then a few pure Newton steps with the dense Hessian (the objective is
    strictly convex), so the gradient at the result is at machine precision.
    """
    loss = logreg_flat_loss(X, y, classes, l2)
    d = X.reshape(X.shape[0], -1).shape[1]
    theta = (
        torch.zeros(classes * (d + 1), dtype=DT) if theta0 is None else theta0.detach().clone()
    ).requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        val = loss(theta)
        val.backward()
        return val

    opt.step(closure)
    theta = theta.detach()
    for _ in range(4):
        g = torch.func.grad(loss)(theta)
        H = torch.autograd.functional.hessian(loss, theta)
        theta = theta - torch.linalg.solve(H, g)
    g = torch.func.grad(loss)(theta)
    assert float(g.norm()) < 1e-9, f"reference optimiser did not converge: |grad| = {g.norm()}"
    return theta


def state_hash(model: nn.Module) -> dict[str, str]:
    """sha256 of every parameter and buffer (dtype, shape and bytes)."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        a = t.detach().cpu().contiguous()
        h = hashlib.sha256(str((a.dtype, tuple(a.shape))).encode())
        h.update(a.numpy().tobytes())
        out[name] = h.hexdigest()
    return out


class ItemDataset(torch.utils.data.Dataset):
    """``(X[i], y[i])`` items: a map-style Dataset over tensors (the Dataset path of the data
    layer, against the tensor-pair path)."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.X[i], self.y[i]


@pytest.fixture(scope="session")
def ref() -> SimpleNamespace:
    """The reference helpers above, as a fixture (test files do not import conftest)."""
    return SimpleNamespace(
        loop_grads=loop_grads,
        logreg_flat_loss=logreg_flat_loss,
        flat_params=flat_params,
        set_flat_params=set_flat_params,
        fit_logreg_exact=fit_logreg_exact,
        state_hash=state_hash,
        ItemDataset=ItemDataset,
    )


# ----------------------------------------------------------------------------- data


def make_blobs(seed: int = 0, n_per_class: int = 40, planted: int = 6) -> SimpleNamespace:
    """Three 2-D Gaussian blobs plus a small cluster of planted, mislabelled points.

    Class centres (-3, 0), (3, 0), (0, 4). The planted points sit at about (-1.2, -0.8), deep
    in class 0's region, but carry label 1; they pull the 0/1 boundary left, so that the
    failure ``(-0.9, -0.6)`` with its correct label 0 is misclassified as 1.
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=DT)
    X = torch.cat([c + torch.randn(n_per_class, 2, generator=g, dtype=DT) for c in centres])
    y = torch.arange(3).repeat_interleave(n_per_class)
    P = torch.tensor([-1.2, -0.8], dtype=DT) + 0.15 * torch.randn(planted, 2, generator=g, dtype=DT)
    X = torch.cat([X, P])
    y = torch.cat([y, torch.ones(planted, dtype=torch.long)])
    perm = torch.randperm(X.shape[0], generator=g)
    X, y = X[perm].contiguous(), y[perm].contiguous()
    planted_idx = torch.argsort(perm)[3 * n_per_class :]
    Xf = torch.tensor([[-0.9, -0.6]], dtype=DT)
    yf = torch.tensor([0])
    return SimpleNamespace(
        X=X, y=y, Xf=Xf, yf=yf, planted=np.sort(planted_idx.numpy()), classes=3, l2_train=1e-2
    )


@pytest.fixture(scope="session")
def blobs() -> SimpleNamespace:
    return make_blobs()


@pytest.fixture(scope="session")
def blobs_validation() -> tuple[torch.Tensor, torch.Tensor]:
    """A validation split the blobs models never trained on: a new draw, 60 per class and no
    planted points (the class guard's ``guard_data``)."""
    v = make_blobs(seed=7, n_per_class=60, planted=0)
    return v.X, v.y


@pytest.fixture(scope="session")
def blobs_logreg_theta(blobs) -> torch.Tensor:
    """Exact optimum of the L2-regularised logistic regression on ``blobs``."""
    return fit_logreg_exact(blobs.X, blobs.y, blobs.classes, blobs.l2_train)


@pytest.fixture
def blobs_logreg(blobs, blobs_logreg_theta) -> nn.Module:
    """A fresh float64 ``LogisticRegression`` at the optimum (tests may not share one module)."""
    model = LogisticRegression(2, blobs.classes).double()
    set_flat_params(model, blobs_logreg_theta)
    return model.eval()


@pytest.fixture
def cache_problem(blobs):
    """An untrained float64 MLP on the blobs, and failures it gets wrong by construction
    (the cache tests: what matters is that passes run, not what the model knows)."""
    torch.manual_seed(0)
    model = MLP(2, 3, hidden=(8,)).double().eval()
    Xf = torch.cat([blobs.Xf, blobs.X[:5]])
    with torch.no_grad():
        yf = (model(Xf).argmax(1) + 1) % 3
    return model, (blobs.X, blobs.y), (Xf, yf)


@pytest.fixture
def data4() -> SimpleNamespace:
    """Small random 4-feature, 3-class data (float64), for gradient/curvature checks."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(30, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (30,), generator=g)
    return SimpleNamespace(X=X, y=y, classes=3)


@pytest.fixture
def logreg4() -> nn.Module:
    torch.manual_seed(2)
    return LogisticRegression(4, 3).double().eval()


@pytest.fixture
def mlp4() -> nn.Module:
    torch.manual_seed(3)
    return MLP(4, 3, hidden=(6, 5)).double().eval()


class TinyConv(nn.Module):
    """Two convolutions with stride, padding and dilation, then a linear head; 2x7x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1))
        self.fc = nn.Linear(4 * 4 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        return self.fc(h.flatten(1))


@pytest.fixture
def tiny_conv() -> nn.Module:
    torch.manual_seed(4)
    return TinyConv().double().eval()


@pytest.fixture
def conv_data() -> SimpleNamespace:
    g = torch.Generator().manual_seed(5)
    return SimpleNamespace(
        X=torch.randn(9, 2, 7, 8, generator=g, dtype=DT), y=torch.randint(0, 3, (9,), generator=g)
    )


def wrong_labels(model: nn.Module, X: torch.Tensor, classes: int) -> torch.Tensor:
    """Labels the model certainly gets wrong (its prediction shifted by one class)."""
    with torch.no_grad():
        return (model(X).argmax(1) + 1) % classes


@pytest.fixture
def failures_for():
    """``failures_for(model, X, classes)`` -> labels the model gets wrong on ``X``."""
    return wrong_labels


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state (no order dependence)."""
    torch.manual_seed(1234)
    np.random.seed(1234)


def pytest_configure(config):
    # torch.func emits this from inside torch on some versions; it is not netmend's concern.
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
    )


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="session")
def bench_script() -> Callable[[str], ModuleType]:
    """``bench_script("test_suites")``: the script ``benchmarks/test_suites.py`` as a module,
    executed once per session (the scripts are not a package; tests read their functions)."""
    loaded: dict[str, ModuleType] = {}
    if str(BENCHMARKS) not in sys.path:  # as when run: the scripts import their siblings
        sys.path.insert(0, str(BENCHMARKS))

    def load(name: str) -> ModuleType:
        if name not in loaded:
            spec = importlib.util.spec_from_file_location(
                f"_bench_{name}", BENCHMARKS / f"{name}.py"
            )
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load benchmarks/{name}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod  # dataclasses in a script look their module up
            spec.loader.exec_module(mod)
            loaded[name] = mod
        return loaded[name]

    return load
