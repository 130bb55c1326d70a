"""Client configurations built from Settings: the one place that maps GRUFLOW_* connection settings
(bootstrap, SASL, SSL) onto confluent-kafka (librdkafka) and faust (aiokafka) clients, so every client
of a process connects the same way.

Producers use librdkafka's ``murmur2_random`` partitioner: the Java client's and aiokafka's
(faust's) key hashing, so a keyed event lands on the partition whose table state faust holds.
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from typing import Any

from stream.kafka.passthrough import aiokafka_properties, librdkafka_properties, token_provider
from stream.settings import Settings, SettingsError

# librdkafka defaults to CRC32; this is murmur2 for keyed messages (random for null keys), like faust.
PARTITIONER = "murmur2_random"
# a model checkpoint travels on the models topic in chunks of this size (stream/online/model_sync.py)
MODEL_CHUNK_BYTES = 512 * 1024
# the largest message gruflow's clients, the models topic and the embedded broker accept: far above a chunk
MESSAGE_MAX_BYTES = 8 * 1024 * 1024 + 64 * 1024
# librdkafka writes its log lines (``%3|…|FAIL|…``) straight to stderr unless it is given a logger: every
# confluent client gets this one, so its lines go through Python logging (level, format, handlers) and
# are delivered from the client's own poll()/flush() calls.
LIBRDKAFKA_LOGGER = logging.getLogger("gruflow.librdkafka")


class RepeatLimiter(logging.Filter):
    """Lets one of each message through per ``every_s``. A client that cannot reach its broker logs the
    same failure at every reconnect backoff (about once a second per broker), with only its timings
    changed: digits are ignored when messages are compared."""

    def __init__(self, every_s: float = 60.0, max_keys: int = 1024) -> None:
        super().__init__()
        self.every_s, self.max_keys = every_s, max_keys
        self._last: dict[str, float] = {}
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        key = re.sub(r"\d+", "#", record.getMessage())
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            self.suppressed += 1
            return False
        if len(self._last) >= self.max_keys:
            self._last.clear()
        self._last[key] = now
        return True


LIBRDKAFKA_LOGGER.addFilter(RepeatLimiter())


class ClusterUnreachable(RuntimeError):
    """No broker of the configured cluster answered (wrong bootstrap address, cluster down, auth refused)."""

# confluent-kafka keys that really contain underscores (Python callbacks, librdkafka's log_level); any
# other keyword argument to the builders below may spell dots as underscores: linger_ms=5 == linger.ms.
_UNDERSCORE_KEYS = {"error_cb", "throttle_cb", "stats_cb", "oauth_cb", "on_delivery", "on_commit", "logger",
                    "log_level"}


def _normalise(extra: dict[str, Any]) -> dict[str, Any]:
    return {(k if k in _UNDERSCORE_KEYS or "." in k else k.replace("_", ".")): v for k, v in extra.items()}


def _sasl_mechanism(settings: Settings) -> str:
    mechanism = (settings.connection.sasl_mechanism or "PLAIN").upper()
    if mechanism not in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"):
        raise SettingsError(
            f"GRUFLOW_SASL_MECHANISM={settings.connection.sasl_mechanism!r}: use PLAIN, SCRAM-SHA-256, "
            "SCRAM-SHA-512 or OAUTHBEARER"
        )
    if mechanism == "OAUTHBEARER":  # credentials come from the sasl.oauthbearer.* client properties
        return mechanism
    if not settings.connection.sasl_username:
        raise SettingsError(
            f"GRUFLOW_SECURITY_PROTOCOL={settings.connection.security_protocol} needs GRUFLOW_SASL_USERNAME and "
            "GRUFLOW_SASL_PASSWORD"
        )
    return mechanism


def _require_bootstrap(settings: Settings) -> str:
    if not settings.connection.bootstrap_servers:
        raise SettingsError(
            "no Kafka cluster configured: set GRUFLOW_BOOTSTRAP_SERVERS (or --bootstrap), or start the embedded "
            "broker first (stream.kafka.broker.EmbeddedKafka / `gruflow broker`)"
        )
    return settings.connection.bootstrap_servers


def bootstrap_list(settings: Settings) -> list[str]:
    """``host:port`` entries of the bootstrap setting (comma or semicolon separated, optional kafka://)."""
    raw = _require_bootstrap(settings).replace(";", ",")
    hosts = [h.strip() for h in raw.split(",") if h.strip()]
    return [h.split("://", 1)[1] if "://" in h else h for h in hosts]


def confluent_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """Connection part of any confluent-kafka client (producer, consumer, admin), plus ``extra``."""
    config: dict[str, Any] = {
        "bootstrap.servers": ",".join(bootstrap_list(settings)),
        "security.protocol": settings.connection.security_protocol,
        "logger": LIBRDKAFKA_LOGGER,
    }
    if settings.connection.security_protocol.startswith("SASL"):
        config["sasl.mechanism"] = _sasl_mechanism(settings)
        if config["sasl.mechanism"] != "OAUTHBEARER":
            config["sasl.username"] = settings.connection.sasl_username
            config["sasl.password"] = str(settings.connection.sasl_password)
    if settings.connection.security_protocol in ("SSL", "SASL_SSL"):
        if settings.connection.ssl_cafile:
            config["ssl.ca.location"] = settings.connection.ssl_cafile
        if settings.connection.ssl_certfile:
            config["ssl.certificate.location"] = settings.connection.ssl_certfile
        if settings.connection.ssl_keyfile:
            config["ssl.key.location"] = settings.connection.ssl_keyfile
    config.update(librdkafka_properties(settings))
    config.update(_normalise(extra))
    return config


def producer_config(settings: Settings, *, compression: str | None = None, **extra: Any) -> dict[str, Any]:
    """A batching, idempotent producer keyed like faust. ``compression``: None, "lz4", "zstd", ..."""
    config = confluent_config(settings)
    config.update({
        "partitioner": PARTITIONER,
        "linger.ms": 5,
        "batch.num.messages": 10000,
        "queue.buffering.max.messages": 500000,
        "enable.idempotence": True,  # acks=all, no duplicates from internal retries
        "message.max.bytes": MESSAGE_MAX_BYTES,
    })
    if compression:
        config["compression.type"] = compression
    config.update(librdkafka_properties(settings))  # the operator's own choices win over these defaults
    config.update(_normalise(extra))
    return config


def load_generator(settings: Settings) -> dict[str, Any]:
    """Producer overrides for a client that sends events one by one at a steady rate (the bench's offered
    load): no Nagle delay, a short linger and at most 5 requests in flight per connection, so that records
    batch up while the broker is busy; with a single replica acks=1 (as durable as acks=all there) and no
    idempotence. Without the cap (librdkafka's default when idempotence is off) and with a 1 ms linger, every
    few records become a request of their own and the broker can fall behind the offered rate for good
    (docs/hot-path.md)."""
    extra: dict[str, Any] = {"socket.nagle.disable": True, "linger.ms": 5, "max.in.flight": 5}
    if settings.topics.replication_factor <= 1:
        extra.update({"acks": 1, "enable.idempotence": False})
    return extra


def aiokafka_config(settings: Settings) -> dict[str, Any]:
    """Connection part of an aiokafka client (the worker's batch producer), connected as faust connects."""
    config: dict[str, Any] = {"bootstrap_servers": bootstrap_list(settings),
                              "security_protocol": settings.connection.security_protocol}
    context = ssl_context(settings)
    if context is not None:
        config["ssl_context"] = context
    if settings.connection.security_protocol.startswith("SASL"):
        mechanism = _sasl_mechanism(settings)
        if mechanism == "OAUTHBEARER":
            config.update(sasl_mechanism=mechanism, sasl_oauth_token_provider=token_provider(settings))
        else:
            config.update(sasl_mechanism=mechanism, sasl_plain_username=settings.connection.sasl_username,
                          sasl_plain_password=str(settings.connection.sasl_password))
    config.update(aiokafka_properties(settings))
    return config


def consumer_config(settings: Settings, group_id: str | None = None, **extra: Any) -> dict[str, Any]:
    """A consumer; without ``group_id`` it reads without a group (assign(), no offset commits)."""
    config = confluent_config(settings)
    config.update({
        "group.id": group_id or f"{settings.process.app_id}-reader",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": group_id is not None,
        "fetch.max.bytes": 64 * 1024 * 1024,
        "max.partition.fetch.bytes": MESSAGE_MAX_BYTES,
    })
    config.update(librdkafka_properties(settings))
    config.update(_normalise(extra))
    return config


def assign_whole_topic(consumer: Any, topic: str, offset: int, timeout: float = 15.0) -> int:
    """Assign every partition of ``topic`` at ``offset`` (e.g. OFFSET_BEGINNING): the group-less way to
    read that ``consumer_config(group_id=None)`` is meant for. Readers that subscribe() instead all join
    the one "<app_id>-reader" group, and a member that is not being polled stalls the others' rebalance
    until it polls again. Returns the partition count; LookupError when the
    topic does not exist, KafkaException when the cluster cannot be reached."""
    from confluent_kafka import TopicPartition

    info = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        raise LookupError(f"topic {topic} does not exist yet")
    consumer.assign([TopicPartition(topic, p, offset) for p in sorted(info.partitions)])
    return len(info.partitions)


def end_offsets(settings: Settings, partitions: list[tuple[str, int]], *,
                timeout: float = 10.0) -> dict[tuple[str, int], int | None]:
    """Log end offsets (next offset to be written) of these partitions, read from the broker; None where
    the broker did not answer. Blocking: one short-lived group-less consumer."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer(consumer_config(settings, group_id=None, **{"isolation.level": "read_uncommitted"}))
    out: dict[tuple[str, int], int | None] = {}
    try:
        for topic, partition in partitions:
            try:
                out[(topic, partition)] = consumer.get_watermark_offsets(TopicPartition(topic, partition),
                                                                         timeout=timeout)[1]
            except KafkaException:
                out[(topic, partition)] = None
    finally:
        consumer.close()
    return out


def admin_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    return confluent_config(settings, **extra)


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The SSL context faust/aiokafka use for SSL and SASL_SSL (None for plaintext protocols)."""
    if settings.connection.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.connection.ssl_cafile or None)
    if settings.connection.ssl_certfile:
        context.load_cert_chain(settings.connection.ssl_certfile, settings.connection.ssl_keyfile or None)
    elif settings.connection.ssl_keyfile:
        raise SettingsError("GRUFLOW_SSL_KEYFILE is set without GRUFLOW_SSL_CERTFILE")
    return context


def faust_broker_url(settings: Settings) -> str:
    return ";".join(f"kafka://{host}" for host in bootstrap_list(settings))


def faust_broker_kwargs(settings: Settings) -> dict[str, Any]:
    """``faust.App(**faust_broker_kwargs(settings))``: broker URL(s) and credentials."""
    import faust

    credentials: Any = None
    context = ssl_context(settings)
    if settings.connection.security_protocol.startswith("SASL") and _sasl_mechanism(settings) == "OAUTHBEARER":
        credentials = faust.OAuthCredentials(oauth_cb=token_provider(settings), ssl_context=context)
    elif settings.connection.security_protocol.startswith("SASL"):
        credentials = faust.SASLCredentials(
            username=settings.connection.sasl_username,
            password=str(settings.connection.sasl_password),
            mechanism=_sasl_mechanism(settings),
            ssl_context=context,
        )
    elif context is not None:
        credentials = faust.SSLCredentials(context)
    return {"broker": faust_broker_url(settings), "broker_credentials": credentials}
