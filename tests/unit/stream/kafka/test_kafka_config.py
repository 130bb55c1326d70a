"""Client configs from Settings: the same connection (bootstrap, SASL, SSL) for confluent-kafka and faust."""

from __future__ import annotations

import logging
import re
import ssl
import time

import pytest

from stream.kafka.config import (
    LIBRDKAFKA_LOGGER,
    PARTITIONER,
    RepeatLimiter,
    admin_config,
    aiokafka_config,
    bootstrap_list,
    confluent_config,
    consumer_config,
    faust_broker_kwargs,
    load_generator,
    producer_config,
    ssl_context,
)
from stream.settings import Secret, Settings, SettingsError
from stream.kafka.topics import TopicNames, changelog_topic, topic_specs

BOOT = "k1.example:9092,k2.example:9093"


def test_plaintext_connection():
    config = confluent_config(Settings.of(bootstrap_servers=BOOT))
    assert config == {"bootstrap.servers": BOOT, "security.protocol": "PLAINTEXT", "logger": LIBRDKAFKA_LOGGER}


def test_librdkafka_logs_go_through_python_logging(caplog, capfd):
    """A client that cannot reach its cluster: librdkafka's connection errors arrive as log records of
    the gruflow.librdkafka logger, and none is written raw to stderr (``%3|…|FAIL|``)."""
    import socket

    from confluent_kafka import Producer

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    caplog.set_level(logging.DEBUG, logger=LIBRDKAFKA_LOGGER.name)
    producer = Producer(confluent_config(Settings.of(bootstrap_servers=f"127.0.0.1:{port}"),
                                         reconnect_backoff_ms=50, reconnect_backoff_max_ms=100))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(r.name == LIBRDKAFKA_LOGGER.name for r in caplog.records):
        producer.poll(0.1)
    records = [r for r in caplog.records if r.name == LIBRDKAFKA_LOGGER.name]
    assert records, "librdkafka logged nothing through Python logging within 10 s"
    assert any("Connection refused" in r.getMessage() or "FAIL" in r.getMessage() for r in records)
    assert "|FAIL|" not in capfd.readouterr().err
    # the same refusal repeats at every reconnect backoff (50-100 ms here): it is let through once
    for _ in range(20):
        producer.poll(0.1)
    texts = [re.sub(r"\d+", "#", r.getMessage()) for r in caplog.records if r.name == LIBRDKAFKA_LOGGER.name]
    assert len(texts) == len(set(texts)), texts


def test_repeat_limiter_lets_each_message_through_once_per_window():
    limiter = RepeatLimiter(every_s=3600)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("x", logging.ERROR, __file__, 1, msg, None, None)

    passed = [limiter.filter(record(m)) for m in ("refused after 0ms", "refused after 12ms", "other", "other")]
    assert passed == [True, False, True, False] and limiter.suppressed == 2


@pytest.mark.parametrize("raw", ["k1.example:9092;k2.example:9093", "kafka://k1.example:9092, kafka://k2.example:9093"])
def test_bootstrap_spellings(raw):
    assert bootstrap_list(Settings.of(bootstrap_servers=raw)) == ["k1.example:9092", "k2.example:9093"]


def test_no_bootstrap_is_a_clear_error():
    with pytest.raises(SettingsError, match="GRUFLOW_BOOTSTRAP_SERVERS"):
        confluent_config(Settings())


def test_sasl_ssl_is_passed_through():
    settings = Settings.of(bootstrap_servers=BOOT, security_protocol="SASL_SSL", sasl_mechanism="scram-sha-512",
                        sasl_username="svc", sasl_password=Secret("hunter2"), ssl_cafile="/etc/ca.pem")
    config = admin_config(settings)
    assert config["security.protocol"] == "SASL_SSL"
    assert config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert (config["sasl.username"], config["sasl.password"]) == ("svc", "hunter2")
    assert config["ssl.ca.location"] == "/etc/ca.pem"
    assert "hunter2" not in repr(settings)


