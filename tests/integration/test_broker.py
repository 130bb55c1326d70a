"""The embedded Apache Kafka broker, gruflow's topics and client configs, against the real broker."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from stream.kafka.config import admin_config, consumer_config, producer_config
from stream.kafka.topics import TopicError, TopicNames, changelog_topic, ensure_topics

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _consume(settings, topic: str, expected: int, timeout: float = 120.0, **extra) -> list:
    """Every message of ``topic`` from the beginning: all partitions assigned explicitly at their start
    (no group join, no 'latest' race), read until each partition reached the end offset it had when
    reading began (and at least ``expected`` messages arrived), or ``timeout`` passed."""
    consumer = Consumer(consumer_config(settings, group_id=None, **{"enable.partition.eof": True, **extra}))
    messages: list = []
    try:
        n = len(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(n)}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(n)])
        reached = {p for p, end in ends.items() if end <= 0}
        deadline = time.monotonic() + timeout
        while (len(reached) < n or len(messages) < expected) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                if msg.offset() >= ends[msg.partition()]:  # transaction markers take the last offsets
                    reached.add(msg.partition())
                continue
            messages.append(msg)
            if msg.offset() + 1 >= ends[msg.partition()]:
                reached.add(msg.partition())
    finally:
        consumer.close()
    return messages


def test_broker_answers(kafka):
    metadata = AdminClient(admin_config(kafka.settings())).list_topics(timeout=10)
    assert len(metadata.brokers) == 1
    if kafka.embedded:
        assert kafka.broker.running
        assert kafka.bootstrap_servers.startswith("127.0.0.1:")


def test_ensure_topics_creates_partitions_and_configs(kafka):
    settings = kafka.settings(partitions=4)
    names = ensure_topics(settings)
    assert names == TopicNames.from_settings(settings)
    assert names.changelog == changelog_topic(settings) == f"{settings.process.app_id}-user-state-changelog"

    admin = AdminClient(admin_config(settings))
    topics = admin.list_topics(timeout=10).topics
    for name in (names.clicks, names.purchases, names.recommendations, names.dlq, names.changelog):
        assert len(topics[name].partitions) == settings.topics.partitions, name
    assert len(topics[names.models].partitions) == 1

    resources = [ConfigResource(ConfigResource.Type.TOPIC, n) for n in names]
    configs = {r.name: f.result(10) for r, f in admin.describe_configs(resources).items()}
    for name in (names.changelog, names.models):
        assert configs[name]["cleanup.policy"].value == "compact", name
    for name in (names.clicks, names.purchases, names.recommendations, names.dlq):
        assert configs[name]["cleanup.policy"].value == "delete", name
    assert int(configs[names.models]["max.message.bytes"].value) > 8 * 1024 * 1024

    assert ensure_topics(settings) == names  # idempotent
    with pytest.raises(TopicError, match="partitions"):
        ensure_topics(settings.replace(partitions=3))


def test_produce_consume_round_trip(kafka):
    settings = kafka.settings(partitions=4)
    names = ensure_topics(settings)
    producer = Producer(producer_config(settings))
    sent = {f"user-{i}".encode(): f'{{"n": {i}}}'.encode() for i in range(300)}
    for key, value in sent.items():
        producer.produce(names.clicks, key=key, value=value)
    assert producer.flush(30) == 0
    received = _consume(settings, names.clicks, len(sent))
    assert {m.key(): m.value() for m in received} == sent


def test_keys_land_on_the_partition_faust_expects(kafka):
    """confluent producers (murmur2_random) and aiokafka's DefaultPartitioner (faust) agree on every key."""
    from aiokafka.partitioner import DefaultPartitioner

    settings = kafka.settings(partitions=8)
    names = ensure_topics(settings)
    producer = Producer(producer_config(settings))
    landed: dict[bytes, int] = {}

    def on_delivery(err, msg):
        assert err is None, err
        landed[msg.key()] = msg.partition()

    keys = [f"user-{i}".encode() for i in range(400)] + [str(i).encode() for i in range(100)] + ["ünïcode".encode()]
    for key in keys:
        producer.produce(names.purchases, key=key, value=b"{}", on_delivery=on_delivery)
    assert producer.flush(30) == 0
    partitions = list(range(settings.topics.partitions))
    expected = {key: DefaultPartitioner()(key, partitions, partitions) for key in keys}
    assert landed == expected
    assert len(set(landed.values())) == settings.topics.partitions  # the keys spread over all partitions


