"""Render the tables of benchmarks/README.md (and README.md's headline) from the benchmark JSON.

Every table in benchmarks/README.md, and the headline table of README.md, sits between a
pair of markers

    <!-- BEGIN make_readme: NAME (benchmarks/a.json, ...) -->
    <!-- END make_readme: NAME -->

and is rewritten here from the JSON files the BEGIN marker names; nothing between markers is
typed by hand. The tables quote only numbers stored in those files (rounded), never figures
derived from them, so that ``tests/test_benchmarks_readme.py`` can check both that the file is
up to date and that every number in a table appears in the JSON it cites.

Usage: .venv/bin/python benchmarks/make_readme.py           # rewrite both READMEs' tables
       .venv/bin/python benchmarks/make_readme.py --check   # exit 1 if one is out of date
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
README = HERE / "README.md"
FILES = (README, ROOT / "README.md")  # the landing page quotes one headline table

MARKER = re.compile(
    r"<!-- BEGIN make_readme: (?P<name>[\w-]+) \((?P<files>[^)]*)\) -->\n"
    r"(?P<body>.*?)"
    r"<!-- END make_readme: (?P=name) -->",
    flags=re.S,
)


def load(rel: str) -> Any:
    with open(ROOT / rel) as f:
        return json.load(f)


def f3(v: Any, fmt: str = "{:.3f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return fmt.format(v)


def rows(header: list[str], body: list[list[str]], align: str = "---") -> str:
    sep = "|" + "|".join(["---"] + [align] * (len(header) - 1)) + "|"
    out = ["| " + " | ".join(header) + " |", sep]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out)


# --------------------------------------------------------------------------- the tables


def _mean(pair: list[float]) -> float:
    """The mean of a ``[mean, s.e.]`` pair as benchmarks/demo_seeds.py stores it."""
    return float(pair[0])


def _pm(pair: list[float], scale: float = 100.0, fmt: str = "{:.2f}") -> str:
    """``mean ± s.e.`` of a stored pair (the s.e. is NaN with one seed: left out)."""
    mean, se = float(pair[0]), float(pair[1])
    text = fmt.format(scale * mean)
    return text if se != se else text + " ± " + fmt.format(scale * se)


def demo_seeds(data: dict[str, Any]) -> str:
    """Every demo pipeline next to its controls (same treatment call, only the causes change)."""
    body = []
    for name, p in data["summary"]["pipelines"].items():
        label = f"`{name}`" + (" (default)" if p["default"] else "")
        body.append(
            [label, f"{_mean(p['k']):.0f}", _pm(p["precision"], 1.0, "{:.3f}")]
            + [_pm(p["test_acc"]), _pm(p["heldout_failure_acc"])]
            + [_pm(p[c]["heldout_failure_acc"]) for c in ("finetune_only", "random_k")]
            + [_pm(p["oracle_causes"]["heldout_failure_acc"]), _pm(p["heldout_gain"])]
            + [_pm(p["test_gain"]), str(p["pareto_passes"])]
        )
    head = ["pipeline", "K", "cause precision", "test acc (%)", "held-out F (%)"]
    head += ["finetune-only held-out F", "random-K held-out F", "oracle-causes held-out F"]
    head += ["diagnosis gain, held-out F (points)", "gain, test (points)", "Pareto passes"]
    return rows(head, body)


def headline(data: dict[str, Any]) -> str:
    """The default pipeline next to its controls, all from one run: the same treatment call
    with no causes, with K random causes (mean of 3 draws) and with the true causes, plus the
    model before repair and retraining on the clean labels."""
    s = data["summary"]
    p = s["pipelines"]["ewc/finetune"]
    body = [
        ["**netmend default** (`ewc/finetune`)", _pm(p["precision"], 1.0, "{:.3f}")]
        + [_pm(p["heldout_failure_acc"], fmt="{:.1f}"), _pm(p["test_acc"])]
    ]
    for key, label in (
        ("finetune_only", "control: the same fine-tune, no causes removed"),
        ("random_k", "control: K *random* causes, same fine-tune"),
        ("oracle_causes", "control: the truly corrupted examples, same fine-tune"),
    ):
        c = p[key]
        body.append([label, "", _pm(c["heldout_failure_acc"], fmt="{:.1f}"), _pm(c["test_acc"])])
    for key, label in (
        ("original", "reference: the model before repair"),
        ("retrain-clean", "reference: retrain on the clean labels"),
    ):
        r = s["references"][key]
        body.append([label, "", _pm(r["heldout_failure_acc"], fmt="{:.1f}"), _pm(r["test_acc"])])
    head = ["pipeline", "cause precision", "held-out failures fixed (%)", "test acc (%)"]
    return rows(head, body)


def fisher_timing(d: dict[str, Any]) -> str:
    return rows(
        ["", f"seconds ({d['train_examples']} MNIST, SmallCNN)", "/ training epoch"],
        [
            ["one training epoch (Adam, batch 128)", f"{d['train_epoch_s']:.1f}", "1"],
            [
                "diagonal Fisher, layer hooks (default)",
                f"{d['fisher_hooks_s']:.1f}",
                f"{d['fisher_hooks_over_epoch']:.2f}",
            ],
            [
                "diagonal Fisher, `torch.func.vmap`",
                f"{d['fisher_vmap_s']:.1f}",
                f"{d['fisher_vmap_over_epoch']:.2f}",
            ],
            ["largest relative difference, hooks vs vmap", "", f"{d[_MAXREL]:.1e}"],
        ],
    )


def continual(d: dict[str, Any]) -> str:
    """netmend.Repairer, failures in 5 batches, against the one-shot repair on all of them."""
    body = []
    for r in d["seeds"]:
        c = r["control_no_mix"]["stays_fixed"]
        body.append(
            [str(r["seed"]), f"{r['one_shot']['k']}", f"{r['rounds'][-1]['k']}"]
            + [f"{max(r['later_round_cost_ratio']):.3f}"]
            + [f"{r['gap_points'][k]:+.2f}" for k in ("test_acc", "heldout_failure_acc")]
            + [f"{100 * r['stays_fixed']['share']:.1f}", f"{100 * c['share']:.1f}"]
            + [f"{100 * r['noise_floor']['share']:.1f}"]
        )
    s = d["summary"]
    gaps = ("test_acc", "heldout_failure_acc")
    body.append(
        ["all", "", "", f"{s['max_later_round_cost_ratio']:.3f}"]
        + [f"{s['min_gap_points_vs_one_shot'][k]:+.2f}" for k in gaps]
        + [f"{100 * s['stays_fixed_share']:.1f}"]
        + [f"{100 * s['control_no_mix_stays_fixed_share']:.1f}"]
        + [f"{100 * s['noise_floor_reseeded_finetune_flips']:.1f}"]
    )
    head = ["seed", "one-shot K", "final K", "later round / first (max)"]
    head += ["final − one-shot, test (points)", "final − one-shot, held-out F (points)"]
    head += ["earlier fixes kept (%)", "kept without mixing (%)"]
    head += ["noise floor: one-shot fixes a reseeded fine-tune flips (%)"]
    return rows(head, body)


def cli_folder(d: dict[str, Any]) -> str:
    """``netmend repair`` on a folder of PNGs against netmend.repair on in-memory tensors."""
    rss = d["peak_rss_mib"]
    return rows(
        ["training PNGs", "API (s)", "CLI (s)", "CLI / API", "report.html (bytes)"]
        + ["peak RSS after API (MiB)", "after CLI (MiB)", "scores match"],
        [
            [
                f"{d['n_train']}",
                f"{d['api_seconds']:.0f}",
                f"{d['cli_seconds']:.0f}",
                f"{d['cli_over_api']:.2f}",
                f"{d['report_html_bytes']}",
                f"{rss['after_api']:.0f}",
                f"{rss['after_cli']:.0f}",
                "yes" if d["scores_match_api"] else "no",
            ]
        ],
    )


_MAXREL = "max_relative_difference_hooks_vs_vmap"


def arch_timing(d: dict[str, Any]) -> str:
    """The ResNet-18 layout's per-example passes in training epochs (rows of the old code
    paths only where the run measured them; the class guard's trials where it ran)."""

    def row(label: str, key: str) -> list[str] | None:
        if key + "_s" not in d:
            return None
        return [
            label,
            f"{d[key + '_cpu_s']:.1f}",
            f"{d[key + '_s']:.1f}",
            f"{d[key + '_over_epoch']:.2f}",
        ]

    def repair_rows(label: str, key: str) -> list[list[str] | None]:
        """The repair's row, then its identification and treatment shares (when timed)."""
        parts = d.get(f"{key}_parts_s")  # absent from a run of some passes (--only)
        over = d.get(f"{key}_parts_over_epoch")

        def part(what: str, name: str) -> list[str] | None:
            if not parts or not over:
                return None
            return [what, "", f"{parts[name]:.1f}", f"{over[name]:.2f}"]

        guard = d.get(f"{key}_guard") or {}
        trials = len(guard.get("tries") or []) + (guard.get("churn") is not None)
        ks = " → ".join(f"{t['k']:,}" for t in guard.get("tries") or [])
        treat = "… of which the fine-tune"
        if trials and guard.get("source") == "guard_data":
            treat = (
                f"… of which the class guard's {trials} trial fine-tunes on `guard_data` "
                f"(K {ks}"
                + (", and the finetune-only repair" if guard.get("churn") is not None else "")
                + "), the accepted one returned"
            )
        elif trials:
            treat += f" and the class guard's {trials} trial fine-tunes (K {ks}"
            treat += ", and one removing nothing)" if guard.get("churn") is not None else ")"
        return [
            row(label, key),
            part("… of which identification", "identify"),
            part(treat, "treat"),
        ]

    body = [
        [
            "one training epoch (Adam, batch 128)",
            f"{d['train_epoch_cpu_s']:.1f}",
            f"{d['train_epoch_s']:.1f}",
            "1",
        ],
        row(
            "floor: forward + backward with the weight gradients (eval mode)",
            "bound_forward_backward_with_weight_grads",
        ),
        row(
            "the hook path's forward + backward (layer-output gradients)",
            "bound_hook_forward_backward",
        ),
        row("diagonal Fisher, layer hooks, **now**", "fisher_hooks"),
        row("diagonal Fisher, layer hooks, before (same run)", "fisher_hooks_before"),
        row("diagonal Fisher, `torch.func.vmap` (extrapolated)", "fisher_vmap_extrapolated"),
        row(f"`G V`, {d['failures']} failure gradients, **now** (no `G`)", "grad_products"),
        row("`G V` through the `[chunk, P]` matrix, before (same run)", "grad_products_before"),
        row("`identify(..., 'ewc', k=50)`", "identify_ewc"),
        row("`identify(..., 'grad_dot', k=50)`", "identify_grad_dot"),
        *repair_rows(
            "`repair(...)`, every default (EWC, automatic K, fine-tune)", "repair_default"
        ),
        *repair_rows(
            "`repair(..., guard=False)`: the same without the class guard (one fine-tune)",
            "repair_no_guard",
        ),
        *repair_rows(
            "`repair(..., guard_data=...)`: the same with an 8,000-image validation split",
            "repair_guard_data",
        ),
        [
            "largest relative difference, hooks vs vmap",
            "",
            "",
            f"{d['fisher_max_rel_diff_hooks_vs_vmap']:.1e}",
        ],
    ]
    data = d.get("data", "MNIST")
    head = [f"{d['model']}, {d['train_examples']:,} {data} images", "CPU s", "wall s"]
    return rows([*head, "/ training epoch (CPU s)"], [r for r in body if r is not None])