def test_sasl_without_username_is_refused():
    with pytest.raises(SettingsError, match="GRUFLOW_SASL_USERNAME"):
        confluent_config(Settings.of(bootstrap_servers=BOOT, security_protocol="SASL_PLAINTEXT"))


def test_unknown_sasl_mechanism_is_refused():
    settings = Settings.of(bootstrap_servers=BOOT, security_protocol="SASL_PLAINTEXT", sasl_mechanism="GSSAPI",
                        sasl_username="u")
    with pytest.raises(SettingsError, match="GRUFLOW_SASL_MECHANISM"):
        confluent_config(settings)


def test_producer_uses_faust_compatible_partitioner_and_batches():
    config = producer_config(Settings.of(bootstrap_servers=BOOT), compression="lz4", linger_ms=7)
    assert config["partitioner"] == PARTITIONER == "murmur2_random"
    assert config["linger.ms"] == 7
    assert config["batch.num.messages"] >= 1000
    assert config["compression.type"] == "lz4"
    assert config["enable.idempotence"] is True


def test_load_generator_keeps_requests_in_flight_bounded():
    """The bench's load generator: without a cap librdkafka allows unbounded requests in flight, one per
    partition, and a busy broker fell behind for good."""
    from confluent_kafka import Producer

    for replicas in (1, 3):
        settings = Settings.of(bootstrap_servers="127.0.0.1:1", replication_factor=replicas)
        config = producer_config(settings, **load_generator(settings))
        assert int(config["max.in.flight"]) <= 5
        assert config["linger.ms"] >= 1 and config["socket.nagle.disable"] is True
        assert (config.get("acks") == 1) == (replicas == 1)
        Producer(config)


def test_extra_keys_keep_python_callbacks():
    def cb(err):  # pragma: no cover - never called
        pass

    config = consumer_config(Settings.of(bootstrap_servers=BOOT), group_id="g", error_cb=cb, log_level=3,
                             isolation_level="read_committed", **{"session.timeout.ms": 6000})
    assert config["error_cb"] is cb
    assert config["log_level"] == 3
    assert config["isolation.level"] == "read_committed"
    assert config["session.timeout.ms"] == 6000
    assert config["group.id"] == "g" and config["enable.auto.commit"] is True


def test_configs_are_accepted_by_librdkafka():
    """librdkafka validates every key and value when a client is built (no connection needed)."""
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient

    settings = Settings.of(bootstrap_servers="127.0.0.1:1")
    Producer(producer_config(settings, compression="lz4", log_level=3))
    Producer(producer_config(settings, transactional_id="t"))
    Consumer(consumer_config(settings)).close()
    AdminClient(admin_config(settings))


def test_faust_gets_every_broker_and_no_credentials_in_plaintext():
    import faust

    kwargs = faust_broker_kwargs(Settings.of(bootstrap_servers=BOOT))
    assert kwargs["broker_credentials"] is None
    app = faust.App("kafka-config-test", **kwargs)
    assert [(u.host, u.port) for u in app.conf.broker] == [("k1.example", 9092), ("k2.example", 9093)]


def test_faust_sasl_ssl_credentials():
    import faust

    settings = Settings.of(bootstrap_servers=BOOT, security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-256",
                        sasl_username="svc", sasl_password=Secret("pw"))
    creds = faust_broker_kwargs(settings)["broker_credentials"]
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password, creds.mechanism.value) == ("svc", "pw", "SCRAM-SHA-256")
    assert creds.protocol.value == "SASL_SSL"
    assert isinstance(creds.ssl_context, ssl.SSLContext)


def test_faust_sasl_plaintext_and_ssl_only():
    import faust

    sasl = faust_broker_kwargs(Settings.of(bootstrap_servers=BOOT, security_protocol="SASL_PLAINTEXT",
                                        sasl_username="u", sasl_password=Secret("p")))["broker_credentials"]
    assert sasl.protocol.value == "SASL_PLAINTEXT" and sasl.mechanism.value == "PLAIN" and sasl.ssl_context is None
    tls = faust_broker_kwargs(Settings.of(bootstrap_servers=BOOT, security_protocol="SSL"))["broker_credentials"]
    assert isinstance(tls, faust.SSLCredentials) and tls.protocol.value == "SSL"
    assert tls.context.verify_mode == ssl.CERT_REQUIRED


