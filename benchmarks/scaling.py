"""Time and memory per pass at MNIST scale: 1 vs 2 processes, and N = 10k / 60k / 600k.

Usage: .venv/bin/python benchmarks/scaling.py [--out benchmarks/scaling.json] [--quick]

Model: an MLP 784-1024-256-10 (1,068,810 parameters, float32), trained for one epoch on the
first 10,000 MNIST training images (time and memory do not depend on accuracy); failures:
up to 1,000 MNIST test images it gets wrong. The parent process imports neither torch nor
netmend; a preparation subprocess writes the model and failures to a scratch directory, and
every measurement runs in a FRESH process (or a fresh ``torchrun`` group), so that peak
memory is that process's own.

Each run times, on the first ``N`` training images (600k: the 60k images tiled ten times),
with a barrier before and after every pass (so a 2-process time is the slower rank's):

* ``fisher_diag``: the summed diagonal empirical Fisher (layer hooks, chunk 128);
* ``log_likelihood``: ``log p(y_n|x_n)`` for every example (chunk 1024);
* ``jvp_scores``: ``g_n . v`` for every example (one forward-mode pass, chunk 128): the
  scoring pass of "linear" and the shape of every influence score's pass;
* ``per_example_grads``: ``G_chunk @ V`` with per-example gradients (chunk 128) on the first
  2k examples only (it streams ``[128, P]`` gradients: the pass of "grad_dot", "trak" and
  the per-failure culprits);
* ``identify_ewc``: ``netmend.identify(..., "ewc", k=100)`` end to end (a Fisher pass, the
  fit on the failures, two log-likelihood passes);

and records each pass's peak resident memory above the resident memory just before it
(``/proc/self/status`` VmHWM after resetting it through ``/proc/self/clear_refs``), per rank.

Each pass also records this process's CPU time (``time.process_time``, all its threads)
until its result is in hand: under a shared load the wall-clock speed-up of 2 processes
also measures how much more of the machine two processes get from the scheduler, while
``1p1t`` CPU time over the busiest rank's CPU time measures how the work is split.

Configurations at N = 60k, run in alternation ``--rounds`` times (median reported):
``1p1t`` (one process, one thread), ``1p2t`` (one process, two threads: the single-process
control that uses both cores) and ``2p1t`` (``torchrun --nproc-per-node=2``, one thread
each). Then ``1p1t`` at the sizes of ``--sizes`` (default 10k and 600k; the committed JSON
used 10k and 200k, see its ``command``), timing the three streaming passes only
(``fisher_diag``, ``log_likelihood``, ``jvp_scores``). The machine's load
(``/proc/loadavg``) is recorded before and after every run: other users share these cores,
so timings are perturbed and the ratios measured in one session are the figures to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HIDDEN = (1024, 256)
FAILURES = 1000
PREP_TRAIN = 10_000
GRAD_ROWS_N = 2_000
ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _load() -> list[float]:
    """The 1, 5 and 15 minute load averages (runnable processes; this machine has 2 cores)."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# ----------------------------------------------------------------------------- subprocesses


def prepare(scratch: Path) -> None:
    """Train the model briefly and pick the failures; write both to ``scratch``."""
    import torch
    from safetensors.torch import save_file

    from netmend.lab.datasets import load_mnist
    from netmend.lab.models import MLP
    from netmend.model.training import TrainConfig, fit, predict

    torch.set_num_threads(2)
    train, test = load_mnist()
    torch.manual_seed(0)
    model = MLP(784, 10, HIDDEN)
    fit(model, train.X[:PREP_TRAIN], train.y[:PREP_TRAIN], TrainConfig(epochs=1), progress=False)
    wrong = (predict(model, test.X) != test.y).nonzero().squeeze(1)[:FAILURES]
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors["failures_X"] = test.X[wrong].contiguous()
    tensors["failures_y"] = test.y[wrong].contiguous()
    save_file(tensors, str(scratch / "problem.safetensors"))


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


ALL_PASSES = ("fisher_diag", "log_likelihood", "jvp_scores", "per_example_grads", "identify_ewc")
SWEEP_PASSES = ("fisher_diag", "log_likelihood", "jvp_scores")


