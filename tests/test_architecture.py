"""The library's import graph: no cycle anywhere, and no stage importing a later one (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "metaaligner"
LATER_STAGES = {  # a module under the first may not import any of the others
    "metaaligner.data": ("metaaligner.training", "metaaligner.serving", "metaaligner.evaluation",
                         "metaaligner.pipeline", "metaaligner.demo", "metaaligner.cli", "metaaligner.config"),
    "metaaligner.training": ("metaaligner.serving", "metaaligner.evaluation", "metaaligner.pipeline",
                             "metaaligner.demo", "metaaligner.cli"),
    "metaaligner.serving.engines": ("metaaligner.serving.corrector", "metaaligner.serving.app",
                                    "metaaligner.serving.batch"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that `name` imports anywhere in its file (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if state.get(root):
            continue
        stack, path = [(root, iter(sorted(graph[root])))], [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_library_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and graph["metaaligner.serving.corrector"]  # the walk sees the package
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_stage_imports_a_later_one():
    graph = import_graph()
    wrong = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                   for stage, later in LATER_STAGES.items()
                   if (a == stage or a.startswith(stage + ".")) and b.startswith(later))
    assert not wrong, "imports against the pipeline order:\n" + "\n".join(wrong)


def test_data_top_level_stays_small():
    entries = [p.name for p in (PACKAGE / "data").iterdir() if p.name != "__pycache__"]
    assert len(entries) <= 8, sorted(entries)
