"""The package graph of docs/architecture.md: imports flow one way and never in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stresnet", "pipelines", "cluster")
# package -> the packages of this repository it may import
ALLOWED = {"stresnet": set(), "pipelines": {"stresnet"}, "cluster": {"stresnet", "pipelines"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.AST, nodes=None) -> list[str]:
    """Absolute module names imported by ``nodes`` (default: every import in ``tree``)."""
    names = []
    for node in ast.walk(tree) if nodes is None else nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return [n for n in names if n.split(".")[0] in PACKAGES]


def sources() -> dict[str, ast.AST]:
    return {
        module_name(path): ast.parse(path.read_text(), str(path))
        for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
    }


def test_imports_flow_one_way():
    wrong = [
        f"{module} imports {name}"
        for module, tree in sources().items()
        for name in imports(tree)
        if name.split(".")[0] not in ALLOWED[module.split(".")[0]] | {module.split(".")[0]}
    ]
    assert not wrong, wrong


def test_no_module_imports_in_a_circle():
    trees = sources()
    # Module-level imports only: an import inside a function runs later, when every module is loaded.
    graph = {
        module: {name for name in imports(tree, getattr(tree, "body", [])) if name in trees} - {module}
        for module, tree in trees.items()
    }
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for name in sorted(graph[module]):
            if state.get(name) == "open":
                raise AssertionError(" -> ".join(trail[trail.index(name):] + [name]))
            if name not in state:
                visit(name, trail + [name])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
