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


def table(report: dict[str, Any]) -> str:
    """The report as a markdown table (one row per method, then the references)."""

    def f(v: Any, fmt: str = "{:.3f}") -> str:
        return "–" if v is None or (isinstance(v, float) and v != v) else fmt.format(v)

    lines = [
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(TABLE_COLUMNS) - 1)) + "|",
    ]
    for label, e in report["methods"].items():
        if "error" in e:
            lines.append(f"| {label} | error: {e['error'][:80]} |" + " |" * 6)
            continue
        cf = e.get("counterfactual", {})
        secs = e["seconds"] + (e.get("per_failure_seconds") or 0.0)
        lines.append(
            f"| {label} | {f(e['spearman_loo'])} | {f(e['lds'])} | {f(e['precision_at_k'])} | "
            f"{f(e['auroc'])} | {f(e['culprit_precision_at_5'])} | "
            f"{f(cf.get('delta_heldout_acc_vs_random'), '{:+.3f}')} | {f(secs, '{:.2f}')} |"
        )
    refs = report.get("references", {})
    cfr = report["counterfactual"]["references"]
    if "loo_oracle" in refs:
        r = refs["loo_oracle"]
        d = cfr.get("ref:loo_topk", {}).get("delta_heldout_acc_vs_random")
        lines.append(
            f"| *oracle: actual LOO* | {f(r['spearman_loo'])} | {f(r['lds'])} | "
            f"{f(r['precision_at_k'])} | {f(r['auroc'])} | {f(r['culprit_precision_at_5'])} | "
            f"{f(d, '{:+.3f}')} | – |"
        )
    c = cfr["ref:corrupted"]
    lines.append(
        f"| *remove all {c['removed']} corrupted* | – | – | 1.000 | 1.000 | – | "
        f"{f(c['delta_heldout_acc_vs_random'], '{:+.3f}')} | – |"
    )
    return "\n".join(lines)
