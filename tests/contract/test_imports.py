"""The worker's modules import with these versions of the frameworks (the other modules import
the worker at collection): when a release removes a name faust or gruflow imports, this says which."""

from __future__ import annotations

import importlib

import pytest

# the framework modules gruflow imports from, then gruflow's modules that import them
MODULES = ("aiokafka", "aiokafka.partitioner", "mode", "prometheus_client", "rocksdict", "faust",
           "faust.transport.drivers.aiokafka", "faust.stores.rocksdb", "faust.types.tuples",
           "stream.observe.metrics", "stream.worker.table_store", "stream.worker.sinks", "stream.worker.batch_consumer", "stream.worker.app",
           "stream.worker.main")


@pytest.mark.parametrize("module", MODULES)
def test_module_imports(module: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - the finding is the message
        pytest.fail(f"import {module}: {type(exc).__name__}: {exc}", pytrace=False)
