"""docs/real-architectures.md's result tables are what benchmarks/real_arch.py renders from its
JSON files: a stale or hand-edited number fails here."""

from __future__ import annotations

import copy
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def suites(mod: ModuleType) -> dict[str, dict]:
    return mod.stored()


def section(mod: ModuleType) -> str:
    text = mod.DOC_PATH.read_text()
    return text.split(mod.BEGIN, 1)[1].split(mod.END, 1)[0].lstrip("\n")


def test_doc_tables_are_rendered_from_the_json(bench_script) -> None:
    mod = bench_script("real_arch")
    data = suites(mod)
    assert data, "no benchmarks/real_arch_*.json"
    assert section(mod) == mod.render(data)


def test_a_changed_number_changes_the_tables(bench_script) -> None:
    mod = bench_script("real_arch")
    data = suites(mod)
    name = next(iter(data))
    edited = copy.deepcopy(data)
    ok = [c for c in edited[name]["cells"].values() if c.get("status") == "ok" and "test_acc" in c]
    ok[0]["test_acc"] = 0.1234
    assert mod.render(edited) != mod.render(data) and "0.123" in mod.render(edited)