def _validate(run: dict[str, Any]) -> str:
    from netmend.lab.validation import table

    return table(run, stored_only=True)


def validate_logreg(d: dict[str, Any]) -> str:
    return _validate(d["runs"]["logreg"])


def validate_mlp(d: dict[str, Any]) -> str:
    return _validate(d["runs"]["mlp"])


def validate_flips(files: list[dict[str, Any]]) -> str:
    """Each method's figures on the symmetric-flip problem next to the pair-flip one's."""
    sym, pair = files
    keys = ("lds", "precision_at_k", "auroc")
    body = []
    for model in pair["runs"]:
        a, b = sym["runs"][model]["methods"], pair["runs"][model]["methods"]
        for method in b:
            if "error" in a.get(method, {"error": 1}) or "error" in b[method]:
                continue
            cells = [f"{f3(a[method][k])} / {f3(b[method][k])}" for k in keys]
            cf = [
                m["counterfactual"]["delta_heldout_acc_vs_random"] for m in (a[method], b[method])
            ]
            body.append([model, method, *cells, f"{cf[0]:+.3f} / {cf[1]:+.3f}"])
        for ref, label in (
            ("ref:loo_topk", "the top-K of actual LOO"),
            ("ref:corrupted", "all flipped"),
        ):
            refs = [d["runs"][model]["counterfactual"]["references"].get(ref) for d in (sym, pair)]
            if all(refs):
                cf = [r["delta_heldout_acc_vs_random"] for r in refs if r]
                body.append(
                    [model, f"*remove {label}*", "–", "–", "–", f"{cf[0]:+.3f} / {cf[1]:+.3f}"]
                )
    head = ["model", "method", "LDS", "precision@K", "AUROC", "counterfactual vs random"]
    return rows([head[0], head[1], *(f"{h}: symmetric / pair" for h in head[2:])], body)


