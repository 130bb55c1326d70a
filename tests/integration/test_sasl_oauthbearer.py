"""SASL OAUTHBEARER against a real Apache Kafka broker: the embedded broker's OAUTHBEARER listener
(stream/kafka/broker_sasl.py: SASL_PLAINTEXT, Kafka's default unsecured JWS validator) and gruflow's clients
configured only through settings, as an operator would (GRUFLOW_SECURITY_PROTOCOL=SASL_PLAINTEXT,
GRUFLOW_SASL_MECHANISM=OAUTHBEARER, librdkafka's ``enable.sasl.oauthbearer.unsecure.jwt=true`` and
``sasl.oauthbearer.config=principal=...`` in GRUFLOW_LIBRDKAFKA_CONFIG):

- librdkafka (confluent-kafka): admin (topic creation), producer, group-less consumer;
- aiokafka, through the token provider gruflow builds from the same properties (passthrough.py): producer
  and a group consumer, as faust's consumer connects;
- a whole worker (faust's aiokafka consumer with ``OAuthCredentials``, gruflow's producers, the item-rules
  reader) answering events over that listener only.

Controls: the listener refuses a token that is not a JWT, and an expired one, so the passes above mean the
broker checked the tokens gruflow's clients sent.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from stream.kafka.passthrough import unsecured_jwt
from stream.kafka.topics import ensure_topics
from workerkit import TopicReader, WorkerProc, make_events, produce, save_tiny_model

pytestmark = pytest.mark.integration


def test_librdkafka_clients_authenticate_with_oauthbearer(kafka) -> None:
    from confluent_kafka import Consumer, KafkaException, Producer
    from confluent_kafka.admin import AdminClient

    from stream.kafka.config import admin_config, assign_whole_topic, consumer_config, producer_config

    settings = kafka.oauthbearer_settings(partitions=2)
    assert settings.connection.bootstrap_servers == kafka.sasl_servers != kafka.bootstrap_servers
    names = ensure_topics(settings)  # the admin client, over OAUTHBEARER
    assert names.recommendations in AdminClient(admin_config(settings)).list_topics(timeout=15).topics
    p = Producer(producer_config(settings))
    for n in range(10):
        p.produce(names.recommendations, f"v{n}".encode(), f"k{n}".encode())
    assert p.flush(30) == 0
    c = Consumer(consumer_config(settings, group_id=None))
    try:
        from confluent_kafka import OFFSET_BEGINNING

        assign_whole_topic(c, names.recommendations, OFFSET_BEGINNING)
        got: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(got) < 10 and time.monotonic() < deadline:
            got += [m.value() for m in c.consume(100, 0.5) if m.error() is None]
    finally:
        c.close()
    assert sorted(got) == sorted(f"v{n}".encode() for n in range(10))

    # control: the same listener refuses a token that is not a JWT
    refused = AdminClient({"bootstrap.servers": kafka.sasl_servers, "security.protocol": "SASL_PLAINTEXT",
                           "sasl.mechanism": "OAUTHBEARER", "oauth_cb": lambda _cfg: ("not-a-jwt", time.time() + 600)})
    with pytest.raises(KafkaException):
        refused.list_topics(timeout=5)


def failed_authentications(kafka) -> int:
    """Lines of the broker's log that report a refused client authentication."""
    log = kafka.broker.log_file
    return log.read_text(errors="replace").count("Failed authentication with") if log.is_file() else 0


def test_aiokafka_clients_authenticate_with_gruflows_token_provider(kafka) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.abc import AbstractTokenProvider
    from aiokafka.errors import KafkaError

    from stream.kafka.config import aiokafka_config

    settings = kafka.oauthbearer_settings(partitions=2)
    names = ensure_topics(settings)
    config = aiokafka_config(settings)
    assert config["sasl_mechanism"] == "OAUTHBEARER" and config["security_protocol"] == "SASL_PLAINTEXT"

    class Expired(AbstractTokenProvider):
        async def token(self) -> str:
            return unsecured_jwt("gruflow-test", 60, now_s=time.time() - 3600)

    async def send(provider: AbstractTokenProvider, values: list[bytes]) -> BaseException | None:
        """``values`` sent by a producer authenticating with ``provider``; the error, if any."""
        producer = AIOKafkaProducer(**{**config, "sasl_oauth_token_provider": provider, "request_timeout_ms": 5000})
        try:
            await asyncio.wait_for(producer.start(), 30)
            for value in values:
                await asyncio.wait_for(producer.send_and_wait(names.dlq, value, key=b"k"), 20)
            return None
        except (KafkaError, asyncio.TimeoutError) as exc:
            return exc
        finally:
            await producer.stop()

    async def read(group: str, last: bytes) -> list[bytes]:
        """The topic from the beginning, in a new consumer group, up to the record ``last``."""
        consumer = AIOKafkaConsumer(names.dlq, group_id=f"{settings.process.app_id}-{group}",
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
    assert asyncio.run(send(config["sasl_oauth_token_provider"], sent)) is None
    assert sorted(asyncio.run(read("first", sent[-1]))) == sent
    # control: an expired token is refused by the broker. aiokafka (0.14) does not read the broker's error
    # challenge: it logs "Authenticated via OAUTHBEARER", and the refusal surfaces as failed requests
    before = failed_authentications(kafka)
    error = asyncio.run(send(Expired(), [b"never"]))
    assert error is not None, "the listener accepted an expired token: it checks nothing"
    assert failed_authentications(kafka) > before, "the broker did not log the refused authentication"
    assert asyncio.run(send(config["sasl_oauth_token_provider"], [b"after"])) is None
    assert asyncio.run(read("second", b"after")) == [*sent, b"after"]


def test_a_worker_answers_over_oauthbearer_only(kafka, tmp_path: Path) -> None:
    settings = kafka.oauthbearer_settings(partitions=2, top_k=5)
    ensure_topics(settings)
    model = save_tiny_model(tmp_path / "tiny.gfc")
    events = make_events(n_users=5, per_user=3, seed=17)
    reader = TopicReader(settings, settings.topic("recommendations"))
    try:
        with WorkerProc(kafka, settings, model, tmp_path, name="oauth") as worker:
            assert worker.env["GRUFLOW_BOOTSTRAP_SERVERS"] == kafka.sasl_servers
            produce(settings, events)
            got = reader.poll_until(lambda c: {(e.user, e.ts) for e in events} <= set(c.answered()), 90,
                                    "an answer to every event")
            assert worker.metric("gruflow_events_in_total") == len(events)
            assert worker.get("/readyz")[0] == 200
    finally:
        reader.close()
    assert {(e.user, e.ts) for e in events} <= set(got.answered())
