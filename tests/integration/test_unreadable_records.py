"""Records the broker accepts but aiokafka cannot parse (a header name that is not UTF-8) go to the dlq as
``unreadable_record``; every event around them is answered and the worker keeps running, also after a
restart. And the neighbours of that case the client CAN read must simply be processed: null and non-UTF-8
header values, batches compressed with every codec Kafka has, and transaction markers (control records).

The bad records come from real clients: kcat (Debian's package; ``make tools`` installs it) sends the
header name as the issue does; without kcat, aiokafka's producer sends a batch it built whose name bytes
were rewritten (confluent-kafka turns a bytes name into its repr, which is UTF-8)."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import time
import subprocess
from pathlib import Path

import pytest
from aiokafka.partitioner import murmur2

from stream.pipeline import events as ev
from stream.kafka.topics import ensure_topics
from workerkit import Ev, TopicReader, WorkerProc, make_events, produce, save_tiny_model

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BAD_NAME = b"\xff\xfe"  # the header name of the issue: not UTF-8
KCAT_CACHE = REPO / ".cache" / "tools" / "kcat"  # where deploy/tools/install-kcat.sh unpacks it without root


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return save_tiny_model(tmp_path / "tiny.gfc")


def kcat() -> tuple[str, dict[str, str]] | None:
    """The kcat binary and its environment: on PATH, or unpacked by ``make tools`` (with its libraries)."""
    found = shutil.which("kcat")
    if found:
        return found, dict(os.environ)
    local = KCAT_CACHE / "usr" / "bin" / "kcat"
    if local.exists():
        libs = [str(p) for p in (KCAT_CACHE / "usr" / "lib").glob("*-linux-gnu")] + [str(KCAT_CACHE / "usr" / "lib")]
        env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(libs + [os.environ.get("LD_LIBRARY_PATH", "")]))
        return str(local), env
    return None


def partition_of(user: str, partitions: int) -> int:
    """faust's (and gruflow's producers') partition of a key: murmur2."""
    return (murmur2(user.encode()) & 0x7FFFFFFF) % partitions


def produce_with_header(settings, via: str, topic: str, partition: int, key: bytes, value: bytes,
                        headers: list[tuple[bytes, bytes | None]]) -> None:
    """One record with these exact header names (bytes), sent by a real client other than the worker's
    consumer: kcat, or aiokafka's producer with a record batch whose name bytes are written in after
    aiokafka built it (its API, like confluent-kafka's, only takes names that are text)."""
    if via == "kcat":
        found = kcat()
        assert found is not None
        binary, env = found
        cmd: list[bytes | str] = [binary, "-b", settings.connection.bootstrap_servers, "-P", "-t", topic, "-p", str(partition),
                                  "-k", key]
        for name, hvalue in headers:
            assert hvalue is not None, "kcat -H sends name=value"
            cmd += [b"-H", name + b"=" + hvalue]
        subprocess.run(cmd, input=value + b"\n", env=env, check=True, timeout=60, capture_output=True)
    elif via == "raw-batch":
        asyncio.run(_send_raw_batch(settings, topic, partition, key, value, headers))
    else:
        from confluent_kafka import Producer

        from stream.kafka.config import producer_config

        p = Producer(producer_config(settings))
        p.produce(topic, value, key, partition=partition, headers=[(n.decode(), v) for n, v in headers])
        assert p.flush(30) == 0


async def _send_raw_batch(settings, topic: str, partition: int, key: bytes, value: bytes,
                          headers: list[tuple[bytes, bytes | None]]) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.record.util import calc_crc32c

    from stream.kafka.config import aiokafka_config

    producer = AIOKafkaProducer(**aiokafka_config(settings), acks=1, enable_idempotence=False)
    await producer.start()
    try:
        builder = producer.create_batch()
        stand_ins = ["\x01" * len(name) for name, _ in headers]  # text of the name's length, found again below
        assert builder.append(timestamp=None, key=key, value=value,
                              headers=[(s, v) for s, (_, v) in zip(stand_ins, headers)]) is not None
        buf = builder._build()  # the batch's bytes, built once and sent as they are
        at = 61  # v2 batch header; the record (and its headers) follow
        for stand_in, (name, _) in zip(stand_ins, headers):
            if not name:
                continue
            at = buf.index(stand_in.encode(), at)
            buf[at:at + len(name)] = name
        struct.pack_into(">I", buf, 17, calc_crc32c(bytes(buf[21:])))  # the CRC covers attributes onwards
        await (await producer.send_batch(builder, topic, partition=partition))
    finally:
        await producer.stop()


def high_watermark(settings, topic: str, partition: int) -> int:
    from confluent_kafka import Consumer, TopicPartition

    from stream.kafka.config import consumer_config

    c = Consumer(consumer_config(settings, group_id=None))
    try:
        return c.get_watermark_offsets(TopicPartition(topic, partition), timeout=30)[1]
    finally:
        c.close()


