"""netmend EK-FAC vs kronfluence EK-FAC at realistic scale: full MNIST, a 1.3M-parameter MLP.

Usage (from the repository root; ``make peers`` builds ``.venv-peers`` first)::

    nice -n 5 .venv/bin/python benchmarks/peers_scale.py [--subsets 50] [--epochs 3]
        [--n-train 60000] [--queries 1000] [--per-query 100] [--out benchmarks/peers_scale.json]

What one run does (every stage seeded; scratch files in ``benchmarks/.work/peers_scale``,
git-ignored):

1. ``prepare`` (this venv, which has MNIST): an MLP 784-1024-512-10 (1,333,770 parameters,
   float32) trained on the ``N`` training images for ``--epochs`` epochs of SGD (batch 128,
   lr 0.05, momentum 0.9, seeded init and order); ``--queries`` test images drawn at random
   (seeded) are the queries; the damping is kronfluence's heuristic, ``0.1 x`` the mean
   diagonal of the *mean* empirical Fisher (estimated on 2,000 training examples), given to
   kronfluence as ``damping_factor`` and to netmend as ``N x`` that (netmend's curvature is a
   sum over examples: the same matrix up to the factor ``N``).
2. One **worker subprocess per method** (``.venv-peers/bin/python``, the same torch 2.13.0 CPU
   wheel for both, one thread each, run one after the other), so each peak RSS
   (``ru_maxrss``) is that method's own. Each worker loads the same tensors, then

   * ``scores``: EK-FAC factors on all ``N`` training examples (true Fisher, one label sampled
     from the model per example: both libraries' default), then one score per training
     example for the **summed** loss of the ``M`` queries (netmend ``identify(method="ekfac")``;
     kronfluence ``compute_pairwise_scores`` with ``aggregate_query_gradients=True``).
     Timed: factor fitting and scoring separately (netmend's factor time is measured by
     wrapping ``netmend.curvature.kfac.kronecker_factors``; kronfluence's is
     ``fit_all_factors``), wall and process CPU seconds.
   * ``per_query``: the ``[N, m]`` per-query matrix for the first ``--per-query`` queries
     (a full ``[N, M]`` matrix costs ``N * M * P`` multiply-adds: ~8e13 here, past this CPU's
     budget for two libraries). kronfluence reuses its saved factors; netmend's ``identify``
     refits them (its factor time is inside this figure).
3. ``retrain``: ``--subsets`` random halves of the training set, each trained from the same
   initialisation with the same recipe (shared by both methods, so the LDS comparison is
   paired); the per-query test losses after each retraining.
4. The **linear datamodeling score** (Park et al. 2023) of each method: ``lds_per_query`` is the
   mean over the ``m`` per-query queries of the Spearman correlation, over subsets, between
   the predicted loss ``-sum_{z not in S} r_q(z)`` (netmend's :func:`lds_predictions`,
   positive = harmful) and the retrained loss; ``lds_group`` the same for the summed loss of
   all ``M`` queries and the summed scores. Controls in the same run: random scores (seeded)
   and the Spearman agreement between the two libraries' scores.

The machine is shared with other users: the load average before and after each stage is
recorded, and CPU seconds (``time.process_time``) are the cost figures least affected by it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _shared import losses, sgd_epochs
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work" / "peers_scale"
PEERS_PY = ROOT / ".venv-peers" / "bin" / "python"
HIDDEN = (1024, 512)
BATCH = 128
LR = 0.05
MOMENTUM = 0.9
CHUNK = 256  # examples per pass, both libraries
QUERY_BATCH = 100  # kronfluence's query batch (aggregated for the summed run)
DAMPING_RATIO = 0.1
DAMPING_EXAMPLES = 2000


def mlp() -> nn.Sequential:
    """784-1024-512-10 ReLU MLP (1,333,770 parameters)."""
    dims = (784, *HIDDEN, 10)
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def load() -> float:
    return os.getloadavg()[0]


def peak_rss_mib() -> float:
    """Peak resident set size of this process's memory since its exec, in MiB (``VmHWM`` of
    ``/proc/self/status``; ``ru_maxrss`` would carry the parent's peak across fork/exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(
    X: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, init_seed: int = 0
) -> nn.Sequential:
    """The fixed recipe: seeded init (``init_seed``), seeded order (``seed``), SGD+momentum."""
    with torch.random.fork_rng():  # the global RNG is left as it was
        torch.manual_seed(init_seed)
        net = mlp()
    g = torch.Generator().manual_seed(seed)
    sgd_epochs(net, X, y, epochs=epochs, batch=BATCH, lr=LR, momentum=MOMENTUM, generator=g)
    return net.eval()