def worker(scratch: Path, n: int, threads: int, out: Path, passes: tuple[str, ...]) -> None:
    """Time and measure every pass on the first ``n`` images (this process's share of them
    under torchrun); write ``out`` (``.rank<r>`` appended under torchrun)."""
    import torch
    from safetensors.torch import load_file

    import netmend
    from netmend.curvature import fisher_diag_sum, per_example_grads
    from netmend.data import distributed
    from netmend.lab.datasets import load_mnist
    from netmend.lab.demo import machine
    from netmend.lab.models import MLP
    from netmend.model.functional import FunctionalModel, log_likelihoods, stream

    torch.set_num_threads(threads)
    rank, size = distributed.world()
    load_before = _load()
    tensors = load_file(str(scratch / "problem.safetensors"))
    model = MLP(784, 10, HIDDEN)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    model.eval()
    fail = (tensors["failures_X"], tensors["failures_y"])
    train, _ = load_mnist()
    reps = -(-n // train.X.shape[0])
    X = train.X.repeat(reps, 1, 1, 1)[:n] if reps > 1 else train.X[:n].clone()
    y = train.y.repeat(reps)[:n] if reps > 1 else train.y[:n].clone()
    del train
    fm = FunctionalModel.of(model)
    theta = fm.theta
    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(1))
    V = torch.randn(theta.numel(), 10, generator=torch.Generator().manual_seed(2))
    cpu = torch.device("cpu")
    record: dict[str, Any] = {
        "machine": machine(),
        "n": n,
        "rank": rank,
        "world_size": size,
        "threads": threads,
        "params": fm.num_params,
        "failures": int(fail[1].numel()),
        "data_bytes": int(X.numel() * X.element_size()),
        "rss_before_passes": _status()["VmRSS"],
        "seconds": {},
        "cpu_seconds": {},
        "peak_increment_bytes": {},
    }

    def timed(name: str, fn: Any) -> Any:
        if name not in passes:
            return None
        distributed.barrier()
        _reset_peak()
        base = _status()["VmRSS"]
        t, c = time.perf_counter(), time.process_time()
        res = fn()
        record["cpu_seconds"][name] = time.process_time() - c  # this rank's work
        distributed.barrier()
        record["seconds"][name] = time.perf_counter() - t
        record["peak_increment_bytes"][name] = _status()["VmHWM"] - base
        return res

    m = min(n, GRAD_ROWS_N)
    timed("fisher_diag", lambda: fisher_diag_sum(fm, theta, X, y, 128))
    timed("log_likelihood", lambda: log_likelihoods(fm, theta, X, y, 1024))
    timed(
        "jvp_scores",
        lambda: stream(X, y, lambda x, t: fm.ll_jvp(theta, v, x, t)[1], 128, cpu, desc="jvp"),
    )
    timed(
        "per_example_grads",
        lambda: stream(
            X[:m], y[:m], lambda x, t: per_example_grads(fm, theta, x, t) @ V, 128, cpu, desc="g"
        ),
    )
    record["per_example_grads_n"] = m
    timed(
        "identify_ewc",
        lambda: netmend.identify(model, (X, y), fail, "ewc", k=100, progress=False, device="cpu"),
    )
    record["load_before"] = load_before
    record["load_after"] = _load()
    path = out if size == 1 else out.with_name(f"{out.name}.rank{rank}")
    path.write_text(json.dumps(record, indent=2))


# ----------------------------------------------------------------------------- extrapolation

TARGET = {
    "examples": 10_000_000,
    "params": 100_000_000,
    "gpus": 8,
    "failures": 1000,
    "batch_size": 128,
    "bytes_per_param": 4,
    "gpu_flops_per_s": 100e12,
    "allreduce_bus_bytes_per_s": 200e9,
    "example_bytes": 224 * 224 * 3,
    "reuse": {"mlp": 1, "vit_b16_224": 197},
}
"""Assumptions of :func:`extrapolate` (docs/scaling.md explains each)."""


LL_PASSES = 8
"""Log-likelihood passes of the default identification: log p(z|theta_hat) once, and one at
theta_+F for the fit on all failures and for each half of the automatic K's 3 splits."""


