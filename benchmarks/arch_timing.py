"""The diagonal Fisher and a scoring pass on a ResNet-18 layout vs one training epoch.

Usage: .venv/bin/python benchmarks/arch_timing.py [--n 2000] [--out benchmarks/arch_timing.json]

ResNet-18 layout (``netmend.lab.models.ResNet18``, width 16, BatchNorm after every conv, eval
mode when scored) on the first ``n`` MNIST training images (28x28). In one process, in this
order: one training epoch (batch 128, Adam), the summed diagonal empirical Fisher with the
layer-hook path (BatchNorm affine parameters in closed form, issue 13), the same Fisher with
the ``vmap`` path (the only path before; timed on the first ``vmap_n`` examples and
extrapolated linearly, since it is per-example work), per-example gradients by hooks and by
vmap on one chunk (checked equal), and the default identification (``ewc``) and ``grad_dot``
end to end. Every figure is also given over the epoch, measured in the same run: the CPU is
shared with other jobs, so the absolute seconds are noisy, the ratios less so.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import netmend
from netmend.cli import write_json_atomic
from netmend.curvature import fisher_diag_sum
from netmend.curvature.fisher import per_example_grads
from netmend.lab.datasets import load_mnist
from netmend.lab.demo import machine
from netmend.lab.models import ResNet18
from netmend.model.functional import FunctionalModel
from netmend.model.training import TrainConfig, fit, predict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--vmap-n", type=int, default=16)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/arch_timing.json")
    args = ap.parse_args()
    train, test = load_mnist()
    X, y = train.X[: args.n], train.y[: args.n]
    torch.manual_seed(0)
    model = ResNet18(width=args.width)
    out: dict = {
        "machine": machine(),
        "note": "CPU shared with other engineers' jobs: seconds are perturbed; ratios to the "
        "epoch are measured in the same process",
        "model": f"ResNet18(width={args.width})",
        "params": sum(p.numel() for p in model.parameters()),
        "train_examples": args.n,
        "input": list(X.shape[1:]),
    }
    t = time.perf_counter()
    fit(model, X, y, TrainConfig(epochs=1.0), seed=0, progress=False)
    epoch = time.perf_counter() - t
    model.eval()
    out["train_epoch_s"] = epoch
    print("epoch", round(epoch, 2), "s", flush=True)
    fm = FunctionalModel.of(model)

    def timed(name: str, fn, scale: float = 1.0):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        res = fn()
        out[f"{name}_s"] = (time.perf_counter() - t0) * scale
        out[f"{name}_over_epoch"] = out[f"{name}_s"] / epoch
        write_json_atomic(args.out, out)  # partial results survive an interrupted run
        print(name, round(out[f"{name}_s"], 2), "s", flush=True)
        return res

    hooks = timed("fisher_hooks", lambda: fisher_diag_sum(fm, fm.theta, X, y, 128, method="hooks"))
    m = args.vmap_n
    timed(
        "fisher_vmap_extrapolated",
        lambda: fisher_diag_sum(fm, fm.theta, X[:m], y[:m], 32, method="vmap"),
        scale=args.n / m,
    )
    out["fisher_vmap_measured_on"] = m
    sub = fisher_diag_sum(fm, fm.theta, X[:m], y[:m], 128, method="hooks")
    ref = fisher_diag_sum(fm, fm.theta, X[:m], y[:m], 32, method="vmap")
    out["fisher_max_rel_diff_hooks_vs_vmap"] = float((sub - ref).abs().max() / ref.abs().max())
    g_h = per_example_grads(fm, fm.theta, X[:32], y[:32])
    g_v = fm.per_example_grads(fm.theta, X[:32], y[:32])
    out["per_example_grads_max_rel_diff"] = float((g_h - g_v).abs().max() / g_v.abs().max())
    pred = predict(model, test.X[:2000])
    wrong = torch.nonzero(pred != test.y[:2000]).squeeze(1)[:20]
    out["failures"] = int(wrong.numel())
    failures = (test.X[wrong], test.y[wrong])
    kw = dict(k=50, progress=False, device="cpu", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timed("identify_ewc", lambda: netmend.identify(model, (X, y), failures, "ewc", **kw))
        timed(
            "identify_grad_dot", lambda: netmend.identify(model, (X, y), failures, "grad_dot", **kw)
        )
    out["targets"] = {"fisher_over_epoch": 1.5, "scoring_pass_over_epoch": 2.0}
    write_json_atomic(args.out, out)
    print({k: v for k, v in out.items() if k != "machine"})
    del hooks


if __name__ == "__main__":
    main()
