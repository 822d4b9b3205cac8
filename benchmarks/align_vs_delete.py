"""Correct the causes or delete them? "align" and "relabel" against "finetune" on D \\ C.

The set-up of the paper's MNIST experiment at digits scale: scikit-learn's 8x8 digits with the
paper's pair flips (1<->7 with p = 0.4, 6<->9 with p = 0.3), a small MLP, test failures split
into query and held-out halves. The causes are the EWC-influence top K with a generous K (the
number of flipped labels, ``--k-factor 1``), so that about half of them are clean. Deleting a
clean cause throws away a correct example; relabelling or aligning it keeps it.

Reported per seed and treatment: test accuracy, held-out failure accuracy, accuracy on the
examples the original model got right, and the test accuracy on the classes of the clean
causes (each clean cause weighs its class in).

Usage: ``python benchmarks/align_vs_delete.py [--seeds 0 1 ... 9] [--k-factor 1] [--json PATH]``
(about 25 s on one CPU thread for ten seeds); writes ``benchmarks/align_vs_delete.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import netmend
from netmend.corrupt import pair_flips
from netmend.datasets import load_digits
from netmend.evaluation import split_failures
from netmend.models import MLP
from netmend.training import TrainConfig, fit, predict

TREATMENTS: dict[str, tuple[str, dict[str, object]]] = {
    "finetune": ("finetune", {}),  # delete: fine-tune on D \\ C
    "relabel": ("relabel", {}),
    "align": ("align", {}),
    # controls: is it the alignment, or fine-tuning the last layer only?
    "relabel_last_layer": ("relabel", {"layers": None}),
    "align_no_steps": ("align", {"steps": 0}),
}


def run(seed: int, k_factor: float = 1.0, epochs: float = 0.5) -> dict[str, object]:
    train, test = load_digits(seed=seed)
    noisy = pair_flips(train.y, seed=seed)
    cfg = TrainConfig(epochs=40, batch_size=64, lr=3e-3)
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
    for name, (method, opts) in TREATMENTS.items():
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
            **opts,
        )
        res = netmend.evaluate(new, test, split, device="cpu")
        order = np.sort(causes)  # the record lists the causes as sorted training indices
        res["clean_class_acc"] = clean_class_acc(new)
        res["seconds"] = time.perf_counter() - t0
        if method == "relabel":
            ch = record["changed"].numpy()  # type: ignore[attr-defined]
            res["n_changed"] = int(ch.sum())
            res["changed_flipped"] = int((ch & flipped[order]).sum())
            new_lab = record["new_labels"].numpy()  # type: ignore[attr-defined]
            res["relabel_correct"] = float((new_lab == train.y.numpy()[order]).mean())
        if method == "align":
            res["mean_linf_moved"] = float(record["linf_moved"].mean())  # type: ignore[attr-defined]
            res["mean_energy_drop"] = float(
                (record["energy_before"] - record["energy_after"]).mean()  # type: ignore[operator]
            )
            lab = record["label_after"].numpy()  # type: ignore[attr-defined]
            res["label_after_correct"] = float((lab == train.y.numpy()[order]).mean())
        out[name] = res
    return out


def main() -> None:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--k-factor", type=float, default=1.0)
    ap.add_argument("--epochs", type=float, default=0.5, help="fine-tune epochs (all treatments)")
    ap.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    runs = [run(s, args.k_factor, args.epochs) for s in args.seeds]
    summary = {
        m: {
            key: float(np.mean([r[m][key] for r in runs]))  # type: ignore[index]
            for key in ("test_acc", "heldout_failure_acc", "correct_acc", "clean_class_acc")
        }
        for m in ("original", *TREATMENTS)
    }
    result = {
        "k_factor": args.k_factor,
        "epochs": args.epochs,
        "seeds": args.seeds,
        "mean": summary,
        "runs": runs,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for m, v in summary.items():
        print(f"{m:10s} " + "  ".join(f"{k}={x:.4f}" for k, x in v.items()))


if __name__ == "__main__":
    main()
