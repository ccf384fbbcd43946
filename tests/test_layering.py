"""The packages' import graph: alexray_core <- data_prep <- workers, and orchestrator on top.

Inside them the sub-packages are layered too: ``alexray_core.storage`` needs only
``alexray_core.errors``, and ``workers`` is cut by role, data <- models <- training <- tools, with no
module outside those four but ``__init__`` and ``__main__``. Nothing imports upwards, ``orchestrator`` and ``alexray_core`` never import torch at module level
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


WORKERS_LAYERS = ("data", "models", "training", "tools")  # each may import those before it, never after


def _workers_layer(module: str) -> int | None:
    parts = module.split(".")
    return WORKERS_LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in WORKERS_LAYERS else None


def test_workers_sub_packages_import_only_downwards():
    wrong = []
    for module, path in _modules().items():
        layer = _workers_layer(module)
        if not module.startswith("workers.") or layer is None:
            continue
        for name in _imports(module, path, top_level_only=False):
            other = _workers_layer(name) if name.startswith("workers.") else None
            if other is not None and other > layer:
                wrong.append(f"{module} imports {name}")
    assert not wrong, f"imports against data <- models <- training <- tools: {sorted(set(wrong))}"


def test_every_workers_module_lives_in_a_sub_package():
    loose = sorted(p.name for p in (ROOT / "workers").glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert not loose, f"modules of workers/ outside {WORKERS_LAYERS}: {loose}"
    packages = sorted(p.name for p in (ROOT / "workers").iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(WORKERS_LAYERS)


def test_storage_needs_nothing_of_alexray_core_but_its_errors():
    wrong = []
    for module, path in _modules().items():
        if module.startswith("alexray_core.storage"):
            for name in _imports(module, path, top_level_only=False):
                top = name.split(".")[0]
                if top in PACKAGES and not name.startswith(("alexray_core.storage", "alexray_core.errors")):
                    wrong.append(f"{module} imports {name}")
    assert not wrong, wrong


MAX_FUNCTION_LINES = 80


def long_functions(source: str) -> list[tuple[str, int]]:
    """(name, lines) of every function in ``source`` longer than MAX_FUNCTION_LINES, def line to last."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                found.append((node.name, lines))
    return found


def test_no_function_over_80_lines_outside_tests():
    assert long_functions("def f():\n" + "    x = 1\n" * 80) == [("f", 81)]  # the check itself
    assert long_functions("def f():\n" + "    x = 1\n" * 79) == []
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".venv", ".git", "build") or rel.parts[0].startswith("."):
            continue
        found += [f"{rel}:{name} ({lines} lines)" for name, lines in long_functions(path.read_text())]
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines: {found}"
