"""``report.html``: one self-contained page that shows a repair at a glance.

The page needs nothing but a browser: images are embedded as base64 PNG, the CSS and the
JavaScript (paging through the failures) are inline, every number is in the file, and it
loads nothing from the network. It shows

* the accuracies before and after the repair, next to the controls (e.g. fine-tuning without
  removing anything, removing K random examples with the same treatment);
* the distribution of the cause scores (positive = harmful) with the selected causes marked,
  as an inline SVG histogram;
* each failure (20 per page): its input, correct label and predictions, and its top
  culprits with their labels, suggested labels (when the treatment relabels) and scores;
  images as thumbnails, tabular rows as small feature tables, token ids as text (decoded
  through a vocabulary when one is given);
* the classes most involved: the labels of the selected causes and the confusions of the
  failures.

Only the shown examples are rendered (the failures and their culprits), so the page stays
small on large training sets.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netmend.evaluation.controls import MAX_CLASS_DROP, TEST_TOLERANCE
from netmend.identification.base import top_indices

PAGE_SIZE = 20


@dataclass
class ReportData:
    """Everything the report shows; arrays are indexed as described.

    Attributes:
        title: the page's heading.
        kind: "images", "tabular", "tokens" or "array" (how inputs are drawn).
        train_X: training inputs ``[N, ...]`` (only the culprits shown are rendered).
        train_y: the training labels ``[N]``.
        failures_X: failure inputs ``[M, ...]``; failures_y: their correct labels ``[M]``.
        scores: cause scores ``[N]`` (positive = harmful).
        causes: the selected training indices ``[K]``.
        culprit_indices: ``[M, n]`` each failure's top culprits (training indices).
        culprit_scores: ``[M, n]`` their per-failure scores (positive = harmful).
        accuracies: ``{row name: {column: accuracy in [0, 1]}}``, e.g. "original",
            "repaired", "control: finetune only"; columns like "failures" or "test".
        pred_before, pred_after: the original and repaired models' predictions on the
            failures ``[M]`` (``pred_after`` optional).
        suggested: ``{training index: suggested label}`` of relabelled causes.
        classes: class names (index = label); ``None`` shows the indices.
        features: feature names of tabular data.
        vocab: token strings (index = id) for token data.
        pad_id: the padding id of token data (not shown).
        failure_names: how each failure is named (e.g. its test index) ``[M]``.
        settings: shown as a key/value table (identification, treatment, K, seed...).
        notes: short sentences shown under the accuracies.
    """

    title: str
    kind: str
    train_X: torch.Tensor
    train_y: torch.Tensor
    failures_X: torch.Tensor
    failures_y: torch.Tensor
    scores: np.ndarray
    causes: np.ndarray
    culprit_indices: np.ndarray
    culprit_scores: np.ndarray
    accuracies: Mapping[str, Mapping[str, float]]
    pred_before: np.ndarray | None = None
    pred_after: np.ndarray | None = None
    suggested: Mapping[int, int] = field(default_factory=dict)
    classes: Sequence[str] | None = None
    features: Sequence[str] | None = None
    vocab: Sequence[str] | None = None
    pad_id: int | None = None
    failure_names: Sequence[str] | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    notes: Sequence[str] = ()


# ----------------------------------------------------------------------------- rendering inputs


def _png(a: np.ndarray) -> str:
    """``[H, W]`` or ``[H, W, 3]`` floats in [0, 1] (or any range: min-max scaled) as base64."""
    from PIL import Image

    a = np.asarray(a, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    if lo < 0 or hi > 1:
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    img = Image.fromarray(np.round(a * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _image_array(x: torch.Tensor) -> np.ndarray | None:
    a = x.detach().cpu().double().numpy()
    if a.dtype.kind != "f":
        a = a.astype(np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[2] in (1, 3):
        return a[..., 0] if a.shape[2] == 1 else a
    if a.ndim == 2:
        return a
    if a.ndim == 1:
        side = int(round(a.size**0.5))
        if side * side == a.size and side > 2:
            return a.reshape(side, side)
    return None


def _render(x: torch.Tensor, data: ReportData) -> str:
    """One input as an HTML snippet (thumbnail, feature table or text)."""
    if data.kind == "images" or (data.kind == "array" and x.is_floating_point()):
        img = _image_array(x)
        if img is not None:
            if x.dtype == torch.uint8:
                img = img / 255.0
            return f'<img class="thumb" alt="input" src="data:image/png;base64,{_png(img)}">'
    if data.kind == "tokens" or not x.is_floating_point():
        ids = [int(i) for i in x.reshape(-1).tolist()]
        if data.pad_id is not None:
            while ids and ids[-1] == data.pad_id:
                ids.pop()
        if data.vocab is not None:
            words = [data.vocab[i] if 0 <= i < len(data.vocab) else f"<{i}>" for i in ids]
            text = " ".join(words)
        else:
            text = " ".join(str(i) for i in ids)
        if len(text) > 400:
            text = text[:400] + " …"
        return f'<div class="text">{html.escape(text)}</div>'
    flat = x.reshape(-1).double().tolist()
    names = list(data.features) if data.features else [f"x{i}" for i in range(len(flat))]
    cells = "".join(
        f"<tr><th>{html.escape(str(n))}</th><td>{v:.4g}</td></tr>"
        for n, v in zip(names[:12], flat[:12])
    )
    more = f'<tr><td colspan="2">… {len(flat) - 12} more</td></tr>' if len(flat) > 12 else ""
    return f'<table class="feat">{cells}{more}</table>'


# ----------------------------------------------------------------------------- page parts


def _name(c: int | None, classes: Sequence[str] | None) -> str:
    if c is None:
        return "-"
    return str(classes[c]) if classes is not None and 0 <= c < len(classes) else str(c)


def _pct(v: float | None) -> str:
    return "-" if v is None or v != v else f"{100 * v:.2f}"


def _accuracy_table(acc: Mapping[str, Mapping[str, float]]) -> str:
    cols: list[str] = []
    for row in acc.values():
        cols += [c for c in row if c not in cols]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for name, row in acc.items():
        cls = ' class="main"' if name == "repaired" else ""
        cells = "".join(f"<td>{_pct(row.get(c))}</td>" for c in cols)
        body.append(f"<tr{cls}><th>{html.escape(name)}</th>{cells}</tr>")
    return (
        f'<table class="acc"><thead><tr><th>model</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def score_histogram_svg(
    scores: np.ndarray, selected: np.ndarray | None = None, bins: int = 60, width: int = 640
) -> str:
    """An inline SVG histogram of the cause scores (log-count bars), the selected causes in red.

    Each bin shows all its examples (grey) and, over them, those selected as causes (red).
    The causes are chosen by rank, then thinned by the label gate and the class guard, so a
    bin above the least harmful cause may hold unselected examples: no threshold line is
    drawn, since none separates selected from unselected.

    Args:
        scores: ``[N]`` cause scores (positive = harmful).
        selected: the selected training indices ``[K]`` (or ``None``: none marked).
        bins: number of bars; width: the picture's width in pixels.
    """
    s = np.asarray(scores, dtype=np.float64)
    lo, hi = np.percentile(s, [0.1, 99.9]) if s.size > 1000 else (s.min(), s.max())
    lo, hi = float(lo), float(hi)
    chosen = np.zeros(s.size, dtype=bool)
    if selected is not None and np.asarray(selected).size:
        chosen[np.asarray(selected, dtype=np.int64)] = True
        lo, hi = min(lo, float(s[chosen].min())), max(hi, float(s[chosen].max()))
    if hi <= lo:
        hi = lo + 1.0
    clipped = np.clip(s, lo, hi)
    counts, edges = np.histogram(clipped, bins=bins, range=(lo, hi))
    picked, _ = np.histogram(clipped[chosen], bins=bins, range=(lo, hi))
    height, pad_l, pad_b = 180, 40, 28
    w = (width - pad_l - 10) / bins
    top = np.log1p(counts.max()) if counts.max() else 1.0
    bars = []
    for i, (c, k) in enumerate(zip(counts, picked)):
        for n, cls in ((c, "bar"), (k, "bad")):
            if cls == "bad" and not n:
                continue
            h = (height - pad_b - 10) * np.log1p(n) / top
            what = f"{c} examples, {k} selected" if cls == "bar" else f"{k} selected"
            bars.append(
                f'<rect x="{pad_l + i * w:.1f}" y="{height - pad_b - h:.1f}" '
                f'width="{w * 0.9:.1f}" height="{h:.1f}" class="{cls}"><title>'
                f"{edges[i]:.3g} to {edges[i + 1]:.3g}: {what}</title></rect>"
            )

    def xpos(v: float) -> float:
        return pad_l + (v - lo) / (hi - lo) * (width - pad_l - 10)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="cause score histogram">',
        *bars,
        f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - 10}" y2="{height - pad_b}" '
        'class="axis"/>',
        f'<text x="{pad_l}" y="{height - 8}" class="lbl">{lo:.3g}</text>',
        f'<text x="{width - 10}" y="{height - 8}" class="lbl" text-anchor="end">{hi:.3g}</text>',
        '<text x="4" y="14" class="lbl">count (log)</text>',
        f'<text x="{width - 10}" y="14" class="lbl thrl" text-anchor="end">'
        f"red: the {int(chosen.sum())} selected causes</text>",
    ]
    if lo < 0 < hi:
        parts.append(
            f'<text x="{xpos(0):.1f}" y="{height - 8}" class="lbl" text-anchor="middle">0</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _pair_table(
    pairs: Counter[tuple[int, int]], classes: Sequence[str] | None, head: tuple[str, str, str]
) -> str:
    """The 10 most common ``(class, class)`` pairs of ``pairs`` as a table, ``head`` its
    column names (e.g. true class, predicted, failures)."""
    rows = "".join(
        f"<tr><th>{html.escape(_name(a, classes))}</th>"
        f"<td>{html.escape(_name(b, classes))}</td><td>{n}</td></tr>"
        for (a, b), n in pairs.most_common(10)
    )
    cols = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<table><thead><tr>{cols}</tr></thead><tbody>{rows}</tbody></table>"


def _classes_section(data: ReportData) -> str:
    y = data.train_y.cpu().numpy()
    cause_labels = Counter(int(c) for c in y[np.asarray(data.causes, dtype=np.int64)])
    total = Counter(int(c) for c in y)
    rows = "".join(
        f"<tr><th>{html.escape(_name(c, data.classes))}</th><td>{n}</td>"
        f"<td>{100 * n / total[c]:.2f}%</td></tr>"
        for c, n in cause_labels.most_common(10)
    )
    causes_tbl = (
        "<table><thead><tr><th>label of cause</th><th>causes</th><th>share of class</th></tr>"
        f"</thead><tbody>{rows}</tbody></table>"
    )
    conf = ""
    if data.pred_before is not None:
        pairs = Counter(
            (int(t), int(p))
            for t, p in zip(data.failures_y.cpu().numpy(), np.asarray(data.pred_before))
        )
        conf = _pair_table(pairs, data.classes, ("true class", "predicted", "failures"))
    moves = ""
    if data.suggested:
        tr = Counter((int(y[i]), int(s)) for i, s in data.suggested.items() if int(s) != int(y[i]))
        moves = _pair_table(tr, data.classes, ("label", "suggested", "causes")) if tr else ""
    return f'<div class="row">{causes_tbl}{conf}{moves}</div>'


def _failure_records(data: ReportData) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Per-failure records for the page's script, and the rendered inputs they refer to."""
    inputs: dict[str, str] = {}
    records = []
    y = data.train_y.cpu()
    ci = np.asarray(data.culprit_indices, dtype=np.int64)
    cs = np.asarray(data.culprit_scores, dtype=np.float64)
    causes = set(int(c) for c in np.asarray(data.causes).reshape(-1))
    for m in range(data.failures_X.shape[0]):
        key = f"f{m}"
        inputs[key] = _render(data.failures_X[m], data)
        culprits = []
        for j in range(ci.shape[1] if ci.ndim == 2 else 0):
            i = int(ci[m, j])
            tkey = f"t{i}"
            if tkey not in inputs:
                inputs[tkey] = _render(data.train_X[i], data)
            sug = data.suggested.get(i)
            culprits.append(
                {
                    "i": i,
                    "in": tkey,
                    "label": _name(int(y[i]), data.classes),
                    "suggested": None if sug is None else _name(int(sug), data.classes),
                    "score": float(cs[m, j]),
                    "selected": i in causes,
                }
            )
        records.append(
            {
                "name": data.failure_names[m] if data.failure_names is not None else str(m),
                "in": key,
                "label": _name(int(data.failures_y[m]), data.classes),
                "before": None
                if data.pred_before is None
                else _name(int(data.pred_before[m]), data.classes),
                "after": None
                if data.pred_after is None
                else _name(int(data.pred_after[m]), data.classes),
                "culprits": culprits,
            }
        )
    return records, inputs


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2433;
background:#f4f6fa}
header{background:#1d3557;color:#fff;padding:18px 28px}
header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.85;font-size:14px}
main{padding:12px 28px 40px;max-width:1200px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.1);
padding:14px 18px;margin:14px 0}
h2{font-size:17px;margin:0 0 10px;color:#1d3557}
table{border-collapse:collapse;font-size:13px;margin:4px 12px 8px 0}
th,td{padding:4px 10px;border-bottom:1px solid #e3e7ee;text-align:right}
th:first-child{text-align:left}
thead th{background:#eef2f8}
tr.main{background:#e6f4ea;font-weight:600}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.note{font-size:13px;color:#555;margin:4px 0}
svg .bar{fill:#7a9cc6}svg .bad{fill:#d1495b}svg .axis{stroke:#444}
svg .thr{stroke:#d1495b;stroke-width:2;stroke-dasharray:4 3}
svg .lbl{font-size:11px;fill:#333}svg .thrl{fill:#d1495b}
.failure{display:flex;gap:14px;border-bottom:1px solid #e3e7ee;padding:10px 0}
.card{width:128px;font-size:12px;text-align:center}
.card .meta{margin-top:3px;line-height:1.35}
.card.sel{outline:2px solid #d1495b;outline-offset:2px;border-radius:3px}
.fail{background:#fff7e6;border-radius:4px;padding:4px}
img.thumb{width:84px;height:84px;image-rendering:pixelated;border:1px solid #ccd;
object-fit:contain;background:#000}
.text{font-family:ui-monospace,monospace;font-size:11px;text-align:left;max-height:96px;
overflow:auto;background:#f7f7f7;padding:3px;border-radius:3px}
table.feat{font-size:11px;margin:0 auto}table.feat th,table.feat td{padding:1px 4px}
.ok{color:#1a7f37;font-weight:600}.wrong{color:#b42318;font-weight:600}
.sug{color:#8250df;font-weight:600}
.pager{display:flex;gap:8px;align-items:center;margin:6px 0}
.pager button{padding:4px 12px;border:1px solid #99a;border-radius:4px;background:#fff;
cursor:pointer}.pager button:disabled{opacity:.4;cursor:default}
.settings td{text-align:left;font-family:ui-monospace,monospace}
"""

_JS = """
(function(){
var D=JSON.parse(document.getElementById('nm-data').textContent);
var I=JSON.parse(document.getElementById('nm-inputs').textContent);
var page=0,size=D.page_size,pages=Math.max(1,Math.ceil(D.failures.length/size));
function esc(s){return String(s).replace(/[&<>"']/g,function(c){
return {'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c];});}
function card(html,meta,cls){return '<div class="card '+(cls||'')+'">'+html+
'<div class="meta">'+meta+'</div></div>';}
function show(){
var box=document.getElementById('failures'),out=[];
var a=page*size,b=Math.min(D.failures.length,a+size);
for(var m=a;m<b;m++){var f=D.failures[m];
var meta='failure '+esc(f.name)+'<br>true <b>'+esc(f.label)+'</b>';
if(f.before!==null)meta+='<br>said <span class="wrong">'+esc(f.before)+'</span>';
if(f.after!==null)meta+='<br>now <span class="'+(f.after===f.label?'ok':'wrong')+'">'+
esc(f.after)+'</span>';
var row=[card(I[f.in],meta,'fail')];
for(var j=0;j<f.culprits.length;j++){var c=f.culprits[j];
var cm='#'+c.i+' label '+esc(c.label);
if(c.suggested!==null&&c.suggested!==c.label)cm+='<br>→ <span class="sug">'+
esc(c.suggested)+'</span>';
cm+='<br>score '+c.score.toPrecision(3);
row.push(card(I[c.in],cm,c.selected?'sel':''));}
out.push('<div class="failure">'+row.join('')+'</div>');}
box.innerHTML=out.join('')||'<p class="note">no failures</p>';
document.getElementById('pageinfo').textContent='page '+(page+1)+' of '+pages+
' (failures '+(D.failures.length?a+1:0)+'-'+b+' of '+D.failures.length+')';
document.getElementById('prev').disabled=page===0;
document.getElementById('next').disabled=page>=pages-1;}
document.getElementById('prev').onclick=function(){if(page>0){page--;show();}};
document.getElementById('next').onclick=function(){if(page<pages-1){page++;show();}};
show();})();
"""


def _json_script(obj: Any) -> str:
    # "</" would end the <script> element early
    return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/")


def render(data: ReportData) -> str:
    """The report as one HTML string (see the module docstring for what it shows)."""
    scores = np.asarray(data.scores, dtype=np.float64)
    causes = np.asarray(data.causes, dtype=np.int64).reshape(-1)
    records, inputs = _failure_records(data)
    n, k = scores.size, causes.size
    notes = "".join(f'<p class="note">{html.escape(s)}</p>' for s in data.notes)
    settings = "".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(v))}</td></tr>"
        for key, v in data.settings.items()
    )
    summary = (
        f"{n} training examples scored, {k} selected as causes "
        f"({100 * k / max(n, 1):.2f}%); {len(records)} failures."
    )
    payload = {"page_size": PAGE_SIZE, "failures": records}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(data.title)}</title>
<style>{_CSS}</style></head>
<body>
<header><h1>{html.escape(data.title)}</h1><p>{html.escape(summary)}</p></header>
<main>
<section><h2>Accuracy before and after the repair, with controls (%)</h2>
{_accuracy_table(data.accuracies)}{notes}</section>
<section><h2>Cause scores (positive = harmful)</h2>
{score_histogram_svg(scores, causes)}
<p class="note">Each grey bar counts training examples by cause score r(z) = log
p(z|&theta;&#770;) &minus; log p(z|&theta;<sub>+F</sub>); the red bar over it counts those
selected as causes. They are chosen by rank, then thinned by the label gate and the class
guard (notes above), so high-scoring examples may stay unselected.</p></section>
<section><h2>Classes most involved</h2>{_classes_section(data)}</section>
<section><h2>Failures and their top culprits</h2>
<p class="note">Each row: a failure (yellow), then the training examples most to blame for it,
most harmful first. A red frame marks a selected cause; a purple arrow, the label a relabelling
treatment gave it.</p>
<div class="pager"><button id="prev" type="button">&larr; previous</button>
<span id="pageinfo"></span><button id="next" type="button">next &rarr;</button></div>
<div id="failures"></div></section>
<section><h2>Settings</h2><table class="settings"><tbody>{settings}</tbody></table></section>
</main>
<script type="application/json" id="nm-data">{_json_script(payload)}</script>
<script type="application/json" id="nm-inputs">{_json_script(inputs)}</script>
<script>{_JS}</script>
</body></html>
"""


def write_report(path: str | Path, data: ReportData) -> Path:
    """Write :func:`render`'s page to ``path`` atomically and return the path."""
    from netmend.store import write_text_atomic

    path = Path(path)
    write_text_atomic(path, render(data))
    return path


def culprit_table(per_failure: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each failure's ``n`` top culprits from per-failure scores ``[N, M]`` (positive = harmful).

    Returns:
        ``(indices [M, n], scores [M, n])``, most harmful first.
    """
    pf = np.asarray(per_failure, dtype=np.float64)
    n = min(n, pf.shape[0])
    if n <= 0:
        raise ValueError(f"n must be at least 1; got {n}")
    top = np.stack([top_indices(pf[:, j], n) for j in range(pf.shape[1])])  # [M, n]
    return top, np.take_along_axis(pf.T, top, 1)


def verdict_notes(run: dict[str, Any], name: str) -> list[str]:
    """The Pareto verdict and the diagnosis gain of one run of the demo or the bench (their
    ``gain`` and ``verdict`` records), in a sentence; none without them."""
    g, v = run.get("gain"), run.get("verdict")
    if not g or not v:
        return []
    said = "passed" if v["passed"] else "failed: " + "; ".join(v["reasons"])
    return [
        f"Verdict for {name} (the Pareto criterion: more held-out failures fixed than random "
        f"K, test accuracy within {100 * TEST_TOLERANCE:.1f} points of the better of original "
        f"and finetune only, no class down {100 * MAX_CLASS_DROP:.0f} points): {said}. "
        "Diagnosis gain over random K: held-out failures "
        f"{100 * g['heldout_gain']:+.1f} ± {100 * g['heldout_gain_se']:.1f} points, test "
        f"{100 * g['test_gain']:+.2f} ± {100 * g['test_gain_se']:.2f} points (± the standard "
        "error over the random draws)."
    ]


def demo_report(result: dict[str, Any], artifacts: dict[str, Any], path: str | Path) -> Path:
    """The report of a ``netmend demo`` run (query failures, default pipeline's causes)."""
    from netmend.model.training import predict

    split, test = artifacts["split"], artifacts["test"]
    ident, train = artifacts["identification"], artifacts["train"]
    model = artifacts["model"]
    fx, fy = test.X[split.query], test.y[split.query]
    pred = predict(model, fx.to(next(model.parameters()).device)).numpy()
    idx, sc = culprit_table(artifacts["per_failure"], 5)
    acc: dict[str, dict[str, float]] = {}
    cols = {
        "test_acc": "test",
        "query_failure_acc": "query failures",
        "heldout_failure_acc": "held-out failures",
        "correct_acc": "originally correct",
    }
    for name, ref in result["references"].items():
        if name == "original":
            acc["original"] = {v: ref[k] for k, v in cols.items()}
    for r in result["runs"]:
        name = "repaired" if r["default"] else f"{r['identify']}/{r['treat']}"
        acc[name] = {v: r[k] for k, v in cols.items()}
        c = r.get("controls") if r["default"] else None
        if c is not None:  # the default's controls, next to it (the table's title says so)
            rows = {
                "control: finetune only": c.get("finetune_only"),
                f"control: random {c['k']} causes (mean of {c['random_k']['draws']} draws)": (
                    c["random_k"]
                ),
                f"control: {c['k']} random corrupted (oracle at K)": c.get("oracle_at_k"),
                f"control: the {c['k']} corrupted ranked highest (oracle ranked)": c.get(
                    "oracle_ranked"
                ),
                "control: oracle causes": c.get("oracle_causes"),
            }
            for label, fig in rows.items():
                if fig is not None:
                    acc[label] = {v: fig[k] for k, v in cols.items() if k in fig}
    for name, ref in result["references"].items():
        if name != "original":
            acc[name] = {v: ref[k] for k, v in cols.items()}
    d = result["data"]
    return write_report(
        path,
        ReportData(
            title="netmend demo: MNIST with flipped labels",
            kind="images",
            train_X=train.X,
            train_y=artifacts["noisy_labels"],
            failures_X=fx,
            failures_y=fy,
            scores=ident.scores,
            causes=ident.causes,
            culprit_indices=idx,
            culprit_scores=sc,
            accuracies=acc,
            pred_before=pred,
            failure_names=[f"test #{int(i)}" for i in split.query],
            settings={"seed": result["config"]["seed"], **d},
            notes=[
                "repaired = netmend.repair's default pipeline (ewc/finetune). Its controls are "
                "the same treatment call with only the causes changed: none removed (finetune "
                "only), K random training examples (mean of the draws) and the truly corrupted "
                "set (oracle causes). The other pipeline rows are research-only treatments, "
                "shown to measure why; retrain-clean retrains on the clean labels.",
                *[n for r in result["runs"] if r["default"] for n in verdict_notes(r, "repaired")],
            ],
        ),
    )


_BENCH_COLUMNS = {
    "test_acc": "test",
    "query_failure_acc": "query failures",
    "heldout_failure_acc": "held-out failures",
    "correct_acc": "originally correct",
}


def bench_report(
    result: Mapping[str, Any], artifacts: Mapping[str, Any], path: str | Path
) -> Path | None:
    """The report of one suite and seed of ``netmend bench`` (its first pipeline that ran
    and gives per-failure scores).

    Shows the culprits of that pipeline's identification, and the accuracies of every
    pipeline and reference of the suite that ran (rows), with the controls of the
    pipeline shown (finetune only, random K) when the bench measured them.

    Args:
        result: one entry of ``netmend.lab.bench.run(...)["results"]``.
        artifacts: that entry's artifacts (``run(..., on_result=...)``): ``model``, ``split``,
            ``data`` (the ``SuiteData``) and ``identifications`` (pipeline name -> its
            ``Identification``).
        path: where to write the page.

    Returns:
        The path written, or ``None`` when no pipeline of the suite ran with per-failure
        scores (no culprits to show).
    """
    from netmend.model.training import predict

    ok = [c for c in result["cells"] if c.get("status") == "ok"]
    idents = artifacts.get("identifications", {})
    shown, per_failure = None, None
    for c in ok:  # the first pipeline that ran and gives per-failure scores
        if c["kind"] == "pipeline" and c["pipeline"] in idents:
            try:
                per_failure = idents[c["pipeline"]].per_failure
            except ValueError:  # a method without per-failure scores: no culprits to show
                continue
            shown = c
            break
    if shown is None or per_failure is None:
        return None
    ident = idents[shown["pipeline"]]
    data, split, model = artifacts["data"], artifacts["split"], artifacts["model"]
    fx, fy = data.eval.X[split.query], data.eval.y[split.query]
    device = next(model.parameters()).device
    idx, sc = culprit_table(per_failure, 5)
    acc: dict[str, dict[str, float]] = {}
    for c in sorted(ok, key=lambda c: c["pipeline"] != "original"):
        name = c["pipeline"] + (" (shown)" if c is shown else "")
        acc[name] = {v: float(c[k]) for k, v in _BENCH_COLUMNS.items() if c.get(k) is not None}
    controls = shown.get("controls") or {}
    for label, key in (("finetune only", "finetune_only"), ("random K", "random_k")):
        row = controls.get(key) or {}
        vals = {v: float(row[k]) for k, v in _BENCH_COLUMNS.items() if row.get(k) is not None}
        if vals:
            acc[f"control of {shown['pipeline']}: {label}"] = vals
    return write_report(
        path,
        ReportData(
            title=f"netmend bench: {result['suite']} (seed {result['seed']})",
            kind="array",
            train_X=data.train.X,
            train_y=data.train.y,
            failures_X=fx,
            failures_y=fy,
            scores=ident.scores,
            causes=ident.causes,
            culprit_indices=idx,
            culprit_scores=sc,
            accuracies=acc,
            pred_before=predict(model, fx.to(device)).numpy(),
            failure_names=[f"eval #{int(i)}" for i in split.query],
            settings={
                "suite": result["suite"],
                "seed": result["seed"],
                "culprits shown": shown["pipeline"],
                **{k: v for k, v in result["data"].items() if k != "info"},
            },
            notes=[
                f"The culprits below are {shown['pipeline']}'s; every pipeline and reference "
                "of the suite is a row of the table. 'random K' removes as many random "
                "training examples with the same treatment (mean over the draws).",
                *verdict_notes(shown, shown["pipeline"]),
            ],
        ),
    )
