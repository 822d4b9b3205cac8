"""The harness: run every identification method on one problem and score it against
retraining (:func:`validate`), with an optional counterfactual curve over removal sizes."""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from netmend.lab.validation.counterfactual import counterfactual
from netmend.lab.validation.groundtruth import GroundTruth, ground_truth, score_quality
from netmend.lab.validation.problem import Problem, make_problem
from netmend.lab.validation.render import _jsonable


def check_methods(
    methods: list[str] | None, options: dict[str, dict[str, Any]] | None = None
) -> None:
    """Refuse, before any retraining is spent: labels that name no registered method, a
    string for the list of labels (read letter by letter: "unknown method 'e'"), options for a
    label that is not run (silently unused) and options the method does not declare (each
    method failed alone, after the ground truth's retraining).

    Raises:
        ValueError: the unknown name, with "did you mean" and the registered names; the
            options that would not be used.
        TypeError: ``methods`` is a string.
    """
    from netmend import identification
    from netmend.identification.base import IDENTIFY_ARGUMENTS, check_options

    if isinstance(methods, str):
        raise TypeError(f"methods is a list of labels: pass [{methods!r}], not {methods!r}")
    labels = identification.available() if methods is None else list(methods)
    unused = sorted(set(options or {}) - set(labels))
    if unused:
        raise ValueError(
            f"options are given for {unused}, which are not among the methods run ({labels}): "
            "add them to methods, or drop their options"
        )
    for label in labels:
        opts = dict((options or {}).get(label, {}))
        name = str(opts.get("method", label))
        identification.get(name)
        check_options(name, {o: v for o, v in opts.items() if o not in IDENTIFY_ARGUMENTS})


def validate(
    methods: list[str] | None = None,
    problem: Problem | None = None,
    gt: GroundTruth | None = None,
    k: int | None = None,
    counterfactual_repeats: int = 5,
    options: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
    seed: int = 0,
    *,
    l2: float | str | None = None,
    counterfactual_ks: list[int] | None = None,
) -> dict[str, Any]:
    """Score every identification method against retraining and the planted corruption.

    Args:
        methods: labels of the methods to run (default: ``netmend.identification.available()``
            at call time). A label is a registered name, or any name whose ``options`` entry
            says ``{"method": <registered name>, ...}`` (e.g. ``"linear-ggn"``).
        problem: the task (default ``make_problem(seed=seed)``).
        gt: its ground truth (default ``ground_truth(problem, seed=seed)``).
        k: how many top-scored examples each method removes in the counterfactual test
            (default: the number of corrupted training labels).
        counterfactual_repeats: random removals of ``k`` examples to compare with.
        options: per-label keyword options passed to :func:`netmend.identify`.
        progress: show progress bars.
        seed: seeds the default problem, the ground truth, the methods and the random removals.
        l2: the ``l2`` passed to :func:`netmend.identify` unless a method's options set it:
            default the problem's training weight decay (so that the methods that use ``l2``,
            ``ewc`` and ``linear``, damp with the true objective's regulariser); "auto" for
            netmend's default (where ``ewc`` and ``linear`` rank nearly as ``grad_dot`` does:
            benchmarks/README.md, "Does the curvature matter?"). ``influence`` and ``ekfac``
            take their damping from their own ``damping`` option ("auto"), not from ``l2``.
        counterfactual_ks: more removal sizes for the counterfactual test (e.g. ``[k // 4,
            k // 2, 2 * k]``): each method's top-k' is removed and the model retrained, against
            k' random removals, giving a curve of held-out accuracy change over k' (one
            batched refit per k'). Reported as ``counterfactual_curve``.

    Returns:
        A JSON-ready dict: ``problem``, ``ground_truth`` (summary, with the noise floor),
        ``k``, ``methods`` (per label: ``score_quality`` figures, ``seconds`` of scoring,
        ``per_failure_seconds``, ``counterfactual`` deltas, or ``error`` if the method failed),
        ``counterfactual`` (the random reference and reference removals: the corrupted
        examples and, when every LOO effect was measured, the top-k by actual LOO effect).
    """
    from netmend import api, identification
    from netmend.identification.base import IGNORES_L2

    check_methods(methods, options)
    if int(counterfactual_repeats) < 1:
        raise ValueError(
            f"counterfactual_repeats must be >= 1 (random removals to compare with); got "
            f"{counterfactual_repeats}"
        )
    if problem is None:
        problem = make_problem(seed=seed)
    if gt is None:
        gt = ground_truth(problem, seed=seed, progress=progress)
    _check_ground_truth(problem, gt)
    labels = list(identification.available() if methods is None else methods)
    options = dict(options or {})
    n_bad = int(problem.corrupted.sum())
    k = n_bad if k is None else int(k)
    if not 0 < k < problem.N:
        raise ValueError(f"k must lie in [1, {problem.N - 1}]; got {k}")
    l2_default: float | str = problem.l2 if l2 is None else l2
    report: dict[str, Any] = {
        "problem": problem.describe(),
        "ground_truth": gt.summary(),
        "k": k,
        "identify_l2_default": l2_default,
        "methods": {},
    }
    removals: dict[str, np.ndarray] = {}
    order: dict[str, np.ndarray] = {}
    for label in labels:
        opts = dict(options.get(label, {}))
        name = str(opts.pop("method", label))
        if name not in IGNORES_L2:  # the others damp by their own option, and say so
            opts.setdefault("l2", l2_default)
        opts.setdefault("seed", seed)
        entry: dict[str, Any] = {"method": name, "options": _jsonable(opts)}
        try:
            ident = api.identify(
                problem.model,
                (problem.X, problem.y),
                (problem.Xq, problem.yq),
                method=name,
                k=k,
                progress=progress,
                device="cpu",
                **opts,
            )
            entry["seconds"] = ident.seconds
            pf: np.ndarray | None
            t0 = time.perf_counter()
            try:
                pf = np.asarray(ident.per_failure)
            except ValueError:
                pf = None
            entry["per_failure_seconds"] = time.perf_counter() - t0 if pf is not None else None
            entry.update(score_quality(problem, gt, ident.scores, pf))
            order[label] = np.argsort(-ident.scores, kind="stable")
            removals[label] = order[label][:k]
        except Exception as exc:  # recorded in the report, never hidden
            warnings.warn(f"method {label!r} failed: {exc!r}", stacklevel=2)
            entry["error"] = f"{type(exc).__name__}: {exc}"
        report["methods"][label] = entry

    refs = {"ref:corrupted": np.flatnonzero(problem.corrupted)}
    if gt.loo_idx.size == problem.N:
        refs["ref:loo_topk"] = gt.loo_idx[np.argsort(-gt.loo_effect, kind="stable")[:k]]
    cf = counterfactual(problem, {**removals, **refs}, k, counterfactual_repeats, seed, progress)
    if counterfactual_ks:  # the main k is already refitted: the curve reuses it
        report["counterfactual_curve"] = _curve(
            problem, gt, order, sorted({int(c) for c in counterfactual_ks} | {k}),
            counterfactual_repeats, seed, progress, done={k: cf},
        )  # fmt: skip
    for label, row in cf["sets"].items():
        if label in report["methods"]:
            report["methods"][label]["counterfactual"] = row
    cf["references"] = {n: cf["sets"][n] for n in refs}
    del cf["sets"]
    report["counterfactual"] = cf
    if gt.loo_idx.size == problem.N:  # the oracle's own figures, as an upper reference
        report["references"] = {
            "loo_oracle": score_quality(problem, gt, gt.loo_effect, gt.loo_effect_per_failure)
        }
    return report


