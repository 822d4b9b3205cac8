"""Energy-based alignment: correct the causes instead of deleting them.

After Huang et al., *Towards Understanding and Repairing Neural Networks' Failures by Aligning
Detrimental Training Examples* (NeurIPS 2023). A cause is often a good input with a bad label,
or a slightly atypical input; deleting it throws away what it still teaches. Alignment moves
each cause ``x_c`` to where the failure-adapted model ``theta_+F`` finds it typical, by bounded
descent on the energy

    E(x) = -logsumexp_k f_{theta_+F}(x)_k

(low energy = high unnormalised density under ``theta_+F``), labels the moved input by what
``theta_+F`` predicts there, and fine-tunes the last layers of a copy of ``theta_hat`` on the
aligned examples together with the retained data ``D \\ C``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from netmend.data.streaming import chunks
from netmend.model.functional import FunctionalModel
from netmend.treatment.adapted import (
    FINETUNE_OPTIONS,
    FIT_OPTIONS,
    check_hard,
    check_options,
    check_temperature,
    finetune_layers,
    layer_names,
    theta_plus_f,
)
from netmend.treatment.base import TreatContext, register
from netmend.treatment.labels import (
    LABEL_OPTIONS,
    check_min_confidence,
    check_source,
    label_distribution,
)

NORMS = ("linf", "l2")
CLIPS = ("global", "feature", "none")
ALIGN_OPTIONS = (
    "steps",
    "step_size",
    "eps",
    "norm",
    "clip",
    "temperature",
    "hard",
    *LABEL_OPTIONS,
    *FINETUNE_OPTIONS,
    *FIT_OPTIONS,
)
AUTO_EPS_FRACTION = 0.1
"""``eps="auto"``: this fraction of the training inputs' mean distance to their mean."""


