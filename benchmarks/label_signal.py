"""Would an out-of-sample label signal make a better label gate than the model's own prediction?
(exploratory, dev runs only; no fine-tunes)

The label gate (``netmend.identification.label_gate``) keeps the automatic causes whose given
label the original model does not predict: an *in-sample* signal, one forward pass. cleanlab
flags label errors with *out-of-fold* probabilities (k models retrained without each fold), and
on the test suites it removes more of the noise at a precision the gate does not reach on
Fashion-MNIST (docs/test-suites.md). Retraining k models is not a cost a repair should pay, so
this script measures cheaper out-of-sample signals computed from the trained model's own
penultimate features, against the in-sample one:

* ``knn{k}``: the labels of each example's ``k`` nearest neighbours (cosine, itself left out);
* ``head2``: a linear head on the (standardised) features, fitted on one half of the training
  set and applied to the other, both ways (2-fold cross-fitting);

each read two ways: ``argmax`` (the signal's most likely class is not the given label) and
``cl`` (confident learning's off-diagonal: some other class ``j`` reaches its per-class
threshold ``t_j`` = the mean probability of ``j`` over the examples labelled ``j``, and the
most probable such class is not the given label).

For every signal: precision and recall against the corrupted set over the whole training set
(``all``), among the automatic causes before the gate (``auto``: what the gate would keep) and
among every positive-scored example (``positive``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/label_signal.py        # digits dev runs, 1 min
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/label_signal.py \\
        --runs fashion-full/pair:0 mnist-full/pair:0 --out benchmarks/label_signal_full.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _shared import dev_run

from netmend.identification.shapley import penultimate_embeddings
from netmend.lab import bench
from netmend.lab.demo import machine
from netmend.model.training import predict
from netmend.store import write_json_atomic

KS = (10, 25, 50)
"""Neighbourhood sizes of the k-NN signal."""


def knn_label_probs(
    E: torch.Tensor, y: torch.Tensor, k: int, classes: int, chunk: int = 1024
) -> torch.Tensor:
    """Each example's neighbour label frequencies ``[N, C]``: the share of its ``k`` nearest
    neighbours (cosine similarity of the rows of ``E [N, D]``, itself excluded) labelled ``c``.
    Memory ``chunk x N``; ties are broken by ``torch.topk``."""
    E = F.normalize(E, dim=1)
    n = E.shape[0]
    out = torch.zeros(n, classes, dtype=E.dtype)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        sim = E[s:e] @ E.T
        sim[torch.arange(e - s), torch.arange(s, e)] = -torch.inf  # leave itself out
        nb = sim.topk(k, dim=1).indices
        out[s:e] = F.one_hot(y[nb], classes).to(E.dtype).mean(1)
    return out


def _logistic_head(
    Z: torch.Tensor, y: torch.Tensor, classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A multinomial logistic head ``(W [D, C], b [C])`` on ``Z``: L-BFGS, L2 ``1e-3``."""
    W = torch.zeros(Z.shape[1], classes, dtype=Z.dtype, requires_grad=True)
    b = torch.zeros(classes, dtype=Z.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(Z @ W + b, y) + 1e-3 * (W**2).sum()
        loss.backward()
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return W.detach(), b.detach()


def crossfit_head(
    E: torch.Tensor, y: torch.Tensor, classes: int, folds: int = 2, seed: int = 0
) -> torch.Tensor:
    """Out-of-fold class probabilities ``[N, C]`` of a logistic head on the standardised
    features ``E``: fitted on all folds but one, applied to that one."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    Z = (E - E.mean(0)) / (E.std(0) + 1e-6)
    P = torch.zeros(len(y), classes, dtype=E.dtype)
    for f in range(folds):
        held = perm[f::folds]
        rest = torch.cat([perm[j::folds] for j in range(folds) if j != f])
        W, b = _logistic_head(Z[rest], y[rest], classes)
        P[held] = torch.softmax(Z[held] @ W + b, 1)
    return P


def label_flags(P: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Label-error flags ``[N]`` from class probabilities ``P [N, C]`` and given labels ``y``.

    ``argmax``: the most probable class is not ``y``. ``cl``: confident learning's
    off-diagonal (Northcutt et al., 2021): with ``t_j`` the mean of ``P[:, j]`` over the
    examples labelled ``j``, the classes an example reaches the threshold of are its confident
    classes; it is flagged when it has some and the most probable of them is not ``y``.
    """
    C = P.shape[1]
    t = np.array([P[y == c, c].mean() if (y == c).any() else np.inf for c in range(C)])
    above = t[None, :] <= P
    assigned = np.where(above, P, -1.0).argmax(1)
    return {"argmax": P.argmax(1) != y, "cl": above.any(1) & (assigned != y)}


def precision_recall(selected: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """``n`` selected, their precision against ``mask`` (None if none) and the recall."""
    n = int(selected.sum())
    return {
        "n": n,
        "precision": float(mask[selected].mean()) if n else None,
        "recall": float((selected & mask).sum() / max(1, mask.sum())),
    }


def explore(suite: str, seed: int) -> dict[str, Any]:
    """One suite and seed: every signal's precision/recall overall, in the auto-K causes and
    among the positive scores (the default identification, ungated)."""
    t0 = time.perf_counter()
    data, _, model, _, ident = dev_run(suite, seed)
    X, y = data.train.X, data.train.y  # y: the noisy labels
    mask = np.asarray(data.mask, dtype=bool)
    auto = np.asarray(ident.causes)
    labels = y.numpy()
    signals = {"in_sample": predict(model, X).numpy() != labels}
    E = penultimate_embeddings(model, X).double()
    C = bench.NUM_CLASSES
    for k in KS:
        for how, f in label_flags(knn_label_probs(E, y, k, C).numpy(), labels).items():
            signals[f"knn{k}_{how}"] = f
    for how, f in label_flags(crossfit_head(E, y, C, 2, seed).numpy(), labels).items():
        signals[f"head2_{how}"] = f
    in_auto = np.zeros(len(labels), dtype=bool)
    in_auto[auto] = True
    positive = ident.scores > 0
    out: dict[str, Any] = {
        "suite": suite,
        "seed": seed,
        "n": len(labels),
        "corrupted": int(mask.sum()),
        "auto_k": int(auto.size),
        "auto_precision": float(mask[auto].mean()) if auto.size else None,
        "signals": {},
    }
    for name, f in signals.items():
        out["signals"][name] = {
            "all": precision_recall(f, mask),
            "auto": precision_recall(f & in_auto, mask),
            "share_of_auto": float(f[auto].mean()) if auto.size else None,
            "positive": precision_recall(f & positive, mask),
        }
        print(suite, seed, name, out["signals"][name], flush=True)
    out["seconds"] = time.perf_counter() - t0
    return out


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per signal, means over the runs: its precision among the automatic causes, that minus
    the in-sample signal's on the same run (the gain a gate would see), the share of the
    automatic causes it flags, and its precision and recall over the whole training set; and
    the signal with the largest mean gain."""
    names = list(runs[0]["signals"])
    out: dict[str, Any] = {}
    for name in names:
        sig = [r["signals"][name] for r in runs]
        base = [r["signals"]["in_sample"]["auto"]["precision"] for r in runs]
        gains = [None if s["auto"]["precision"] is None or b is None else s["auto"]["precision"] - b
                 for s, b in zip(sig, base, strict=True)]  # fmt: skip
        out[name] = {
            "auto_precision": _mean([s["auto"]["precision"] for s in sig]),
            "auto_precision_gain": _mean(gains),
            "share_of_auto": _mean([s["share_of_auto"] for s in sig]),
            "all_precision": _mean([s["all"]["precision"] for s in sig]),
            "all_recall": _mean([s["all"]["recall"] for s in sig]),
        }
    ranked = [n for n in names if out[n]["auto_precision_gain"] is not None]
    best = max(ranked, key=lambda n: out[n]["auto_precision_gain"])
    return {"signals": out, "best": best}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--runs",
        nargs="+",
        default=[f"digits/{c}:{s}" for c in ("pair", "sym20", "cifar10n-worst") for s in (0, 1)],
        help="suite:seed pairs (dev runs only)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/label_signal_digits.json"))
    p.add_argument(
        "--resummarise",
        action="store_true",
        help="only recompute --out's summary from the runs it holds (no training)",
    )
    a = p.parse_args(argv)
    if a.resummarise:
        doc = json.loads(a.out.read_text())
        doc["summary"] = summarise(doc["runs"])
        write_json_atomic(a.out, bench._nan_to_none(doc))
        return
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    runs = []
    for item in a.runs:
        suite, seed = item.rsplit(":", 1)
        runs.append(explore(suite, int(seed)))
    doc = {
        "config": {"runs": a.runs, "ks": list(KS), "out": str(a.out)},
        "machine": machine(),
        "note": "exploratory dev runs (suites and seeds the default is chosen on); no fine-tunes",
        "summary": summarise(runs),
        "runs": runs,
        "seconds": time.perf_counter() - t_start,
    }
    write_json_atomic(a.out, bench._nan_to_none(doc))


if __name__ == "__main__":
    main()
