"""gruflow's topics: names (each its own setting, else the settings' prefix + its name) and explicit,
idempotent creation.

Input topics ``clicks`` and ``purchases`` (or the one ``events`` topic, when GRUFLOW_TOPIC_EVENTS is set)
are co-partitioned (same partition count, keyed by user id)
with the state table's changelog and the recommendations topic; faust would crash-loop on a
partition-count mismatch, so ``ensure_topics`` refuses one up front with a message saying what to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

from stream.kafka.config import MODEL_CHUNK_BYTES, ClusterUnreachable, admin_config
from stream.settings import INPUT_MESSAGE_MAX_BYTES, Settings

# a dead letter is the original record plus gruflow's headers (a detail of at most 500 bytes, ids, offsets)
DLQ_MESSAGE_MAX_BYTES = INPUT_MESSAGE_MAX_BYTES + 64 * 1024
DLQ_HEADER_ROOM = 4096  # what a dead letter's headers and record framing take at most, with room to spare
KAFKA_DEFAULT_MESSAGE_MAX_BYTES = 1048588  # a broker's message.max.bytes unless configured

log = logging.getLogger("gruflow.topics")

# faust names a table's changelog "<app id>-<table name>-changelog"; both sides use changelog_topic().
STATE_TABLE_NAME = "user-state"


def changelog_topic(settings: Settings) -> str:
    """The per-user state table's changelog (faust's own naming, so faust needs no override)."""
    return f"{settings.process.app_id}-{STATE_TABLE_NAME}-changelog"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]
    any_partitions: bool = False  # read whole by every worker: an existing topic may have any count


@dataclass(frozen=True)
class TopicNames:
    clicks: str
    purchases: str
    recommendations: str
    dlq: str
    models: str
    changelog: str
    item_rules: str = ""
    events: str = ""  # the one input topic of every event type; "" = the split clicks + purchases topics
    control: str = ""  # keyed by user id like the inputs: requests about one user (``gruflow forget``)
    flagged: str = ""  # a sample of the user ids the trainer's input filter flagged (never in logs or labels)

    @classmethod
    def from_settings(cls, settings: Settings) -> "TopicNames":
        return cls(
            clicks=settings.topic("clicks"),
            purchases=settings.topic("purchases"),
            recommendations=settings.topic("recommendations"),
            dlq=settings.topic("dlq"),
            models=settings.topic("models"),
            changelog=changelog_topic(settings),
            item_rules=settings.topic("item-rules"),
            events=settings.topics.topic_events,
            control=settings.topic("control"),
            flagged=settings.topic("flagged-users"),
        )

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.events,) if self.events else (self.clicks, self.purchases)

    def kinds(self) -> dict[str, str]:
        """Input topic -> the kind ``stream.pipeline.events.decode_event`` checks it as."""
        if self.events:
            return {self.events: "events"}
        return {self.clicks: "clicks", self.purchases: "purchases"}

    def __iter__(self) -> Iterator[str]:
        return iter((*self.inputs, self.recommendations, self.dlq, self.models, self.changelog, self.item_rules,
                     self.control, self.flagged))


def topic_specs(settings: Settings) -> list[TopicSpec]:
    names = TopicNames.from_settings(settings)
    p = settings.topics.partitions
    compact = {"cleanup.policy": "compact"}
    # explicit limits, not the cluster's default: every record an input topic accepts must fit in the dlq
    # with its headers, or the worker could not dead-letter it and would fail on it again after each restart
    inputs = {"max.message.bytes": str(INPUT_MESSAGE_MAX_BYTES)}
    return [
        *(TopicSpec(name, p, dict(inputs)) for name in names.inputs),
        TopicSpec(names.recommendations, p, {}),
        TopicSpec(names.dlq, p, {"max.message.bytes": str(DLQ_MESSAGE_MAX_BYTES)}),
        TopicSpec(names.changelog, p, dict(compact)),
        # co-partitioned with the inputs: a user's request reaches the worker that holds the user's state
        TopicSpec(names.control, p, {}),
        TopicSpec(names.flagged, 1, {}),
        # one partition keeps model chunks in order; compaction keeps the latest of each key
        TopicSpec(names.models, 1, {**compact, "max.message.bytes": str(MODEL_CHUNK_BYTES + 65536)}),
        # catalogue rules keyed by item id: the latest of each item is what counts (docs/rules.md)
        TopicSpec(names.item_rules, 1, dict(compact), any_partitions=True),
    ]


class TopicError(RuntimeError):
    """A topic exists with an incompatible layout, or could not be created."""


class TopicsUnreachable(TopicError, ClusterUnreachable):
    """The topics could not even be listed: no broker answered."""


def ensure_topics(settings: Settings, timeout: float = 30.0) -> TopicNames:
    """Create every gruflow topic that is missing; check the partition count of those that exist."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(admin_config(settings))
    specs = topic_specs(settings)
    existing = _partition_counts(admin, timeout)
    mismatched = [
        f"{s.name} has {existing[s.name]} partitions, expected {s.partitions}"
        for s in specs if s.name in existing and existing[s.name] != s.partitions and not s.any_partitions
    ]
    if mismatched:
        raise TopicError(
            "existing topics do not match GRUFLOW_PARTITIONS (input topics, recommendations, dlq and the state "
            "changelog must be co-partitioned): " + "; ".join(mismatched)
            + ". Set GRUFLOW_PARTITIONS to the existing count, or use another GRUFLOW_TOPIC_PREFIX / "
            "GRUFLOW_APP_ID, or delete the topics."
        )
    missing = [s for s in specs if s.name not in existing]
    if missing:
        futures = admin.create_topics(
            [NewTopic(s.name, num_partitions=s.partitions, replication_factor=settings.topics.replication_factor,
                      config=s.config) for s in missing],
            request_timeout=timeout,
        )
        errors = []
        for name, future in futures.items():
            try:
                future.result(timeout)
            except KafkaException as exc:
                err = exc.args[0]
                if getattr(err, "name", lambda: "")() == "TOPIC_ALREADY_EXISTS":
                    continue  # created concurrently by another process: checked below
                errors.append(f"{name}: {err}")
        if errors:
            raise TopicError("cannot create topics: " + "; ".join(errors))
        existing = _wait_visible(admin, [s.name for s in specs], timeout)
        late = [f"{s.name} has {existing[s.name]}, expected {s.partitions}"
                for s in specs if existing.get(s.name) != s.partitions and not (s.any_partitions and s.name in existing)]
        if late:
            raise TopicError("topics created concurrently with another partition count: " + "; ".join(late))
    return TopicNames.from_settings(settings)