# ----------------------------------------------------------------------------- 1. prepare


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    from netmend.lab.datasets import load_mnist

    train_split, test_split = load_mnist()
    X = train_split.X.reshape(len(train_split.y), -1)
    y = train_split.y
    if args.n_train < len(y):
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))[: args.n_train]
        X, y = X[keep].contiguous(), y[keep].contiguous()
    Xt = test_split.X.reshape(len(test_split.y), -1)
    qi = torch.randperm(len(test_split.y), generator=torch.Generator().manual_seed(2))
    qi = qi[: args.queries]
    Xq, yq = Xt[qi].contiguous(), test_split.y[qi].contiguous()
    t0 = time.perf_counter()
    net = train(X, y, args.epochs, seed=0)
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        acc = float((net(Xt).argmax(1) == test_split.y).float().mean())
        wrong = torch.nonzero(net(Xq).argmax(1) != yq).flatten()
    swapped = None
    if args.per_query and wrong.numel() and not bool((wrong < args.per_query).any()):
        # netmend.identify refuses a failure set the model gets entirely right: the per-query
        # subset (the first m queries) gets the first misclassified query at position 0, the
        # same order for both libraries (at N = 5,000 the first 100 already held errors)
        i = int(wrong[0])
        order = torch.arange(len(yq))
        order[0], order[i] = i, 0
        Xq, yq, swapped = Xq[order].contiguous(), yq[order].contiguous(), i
    # kronfluence's damping heuristic on the mean empirical Fisher: 0.1 x its mean diagonal
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss1(p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(net, p, (x[None],))
        return F.cross_entropy(out, t[None])

    per_ex = torch.func.vmap(torch.func.grad(loss1), in_dims=(None, 0, 0))
    sq = 0.0
    for s in range(0, DAMPING_EXAMPLES, 64):
        e = min(s + 64, DAMPING_EXAMPLES)
        gr = per_ex(params, X[s:e], y[s:e])
        sq += float(sum((v.double() ** 2).sum() for v in gr.values()))
    P = sum(p.numel() for p in net.parameters())
    damping_mean = DAMPING_RATIO * sq / (DAMPING_EXAMPLES * P)
    WORK.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state": net.state_dict(),
            "X": X,
            "y": y,
            "Xq": Xq,
            "yq": yq,
            "damping_mean": damping_mean,
        },
        WORK / "setup.pt",
    )
    return {
        "n_train": len(y),
        "queries": len(yq),
        "query_swapped_to_front": swapped,
        "parameters": P,
        "architecture": "784-" + "-".join(map(str, HIDDEN)) + "-10 ReLU MLP, float32",
        "recipe": {
            "epochs": args.epochs,
            "batch": BATCH,
            "lr": LR,
            "momentum": MOMENTUM,
            "optimizer": "SGD",
            "init_seed": 0,
            "order_seed": 0,
        },  # fmt: skip
        "train_seconds": train_s,
        "test_accuracy": acc,
        "query_accuracy": float((net(Xq).argmax(1) == yq).float().mean()),
        "damping_mean_scale": damping_mean,
        "damping_sum_scale": damping_mean * len(y),
        "damping_rule": f"{DAMPING_RATIO} x mean diagonal of the mean empirical Fisher "
        f"({DAMPING_EXAMPLES} training examples); kronfluence damping_factor = this, netmend "
        "damping = N x this (summed curvature)",
    }


# ----------------------------------------------------------------------------- 2. workers