def trak_default_seeds(d: dict[str, Any]) -> str:
    """``trak`` at its new and its old ``ridge_ratio`` default, on the MLP problem of three
    seeds: LDS / counterfactual (top-K removal minus random), with references."""
    methods = ("trak", "trak-ratio0.01", "grad_dot", "ekfac")
    body = []
    for s in d["seeds"]:
        cells = [f"{s['methods'][m]['lds']:.3f} / {s['methods'][m]['counterfactual']:+.3f}"
                 for m in methods]  # fmt: skip
        body.append([str(s["seed"]), *cells, f"{s['random_removal_sd']:.3f}",
                     str(s["heldout_failures"])])  # fmt: skip

    def ms(v: dict[str, float], fmt: str) -> str:
        return f"{v['mean']:{fmt}} ± {v['se']:.3f}"

    sm = d["summary"]
    body.append(["mean ± s.e."]
                + [f"{ms(sm[m]['lds'], '.3f')} / {ms(sm[m]['counterfactual'], '+.3f')}"
                   for m in methods] + ["", ""])  # fmt: skip
    nm = d["new_minus_old"]
    body.append(["0.1 minus 0.01, paired",
                 f"{ms(nm['lds'], '+.3f')} / {ms(nm['counterfactual'], '+.3f')}", "", "", "",
                 "", ""])  # fmt: skip
    head = ["seed", "`trak` (0.1, default)", "`trak` (0.01, old default)", "`grad_dot`", "`ekfac`"]
    return rows([*head, "random removals' sd", "held-out failures"], body)


def validate_setup(d: dict[str, Any]) -> str:
    body = []
    for name, run in d["runs"].items():
        p, g = run["problem"], run["ground_truth"]
        body.append(
            [
                name,
                str(p["train"]),
                str(p["corrupted"]),
                f"{p['query_failures']} / {p['heldout_failures']}",
                str(p["params"]),
                f"{p['l2']:g}",
                str(g["n_loo"]),
                str(g["n_subsets"]),
                f"{g['loo_abs_median']:.3g}",
                f"{g['noise_floor']:.2g}",
                f"{g['noise_floor_over_median_loo']:.2g}",
                f"{g['seconds']['loo']:.1f}",
                f"{run['k']}",
                f"{run['seconds_total']:.0f}",
            ]
        )
    head = ["model", "train", "corrupted", "query / held-out failures", "parameters", "L2"]
    head += ["LOO refits", "LDS subsets", "median abs LOO effect", "noise floor"]
    head += ["noise floor / median", "LOO seconds", "counterfactual K", "total seconds"]
    return rows(head, body)


def peers_methods(d: dict[str, Any]) -> str:
    body = []
    for m in d["methods"]:
        if " seed " in m["method"]:  # the TRAK projection-seed repeats: table peers_trak
            continue
        fault = "; ".join(m.get("faults") or []) or m.get("error", "")
        if "spearman_loo" not in m:
            body.append([m["method"], m["library"]] + ["–"] * 8 + [fault[:100]])
            continue
        body.append(
            [
                m["method"],
                f"{m['library']} {m.get('version', '')}".strip(),
                f3(m["seconds"], "{:.2f}"),
                f3(m.get("scores_seconds"), "{:.2f}"),
            ]
            + [f3(m[k]) for k in ("spearman_loo", "lds", "lds_summed", "precision_at_k")]
            + [f3(m["auroc"]), f3(m["culprit_precision_at_5"]), fault[:100]]
        )
    head = ["method", "library", "seconds", "summed-only s", "Spearman LOO", "LDS"]
    head += ["LDS summed", "precision@K", "AUROC", "culprit P@5", "faults"]
    return rows(head, body)


def peers_ratios(d: dict[str, Any]) -> str:
    body = [
        [r["netmend"], r["peer"]]
        + [f3(r[k]) for k in ("spearman_loo", "lds", "precision_at_k", "culprit_precision_at_5")]
        + [f3(r["speedup"], "{:.2f}"), f3(r["speedup_vs_summed_only"], "{:.2f}")]
        + ["yes" if r["meets_quality"] else "NO", "yes" if r["meets_speed"] else "NO"]
        for r in d["ratios"]
    ]
    head = ["netmend", "peer", "Spearman", "LDS", "precision@K", "culprit P@5", "speedup"]
    head += ["speedup vs summed-only", "quality ok", "speed ok"]
    return rows(head, body)


def peers_trak(d: dict[str, Any]) -> str:
    t = d["trak_over_projection_seeds"]
    body = [
        [
            lib,
            f"{t[lib]['spearman_loo']['mean']:.3f} ± {t[lib]['spearman_loo']['se']:.3f}",
            f"{t[lib]['lds']['mean']:.3f} ± {t[lib]['lds']['se']:.3f}",
        ]
        for lib in ("netmend", "dattri")
    ]
    return rows(["TRAK, 5 projection seeds", "Spearman LOO (mean ± s.e.)", "LDS"], body)


def ekfac_timing(d: dict[str, Any]) -> str:
    body = [
        [
            f"{c['covariance_examples']} / {c['correction_examples']}",
            f"{c['cpu_seconds']:.1f}",
            f"{c['over_epoch']:.2f}",
            f"{c['seconds']:.1f}",
            f"{c['spearman_vs_full']:.3f}",
            f"{c['solve_relative_error_vs_full']:.3f}",
        ]
        for c in d["configs"].values()
    ]
    body.append(["one training epoch", f"{d['train_epoch_cpu_s']:.1f}", "1", "", "", ""])
    head = ["covariance / correction examples", "CPU s", "/ epoch (CPU)", "wall s"]
    head += ["Spearman vs full", "solve rel. error"]
    return rows(head, body)


def memory(d: dict[str, Any]) -> str:
    body = []
    for key, s in d["summary"].items():
        peaks = [", ".join(f"{v:.0f}" for v in s["peaks_mib"][n]) for n in s["peaks_mib"]]
        body.append(
            [key.replace("/", ", ")]
            + peaks
            + [
                f"{s['peak_ratio_60k_over_10k']:.2f}",
                f"{s['peak_ratio_worst']:.2f}",
                f"{s['increment_ratio_60k_over_10k']:.2f}",
            ]
        )
    sizes = list(next(iter(d["summary"].values()))["peaks_mib"])
    head = ["method, storage"] + [f"peak MiB at {n}" for n in sizes]
    head += ["peak 60k / 10k (median)", "worst pair", "netmend's increment 60k / 10k"]
    return rows(head, body)


ALIGN_FILES = (
    "align_vs_delete.json",
    "align_vs_delete_k1.5.json",
    "align_vs_delete_epochs3.json",
    "align_vs_delete_k1.5_epochs3.json",
    "align_vs_delete_long.json",
    "align_vs_delete_k1.5_long.json",
    "align_vs_delete_long_30seeds.json",
    "align_vs_delete_k1.5_long_30seeds.json",
)


