"""Issue 11's figures on the *test* suites: converged models on all of MNIST / Fashion-MNIST.

The default pipeline (``ewc/finetune``: EWC-influence, the automatic K, fine-tune on D∖C) and
its automatic-K rule were chosen on the dev suites (the digits suites and the demo's seed 0,
``benchmarks/k_rule.py``). This script only *reports* them on suites no choice looked at:

* ``fashion-full/pair``: all 60,000 Fashion-MNIST training images, T-shirt<->Shirt flipped
  with probability 0.4 and Pullover<->Coat with 0.3, SmallCNN trained 12 epochs with the
  parameters averaged over the second half (``benchmarks/fashion_convergence.json``);
* ``mnist-full/sym20``: all 60,000 MNIST images, 20% symmetric label noise, the demo's
  6-epoch averaged recipe;
* ``mnist-full/paper-pair``: the demo (the paper's 1<->7 / 6<->9 flips), seeds 1 and 2 only
  (seed 0 was a dev run), from ``benchmarks/demo_seeds.json`` and ``demo_cleanlab.json``.

The two bench suites are run by ``netmend bench`` with every control in the same run::

    OMP_NUM_THREADS=1 netmend bench --suites fashion-full/pair \\
        --pipelines ewc/finetune ewc/relabel --seeds 0 1 2 --cv-folds 3 --no-plots \\
        --out benchmarks/bench_full_fashion
    OMP_NUM_THREADS=1 netmend bench --suites mnist-full/sym20 \\
        --pipelines ewc/finetune ewc/relabel --seeds 0 1 2 --cv-folds 3 --no-plots \\
        --out benchmarks/bench_full_mnist
    .venv/bin/python benchmarks/test_suites.py     # -> benchmarks/test_suites.json

Per suite, over seeds (mean ± standard error), the figures of issue 11:

* the **Pareto criterion** on the seed means (:func:`netmend.lab.bench.pareto_summary`'s rule:
  held-out failures above random-K, test accuracy ≥ max(original, finetune-only) − 0.2 points,
  no class down more than 10 points);
* the **diagnosis gain** over random-K next to the oracle's (the truly corrupted examples,
  same fine-tune), and whether it reaches half of the oracle's gain where that gain exceeds
  two standard errors;
* against **cleanlab**'s remove-and-fine-tune (3-fold out-of-fold probabilities,
  ``find_label_issues``, the same fine-tune): paired differences on held-out failures and
  test accuracy;
* the **correct set**: accuracy lost on the test examples the original got right (target
  ≤ 0.3 points), and finetune-only minus original on test accuracy (convergence: within 0.3);
* the automatic K per seed and its coefficient of variation (target ≤ 0.3);
* **relabel against delete** on the same causes (issue 4's figure restated on the Pareto
  criterion): both pipelines' verdicts and the share of clean examples among the causes.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from netmend.evaluation.controls import EPS, MAX_CLASS_DROP, mean_se
from netmend.lab.demo import machine
from netmend.store import write_json_atomic

HERE = Path(__file__).resolve().parent
BENCHES = ("bench_full_fashion/bench.json", "bench_full_mnist/bench.json")
DEMO, DEMO_CLEANLAB = "demo_seeds.json", "demo_cleanlab.json"
DEMO_SUITE, DEMO_TEST_SEEDS = "mnist-full/paper-pair", (1, 2)
DEFAULT, OTHER = "ewc/finetune", "ewc/relabel"
CORRECT_SET_TARGET, CONVERGED_TARGET = 0.003, 0.003
DOC_PATH = HERE.parent / "docs" / "test-suites.md"
BEGIN, END = "<!-- test_suites:begin -->", "<!-- test_suites:end -->"


def _record(cell: dict[str, Any], original: dict[str, Any], ft_only: dict[str, Any]) -> dict:
    """One pipeline cell of one suite and seed, with the numbers the figures need."""
    rk = cell["controls"]["random_k"]
    return {
        "k": int(cell["k"]),
        "precision": cell.get("precision"),
        "heldout": cell["heldout_failure_acc"],
        "test": cell["test_acc"],
        "correct": cell["correct_acc"],
        "rk_heldout": rk["heldout_failure_acc"],
        "rk_test": rk["test_acc"],
        "heldout_gain": cell["gain"]["heldout_gain"],
        "test_gain": cell["gain"]["test_gain"],
        "test_floor": cell["verdict"]["test_floor"],
        "worst_class_drop": cell["verdict"]["worst_class_drop"],
        "passed": bool(cell["verdict"]["passed"]),
        "original_test": original["test_acc"],
        "ft_only_test": ft_only["test_acc"],
        "ft_only_heldout": ft_only["heldout_failure_acc"],
    }


def from_bench(result: dict[str, Any]) -> dict[str, dict[int, dict[str, Any]]]:
    """``{suite: {seed: {"pipelines": {name: record}, "oracle", "cleanlab", ...}}}``."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for r in result["results"]:
        cells = {c["pipeline"]: c for c in r["cells"] if c["status"] == "ok"}
        if DEFAULT not in cells or "original" not in cells:
            continue
        original = cells["original"]
        pipes = {}
        for name in (DEFAULT, OTHER):
            c = cells.get(name)
            if c is not None and c.get("controls"):
                pipes[name] = _record(c, original, c["controls"]["finetune_only"])
        entry: dict[str, Any] = {"pipelines": pipes}
        for ref in ("oracle-causes", "cleanlab", "retrain-clean"):
            if ref in cells:
                entry[ref] = {
                    "heldout": cells[ref]["heldout_failure_acc"],
                    "test": cells[ref]["test_acc"],
                    "correct": cells[ref]["correct_acc"],
                    "k": cells[ref].get("k"),
                    "precision": cells[ref].get("precision"),
                }
        out.setdefault(r["suite"], {})[int(r["seed"])] = entry
    return out


