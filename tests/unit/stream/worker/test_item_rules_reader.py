"""The item-rules reader's handling of one record (the Kafka side runs in tests/integration/test_worker_rules.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from stream.observe.metrics import Metrics
from stream.pipeline.rules import Catalogue, ItemRule
from stream.settings import Settings
from stream.worker.item_rules import ItemRulesReader


def test_records_are_applied_and_bad_ones_counted_without_losing_the_old_rule() -> None:
    metrics = Metrics.create(CollectorRegistry())
    catalogue = Catalogue()
    reader = ItemRulesReader(Settings(), "item-rules", catalogue, metrics)
    assert reader.apply(b"i1", b'{"available": false, "category": "shoes"}')
    assert not reader.apply(b"i1", b'{"available": "no"}')
    assert not reader.apply(None, b"{}")
    assert not reader.apply(b"\xff", b"{}")
    assert catalogue.view().rules == {"i1": ItemRule(False, False, "shoes")}
    assert metrics.item_rules_rejected._value.get() == 3 and metrics.item_rules._value.get() == 1
    assert reader.apply(b"i1", None) and len(catalogue) == 0
    reader.stop()  # never started: nothing to wait for