def align_vs_delete(files: list[dict[str, Any]]) -> str:
    body = []
    for d in files:
        setting = (
            f"K = {d['k_factor']:g}×, {d['epochs']:g} epochs, lr {d['lr']:g}, "
            f"{len(d['seeds'])} seeds"
        )
        diff = d["heldout_failure_acc_minus_delete"]
        for name, m in d["mean"].items():
            x = diff.get(name)
            body.append(
                [
                    setting,
                    f"`{name}`",
                    f"{m['test_acc']:.3f}",
                    f"{m['heldout_failure_acc']:.3f}",
                    f"{m['correct_acc']:.3f}",
                    f"{x['mean']:+.3f} ± {x['se']:.3f} ({x['wins']}/{x['losses']})" if x else "",
                ]
            )
            setting = ""
    head = ["setting", "treatment", "test", "held-out failures", "correct set"]
    head += ["held-out − delete ± s.e. (seeds better/worse)"]
    return rows(head, body)


PEERS_SCALE_FILES = ("peers_scale.json", "peers_scale_60k_paired.json")


def peers_scale(files: list[dict[str, Any]]) -> str:
    """netmend vs kronfluence EK-FAC on the MLP: cost of each worker process, and the LDS."""
    body = []
    for d in files:
        p = d["problem"]
        for lib, m in d["methods"].items():
            sc, pq = m["scores"], m.get("per_query")
            body.append(
                [
                    lib,
                    f"{p['n_train']}",
                    f"{p['queries']}",
                    f3(sc["factors"]["cpu"], "{:.1f}"),
                    f3(sc["scoring"]["cpu"], "{:.1f}"),
                    f3(sc["total"]["cpu"], "{:.1f}"),
                    f3(sc["total"]["wall"], "{:.1f}"),
                    f3(m["peak_rss_scores_mib"], "{:.0f}"),
                    f3(pq["total"]["cpu"], "{:.1f}") if pq else "–",
                    f3(m.get("lds_per_query")),
                    f3(m.get("lds_group")),
                ]
            )
        for name, v in d.get("netmend_controls", {}).items():  # label seed / exact Fisher
            body.append([name, f"{p['n_train']}", f"{p['queries']}"] + ["–"] * 5
                        + [f3(v["per_query"]["total"]["cpu"], "{:.1f}"),
                           f3(v["lds_per_query"]), "–"])  # fmt: skip
        for name, v in d.get("kronfluence_controls", {}).items():  # its own label seed
            body.append([name, f"{p['n_train']}", f"{p['queries']}"]
                        + [f3(v["scores"]["factors"]["cpu"], "{:.1f}")] + ["–"] * 4
                        + [f3(v["per_query"]["total"]["cpu"], "{:.1f}"),
                           f3(v["lds_per_query"]), "–"])  # fmt: skip
        if "controls" in d:
            r = d["controls"]["random_scores"]
            body.append(["random scores (control)", f"{p['n_train']}", f"{p['queries']}"]
                        + ["–"] * 6 + [f3(r["lds_per_query"]), f3(r["lds_group"])])  # fmt: skip
    head = ["library", "N", "queries M", "factors CPU s", "scoring CPU s", "total CPU s"]
    head += ["total wall s", "peak RSS MiB", "per-query CPU s", "LDS per query", "LDS group"]
    return rows(head, body)


def peers_scale_label_seeds(d: dict[str, Any]) -> str:
    """LDS per query of each library over its label seeds (one sampled Fisher label per
    training example each), mean ± s.e., and the difference of the means: the summary
    ``peers_scale.py`` writes (``label_seeds``)."""
    body = []
    for name, v in d["label_seeds"].items():
        seeds = v.get("seeds", {})
        body.append([name.replace("_minus_", " − "), ", ".join(seeds),
                     " / ".join(f"{x:.3f}" for x in seeds.values()),
                     f"{v['mean']:.3f} ± {v['se']:.3f}"])  # fmt: skip
    return rows(["library", "label seeds", "LDS per query, per seed", "mean ± s.e."], body)


def peers_scale_ratios(files: list[dict[str, Any]]) -> str:
    """netmend over kronfluence, per problem size: cost ratios, LDS differences, targets."""
    body = []
    for d in files:
        r, t = d["ratios"], d["targets"]
        body.append(
            [
                f"{d['problem']['n_train']}",
                f3(r["time_netmend_over_kronfluence_cpu"]),
                f3(r["time_netmend_over_kronfluence_wall"]),
                f3(r["peak_rss_netmend_over_kronfluence"]),
                f3(r["lds_per_query_netmend_minus_kronfluence"], "{:+.3f}"),
                f3(r["lds_group_netmend_minus_kronfluence"], "{:+.3f}"),
                f3(d["controls"]["spearman_netmend_vs_kronfluence_summed"]),
            ]
            + [
                "yes" if t[k] else "NO"
                for k in (
                    "lds_at_least_kronfluence",
                    "time_at_most_half",
                    "peak_memory_at_most_kronfluence",
                )
            ]
        )
    head = ["N", "time netmend/kronfluence (CPU)", "(wall)", "peak RSS netmend/kronfluence"]
    head += ["LDS per query, netmend − kronfluence", "LDS group, difference"]
    head += ["Spearman netmend vs kronfluence", "LDS ok", "time ≤ 1/2", "memory ok"]
    return rows(head, body)


def peers_scale_factors_match(d: dict[str, Any]) -> str:
    """netmend vs kronfluence EK-FAC factors (float64): largest relative difference over layers."""
    body = []
    for name, r in d["match"]["settings"].items():
        lay = r["layers"].values()
        body.append(
            [name]
            + [f"{max(v[k] for v in lay):.1e}" for k in ("A_rel_diff", "G_rel_diff")]
            + [f"{max(v['Lambda_rel_diff'] for v in lay):.1e}", f"{r['scores_rel_diff']:.1e}"]
            + [f"{r['spearman_per_query_mean']:.3f}"]
        )
    head = ["labels", "A rel. diff (max over layers)", "G", "Lambda", "scores rel. diff"]
    head += ["Spearman per query"]
    return rows(head, body)


def peers_scale_factors_lds(d: dict[str, Any]) -> str:
    """The LDS of the fix on a case other than peers_scale.json's."""
    body = [
        [name, f3(v["lds_per_query"]), f3(v["lds_per_query_se"])]
        for name, v in d["lds_other_case"]["lds"].items()
    ]
    return rows(["variant", "LDS per query", "s.e."], body)


def _models(extra: dict[str, int]) -> str:
    return ", ".join(f"+{n} {kind}" for kind, n in extra.items()) or "1 full"