def energy(fm: FunctionalModel, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``E(x) = -logsumexp_k f_theta(x)_k`` for each input: ``[B]`` from ``x`` ``[B, ...]``."""
    return -torch.logsumexp(fm.logits(theta, x), dim=1)


def energy_grad(fm: FunctionalModel, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dE/dx`` for each input, ``[B, ...]``.

    One backward pass of ``sum_b E(x_b)``: the examples do not interact (the model has no
    batch statistics in eval mode), so row ``b`` of the gradient is ``dE(x_b)/dx_b``.
    """
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(energy(fm, theta, xr).sum(), xr)
    return g


def _norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-row norm ``[B]`` of ``v`` ``[B, ...]``."""
    flat = v.flatten(1) if v.ndim > 1 else v[:, None]
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def _project(
    x: torch.Tensor,
    x0: torch.Tensor,
    eps: float,
    norm: str,
    lo: torch.Tensor | None,
    hi: torch.Tensor | None,
) -> torch.Tensor:
    """Project ``x`` onto the ``eps``-ball around ``x0``, then clip it to ``[lo, hi]``.

    Clipping afterwards keeps the ball constraint: ``x0`` lies in the box, so clipping a
    coordinate never moves it away from ``x0``'s.
    """
    d = x - x0
    if norm == "linf":
        d = d.clamp(-eps, eps)
    else:
        n = _norm(d, "l2").clamp_min(1e-30)
        scale = (eps / n).clamp(max=1.0)
        d = d * scale.view(-1, *([1] * (d.ndim - 1)))
    out = x0 + d
    if lo is not None and hi is not None:
        out = torch.maximum(torch.minimum(out, hi), lo)
    return out


def align_inputs(
    fm: FunctionalModel,
    theta: torch.Tensor,
    X0: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    eps: float,
    norm: str = "linf",
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
    chunk_size: int = 1024,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected, backtracked descent of the energy ``E`` of ``f_theta`` from each row of ``X0``.

    Each step moves ``x`` by ``step_size`` along ``-sign(dE/dx)`` ("linf") or
    ``-dE/dx / ||dE/dx||`` ("l2"), then projects onto ``{||x - x0|| <= eps}`` and the box
    ``[lo, hi]``. A step that does not lower ``E`` is refused and that input's step size
    halved, so every input's energy is non-increasing, step by step.

    Args:
        fm: the model, functionally; theta: its parameters ``[P]`` (here ``theta_+F``).
        X0: the inputs to align ``[K, ...]``.
        steps: number of steps (0 returns ``X0``).
        step_size: the initial step length (in the chosen norm).
        eps: radius of the ball around each input.
        norm: "linf" or "l2".
        lo, hi: bounds broadcastable to one input ``[...]`` (``None``: no box).
        chunk_size: inputs aligned together; device: where.

    Returns:
        ``(X, trace)``: the aligned inputs ``[K, ...]`` (CPU) and the energy of every input
        after each step, ``[steps + 1, K]`` (row 0: before any step).
    """
    device = torch.device(device)
    if X0.shape[0] == 0:  # no causes (the finetune-only control): nothing to move
        return X0.to("cpu", theta.dtype).clone(), torch.zeros(steps + 1, 0, dtype=theta.dtype)
    theta = theta.to(device)
    lo_d = None if lo is None else lo.to(device)
    hi_d = None if hi is None else hi.to(device)
    outs, traces = [], []
    for s in chunks(X0.shape[0], chunk_size):
        x0 = X0[s].to(device, theta.dtype)  # alignment moves inputs in a continuous space
        x = x0.clone()
        with torch.no_grad():
            e = energy(fm, theta, x)
        rate = torch.full_like(e, step_size)
        trace = [e.cpu()]
        for _ in range(steps):
            g = energy_grad(fm, theta, x)
            if norm == "linf":
                direction = g.sign()
            else:
                direction = g / _norm(g, "l2").clamp_min(1e-30).view(-1, *([1] * (g.ndim - 1)))
            view = rate.view(-1, *([1] * (x.ndim - 1)))
            cand = _project(x - view * direction, x0, eps, norm, lo_d, hi_d)
            with torch.no_grad():
                e_cand = energy(fm, theta, cand)
            ok = e_cand < e
            x = torch.where(ok.view(-1, *([1] * (x.ndim - 1))), cand, x)
            e = torch.where(ok, e_cand, e)
            rate = torch.where(ok, rate, rate / 2)
            trace.append(e.cpu())
        outs.append(x.detach().cpu())
        traces.append(torch.stack(trace))
    return torch.cat(outs), torch.cat(traces, dim=1)


def input_range(
    X: torch.Tensor, clip: str, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The box inputs are kept in (as ``dtype``): the training data's overall min/max
    ("global"), each feature's min/max ("feature", ``[...]``), or none ("none")."""
    if clip == "none":
        return None, None
    if clip == "global":
        return X.min().reshape(()).to(dtype), X.max().reshape(()).to(dtype)
    return X.amin(0).to(dtype), X.amax(0).to(dtype)


def auto_eps(X: torch.Tensor, norm: str, chunk_size: int = 4096) -> float:
    """``AUTO_EPS_FRACTION`` times the mean ``norm``-distance of training inputs to their mean."""
    mean = sum(
        (X[s].to(torch.float64).sum(0, keepdim=True) for s in chunks(len(X), chunk_size)),
        torch.zeros((1, *X.shape[1:]), dtype=torch.float64),
    ) / max(len(X), 1)
    total = 0.0
    for s in chunks(len(X), chunk_size):
        total += float(_norm(X[s].to(torch.float64) - mean, norm).sum())
    return AUTO_EPS_FRACTION * total / max(len(X), 1)


def check_continuous(X: Any) -> None:
    """Refuse discrete inputs: alignment moves inputs along the energy's gradient.

    The rule is the inputs' dtype: ``uint8`` (pixel intensities) and floating inputs are
    continuous and alignable (``uint8`` inputs are moved as floats, and the aligned inputs are
    given to the model as floats); the signed integer dtypes (``int64``/``int32``/``int16``/
    ``int8``, the dtypes of token ids and categorical codes) and ``bool`` are discrete: a
    token id has no gradient, and an "aligned" id half-way between two words means nothing.

    Raises:
        TypeError: ``X`` (a tensor, or a data source whose first batch is read) holds signed
            integers or booleans, or is not a tensor (e.g. dict batches of token ids).
    """
    if not isinstance(X, torch.Tensor):
        X = X[:1].to("cpu")
    if not isinstance(X, torch.Tensor):
        raise TypeError(
            "align moves tensor inputs; these batches are not tensors (e.g. dicts of token "
            "ids): use the 'relabel' or 'finetune' treatment instead"
        )
    if X.is_floating_point() or X.dtype == torch.uint8:
        return
    raise TypeError(
        f"align cannot move discrete inputs (dtype {X.dtype}, e.g. token ids for an "
        "nn.Embedding): there is no gradient with respect to a token id. Use the 'relabel' "
        "treatment (which corrects the causes' labels) or 'finetune' (which deletes them) "
        "instead; uint8 pixels are continuous and alignable."
    )


@register("align", options=ALIGN_OPTIONS)
def align(ctx: TreatContext) -> nn.Module:
    """Align each cause with the failure-adapted model, relabel it softly, fine-tune last layers.

    1. ``theta_+F``: ``ctx.theta_plus_f``, or fitted on ``ctx.failures`` (see
       :func:`netmend.treatment.adapted.theta_plus_f`).
    2. Each cause ``x_c`` descends the energy ``E(x) = -logsumexp f_{theta_+F}(x)`` for
       ``steps`` projected, backtracked steps inside the ``eps``-ball around ``x_c`` and the
       training data's range (:func:`align_inputs`).
    3. Its label becomes ``softmax(f_{theta_+F}(x_aligned) / temperature)`` (or the one-hot
       argmax when ``hard=True``); with ``source="knn"`` or ``"deletion"`` it comes from that
       label source instead (:mod:`netmend.treatment.labels`; "deletion" is asked about the
       aligned input, "knn" votes on the original cause). An aligned cause whose confidence
       (the label's maximum) is below ``min_confidence`` is left out.
    4. A copy of ``theta_hat`` is fine-tuned, ``layers`` only, on ``D \\ C`` (its labels) plus
       the aligned causes (their new labels) with the soft-target cross-entropy.

    Inputs must be continuous (floating or ``uint8``; :func:`check_continuous` refuses token
    ids).

    Options:
        steps (10), step_size ("auto": ``2.5 * eps / steps``), eps ("auto": 0.1 times the mean
        distance of the training inputs to their mean, in the chosen norm), norm ("linf" or
        "l2"), clip ("global": the training data's min/max; "feature": per feature; "none"),
        temperature (1.0), hard (False), source ("theta_plus_f"; or "knn" with neighbours (25)
        and embed (None), or "deletion", as in "relabel"), min_confidence (0.0), layers
        (``None``: the last ``nn.Linear``; an int ``k``: the last ``k`` modules with
        parameters; a list of module names; "all"),
        the fine-tune's epochs, lr, batch_size, optimizer, average_tail, min_steps (default:
        the "finetune" treatment's recipe, :func:`netmend.treatment.adapted.finetune_config`),
        fit_steps / fit_step_size (only when ``theta_+F`` is fitted here).

    Record (``ctx.record``, CPU tensors, one entry per cause in
    ``ctx.causes`` order, i.e. sorted training indices): ``causes``
    ``[K]``, ``l2_moved`` / ``linf_moved`` ``[K]`` (distance from ``x_c`` to its aligned
    input), ``energy_before`` / ``energy_after`` ``[K]``, ``energy_trace``
    ``[steps + 1, K]``, ``label_before`` ``[K]`` (the training label), ``label_after`` ``[K]``
    (argmax of the new label), ``soft_labels`` ``[K, classes]``, ``aligned`` ``[K, ...]``,
    ``confidence`` ``[K]``, ``dropped`` (bool ``[K]``), ``n_dropped``, ``source``, and the
    resolved ``eps``, ``step_size``, ``norm``, ``layers``.
    """
    check_options(ctx, ALIGN_OPTIONS, "align")
    check_continuous(ctx.X)
    opts = ctx.options
    norm = str(opts.get("norm", "linf"))
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")
    clip = str(opts.get("clip", "global"))
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {CLIPS}; got {clip!r}")
    steps = opts.get("steps", 10)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0; got {steps!r}")
    eps_opt = opts.get("eps", "auto")
    X = ctx.tensor_inputs("align")  # moves inputs: needs them as one tensor
    eps = auto_eps(X, norm) if eps_opt == "auto" else float(eps_opt)
    if not 0 < eps < float("inf"):
        raise ValueError(f"eps must be a positive number or 'auto'; got {eps_opt!r}")
    step_opt = opts.get("step_size", "auto")
    step_size = 2.5 * eps / max(steps, 1) if step_opt == "auto" else float(step_opt)
    if not 0 < step_size < float("inf"):
        raise ValueError(f"step_size must be a positive number or 'auto'; got {step_opt!r}")
    temperature = check_temperature(opts.get("temperature", 1.0))
    hard = check_hard(opts.get("hard", False))
    source = check_source(opts.get("source", "theta_plus_f"))
    min_confidence = check_min_confidence(opts.get("min_confidence", 0.0))
    layers = layer_names(ctx.model, opts.get("layers"))

    theta_f = theta_plus_f(ctx)
    Xc, yc = X[ctx.causes], ctx.y[ctx.causes]
    lo, hi = input_range(X, clip, ctx.fm.theta.dtype)
    aligned, trace = align_inputs(
        ctx.fm,
        theta_f,
        Xc,
        steps=steps,
        step_size=step_size,
        eps=eps,
        norm=norm,
        lo=lo,
        hi=hi,
        chunk_size=max(ctx.chunk_size, 1024),
        device=ctx.device,
    )
    probs = label_distribution(ctx, source, temperature, layers, X_model=aligned)
    classes = probs.shape[1]
    confidence, new_hard = probs.max(1)
    dropped = confidence < min_confidence
    used = ~dropped
    keep = ctx.keep
    X_all = torch.cat([X[keep].to(aligned.dtype), aligned[used]])
    targets: torch.Tensor
    if hard:
        targets = torch.cat([ctx.y[keep], new_hard[used]])
    else:
        onehot = torch.nn.functional.one_hot(ctx.y[keep], classes).to(probs.dtype)
        targets = torch.cat([onehot, probs[used]])
    model = finetune_layers(ctx, X_all, targets, layers, "align")
    moved = aligned - Xc.to(aligned.dtype)
    ctx.record.update(
        causes=ctx.causes.clone(),
        l2_moved=_norm(moved, "l2"),
        linf_moved=_norm(moved, "linf"),
        energy_before=trace[0].clone(),
        energy_after=trace[-1].clone(),
        energy_trace=trace,
        label_before=yc.clone(),
        label_after=new_hard,
        soft_labels=probs,
        aligned=aligned,
        confidence=confidence,
        dropped=dropped,
        n_dropped=int(dropped.sum()),
        source=source,
        eps=eps,
        step_size=step_size,
        norm=norm,
        layers=layers,
    )
    return model
