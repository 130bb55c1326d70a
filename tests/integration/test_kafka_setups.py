"""Input shapes of real Kafka setups, against the embedded broker: one topic for every event type, topic
names set one by one (no common prefix), a field map for events with the shop's own field names, and
client properties passed through to librdkafka and aiokafka by their own names.

SASL OAUTHBEARER over a real connection: tests/integration/test_sasl_oauthbearer.py. Here the same
pass-through carries other properties over a real connection, and the broker shows they arrived (a consumer
group member's client id).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from stream.kafka.topics import TopicNames, ensure_topics
from workerkit import TopicReader, WorkerProc, save_tiny_model

pytestmark = pytest.mark.integration


def shop_event(visitor: int, item: int, ts: int, event: str) -> bytes:
    """An event as the RetailRocket shop's own pipeline writes it."""
    return orjson.dumps({"visitorid": visitor, "itemid": item, "timestamp": ts, "event": event, "transactionid": None})


def test_one_topic_own_names_and_field_map(kafka, tmp_path: Path) -> None:
    from confluent_kafka import Producer

    from stream.kafka.config import producer_config

    base = kafka.settings(partitions=2)
    tag = base.topics.topic_prefix.rstrip("-")  # unique per test, like the prefix
    settings = base.replace(
        topic_prefix="unused.", topic_events=f"shop{tag}.events", topic_recommendations=f"shop{tag}.recs",
        topic_dlq=f"shop{tag}.bad", topic_models=f"shop{tag}.models", topic_item_rules=f"shop{tag}.rules",
        topic_control=f"shop{tag}.control", topic_flagged_users=f"shop{tag}.flagged",
        field_map="user_id=visitorid,item_id=itemid,ts=timestamp,event_type=event",
        event_type_map="addtocart=cart,transaction=purchase",
        librdkafka_config="client.id=gruflow-shop;socket.keepalive.enable=true")
    names = ensure_topics(settings)
    assert names.inputs == (f"shop{tag}.events",) and names.recommendations == f"shop{tag}.recs"
    from confluent_kafka.admin import AdminClient

    from stream.kafka.config import admin_config

    existing = set(AdminClient(admin_config(settings)).list_topics(timeout=15).topics)
    assert {f"shop{tag}.events", f"shop{tag}.recs", f"shop{tag}.bad", f"shop{tag}.rules", f"shop{tag}.control",
            f"shop{tag}.flagged"} <= existing
    assert not [t for t in existing if t.startswith("unused.")], "a topic name still came from the prefix"

    model = save_tiny_model(tmp_path / "tiny.gfc")
    t0 = int(time.time() * 1000) - 600_000
    sent = []
    for j, event in enumerate(["view", "view", "addtocart", "transaction", "view"]):
        for visitor in (101, 202, 303):
            sent.append((str(visitor), shop_event(visitor, j + 1, t0 + 1000 * j + visitor, event)))
    bad = ("404", orjson.dumps({"user_id": "404", "item_id": "i1", "ts": t0, "event_type": "view"}))
    recs = TopicReader(settings, names.recommendations)
    dlq = TopicReader(settings, names.dlq)
    with WorkerProc(kafka, settings, model, tmp_path, name="shop"):
        p = Producer(producer_config(settings))
        for key, value in [*sent, bad]:
            p.produce(names.events, value, key.encode())
        assert p.flush(30) == 0
        got = recs.poll_until(lambda c: len(c.messages) >= len(sent), 90, "answers").recommendations()
        dead = dlq.poll_until(lambda c: len(c.messages) >= 1, 30, "the event with gruflow's names").messages
    recs.close()
    dlq.close()
    assert sorted((r["user_id"], r["event_ts"]) for r in got) == sorted(
        (k, orjson.loads(v)["timestamp"]) for k, v in sent), "every shop event answered once, purchases too"
    reasons = {dict(m.headers())["gruflow-reason"].decode() for m in dead}
    assert reasons == {"missing_field"}, reasons  # with a field map, the shop's names are the ones read


def test_librdkafka_and_aiokafka_properties_reach_the_broker(kafka) -> None:
    from aiokafka import AIOKafkaProducer
    from confluent_kafka import Consumer
    from confluent_kafka.admin import AdminClient

    from stream.kafka.config import admin_config, aiokafka_config, consumer_config

    settings = kafka.settings(partitions=1, librdkafka_config="client.id=gruflow-passthrough\nstatistics.interval.ms=0",
                              aiokafka_config='{"request_timeout_ms": 20000}')
    names = ensure_topics(settings)
    group = f"{settings.process.app_id}-pt"
    consumer = Consumer(consumer_config(settings, group))
    consumer.subscribe([names.recommendations])
    admin = AdminClient(admin_config(settings))
    deadline = time.monotonic() + 120
    members = []
    while time.monotonic() < deadline and not members:
        consumer.poll(0.5)
        try:
            members = list(admin.describe_consumer_groups([group], request_timeout=30)[group].result(35).members)
        except Exception:  # noqa: BLE001 - the group is still forming (or the broker slow): ask again
            continue
    consumer.close()
    assert members and {m.client_id for m in members} == {"gruflow-passthrough"}

    config = aiokafka_config(settings)
    assert config["client_id"] == "gruflow-passthrough" and config["request_timeout_ms"] == 20000

    async def send() -> int:
        producer = AIOKafkaProducer(**config)
        await producer.start()
        try:
            meta = await producer.send_and_wait(names.dlq, b"x", key=b"k")
            return meta.offset
        finally:
            await producer.stop()

    assert asyncio.run(send()) >= 0
    assert TopicNames.from_settings(settings).dlq == names.dlq