def wait_committed(settings, topic: str, partition: int, ok, what: str, timeout: float = 60.0) -> int:
    """Poll the worker group's committed offset until ``ok(offset)`` (faust commits every few seconds)."""
    deadline = time.monotonic() + timeout
    while not ok(offset := committed(settings, topic, partition)):
        assert time.monotonic() < deadline, f"committed offset {offset} of {topic}[{partition}] not {what}"
        time.sleep(1)
    return offset


def committed(settings, topic: str, partition: int) -> int:
    from confluent_kafka import Consumer, TopicPartition

    from stream.kafka.config import consumer_config

    c = Consumer(consumer_config(settings, group_id=settings.process.app_id))
    try:
        return c.committed([TopicPartition(topic, partition)], timeout=30)[0].offset
    finally:
        c.close()


@pytest.mark.parametrize("via,guarantee", [("kcat", "at_least_once"), ("raw-batch", "at_least_once"),
                                           ("raw-batch", "exactly_once")])
def test_a_header_name_that_is_not_utf8_is_dead_lettered_and_the_stream_goes_on(
        kafka, tmp_path: Path, model_path: Path, via: str, guarantee: str) -> None:
    if via == "kcat" and kcat() is None:
        pytest.skip("kcat not found (on PATH or unpacked by `make tools` into .cache/tools/kcat): "
                    "`apt-get install kcat`; the raw-batch case sends the same record")
    settings = kafka.settings(partitions=2, processing_guarantee=guarantee)
    ensure_topics(settings)
    exactly_once = guarantee == "exactly_once"
    clicks = settings.topic("clicks")
    user = "u-poison"
    p = partition_of(user, settings.topics.partitions)
    before = make_events(n_users=4, per_user=2, seed=11) + [Ev(user, "i1", 1_764_000_000_000)]
    after = [Ev(user, "i2", 1_764_000_001_000)] + make_events(n_users=4, per_user=2, seed=12, t0=1_764_000_002_000)
    later = [Ev(user, "i3", 1_764_000_009_000)]
    bad_value = Ev(user, "i9", 1_764_000_000_500).value()  # a valid event: unreadable is about the record
    bad_offset = len([e for e in before if partition_of(e.user, settings.topics.partitions) == p])  # its place in the log
    dlq = TopicReader(settings, settings.topic("dlq"), read_committed=exactly_once)
    recs = TopicReader(settings, settings.topic("recommendations"), read_committed=exactly_once)
    try:
        with WorkerProc(kafka, settings, model_path, tmp_path) as worker:
            produce(settings, before)
            produce_with_header(settings, via, clicks, p, user.encode(), bad_value, [(b"ok", b"1"), (BAD_NAME, b"v")])
            produce(settings, after)
            want = {(e.user, e.ts) for e in before + after}
            recs.poll_until(lambda c: want <= set(c.answered()), 90, "answers to the events around the bad one")
            dead = dlq.poll_until(lambda c: len(c.messages) >= 1, 30, "the unreadable record in the dlq")
            assert len(dead.messages) == 1
            m = dead.messages[0]
            h = dict(m.headers())
            assert h["gruflow-reason"] == ev.UNREADABLE_RECORD.encode()
            assert h["gruflow-topic"].decode() == clicks and int(h["gruflow-partition"]) == p == m.partition()
            assert int(h["gruflow-offset"]) == bad_offset
            assert (m.key(), m.value()) == (user.encode(), bad_value)  # original bytes, as they were read
            assert repr(BAD_NAME) in h["gruflow-detail"].decode()
            assert (user, 1_764_000_000_500) not in recs.seen.answered()
            assert worker.wait_metric("gruflow_dlq_total", lambda v: v == 1, reason=ev.UNREADABLE_RECORD)
            assert worker.proc.poll() is None and worker.get("/livez")[0] == 200
            worker.kill()  # no last commit: the restart may read the bad record again, and must pass it again
        with WorkerProc(kafka, settings, model_path, tmp_path, name="restarted") as worker:
            produce(settings, later)
            recs.poll_until(lambda c: (user, later[0].ts) in c.answered(), 90, "an answer after the restart")
            wait_committed(settings, clicks, p, lambda offset: offset > bad_offset, "past the unreadable record")
            dead = dlq.drain(2.0)
            # the same record each time; a second copy only where a restart may repeat output (at-least-once)
            assert {(int(dict(m.headers())["gruflow-offset"]), m.value()) for m in dead.messages} == \
                {(bad_offset, bad_value)}
            assert len(dead.messages) == 1 if exactly_once else len(dead.messages) <= 2
            assert worker.proc.poll() is None
        # and a restart after the commit reads past it
        with WorkerProc(kafka, settings, model_path, tmp_path, name="restarted-again") as worker:
            produce(settings, [Ev(user, "i4", 1_764_000_019_000)])
            recs.poll_until(lambda c: (user, 1_764_000_019_000) in c.answered(), 90, "an answer after the commit")
            assert len(dlq.drain(2.0).messages) == len(dead.messages)
            assert worker.proc.poll() is None
    finally:
        dlq.close()
        recs.close()


