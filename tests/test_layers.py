"""The package layers of diffin_core: no import cycle, no import from a lower layer up.

Layer order, low to high (a module may import its own package and any lower one, lazy
imports inside functions included):

    errors < engine < project < methods < run < tasks < workspace < cli, diffin_core (facade)

The walk reads the source with ``ast`` only (no import is executed).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "diffin_core"
LAYERS = ["errors", "engine", "project", "methods", "run", "tasks", "workspace", "cli"]
FACADE = "diffin_core"          # the package's own __init__: lazy re-exports for users


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the diffin_core modules it imports (every import statement, lazy ones too)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in files else mod for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                # the deepest diffin_core module the import names
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def layer_of(module: str) -> int:
    if module == FACADE:
        return len(LAYERS)
    return LAYERS.index(module.split(".")[1])


def violations(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import of a higher layer, a package's __init__ excepted for its own
    modules (it is the package's front)."""
    bad = []
    for a, targets in graph.items():
        for b in targets:
            if b.startswith(a + ".") or b == FACADE:
                continue
            if layer_of(b) > layer_of(a):
                bad.append(f"{a} -> {b} ({LAYERS[layer_of(a)] if a != FACADE else a} imports the higher layer "
                           f"{LAYERS[layer_of(b)]})")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w.startswith(v + "."):       # a package's __init__ importing its own modules
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_sits_in_a_known_layer():
    graph = import_graph(ROOT)
    unknown = [m for m in graph if m != FACADE and m.split(".")[1] not in LAYERS]
    assert unknown == [], f"modules outside the layers {LAYERS}: {unknown}"


def test_no_upward_import():
    assert violations(import_graph(ROOT)) == []


def test_no_import_cycle():
    assert cycles(import_graph(ROOT)) == []


@pytest.fixture
def tiny_tree(tmp_path):
    """A copy of the layout's shape: engine/propagate.py, run/scoring.py, errors.py."""
    root = tmp_path / "diffin_core"
    for pkg in ("engine", "run"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "__init__.py").write_text("from diffin_core.errors import E\n")
    (root / "errors.py").write_text("class E(Exception):\n    pass\n")
    (root / "engine" / "propagate.py").write_text("from diffin_core.errors import E\n")
    (root / "run" / "scoring.py").write_text("from diffin_core.engine.propagate import E\n")
    return root


def test_the_check_catches_a_deliberate_upward_import(tiny_tree):
    assert violations(import_graph(tiny_tree)) == []
    (tiny_tree / "engine" / "propagate.py").write_text(
        "from diffin_core.errors import E\n\ndef f():\n    from ..run import scoring  # lazy, still upward\n")
    assert violations(import_graph(tiny_tree)) == [
        "diffin_core.engine.propagate -> diffin_core.run.scoring (engine imports the higher layer run)"]


def test_the_check_catches_a_cycle_inside_one_package(tiny_tree):
    (tiny_tree / "run" / "features.py").write_text("from diffin_core.run import scoring\n")
    assert cycles(import_graph(tiny_tree)) == []
    (tiny_tree / "run" / "scoring.py").write_text("def f():\n    from .features import x\n")
    assert cycles(import_graph(tiny_tree)) == [["diffin_core.run.features", "diffin_core.run.scoring"]]