def test_aiokafka_clients_connect_like_faust():
    """The worker's output producer (aiokafka) gets the same brokers and credentials as every other client,
    and aiokafka accepts them (no connection is made)."""
    from aiokafka import AIOKafkaProducer

    plain = aiokafka_config(Settings.of(bootstrap_servers=BOOT))
    assert plain == {"bootstrap_servers": ["k1.example:9092", "k2.example:9093"], "security_protocol": "PLAINTEXT"}
    settings = Settings.of(bootstrap_servers=BOOT, security_protocol="SASL_SSL", sasl_mechanism="scram-sha-256",
                        sasl_username="svc", sasl_password=Secret("pw"))
    config = aiokafka_config(settings)
    assert (config["sasl_mechanism"], config["sasl_plain_username"], config["sasl_plain_password"]) == (
        "SCRAM-SHA-256", "svc", "pw")
    assert isinstance(config["ssl_context"], ssl.SSLContext)
    tls = aiokafka_config(Settings.of(bootstrap_servers=BOOT, security_protocol="SSL"))
    assert tls["security_protocol"] == "SSL" and "sasl_mechanism" not in tls

    async def build() -> None:
        for c in (plain, config, tls):
            AIOKafkaProducer(**c, acks=1, linger_ms=0)

    import asyncio

    asyncio.run(build())


def test_ssl_context_only_for_tls_protocols():
    assert ssl_context(Settings.of(bootstrap_servers=BOOT, security_protocol="SASL_PLAINTEXT")) is None
    with pytest.raises(SettingsError, match="GRUFLOW_SSL_CERTFILE"):
        ssl_context(Settings.of(bootstrap_servers=BOOT, security_protocol="SSL", ssl_keyfile="/k.pem"))


def test_topic_names_and_specs():
    settings = Settings.of(topic_prefix="shop.", app_id="recs", partitions=6)
    names = TopicNames.from_settings(settings)
    assert (names.clicks, names.purchases, names.recommendations, names.dlq, names.models) == (
        "shop.clicks", "shop.purchases", "shop.recommendations", "shop.dlq", "shop.models")
    assert names.changelog == changelog_topic(settings) == "recs-user-state-changelog"
    specs = {s.name: s for s in topic_specs(settings)}
    assert set(specs) == set(names)
    assert {specs[n].partitions for n in (*names.inputs, names.recommendations, names.dlq, names.changelog)} == {6}
    assert specs[names.models].partitions == 1
    assert specs[names.changelog].config["cleanup.policy"] == "compact"
    assert specs[names.models].config["cleanup.policy"] == "compact"
    assert "cleanup.policy" not in specs[names.clicks].config


def test_changelog_name_matches_faust_table_naming():
    """The name ensure_topics creates is the one faust derives for the stream app's table."""
    import faust

    from stream.kafka.topics import STATE_TABLE_NAME

    settings = Settings.of(app_id="recs-naming-test")
    app = faust.App(settings.process.app_id, broker="kafka://127.0.0.1:1", store="memory://")
    table = app.Table(STATE_TABLE_NAME, partitions=settings.topics.partitions)
    assert table.changelog_topic.get_topic_name() == changelog_topic(settings)


def test_the_worker_fetch_waits_at_the_broker_within_bounds() -> None:
    from stream.worker.batch_consumer import FETCH_MIN_BYTES, fetch_max_wait_ms

    assert fetch_max_wait_ms(0.02) == 20
    assert fetch_max_wait_ms(0.0) == 5  # GRUFLOW_BATCH_MAX_MS=0 must not make the fetcher spin
    assert fetch_max_wait_ms(10.0) == 500
    assert FETCH_MIN_BYTES >= 64 * 1024  # a trickle of events waits for the bound, a backlog does not
