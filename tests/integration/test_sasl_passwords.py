"""SASL PLAIN and SCRAM against a real Apache Kafka broker: the embedded broker's SASL listener
(stream/kafka/broker_sasl.py; PLAIN's user in the listener's JAAS line, SCRAM users stored in the cluster
through the admin API at the session's start) and gruflow's clients configured only through settings, as an
operator would (GRUFLOW_SECURITY_PROTOCOL=SASL_PLAINTEXT, GRUFLOW_SASL_MECHANISM, GRUFLOW_SASL_USERNAME,
GRUFLOW_SASL_PASSWORD):

- librdkafka (confluent-kafka): admin (topic creation), producer and group-less consumer, per mechanism;
- aiokafka with the configuration gruflow derives (``aiokafka_config``): producer and a group consumer;
- a whole worker (faust's consumer with its SASL credentials, gruflow's producers) over SCRAM-SHA-512 only.

Controls: the listener refuses a wrong password for each mechanism, so the passes above mean the broker
checked what gruflow's clients sent.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from stream.kafka.topics import ensure_topics
from workerkit import TopicReader, WorkerProc, make_events, produce, save_tiny_model

pytestmark = pytest.mark.integration

MECHANISMS = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_librdkafka_clients_authenticate_with_a_password(kafka, mechanism: str) -> None:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer
    from confluent_kafka.admin import AdminClient

    from stream.kafka.config import admin_config, assign_whole_topic, consumer_config, producer_config

    settings = kafka.password_settings(mechanism, partitions=2)
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

    # control: the same listener refuses the same user with a wrong password
    wrong = {**admin_config(settings), "sasl.password": "not-the-password"}
    with pytest.raises(KafkaException):
        AdminClient(wrong).list_topics(timeout=5)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_aiokafka_clients_authenticate_with_a_password(kafka, mechanism: str) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.errors import KafkaError

    from stream.kafka.config import aiokafka_config

    settings = kafka.password_settings(mechanism, partitions=2)
    names = ensure_topics(settings)
    config = aiokafka_config(settings)
    assert (config["sasl_mechanism"], config["security_protocol"]) == (mechanism, "SASL_PLAINTEXT")

    async def send(values: list[bytes], **changes: str) -> BaseException | None:
        producer = AIOKafkaProducer(**{**config, **changes, "request_timeout_ms": 5000})
        try:
            await asyncio.wait_for(producer.start(), 30)
            for value in values:
                await asyncio.wait_for(producer.send_and_wait(names.dlq, value, key=b"k"), 20)
            return None
        except (KafkaError, asyncio.TimeoutError) as exc:
            return exc
        finally:
            await producer.stop()

    async def read(last: bytes) -> list[bytes]:
        consumer = AIOKafkaConsumer(names.dlq, group_id=f"{settings.process.app_id}-read",
                                    auto_offset_reset="earliest", **config)
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

    sent = [f"a{n}".encode() for n in range(5)]
    assert asyncio.run(send(sent)) is None
    assert sorted(asyncio.run(read(sent[-1]))) == sent
    # control: a wrong password is refused
    assert asyncio.run(send([b"never"], sasl_plain_password="not-the-password")) is not None


def test_a_worker_answers_over_scram_only(kafka, tmp_path: Path) -> None:
    settings = kafka.password_settings("SCRAM-SHA-512", partitions=2, top_k=5)
    ensure_topics(settings)
    model = save_tiny_model(tmp_path / "tiny.gfc")
    events = make_events(n_users=5, per_user=3, seed=19)
    reader = TopicReader(settings, settings.topic("recommendations"))
    try:
        with WorkerProc(kafka, settings, model, tmp_path, name="scram") as worker:
            assert worker.env["GRUFLOW_BOOTSTRAP_SERVERS"] == kafka.sasl_servers
            assert worker.env["GRUFLOW_SASL_MECHANISM"] == "SCRAM-SHA-512"
            produce(settings, events)
            got = reader.poll_until(lambda c: {(e.user, e.ts) for e in events} <= set(c.answered()), 90,
                                    "an answer to every event")
            assert worker.metric("gruflow_events_in_total") == len(events)
            assert worker.get("/readyz")[0] == 200
    finally:
        reader.close()
    assert {(e.user, e.ts) for e in events} <= set(got.answered())
