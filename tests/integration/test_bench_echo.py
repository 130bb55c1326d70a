"""The bench's latency peer (``stream.lab.echo``) against the real broker: each event answered once, on its
own key and partition, with the event's time and a publication stamp after it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
from aiokafka.partitioner import murmur2
from confluent_kafka import Producer

from stream.kafka.config import producer_config
from stream.tools.processes import stop_process
from stream.kafka.topics import ensure_topics
from workerkit import TopicReader


def test_the_echo_answers_every_event_on_its_key_and_partition(kafka, tmp_path):
    settings = kafka.settings(partitions=4)
    ensure_topics(settings)
    log = tmp_path / "echo.log"
    echo = subprocess.Popen([sys.executable, "-m", "stream.lab.echo"], env=kafka.env(settings),
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 60
        while b"echo ready" not in log.read_bytes():
            assert echo.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        p = Producer(producer_config(settings))
        p.produce(settings.topic("clicks"), b"not json", b"u0")  # skipped: u0's events after it are answered
        sent = {}
        for i in range(40):
            user, ts = f"u{i % 7}", 1_700_000_000_000 + i
            p.produce(settings.topic("clicks"), orjson.dumps({"user_id": user, "item_id": i, "event_type": "view",
                                                              "ts": ts}), user.encode())
            sent[(user, ts)] = None
        assert p.flush(30) == 0
        reader = TopicReader(settings, settings.topic("recommendations"))
        try:
            reader.poll_until(lambda seen: len(seen.messages) >= len(sent), 60, "the echo's answers")
            got = reader.drain(1.0).messages  # and nothing more: each event answered once
        finally:
            reader.close()
        assert echo.poll() is None, log.read_text()
    finally:
        stop_process(echo)
    assert len(got) == len(sent)
    for m in got:
        doc = orjson.loads(m.value())
        assert m.key() == doc["user_id"].encode() and doc["items"] == []
        assert (doc["user_id"], doc["event_ts"]) in sent
        assert doc["published_ts"] > doc["event_ts"]
        # the input's partition: the events' producer partitions by murmur2, like every gruflow producer
        assert m.partition() == (murmur2(m.key()) & 0x7FFFFFFF) % 4
    assert {(orjson.loads(m.value())["user_id"], orjson.loads(m.value())["event_ts"]) for m in got} == set(sent)