def test_aiokafka_reads_what_confluent_wrote(kafka):
    """faust's transport (aiokafka) speaks to this Kafka version: consumer group join, fetch, commit."""
    from aiokafka import AIOKafkaConsumer

    settings = kafka.settings(partitions=2)
    names = ensure_topics(settings)
    producer = Producer(producer_config(settings))
    for i in range(50):
        producer.produce(names.clicks, key=f"u{i}".encode(), value=str(i).encode())
    assert producer.flush(30) == 0

    async def read() -> list[bytes]:
        consumer = AIOKafkaConsumer(
            names.clicks, bootstrap_servers=kafka.bootstrap_servers, group_id=settings.process.app_id,
            auto_offset_reset="earliest", enable_auto_commit=False, session_timeout_ms=6000,
        )
        await consumer.start()
        values: list[bytes] = []
        try:
            deadline = time.monotonic() + 30
            while len(values) < 50 and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=500)
                values += [r.value for records in batches.values() for r in records]
            await consumer.commit()
        finally:
            await consumer.stop()
        return values

    values = asyncio.run(read())
    assert sorted(int(v) for v in values) == list(range(50))


def test_transactions_commit_and_abort(kafka):
    settings = kafka.settings(partitions=2)
    names = ensure_topics(settings)
    producer = Producer(producer_config(settings, transactional_id=f"{settings.process.app_id}-tx"))
    producer.init_transactions(30)
    producer.begin_transaction()
    for i in range(10):
        producer.produce(names.recommendations, key=b"u", value=f"committed-{i}".encode())
    producer.commit_transaction(30)
    producer.begin_transaction()
    for i in range(10):
        producer.produce(names.recommendations, key=b"u", value=f"aborted-{i}".encode())
    assert producer.flush(30) == 0  # on the broker, then aborted (unflushed ones would just be purged)
    producer.abort_transaction(30)
    producer.begin_transaction()
    producer.produce(names.recommendations, key=b"u", value=b"last")
    producer.commit_transaction(30)

    committed = _consume(settings, names.recommendations, 11, isolation_level="read_committed")
    values = [m.value().decode() for m in committed]
    assert values == [f"committed-{i}" for i in range(10)] + ["last"]
    uncommitted = _consume(settings, names.recommendations, 21, isolation_level="read_uncommitted")
    assert len([m for m in uncommitted if m.value().startswith(b"aborted")]) == 10