def _setup() -> tuple[nn.Module, dict[str, Any]]:
    d = torch.load(WORK / "setup.pt", weights_only=True)
    net = mlp()
    net.load_state_dict(d["state"])
    return net.eval(), d


def worker(lib: str, per_query: int) -> None:
    """Runs in its own process; writes scores and a JSON of times and peak memory."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    out: dict[str, Any] = {"library": lib}
    net, d = _setup()
    X, y, Xq, yq = d["X"], d["y"], d["Xq"], d["yq"]
    N = len(y)
    out["rss_after_load_mib"] = peak_rss_mib()
    out["load_before"] = load()
    run = run_netmend if lib == "netmend" else run_kronfluence
    summed, timing = run(net, X, y, Xq, yq, d["damping_mean"], N, per_query=None)
    out["scores"] = timing
    out["peak_rss_scores_mib"] = peak_rss_mib()
    np.save(WORK / f"{lib}_scores.npy", summed)
    out["load_after_scores"] = load()
    if per_query:
        pf, timing_pq = run(net, X, y, Xq, yq, d["damping_mean"], N, per_query=per_query)
        out["per_query"] = timing_pq
        out["peak_rss_all_mib"] = peak_rss_mib()
        np.save(WORK / f"{lib}_per_query.npy", pf)
    out["load_after"] = load()
    (WORK / f"{lib}.json").write_text(json.dumps(out))


VARIANTS = {  # netmend controls: how far its own label seed moves the LDS, and no sampling
    "netmend seed 1": {"seed": 1},
    "netmend seed 2": {"seed": 2},
    "netmend exact Fisher": {"seed": 0, "fisher_type": "exact"},
    # before the fix: EK-FAC's correction reused the covariance pass's sampled labels
    "netmend labels reused (before)": {"seed": 0, "reuse_labels": True},
}


@contextlib.contextmanager
def reused_labels() -> Iterator[None]:
    """netmend before the fix, emulated: EK-FAC's eigenvalue correction reuses the sampled
    labels of the covariance pass (``netmend.curvature.kfac.label_uniforms``' stream 0)."""
    from netmend.curvature import kfac

    orig = kfac.label_uniforms

    def same(N: int, mc: int, seed: int, stream: int) -> torch.Tensor:
        return orig(N, mc, seed, kfac.COVARIANCE_STREAM)

    kfac.label_uniforms = same  # type: ignore[assignment]
    try:
        yield
    finally:
        kfac.label_uniforms = orig  # type: ignore[assignment]


def kron_seed_worker(seed: int, per_query: int) -> None:
    """kronfluence's per-query matrix with another seed for its sampled labels (a control:
    how far its own label draw moves its LDS). Factors in their own scratch folder."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    net, d = _setup()
    X, y, Xq, yq = d["X"], d["y"], d["Xq"], d["yq"]
    name = f"kronfluence_seed{seed}"
    kw = dict(seed=seed, out_name=name)
    _, fit = run_kronfluence(net, X, y, Xq, yq, d["damping_mean"], len(y), None, **kw)
    pf, pq = run_kronfluence(net, X, y, Xq, yq, d["damping_mean"], len(y), per_query, **kw)
    out = {"scores": fit, "per_query": pq, "peak_rss_all_mib": peak_rss_mib(), "seed": seed}
    np.save(WORK / f"{name}_per_query.npy", pf)
    (WORK / f"{name}.json").write_text(json.dumps(out))


def _stored_problem(out: str) -> tuple[dict[str, Any], dict[str, Any], int]:
    """The JSON of ``out``, its cached retrains and its number of per-query queries, after
    checking that the scratch setup is that JSON's problem."""
    result = json.loads(Path(out).read_text())
    st = result["settings"]
    if st["n_train"] != len(torch.load(WORK / "setup.pt", weights_only=True)["y"]):
        raise ValueError("benchmarks/.work/peers_scale/setup.pt is not the problem of --out")
    rt = retrain(st["subsets"], st["epochs"])  # read back from the scratch file
    return result, rt, int(st["per_query"])


def label_seed_summary(result: dict) -> dict:
    """Each library's LDS per query over its label seeds (the main run is seed 0; the controls
    "netmend seed s" / "kronfluence seed s"), mean ± s.e., and the difference of the means
    with the s.e. of a difference of independent means: ``result["label_seeds"]``."""
    from netmend.evaluation.controls import mean_se

    seeds: dict[str, dict[str, float]] = {}
    for lib, row in result["methods"].items():
        seeds.setdefault(lib, {})["0"] = row["lds_per_query"]
    for group in ("netmend_controls", "kronfluence_controls"):
        for name, row in result.get(group, {}).items():
            lib, _, seed = name.partition(" seed ")
            if seed.isdigit():  # not the exact Fisher or the labels as they were
                seeds.setdefault(lib, {})[seed] = row["lds_per_query"]
    out: dict = {}
    for lib, by_seed in seeds.items():
        mean, se = mean_se([by_seed[k] for k in sorted(by_seed, key=int)])
        out[lib] = {"seeds": dict(sorted(by_seed.items(), key=lambda kv: int(kv[0]))),
                    "mean": mean, "se": se}  # fmt: skip
    if "netmend" in out and "kronfluence" in out:
        a, b = out["netmend"], out["kronfluence"]
        out["netmend_minus_kronfluence"] = {
            "mean": a["mean"] - b["mean"], "se": float(np.hypot(a["se"], b["se"]))
        }  # fmt: skip
    return out


def add_kron_seeds(args: argparse.Namespace) -> None:
    """Run kronfluence with the label seeds ``--kron-seeds`` on the problem of ``--out`` and
    add their LDS to it (``kronfluence_controls``), with the paired difference of netmend's
    (label seed 0) against each."""
    from netmend.store import write_json_atomic

    result, rt, m = _stored_problem(args.out)
    ours = lds_per_query(
        rt["masks"], rt["loss"], np.load(WORK / "netmend_per_query.npy").astype(np.float64), m
    )
    for seed in args.kron_seeds:
        cmd = [str(PEERS_PY), __file__, "--kron-seed", str(seed), "--per-query", str(m)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"kronfluence seed {seed} failed:\n{proc.stderr[-4000:]}")
        name = f"kronfluence_seed{seed}"
        row = json.loads((WORK / f"{name}.json").read_text())
        pf = np.load(WORK / f"{name}_per_query.npy").astype(np.float64)
        row.update(lds(rt["masks"], rt["loss"], pf.sum(1), pf, m))
        del row["lds_group"]  # the summed scores of these runs are of the first m queries only
        row["netmend_minus_this_lds_per_query"], row["netmend_minus_this_se"] = _finite_mean_se(
            ours - lds_per_query(rt["masks"], rt["loss"], pf, m)
        )
        result.setdefault("kronfluence_controls", {})[f"kronfluence seed {seed}"] = row
        result["label_seeds"] = label_seed_summary(result)
        print(name, json.dumps(row), flush=True)
        write_json_atomic(args.out, result)


def variant_worker(name: str, per_query: int) -> None:
    """netmend's per-query matrix with another label seed or the exact Fisher (a control)."""
    import netmend

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    net, d = _setup()
    X, y, Xq, yq = d["X"], d["y"], d["Xq"], d["yq"]
    opts: dict[str, Any] = dict(VARIANTS[name])
    seed = int(opts.pop("seed"))
    reuse = bool(opts.pop("reuse_labels", False))
    t = _clock()
    with reused_labels() if reuse else contextlib.nullcontext():
        ident = netmend.identify(
            net, (X, y), (Xq[:per_query], yq[:per_query]), method="ekfac", k=10,
            damping=d["damping_mean"] * len(y), seed=seed, device="cpu", chunk_size=CHUNK,
            progress=False, **opts,
        )  # fmt: skip
    pf = np.asarray(ident.per_failure, dtype=np.float32)
    out = {"per_query": {"total": _since(t)}, "peak_rss_all_mib": peak_rss_mib(), "seed": seed}
    out.update(opts)
    if reuse:
        out["labels"] = "EK-FAC correction reuses the covariance pass's labels (before the fix)"
    slug = name.replace(" ", "_")
    np.save(WORK / f"{slug}_per_query.npy", pf)
    (WORK / f"{slug}.json").write_text(json.dumps(out))


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t: tuple[float, float]) -> dict[str, float]:
    return {"wall": time.perf_counter() - t[0], "cpu": time.process_time() - t[1]}