def from_demo(demo: dict[str, Any], cleanlab: dict[str, Any] | None) -> dict[int, dict]:
    """The demo's test seeds in the same shape (its default run, controls and cleanlab)."""
    out: dict[int, dict[str, Any]] = {}
    clean = {int(r["seed"]): r["rows"] for r in (cleanlab or {}).get("results", [])}
    for s in demo["seeds"]:
        seed = int(s["config"]["seed"])
        if seed not in DEMO_TEST_SEEDS:
            continue
        run = next(r for r in s["runs"] if r["default"])
        ctl = run["controls"]
        entry: dict[str, Any] = {
            "pipelines": {DEFAULT: _record(run, ctl["original"], ctl["finetune_only"])}
        }
        o = ctl["oracle_causes"]
        entry["oracle-causes"] = {
            "heldout": o["heldout_failure_acc"],
            "test": o["test_acc"],
            "correct": o["correct_acc"],
            "k": o.get("k"),
            "precision": 1.0,
        }
        if seed in clean:
            c = clean[seed]["cleanlab"]
            entry["cleanlab"] = {
                "heldout": c["heldout_failure_acc"],
                "test": c["test_acc"],
                "correct": c["correct_acc"],
                "k": c.get("k"),
                "precision": c.get("precision"),
                # demo_cleanlab.py reran the default on the same model: pair cleanlab with it
                "paired_default": clean[seed]["default"],
            }
        out[seed] = entry
    return out


def _ms(values: list[float]) -> dict[str, float | None]:
    m, se = mean_se(values)
    return {"mean": m, "se": None if math.isnan(se) else se}