def _curve(
    problem: Problem,
    gt: GroundTruth,
    order: dict[str, np.ndarray],
    ks: list[int],
    repeats: int,
    seed: int,
    progress: bool,
    done: dict[int, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Held-out accuracy change (vs random removal) after retraining without each method's
    top-k', for every k' in ``ks``; the corrupted set's top-k' by LOO effect as a reference.

    ``done`` maps a k' to the :func:`counterfactual` report already computed for it with the
    same removals (each method's top-k', the LOO top-k', the same seed and repeats), which is
    used instead of refitting.
    """
    bad = [c for c in ks if not 0 < c < problem.N]
    if bad:
        raise ValueError(f"counterfactual_ks must lie in [1, {problem.N - 1}]; got {bad}")
    out: dict[str, Any] = {"ks": ks, "random": [], "methods": {n: [] for n in order}}
    if gt.loo_idx.size == problem.N:
        loo_order = gt.loo_idx[np.argsort(-gt.loo_effect, kind="stable")]
        out["methods"]["ref:loo_topk"] = []
    for c in ks:
        sets = {n: o[:c] for n, o in order.items()}
        if "ref:loo_topk" in out["methods"]:
            sets["ref:loo_topk"] = loo_order[:c]
        cf = (done or {}).get(c) or counterfactual(problem, sets, c, repeats, seed, progress)
        out["random"].append(cf["random"]["heldout_acc"]["mean"])
        for n in out["methods"]:
            out["methods"][n].append(cf["sets"][n]["delta_heldout_acc_vs_random"])
    return out


def _check_ground_truth(problem: Problem, gt: GroundTruth) -> None:
    """Refuse ground truth measured on another problem: its sizes, and its base query losses
    against this problem's model (found by an outside-in trial: with equal sizes it was
    silently scored against)."""
    same_size = gt.lds_masks.shape[1] == problem.N and gt.base_loss.shape[0] == len(problem.yq)
    base = problem.losses(problem.theta[None], problem.Xq, problem.yq)[0].numpy()
    if not same_size or not np.allclose(base, gt.base_loss, rtol=1e-6, atol=1e-9):
        raise ValueError(
            "gt was not measured on this problem (its training-set size, query failures or "
            "base losses differ): pass the ground_truth(problem, ...) of this problem"
        )