def _paired(diff: dict[str, float] | None) -> str:
    """A per-test-point paired difference ``{mean, se}`` as ``+0.013 ± 0.003`` (``–``: none)."""
    if diff is None or diff["se"] == 0:
        return "–"
    return f"{diff['mean']:+.3f} ± {diff['se']:.3f}"


def dattri_protocol(d: dict[str, Any]) -> str:
    """dattri's MNIST-MLP LDS protocol: every attribution scored on the same retrained models."""
    pub = d["published_lds"]
    label = {"dattri Grad-Dot": "Grad-Dot", "dattri TracIn": "TracIn"}
    label.update({f"dattri TRAK-{k}": f"TRAK-{k}" for k in (1, 10, 50)})
    body = []
    for name, m in d["methods"].items():
        if "lds" not in m:
            continue
        p = pub.get(label.get(name, ""), pub["IF-CG"] if name == d["dattri_if_cg_best"] else None)
        body.append(
            [
                name,
                _models(m["extra_models"]),
                f"{f3(m['lds']['mean'])} ± {f3(m['lds']['se'])}",
                _paired(m.get("lds_minus_trak50_paired")),
                f"{m['lds']['n_test']}",
                f3(m.get("lds_dattri_metric")),
                f3(m["attribution"]["cpu"], "{:.1f}"),
                f3(m["attribution"]["wall"], "{:.1f}"),
                f3(m["peak_rss_mib"], "{:.0f}"),
                f3(m["cost_cpu_s"], "{:.1f}"),
                f3(m.get("cost_vs_trak50")),
                f3(p, "{:.2f}"),
            ]
        )
    r = d["controls"]["random"]
    body.append(["random scores (control)", "–", f"{f3(r['mean'])} ± {f3(r['se'])}", "–",
                 f"{r['n_test']}"] + ["–"] * 7)  # fmt: skip
    head = ["method", "models beyond the shared one", "LDS ± s.e.", "minus TRAK-50's, paired"]
    head += ["test points"]
    head += ["dattri.metric.lds", "attribution CPU s", "wall s", "peak RSS MiB"]
    head += ["cost CPU s (with training)", "cost / TRAK-50", "dattri published"]
    return rows(head, body)


def dattri_protocol_target(d: dict[str, Any]) -> str:
    t = d["target"]
    body = [
        [
            t.get("trak50_cost_source", "–").split(":")[0],
            f3(t.get("trak50_cost_cpu_s"), "{:.1f}"),
            f3(t.get("budget_cpu_s"), "{:.1f}"),
            f"`{t.get('best_netmend_within_budget')}`",
            f3(t.get("best_netmend_within_budget_lds")),
            f"`{t.get('best_netmend')}`",
            f3(t.get("best_netmend_lds")),
            "yes" if t.get("met") else "NO",
        ]
    ]
    head = ["TRAK-50 cost", "CPU s", "budget (1/10) CPU s", "best netmend within budget"]
    head += ["its LDS", "best netmend overall", "its LDS", "LDS ≥ 0.45 within budget"]
    return rows(head, body)


def dattri_dev(d: dict[str, Any]) -> str:
    """The development problem's grid (``--problem dev``): LDS of Kronecker TRAK over 50
    half-data models per projection dimension and ridge ratio; the chosen ratio in bold."""
    chosen = d["ridge_ratio_chosen"]
    grid: dict[str, dict[str, str]] = {}
    ratios: list[str] = []
    for name, m in d["methods"].items():
        parts = name.split()  # netmend trak kron<D> x50 half ridge_ratio <r>
        if "lds" not in m or len(parts) != 7:
            continue
        dim, ratio = parts[2][4:], parts[6]
        ratios += [ratio] if ratio not in ratios else []
        cell = f"{f3(m['lds']['mean'])} ± {f3(m['lds']['se'])} ({m['attribution']['cpu']:.0f} s)"
        grid.setdefault(dim, {})[ratio] = f"**{cell}**" if float(ratio) == chosen[dim] else cell
    body = [[dim, *(row.get(r, "–") for r in ratios)] for dim, row in grid.items()]
    return rows(["proj_dim (rows) / ridge_ratio (columns)", *ratios], body)


def trak_ridge(d: dict[str, Any]) -> str:
    """Single-model ``trak`` against its ridge ratio on the validation problems."""
    cols = ("spearman_loo", "lds", "precision_at_k", "auroc")
    body = []
    for model, run in d["runs"].items():
        for r in run["rows"]:
            mark = {0.01: " (default until 0.3.5)", 0.1: " (default)"}.get(r["ridge_ratio"], "")
            ratio = f"{r['ridge_ratio']:g}" + mark
            body.append([model, ratio, f"{r['ridge']:.3g}"] + [f3(r[c]) for c in cols])
        for method, r in run.get("references", {}).items():
            body.append([model, f"*{method}* (reference)", "–"] + [f3(r[c]) for c in cols])
    head = ["model", "ridge_ratio", "λ", "Spearman LOO", "LDS", "precision@K", "AUROC"]
    return rows(head, body)


def trak_cache(d: dict[str, Any]) -> str:
    """TRAK's Gaussian projection kept whole against regenerated per chunk."""
    body = [
        [
            f"{d['parameters']:,} × {d['proj_dim']}",
            f"{d['r_mib_float32']}",
            f"{d['models']}",
            f"{d['regenerated']['cpu_s']:.1f}",
            f"{d['kept']['cpu_s']:.1f}",
            f"{d['speedup_cpu']:.2f}",
            f"{d['max_abs_score_difference_relative']:.1e}",
        ]
    ]
    head = ["R (P × k)", "R MiB (float32)", "models", "regenerated per chunk, CPU s"]
    head += ["kept whole, CPU s", "speed-up", "max score difference (relative)"]
    return rows(head, body)


def dattri_trak50(files: list[dict[str, Any]]) -> str:
    """A rerun of the protocol with dattri's TRAK-50 (``dattri_protocol_trak50.json``) next to
    the first run (``dattri_protocol.json``): the rows both ran show whether the retrained
    models and ground truth came out the same."""
    first, again = files
    body = []
    names = ("netmend ekfac", "netmend ekfac x5", "dattri TRAK-1", "dattri TRAK-4")
    for name in (*names, "dattri TRAK-10", "dattri TRAK-50"):
        runs = first["methods"].get(name, {}), again["methods"].get(name, {})
        if not any("lds" in m for m in runs):
            continue
        lds = [_pm([m["lds"]["mean"], m["lds"]["se"]], 1.0, "{:.3f}") if "lds" in m else "–"
               for m in runs]  # fmt: skip
        body.append([f"`{name}`", *lds, *(f3(m.get("cost_cpu_s"), "{:.1f}") for m in runs)])
    head = ["method", "LDS, first run", "LDS, rerun", "cost CPU s, first run", "cost, rerun"]
    return rows(head, body)


