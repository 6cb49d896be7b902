"""The package's layers, checked: every import (lazy ones inside functions included) points
downward or stays inside its own folder, and no modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fanout

ROOT = Path(fanout.__file__).parent

#: From the bottom up. A module may import from a lower layer, and from its own layer only
#: inside its own group (a folder, or the module itself).
LAYERS: list[dict[str, str]] = [
    {"fanout.errors": "errors", "fanout._flow": "flow", "fanout._logging": "logging"},
    {"fanout._engine": "engine"},
    {"fanout._limiter": "limiter", "fanout._exits": "exits", "fanout.payload": "payload",
     "fanout.outcome": "outcome", "fanout.auth": "auth"},
    {"fanout.channels": "channels", "fanout.events": "events"},  # events: hooks see Result
    {"fanout.client": "client"},
    {"fanout.teams": "teams", "fanout.liveactivity": "liveactivity",
     "fanout.metrics": "metrics"},
    {"fanout._bridge": "bridge"},
    {"fanout.asyncio": "asyncio", "fanout.sync": "sync"},
    {"fanout.config": "config"},
    {"fanout._daemon": "daemon", "fanout.testing": "testing"},
    {"fanout._serve": "serve"},
    {"fanout._cli": "cli"},
    {"fanout.__main__": "main", "fanout": "api"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _place(module: str) -> tuple[int, str]:
    """(layer, group) of a module: the longest prefix named in LAYERS."""
    best: tuple[int, str, int] | None = None
    for rank, layer in enumerate(LAYERS):
        for prefix, group in layer.items():
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[2]:
                    best = (rank, group, len(prefix))
    assert best is not None, f"{module} has no place in LAYERS"
    return best[0], best[1]


def _imports(path: Path, module: str) -> set[str]:
    """Every fanout module that ``module`` imports, resolved to a module (not a name)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "fanout")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fanout":
                continue
            for alias in node.names:  # `from . import framer` names a module
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    found.discard(module)
    return found


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
GRAPH = {m: _imports(p, m) for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_downward(module):
    rank, group = _place(module)
    wrong = []
    for target in sorted(GRAPH[module]):
        t_rank, t_group = _place(target)
        if t_rank > rank or (t_rank == rank and t_group != group):
            wrong.append(f"{target} (layer {t_rank}, {t_group})")
    assert not wrong, f"{module} (layer {rank}, {group}) imports upward or sideways: {wrong}"


def test_no_import_cycles():
    """Tarjan's strongly connected components over the whole import graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other in a circle: {cycles}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule can fail: an engine module importing the client is caught."""
    bad = tmp_path / "fanout" / "_engine" / "pool.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from ..client import Client\n")
    assert _imports(bad, "fanout._engine.pool") == {"fanout.client"}
    assert _place("fanout.client")[0] > _place("fanout._engine.pool")[0]
