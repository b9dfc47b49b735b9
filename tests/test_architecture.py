"""The package's shape: no import cycle, no module reaching into another one's privates.

Both are read from the source (ast), so a new cycle or a new private access fails here
before it confuses a reader; docs/extending.md describes the layers these rules keep.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "ist_optim"


def _modules() -> dict[str, tuple[ast.Module, bool]]:
    """Module name -> (its tree, whether it is a package's ``__init__``)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if package else parts)
        out[name] = (ast.parse(path.read_text(), str(path)), package)
    return out


def _top_level_imports(tree: ast.Module) -> list[ast.ImportFrom | ast.Import]:
    """Imports run when the module is imported (not under ``if TYPE_CHECKING:``, not
    inside functions)."""
    found: list[ast.ImportFrom | ast.Import] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append(node)
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                    visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
    visit(tree.body)
    return found


def _targets(module: str, package: bool, node: ast.ImportFrom | ast.Import,
             known: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    if node.level:
        base = module.split(".") if package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module or ""
    names = {f"{origin}.{a.name}" for a in node.names}
    return ({n for n in names if n in known} | ({origin} if origin in known else set()))


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: set().union(*(_targets(name, pkg, node, known)
                                for node in _top_level_imports(tree))) - {name}
            for name, (tree, pkg) in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (as a path that returns to its start), or None.

    Example:
        >>> find_cycle({"a": {"b"}, "b": {"a"}}), find_cycle({"a": {"b"}, "b": set()})
        (['a', 'b', 'a'], None)
    """
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_the_package_modules():
    graph = import_graph()
    # a package's __init__ imports its modules, which import siblings through the package
    # path; only module-to-module edges count
    edges = {m: {t for t in targets if not _is_package(t)} for m, targets in graph.items()
             if not _is_package(m)}
    assert find_cycle(edges) is None


def _is_package(name: str) -> bool:
    return (ROOT.parent / Path(*name.split(".")) / "__init__.py").exists()


def test_config_is_a_leaf():
    """Importing ISTConfig loads no other part of the package but the name registry and
    the way an option is declared (ist_optim.options), which import nothing of it."""
    assert import_graph()["ist_optim.config"] <= {"ist_optim.registry", "ist_optim.options"}
    assert import_graph()["ist_optim.registry"] == set()
    assert import_graph()["ist_optim.options"] == set()


def _private_uses(modules: dict[str, tuple[ast.Module, bool]]) -> list[str]:
    owners: dict[str, set[str]] = collections.defaultdict(set)  # self._x -> modules
    for name, (tree, _pkg) in modules.items():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "self" and _private(node.attr)):
                owners[node.attr].add(name)
    found = []
    for name, (tree, _pkg) in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    continue
                if owners.get(node.attr) and name not in owners[node.attr]:
                    found.append(f"{name}:{node.lineno} .{node.attr} (of {owners[node.attr]})")
            if isinstance(node, ast.ImportFrom) and (
                    node.level or (node.module or "").startswith("ist_optim")):
                found += [f"{name}:{node.lineno} imports {a.name}" for a in node.names
                          if _private(a.name)]
    return found


def _private(attr: str) -> bool:
    return attr.startswith("_") and not attr.startswith("__")


def test_no_module_reaches_into_another_modules_privates():
    assert _private_uses(_modules()) == []


def test_the_private_check_would_see_a_violation():
    tree = ast.parse("class A:\n    def f(self):\n        self._secret = 1\n")
    other = ast.parse("from ist_optim.a import _helper\n\ndef g(a):\n    return a._secret\n")
    found = _private_uses({"ist_optim.a": (tree, False), "ist_optim.b": (other, False)})
    assert len(found) == 2 and "imports _helper" in found[0] and "._secret" in found[1]
