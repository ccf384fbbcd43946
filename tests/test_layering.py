"""The packages' import graph: alexray_core <- data_prep <- workers, and orchestrator on top.

Nothing imports upwards, ``orchestrator`` and ``alexray_core`` never import torch at module level
(submitting a job needs no torch), and no two modules import each other at module level (a cycle
hidden by an import inside a function counts too: every import statement is read).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("alexray_core", "data_prep", "workers", "orchestrator")
ALLOWED = {  # package -> the packages it may import
    "alexray_core": set(),
    "data_prep": {"alexray_core"},
    "workers": {"alexray_core", "data_prep"},
    "orchestrator": {"alexray_core", "data_prep", "workers"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(module: str, path: Path, top_level_only: bool) -> set[str]:
    """Modules ``module`` imports (absolute names); with ``top_level_only``, only statements run at import."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def package_graph() -> dict[str, set[str]]:
    graph = {p: set() for p in PACKAGES}
    for module, path in _modules().items():
        for name in _imports(module, path, top_level_only=False):
            top = name.split(".")[0]
            if top in PACKAGES and top != module.split(".")[0]:
                graph[module.split(".")[0]].add(top)
    return graph


def test_no_package_imports_upwards():
    graph = package_graph()
    wrong = {p: sorted(graph[p] - ALLOWED[p]) for p in PACKAGES if graph[p] - ALLOWED[p]}
    assert not wrong, f"imports against the layering: {wrong}"


def _cycles(edges: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected groups of more than one module (Kosaraju)."""
    order, seen = [], set()
    for start in edges:
        stack = [(start, iter(sorted(edges[start])))] if start not in seen else []
        seen.add(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                order.append(node)
                stack.pop()
            elif child not in seen:
                seen.add(child)
                stack.append((child, iter(sorted(edges[child]))))
    reverse = {m: {n for n in edges if m in edges[n]} for m in edges}
    groups, assigned = [], set()
    for start in reversed(order):
        if start in assigned:
            continue
        group, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node not in assigned:
                assigned.add(node)
                group.add(node)
                todo.extend(reverse[node] - assigned)
        if len(group) > 1:
            groups.append(tuple(sorted(group)))
    return sorted(groups)


def test_no_import_cycles_even_through_imports_inside_functions():
    modules = _modules()
    edges = {m: {n for n in _imports(m, p, top_level_only=False) if n in modules and n != m}
             for m, p in modules.items()}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]  # the check itself
    cycles = _cycles(edges)
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_submit_side_never_imports_torch_at_module_level():
    modules = _modules()
    for module, path in modules.items():
        if module.split(".")[0] in ("orchestrator", "alexray_core"):
            heavy = {n for n in _imports(module, path, top_level_only=True) if n.split(".")[0] in ("torch", "torchvision")}
            assert not heavy, f"{module} imports {heavy} at module level"
