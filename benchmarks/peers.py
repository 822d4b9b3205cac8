"""netmend's attribution methods side by side with kronfluence, dattri and Captum.

Usage (from the repository root; builds the separate venv first)::

    make peers                     # .venv-peers from benchmarks/requirements-peers.txt
    .venv-peers/bin/python benchmarks/peers.py [--quick] [--repeats 2]

One run, one problem for everyone: ``netmend.lab.validation.make_problem("digits", "logreg",
flip_rate=0.2, seed=0)`` (float64 logistic regression trained to convergence on the summed
cross-entropy plus ``(l2/2)||theta||^2``, l2 = 1), its query failures, its measured
leave-one-out and subset-retraining effects (``netmend.lab.validation.ground_truth``). Every
method's output is converted at the boundary to netmend's convention, one score per training
example summed over the query failures, **positive = harmful** (removing the example would
lower the failures' loss), plus the ``[N, M]`` per-failure matrix where the method gives one,
and scored by ``netmend.lab.validation.score_quality``.

Equal footing (stated once here, recorded per method in the JSON):

* the same float64 model, ``torch.set_num_threads(1)``, CPU;
* damping: every influence method solves with ``H_sum + DAMPING * I``, ``H_sum`` the curvature
  of the *summed* training loss and ``DAMPING = problem.l2`` (the training objective's own
  weight decay, so the damped Hessian is the exact Hessian of the training objective). A peer
  whose curvature is a *mean* over examples (kronfluence, dattri EK-FAC) gets
  ``DAMPING / N``: the same matrix up to the factor ``N``, which does not change rankings;
* TracIn: the same checkpoints (``CKPT_EPOCHS`` epochs of mini-batch SGD from a seeded
  initialisation, one state_dict per epoch) and learning rates for every implementation;
* TRAK: the same projection dimension ``TRAK_DIM`` (< P, so both really project), ridge 0
  (TRAK's own default), the final model alone;
* wall time: around the whole attribution call (curvature fitting + scoring; kronfluence's
  file writes included, since they are part of its pipeline), best of ``--repeats``;
  netmend's time is ``netmend.identify`` (summed scores); its per-failure matrix is a second
  pass, timed separately (``per_failure_seconds``).

Peer sign conventions (from each library's documentation, and checked empirically: the JSON's
``raw_sign_vs_loo`` is the Spearman correlation of the peer's *raw* summed score with the
measured LOO effect, positive = harmful; it must be negative for all of these):

* kronfluence ``compute_pairwise_scores`` -> ``[M, N]``: ``g_test^T (G + damping)^-1 g_train``
  on the measurement/loss gradients; positive = the training example *lowers* the query loss
  (helpful). harmful = ``-scores.T``.
* dattri ``IFAttributor*.attribute`` -> ``[N, M]``: ``g_train^T H^-1 g_test`` (Koh & Liang
  without their minus sign); positive = helpful. TracIn/Grad-Dot/Grad-Cos/TRAK likewise
  (proponent positive). harmful = ``-scores``.
* Captum ``TracInCP`` / ``NaiveInfluenceFunction`` ``.influence`` -> ``[M, N]``:
  ``grad L(test)' H^-1 grad L(train)`` resp. the TracIn sum; positive = proponent (helpful).
  harmful = ``-scores.T``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import math
import os
import shutil
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _shared import is_jsonable
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import netmend
import netmend.identification
import netmend.lab.validation as V
from netmend.cli import write_json_atomic
from netmend.lab.demo import machine

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work" / "peers"  # scratch (git-ignored): kronfluence writes its factors here
CKPT_EPOCHS = 5
CKPT_LR = 0.05  # SGD on the mean cross-entropy, batch 64
CKPT_BATCH = 64
TRAK_DIM = 256
LISSA_DEPTH = 1000
LISSA_BATCH = 128
CG_MAXITER = 100
CG_TOL = 1e-8
TIE = 1e-3  # quality differences below this count as equal (same algorithm, rounding)
TRAK_SEEDS = (1, 2, 3, 4)  # more projection seeds for both TRAKs (seed 0 is the main row)
SEEDS_PAIR = "trak-seeds"
TRAK_OPTIONS = {"proj_dim": TRAK_DIM, "projection": "gaussian", "ridge": 0.0}  # as dattri's


KNOWN_FAULTS = [
    "dattri 0.3.0 IFAttributorLiSSA: its collate function casts the sampled batch to float32 "
    "(`_lissa_collate_fn` calls .float() on inputs and labels), so it fails on a float64 model "
    "('expected m1 and m2 to have the same dtype') [run + source]",
    "dattri 0.3.0 TracInAttributor / TRAKAttributor: `projector_kwargs` are merged into the "
    "module-level DEFAULT_PROJECTOR_KWARGS dict in place, so one attributor's projection "
    "settings leak into every later attributor built with the defaults [verified by a script]",
    "dattri 0.3.0 TracIn / TRAK: the default always projects gradients (512 dims, normal); exact "
    "gradients need proj_type='identity'; NaN gradients are silently zeroed (nan_to_num) [source]",
    "dattri 0.3.0 IF attributors: the score buffer is float32 even for a float64 model; the test "
    "iHVP is recomputed for every training batch; the iHVPs of the batches of the cached "
    "full-train loader are summed, so the scores depend on that loader's batch size unless it "
    "is one batch of N (its docs: 'ideally the batch size should be the number of training "
    "samples') [source]",
    "dattri 0.3.0 TRAKAttributor.attribute takes (test, train=None), the reverse of the other "
    "attributors' (train, test); passing both after .cache() raises [run]",
    "dattri 0.3.0 IFAttributorEKFAC: expects the *mean* loss (documented), fits its own "
    "Fisher; Spearman with LOO far below kronfluence's and netmend's EK-FAC at equal damping [run]",
    "kronfluence 1.0.1: declares torchvision, whose PyPI wheel does not import with the CPU "
    "torch wheel (installed --no-deps here); prepare_model wraps the model's modules in place; "
    "defaults are float32 and damping_factor 1e-8 [install + source]",
    "Captum 0.9.0: TracInCP / NaiveInfluenceFunction load checkpoints into the model object "
    "passed in (it is modified); NaiveInfluenceFunction keeps only the top projection_dim "
    "(default 50) Hessian eigenpairs, so its default is a low-rank, not exact, influence "
    "(projection_dim = P here) [source]",
    "Signs: every peer returns 'helpful = positive' scores (kronfluence and Captum [M, N], "
    "dattri [N, M]); none says so next to the return value; verified here by raw_sign_vs_loo < 0",
]
"""Faults seen in the peers while building this benchmark (also written to the JSON)."""


# ----------------------------------------------------------------------------- shared setup


@dataclass
class Bench:
    """The problem, its ground truth and the shared settings every method receives."""

    problem: V.Problem
    gt: V.GroundTruth
    damping: float
    checkpoints: list[dict[str, torch.Tensor]]
    lrs: list[float]
    repeats: int
    quick: bool
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def N(self) -> int:
        return self.problem.N

    @property
    def M(self) -> int:
        return int(self.problem.Xq.shape[0])

    def model_copy(self) -> nn.Module:
        return copy.deepcopy(self.problem.model).eval()

    def train_set(self) -> TensorDataset:
        return TensorDataset(self.problem.X, self.problem.y)

    def query_set(self) -> TensorDataset:
        return TensorDataset(self.problem.Xq, self.problem.yq)


def make_checkpoints(problem: V.Problem, seed: int = 0) -> tuple[list[dict], list[float]]:
    """TracIn checkpoints: ``CKPT_EPOCHS`` epochs of seeded mini-batch SGD, one state per epoch.

    Every TracIn implementation receives these states and ``lr`` per state (the step size on
    the *mean* batch loss; TracIn's per-example gradients are of the per-example loss).
    """
    net = copy.deepcopy(problem.model)
    torch.manual_seed(seed)
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    opt = torch.optim.SGD(net.parameters(), lr=CKPT_LR)
    g = torch.Generator().manual_seed(seed)
    X, y = problem.X, problem.y
    states, lrs = [], []
    for _ in range(CKPT_EPOCHS):
        order = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), CKPT_BATCH):
            idx = order[s : s + CKPT_BATCH]
            opt.zero_grad()
            F.cross_entropy(net(X[idx]), y[idx]).backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        lrs.append(CKPT_LR)
    return states, lrs


# ----------------------------------------------------------------------------- results


@dataclass
class Outcome:
    """What one attribution call produced, already in netmend's convention."""

    scores: np.ndarray  # [N] positive = harmful
    per_failure: np.ndarray | None  # [N, M] positive = harmful, or None
    raw_sum: np.ndarray  # [N] the peer's own summed output, its own sign
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Spec:
    """One method of one library."""

    name: str
    library: str
    pair: str  # the key shared by equivalent methods (the ratio rows)
    settings: dict[str, Any]
    run: Callable[[Bench], Outcome]
    netmend_method: str | None = None  # for netmend rows: the registry name needed


def version_of(lib: str) -> str:
    if lib == "netmend":
        return netmend.__version__ if hasattr(netmend, "__version__") else metadata.version(lib)
    return metadata.version(lib)


def _nonfinite(a: np.ndarray | None) -> int:
    return 0 if a is None else int((~np.isfinite(np.asarray(a, dtype=np.float64))).sum())


def evaluate(bench: Bench, spec: Spec) -> dict[str, Any]:
    """Run ``spec`` (best of ``bench.repeats`` timings) and score it against retraining."""
    row: dict[str, Any] = {
        "method": spec.name,
        "library": spec.library,
        "version": version_of(spec.library),
        "pair": spec.pair,
        "settings": spec.settings,
        "faults": [],
    }
    if spec.netmend_method and spec.netmend_method not in netmend.identification.available():
        row["skipped"] = f"netmend method {spec.netmend_method!r} is not registered"
        return row
    times, outs = [], []
    model_before = {k: v.clone() for k, v in bench.problem.model.state_dict().items()}
    try:
        for r in range(bench.repeats):
            t0 = time.perf_counter()
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                out = spec.run(bench)
            times.append(time.perf_counter() - t0)
            outs.append(out)
            if r == 0 and times[0] > 60:  # slow: one timing is enough
                break
    except Exception as e:  # a peer's crash is a finding, recorded, not hidden
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc(limit=6)
        return row
    after = bench.problem.model.state_dict()
    if any(not torch.equal(model_before[k], after[k]) for k in model_before):
        row["faults"].append("modified the problem's model")
    out = outs[0]
    row["seconds"] = min(times)
    row["seconds_all"] = times
    summed_s = [o.info.get("row", {}).get("scores_seconds") for o in outs]
    row.update(out.info.pop("row", {}))
    if summed_s[0] is not None:  # best of the repeats, like ``seconds``
        row["scores_seconds"] = min(summed_s)
    row["info"] = out.info
    row["nonfinite_scores"] = _nonfinite(out.scores)
    row["nonfinite_per_failure"] = _nonfinite(out.per_failure)
    if len(outs) > 1:
        a, b = outs[0].scores, outs[1].scores
        den = float(np.abs(a).max()) or 1.0
        row["repeat_max_rel_diff"] = float(np.nanmax(np.abs(a - b)) / den)
    loo = bench.gt.loo_effect
    idx = bench.gt.loo_idx
    if np.isfinite(out.raw_sum).all():
        row["raw_sign_vs_loo"] = float(spearmanr(out.raw_sum[idx], loo).statistic)
    if row["nonfinite_scores"]:
        row["faults"].append(f"{row['nonfinite_scores']} non-finite scores")
        for k in ("spearman_loo", "lds", "precision_at_k", "auroc", "culprit_precision_at_5"):
            row[k] = float("nan")
        return row
    pf = out.per_failure
    row["per_failure_given"] = pf is not None
    if pf is not None and not np.isfinite(pf).all():
        row["faults"].append(f"{row['nonfinite_per_failure']} non-finite per-failure scores")
        pf = None
    row.update(V.score_quality(bench.problem, bench.gt, out.scores, pf))
    if row.get("spearman_loo", 0) < 0:
        row["faults"].append("scores anti-correlated with LOO after the documented sign flip")
    return row


# ----------------------------------------------------------------------------- netmend


def netmend_spec(
    name: str,
    method: str,
    pair: str,
    options: dict[str, Any],
    settings: dict[str, Any],
    per_failure: bool = True,
    seed: int = 0,
) -> Spec:
    """A netmend method run through the public ``netmend.identify``.

    ``per_failure=False`` skips netmend's per-failure matrix: for the iterative influence
    solvers it is ``M`` sequential solves (313 s for N=300, M=52 with CG on this machine),
    too slow for this benchmark; those rows then have LDS from summed scores only.
    """

    def run(bench: Bench) -> Outcome:
        p = bench.problem
        opts = dict(options)
        if opts.get("chunk_size") == "N":  # the peers it is compared with use one batch of N
            opts["chunk_size"] = int(p.X.shape[0])
        if method == "tracin":
            opts.update(checkpoints=bench.checkpoints, lrs=bench.lrs)
        t0 = time.perf_counter()
        ident = netmend.identify(
            p.model,
            (p.X, p.y),
            (p.Xq, p.yq),
            method=method,
            k=int(p.corrupted.sum()),  # an int: no extra scoring for the automatic K
            seed=seed,
            device="cpu",
            progress=False,
            **opts,
        )
        t_scores = time.perf_counter() - t0
        t1 = time.perf_counter()
        pf = np.asarray(ident.per_failure, dtype=np.float64) if per_failure else None
        t_pf = time.perf_counter() - t1
        info: dict[str, Any] = {"row": {"per_failure_seconds": t_pf, "scores_seconds": t_scores}}
        info.update({k: v for k, v in ident.info.items() if is_jsonable(v)})
        s = np.asarray(ident.scores, dtype=np.float64)
        return Outcome(s, pf, s, info)

    settings = {"method": method, **options, **settings, "per_failure": per_failure, "seed": seed}
    return Spec(name, "netmend", pair, settings, run, method)


# ----------------------------------------------------------------------------- kronfluence


def kronfluence_spec(strategy: str, pair: str) -> Spec:
    """kronfluence ``Analyzer``: fit factors (``strategy``), then pairwise scores ``[M, N]``."""

    def run(bench: Bench) -> Outcome:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.task import Task
        from kronfluence.utils.common.factor_arguments import pytest_factor_arguments
        from kronfluence.utils.common.score_arguments import pytest_score_arguments

        class CE(Task):
            def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False):
                x, y = batch
                logits = model(x)
                if sample:  # the true Fisher: labels drawn from the model
                    with torch.no_grad():
                        y = torch.multinomial(torch.softmax(logits.detach(), -1), 1)[:, 0]
                return F.cross_entropy(logits, y, reduction="sum")

            def compute_measurement(self, batch: Any, model: nn.Module):
                x, y = batch
                return F.cross_entropy(model(x), y, reduction="sum")

        out_dir = WORK / f"kronfluence-{strategy}"
        shutil.rmtree(out_dir, ignore_errors=True)
        model = prepare_model(bench.model_copy(), CE())
        analyzer = Analyzer(
            "peers", model, CE(), cpu=True, disable_tqdm=True, output_dir=str(out_dir)
        )
        fargs = pytest_factor_arguments(strategy)  # the float64 preset
        torch.manual_seed(0)
        analyzer.fit_all_factors(
            "f", bench.train_set(), per_device_batch_size=256, factor_args=fargs,
            overwrite_output_dir=True,
        )  # fmt: skip
        sargs = pytest_score_arguments()
        sargs.damping_factor = bench.damping / bench.N  # covariances are means over N
        analyzer.compute_pairwise_scores(
            "s", "f", bench.query_set(), bench.train_set(),
            per_device_query_batch_size=bench.M, per_device_train_batch_size=256,
            score_args=sargs, overwrite_output_dir=True,
        )  # fmt: skip
        raw = analyzer.load_pairwise_scores("s")["all_modules"].double().numpy()  # [M, N]
        pf = -raw.T
        return Outcome(pf.sum(1), pf, raw.sum(0), {"raw_shape": list(raw.shape)})

    return Spec(
        f"kronfluence {strategy}",
        "kronfluence",
        pair,
        {
            "strategy": strategy,
            "damping_factor": "damping / N (mean-scale covariances)",
            "fisher": "true Fisher, sampled labels (kronfluence default)",
            "dtypes": "float64 (pytest_factor_arguments / pytest_score_arguments)",
            "batch": 256,
        },
        run,
    )


