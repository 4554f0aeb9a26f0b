"""The packages form layers: utils (bottom) <- dataset <- models <- scripts, benchmarks and tests,
and no file-level import cycle exists among the project's modules (imports inside functions
count too; only `if TYPE_CHECKING:` blocks are skipped)."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("utils", "dataset", "models")


def project_files() -> list[Path]:
    skip = {".venv", "log", "log_eval", "datasets", ".git", ".gpu_data"}  # .gpu_data: packed data, an old checkout
    return [p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts)]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Every project module `path` imports (absolute names), outside `if TYPE_CHECKING:` blocks.
    `from package import submodule` depends on the submodule, `from module import name` on the
    module."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                subs = {f"{child.module}.{a.name}" for a in child.names} & modules
                found.update(subs)
                if len(subs) < len(child.names):
                    found.add(child.module)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in project_files()}
    return {name: {m for m in imported_modules(path, set(modules)) if m in modules and m != name}
            for name, path in modules.items()}


def test_utils_is_the_bottom_layer_and_dataset_does_not_import_models():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("utils"):
            assert not {d for d in deps if d.split(".")[0] in ("models", "dataset")}, (name, deps)
        if name.startswith("dataset"):
            assert not {d for d in deps if d.startswith("models")}, (name, deps)


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path + [node, dep])
            if dep not in state:
                visit(dep, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert any(graph.values())  # the graph is not trivially empty
