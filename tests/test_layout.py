"""The package's import graph has no cycles: every ``import``/``from ... import`` of a navdeploy module, at module
level or inside a function, is an edge; one under ``if TYPE_CHECKING:`` is not (it never runs). A cycle fails
the test with its modules named, so layers stay layers (optimize emits events, report listens, api wires them).

Only the module an import names is an edge: the packages Python initialises on the way (``navdeploy/__init__.py``
for ``import navdeploy.config``) are not, or every package re-exporting its submodules would be a cycle. An
explicit ``from navdeploy.serving import x`` inside ``navdeploy/serving/serve.py`` is one, and fails."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Optional

PACKAGE = "navdeploy"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def _module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (``pkg/__init__.py`` is ``pkg``)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: nested in functions, classes, try blocks; not under TYPE_CHECKING."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the else branch of `if TYPE_CHECKING:` does run
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve_relative(module: str, is_package: bool, node: ast.ImportFrom) -> Optional[str]:
    if node.level == 0:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the navdeploy modules it imports. ``from navdeploy.x import name`` is an edge to
    ``navdeploy.x.name`` when that is a module, else to ``navdeploy.x``."""
    modules = _module_names(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve_relative(name, path.name == "__init__.py", node)
                if base is None:
                    continue
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                while target and target not in modules and "." in target:  # `import navdeploy.x.attr` style
                    target = target.rpartition(".")[0]
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:  # recursion depth is bounded by the package's ~70 modules
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete loop through a component, for the failure message: a -> b -> ... -> a."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        nxt = next((n for n in sorted(graph[path[-1]]) if n in members and (n == start or n not in seen)), None)
        if nxt is None:  # a dead end inside the component: back up and try another branch
            dead = path.pop()
            members.discard(dead)
            if not path:
                return component
            continue
        path.append(nxt)
        if nxt == start:
            return path
        seen.add(nxt)


def test_the_import_graph_is_read():
    graph = import_graph()
    assert "navdeploy.optimize.run" in graph["navdeploy.api"]
    assert "navdeploy.serving.serve" in graph["navdeploy.serving"]  # a package's `from x import name`
    # The top package imports its public names on first use (importlib): only its version is imported with it, and
    # its `if TYPE_CHECKING:` imports, which never run, are no edges.
    assert graph["navdeploy"] == {"navdeploy._version"}
    assert "navdeploy.report.html" in graph["navdeploy.cli"]  # a function-level import counts


def test_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert _a_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles in navdeploy:\n" + "\n".join(
        f"  {' -> '.join(_a_cycle(graph, c))} (component: {', '.join(c)})" for c in found)


def test_optimize_imports_nothing_from_report():
    graph = import_graph()
    offenders = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith("navdeploy.optimize")
                       for t in targets if t == "navdeploy.report" or t.startswith("navdeploy.report."))
    assert not offenders, "navdeploy.optimize emits events and must not import the reporters: " + ", ".join(offenders)
