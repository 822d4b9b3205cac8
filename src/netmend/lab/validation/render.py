"""Markdown tables of a :func:`~netmend.lab.validation.harness.validate` report, and its JSON
conversion helper."""

from __future__ import annotations

from typing import Any

import numpy as np


def curve_table(report: dict[str, Any]) -> str:
    """The counterfactual curve of :func:`validate` as markdown (one row per method)."""
    cur = report["counterfactual_curve"]
    lines = [
        "| method | " + " | ".join(f"k={c}" for c in cur["ks"]) + " |",
        "|---|" + "---:|" * len(cur["ks"]),
    ]
    for n, v in cur["methods"].items():
        lines.append(f"| {n} | " + " | ".join(f"{x:+.3f}" for x in v) + " |")
    lines.append(
        "| *random (Δ vs original)* | " + " | ".join(f"{x:+.3f}" for x in cur["random"]) + " |"
    )
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    return repr(obj)


TABLE_COLUMNS = (
    "method",
    "spearman LOO",
    "LDS",
    "precision@K",
    "AUROC",
    "culprit precision@5",
    "counterfactual Δ held-out acc vs random",
    "seconds",
)


def table(report: dict[str, Any], *, stored_only: bool = False) -> str:
    """The report as a markdown table (one row per method, then the references).

    Args:
        report: a :func:`~netmend.lab.validation.harness.validate` report (or its JSON).
        stored_only: quote only figures stored in the report, so that each can be found in its
            JSON (benchmarks/make_readme.py): the scoring and per-failure seconds in two
            columns instead of their sum, and the random removal's own change as a last row.
    """

    def f(v: Any, fmt: str = "{:.3f}") -> str:
        return "–" if v is None or (isinstance(v, float) and v != v) else fmt.format(v)

    cols = TABLE_COLUMNS[:-1] + (("identify s", "per-failure s") if stored_only else ("seconds",))
    lines = [
        "| " + " | ".join(cols) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|",
    ]
    blank = " – |" * (len(cols) - len(TABLE_COLUMNS) + 1)
    for label, e in report["methods"].items():
        if "error" in e:
            lines.append(f"| {label} | error: {e['error'][:80]} |" + " |" * (len(cols) - 2))
            continue
        cf = e.get("counterfactual", {})
        pf = e.get("per_failure_seconds")
        if stored_only:
            secs = f"{f(e['seconds'], '{:.2f}')} | {f(pf, '{:.2f}')}"
        else:
            secs = f(e["seconds"] + (pf or 0.0), "{:.2f}")
        lines.append(
            f"| {label} | {f(e['spearman_loo'])} | {f(e['lds'])} | {f(e['precision_at_k'])} | "
            f"{f(e['auroc'])} | {f(e['culprit_precision_at_5'])} | "
            f"{f(cf.get('delta_heldout_acc_vs_random'), '{:+.3f}')} | {secs} |"
        )
    refs = report.get("references", {})
    cfr = report["counterfactual"]["references"]
    if "loo_oracle" in refs:
        r = refs["loo_oracle"]
        d = cfr.get("ref:loo_topk", {}).get("delta_heldout_acc_vs_random")
        lines.append(
            f"| *oracle: actual LOO* | {f(r['spearman_loo'])} | {f(r['lds'])} | "
            f"{f(r['precision_at_k'])} | {f(r['auroc'])} | {f(r['culprit_precision_at_5'])} | "
            f"{f(d, '{:+.3f}')} |{blank}"
        )
    c = cfr["ref:corrupted"]
    lines.append(
        f"| *remove all {c['removed']} corrupted* | – | – | 1.000 | 1.000 | – | "
        f"{f(c['delta_heldout_acc_vs_random'], '{:+.3f}')} |{blank}"
    )
    if stored_only:
        rnd = report["counterfactual"]["random"]["heldout_acc"]["mean"]
        lines.append(
            f"| *remove {c['removed']} at random (Δ vs original)* | – | – | – | – | – | "
            f"{f(rnd, '{:+.3f}')} |{blank}"
        )
    return "\n".join(lines)