def scaling_n(d: dict[str, Any]) -> str:
    """netmend's default identify over a streamed, tiled MNIST: time and peak RSS in N."""
    body = []
    for n, r in sorted(d["runs"].items(), key=lambda kv: int(kv[0])):
        sm = d["summary"][n]
        body.append(
            [
                n,
                f"{r['seconds']:.1f}",
                f"{r['cpu_seconds']:.1f}",
                f"{r['cpu_per_example_ms']:.4f}",
                f"{sm['cpu_per_example_over_smallest']:.2f}",
                f3(sm.get("measured_over_line"), "{:.2f}"),
                f"{r['peak_rss_mib']:.0f}",
                f"{sm['peak_rss_over_smallest']:.3f}",
                f"{r['tiled_data_if_in_memory_mib']:.0f}",
            ]
        )
    head = ["N", "wall s", "CPU s", "CPU ms / example", "CPU/example vs smallest N"]
    head += ["CPU s / the line a + b·N through the two smallest N"]
    head += ["peak RSS MiB", "peak vs smallest N", "the data, if held in memory (MiB)"]
    return rows(head, body)


def k_rule(d: dict[str, Any]) -> str:
    """The automatic-K rules on the dev suites: stability of K and the diagnosis gain."""
    body = []
    for rule, o in d["overall"].items():
        body.append(
            [
                f"`{rule}`",
                f"{o['suites_cv_le_0.3']} of {o['suites_with_cv']}",
                f3(o["mean_cv"], "{:.2f}"),
                f"{100 * o['mean_heldout_gain']:+.1f}",
                f"{o['suites_with_positive_gain']} of {o['suites']}",
                f"{100 * o['mean_test_gain']:+.2f}",
                f"{o['pareto_passes']} of {o['runs']}",
            ]
        )
    head = ["rule", "suites with CV of K ≤ 0.3", "mean CV of K"]
    head += ["diagnosis gain, held-out F (points, mean over suites)", "suites with a gain > 0"]
    head += ["gain, test (points)", "Pareto passes (suite × seed)"]
    return rows(head, body)


def demo_convergence(d: dict[str, Any]) -> str:
    """The demo CNN's validation curve (noisy 50k / 10k split of the training set)."""
    body = [
        [
            f"{r['epochs']:g}",
            f"{100 * r['val_acc_noisy_labels']:.2f}",
            f"{100 * r['val_acc_true_labels']:.2f}",
        ]
        for r in d["curve"]
    ]
    return rows(["epochs", "validation acc, noisy labels (%)", "true labels (%)"], body)


def demo_cleanlab(d: dict[str, Any]) -> str:
    """The demo's default repair next to cleanlab's remove-and-fine-tune, per seed."""
    body = []
    for r in d["results"]:
        for name in ("default", "cleanlab"):
            x = r["rows"][name]
            rk = x["random_k"]
            body.append(
                [
                    str(r["seed"]),
                    name,
                    f"{x['k']}",
                    f3(x["precision"]),
                    f3(x["recall"]),
                    f"{100 * x['test_acc']:.2f}",
                    f"{100 * x['heldout_failure_acc']:.2f}",
                    f"{100 * rk['test_acc'][0]:.2f}",
                    f"{100 * rk['heldout_failure_acc'][0]:.2f}",
                ]
            )
        only = r["rows"]["finetune_only"]
        body.append(
            [str(r["seed"]), "finetune-only", "0", "", ""]
            + [f"{100 * only['test_acc']:.2f}", f"{100 * only['heldout_failure_acc']:.2f}", "", ""]
        )
    head = ["seed", "pipeline", "K", "precision", "recall", "test acc (%)", "held-out F (%)"]
    head += ["random-K test (%)", "random-K held-out F (%)"]
    return rows(head, body)


def _pts(v: dict[str, Any] | None, signed: bool = True, digits: int = 1) -> str:
    """``{"mean", "se"}`` (fractions) as points of %, mean ± s.e."""
    if v is None:
        return "–"
    text = f"{100 * v['mean']:+.{digits}f}" if signed else f"{100 * v['mean']:.{digits}f}"
    return text + ("" if v["se"] is None else f" ± {100 * v['se']:.{digits}f}")


def test_suites(d: dict[str, Any]) -> str:
    """Issue 11's test suites: the default (and the previous default) against random-K, the
    oracle and cleanlab, from benchmarks/test_suites.json."""
    labels = {
        "ewc[gate=true]/finetune[guard=true]": "default (label gate + guard, two readings)",
        "ewc[gate=true]/finetune[guard=labels]": "0.3.2 default (label gate + guard, labels)",
        "ewc/finetune[guard=true]": "0.3.1 default (guard)",
        "ewc/finetune": "first default",
    }
    body = []
    for s in d["suites"]:
        for name, label in labels.items():
            r = s["pipelines"].get(name)
            if r is None:
                continue
            body.append(
                [
                    f"{s['suite']} (seeds {', '.join(map(str, r['seeds']))})",
                    label,
                    " / ".join(str(k) for k in r["k"]),
                    f3(r["precision"]),
                    _pts(r["heldout_gain"]),
                    _pts(r.get("oracle_heldout_gain")),
                    _pts(r["test_gain"], digits=2),
                    f"{100 * r['worst_class_drop']:.1f}",
                    "yes" if r["repairs"] else "no",
                    _pts(r.get("minus_cleanlab_heldout")),
                    _pts(r.get("minus_cleanlab_test"), digits=2),
                ]
            )
    head = ["test suite", "pipeline", "K per seed", "cause precision"]
    head += ["diagnosis gain, held-out F (points)", "oracle-causes' gain (points)"]
    head += ["gain, test (points)", "worst class drop (points)", "repairs (Pareto)"]
    head += ["− cleanlab, held-out F", "− cleanlab, test"]
    return rows(head, body)


def align_layers(result: dict[str, Any]) -> str:
    """Alignment updating the last layer, the last two or all layers, on the Pareto criterion
    next to the fine-tune default, from one bench run (its own markdown)."""
    from netmend.lab.bench import pareto_markdown

    return pareto_markdown(result).strip()


