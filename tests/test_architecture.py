"""The code's shape, checked: dependencies point one way, modules and functions stay small.

Layers, lowest first: errors -> files/progress -> model -> data -> runtime -> passes, export ->
recover, generate, toolchain, deploy, reports, optimize -> api -> cli. A module may import its
own package and anything in a lower layer, never a higher one or a sibling of its own layer,
including imports inside functions, ``from layerfuse import x`` and relative imports. The pass
packages (merge, prune, fuse, share_kv) share primitives through ``passes/`` modules, never
by importing each other. No two modules import each other, directly or in a ring, even
inside functions (``TYPE_CHECKING`` imports excepted). Tests and benchmarks keep the same
size limits as the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "layerfuse"
LAYERS = {
    "errors": 0,
    "files": 1,
    "progress": 1,
    "options": 1,
    "model": 2,
    "data": 3,
    "runtime": 4,
    "passes": 5,
    "export": 5,
    "recover": 6,
    "generate": 6,
    "toolchain": 6,
    "deploy": 6,
    "reports": 6,
    # Above recover and reports: a search recovers finalists and draws their figures.
    "optimize": 6.5,
    "api": 7,
    "cli": 8,
    "integrations": 8,
}
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 60
PASS_PACKAGES = ("merge", "prune", "fuse", "share_kv")


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _part(path: Path) -> str | None:
    relative = path.relative_to(PACKAGE).parts
    return (
        None
        if len(relative) == 1 and relative[0] in ("__init__.py", "__main__.py")
        else (relative[0].removesuffix(".py"))
    )


def _module_name(path: Path) -> str:
    parts = ["layerfuse", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, tree: ast.AST) -> set[str]:
    """Dotted names a module imports (``from a import b`` gives ``a`` and ``a.b``), relative
    imports resolved, ``if TYPE_CHECKING:`` blocks skipped."""
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("layerfuse.")}


def _imported_parts(path: Path, tree: ast.AST) -> set[str]:
    return {name.split(".")[1] for name in _imported_modules(path, tree)}


def test_every_part_has_a_layer():
    parts = {_part(path) for path in _modules()} - {None, "__init__"}
    assert parts <= set(LAYERS), sorted(parts - set(LAYERS))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    part = _part(path)
    if part is None:
        return
    tree = ast.parse(path.read_text())
    wrong = sorted(
        target
        for target in _imported_parts(path, tree)
        if target != part and target in LAYERS and LAYERS[target] >= LAYERS[part]
    )
    assert not wrong, f"layerfuse.{part} (layer {LAYERS[part]}) imports {wrong}"


def test_pass_packages_do_not_import_each_other():
    wrong = []
    for path in _modules():
        relative = path.relative_to(PACKAGE).parts
        if relative[0] != "passes" or relative[1] not in PASS_PACKAGES:
            continue
        for name in _imported_modules(path, ast.parse(path.read_text())):
            pieces = name.split(".")
            if len(pieces) > 2 and pieces[2] in PASS_PACKAGES and pieces[2] != relative[1]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not wrong, wrong


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in _modules()}
    return {
        name: {m for m in _imported_modules(path, ast.parse(path.read_text())) if m in modules}
        - {name}
        for name, path in modules.items()
    }


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One ring of imports, if any (iterative depth-first search)."""
    state: dict[str, int] = {}
    for root in sorted(graph):
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
            elif state.get(child) == 1:
                ring = [n for n, _ in stack]
                return [*ring[ring.index(child) :], child]
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_no_import_cycles():
    graph = _import_graph()
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_ring():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_through_the_package_root_are_seen(tmp_path):
    source = "from layerfuse import runtime\nfrom ..cli import main\n"
    path = PACKAGE / "passes" / "example.py"
    assert _imported_parts(path, ast.parse(source)) == {"runtime", "cli"}


def _all_sources() -> list[Path]:
    extra = [*sorted((ROOT / "tests").glob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py"))]
    return _modules() + extra


@pytest.mark.parametrize("path", _all_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_stay_small(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path.name} is over {MAX_MODULE_LINES}"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{node.name} has {length} lines"
