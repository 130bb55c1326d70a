"""The house rules, read from the imports themselves (stream/__init__.py says why they exist):

- ``model`` and ``state`` import nothing from ``stream`` and no Kafka client: the model is usable, testable
  and benchmarkable without Kafka;
- the product rooms of ``stream`` never import the developer tools or the measurement code, so a worker
  image never depends on them.
Every import counts, also those inside functions (lazy imports are still dependencies).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KAFKA_CLIENTS = ("faust", "aiokafka", "confluent_kafka", "kafka", "mode")
PRODUCT_ROOMS = ("pipeline", "worker", "online", "kafka", "observe")
DEV_ROOMS = ("stream.tools", "stream.lab")


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def sources(*rooms: str) -> list[Path]:
    files = [p for room in rooms for p in sorted((ROOT / room).rglob("*.py"))]
    assert files, rooms
    return files


def first_part_in(module: str, names: tuple[str, ...]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in names)


@pytest.mark.parametrize("path", sources("model", "state"), ids=lambda p: str(p.relative_to(ROOT)))
def test_model_and_state_know_nothing_of_the_stream(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path) if first_part_in(m, ("stream", *KAFKA_CLIENTS)))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("path", sources(*(f"stream/{room}" for room in PRODUCT_ROOMS))
                         + [ROOT / "stream/settings.py", ROOT / "stream/settings_sections.py"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_product_code_never_imports_tools_or_lab(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path) if first_part_in(m, DEV_ROOMS))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_rule_sees_a_violation(tmp_path: Path) -> None:
    """The reader itself works: a lazy import inside a function is found."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from stream.lab import bench\n    import faust.tables\n")
    found = imported_modules(sample)
    assert first_part_in("stream.lab.bench", DEV_ROOMS) and "stream.lab.bench" in found
    assert any(first_part_in(m, KAFKA_CLIENTS) for m in found)