def lambda_sweep(files: list[dict[str, Any]]) -> str:
    """EWC-influence and the linear estimator against lambda, next to grad_dot (no lambda):
    fidelity to retraining, precision against the flips, and how alike the rankings are."""
    body = []
    for doc in files:
        for model, run in doc["runs"].items():
            for row in run["rows"]:
                m, a = row["methods"], row["agreement"]
                body.append(
                    [
                        model,
                        f"{row['ratio_to_mean_fisher']:.3g}",
                        f3(m["ewc"]["spearman_loo"]),
                        f3(m["linear"]["spearman_loo"]),
                        f3(m["grad_dot"]["spearman_loo"]),
                        f3(m["ewc"]["lds"]),
                        f3(m["grad_dot"]["lds"]),
                        f3(m["ewc"]["precision_at_k"]),
                        f3(m["linear"]["precision_at_k"]),
                        f3(m["grad_dot"]["precision_at_k"]),
                        f3(a["ewc~grad_dot"]["spearman"]),
                        str(a["ewc~grad_dot"]["top50_overlap"]),
                        f3(a["linear~grad_dot"]["spearman"]),
                    ]
                )
    head = ["model", "λ / mean Fisher diagonal", "Spearman LOO: ewc", "linear", "grad_dot"]
    head += ["LDS: ewc (= linear)", "grad_dot", "precision@K: ewc", "linear", "grad_dot"]
    head += ["ewc ~ grad_dot: Spearman", "top-50 overlap", "linear ~ grad_dot: Spearman"]
    return rows(head, body)


def label_signal(files: list[dict[str, Any]]) -> str:
    """Label-error signals on the dev runs: among the automatic causes (what a gate keeps),
    and over the whole training set; means over each file's runs (its ``summary``)."""
    body = []
    for doc in files:
        where = ", ".join(sorted({r["suite"] for r in doc["runs"]}))
        for name, m in doc["summary"]["signals"].items():
            body.append(
                [
                    where,
                    name,
                    f3(m["share_of_auto"]),
                    f3(m["auto_precision"]),
                    f3(m["auto_precision_gain"], "{:+.3f}"),
                    f3(m["all_precision"]),
                    f3(m["all_recall"]),
                ]
            )
    head = ["dev runs", "signal", "share of the automatic causes flagged"]
    head += ["precision among them", "− in-sample's", "precision, whole set", "recall"]
    return rows(head, body)


_GUARD = {
    "training slice": "training slice (default)",
    "training slice, untreated": "training slice, vs the untreated trial",
    "guard_data": "`guard_data` (validation split), both readings",
    "guard_data, labels only": "`guard_data`, labels only (first version)",
    "training slice, shrink 0.71": "training slice, `guard_shrink=0.71`",
}


def _drop_cell(drop: float | None, cls: int | None) -> str:
    return "–" if drop is None else f"{drop:.1f} (class {cls})"


def guard_calibration(d: dict[str, Any]) -> str:
    """Each guard trial's reading next to the test set's reading of the trial model and of
    the model the repair returns at that K (the same model for ``guard_data``)."""
    lim = d["limit_points"]
    body = []
    for t in d["trials"]:
        ref = t["returned_worst_drop"]
        body.append(
            [
                str(t["seed"]),
                _GUARD[t["source"]],
                str(t["k"]),
                _drop_cell(t["guard_drop"], t["guard_class"]),
                _drop_cell(t["test_worst_drop"], t["test_worst_class"]),
                _drop_cell(ref, t["returned_worst_class"]),
                ("fail" if t["guard_drop"] > lim else "pass")
                + " / "
                + ("–" if ref is None else "fail" if ref > lim else "pass"),
            ]
        )
    head = ["seed", "guard reads", "trial K", "guard: worst class drop, points"]
    head += ["test set: the trial model", "test set: the model returned at K"]
    head += ["guard / returned model at 10 points"]
    return rows(head, body)


def guard_calibration_summary(d: dict[str, Any]) -> str:
    """Per way of running the guard: its reading error, its decisions, and the repairs."""

    def pm(mean: float, se: float | None) -> str:
        return f"{mean:+.2f}" + ("" if se is None else f" ± {se:.2f}")

    body = []
    for source, m in d["summary"].items():
        rep = d["repairs"][source]
        tr, ret = m["trial"], m["returned"]
        body.append(
            [
                _GUARD[source],
                str(tr["trials"]),
                f"{tr['mean_abs_error_points']:.1f} ({tr['mean_error_points']:+.1f})",
                f"{ret['mean_abs_error_points']:.1f} ({ret['mean_error_points']:+.1f}), "
                f"{ret['trials']} trials"
                if ret["trials"]
                else "–",
                f"{tr['decisions_differing_from_test']} / "
                + (str(ret["decisions_differing_from_test"]) if ret["trials"] else "–"),
                " / ".join(str(k) for k in rep["k"]),
                pm(rep["heldout_gain"], rep["heldout_gain_se"]),
                pm(rep["test_gain"], rep["test_gain_se"]),
                f"{rep['passed']} of {len(rep['k'])}",
            ]
        )
    head = ["guard reads", "trials", "mean abs (signed) error vs the trial model, points"]
    head += ["vs the model returned at K", "decisions unlike the test set's (trial / returned)"]
    head += ["final K per seed", "held-out gain vs random-K", "test gain vs random-K"]
    head += ["Pareto passes"]
    return rows(head, body)


def oracle_at_k(d: dict[str, Any]) -> str:
    """The default's gain over random-K next to oracle-at-K's (K random members of the
    corrupted set), oracle-ranked's (the K its scores rank highest) and oracle-causes' (all of
    it), from benchmarks/oracle_at_k.json."""

    def share(v: float | None, half: bool | None) -> str:
        return "–" if v is None else f"{v:.2f} ({'met' if half else 'not met'})"

    body = []
    for s in d["suites"]:
        body.append(
            [
                f"{s['suite']} (seeds {', '.join(map(str, s['seeds']))})",
                " / ".join(str(k) for k in s["k"]),
                " / ".join(str(k) for k in s["corrupted"]),
                f3(s["precision"]),
                _pts(s["heldout_gain"]),
                _pts(s["at_k_heldout_gain"]),
                _pts(s["ranked_heldout_gain"]),
                _pts(s["full_heldout_gain"]),
                share(s["share_of_ranked"], s["half_of_ranked"]),
                share(s["share_of_full"], s["half_of_full"]),
                _pts(s["test_gain"], digits=2),
                _pts(s["at_k_test_gain"], digits=2),
                _pts(s["ranked_test_gain"], digits=2),
                f"{'yes' if s['repairs'] else 'no'} ({s['passed']} of {len(s['seeds'])} seeds)",
            ]
        )
    head = ["suite", "K per seed", "corrupted per seed", "cause precision"]
    head += ["default's gain, held-out F", "oracle-at-K's", "oracle-ranked's"]
    head += ["oracle-causes'", "share of oracle-ranked's (≥ 0.5?)"]
    head += ["share of oracle-causes' (≥ 0.5?)", "default's gain, test", "oracle-at-K's, test"]
    head += ["oracle-ranked's, test", "default repairs (Pareto on seed means)"]
    return rows(head, body)