def max_message_bytes(settings: Settings, topic: str, timeout: float = 30.0) -> int:
    """The record size limit the cluster applies to ``topic`` (its own config, or the broker's default)."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    admin = AdminClient(admin_config(settings))  # alive until the answer is in
    configs = admin.describe_configs([resource], request_timeout=timeout)[resource].result(timeout)
    return int(configs["max.message.bytes"].value)


def dead_letter_budget(settings: Settings, timeout: float = 30.0) -> int:
    """How many bytes of a bad record's key and value a dead letter can carry: all that an input topic takes
    when the dlq is gruflow's own, less when the dlq existed before with a smaller limit (then a record
    that would not fit is cut, rather than failing its batch after every restart)."""
    dlq = TopicNames.from_settings(settings).dlq
    try:
        limit = max_message_bytes(settings, dlq, timeout)
    except Exception as exc:  # noqa: BLE001 - no permission to describe, timeout, ...: assume the usual limit
        limit = KAFKA_DEFAULT_MESSAGE_MAX_BYTES
        log.warning("cannot read the max.message.bytes of %s (%s): assuming Kafka's default, %d", dlq, exc, limit)
    budget = min(INPUT_MESSAGE_MAX_BYTES, limit - DLQ_HEADER_ROOM)
    if budget < INPUT_MESSAGE_MAX_BYTES:
        log.warning("%s takes records of up to %d bytes: dead letters of records over %d bytes are cut to that size "
                    "(gruflow creates it with %d; kafka-configs.sh --alter --entity-type topics --entity-name %s "
                    "--add-config max.message.bytes=%d raises it)", dlq, limit, budget, DLQ_MESSAGE_MAX_BYTES, dlq,
                    DLQ_MESSAGE_MAX_BYTES)
    return max(0, budget)


def _partition_counts(admin: object, timeout: float) -> dict[str, int]:
    from confluent_kafka import KafkaException

    try:
        metadata = admin.list_topics(timeout=timeout)  # type: ignore[attr-defined]
    except KafkaException as exc:
        raise TopicsUnreachable(f"cannot reach the Kafka cluster to list topics: {exc}") from None
    return {name: len(t.partitions) for name, t in metadata.topics.items() if t.error is None}


def _wait_visible(admin: object, names: list[str], timeout: float) -> dict[str, int]:
    """Metadata can lag a create by a moment; wait until every topic shows up."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        counts = _partition_counts(admin, timeout)
        if all(n in counts for n in names) or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def delete_topics(settings: Settings, timeout: float = 30.0) -> None:
    """Delete gruflow's topics for these settings (tests, `demo` reruns); missing ones are ignored."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(admin_config(settings))
    existing = _partition_counts(admin, timeout)
    names = [n for n in TopicNames.from_settings(settings) if n in existing]
    if not names:
        return
    for name, future in admin.delete_topics(names, request_timeout=timeout).items():
        try:
            future.result(timeout)
        except KafkaException as exc:
            raise TopicError(f"cannot delete {name}: {exc}") from None
