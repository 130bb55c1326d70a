"""The worker's reader of the compacted item-rules topic: every record, from the beginning, into a
``rules.Catalogue`` (latest rule per item id). Every worker reads the whole topic (all partitions, no
consumer group), so a rule reaches every list within a poll interval and needs no restart.

Record: key = item id (UTF-8), value = JSON ``{"available": bool, "deny": bool, "category": str|int}``
(fields optional) or null (tombstone: the item's rules are removed). A record that cannot be read is
logged with its reason and counted (``gruflow_item_rules_rejected_total``); the item keeps its previous
rule. Format and examples: docs/rules.md.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from stream.pipeline.rules import Catalogue, parse_item_rule
from stream.settings import Settings

log = logging.getLogger("gruflow.item_rules")
POLL_S = 0.2


class ItemRulesReader(threading.Thread):
    """Background thread: item-rules topic -> ``catalogue``. ``caught_up`` is set once the records that
    were on the topic when it started have been applied."""

    def __init__(self, settings: Settings, topic: str, catalogue: Catalogue, metrics: Any = None) -> None:
        super().__init__(name="gruflow-item-rules", daemon=True)
        self.settings, self.topic, self.catalogue, self.metrics = settings, topic, catalogue, metrics
        self.caught_up = threading.Event()
        self.applied = 0
        self._stop_reading = threading.Event()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop_reading.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError

        from stream.kafka.config import assign_whole_topic, consumer_config

        consumer = Consumer(consumer_config(self.settings, group_id=None, **{"enable.partition.eof": True}))
        try:
            while not self._stop_reading.is_set():
                try:
                    partitions = assign_whole_topic(consumer, self.topic, OFFSET_BEGINNING)
                    break
                except Exception as exc:  # noqa: BLE001 - topic not there yet, cluster away: try again
                    log.warning("cannot read %s yet (%s); retrying", self.topic, exc)
                    self._stop_reading.wait(2.0)
            else:
                return
            at_end: set[int] = set()
            while not self._stop_reading.is_set():
                for msg in consumer.consume(1000, POLL_S):
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            at_end.add(msg.partition())
                            if len(at_end) >= partitions:
                                self.caught_up.set()
                        else:
                            log.warning("item-rules reader: %s", err)
                        continue
                    self.apply(msg.key(), msg.value(), msg.offset())
        finally:
            consumer.close()

    def apply(self, key: bytes | None, value: bytes | None, offset: int = -1) -> bool:
        """One record into the catalogue; False (logged, counted) when it cannot be read."""
        try:
            if not key:
                raise ValueError("no key (the item id)")
            item_id = key.decode("utf-8")
            rule = parse_item_rule(value)
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("item-rules record at offset %d refused: %s", offset, exc)
            if self.metrics is not None:
                self.metrics.item_rules_rejected.inc()
            return False
        self.catalogue.apply(item_id, rule)
        self.applied += 1
        if self.metrics is not None:
            self.metrics.item_rules.set(len(self.catalogue))
        return True