def test_aiokafka_transactions_with_offsets(kafka):
    """faust's exactly-once mode relies on aiokafka's transactional producer, including committing the
    consumer's offsets inside the transaction (send_offsets_to_transaction)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition as AioTP

    settings = kafka.settings(partitions=1)
    names = ensure_topics(settings)
    producer = Producer(producer_config(settings))
    for i in range(5):
        producer.produce(names.clicks, key=b"u", value=str(i).encode())
    assert producer.flush(30) == 0
    group = settings.process.app_id

    async def process() -> None:
        consumer = AIOKafkaConsumer(names.clicks, bootstrap_servers=kafka.bootstrap_servers, group_id=group,
                                    auto_offset_reset="earliest", enable_auto_commit=False,
                                    isolation_level="read_committed", session_timeout_ms=6000)
        tx = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, transactional_id=f"{group}-eos")
        await consumer.start()
        await tx.start()
        try:
            records = []
            deadline = time.monotonic() + 30
            while len(records) < 5 and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=500)
                records += [r for rs in batches.values() for r in rs]
            async with tx.transaction():
                for r in records:
                    await tx.send(names.recommendations, key=r.key, value=b"rec-" + r.value)
                await tx.send_offsets_to_transaction({AioTP(names.clicks, 0): records[-1].offset + 1}, group)
        finally:
            await tx.stop()
            await consumer.stop()

    asyncio.run(process())
    out = _consume(settings, names.recommendations, 5, isolation_level="read_committed")
    assert [m.value() for m in out] == [f"rec-{i}".encode() for i in range(5)]
    committed = Consumer(consumer_config(settings, group_id=group)).committed([TopicPartition(names.clicks, 0)], 10)
    assert committed[0].offset == 5


# --------------------------------------------------------------------------- replay and tail

DATA = REPO.parent / "shared" / "data"


def test_replay_delivers_every_event_keyed_and_in_order(kafka):
    from aiokafka.partitioner import DefaultPartitioner

    from model.synthetic import generate
    from stream.tools.replay import replay

    settings = kafka.settings(partitions=4)
    names = ensure_topics(settings)
    df = generate(n_sessions=150, n_items=60, seed=3)
    stats = replay(settings, df, progress=False)
    assert (stats.events, stats.delivered, stats.failed) == (len(df), len(df), 0)

    purchases = int((df["EventType"] == 3).sum())
    assert stats.by_topic[names.purchases] == purchases
    received = _consume(settings, names.clicks, len(df) - purchases) + _consume(settings, names.purchases, purchases)
    assert len(received) == len(df)
    partitions = list(range(settings.topics.partitions))
    last_ts: dict[bytes, int] = {}
    for msg in sorted(received, key=lambda m: (m.topic(), m.partition(), m.offset())):
        event = orjson.loads(msg.value())
        assert msg.key() == event["user_id"].encode()
        assert (event["event_type"] == "purchase") == (msg.topic() == names.purchases)
        assert msg.partition() == DefaultPartitioner()(msg.key(), partitions, partitions)
        if msg.topic() == names.clicks:  # per user, in event-time order
            assert event["ts"] >= last_ts.get(msg.key(), 0)
            last_ts[msg.key()] = event["ts"]
    sent = sorted((str(r.SessionId), r.ItemId, int(round(r.Time * 1000))) for r in df.itertuples())
    got = sorted((e["user_id"], e["item_id"], e["ts"]) for e in (orjson.loads(m.value()) for m in received))
    assert got == sent


def test_replay_command_on_real_data(kafka):
    """`gruflow replay` wiring: argparse helpers, topic creation, rate cap, a public session dataset."""
    import argparse

    from stream.tools.replay import add_replay_args, run_replay

    path = DATA / "yoochoose_rsc15_100k" / "yoochoose-clicks-100k_test.txt"
    if not path.is_file():
        pytest.skip(f"dataset not present: {path}")
    settings = kafka.settings(partitions=2)
    args = add_replay_args(argparse.ArgumentParser()).parse_args(
        [str(path), "--format", "session-rec", "--limit", "500", "--rate", "5000", "--no-progress"])
    assert run_replay(args, settings) == 0
    assert len(_consume(settings, settings.topic("clicks"), 500)) == 500


def test_tail_prints_recommendations(kafka):
    import argparse
    import io

    from stream.tools.tail import add_tail_args, run_tail, tail

    settings = kafka.settings(partitions=2)
    names = ensure_topics(settings)
    producer = Producer(producer_config(settings))
    for n in range(6):
        rec = {"user_id": f"u{n}", "items": [{"item_id": "i1", "score": 0.5}], "model_version": 1,
               "event_ts": 1000, "published_ts": 1003}
        producer.produce(names.recommendations, key=f"u{n}".encode(), value=orjson.dumps(rec))
    assert producer.flush(30) == 0

    out = io.StringIO()
    assert tail(settings, from_beginning=True, max_messages=6, out=out, idle_timeout=30) == 6
    lines = out.getvalue().splitlines()
    assert sorted(line.split()[0] for line in lines) == [f"user=u{n}" for n in range(6)]
    args = add_tail_args(argparse.ArgumentParser()).parse_args(["--from-beginning", "--max", "2", "--json"])
    assert run_tail(args, settings) == 0


# --------------------------------------------------------------------------- no orphaned JVMs

def _java_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not yet reaped) counts as dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_dead(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _java_alive(pid):
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def needs_embedded(kafka):
    if not kafka.embedded:
        pytest.skip("GRUFLOW_BOOTSTRAP_SERVERS is set: embedded broker lifecycle not under test")


def test_context_exit_stops_the_jvm(needs_embedded):
    from stream.kafka.broker import EmbeddedKafka

    with EmbeddedKafka(quiet=True) as broker:
        pid, run_dir = broker.pid, broker.run_dir
        assert _java_alive(pid)
        assert run_dir is not None and run_dir.is_dir()
    assert _wait_dead(pid, 5)
    assert not run_dir.exists()
    broker.stop()  # idempotent


_OWNER = textwrap.dedent("""
    import sys, threading, time
    from stream.kafka.broker import EmbeddedKafka
    broker = EmbeddedKafka(quiet=True)
    if sys.argv[1] == "thread":
        starter = threading.Thread(target=broker.start)
        starter.start()
        starter.join()
        time.sleep(2)  # the starting thread is gone; the broker must still run
    else:
        broker.start()
    assert broker.running
    print(broker.pid, broker.run_dir, flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("sig,started_in", [(signal.SIGTERM, "main"), (signal.SIGKILL, "thread")],
                         ids=["SIGTERM", "SIGKILL"])
def test_owner_death_stops_the_jvm(needs_embedded, sig, started_in):
    """SIGTERM runs stop() (chained handler, installed from the main thread); SIGKILL leaves it to the
    kernel's parent-death signal, also when the broker was started from a short-lived thread."""
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, started_in], cwd=REPO, stdout=subprocess.PIPE, text=True)
    jvm_pid = run_dir = None
    try:
        line = owner.stdout.readline().split()
        assert line, "the owner process did not start a broker"
        jvm_pid, run_dir = int(line[0]), Path(line[1])
        assert _java_alive(jvm_pid)
        owner.send_signal(sig)
        owner.wait(60)
        assert _wait_dead(jvm_pid), f"JVM {jvm_pid} outlived its owner after {sig.name}"
        if sig != signal.SIGKILL:
            assert not run_dir.exists()
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if jvm_pid is not None and _java_alive(jvm_pid):
            os.killpg(jvm_pid, signal.SIGKILL)
        if run_dir is not None:  # after a SIGKILL nobody removed it (the next broker start would)
            shutil.rmtree(run_dir, ignore_errors=True)