def extrapolate(measured: dict[str, Any], target: dict[str, Any] = TARGET) -> dict[str, Any]:
    """Size a default repair (ewc identification with the automatic K, then finetune) at
    ``target`` from the CPU measurements: pass costs relative to a log-likelihood pass, and
    the assumptions in ``target`` (GPU throughput, interconnect, FLOPs per parameter)."""
    rank0 = measured["processes"]["runs"]["1p1t"][0]["ranks"][0]
    sec = rank0["cpu_seconds"]  # CPU time: less perturbed by the other users' load than wall
    n_cpu, p_cpu = rank0["n"], rank0["params"]
    per_ex = {k: v / n_cpu for k, v in sec.items()}
    per_ex["per_example_grads"] = sec["per_example_grads"] / rank0["per_example_grads_n"]
    ratio = {k: per_ex[k] / per_ex["log_likelihood"] for k in per_ex}
    cpu_flops = 2 * p_cpu / per_ex["log_likelihood"]  # an MLP's forward: 2 FLOPs per parameter
    N, P, W = target["examples"], target["params"], target["gpus"]
    R, B = target["gpu_flops_per_s"], target["allreduce_bus_bytes_per_s"]
    bpp = target["bytes_per_param"]
    ring = 2 * (W - 1) / W  # bytes sent per byte all-reduced, per rank
    steps = N // target["batch_size"]
    out: dict[str, Any] = {
        "target": target,
        "cpu_pass_cost_relative_to_log_likelihood": ratio,
        "cpu_forward_flops_per_s": cpu_flops,
        "passes": {
            "fisher_diag": 1,
            "log_likelihood": LL_PASSES,
            "finetune_epochs": 1,
            "note": "ewc: one Fisher pass, one log-likelihood pass at theta_hat (shared), then "
            "one at theta_+F per call; the automatic K calls it on all failures and on both "
            "halves of 3 half-splits (7 calls); finetune: one epoch of D minus C (its default "
            "for large data); culprits: one per-example-gradient pass",
        },
        "bytes_moved_per_rank": {
            "fisher_allreduce": ring * P * bpp,
            "scores_allgather_per_pass": N * 4 * (W - 1) / W,
            "culprits_allgather": N * target["failures"] * 4 * (W - 1) / W,
            "finetune_gradient_allreduce_total": steps * ring * P * bpp,
            "finetune_steps": steps,
            "training_set_read_per_pass": N * target["example_bytes"] / W,
        },
        "memory_per_rank_bytes": {
            "identify_parameter_vectors": 7 * P * bpp,
            "finetune_parameter_vectors": 6 * P * bpp,
            "per_example_gradient_chunk_128": 128 * P * bpp,
            "scores_float64": N * 8,
            "culprits_gathered": 2 * N * target["failures"] * 4,
            "training_set_materialised": N * target["example_bytes"],
        },
        "hours": {},
    }
    for name, u in target["reuse"].items():
        fwd = 2 * P * u  # FLOPs of one example's forward pass
        t_ll = N * fwd / (W * R)
        t_fisher = ratio["fisher_diag"] * t_ll
        t_finetune = 3 * t_ll + steps * ring * P * bpp / B  # fwd+bwd, then the all-reduces
        t_culprits = ratio["per_example_grads"] * t_ll
        out["hours"][name] = {
            "flops_per_example_forward": fwd,
            "log_likelihood_pass": t_ll / 3600,
            "fisher_pass": t_fisher / 3600,
            "identify_ewc_auto_k": (t_fisher + LL_PASSES * t_ll) / 3600,
            "finetune_epoch": t_finetune / 3600,
            "finetune_allreduce_only": steps * ring * P * bpp / B / 3600,
            "default_repair": (t_fisher + LL_PASSES * t_ll + t_finetune) / 3600,
            "culprits_pass": t_culprits / 3600,
        }
    return out


# ----------------------------------------------------------------------------- the parent


def _run(cmd: list[str], env: dict[str, str]) -> None:
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def measure(
    scratch: Path, n: int, config: str, passes: tuple[str, ...] = ALL_PASSES
) -> dict[str, Any]:
    """One fresh run of ``config`` ("1p1t", "1p2t" or "2p1t") on ``n`` images."""
    procs, threads = int(config[0]), int(config[2])
    out = scratch / f"run-{config}-{n}-{time.monotonic_ns()}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    args = [str(Path(__file__)), "--worker", str(scratch), str(n), str(threads), str(out)]
    args += ["--passes", ",".join(passes)]
    if procs == 1:
        _run([sys.executable, *args], env)
        return {"ranks": [json.loads(out.read_text())]}
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", f"--nproc-per-node={procs}", *args]
    _run(cmd, env)
    return {
        "ranks": [
            json.loads(out.with_name(f"{out.name}.rank{r}").read_text()) for r in range(procs)
        ]
    }


def _median_seconds(runs: list[dict[str, Any]], key: str = "seconds") -> dict[str, float]:
    """Median over the runs of a pass's time; CPU time: that of the busiest rank."""
    names = runs[0]["ranks"][0][key]
    return {k: statistics.median(max(rk[key][k] for rk in r["ranks"]) for r in runs) for k in names}