def run_netmend(
    net: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    Xq: torch.Tensor,
    yq: torch.Tensor,
    damping_mean: float,
    N: int,
    per_query: int | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """netmend's public ``identify(method="ekfac")``; positive = harmful already."""
    import netmend
    import netmend.curvature.kfac as kfac

    fit: dict[str, float] = {"wall": 0.0, "cpu": 0.0}
    orig = kfac.kronecker_factors

    def timed(*a: Any, **k: Any) -> Any:  # measures the factor fit inside identify
        t = _clock()
        try:
            return orig(*a, **k)
        finally:
            for key, v in _since(t).items():
                fit[key] += v

    kfac.kronecker_factors = timed  # type: ignore[assignment]
    try:
        q = (Xq, yq) if per_query is None else (Xq[:per_query], yq[:per_query])
        t = _clock()
        ident = netmend.identify(
            net, (X, y), q, method="ekfac", k=10, damping=damping_mean * N, seed=0,
            device="cpu", chunk_size=CHUNK, progress=False,
        )  # fmt: skip
        res = np.asarray(ident.scores, dtype=np.float64)
        if per_query is not None:
            res = np.asarray(ident.per_failure, dtype=np.float32)
        total = _since(t)
    finally:
        kfac.kronecker_factors = orig  # type: ignore[assignment]
    timing = {
        "total": total,
        "factors": fit,
        "scoring": {k: total[k] - fit[k] for k in total},
        "settings": {
            "damping": damping_mean * N,
            "chunk_size": CHUNK,
            "fisher_type": "default (sampled labels, 1 per example; the eigenvalue correction "
            "draws its own, independent of the covariance pass's)",
            "dtype": "float32",
        },  # fmt: skip
    }
    return res, timing


def run_kronfluence(
    net: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    Xq: torch.Tensor,
    yq: torch.Tensor,
    damping_mean: float,
    N: int,
    per_query: int | None,
    seed: int = 0,
    out_name: str = "kronfluence",
) -> tuple[np.ndarray, dict[str, Any]]:
    """kronfluence 1.0.1's ``Analyzer`` with its defaults (float32, EK-FAC, true Fisher; its
    sampled labels come from the global RNG, seeded by ``seed`` before the factors; factors
    saved under ``WORK / out_name``); its scores are helpful-positive ``[M, N]``: converted
    to ``-raw.T`` (positive = harmful)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class CE(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Any:
            x, t = batch
            logits = model(x)
            if sample:  # the true Fisher: labels drawn from the model
                with torch.no_grad():
                    t = torch.multinomial(torch.softmax(logits.detach(), -1), 1)[:, 0]
            return F.cross_entropy(logits, t, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Any:
            x, t = batch
            return F.cross_entropy(model(x), t, reduction="sum")

    net = copy.deepcopy(net)  # prepare_model wraps the modules in place
    out_dir = WORK / out_name
    if per_query is None:
        shutil.rmtree(out_dir, ignore_errors=True)
    model = prepare_model(net, CE())
    analyzer = Analyzer("scale", model, CE(), cpu=True, disable_tqdm=True, output_dir=str(out_dir))
    train_set = TensorDataset(X, y)
    fargs = FactorArguments(strategy="ekfac")  # defaults: all examples up to 100k, float32
    torch.manual_seed(seed)
    fit: dict[str, float] = {"wall": 0.0, "cpu": 0.0}
    t = _clock()
    if per_query is None:
        analyzer.fit_all_factors(
            "f", train_set, per_device_batch_size=CHUNK, factor_args=fargs,
            overwrite_output_dir=True,
        )  # fmt: skip
        fit = _since(t)
    t1 = _clock()
    sargs = ScoreArguments(damping_factor=damping_mean, aggregate_query_gradients=per_query is None)
    q = (
        TensorDataset(Xq, yq)
        if per_query is None
        else TensorDataset(Xq[:per_query], yq[:per_query])
    )
    analyzer.compute_pairwise_scores(
        "s" if per_query is None else "pq", "f", q, train_set,
        per_device_query_batch_size=QUERY_BATCH, per_device_train_batch_size=CHUNK,
        score_args=sargs, overwrite_output_dir=True,
    )  # fmt: skip
    scoring = _since(t1)
    scores = analyzer.load_pairwise_scores("s" if per_query is None else "pq")
    raw = scores["all_modules"].double().numpy()  # [M or 1, N], helpful = positive
    total = _since(t)
    res = -raw[0] if per_query is None else (-raw.T).astype(np.float32)
    timing = {
        "total": total,
        "factors": fit,
        "scoring": scoring,
        "settings": {
            "damping_factor": damping_mean,
            "batch": CHUNK,
            "query_batch": QUERY_BATCH,
            "dtypes": "kronfluence defaults (float32; eigendecomposition float64)",
            "aggregate_query_gradients": per_query is None,
            "factors_reused": per_query is not None,
        },  # fmt: skip
    }
    return res, timing


# ----------------------------------------------------------------------------- 3. retrain


def retrain(subsets: int, epochs: int) -> dict[str, Any]:
    """``subsets`` random halves, each trained with the fixed recipe; resumable."""
    torch.set_num_threads(1)
    _, d = _setup()
    X, y, Xq, yq = d["X"], d["y"], d["Xq"], d["yq"]
    N = len(y)
    path = WORK / f"retrain_{N}_{epochs}.npz"
    rng = np.random.default_rng([0, 0x6C6473])
    masks = np.zeros((subsets, N), dtype=bool)
    for s in range(subsets):
        masks[s, rng.choice(N, N // 2, replace=False)] = True
    done = np.full((subsets, len(yq)), np.nan)
    seconds: list[float] = []
    if path.exists():
        old = np.load(path)
        if old["masks"].shape[1] == N and np.array_equal(old["masks"], masks[: len(old["masks"])]):
            k = min(len(old["masks"]), subsets)
            done[:k] = old["loss"][:k]
            seconds = list(old["seconds"][:k])
    load0 = load()
    for s in range(subsets):
        if np.isfinite(done[s]).all():
            continue
        t = time.perf_counter()
        keep = torch.from_numpy(np.flatnonzero(masks[s]))
        net = train(X[keep], y[keep], epochs, seed=1000 + s)
        done[s] = losses(net, Xq, yq)
        seconds.append(time.perf_counter() - t)
        tmp = WORK / "retrain_tmp.npz"
        np.savez(tmp, masks=masks[: s + 1], loss=done[: s + 1], seconds=np.asarray(seconds))
        os.replace(tmp, path)
        print(f"retrain {s + 1}/{subsets}: {seconds[-1]:.1f}s", flush=True)
    return {"masks": masks, "loss": done, "seconds": seconds, "load": [load0, load()]}


# ----------------------------------------------------------------------------- 4. LDS


def spearman_cols(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    den = np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    return np.where(den > 0, (ra * rb).sum(0) / np.where(den > 0, den, 1.0), np.nan)


def _ground_truth(masks: np.ndarray, target: np.ndarray) -> Any:
    """netmend's ``GroundTruth`` holding only the retrained subsets and their losses (what
    ``lds_predictions`` reads)."""
    from netmend.lab.validation import GroundTruth

    e = np.zeros(0)
    return GroundTruth(np.zeros(0, int), e, masks, target, np.zeros((0, 0)), e, 0.0, 0.0, 0.5)


def _finite_mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the finite entries (a query whose scores are constant has
    no Spearman correlation)."""
    from netmend.evaluation.controls import mean_se

    return mean_se(values[np.isfinite(values)])


