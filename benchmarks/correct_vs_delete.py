"""Correct the causes or delete them, across the whole ``netmend bench`` matrix.

Issue 4 asks that relabelling or alignment beat deletion on held-out-failure accuracy whenever
at least 30% of the selected causes are clean. ``align_vs_delete.py`` tests that on one
corruption with a K chosen to make it so; this script reads the ``bench.json`` files that
``netmend bench`` wrote and compares, on every suite, seed and identification method that ran
with both treatments, ``<ident>/relabel`` against ``<ident>/finetune`` (deletion). Both
pipelines select the same causes from the same trained model and failures, so each
difference is paired.

For every such pair: the clean share of the causes (``1 - precision`` against the suite's
corruption mask), K, and the differences relabel − delete in held-out-failure and test
accuracy. Per suite and method: their means over seeds with standard errors. Overall: over
the pairs whose clean share is at least 0.3, how often relabelling beats, ties or loses to
deletion on held-out failures, for all suites and for the label-noise suites alone (where a
cause's label, not its input, is what is wrong). On ``subgroup`` suites the mask marks the
remaining members of the under-represented subgroup (the examples a repair needs, not
causes), so their clean share says little.

Usage: ``python benchmarks/correct_vs_delete.py [DIR ...] [--json PATH] [--md PATH]``
(default: the ``benchmarks/bench_*`` directories of the README's table; a suite run in
several is taken from the last; seconds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from netmend.cli import write_json_atomic
from netmend.lab.bench import latest_runs, mean_se

HERE = Path(__file__).parent
DEFAULT_DIRS = ("bench_digits", "bench_mnist", "bench_mnist_more", "bench_fashion",
                "bench_fashion_more", "bench_digits_subgroup", "bench_mnist_subgroup",
                "bench_fashion_subgroup")  # fmt: skip
LABEL_NOISE = ("sym20", "sym40", "pair", "cifar10n-random1", "cifar10n-worst")
CLEAN_SHARE = 0.3


def pairs(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per (suite, seed, identification) that ran both "/relabel" and "/finetune"."""
    out = []
    for r in result["results"]:
        cells = {c["pipeline"]: c for c in r["cells"] if c["status"] == "ok"}
        for name, rel in cells.items():
            if not name.endswith("/relabel"):
                continue
            ident = name.removesuffix("/relabel")
            delete = cells.get(f"{ident}/finetune")
            if delete is None or not rel.get("k"):
                continue
            out.append(
                {
                    "suite": r["suite"],
                    "seed": r["seed"],
                    "identification": ident,
                    "k": rel["k"],
                    "clean_share": 1.0 - rel["precision"],
                    "heldout_diff": rel["heldout_failure_acc"] - delete["heldout_failure_acc"],
                    "test_diff": rel["test_acc"] - delete["test_acc"],
                }
            )
    return out


def tally(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Relabel vs delete on held-out failures over the records with clean share >= 0.3."""
    d = np.array([p["heldout_diff"] for p in records if p["clean_share"] >= CLEAN_SHARE])
    t = np.array([p["test_diff"] for p in records if p["clean_share"] >= CLEAN_SHARE])
    mean, se = mean_se(d) if d.size else (float("nan"), float("nan"))
    tmean, tse = mean_se(t) if t.size else (float("nan"), float("nan"))
    return {
        "pairs": int(d.size),
        "relabel_better": int((d > 0).sum()),
        "tied": int((d == 0).sum()),
        "delete_better": int((d < 0).sum()),
        "heldout_diff_mean": mean,
        "heldout_diff_se": se,
        "test_diff_mean": tmean,
        "test_diff_se": tse,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="*", default=[str(HERE / d) for d in DEFAULT_DIRS])
    ap.add_argument("--json", type=Path, default=HERE / "correct_vs_delete.json")
    ap.add_argument("--md", type=Path, default=HERE / "correct_vs_delete.md")
    args = ap.parse_args()
    records: list[dict[str, Any]] = []
    machines = {}
    results = {d: json.loads((Path(d) / "bench.json").read_text()) for d in args.dirs}
    for d, latest in latest_runs(results).items():  # a later folder's rerun supersedes
        machines[Path(d).name] = latest["machine"]
        records += pairs(latest)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in records:
        groups.setdefault((p["suite"], p["identification"]), []).append(p)
    rows = []
    for (suite, ident), ps in sorted(groups.items()):
        row: dict[str, Any] = {"suite": suite, "identification": ident, "seeds": len(ps)}
        row["clean_share"] = float(np.mean([p["clean_share"] for p in ps]))
        row["k"] = float(np.mean([p["k"] for p in ps]))
        for key in ("heldout_diff", "test_diff"):
            row[key], row[f"{key}_se"] = mean_se([p[key] for p in ps])
        rows.append(row)
    noise = [p for p in records if p["suite"].split("/")[1] in LABEL_NOISE]
    out = {
        "sources": [str(d) for d in args.dirs],
        "machines": machines,
        "clean_share_threshold": CLEAN_SHARE,
        "overall": tally(records),
        "label_noise_suites": tally(noise),
        "rows": rows,
        "pairs": records,
    }
    write_json_atomic(args.json, out)

    def pm(m: float, se: float) -> str:
        return f"{100 * m:+.1f} ± {100 * se:.1f}"

    lines = [
        "# Relabel vs delete across the bench (`benchmarks/correct_vs_delete.py`)",
        "",
        "`<ident>/relabel` minus `<ident>/finetune` (deletion) on the same causes, suite and "
        "seed; points of %, mean ± standard error over seeds. Clean share: the share of the "
        "causes outside the corruption mask.",
        "",
    ]
    for name in ("overall", "label_noise_suites"):
        t = out[name]
        lines.append(
            f"* {name.replace('_', ' ')}, pairs with clean share ≥ {CLEAN_SHARE}: "
            f"{t['pairs']}; relabel better on held-out failures in {t['relabel_better']}, "
            f"tied {t['tied']}, worse {t['delete_better']}; held-out "
            f"{pm(t['heldout_diff_mean'], t['heldout_diff_se'])}, test "
            f"{pm(t['test_diff_mean'], t['test_diff_se'])}"
        )
    lines += [
        "",
        "| suite | identification | seeds | K | clean share | Δ held-out F | Δ test |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['suite']} | {r['identification']} | {r['seeds']} | {r['k']:.0f} | "
            f"{r['clean_share']:.2f} | {pm(r['heldout_diff'], r['heldout_diff_se'])} | "
            f"{pm(r['test_diff'], r['test_diff_se'])} |"
        )
    args.md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:6]))


if __name__ == "__main__":
    main()
