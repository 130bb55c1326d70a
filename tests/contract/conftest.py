"""Fixtures of the contract tests: the worker's faust app as ``build_app`` wires it, without a broker.

Building the app creates the faust App, its BatchConsumer (and consumer thread), the transaction manager
and producer, and the RocksDB table store, none of which connects to Kafka until started. So the tests
look at the real objects gruflow touches, against whatever faust/aiokafka/mode/prometheus_client the
interpreter has: the pinned ones in ``make test``, the newest ones in ``make contract``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

from contractkit import worker_settings

if TYPE_CHECKING:
    from stream.worker.app import Runtime


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "contract: pins a private attribute or hook of faust, aiokafka, mode or "
                                       "prometheus_client that gruflow relies on (docs/upgrading.md)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.contract)


def _runtime(data_dir: Path, guarantee: str) -> Iterator[Runtime]:
    # imported here: when a new release breaks the import, each test says so instead of the whole session
    from stream.worker.app import build_app
    from stream.observe.metrics import Metrics
    from stream.worker.model_holder import ModelHolder

    rt = build_app(worker_settings(data_dir, guarantee), ModelHolder(None), Metrics.create(),  # type: ignore[arg-type]
                   dead_letter_bytes=1024)
    try:
        yield rt
    finally:
        rt.pipeline.executor.shutdown(wait=False)
        store = rt.pipeline.store.table.data
        for db in list(getattr(store, "_dbs", {}).values()):
            db.close()


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    """The at-least-once worker app (faust's default guarantee)."""
    yield from _runtime(tmp_path, "at_least_once")


@pytest.fixture
def eos_runtime(tmp_path: Path) -> Iterator[Runtime]:
    """The exactly_once worker app: transactions, read_committed, TransactionalSink."""
    yield from _runtime(tmp_path, "exactly_once")

