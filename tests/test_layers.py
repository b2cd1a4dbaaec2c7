"""The package's import graph: every import of every module of src/maskconnect, at the top of a file and
inside functions (the lazy ones) alike, read from the source; it has no cycle, and no module imports a
higher layer (README, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "maskconnect"

# README "Layout": each layer may import the layers before it in this list, never one after it.
LAYERS = [
    {"defaults", "errors", "io", "specs", "provenance", "gpu_slot", "slurm"},
    {"connectivity", "mask_rules", "kernels", "data", "tracking"},
    {"models"},
    {"describe", "training"},
    {"experiments"},
    {"report", "preflight"},
    {"cli", "__main__"},
]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports anywhere in its file (resolved: ``from . import x`` of a
    submodule is that submodule; ``from .pkg import name`` is pkg, or pkg.name if that is a module)."""
    is_pkg = path.name == "__init__.py"
    base = name if is_pkg else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "maskconnect"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                parts = parts[: len(parts) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "maskconnect":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if sub in known else target)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_the_import_graph_has_no_cycle():
    g = graph()
    assert len(g) > 50 and g["maskconnect.models.masked"] >= {"maskconnect.kernels", "maskconnect.connectivity"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str):
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)


def _layer(module: str) -> int | None:
    top = module.split(".")[1] if module.count(".") else None
    return next((i for i, names in enumerate(LAYERS) if top in names), None)


def test_no_module_imports_a_higher_layer():
    g = graph()
    up = [(a, b) for a, targets in g.items() for b in targets
          if _layer(a) is not None and _layer(b) is not None and _layer(b) > _layer(a)]
    assert not up, up
    assert all(_layer(m) is not None for m in g if m.count(".")), [m for m in g if m.count(".") and _layer(m) is None]
