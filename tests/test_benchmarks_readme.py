"""benchmarks/README.md quotes measured figures (and README.md one headline table): the tables
are generated from the benchmark JSON by benchmarks/make_readme.py, so they cannot drift from
it or be edited by hand."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "benchmarks" / "README.md"
NUMBER = re.compile(r"(?<![\w.])[-+−]?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w.])")


def _numbers(obj: object) -> list[float]:
    """Every number stored in a JSON document (dict keys that are numbers included)."""
    out: list[float] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _numbers(k) + _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            out += _numbers(v)
    else:
        number = isinstance(obj, (int, float)) and not isinstance(obj, bool)
        text = isinstance(obj, str) and re.fullmatch(r"[-+]?\d+(\.\d+)?(e[-+]?\d+)?", obj.strip())
        if number or text:
            out.append(float(obj))  # type: ignore[arg-type]
    return out


def _appears(token: str, values: list[float]) -> bool:
    """``token`` (as printed, e.g. ``+0.238``, ``98.07``, ``1.2e-06``) is some JSON value, or
    100× one (percentages), rounded to the digits printed."""
    x = float(token.replace("−", "-"))
    if "e" in token:
        mant = token.split("e")[0]
        digits = len(mant.split(".")[1]) if "." in mant else 0
        tol = 0.5 * 10.0 ** (int(token.split("e")[1]) - digits)
    else:
        digits = len(token.split(".")[1]) if "." in token else 0
        tol = 0.5 * 10.0**-digits
    tol *= 1 + 1e-9
    return any(abs(s * v - x) <= tol for v in values for s in (1.0, 100.0))


def _cells(block: str) -> list[str]:
    """The numbers in a table's body cells, leaving out the header, the first (label) column
    and anything in backticks."""
    out = []
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")][1:]
        for c in cells:
            out += NUMBER.findall(re.sub(r"`[^`]*`", "", c))
    return out


@pytest.mark.parametrize("path", ["benchmarks/README.md", "README.md"])
def test_readme_tables_are_rendered_from_the_json(bench_script, path):
    mr = bench_script("make_readme")
    text = (ROOT / path).read_text()
    assert mr.MARKER.search(text), f"{path} has no generated table"
    assert mr.rewrite(text) == text, f"{path} is stale: run benchmarks/make_readme.py"


def test_every_table_is_generated(bench_script):
    text = bench_script("make_readme").MARKER.sub("", README.read_text())
    hand = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert not hand, f"a table typed by hand in benchmarks/README.md: {hand[:2]}"


def test_every_number_in_a_table_appears_in_the_json_it_cites(bench_script):
    mr = bench_script("make_readme")
    blocks = list(mr.MARKER.finditer(README.read_text()))
    assert len(blocks) >= 10
    blocks += list(mr.MARKER.finditer((ROOT / "README.md").read_text()))
    for m in blocks:
        values: list[float] = []
        for f in m["files"].split(", "):
            values += _numbers(json.loads((ROOT / f).read_text()))
        tokens = _cells(m["body"])
        assert tokens, m["name"]
        missing = [t for t in tokens if not _appears(t, values)]
        assert not missing, f"table {m['name']}: {missing[:5]} not in {m['files']}"


def test_a_hand_edited_number_is_caught(bench_script):
    mr = bench_script("make_readme")
    m = next(b for b in mr.MARKER.finditer(README.read_text()) if b["name"] == "peers_ratios")
    values = _numbers(json.loads((ROOT / "benchmarks/peers.json").read_text()))
    assert _appears("39.71", values)
    assert not _appears("62.33", values)  # the stale EK-FAC speed-up the README used to quote
    edited = README.read_text().replace("| 39.71 |", "| 62.33 |")
    assert edited != README.read_text()
    assert mr.rewrite(edited) != edited
    assert "62.33" not in _cells(m["body"])


@pytest.mark.parametrize("token", ["0.5", "+0.238", "98.07"])
def test_rounding_rule(token):
    assert _appears(token, [0.5, 0.23846, 0.98070001])
    assert not _appears(token, [0.7])