def summarise(suite: str, seeds: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Issue 11's figures for one suite over its seeds (fractions, not points)."""
    order = sorted(seeds)
    out: dict[str, Any] = {"suite": suite, "seeds": order, "pipelines": {}}
    for name in (DEFAULT, OTHER):
        recs = [seeds[s]["pipelines"][name] for s in order if name in seeds[s]["pipelines"]]
        if not recs:
            continue
        ks = [r["k"] for r in recs]
        drops = [r["worst_class_drop"] for r in recs if r["worst_class_drop"] is not None]
        hg = _ms([r["heldout_gain"] for r in recs])
        margin = float(np.mean([r["test"] - r["test_floor"] for r in recs]))
        drop = float(np.mean(drops)) if drops else math.nan
        out["pipelines"][name] = {
            "k": ks,
            "k_cv": float(np.std(ks, ddof=1) / np.mean(ks)) if len(ks) > 1 else None,
            "precision": float(np.mean([r["precision"] for r in recs])),
            "heldout": _ms([r["heldout"] for r in recs]),
            "test": _ms([r["test"] for r in recs]),
            "heldout_gain": hg,
            "test_gain": _ms([r["test_gain"] for r in recs]),
            "test_margin": margin,
            "worst_class_drop": drop,
            "repairs": bool(hg["mean"] > EPS and margin >= -EPS and not drop > MAX_CLASS_DROP),
            "seed_passes": sum(r["passed"] for r in recs),
            "correct_set_loss": _ms([1.0 - r["correct"] for r in recs]),
            "random_k_heldout": _ms([r["rk_heldout"] for r in recs]),
            "random_k_test": _ms([r["rk_test"] for r in recs]),
        }
    d = [seeds[s]["pipelines"][DEFAULT] for s in order]
    out["original_test"] = _ms([r["original_test"] for r in d])
    out["finetune_only_test"] = _ms([r["ft_only_test"] for r in d])
    out["finetune_only_heldout"] = _ms([r["ft_only_heldout"] for r in d])
    out["finetune_only_minus_original_test"] = _ms(
        [r["ft_only_test"] - r["original_test"] for r in d]
    )
    if all("oracle-causes" in seeds[s] for s in order):
        og = [seeds[s]["oracle-causes"]["heldout"] - seeds[s]["pipelines"][DEFAULT]["rk_heldout"]
              for s in order]  # fmt: skip
        o = _ms(og)
        significant = o["se"] is not None and o["mean"] > 2 * o["se"]
        dg = out["pipelines"][DEFAULT]["heldout_gain"]["mean"]
        out["oracle"] = {
            "heldout_gain": o,
            "heldout": _ms([seeds[s]["oracle-causes"]["heldout"] for s in order]),
            "test": _ms([seeds[s]["oracle-causes"]["test"] for s in order]),
            "gain_significant": significant,
            "default_share_of_oracle_gain": dg / o["mean"] if o["mean"] > EPS else None,
            "meets_half": (dg >= 0.5 * o["mean"]) if significant else None,
        }
    if all("cleanlab" in seeds[s] for s in order):
        dh, dt = [], []
        for s in order:
            c = seeds[s]["cleanlab"]
            base = c.get("paired_default") or {
                "heldout_failure_acc": seeds[s]["pipelines"][DEFAULT]["heldout"],
                "test_acc": seeds[s]["pipelines"][DEFAULT]["test"],
            }
            dh.append(base["heldout_failure_acc"] - c["heldout"])
            dt.append(base["test_acc"] - c["test"])
        h, t = _ms(dh), _ms(dt)
        out["cleanlab"] = {
            "k": [seeds[s]["cleanlab"]["k"] for s in order],
            "precision": float(np.mean([seeds[s]["cleanlab"]["precision"] for s in order])),
            "heldout": _ms([seeds[s]["cleanlab"]["heldout"] for s in order]),
            "test": _ms([seeds[s]["cleanlab"]["test"] for s in order]),
            "default_minus_cleanlab_heldout": h,
            "default_minus_cleanlab_test": t,
            "default_beats": bool(h["mean"] > 0 and t["mean"] > 0),
        }
    if OTHER in out["pipelines"]:
        pairs = [
            (seeds[s]["pipelines"][OTHER], seeds[s]["pipelines"][DEFAULT])
            for s in order
            if OTHER in seeds[s]["pipelines"]
        ]
        out["relabel_minus_delete"] = {
            "heldout": _ms([a["heldout"] - b["heldout"] for a, b in pairs]),
            "test": _ms([a["test"] - b["test"] for a, b in pairs]),
            "clean_share_of_causes": float(np.mean([1 - b["precision"] for _, b in pairs])),
        }
    return out


def headline(suites: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's three counts over the test suites, and the default's other targets."""
    rows = [s["pipelines"][DEFAULT] for s in suites]
    sig = [s for s in suites if s.get("oracle", {}).get("gain_significant")]
    clean = [s for s in suites if "cleanlab" in s]
    return {
        "suites": len(suites),
        "default_repairs": sum(r["repairs"] for r in rows),
        "suites_with_significant_oracle_gain": len(sig),
        "default_reaches_half_the_oracle_gain": sum(bool(s["oracle"]["meets_half"]) for s in sig),
        "suites_with_cleanlab": len(clean),
        "default_beats_cleanlab_on_both": sum(s["cleanlab"]["default_beats"] for s in clean),
        "correct_set_loss_within_target": sum(
            r["correct_set_loss"]["mean"] <= CORRECT_SET_TARGET for r in rows
        ),
        "k_cv_within_0.3": sum(r["k_cv"] is not None and r["k_cv"] <= 0.3 for r in rows),
        "finetune_only_within_0.3_of_original": sum(
            abs(s["finetune_only_minus_original_test"]["mean"]) <= CONVERGED_TARGET for s in suites
        ),
    }


def _p(v: dict[str, Any] | float | None, signed: bool = False, digits: int = 1) -> str:
    """Points of % (mean ± s.e. when given a ``{"mean", "se"}`` dict)."""
    if v is None:
        return "–"
    if isinstance(v, dict):
        m, se = v["mean"], v["se"]
        text = f"{100 * m:+.{digits}f}" if signed else f"{100 * m:.{digits}f}"
        return text + ("" if se is None else f" ± {100 * se:.{digits}f}")
    if isinstance(v, float) and math.isnan(v):
        return "–"
    return f"{100 * v:+.{digits}f}" if signed else f"{100 * v:.{digits}f}"


def render(doc: dict[str, Any]) -> str:
    """The markdown block of docs/test-suites.md (generated, never typed)."""
    h = doc["headline"]
    lines = [
        f"Generated by `benchmarks/test_suites.py` from `benchmarks/test_suites.json`; "
        f"seeds per suite as listed, mean ± standard error over seeds, in points of %. "
        f"Machine of the bench runs: {doc['bench_machine']}.",
        "",
        "**Issue 11's figures on the test suites** (the default `ewc/finetune`, chosen on the "
        "dev suites):",
        "",
        f"* repairs by the Pareto criterion: **{h['default_repairs']} of {h['suites']}** "
        "test suites (target: ≥ 80%);",
        f"* diagnosis gain ≥ half the oracle's, where the oracle's gain over random-K exceeds "
        f"2 s.e.: **{h['default_reaches_half_the_oracle_gain']} of "
        f"{h['suites_with_significant_oracle_gain']}**;",
        f"* beats cleanlab's remove-and-fine-tune on both held-out failures and test accuracy: "
        f"**{h['default_beats_cleanlab_on_both']} of {h['suites_with_cleanlab']}** "
        "(target: ≥ 80%);",
        f"* loses ≤ 0.3 points on the test examples the original got right: "
        f"{h['correct_set_loss_within_target']} of {h['suites']}; automatic K's CV over seeds "
        f"≤ 0.3: {h['k_cv_within_0.3']} of {h['suites']}; finetune-only within 0.3 points of "
        f"the original's test accuracy (converged): "
        f"{h['finetune_only_within_0.3_of_original']} of {h['suites']}.",
        "",
        "| suite | seeds | pipeline | K per seed | precision | held-out F | test | gain vs "
        "random-K, held-out F | gain, test | test margin | worst class drop | repairs | "
        "correct-set loss |",
        "|" + "---|" * 13,
    ]
    for s in doc["suites"]:
        for name, r in s["pipelines"].items():
            lines.append(
                f"| {s['suite']} | {', '.join(map(str, s['seeds']))} | `{name}` "
                f"| {', '.join(f'{k:,}' for k in r['k'])} | {r['precision']:.3f} "
                f"| {_p(r['heldout'])} | {_p(r['test'], digits=2)} "
                f"| {_p(r['heldout_gain'], True)} | {_p(r['test_gain'], True, 2)} "
                f"| {_p(r['test_margin'], True, 2)} | {_p(r['worst_class_drop'])} "
                f"| {'yes' if r['repairs'] else 'no'} ({r['seed_passes']} of "
                f"{len(s['seeds'])} seeds) | {_p(r['correct_set_loss'], digits=2)} |"
            )
    lines += [
        "",
        "Controls and peers, same runs (the same fine-tune in every row):",
        "",
        "| suite | original test | finetune-only test | finetune-only held-out F | random-K "
        "held-out F (default's K) | oracle held-out F | oracle test | oracle gain vs random-K "
        "| default's share of it | cleanlab K | cleanlab held-out F | cleanlab test | default − "
        "cleanlab, held-out F | default − cleanlab, test |",
        "|" + "---|" * 14,
    ]
    for s in doc["suites"]:
        d = s["pipelines"][DEFAULT]
        o, c = s.get("oracle"), s.get("cleanlab")
        share = None if o is None else o["default_share_of_oracle_gain"]
        lines.append(
            f"| {s['suite']} | {_p(s['original_test'], digits=2)} "
            f"| {_p(s['finetune_only_test'], digits=2)} | {_p(s['finetune_only_heldout'])} "
            f"| {_p(d['random_k_heldout'])} "
            f"| {_p(o and o['heldout'])} | {_p(o and o['test'], digits=2)} "
            f"| {_p(o and o['heldout_gain'], True)} "
            f"| {'–' if share is None else f'{share:.2f}'} "
            f"| {'–' if c is None else ', '.join(f'{k:,}' for k in c['k'])} "
            f"| {_p(c and c['heldout'])} | {_p(c and c['test'], digits=2)} "
            f"| {_p(c and c['default_minus_cleanlab_heldout'], True)} "
            f"| {_p(c and c['default_minus_cleanlab_test'], True, 2)} |"
        )
    rel = [s for s in doc["suites"] if "relabel_minus_delete" in s]
    if rel:
        lines += [
            "",
            "Relabel against delete on the same causes (issue 4's figure on the Pareto criterion):",
            "",
            "| suite | clean share of the causes | relabel − delete, held-out F | relabel − "
            "delete, test | delete repairs | relabel repairs |",
            "|" + "---|" * 6,
        ]
        for s in rel:
            x = s["relabel_minus_delete"]
            lines.append(
                f"| {s['suite']} | {x['clean_share_of_causes']:.2f} | {_p(x['heldout'], True)} "
                f"| {_p(x['test'], True, 2)} "
                f"| {'yes' if s['pipelines'][DEFAULT]['repairs'] else 'no'} "
                f"| {'yes' if s['pipelines'][OTHER]['repairs'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def build(root: Path = HERE) -> dict[str, Any]:
    """Read the test suites' JSONs under ``root`` and compute every figure."""
    suites: list[dict[str, Any]] = []
    bench_machine = None
    for rel in BENCHES:
        path = root / rel
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        m = result.get("machine") or {}
        bench_machine = f"{m.get('processor')}, {m.get('cpus')} CPUs, torch {m.get('torch')}"
        for suite, seeds in from_bench(result).items():
            suites.append(summarise(suite, seeds))
    if (root / DEMO).exists():
        cl = root / DEMO_CLEANLAB
        seeds = from_demo(
            json.loads((root / DEMO).read_text()),
            json.loads(cl.read_text()) if cl.exists() else None,
        )
        if seeds:
            suites.append(summarise(DEMO_SUITE, seeds))
    return {
        "machine": machine(),
        "bench_machine": bench_machine,
        "sources": [*BENCHES, DEMO, DEMO_CLEANLAB],
        "suites": suites,
        "headline": headline(suites),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "test_suites.json")
    p.add_argument("--doc", type=Path, default=DOC_PATH)
    a = p.parse_args(argv)
    doc = build()
    write_json_atomic(a.out, doc)
    text = a.doc.read_text() if a.doc.exists() else f"# Test suites\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    a.doc.write_text(head + BEGIN + "\n" + render(doc) + END + tail)
    print(render(doc))


if __name__ == "__main__":
    main()
