"""The code's shape, checked: dependencies point one way, modules and functions stay small.

Layers, lowest first: errors -> files/progress -> model -> data -> runtime -> passes, export ->
recover, generate, toolchain, deploy, reports, optimize -> api -> cli. A module may import its own package
and anything in a lower layer, never a higher one or a sibling of its own layer, including
imports inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "layerfuse"
LAYERS = {
    "errors": 0,
    "files": 1,
    "progress": 1,
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


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _part(path: Path) -> str | None:
    relative = path.relative_to(PACKAGE).parts
    return (
        None
        if len(relative) == 1 and relative[0] in ("__init__.py", "__main__.py")
        else (relative[0].removesuffix(".py"))
    )


def _imported_parts(tree: ast.AST) -> set[str]:
    parts = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            pieces = name.split(".")
            if pieces[0] == "layerfuse" and len(pieces) > 1:
                parts.add(pieces[1])
    return parts


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
        for target in _imported_parts(tree)
        if target != part and target in LAYERS and LAYERS[target] >= LAYERS[part]
    )
    assert not wrong, f"layerfuse.{part} (layer {LAYERS[part]}) imports {wrong}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path.name} is over {MAX_MODULE_LINES}"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{node.name} has {length} lines"
