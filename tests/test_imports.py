"""The packages depend on each other in one direction only: a test that walks every import (module
level and inside functions alike) and fails on a cycle between packages, naming the import lines.

Nodes are fastvit's sub-packages (fastvit.train, fastvit.sweep, ...; fastvit.kernels is the repo's
kernels/ folder, fastvit.data_prep its data_prep/ folder) and fastvit's top-level modules
(fastvit.stage, ...). A module inside a package may import its own package freely."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"fastvit": "fastvit", "kernels": "fastvit.kernels", "data_prep": "fastvit.data_prep"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    base = FOLDERS[rel.parts[0]]
    parts = list(rel.with_suffix("").parts[1:])
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join([base, *parts])


def _node(module: str) -> str:
    """fastvit.train.loop -> fastvit.train; fastvit.stage -> fastvit.stage; fastvit -> fastvit."""
    parts = module.split(".")
    return ".".join(parts[:2])


def import_edges() -> dict[tuple[str, str], list[str]]:
    """{(from node, to node): ["file:line", ...]} over every fastvit import in the source tree."""
    edges: dict = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            mod = _module_name(path)
            is_init = path.name == "__init__.py"
            pkg = mod if is_init else mod.rpartition(".")[0]
            for n in ast.walk(ast.parse(path.read_text(), str(path))):
                targets = []
                if isinstance(n, ast.Import):
                    targets = [a.name for a in n.names]
                elif isinstance(n, ast.ImportFrom):
                    if n.level:
                        base = pkg.split(".")
                        base = base[:len(base) - (n.level - 1)]
                        full = ".".join(base + ([n.module] if n.module else []))
                    else:
                        full = n.module or ""
                    # `from fastvit import bnsl`: the names may be sub-modules
                    targets = [f"{full}.{a.name}" if full == "fastvit" else full for a in n.names]
                for t in targets:
                    if not t.startswith("fastvit"):
                        continue
                    src, dst = _node(mod), _node(t)
                    if src != dst and dst != "fastvit" and src != "fastvit":
                        edges.setdefault((src, dst), []).append(f"{path.relative_to(ROOT)}:{n.lineno}")
    return edges


def cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    graph: dict = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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


def test_no_import_cycle_between_packages():
    edges = import_edges()
    found = cycles(edges)
    detail = [f"{a} -> {b}: {', '.join(sites[:3])}" for comp in found for (a, b), sites in sorted(edges.items())
              if a in comp and b in comp]
    assert not found, "import cycles between packages:\n" + "\n".join(detail)


def test_the_walk_sees_the_known_directions():
    """The checker is not vacuous: it sees train -> models and sweep -> train, and finds a planted cycle."""
    edges = import_edges()
    assert ("fastvit.train", "fastvit.models") in edges
    assert ("fastvit.sweep", "fastvit.train") in edges
    assert cycles({**edges, ("fastvit.models", "fastvit.train"): ["planted"]})
