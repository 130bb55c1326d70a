"""Small pieces (STYLE.md, issue 22): in the product code (``model/``, ``state/``, ``stream/``) no module is
longer than ``MAX_FILE_LINES`` and no function than ``MAX_FUNCTION_LINES``, so each reads on one screen or
two. Every violation of a room is listed at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80
ROOMS = ("model", "state", "stream")


def _violations(path: Path) -> list[str]:
    text = path.read_text()
    name = str(path.relative_to(ROOT))
    out = [f"{name}: {n} lines" for n in [len(text.splitlines())] if n > MAX_FILE_LINES]
    out += [f"{name}: {node.name} has {node.end_lineno - node.lineno + 1} lines (line {node.lineno})"
            for node in ast.walk(ast.parse(text, filename=name))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    return out


@pytest.mark.parametrize("room", ROOMS)
def test_modules_and_functions_stay_small(room: str) -> None:
    files = sorted((ROOT / room).rglob("*.py"))
    assert files, room
    violations = [v for path in files for v in _violations(path)]
    assert violations == [], "\n".join(violations)