# ----------------------------------------------------------------------------- dattri


def _batched(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dattri's TracIn/TRAK vmap single examples without a batch dim; netmend's models want one."""
    return (x[None], y[None]) if y.dim() == 0 else (x, y)


def _ce_sum(model: nn.Module) -> Callable:
    def loss(params: dict, data: tuple) -> torch.Tensor:
        x, y = _batched(*data)
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y, reduction="sum")

    return loss


def _margin(model: nn.Module) -> Callable:
    """TRAK's model output for softmax: ``logit_y - logsumexp_{j != y} logit_j``."""

    def m(params: dict, data: tuple) -> torch.Tensor:
        x, y = _batched(*data)
        z = torch.func.functional_call(model, params, (x,))
        zy = z.gather(-1, y[..., None])[..., 0]
        is_y = torch.arange(z.shape[-1], device=z.device) == y[..., None]  # vmap-safe one-hot
        other = z.masked_fill(is_y, -math.inf)
        return (zy - torch.logsumexp(other, -1)).sum()

    return m


def _loaders(bench: Bench, train_batch: int) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(bench.train_set(), batch_size=train_batch, shuffle=False)
    query = DataLoader(bench.query_set(), batch_size=bench.M, shuffle=False)
    return train, query


def dattri_if_spec(kind: str, pair: str, train_batch: int | None = None) -> Spec:
    """dattri ``IFAttributor{Explicit,CG,LiSSA,EKFAC}`` -> ``[N, M]``."""

    def run(bench: Bench) -> Outcome:
        from dattri.algorithm import (
            IFAttributorCG,
            IFAttributorEKFAC,
            IFAttributorExplicit,
            IFAttributorLiSSA,
        )
        from dattri.task import AttributionTask

        model = bench.model_copy()
        info: dict[str, Any] = {}
        tb = bench.N if train_batch is None else train_batch
        if kind == "ekfac":

            def mean_loss(params: dict, data: tuple) -> torch.Tensor:  # its documented contract
                x, y = _batched(*data)
                z = torch.func.functional_call(model, params, (x,))
                return F.cross_entropy(z, y)

            task = AttributionTask(mean_loss, model, model.state_dict())
            att = IFAttributorEKFAC(task, device="cpu", damping=bench.damping / bench.N)
        else:
            task = AttributionTask(_ce_sum(model), model, model.state_dict())
            if kind == "explicit":
                att = IFAttributorExplicit(task, device="cpu", regularization=bench.damping)
            elif kind == "cg":
                att = IFAttributorCG(
                    task, device="cpu", regularization=bench.damping, max_iter=CG_MAXITER,
                    tol=CG_TOL,
                )  # fmt: skip
            elif kind == "lissa":
                # LiSSA's fixed point is (damping*scaling*I + E[H_batch])^-1 (times 1/scaling);
                # with the summed loss E[H_batch] = (b/N) H_sum, so damping*scaling must be
                # (b/N)*DAMPING, and scaling must exceed the largest eigenvalue of (b/N) H_sum.
                b = LISSA_BATCH
                scale = 1.5 * (b / bench.N) * bench.info["lambda_max"]
                damp = (b / bench.N) * bench.damping / scale
                att = IFAttributorLiSSA(
                    task, device="cpu", batch_size=b, num_repeat=1,
                    recursion_depth=LISSA_DEPTH, damping=damp, scaling=scale,
                )  # fmt: skip
                info.update(lissa_scaling=scale, lissa_damping=damp)
            else:
                raise ValueError(kind)
        train, query = _loaders(bench, tb)
        att.cache(DataLoader(bench.train_set(), batch_size=tb, shuffle=False))
        raw = att.attribute(train, query).detach().double().numpy()  # [N, M]
        info["raw_dtype"] = "float32 output buffer" if kind != "ekfac" else "see output"
        pf = -raw
        return Outcome(pf.sum(1), pf, raw.sum(1), info)

    name = f"dattri IF-{kind}" + ("" if train_batch is None else f" (batch {train_batch})")
    settings: dict[str, Any] = {
        "attributor": f"IFAttributor{kind}",
        "train_batch": train_batch or "N",
    }
    if kind in ("explicit", "cg"):
        settings["regularization"] = "damping"
    if kind == "cg":
        settings.update(max_iter=CG_MAXITER, tol=CG_TOL)
    if kind == "lissa":
        settings.update(batch_size=LISSA_BATCH, recursion_depth=LISSA_DEPTH, num_repeat=1)
    if kind == "ekfac":
        settings["damping"] = "damping / N (mean loss, its documented contract)"
    return Spec(name, "dattri", pair, settings, run)


def dattri_tracin_spec(variant: str, pair: str) -> Spec:
    """dattri ``TracInAttributor``: TracIn (checkpoints x lrs), Grad-Dot, Grad-Cos."""

    def run(bench: Bench) -> Outcome:
        from dattri.algorithm import TracInAttributor
        from dattri.task import AttributionTask

        model = bench.model_copy()
        if variant == "tracin":
            ckpts, w = bench.checkpoints, torch.tensor(bench.lrs, dtype=torch.float64)
        else:
            ckpts, w = [model.state_dict()], torch.ones(1, dtype=torch.float64)
        task = AttributionTask(_ce_sum(model), model, ckpts)
        att = TracInAttributor(
            task, weight_list=w, normalized_grad=variant == "grad_cos",
            projector_kwargs={"proj_type": "identity", "proj_dim": -1},  # exact gradients
            device="cpu",
        )  # fmt: skip
        train, query = _loaders(bench, 256)
        raw = att.attribute(train, query).detach().double().numpy()  # [N, M]
        pf = -raw
        return Outcome(pf.sum(1), pf, raw.sum(1), {})

    return Spec(
        f"dattri {variant}",
        "dattri",
        pair,
        {"attributor": "TracInAttributor", "projection": "identity", "batch": 256},
        run,
    )


def dattri_trak_spec(pair: str, seed: int = 0) -> Spec:
    """dattri ``TRAKAttributor`` (final model, ``TRAK_DIM`` Gaussian projection, ridge 0)."""

    def run(bench: Bench) -> Outcome:
        from dattri.algorithm import TRAKAttributor
        from dattri.task import AttributionTask

        model = bench.model_copy()
        m = _margin(model)
        task = AttributionTask(m, model, model.state_dict(), target_func=m)

        def p_correct(params: dict, data: tuple) -> torch.Tensor:
            x, y = _batched(*data)
            z = torch.func.functional_call(model, params, (x,))
            return torch.softmax(z, -1).gather(-1, y[:, None])[:, 0]

        att = TRAKAttributor(
            task, correct_probability_func=p_correct,
            projector_kwargs={"proj_dim": TRAK_DIM, "proj_type": "normal", "proj_seed": seed},
            device="cpu", regularization=0.0,
        )  # fmt: skip
        train, query = _loaders(bench, 256)
        att.cache(train)
        # TRAK.attribute takes (test, train=None), the reverse of dattri's other attributors
        raw = att.attribute(query).detach().double().numpy()  # [N, M]
        pf = -raw
        return Outcome(pf.sum(1), pf, raw.sum(1), {})

    return Spec(
        "dattri TRAK" + (f" seed {seed}" if seed else ""),
        "dattri",
        pair,
        {"proj_dim": TRAK_DIM, "proj_type": "normal", "regularization": 0.0, "checkpoints": 1,
         "proj_seed": seed},
        run,
    )  # fmt: skip


# ----------------------------------------------------------------------------- captum


def captum_tracin_spec(pair: str) -> Spec:
    """Captum ``TracInCP`` over the shared checkpoints -> ``[M, N]``."""

    def run(bench: Bench) -> Outcome:
        from captum.influence import TracInCP

        states = bench.checkpoints

        def load(model: nn.Module, ckpt: str) -> float:
            model.load_state_dict(states[int(ckpt)])
            return bench.lrs[int(ckpt)]

        tr = TracInCP(
            bench.model_copy(), bench.train_set(), [str(i) for i in range(len(states))],
            checkpoints_load_func=load, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            batch_size=256, sample_wise_grads_per_batch=True,
        )  # fmt: skip
        raw = tr.influence((bench.problem.Xq, bench.problem.yq)).detach().double().numpy()
        pf = -raw.T
        return Outcome(pf.sum(1), pf, raw.sum(0), {})

    return Spec(
        "captum TracInCP",
        "captum",
        pair,
        {"loss_fn": "CrossEntropyLoss(sum)", "sample_wise_grads_per_batch": True, "batch": 256},
        run,
    )


def captum_naive_if_spec(pair: str) -> Spec:
    """Captum ``NaiveInfluenceFunction`` (dense Hessian, rank = P so it is not truncated)."""

    def run(bench: Bench) -> Outcome:
        from captum.influence import NaiveInfluenceFunction

        model = bench.model_copy()
        P = sum(p.numel() for p in model.parameters())
        state = model.state_dict()

        def load(m: nn.Module, ckpt: str) -> float:
            m.load_state_dict(state)
            return 1.0

        nif = NaiveInfluenceFunction(
            model, bench.train_set(), "final", checkpoints_load_func=load,
            loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=256,
            projection_dim=P, hessian_reg=bench.damping, hessian_inverse_tol=1e-12,
        )  # fmt: skip
        raw = nif.influence((bench.problem.Xq, bench.problem.yq)).detach().double().numpy()
        pf = -raw.T
        return Outcome(pf.sum(1), pf, raw.sum(0), {"projection_dim": P})

    return Spec(
        "captum NaiveIF",
        "captum",
        pair,
        {"hessian_reg": "damping", "projection_dim": "P (no truncation)", "batch": 256},
        run,
    )


# ----------------------------------------------------------------------------- the run


def specs(damping: float) -> list[Spec]:
    """Every method, grouped by ``pair`` (netmend first in each group)."""
    d = {"damping": damping}
    nm = netmend_spec
    return [
        nm("netmend influence hessian", "influence", "influence-cg",
           {"curvature": "hessian", **d}, {}),  # solver "auto": dense Cholesky at this P
        nm("netmend influence hessian/cg", "influence", "influence-cg-only",
           {"curvature": "hessian", "solver": "cg", "cg_tol": CG_TOL, "cg_maxiter": CG_MAXITER,
            **d}, {}, per_failure=False),
        dattri_if_spec("cg", "influence-cg"),
        dattri_if_spec("explicit", "influence-cg"),
        captum_naive_if_spec("influence-cg"),
        nm("netmend influence hessian/lissa", "influence", "influence-lissa",
           {"curvature": "hessian", "solver": "lissa", "lissa_batch": LISSA_BATCH, **d}, {},
           per_failure=False),
        dattri_if_spec("lissa", "influence-lissa"),
        nm("netmend ekfac", "ekfac", "ekfac", d, {}),
        # the exact expectation over labels instead of one sampled label per example (an option
        # kronfluence does not have): no Monte-Carlo noise in the factors
        nm("netmend ekfac exact-Fisher", "ekfac", "ekfac", {**d, "fisher_type": "exact"}, {}),
        kronfluence_spec("ekfac", "ekfac"),
        dattri_if_spec("ekfac", "ekfac"),
        nm("netmend linear diag", "linear", "diagonal", {"curvature": "diag", "l2": damping},
           {}),  # l2 is identify's keyword: the damping of the diagonal Fisher
        kronfluence_spec("diagonal", "diagonal"),
        nm("netmend tracin", "tracin", "tracin", {"chunk_size": 256},
           {"checkpoints": CKPT_EPOCHS}),  # Captum's batch
        dattri_tracin_spec("tracin", "tracin"),
        captum_tracin_spec("tracin"),
        nm("netmend grad_dot", "grad_dot", "grad_dot", {"chunk_size": 256}, {}),
        dattri_tracin_spec("grad_dot", "grad_dot"),
        kronfluence_spec("identity", "grad_dot"),
        nm("netmend grad_cos", "grad_cos", "grad_cos", {"chunk_size": 256}, {}),
        dattri_tracin_spec("grad_cos", "grad_cos"),
        nm("netmend trak", "trak", "trak", TRAK_OPTIONS, {}),
        dattri_trak_spec("trak"),
    ]  # fmt: skip


def problem_and_truth(quick: bool, subsets: int) -> tuple[V.Problem, V.GroundTruth]:
    """The problem and its retraining ground truth (deterministic given the seed; the batched
    leave-one-out refits take ~10 s, so nothing is cached: no pickles to trust)."""
    n_train = 300 if quick else None
    problem = V.make_problem("digits", "logreg", flip_rate=0.2, seed=0, n_train=n_train)
    gt = V.ground_truth(problem, n_subsets=subsets, seed=0, progress=False)
    return problem, gt


def lambda_max(problem: V.Problem, damping: float, iters: int = 50) -> float:
    """Largest eigenvalue of ``H_sum`` (power iteration; used to set dattri LiSSA's scaling)."""
    fm, theta, X, y = problem.fm, problem.theta, problem.X, problem.y

    def loss(t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(fm.logits(t, X), y, reduction="sum")

    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(0), dtype=theta.dtype)
    lam = 0.0
    for _ in range(iters):
        v = v / v.norm()
        hv = torch.func.jvp(torch.func.grad(loss), (theta,), (v,))[1]
        lam = float(v @ hv)
        v = hv
    return lam + damping


def ratio_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """netmend/peer for quality, peer_seconds/netmend_seconds for speed, per equivalent pair."""
    out = []
    for r in rows:
        if r["library"] == "netmend" or r["pair"] == SEEDS_PAIR:
            continue
        mine = [m for m in rows if m["library"] == "netmend" and m["pair"] == r["pair"]]
        out.extend(_ratio(n, r) for n in mine if "seconds" in n and "seconds" in r)
    return out


def _ratio(n: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
    """One netmend row against one peer row of the same pair."""
    q: dict[str, Any] = {}
    both_pf = n["settings"].get("per_failure", True) and r.get("per_failure_given", True)
    lds_key = "lds" if both_pf else "lds_summed"  # compare like with like
    q["lds_variant"] = lds_key
    for k in ("spearman_loo", "lds", "precision_at_k", "auroc", "culprit_precision_at_5"):
        kk = lds_key if k == "lds" else k
        a, b = n.get(kk, math.nan), r.get(kk, math.nan)
        q[k] = a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan
    speed = r["seconds"] / n["seconds"]
    summed = n.get("scores_seconds")
    meets_quality = all(
        n.get(k, math.nan) >= r.get(k, math.nan) - TIE
        for k in ("spearman_loo", lds_key)
        if math.isfinite(r.get(k, math.nan))
    )
    return {
        "netmend": n["method"],
        "peer": r["method"],
        **q,
        "speedup": speed,
        "speedup_vs_summed_only": r["seconds"] / summed if summed else math.nan,
        "meets_quality": bool(meets_quality),
        "meets_speed": bool(speed >= 1.5),
    }


def trak_seed_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard error of each TRAK's Spearman/LDS over its projection seeds."""
    out: dict[str, Any] = {}
    for lib in ("netmend", "dattri"):
        rs = [
            r
            for r in rows
            if r["library"] == lib
            and r["pair"] in ("trak", SEEDS_PAIR)
            and "trak" in r["method"].lower()
        ]
        for k in ("spearman_loo", "lds"):
            v = np.array([r.get(k, math.nan) for r in rs], dtype=float)
            out.setdefault(lib, {})[k] = {
                "mean": float(np.nanmean(v)) if v.size else math.nan,
                "se": float(np.nanstd(v, ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan,
                "values": v.tolist(),
            }
    if "netmend" in out and "dattri" in out:
        out["meets_quality_on_means"] = all(
            out["netmend"][k]["mean"] >= out["dattri"][k]["mean"] - TIE
            for k in ("spearman_loo", "lds")
        )
    return out


def fmt(v: Any, f: str = "{:.3f}") -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f.format(v)
    return "-" if v is None else str(v)


def markdown(result: dict[str, Any]) -> str:
    head = (
        "| method | library | seconds | summed-only s | Spearman LOO | LDS | LDS summed | "
        "precision@K | AUROC | culprit P@5 | faults |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    lines = [
        "# netmend vs kronfluence, dattri, Captum",
        "",
        f"Problem: {result['problem']}. Damping {result['settings']['damping']} "
        f"(summed-loss scale) for every influence method; TRAK dim {TRAK_DIM}; "
        f"TracIn {CKPT_EPOCHS} SGD checkpoints. Machine: {result['machine']['processor']}, "
        f"torch threads {result['machine']['torch_threads']}. "
        "Generated by `benchmarks/peers.py`.",
        "",
        head,
    ]
    for r in result["methods"]:
        if "seconds" not in r:
            why = r.get("skipped") or r.get("error", "")
            lines.append(f"| {r['method']} | {r['library']} | - | - | - | - | - | - | - | - | "
                         f"{why[:120].replace('|', '/')} |")  # fmt: skip
            continue
        faults = "; ".join(r["faults"]) or ""
        lines.append(
            f"| {r['method']} | {r['library']} {r['version']} | {fmt(r['seconds'], '{:.2f}')} | "
            f"{fmt(r.get('scores_seconds'), '{:.2f}')} | "
            f"{fmt(r.get('spearman_loo'))} | {fmt(r.get('lds'))} | {fmt(r.get('lds_summed'))} | "
            f"{fmt(r.get('precision_at_k'))} | {fmt(r.get('auroc'))} | "
            f"{fmt(r.get('culprit_precision_at_5'))} | {faults} |"
        )
    lines += [
        "",
        "Ratios per equivalent pair: quality netmend/peer (target >= 1), speed "
        "peer_seconds/netmend_seconds (target >= 1.5).",
        "",
        "| netmend | peer | Spearman | LDS | precision@K | culprit P@5 | speedup | "
        "speedup vs summed-only | quality ok | speed ok |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for q in result["ratios"]:
        lines.append(
            f"| {q['netmend']} | {q['peer']} | {fmt(q['spearman_loo'])} | {fmt(q['lds'])} | "
            f"{fmt(q['precision_at_k'])} | {fmt(q['culprit_precision_at_5'])} | "
            f"{fmt(q['speedup'], '{:.2f}')} | {fmt(q['speedup_vs_summed_only'], '{:.2f}')} | "
            f"{'yes' if q['meets_quality'] else 'NO'} | "
            f"{'yes' if q['meets_speed'] else 'NO'} |"
        )
    ts = result.get("trak_over_projection_seeds") or {}
    if "netmend" in ts and "dattri" in ts:
        lines += [
            "",
            f"TRAK over projection seeds (0 and {', '.join(map(str, TRAK_SEEDS))}), mean ± s.e.: "
            + "; ".join(
                f"{lib} Spearman {ts[lib]['spearman_loo']['mean']:.3f} ± "
                f"{ts[lib]['spearman_loo']['se']:.3f}, LDS {ts[lib]['lds']['mean']:.3f} ± "
                f"{ts[lib]['lds']['se']:.3f}"
                for lib in ("netmend", "dattri")
            )
            + f". netmend at least dattri on the means: "
            f"{'yes' if ts.get('meets_quality_on_means') else 'NO'}.",
        ]
    if result.get("peer_faults"):
        lines += ["", "Peer faults seen in this run:", ""]
        lines += [f"* {f}" for f in result["peer_faults"]]
    lines += ["", "Peer faults found while building the benchmark:", ""]
    lines += [f"* {f}" for f in KNOWN_FAULTS]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=str(HERE / "peers.json"))
    ap.add_argument("--md", default=str(HERE / "peers.md"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="300 training examples, 20 subsets")
    ap.add_argument("--subsets", type=int, default=40, help="random subsets for the LDS")
    ap.add_argument(
        "--only", default=None, help="comma-separated pairs to rerun, merged into --json"
    )
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    problem, gt = problem_and_truth(args.quick, args.subsets)
    ckpts, lrs = make_checkpoints(problem)
    bench = Bench(problem, gt, float(problem.l2), ckpts, lrs, args.repeats, args.quick)
    bench.info["lambda_max"] = lambda_max(problem, 0.0)
    setup_s = time.perf_counter() - t0
    print(f"setup {setup_s:.1f}s: N={problem.N} M={bench.M}", flush=True)
    rows = []
    for spec in specs(bench.damping):
        if args.only and spec.pair not in args.only.split(","):
            continue
        row = evaluate(bench, spec)
        rows.append(row)
        print(
            f"{row['method']:<34} {fmt(row.get('seconds'), '{:.2f}'):>8}s "
            f"sp={fmt(row.get('spearman_loo'))} lds={fmt(row.get('lds'))} "
            f"p@K={fmt(row.get('precision_at_k'))} {row.get('error', row.get('skipped', ''))[:80]}",
            flush=True,
        )
    if not args.only or "trak" in args.only.split(","):
        # TRAK is randomised (the projection): one seed each decides nothing, so compare the
        # means over projection seeds
        for sd in TRAK_SEEDS:
            for spec in (
                netmend_spec(f"netmend trak seed {sd}", "trak", SEEDS_PAIR, TRAK_OPTIONS, {},
                             seed=sd),
                dattri_trak_spec(SEEDS_PAIR, seed=sd),
            ):  # fmt: skip
                row = evaluate(bench, spec)
                rows.append(row)
                print(f"{row['method']:<34} lds={fmt(row.get('lds'))}", flush=True)
    if args.only and Path(args.json).exists():  # merge the rerun rows into the last result
        old = json.loads(Path(args.json).read_text())["methods"]
        new = {r["method"]: r for r in rows}
        rows = [new.pop(r["method"], r) for r in old] + list(new.values())
    result = {
        "machine": machine(),
        "problem": problem.describe() if hasattr(problem, "describe") else problem.info,
        "ground_truth": gt.summary(),
        "settings": {
            "damping": bench.damping,
            "damping_scale": "summed training loss (H_sum + damping I); mean-scale peers get /N",
            "lambda_max_H_sum": bench.info["lambda_max"],
            "trak_dim": TRAK_DIM,
            "tracin_checkpoints": CKPT_EPOCHS,
            "tracin_lr": CKPT_LR,
            "lds_subsets": args.subsets,
            "cg": {"maxiter": CG_MAXITER, "tol": CG_TOL},
            "lissa": {"batch": LISSA_BATCH, "depth_dattri": LISSA_DEPTH},
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "setup_seconds": setup_s,
        },
        "methods": rows,
        "ratios": ratio_rows(rows),
        "trak_over_projection_seeds": trak_seed_summary(rows),
        "known_peer_faults": KNOWN_FAULTS,
        "peer_faults": sorted(
            {f"{r['method']}: {f}" for r in rows if r["library"] != "netmend" for f in r["faults"]}
            | {f"{r['method']}: {r['error']}" for r in rows if "error" in r}
        ),
    }
    write_json_atomic(args.json, result)
    Path(args.md).write_text(markdown(result))
    print(Path(args.md).read_text())


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
