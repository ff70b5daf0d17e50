"""The package's layout rules (DESIGN.md): one room per concern, arrows pointing down.

Checked on the source: no import circles, the flow package imports nothing above it, the guide
imports no diagnostics, and no module takes another module's private names.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "pyroflows"
# On-demand views: a result object may import its ArviZ conversion when asked for it
# (ArviZ takes a second to import), although the conversion module imports the result's.
LAZY_VIEWS = {("pyroflows.diagnostics", "pyroflows.arviz")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """``(imported module, names, lazy)`` for every import of a pyroflows module in ``path``."""
    tree = ast.parse(path.read_text())
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    )
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("pyroflows"):
                names = [a.name for a in node.names]
                # "from . import x" imports the submodule x
                if node.module is None:
                    for name in names:
                        yield f"{target}.{name}", [], id(node) not in top_level
                else:
                    yield target, names, id(node) not in top_level


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def edges(include_lazy: bool):
    graph = {}
    for name, path in MODULES.items():
        for target, _, lazy in imports(path):
            if target in MODULES and target != name and (include_lazy or not lazy):
                if (name, target) in LAZY_VIEWS and lazy:
                    continue
                graph.setdefault(name, set()).add(target)
    return graph


def find_cycle(graph):
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                return [*stack, node, nxt]
            if nxt not in state:
                found = visit(nxt, [*stack, node])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in list(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


@pytest.mark.parametrize("include_lazy", [False, True])
def test_no_import_circles(include_lazy):
    # Lazy (function-level) imports count too: a circle through them is still a circle.
    assert find_cycle(edges(include_lazy)) is None


def test_the_flow_package_imports_nothing_above_it():
    for name, path in MODULES.items():
        if name.startswith("pyroflows.transforms"):
            for target, _, _ in imports(path):
                assert target.startswith("pyroflows.transforms"), (name, target)


def test_the_guide_imports_no_diagnostics_fitting_or_arviz():
    reachable, todo = set(), ["pyroflows.guides"]
    graph = edges(include_lazy=True)
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in reachable:
                reachable.add(nxt)
                todo.append(nxt)
    upper = {"pyroflows.diagnostics", "pyroflows.fit", "pyroflows.arviz", "pyroflows.draws"}
    assert not reachable & upper


def test_no_module_takes_another_modules_private_names():
    for name, path in MODULES.items():
        for target, names, _ in imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{name} imports {private} from {target}"
        tree = ast.parse(path.read_text())
        imported_modules = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module is None and node.level
            for alias in node.names
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in imported_modules
                and node.attr.startswith("_")
            ):
                pytest.fail(f"{name} uses {node.value.id}.{node.attr}")


def test_no_module_is_much_over_400_lines():
    # One room per concern keeps files small: AutoFlowGuide is assembled from mixins, each in
    # its own module (guide_posterior, guide_summaries, guide_state, local_guide).
    for name, path in MODULES.items():
        assert len(path.read_text().splitlines()) <= 400, name