def sweep(scratch: Path, args: argparse.Namespace, at_n: dict[str, Any]) -> dict[str, Any]:
    """``1p1t`` runs at ``--sizes`` (plus ``at_n``, the run at ``--n``), per example."""
    runs = {args.n: at_n}
    for n in [int(s) for s in args.sizes.split(",") if s]:
        runs[n] = measure(scratch, n, "1p1t", SWEEP_PASSES)
        print(n, runs[n]["ranks"][0]["seconds"], flush=True)
    out = {}
    for n, r in sorted(runs.items()):
        rk = r["ranks"][0]
        count = {
            k: rk["per_example_grads_n"] if k == "per_example_grads" else n for k in rk["seconds"]
        }
        out[str(n)] = {
            "seconds": rk["seconds"],
            "seconds_per_example": {k: v / count[k] for k, v in rk["seconds"].items()},
            "cpu_seconds": rk["cpu_seconds"],
            "cpu_seconds_per_example": {k: v / count[k] for k, v in rk["cpu_seconds"].items()},
            "peak_increment_bytes": rk["peak_increment_bytes"],
            "data_bytes": rk["data_bytes"],
            "load": [rk["load_before"], rk["load_after"]],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/scaling.json")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sizes", default="10000,600000", help="N of the 1p1t size sweep")
    ap.add_argument("--n", type=int, default=60_000, help="N of the 1 vs 2 process comparison")
    ap.add_argument("--passes", default=",".join(ALL_PASSES), help="(worker) passes to time")
    ap.add_argument("--configs", default="1p1t,2p1t,1p2t", help="process x thread settings")
    ap.add_argument("--worker", nargs=4, metavar=("SCRATCH", "N", "THREADS", "OUT"))
    ap.add_argument("--prepare", metavar="SCRATCH")
    ap.add_argument("--extrapolate", action="store_true", help="only redo --out's extrapolation")
    ap.add_argument("--sweep-only", action="store_true", help="only redo --out's size sweep")
    args = ap.parse_args()
    if args.extrapolate:
        from netmend.store import write_json_atomic

        done = json.loads(Path(args.out).read_text())
        done["extrapolation"] = extrapolate(done)
        write_json_atomic(args.out, done)
        print(json.dumps(done["extrapolation"]["hours"], indent=1))
        return
    if args.sweep_only:
        from netmend.store import write_json_atomic

        done = json.loads(Path(args.out).read_text())
        with tempfile.TemporaryDirectory() as tmp:
            _run([sys.executable, str(Path(__file__)), "--prepare", tmp], dict(os.environ))
            done["sizes"] = sweep(Path(tmp), args, done["processes"]["runs"]["1p1t"][0])
        done["sweep_command"] = " ".join(["benchmarks/scaling.py", *sys.argv[1:]])
        write_json_atomic(args.out, done)
        return
    if args.prepare:
        prepare(Path(args.prepare))
        return
    if args.worker:
        s, n, t, o = args.worker
        worker(Path(s), int(n), int(t), Path(o), tuple(args.passes.split(",")))
        return
    result: dict[str, Any] = {
        "command": " ".join(["benchmarks/scaling.py", *sys.argv[1:]]),
        "model": f"MLP 784-{'-'.join(map(str, HIDDEN))}-10, float32",
        "note": "CPU figures on a 2-core machine shared with other users: timings are "
        "perturbed by their load (load_before/load_after per run); compare ratios measured "
        "in the same session",
    }
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        _run([sys.executable, str(Path(__file__)), "--prepare", str(scratch)], dict(os.environ))
        configs = tuple(args.configs.split(","))
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
        for _ in range(args.rounds):
            for c in configs:
                runs[c].append(measure(scratch, args.n, c))
                print(c, runs[c][-1]["ranks"][0]["seconds"], flush=True)
        med = {c: _median_seconds(runs[c]) for c in configs}
        cpu = {c: _median_seconds(runs[c], "cpu_seconds") for c in configs}
        result["processes"] = {
            "n": args.n,
            "runs": runs,
            "median_seconds": med,
            "median_cpu_seconds_busiest_rank": cpu,
            "speedup_2p1t_over_1p1t": {k: med["1p1t"][k] / med["2p1t"][k] for k in med["1p1t"]},
            "cpu_work_ratio_1p1t_over_busiest_rank_2p1t": {
                k: cpu["1p1t"][k] / cpu["2p1t"][k] for k in cpu["1p1t"]
            },
            "speedup_2p1t_over_1p2t": (
                {k: med["1p2t"][k] / med["2p1t"][k] for k in med["1p2t"]} if "1p2t" in med else None
            ),
        }
        result["sizes"] = sweep(scratch, args, runs["1p1t"][0])
        result["machine"] = runs["1p1t"][0]["ranks"][0]["machine"]
        result["extrapolation"] = extrapolate(result)
    from netmend.store import write_json_atomic  # after the runs: the parent stays small

    write_json_atomic(args.out, result)
    print(json.dumps(result["processes"]["speedup_2p1t_over_1p1t"], indent=1))


if __name__ == "__main__":
    main()
