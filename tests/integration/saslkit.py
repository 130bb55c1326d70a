"""What the SASL tests do with each mechanism's client settings: a librdkafka round trip (admin, producer,
group-less consumer), an aiokafka producer and group consumer, and a whole worker answering events over the
SASL listener alone. The tests differ only in the settings and in their controls (what must be refused)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from stream.kafka.topics import ensure_topics
from workerkit import TopicReader, WorkerProc, make_events, produce, save_tiny_model


def librdkafka_round_trip(settings: Any, kafka: Any) -> None:
    """Topics created by the admin client, 10 records produced and read back, all through ``settings``."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer
    from confluent_kafka.admin import AdminClient

    from stream.kafka.config import admin_config, assign_whole_topic, consumer_config, producer_config

    assert settings.connection.bootstrap_servers == kafka.sasl_servers != kafka.bootstrap_servers
    names = ensure_topics(settings)  # the admin client, over SASL
    assert names.recommendations in AdminClient(admin_config(settings)).list_topics(timeout=15).topics
    p = Producer(producer_config(settings))
    for n in range(10):
        p.produce(names.recommendations, f"v{n}".encode(), f"k{n}".encode())
    assert p.flush(30) == 0
    c = Consumer(consumer_config(settings, group_id=None))
    try:
        assign_whole_topic(c, names.recommendations, OFFSET_BEGINNING)
        got: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(got) < 10 and time.monotonic() < deadline:
            got += [m.value() for m in c.consume(100, 0.5) if m.error() is None]
    finally:
        c.close()
    assert sorted(got) == sorted(f"v{n}".encode() for n in range(10))


def aiokafka_send(config: dict[str, Any], topic: str, values: list[bytes], **changes: Any) -> BaseException | None:
    """``values`` sent by an aiokafka producer built from ``config`` with ``changes``; the error, if any."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    async def send() -> BaseException | None:
        producer = AIOKafkaProducer(**{**config, **changes, "request_timeout_ms": 5000})
        try:
            await asyncio.wait_for(producer.start(), 30)
            for value in values:
                await asyncio.wait_for(producer.send_and_wait(topic, value, key=b"k"), 20)
            return None
        except (KafkaError, asyncio.TimeoutError) as exc:
            return exc
        finally:
            await producer.stop()

    return asyncio.run(send())


def aiokafka_read(config: dict[str, Any], topic: str, group_id: str, last: bytes) -> list[bytes]:
    """The topic from the beginning, in consumer group ``group_id``, up to the record ``last``."""
    from aiokafka import AIOKafkaConsumer

    async def read() -> list[bytes]:
        consumer = AIOKafkaConsumer(topic, group_id=group_id, auto_offset_reset="earliest", **config)
        await consumer.start()
        got: list[bytes] = []
        try:
            deadline = time.monotonic() + 30
            while last not in got and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    got += [r.value for r in records]
        finally:
            await consumer.stop()
        return got

    return asyncio.run(read())


def worker_answers_over_sasl(kafka: Any, settings: Any, tmp_path: Path, name: str, seed: int) -> None:
    """A worker configured by ``settings`` (a client of the SASL listener) answers every event it is sent."""
    ensure_topics(settings)
    model = save_tiny_model(tmp_path / "tiny.gfc")
    events = make_events(n_users=5, per_user=3, seed=seed)
    reader = TopicReader(settings, settings.topic("recommendations"))
    try:
        with WorkerProc(kafka, settings, model, tmp_path, name=name) as worker:
            assert worker.env["GRUFLOW_BOOTSTRAP_SERVERS"] == kafka.sasl_servers
            assert worker.env["GRUFLOW_SASL_MECHANISM"] == settings.connection.sasl_mechanism
            produce(settings, events)
            got = reader.poll_until(lambda c: {(e.user, e.ts) for e in events} <= set(c.answered()), 90,
                                    "an answer to every event")
            assert worker.metric("gruflow_events_in_total") == len(events)
            assert worker.get("/readyz")[0] == 200
    finally:
        reader.close()
    assert {(e.user, e.ts) for e in events} <= set(got.answered())