TABLES: dict[str, tuple[tuple[str, ...], Callable[..., str]]] = {
    "headline": (("benchmarks/demo_seeds.json",), headline),
    "oracle_at_k": (("benchmarks/oracle_at_k.json",), oracle_at_k),
    "demo_seeds": (("benchmarks/demo_seeds.json",), demo_seeds),
    "fisher_timing": (("benchmarks/fisher_timing.json",), fisher_timing),
    "arch_timing": (("benchmarks/arch_timing.json",), arch_timing),
    "arch_timing_60k": (("benchmarks/arch_timing_fashion60k.json",), arch_timing),
    "arch_timing_60k_rerun": (("benchmarks/arch_timing_fashion60k_rerun.json",), arch_timing),
    "arch_timing_60k_fisher": (("benchmarks/arch_timing_fashion60k_fisher.json",), arch_timing),
    "arch_timing_60k_repair": (("benchmarks/arch_timing_fashion60k_repair.json",), arch_timing),
    "arch_timing_60k_guard_data": (
        ("benchmarks/arch_timing_fashion60k_guard_data.json",),
        arch_timing,
    ),
    "arch_timing_60k_no_guard": (
        ("benchmarks/arch_timing_fashion60k_no_guard.json",),
        arch_timing,
    ),
    "validate_setup": (("benchmarks/validate.json",), validate_setup),
    "validate_logreg": (("benchmarks/validate.json",), validate_logreg),
    "validate_mlp": (("benchmarks/validate.json",), validate_mlp),
    "validate_pair_setup": (("benchmarks/validate_pair.json",), validate_setup),
    "trak_default_seeds": (("benchmarks/trak_default_seeds.json",), trak_default_seeds),
    "validate_flips": (
        ("benchmarks/validate.json", "benchmarks/validate_pair.json"),
        validate_flips,
    ),
    "peers_methods": (("benchmarks/peers.json",), peers_methods),
    "peers_ratios": (("benchmarks/peers.json",), peers_ratios),
    "peers_trak": (("benchmarks/peers.json",), peers_trak),
    "ekfac_timing": (("benchmarks/ekfac_timing.json",), ekfac_timing),
    "memory": (("benchmarks/memory.json",), memory),
    "continual": (("benchmarks/continual.json",), continual),
    "cli_folder": (("benchmarks/cli_folder.json",), cli_folder),
    "align_vs_delete": (tuple(f"benchmarks/{f}" for f in ALIGN_FILES), align_vs_delete),
    "peers_scale": (tuple(f"benchmarks/{f}" for f in PEERS_SCALE_FILES), peers_scale),
    "peers_scale_ratios": (tuple(f"benchmarks/{f}" for f in PEERS_SCALE_FILES), peers_scale_ratios),
    "peers_scale_label_seeds": (
        ("benchmarks/peers_scale_60k_paired.json",),
        peers_scale_label_seeds,
    ),
    "peers_scale_factors_match": (
        ("benchmarks/peers_scale_factors.json",),
        peers_scale_factors_match,
    ),
    "peers_scale_factors_lds": (("benchmarks/peers_scale_factors.json",), peers_scale_factors_lds),
    "scaling_n": (("benchmarks/scaling_n.json",), scaling_n),
    "dattri_protocol": (("benchmarks/dattri_protocol.json",), dattri_protocol),
    "dattri_protocol_target": (("benchmarks/dattri_protocol.json",), dattri_protocol_target),
    "dattri_kron": (("benchmarks/dattri_protocol_kron.json",), dattri_protocol),
    "dattri_kron_target": (("benchmarks/dattri_protocol_kron.json",), dattri_protocol_target),
    "trak_cache": (("benchmarks/trak_cache.json",), trak_cache),
    "trak_ridge": (("benchmarks/trak_ridge.json",), trak_ridge),
    "dattri_dev": (("benchmarks/dattri_protocol_dev.json",), dattri_dev),
    "dattri_ridge": (("benchmarks/dattri_protocol_ridge.json",), dattri_protocol),
    "dattri_ridge_target": (("benchmarks/dattri_protocol_ridge.json",), dattri_protocol_target),
    "dattri_trak50": (
        ("benchmarks/dattri_protocol.json", "benchmarks/dattri_protocol_trak50.json"),
        dattri_trak50,
    ),
    "guard_calibration": (("benchmarks/guard_calibration.json",), guard_calibration),
    "guard_shrink_summary": (("benchmarks/guard_shrink.json",), guard_calibration_summary),
    "guard_shrink": (("benchmarks/guard_shrink.json",), guard_calibration),
    "guard_calibration_summary": (
        ("benchmarks/guard_calibration.json",),
        guard_calibration_summary,
    ),
    "k_rule": (("benchmarks/k_rule_dev.json",), k_rule),
    "k_rule_cap": (("benchmarks/k_rule_dev_cap0.3.json",), k_rule),
    "demo_convergence": (("benchmarks/demo_convergence.json",), demo_convergence),
    "demo_cleanlab": (("benchmarks/demo_cleanlab.json",), demo_cleanlab),
    "fashion_convergence": (("benchmarks/fashion_convergence.json",), demo_convergence),
    "test_suites": (("benchmarks/test_suites.json",), test_suites),
    "align_layers": (("benchmarks/bench_align_layers/bench.json",), align_layers),
    "lambda_sweep": (
        ("benchmarks/lambda_sweep.json", "benchmarks/lambda_sweep_mlp.json"),
        lambda_sweep,
    ),
    "label_signal": (
        ("benchmarks/label_signal_digits.json", "benchmarks/label_signal_full.json"),
        label_signal,
    ),
}


def render_table(name: str) -> str:
    files, fn = TABLES[name]
    data = [load(f) for f in files]
    multi = (
        align_vs_delete,
        peers_scale,
        peers_scale_ratios,
        lambda_sweep,
        label_signal,
        dattri_trak50,
        validate_flips,
    )
    return fn(data) if fn in multi else fn(data[0])


def rewrite(text: str) -> str:
    """``text`` with every marked block re-rendered; unknown names or files raise."""

    def sub(m: re.Match[str]) -> str:
        name = m["name"]
        if name not in TABLES:
            raise ValueError(f"a README names an unknown table {name!r}")
        files = ", ".join(TABLES[name][0])
        if m["files"] != files:
            raise ValueError(f"table {name!r} must cite ({files}); it cites ({m['files']})")
        return (
            f"<!-- BEGIN make_readme: {name} ({files}) -->\n"
            f"{render_table(name)}\n"
            f"<!-- END make_readme: {name} -->"
        )

    return MARKER.sub(sub, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a README is out of date")
    args = ap.parse_args()
    stale = []
    for path in FILES:
        old = path.read_text()
        new = rewrite(old)
        if new == old:
            continue
        stale.append(path)
        if not args.check:
            tmp = path.with_suffix(".md.tmp")
            tmp.write_text(new)
            tmp.replace(path)  # atomic
    if args.check and stale:
        print(f"out of date: {[str(p.relative_to(ROOT)) for p in stale]}; run make_readme.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
