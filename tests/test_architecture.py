"""The package's layers: no import circle, and no lower layer importing a higher one.

The order is written once, here (and explained in docs/architecture.md). A module may import
modules of its own layer or of any layer below it; the graph is built from the source with
``ast`` (imports inside functions count too: a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: list[tuple[str, ...]] = [
    ("netmend._version", "netmend._registry", "netmend._warnings"),
    ("netmend.store",),  # named tensors and settings on disk; knows no method
    ("netmend.data",),  # input checks, streaming in chunks
    ("netmend.model",),  # functional view of the user's model, its checks, training
    ("netmend.curvature",),  # diagonal Fisher, KFAC/EK-FAC, solvers
    ("netmend.identification",),  # cause scores, selection
    ("netmend.treatment",),  # repaired copies
    ("netmend.evaluation",),  # failure split, accuracies, controls
    ("netmend.api", "netmend.continual"),  # identify / treat / evaluate / repair; Repairer
    ("netmend.report",),  # plots and reports
    ("netmend.lab",),  # experiment kit: data sets, corruptions, demo, bench, validation
    ("netmend.cli", "netmend.repair_cli", "netmend"),  # the command line and the front door
]


def _modules() -> dict[str, Path]:
    out = {}
    for f in (SRC / "netmend").rglob("*.py"):
        parts = f.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _layer(module: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")
    return best


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg
                for _ in range(max(node.level - 1, 0)):
                    base = base.rsplit(".", 1)[0]
                target = (
                    (base + ("." + node.module if node.module else ""))
                    if node.level
                    else (node.module or "")
                )
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                found = subs or ([target] if target in mods else [])
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names if a.name in mods]
            else:
                continue
            graph[m] |= {t for t in found if t != m and not m.startswith(t + ".")}
    return graph


def test_every_module_has_a_layer():
    for m in _modules():
        _layer(m)


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, targets in graph.items()
        for t in sorted(targets)
        if _layer(t) > _layer(m)
    ]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                cycles.append(stack[stack.index(w) :] + [w])
            elif w not in state:
                visit(w)
        stack.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v)
    return cycles


def test_no_module_imports_a_higher_layer():
    bad = _upward(_graph())
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_circle():
    cycles = _cycles(_graph())
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_catch_the_old_circle():
    """0.2's circle (cache -> identification.base -> curvature -> functional -> cache) is caught
    by both checks, so that they can fail."""
    old = {
        "netmend.store": {"netmend.identification.base"},
        "netmend.identification.base": {"netmend.curvature.fisher"},
        "netmend.curvature.fisher": {"netmend.model.functional"},
        "netmend.model.functional": {"netmend.store"},
    }
    assert _upward(old) == ["netmend.store (layer 1) imports netmend.identification.base (layer 5)"]
    assert _cycles(old) == [
        [
            "netmend.curvature.fisher",
            "netmend.model.functional",
            "netmend.store",
            "netmend.identification.base",
            "netmend.curvature.fisher",
        ]
    ]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_registries_reserve_the_calls_own_keywords():
    """An option named like an argument of identify/treat (k, seed) could never reach its
    method; the registries refuse such options, from these lists, kept to the signatures."""
    import inspect

    from netmend import api
    from netmend.identification.base import IDENTIFY_ARGUMENTS
    from netmend.treatment.base import TREAT_ARGUMENTS

    for fn, names in ((api.identify, IDENTIFY_ARGUMENTS), (api.treat, TREAT_ARGUMENTS)):
        params = inspect.signature(fn).parameters.values()
        assert names == {p.name for p in params if p.kind != p.VAR_KEYWORD}
