"""Correct the causes or delete them? "align" and "relabel" against "finetune" on D \\ C.

The set-up of the paper's MNIST experiment at digits scale: scikit-learn's 8x8 digits with the
paper's pair flips (1<->7 with p = 0.4, 6<->9 with p = 0.3), a small MLP, test failures split
into query and held-out halves. The causes are the EWC-influence top K with a generous K (the
number of flipped labels, ``--k-factor 1``), so that about half of them are clean. Deleting a
clean cause throws away a correct example; relabelling or aligning it keeps it.

Reported per seed and treatment: test accuracy, held-out failure accuracy, accuracy on the
examples the original model got right, and the test accuracy on the classes of the clean
causes (each clean cause weighs its class in). For the relabelling treatments also the share
of flipped causes given their true label (``flipped_fixed``) and of clean causes that keep
theirs (``clean_kept``). ``relabel_oracle`` is a reference no user has: the causes get their
true labels, with the same fine-tune. The summary gives each treatment's paired per-seed
difference from deletion in held-out failure accuracy, with its standard error.

Usage: ``python benchmarks/align_vs_delete.py [--seeds 0 1 ... 9] [--k-factor 1] [--epochs 0.5]
[--lr 3e-4] [--treatments NAME ...] [--json PATH]`` (about a minute on one CPU thread for ten
seeds; 5-6 min with ``--epochs 24 --lr 3e-3``); writes ``benchmarks/align_vs_delete.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import netmend
from netmend.evaluation import split_failures
from netmend.lab.corrupt import pair_flips
from netmend.lab.datasets import load_digits
from netmend.lab.demo import machine
from netmend.lab.models import MLP
from netmend.model.training import TrainConfig, fit, predict

TREATMENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "finetune": ("finetune", {}),  # delete: fine-tune on D \\ C
    "relabel": ("relabel", {}),  # the default label source: "knn"
    "relabel_theta_plus_f": ("relabel", {"source": "theta_plus_f"}),  # the former default
    "relabel_deletion": ("relabel", {"source": "deletion"}),  # delete, then relabel
    "relabel_knn_min_conf": ("relabel", {"min_confidence": 0.6}),  # drop the unsure causes
    "relabel_soft": ("relabel", {"hard": False}),  # the k-NN vote shares as soft targets
    "relabel_input": ("relabel", {"embed": "input"}),  # the vote in pixel space
    "relabel_soft_input": ("relabel", {"embed": "input", "hard": False}),
    "align": ("align", {}),
    "align_knn": ("align", {"source": "knn"}),
    "align_knn_all_layers": ("align", {"source": "knn", "layers": "all"}),
    # controls: is it the alignment, or fine-tuning the last layer only?
    "relabel_last_layer": ("relabel", {"layers": None, "source": "theta_plus_f"}),
    "align_no_steps": ("align", {"steps": 0}),
}
REFERENCES = ("relabel_oracle",)
METRICS = ("test_acc", "heldout_failure_acc", "correct_acc", "clean_class_acc")


def run(
    seed: int,
    k_factor: float = 1.0,
    epochs: float = 0.5,
    lr: float | None = None,
    treatments: tuple[str, ...] = tuple(TREATMENTS),
) -> dict[str, object]:
    """One seed. Every treatment fine-tunes with the same explicit recipe: ``epochs`` passes
    at ``lr`` (default a tenth of the training rate), tail-averaged over the last half.
    ``treatments`` names the rows of :data:`TREATMENTS` to run ("finetune" always runs)."""
    train, test = load_digits(seed=seed)
    noisy = pair_flips(train.y, seed=seed)
    cfg = TrainConfig(epochs=40, batch_size=64, lr=3e-3)
    lr = cfg.lr / 10 if lr is None else lr
    torch.manual_seed(seed)
    model = fit(MLP(64, 10, hidden=(64,)), train.X, noisy.labels, cfg, seed, progress=False)
    split = split_failures(model, test.X, test.y, seed=seed)
    q = torch.as_tensor(split.query)
    failures = (test.X[q], test.y[q])
    flipped = noisy.mask.numpy()
    k = int(k_factor * flipped.sum())
    ident = netmend.identify(
        model, (train.X, noisy.labels), failures, "ewc", k, seed=seed, progress=False
    )
    causes = ident.causes
    clean = causes[~flipped[causes]]
    out: dict[str, object] = {
        "seed": seed,
        "n_train": int(train.y.numel()),
        "n_flipped": int(flipped.sum()),
        "k": k,
        "clean_fraction_of_causes": float(clean.size / causes.size),
        "original": {**netmend.evaluate(model, test, split, device="cpu")},
    }

    def clean_class_acc(m: torch.nn.Module) -> float:
        pred = predict(m, test.X)
        acc = {c: float((pred[test.y == c] == c).float().mean()) for c in range(10)}
        true = train.y[torch.as_tensor(clean)].tolist()
        return float(np.mean([acc[c] for c in true])) if true else float("nan")

    out["original"]["clean_class_acc"] = clean_class_acc(model)  # type: ignore[index]
    for name in dict.fromkeys(("finetune", *treatments)):
        method, opts = TREATMENTS[name]
        record: dict[str, object] = {}
        t0 = time.perf_counter()
        new = netmend.treat(
            model,
            (train.X, noisy.labels),
            causes,
            method,
            seed=seed,
            progress=False,
            device="cpu",
            train_config=cfg,
            fisher=ident.fisher,
            theta_plus_f=ident.info["theta_plus_f"],
            record=record,
            epochs=epochs,
            lr=lr,
            average_tail=0.5,
            **opts,
        )
        res = netmend.evaluate(new, test, split, device="cpu")
        order = np.sort(causes)  # the record lists the causes as sorted training indices
        res["clean_class_acc"] = clean_class_acc(new)
        res["seconds"] = time.perf_counter() - t0
        true = train.y.numpy()[order]
        fl = flipped[order]
        if method == "relabel":
            ch = record["changed"].numpy()  # type: ignore[attr-defined]
            res["n_changed"] = int(ch.sum())
            res["changed_flipped"] = int((ch & fl).sum())
            res["n_dropped"] = int(record["n_dropped"])  # type: ignore[call-overload]
            new_lab = record["new_labels"].numpy()  # type: ignore[attr-defined]
            res["relabel_correct"] = float((new_lab == true).mean())
            res["flipped_fixed"] = float((new_lab[fl] == true[fl]).mean())
            res["clean_kept"] = float((new_lab[~fl] == true[~fl]).mean())
        if method == "align":
            res["mean_linf_moved"] = float(record["linf_moved"].mean())  # type: ignore[attr-defined]
            res["mean_energy_drop"] = float(
                (record["energy_before"] - record["energy_after"]).mean()  # type: ignore[operator]
            )
            lab = record["label_after"].numpy()  # type: ignore[attr-defined]
            res["label_after_correct"] = float((lab == true).mean())
            res["flipped_fixed"] = float((lab[fl] == true[fl]).mean())
            res["clean_kept"] = float((lab[~fl] == true[~fl]).mean())
        out[name] = res
    # the reference: every cause gets its true label; the "relabel" fine-tune (all layers)
    t0 = time.perf_counter()
    targets = noisy.labels.clone()
    targets[torch.as_tensor(causes)] = train.y[torch.as_tensor(causes)]
    ft = dataclasses.replace(cfg, epochs=epochs, lr=lr, average_tail=0.5)
    oracle = fit(copy.deepcopy(model), train.X, targets, ft, seed, progress=False)
    res = netmend.evaluate(oracle, test, split, device="cpu")
    res["clean_class_acc"] = clean_class_acc(oracle)
    res["seconds"] = time.perf_counter() - t0
    out["relabel_oracle"] = res
    return out


def main() -> None:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--k-factor", type=float, default=1.0)
    ap.add_argument("--epochs", type=float, default=0.5, help="fine-tune epochs (all treatments)")
    ap.add_argument(
        "--lr", type=float, default=None, help="fine-tune rate (all treatments; default 3e-4)"
    )
    ap.add_argument(
        "--treatments",
        nargs="+",
        choices=list(TREATMENTS),
        default=list(TREATMENTS),
        help="rows to run (default all; deletion, 'finetune', always runs)",
    )
    ap.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    treatments = tuple(dict.fromkeys(("finetune", *args.treatments)))
    runs = [run(s, args.k_factor, args.epochs, args.lr, treatments) for s in args.seeds]
    names = ("original", *treatments, *REFERENCES)
    summary = {
        m: {key: float(np.mean([r[m][key] for r in runs])) for key in METRICS}  # type: ignore[index]
        for m in names
    }
    delete = np.array([r["finetune"]["heldout_failure_acc"] for r in runs])  # type: ignore[index]
    paired = {}
    for m in names[2:]:
        d = np.array([r[m]["heldout_failure_acc"] for r in runs]) - delete  # type: ignore[index]
        se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
        paired[m] = {
            "mean": float(d.mean()),
            "se": se,
            "wins": int((d > 0).sum()),
            "losses": int((d < 0).sum()),
        }
    result = {
        "k_factor": args.k_factor,
        "epochs": args.epochs,
        "lr": 3e-4 if args.lr is None else args.lr,
        "seeds": args.seeds,
        "treatments": list(treatments),
        "clean_fraction_of_causes": float(np.mean([r["clean_fraction_of_causes"] for r in runs])),
        "mean": summary,
        "heldout_failure_acc_minus_delete": paired,
        "seconds": time.perf_counter() - t0,
        "machine": machine(),
        "runs": runs,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"K factor {args.k_factor}, {args.epochs} epochs at lr {result['lr']}, clean share "
        f"of the causes {result['clean_fraction_of_causes']:.2f}"
    )
    for m, v in summary.items():
        line = f"{m:22s} " + "  ".join(f"{k}={x:.4f}" for k, x in v.items())
        if m in paired:
            p = paired[m]
            line += (
                f"  heldout-delete={p['mean']:+.4f}±{p['se']:.4f} "
                f"({p['wins']} wins, {p['losses']} losses)"
            )
        print(line)


if __name__ == "__main__":
    main()
