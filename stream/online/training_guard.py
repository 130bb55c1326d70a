"""Kafka-side helpers of the training-path defences: sending a ``gruflow forget`` request to the control
topic, and the sample of flagged user ids (codecs: stream/pipeline/control.py).

Flagged user ids are personal data: they go to a topic of their own (``<prefix>flagged-users``,
readable under its own ACL), never to logs at INFO or to metric labels.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import orjson

from stream.pipeline.control import forget_request
from stream.settings import Settings

log = logging.getLogger("gruflow.trainer")
def send_forget(settings: Settings, user_id: str, timeout: float = 30.0) -> tuple[str, int]:
    """Write a forget request to the control topic (keyed like the inputs, so it reaches the worker that
    holds the user); returns (topic, partition) once the broker has it."""
    from confluent_kafka import KafkaException, Producer

    from stream.kafka.config import producer_config
    from stream.kafka.topics import TopicNames

    topic = TopicNames.from_settings(settings).control
    key, value = forget_request(user_id)
    done: list[Any] = []
    producer = Producer(producer_config(settings))
    producer.produce(topic, value, key, on_delivery=lambda err, msg: done.append((err, msg)))
    producer.flush(timeout)
    if not done or done[0][0] is not None:
        raise KafkaException(done[0][0] if done else "forget request not delivered within the timeout")
    return topic, done[0][1].partition()


class FlaggedSample:
    """Sends a sample (``flagged_sample_rate``) of newly flagged users to the flagged topic with the
    reason. Best effort: a delivery failure is logged without the id and never stops the trainer."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rate = float(settings.trainer.flagged_sample_rate)
        self._rng = random.Random(0)
        self._producer: Any = None
        self.sent = 0

    def offer(self, user_id: str, reason: str) -> None:
        if self.rate <= 0 or self._rng.random() >= self.rate:
            return
        if self._producer is None:
            from confluent_kafka import Producer

            from stream.kafka.config import producer_config

            self._producer = Producer(producer_config(self.settings))
        from stream.kafka.topics import TopicNames

        value = orjson.dumps({"user_id": user_id, "reason": reason, "flagged_at": int(time.time() * 1000)})
        try:
            self._producer.produce(TopicNames.from_settings(self.settings).flagged, value, user_id.encode("utf-8"),
                                   on_delivery=self._delivered)
            self._producer.poll(0)
        except (BufferError, Exception) as exc:  # noqa: BLE001 - a sample is best effort
            log.warning("flagged-user sample not sent: %s", type(exc).__name__)

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is None:
            self.sent += 1
        else:
            log.warning("flagged-user sample not delivered: %s", err.name() if hasattr(err, "name") else "error")

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)
            self._producer = None