def lds_per_query(masks: np.ndarray, loss: np.ndarray, pf: np.ndarray, m: int) -> np.ndarray:
    """``[m]``: each of the first ``m`` queries' Spearman correlation, over the retrained
    subsets, between the loss its scores ``pf [N, m]`` predict and the retrained loss."""
    from netmend.lab.validation import lds_predictions

    gt = _ground_truth(masks, loss[:, :m])
    return spearman_cols(lds_predictions(gt, pf.sum(1), pf), loss[:, :m])


def lds(
    masks: np.ndarray, loss: np.ndarray, summed: np.ndarray, pf: np.ndarray, m: int
) -> dict[str, float]:
    """LDS per query (first ``m`` queries, ``pf [N, m]``) and of the summed query loss."""
    from netmend.lab.validation import lds_predictions

    mean, se = _finite_mean_se(lds_per_query(masks, loss, pf, m))
    grp = spearman_cols(
        lds_predictions(_ground_truth(masks, loss.sum(1, keepdims=True)), summed),
        loss.sum(1)[:, None],
    )
    return {"lds_per_query": mean, "lds_per_query_se": se, "lds_group": float(grp[0])}


def versions() -> dict[str, str]:
    """Package versions in the workers' interpreter (``.venv-peers``)."""
    code = (
        "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
        "('torch', 'netmend', 'kronfluence', 'numpy')}))"
    )
    out = subprocess.run([str(PEERS_PY), "-c", code], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout))