def test_run_forever_serves_topics_until_ctrl_c(needs_embedded, kafka, tmp_path):
    """What `gruflow broker` runs: topics created, address printed, Ctrl-C stops the JVM; exit 0."""
    env = kafka.env(kafka.settings(partitions=3), GRUFLOW_BOOTSTRAP_SERVERS="")
    owner = subprocess.Popen([sys.executable, "-c", "import sys; from stream.kafka.broker import run_forever; "
                              "sys.exit(run_forever())"], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = owner.stdout.readline().strip()
        assert line.startswith("GRUFLOW_BOOTSTRAP_SERVERS=127.0.0.1:"), line
        settings = kafka.settings(partitions=3).replace(
            bootstrap_servers=line.split("=", 1)[1], topic_prefix=env["GRUFLOW_TOPIC_PREFIX"],
            app_id=env["GRUFLOW_APP_ID"])
        topics = AdminClient(admin_config(settings)).list_topics(timeout=10).topics
        assert all(name in topics for name in TopicNames.from_settings(settings))
        jvm_pids = _java_pids_serving(settings.connection.bootstrap_servers)
        assert len(jvm_pids) == 1
        owner.send_signal(signal.SIGINT)
        assert owner.wait(60) == 0
        assert _wait_dead(jvm_pids[0])
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def _java_pids_serving(bootstrap: str) -> list[int]:
    """JVMs whose server.properties lists this port (read from /proc)."""
    port = bootstrap.rsplit(":", 1)[1]
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kafka.Kafka" in cmdline:
            props = Path(cmdline[-2].decode() if cmdline[-1] == b"" else cmdline[-1].decode())
            try:
                if f"PLAINTEXT://127.0.0.1:{port}," in props.read_text():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids
