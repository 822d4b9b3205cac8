"""GPU check: the demo pipeline and one pass of every identification method on CUDA.

Usage: .venv/bin/python benchmarks/gpu_check.py [--out benchmarks/gpu_check.json] [--quick]
       torchrun --nproc-per-node=G benchmarks/gpu_check.py   (the sharded path, G GPUs)

Needs CUDA; without it, it says so and exits with status 0 (nothing is written). Budget:
about 5 minutes on one H100-class GPU (``--quick``: about 1 minute).

1. **Agreement.** A float64 SmallCNN (trained briefly on 2,000 MNIST images, 40 failures) is
   scored by every registered method on the CPU and on CUDA; the check passes when
   ``max|s_cuda - s_cpu| / max|s_cpu| <= 1e-4`` for every method (a norm-relative error:
   elementwise relative errors of near-zero scores say nothing). Shapley methods use their
   seeded sampling on both devices.
2. **Throughput.** Every method once on 60,000 MNIST images (float32 SmallCNN, 1,000
   failures, ``k=100``), with ``torch.cuda.max_memory_allocated`` reset before each:
   seconds, examples per second, peak GPU memory. Methods whose cost grows faster than
   linearly (tmc_shapley, banzhaf) run on the first 10,000 images.
3. **Demo.** ``netmend.lab.demo.run`` (the quick configuration with ``--quick``), timed,
   with its table's figures, and its HTML report and plots drawn from the CUDA models.
4. **Command line.** ``netmend repair --device cuda`` on ``.npz`` files and saved weights
   (exit code, seconds, the accuracies of its ``summary.json``).
5. **Placement.** ``netmend.repair`` of a CPU model (float32 and bf16) from data held on the
   GPU: the repaired model comes back on the CPU.

Under ``torchrun`` every rank runs the same script; netmend shards each pass across the
ranks (one GPU each: ``cuda:LOCAL_RANK``) and rank 0 writes the JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

SLOW = ("tmc_shapley", "banzhaf")
AGREE_RTOL = 1e-4


def _problem(n: int, failures: int, dtype: torch.dtype, seed: int = 0) -> tuple[Any, ...]:
    from netmend.lab.datasets import load_mnist
    from netmend.lab.models import SmallCNN
    from netmend.model.training import TrainConfig, fit, predict

    train, test = load_mnist()
    X, y = train.X[:n].to(dtype), train.y[:n]
    torch.manual_seed(seed)
    model = SmallCNN().to(dtype)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fit(model, X[:2000], y[:2000], TrainConfig(epochs=1), seed=seed, device=dev, progress=False)
    model = model.cpu().eval()
    Xt = test.X.to(dtype)
    wrong = (predict(model, Xt, dev) != test.y).nonzero().squeeze(1)[:failures]
    return model, (X, y), (Xt[wrong], test.y[wrong])


def agreement(quick: bool) -> dict[str, Any]:
    import netmend

    model, train, fail = _problem(1000 if quick else 2000, 40, torch.float64)
    out: dict[str, Any] = {}
    for name in netmend.identification.available():
        try:
            s = {
                dev: netmend.identify(
                    model, train, fail, name, k=10, device=dev, progress=False
                ).scores
                for dev in ("cpu", "cuda")
            }
            scale = float(abs(s["cpu"]).max()) or 1.0
            err = float(abs(s["cuda"] - s["cpu"]).max()) / scale
            out[name] = {"relative_error": err, "ok": err <= AGREE_RTOL}
        except Exception as exc:  # recorded, and the check fails
            out[name] = {"error": f"{type(exc).__name__}: {exc}", "ok": False}
    return out


def throughput(quick: bool) -> dict[str, Any]:
    import netmend

    n = 10_000 if quick else 60_000
    model, train, fail = _problem(n, 1000, torch.float32)
    n = int(train[0].shape[0])
    out: dict[str, Any] = {}
    for name in netmend.identification.available():
        m = min(n, 10_000) if name in SLOW else n
        data = (train[0][:m], train[1][:m])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        try:
            netmend.identify(model, data, fail, name, k=100, device="cuda", progress=False)
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        torch.cuda.synchronize()
        sec = time.perf_counter() - t
        out[name] = {
            "n": m,
            "seconds": sec,
            "examples_per_second": m / sec,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
        }
    return out


def demo(quick: bool) -> dict[str, Any]:
    from netmend.lab import demo as demo_mod

    config = demo_mod.DemoConfig.quick_config(0) if quick else demo_mod.DemoConfig(0)
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    result = demo_mod.run(config, progress=False)
    seconds = time.perf_counter() - t
    artifacts = result.pop("_artifacts", None)
    return {
        "seconds": seconds,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
        "runs": result["runs"],
        "references": result.get("references"),
        "timing": result.get("timing"),
        "report_and_plots": _attempt(lambda: _demo_outputs(result, artifacts)),
    }


def _attempt(work: Any) -> dict[str, Any]:
    """``work()``'s result, or the exception it raised, said (one step must not stop the
    rest of a check on a machine lent for minutes)."""
    try:
        return {"ok": True, **work()}
    except Exception as exc:  # recorded in the JSON, not raised
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _demo_outputs(result: dict[str, Any], artifacts: Any) -> dict[str, Any]:
    """The demo's HTML report and plots drawn from its CUDA models (they once moved the
    failures back to the CPU for a model on the GPU)."""
    import tempfile
    from pathlib import Path

    from netmend.report.html import demo_report
    from netmend.report.plots import demo_plots

    with tempfile.TemporaryDirectory() as tmp:
        page = demo_report(result, artifacts, Path(tmp) / "report.html")
        plots = demo_plots(result, artifacts, tmp)
        return {"report_bytes": page.stat().st_size, "plots": len(plots)}


def placement() -> dict[str, Any]:
    """``netmend.repair`` of a CPU model from data held on the GPU, with the automatic K (so
    the class guard runs), and of a bf16 copy: the repaired model must come back where the
    user's model is, and no step may mix devices (found by a code audit, not yet run)."""
    import copy

    import netmend
    from netmend.lab.datasets import load_digits
    from netmend.lab.models import MLP
    from netmend.model.training import TrainConfig, fit, predict

    def run() -> dict[str, Any]:
        train, test = load_digits()
        torch.manual_seed(0)
        cfg = TrainConfig(epochs=10)
        y = train.y.clone()
        y[:200] = (y[:200] + 1) % 10
        model = fit(MLP(64, 10), train.X, y, cfg, progress=False).eval()
        wrong = predict(model, test.X) != test.y
        fails = (test.X[wrong].cuda(), test.y[wrong].cuda())
        out: dict[str, Any] = {}
        for name, m in (("float32", model), ("bf16", copy.deepcopy(model).to(torch.bfloat16))):
            r = netmend.repair(m, (train.X.cuda(), y.cuda()), fails, train_config=cfg,
                               device="cuda", seed=0, progress=False)  # fmt: skip
            out[name] = {
                "causes": int(r.causes.size),
                "repaired_on": str(next(r.model.parameters()).device),
                "test_acc": float((predict(r.model, test.X) == test.y).float().mean()),
            }
        if any(v["repaired_on"] != "cpu" for v in out.values()):
            raise RuntimeError(f"the repaired model left the user's device: {out}")
        return out

    return _attempt(run)


def cli_repair(quick: bool) -> dict[str, Any]:
    """``netmend repair --device cuda`` on files: a trained SmallCNN, 2,000 (quick) or 10,000
    MNIST training images and the test set, failures chosen with ``--failure-indices auto``."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from netmend import cli
    from netmend.lab.datasets import load_mnist
    from netmend.lab.models import SmallCNN
    from netmend.model.training import TrainConfig, fit

    def run() -> dict[str, Any]:
        train, test = load_mnist()
        n = 2000 if quick else 10000
        torch.manual_seed(0)
        model = SmallCNN()
        fit(model, train.X[:n], train.y[:n], TrainConfig(epochs=2), seed=0, device="cuda",
            progress=False)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, d / "w.pt")
            np.savez(d / "train.npz", X=train.X[:n].numpy(), y=train.y[:n].numpy())
            np.savez(d / "test.npz", X=test.X[:2000].numpy(), y=test.y[:2000].numpy())
            t = time.perf_counter()
            code = cli.main([
                "repair", "--model", "netmend.lab.models:SmallCNN", "--weights", str(d / "w.pt"),
                "--train", str(d / "train.npz"), "--test", str(d / "test.npz"),
                "--failure-indices", "auto", "--device", "cuda", "--epochs", "2",
                "--out", str(d / "out"), "--no-progress",
            ])  # fmt: skip
            seconds = time.perf_counter() - t
            summary = (d / "out" / "summary.json").read_text() if code == 0 else "{}"
        import json

        s = json.loads(summary)
        return {"exit_code": code, "seconds": seconds, "accuracies": s.get("accuracies")}

    return _attempt(run)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/gpu_check.json")
    ap.add_argument("--quick", action="store_true", help="smaller problems: about a minute")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here; nothing was measured or written.")
        return 0
    from netmend.data import distributed
    from netmend.lab.demo import machine
    from netmend.store import write_json_atomic

    rank, size = distributed.world()
    result: dict[str, Any] = {"machine": machine(), "world_size": size, "quick": args.quick}
    result["agreement"] = agreement(args.quick)
    result["throughput"] = throughput(args.quick)
    result["demo"] = demo(args.quick)
    result["cli_repair"] = cli_repair(args.quick)
    result["placement"] = placement()
    result["ok"] = (
        all(v["ok"] for v in result["agreement"].values())
        and result["demo"]["report_and_plots"]["ok"]
        and result["cli_repair"]["ok"]
        and result["cli_repair"].get("exit_code") == 0
        and result["placement"]["ok"]
    )
    write_json_atomic(args.out, result)  # rank 0 only under torchrun
    if rank == 0:
        bad = [k for k, v in result["agreement"].items() if not v["ok"]]
        for step, v in (("demo report", result["demo"]["report_and_plots"]),
                        ("netmend repair", result["cli_repair"]),
                        ("placement", result["placement"])):  # fmt: skip
            if not v["ok"] or v.get("exit_code", 0) != 0:
                bad.append(f"{step} ({v.get('error', 'exit code ' + str(v.get('exit_code')))})")
        print(
            f"gpu_check: written to {args.out}; CPU vs CUDA agreement "
            + ("ok" if not bad else f"FAILED: {', '.join(bad)}")
        )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
