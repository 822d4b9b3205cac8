"""The diagonal Fisher, the scoring passes and the default repair on a ResNet-18 layout, in
training epochs.

Usage: .venv/bin/python benchmarks/arch_timing.py [--n 2000] [--data mnist|fashion]
       [--threads 1] [--skip-before] [--only PASS ...] [--out benchmarks/arch_timing.json]

ResNet-18 layout (``netmend.lab.models.ResNet18``, width 16, BatchNorm after every conv, eval
mode when scored) on the first ``n`` MNIST (or Fashion-MNIST, ``--data fashion``) training
images (28x28), 20 test failures. ``--skip-before`` leaves out the two copies of the old code
paths (the "before" rows), which at 60k would take as long as the rest; ``--only`` times
just the passes named (e.g. ``fisher_hooks grad_products``: an idle rerun of one figure
without the hour the rest takes at 60k). In one process, in this order:

* one training epoch (batch 128, Adam, the model's ``fit``);
* what bounds a per-example pass (issue 13): one forward and backward of the eval-mode model
  with the parameter gradients (what any Fisher pass must at least do: the layer outputs'
  gradients plus one batched weight-gradient contraction per layer), and the hook path's own
  forward and backward (:func:`netmend.curvature.hooks.hook_pass`, the layer outputs'
  gradients only);
* the summed diagonal empirical Fisher by the hook path, now, and by the hook path as it was
  before issue 13's speed work (a copy of that code below, ``_fisher_chunk_before``: per-example
  Conv2d gradients by a grouped forward convolution over the whole chunk, squared out of
  cache), on the same model and data; the same Fisher with the ``vmap`` path (timed on the first
  ``vmap_n`` examples and extrapolated linearly, since it is per-example work); checks that all
  agree;
* the ``grad_dot`` pass's product ``G V`` for 20 vectors (the failures' gradients) without
  forming ``G`` (:func:`netmend.curvature.per_example_grad_products`) and as before (``[chunk,
  P]`` per-example gradients by the old path, then a matmul);
* ``netmend.identify`` with ``ewc`` (k=50: the Fisher, the fit of theta_+F, two likelihood
  passes) and with ``grad_dot``, end to end;
* ``netmend.repair`` with every default (EWC, the automatic K from two halves of the failures,
  the fine-tune on D minus the causes with the training recipe), end to end; the same with
  ``guard=False`` (identification and one fine-tune: every trial of the class guard adds one
  fine-tune) and with ``guard_data`` (a validation split, the test images after the first
  2,000);
* once, after the rounds: the Fisher by the ``vmap`` path (extrapolated, see above) and the
  checks that the paths agree;
* a training epoch of a fresh model before every further round and one at the end.

The passes run ``--rounds`` times (default 2) and each figure is the best round; the epoch is
the best of the epochs measured in the same process. Every figure is given in wall and in CPU
seconds of the process (one torch thread) and over the epoch; the CPU is shared with other
jobs, which stretch wall seconds far more than CPU seconds, so the ratios quoted
(``*_over_epoch``) are of CPU seconds.
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import cast

import torch
from torch import nn

import netmend
from netmend.cli import write_json_atomic
from netmend.curvature import fisher_diag_sum, per_example_grad_products
from netmend.curvature.fisher import per_example_grads
from netmend.curvature.hooks import hook_pass, layer_slices, norm_input
from netmend.lab.datasets import load_fashion_mnist, load_mnist
from netmend.lab.demo import machine
from netmend.lab.models import ResNet18
from netmend.model.functional import FunctionalModel
from netmend.model.training import TrainConfig, fit, predict

# --- the hook path before issue 13's speed work (commit 8c8e81e), kept as a control ----------


def _conv_grads_before(m: nn.Conv2d, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    ph, pw = cast("tuple[int, int]", m.padding)
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    B, C = xp.shape[:2]
    out = d.shape[1]
    Ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    Wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    g = torch.nn.functional.conv2d(
        xp.transpose(0, 1),
        d.reshape(B * out, 1, Ho, Wo),
        stride=(dh, dw),
        dilation=(sh, sw),
        groups=B,
    )[:, :, :kh, :kw]
    return g.reshape(C, B, out, kh * kw).permute(1, 2, 0, 3).reshape(B, out, C * kh * kw)


def _layer_grads_before(m: nn.Module, a: torch.Tensor, d: torch.Tensor):  # type: ignore[no-untyped-def]
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        lead = tuple(range(2, a.ndim))
        xh = norm_input(m, a)
        return (xh * d).sum(lead), d.sum(lead)
    if a.ndim == 2:
        return torch.einsum("bo,bi->boi", d, a), d
    if isinstance(m, nn.Conv2d):
        return _conv_grads_before(m, a, d), d.sum(2)
    raise TypeError(type(m))


def _fisher_chunk_before(fm, theta, x, y, layers):  # type: ignore[no-untyped-def]
    total = torch.zeros_like(theta)
    for m, sl, a, d in hook_pass(fm, theta, x, y, layers):
        if isinstance(m, nn.Linear) and a.ndim == 2:
            total[sl["weight"]] = ((d * d).T @ (a * a)).reshape(-1)
            if "bias" in sl:
                total[sl["bias"]] = (d * d).sum(0)
            continue
        gw, gb = _layer_grads_before(m, a, d)
        total[sl["weight"]] = (gw * gw).sum(0).reshape(-1)
        if "bias" in sl:
            total[sl["bias"]] = (gb * gb).sum(0)
    return total.detach()


def _grads_before(fm, theta, x, y, layers):  # type: ignore[no-untyped-def]
    G = torch.zeros(y.shape[0], theta.numel(), dtype=theta.dtype)
    for m, sl, a, d in hook_pass(fm, theta, x, y, layers):
        gw, gb = _layer_grads_before(m, a, d)
        G[:, sl["weight"]] = gw.reshape(y.shape[0], -1)
        if "bias" in sl:
            G[:, sl["bias"]] = gb
    return G


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--vmap-n", type=int, default=16)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="every timing is the best of these")
    ap.add_argument("--out", default="benchmarks/arch_timing.json")
    ap.add_argument("--data", choices=("mnist", "fashion"), default="mnist")
    ap.add_argument(
        "--skip-before", action="store_true", help="leave out the old code paths' timings"
    )
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="PASS",
        help="time only these passes (besides the epochs), e.g. fisher_hooks grad_products",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1, as real_arch.py: two threads on the shared 2-core machine "
        "stall whenever another job holds a core)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, test = load_mnist() if args.data == "mnist" else load_fashion_mnist()
    X, y = train.X[: args.n], train.y[: args.n]
    B = args.chunk
    torch.manual_seed(0)
    model = ResNet18(width=args.width)
    recipe = TrainConfig(epochs=1.0)
    out: dict = {
        "machine": machine(),
        "note": "CPU shared with other engineers' jobs (nice 5, 1 torch thread): every time is "
        "the best of --rounds rounds, the epoch the best of the rounds' epochs plus one at the "
        "end, all in the same process. *_over_epoch are ratios of the process's CPU seconds "
        "(time.process_time, one thread: what the pass itself computed, little moved by other "
        "jobs); *_wall_over_epoch the same for wall seconds, which other jobs perturb",
        "model": f"ResNet18(width={args.width})",
        "params": sum(p.numel() for p in model.parameters()),
        "train_examples": args.n,
        "chunk_size": B,
        "rounds": args.rounds,
        "input": list(X.shape[1:]),
        "data": "MNIST" if args.data == "mnist" else "Fashion-MNIST",
    }

    def one_epoch(m: nn.Module) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        fit(m, X, y, recipe, seed=0, progress=False)
        return time.perf_counter() - t, time.process_time() - c

    epochs = [one_epoch(model)]  # trains the model every pass below is timed on
    print("epoch", epochs[-1], "s (wall, cpu)", flush=True)
    model.eval()
    fm = FunctionalModel.of(model)
    theta = fm.theta
    layers = layer_slices(fm)
    assert layers is not None
    pred = predict(model, test.X[:2000])
    wrong = torch.nonzero(pred != test.y[:2000]).squeeze(1)[:20]
    out["failures"] = int(wrong.numel())
    failures = (test.X[wrong], test.y[wrong])
    guard_data = (test.X[2000:], test.y[2000:])
    V = per_example_grads(fm, theta, failures[0], failures[1]).T.contiguous()  # [P, M]
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    results: dict[str, object] = {}

    def over_chunks(fn) -> list:  # type: ignore[no-untyped-def]
        return [fn(X[s : s + B], y[s : s + B]) for s in range(0, args.n, B)]

    def fwd_bwd_params(x: torch.Tensor, t: torch.Tensor) -> None:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), t, reduction="sum").backward()

    def hook_only(x: torch.Tensor, t: torch.Tensor) -> None:
        hook_pass(fm, theta, x, t, layers)  # its activations are dropped: at 60k they fill RAM

    kw = dict(progress=False, device="cpu", seed=0)
    items = {
        "bound_forward_backward_with_weight_grads": lambda: over_chunks(fwd_bwd_params),
        "bound_hook_forward_backward": lambda: over_chunks(hook_only),
        "fisher_hooks": lambda: fisher_diag_sum(fm, theta, X, y, B, method="hooks"),
        "fisher_hooks_before": lambda: sum(
            over_chunks(lambda x, t: _fisher_chunk_before(fm, theta, x, t, layers))
        ),
        "grad_products": lambda: torch.cat(
            over_chunks(lambda x, t: per_example_grad_products(fm, theta, x, t, V))
        ),
        "grad_products_before": lambda: torch.cat(
            over_chunks(lambda x, t: _grads_before(fm, theta, x, t, layers) @ V)
        ),
        "identify_ewc": lambda: netmend.identify(model, (X, y), failures, "ewc", k=50, **kw),
        "identify_grad_dot": lambda: netmend.identify(
            model, (X, y), failures, "grad_dot", k=50, **kw
        ),
        "repair_default": lambda: netmend.repair(
            model, (X, y), failures, train_config=recipe, **kw
        ),
        # the same repair without the class guard: identification and one fine-tune, what the
        # repair costs before any guard trial (each trial is one more fine-tune)
        "repair_no_guard": lambda: netmend.repair(
            model, (X, y), failures, train_config=recipe, guard=False, **kw
        ),
        # the same repair with a validation split the model never trained on (the test images
        # after the 2,000 the failures come from): the class guard measures its trials there
        "repair_guard_data": lambda: netmend.repair(
            model, (X, y), failures, train_config=recipe, guard_data=guard_data, **kw
        ),
    }
    if args.skip_before:
        del items["fisher_hooks_before"], items["grad_products_before"]
    if args.only:
        unknown = sorted(set(args.only) - set(items))
        if unknown:
            raise SystemExit(f"--only: unknown passes {unknown}; choose from {sorted(items)}")
        items = {k: v for k, v in items.items() if k in args.only}
        out["only"] = list(items)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(args.rounds):
            if r:
                epochs.append(one_epoch(ResNet18(width=args.width)))
                print("epoch", epochs[-1], "s (wall, cpu)", flush=True)
            for name, fn in items.items():
                t0, c0 = time.perf_counter(), time.process_time()
                results[name] = fn()
                times.setdefault(name, []).append(time.perf_counter() - t0)
                cpu.setdefault(name, []).append(time.process_time() - c0)
                if name == "bound_forward_backward_with_weight_grads":
                    model.zero_grad(set_to_none=True)
                print(name, round(times[name][-1], 2), round(cpu[name][-1], 2), flush=True)
                out["times_s"], out["cpu_times_s"] = times, cpu
                write_json_atomic(args.out, out)  # partial results survive an interrupted run
    m = args.vmap_n
    t0, c0 = time.perf_counter(), time.process_time()
    fisher_diag_sum(fm, theta, X[:m], y[:m], 32, method="vmap")
    times["fisher_vmap_extrapolated"] = [(time.perf_counter() - t0) * args.n / m]
    cpu["fisher_vmap_extrapolated"] = [(time.process_time() - c0) * args.n / m]
    out["fisher_vmap_measured_on"] = m
    epochs.append(one_epoch(ResNet18(width=args.width)))
    print("epoch", epochs[-1], "s (wall, cpu)", flush=True)

    if "fisher_hooks_before" in results and "grad_products_before" in results:
        hooks, before = results["fisher_hooks"], results["fisher_hooks_before"]
        assert isinstance(hooks, torch.Tensor) and isinstance(before, torch.Tensor)
        out["fisher_max_rel_diff_now_vs_before"] = float(
            (hooks - before).abs().max() / before.abs().max()
        )
        prods, old = results["grad_products"], results["grad_products_before"]
        assert isinstance(prods, torch.Tensor) and isinstance(old, torch.Tensor)
        out["grad_products_max_rel_diff_now_vs_before"] = float(
            (prods - old).abs().max() / old.abs().max()
        )
    sub = fisher_diag_sum(fm, theta, X[:m], y[:m], B, method="hooks")
    ref = fisher_diag_sum(fm, theta, X[:m], y[:m], 32, method="vmap")
    out["fisher_max_rel_diff_hooks_vs_vmap"] = float((sub - ref).abs().max() / ref.abs().max())
    g_h = per_example_grads(fm, theta, X[:32], y[:32])
    g_v = fm.per_example_grads(theta, X[:32], y[:32])
    out["per_example_grads_max_rel_diff"] = float((g_h - g_v).abs().max() / g_v.abs().max())

    out["train_epochs_s"] = [w for w, _ in epochs]
    out["train_epochs_cpu_s"] = [c for _, c in epochs]
    epoch = min(w for w, _ in epochs)
    epoch_cpu = min(c for _, c in epochs)
    out["train_epoch_s"], out["train_epoch_cpu_s"] = epoch, epoch_cpu
    for name, ts in times.items():
        out[f"{name}_s"] = min(ts)
        out[f"{name}_cpu_s"] = min(cpu[name])
        out[f"{name}_over_epoch"] = min(cpu[name]) / epoch_cpu  # CPU seconds over CPU seconds
        out[f"{name}_wall_over_epoch"] = min(ts) / epoch
    for name in ("repair_default", "repair_no_guard", "repair_guard_data"):
        rep = results.get(name)
        if isinstance(rep, netmend.RepairResult):
            out[f"{name}_parts_s"] = dict(rep.seconds)  # wall, of the last round
            share = out[f"{name}_cpu_s"] / out[f"{name}_s"]  # wall -> CPU, same calls
            out[f"{name}_parts_over_epoch"] = {
                k: v * share / epoch_cpu for k, v in rep.seconds.items()
            }
            out[f"{name}_k"] = int(rep.causes.size)
            out[f"{name}_guard"] = rep.treatment_info.get("guard")
    out["targets"] = {
        "fisher_over_epoch": 1.5,
        "scoring_pass_over_epoch": 2.0,
        "repair_default_over_epoch": 6.0,
        "repair_guard_data_over_epoch": 6.0,
        "repair_no_guard_over_epoch": 6.0,
    }
    write_json_atomic(args.out, out)
    print({k: v for k, v in out.items() if k not in ("machine", "times_s")})


if __name__ == "__main__":
    main()