def add_variants(args: argparse.Namespace) -> None:
    """Run the netmend controls on the problem of ``--out`` and add their LDS to it."""
    from netmend.store import write_json_atomic

    result, rt, m = _stored_problem(args.out)
    for name in VARIANTS:
        cmd = [str(PEERS_PY), __file__, "--variant", name, "--per-query", str(m)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
        slug = name.replace(" ", "_")
        row = json.loads((WORK / f"{slug}.json").read_text())
        pf = np.load(WORK / f"{slug}_per_query.npy").astype(np.float64)
        row.update(lds(rt["masks"], rt["loss"], pf.sum(1), pf, m))
        del row["lds_group"]  # the summed scores of these runs are of the first m queries only
        result.setdefault("netmend_controls", {})[name] = row
        print(name, json.dumps(row), flush=True)
    result["worker_versions"] = versions()
    result["label_seeds"] = label_seed_summary(result)
    write_json_atomic(args.out, result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(HERE / "peers_scale.json"))
    ap.add_argument("--n-train", type=int, default=60000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--per-query", type=int, default=100)
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--worker", choices=("netmend", "kronfluence"))
    ap.add_argument("--libs", default="netmend,kronfluence", help="which workers to run")
    ap.add_argument("--variant", choices=tuple(VARIANTS), help="(worker) a netmend control")
    ap.add_argument(
        "--variants-only",
        action="store_true",
        help="add the netmend controls (VARIANTS) to --out, reusing its retrains",
    )
    ap.add_argument("--kron-seed", type=int, help="(worker) kronfluence with this label seed")
    ap.add_argument(
        "--kron-seeds",
        type=int,
        nargs="+",
        help="add kronfluence with these label seeds (a control) to --out, reusing its retrains",
    )
    ap.add_argument("--record-versions", action="store_true", help="add them to --out")
    ap.add_argument(
        "--label-seeds", action="store_true", help="(re)write --out's LDS summary over label seeds"
    )
    ap.add_argument("--skip-workers", action="store_true", help="reuse the last workers' output")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.per_query)
        return
    if args.variant:
        variant_worker(args.variant, args.per_query)
        return
    if args.kron_seed is not None:
        kron_seed_worker(args.kron_seed, args.per_query)
        return
    if args.kron_seeds:
        add_kron_seeds(args)
        return
    if args.variants_only:
        add_variants(args)
        return
    if args.label_seeds:  # for a JSON written before the summary was
        from netmend.store import write_json_atomic

        result = json.loads(Path(args.out).read_text())
        result["label_seeds"] = label_seed_summary(result)
        write_json_atomic(args.out, result)
        return
    if args.record_versions:  # for a JSON written before the versions were recorded
        from netmend.store import write_json_atomic

        result = json.loads(Path(args.out).read_text())
        result["worker_versions"] = versions()
        write_json_atomic(args.out, result)
        return
    from netmend.lab.demo import machine
    from netmend.store import write_json_atomic

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"machine": machine(), "shared_machine": True}
    result["machine"]["load_start"] = load()
    result["problem"] = prepare(args)
    print(json.dumps(result["problem"], indent=1), flush=True)
    libs = tuple(args.libs.split(","))
    result["methods"] = {}
    for lib in libs:
        if not args.skip_workers:
            cmd = [str(PEERS_PY), __file__, "--worker", lib, "--per-query", str(args.per_query)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{lib} worker failed:\n{proc.stderr[-4000:]}")
        result["methods"][lib] = json.loads((WORK / f"{lib}.json").read_text())
        print(lib, json.dumps(result["methods"][lib]), flush=True)
    result["settings"] = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    if not args.subsets or not args.per_query or len(libs) < 2:  # time and memory only
        result["worker_versions"] = versions()
        result["seconds"] = time.perf_counter() - t0
        result["machine"]["load_end"] = load()
        write_json_atomic(args.out, result)
        return
    rt = retrain(args.subsets, args.epochs)
    result["retrain"] = {
        "subsets": args.subsets,
        "alpha": 0.5,
        "recipe": "as the model's, from the same initialisation, order seed 1000 + subset",
        "seconds_each_mean": float(np.mean(rt["seconds"])) if rt["seconds"] else None,
        "load_before_after": rt["load"],
    }
    m = args.per_query
    masks, loss = rt["masks"], rt["loss"]
    scores = {lib: np.load(WORK / f"{lib}_scores.npy") for lib in libs}
    pfs = {lib: np.load(WORK / f"{lib}_per_query.npy").astype(np.float64) for lib in libs}
    for lib in libs:
        result["methods"][lib].update(lds(masks, loss, scores[lib], pfs[lib], m))
    rng = np.random.default_rng(0)
    N = masks.shape[1]
    result["controls"] = {
        "random_scores": lds(masks, loss, rng.standard_normal(N), rng.standard_normal((N, m)), m),
        "spearman_netmend_vs_kronfluence_summed": float(
            spearman_cols(scores["netmend"][:, None], scores["kronfluence"][:, None])[0]
        ),
        "spearman_netmend_vs_kronfluence_per_query_mean": float(
            np.nanmean(spearman_cols(pfs["netmend"], pfs["kronfluence"]))
        ),
    }
    n, k = result["methods"]["netmend"], result["methods"]["kronfluence"]
    diff = lds_per_query(masks, loss, pfs["netmend"], m) - lds_per_query(
        masks, loss, pfs["kronfluence"], m
    )
    result["ratios"] = {
        "time_netmend_over_kronfluence_wall": n["scores"]["total"]["wall"]
        / k["scores"]["total"]["wall"],
        "time_netmend_over_kronfluence_cpu": n["scores"]["total"]["cpu"]
        / k["scores"]["total"]["cpu"],
        "peak_rss_netmend_over_kronfluence": n["peak_rss_scores_mib"] / k["peak_rss_scores_mib"],
        "lds_per_query_netmend_minus_kronfluence": n["lds_per_query"] - k["lds_per_query"],
        # paired over the same queries and retrains: the s.e. of the per-query differences
        "lds_per_query_difference_se": _finite_mean_se(diff)[1],
        "lds_group_netmend_minus_kronfluence": n["lds_group"] - k["lds_group"],
    }
    result["targets"] = {
        "lds_at_least_kronfluence": n["lds_per_query"] >= k["lds_per_query"],
        "time_at_most_half": result["ratios"]["time_netmend_over_kronfluence_cpu"] <= 0.5,
        "peak_memory_at_most_kronfluence": n["peak_rss_scores_mib"] <= k["peak_rss_scores_mib"],
    }
    result["seconds"] = time.perf_counter() - t0
    result["machine"]["load_end"] = load()
    result["worker_versions"] = versions()
    write_json_atomic(args.out, result)
    print(json.dumps({k: result[k] for k in ("controls", "ratios", "targets")}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