def test_header_values_that_are_null_or_not_utf8_are_processed(kafka, tmp_path: Path, model_path: Path) -> None:
    """The client reads these: the events are answered and nothing goes to the dlq."""
    settings = kafka.settings(partitions=2)
    ensure_topics(settings)
    clicks = settings.topic("clicks")
    events = [Ev("u-h1", "i1", 1_764_000_000_000), Ev("u-h2", "i2", 1_764_000_000_100),
              Ev("u-h3", "i3", 1_764_000_000_200)]
    headers = [[(b"trace", None)], [(b"trace", b"\xff\xfe\x00")], [(b"", b"")]]
    after = make_events(n_users=3, per_user=2, seed=13, t0=1_764_000_001_000)
    dlq = TopicReader(settings, settings.topic("dlq"))
    recs = TopicReader(settings, settings.topic("recommendations"))
    try:
        with WorkerProc(kafka, settings, model_path, tmp_path) as worker:
            for e, h in zip(events, headers):
                produce_with_header(settings, "confluent-kafka", clicks, partition_of(e.user, 2), e.user.encode(),
                                    e.value(), h)
            produce(settings, after)
            want = {(e.user, e.ts) for e in events + after}
            recs.poll_until(lambda c: want <= set(c.answered()), 90, "answers to the events with odd headers")
            assert dlq.drain(2.0).messages == []
            assert worker.metric("gruflow_dlq_total") == 0
            assert worker.proc.poll() is None
    finally:
        dlq.close()
        recs.close()


@pytest.mark.parametrize("compression", ["gzip", "snappy", "lz4", "zstd"])
def test_batches_compressed_with_every_kafka_codec_are_processed(kafka, tmp_path: Path, model_path: Path,
                                                                 compression: str) -> None:
    """aiokafka reads snappy, lz4 and zstd only with cramjam, a dependency of gruflow for this reason
    (without it such a batch would be one ``unreadable_record`` dead letter, see stream/kafka/record_guard.py)."""
    from confluent_kafka import Producer

    from stream.kafka.config import producer_config

    settings = kafka.settings(partitions=2)
    ensure_topics(settings)
    events = make_events(n_users=6, per_user=5, seed=14)
    recs = TopicReader(settings, settings.topic("recommendations"))
    dlq = TopicReader(settings, settings.topic("dlq"))
    try:
        with WorkerProc(kafka, settings, model_path, tmp_path) as worker:
            p = Producer({**producer_config(settings), "compression.type": compression, "linger.ms": 50})
            for e in events:
                p.produce(settings.topic(e.kind), e.value(), e.user.encode())
            assert p.flush(30) == 0
            want = {(e.user, e.ts) for e in events}
            recs.poll_until(lambda c: want <= set(c.answered()), 90, f"answers to {compression} batches")
            assert dlq.drain(1.0).messages == []
            assert worker.proc.poll() is None
    finally:
        recs.close()
        dlq.close()


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_transaction_markers_are_passed_and_aborted_events_follow_the_isolation_level(
        kafka, tmp_path: Path, model_path: Path, guarantee: str) -> None:
    """Control records (commit/abort markers) take offsets but are no events: aiokafka skips them, and the
    worker's offsets move past them. Aborted events are read under read_uncommitted (at_least_once), skipped
    under read_committed (exactly_once)."""
    from confluent_kafka import OFFSET_INVALID, Producer

    from stream.kafka.config import producer_config

    settings = kafka.settings(partitions=2, processing_guarantee=guarantee)
    ensure_topics(settings)
    committed_events = make_events(n_users=4, per_user=2, seed=15)
    aborted_events = make_events(n_users=4, per_user=1, seed=16, t0=committed_events[-1].ts + 10_000)
    after = make_events(n_users=4, per_user=2, seed=17, t0=aborted_events[-1].ts + 10_000)
    read_committed = guarantee == "exactly_once"
    recs = TopicReader(settings, settings.topic("recommendations"), read_committed=read_committed)
    try:
        with WorkerProc(kafka, settings, model_path, tmp_path) as worker:
            p = Producer({**producer_config(settings), "transactional.id": f"{settings.process.app_id}-test-tx"})
            p.init_transactions(30)
            for events, commit in ((committed_events, True), (aborted_events, False)):
                p.begin_transaction()
                for e in events:
                    p.produce(settings.topic(e.kind), e.value(), e.user.encode())
                p.flush(30)
                (p.commit_transaction if commit else p.abort_transaction)(30)
            produce(settings, after)
            want = {(e.user, e.ts) for e in committed_events + after}
            seen = recs.poll_until(lambda c: want <= set(c.answered()), 90, "answers around the markers")
            aborted = {(e.user, e.ts) for e in aborted_events}
            answered_aborted = aborted & set(recs.drain(2.0).answered())
            assert answered_aborted == (set() if read_committed else aborted)
            assert worker.proc.poll() is None and seen.messages
            # every record of each partition, markers included, ends up behind the group's committed offset
            for part in range(settings.topics.partitions):
                high = high_watermark(settings, settings.topic("clicks"), part)
                want_offset = high if high else OFFSET_INVALID  # an empty partition has nothing to commit
                wait_committed(settings, settings.topic("clicks"), part, lambda o: o == want_offset,
                               f"the log end {high}")
    finally:
        recs.close()

