"""Imports inside minicaffe run downhill: no module imports one that (indirectly) imports it back.

Function-level imports count too: a lazy import only hides a circle, it does not remove it.
The package `__init__` modules are left out, since every module's package is imported first.
"""
import ast
from pathlib import Path

import minicaffe

ROOT = Path(minicaffe.__file__).parent


def _module_name(path):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path, name, is_package):
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            found.add(target)
            # `from . import x` imports the module x when there is one.
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def import_graph():
    modules = {}
    for path in ROOT.rglob("*.py"):
        name = _module_name(path)
        modules[name] = (path, path.name == "__init__.py")
    graph = {}
    for name, (path, is_package) in modules.items():
        if is_package:
            continue
        graph[name] = {m for m in _imports(path, name, is_package)
                       if m in modules and m != name and not modules[m][1]}
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "minicaffe.layer" in graph and "minicaffe.net" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
