"""The output sink's failure path without a broker: an unreachable cluster fails the batch, clearly."""

from __future__ import annotations

import asyncio

import pytest

from stream.kafka.broker import free_port
from stream.settings import Settings
from stream.worker.sinks import BatchSink, Outgoing, SinkError


def test_an_unreachable_cluster_fails_the_batch_and_says_why():
    sink = BatchSink(Settings.of(bootstrap_servers=f"127.0.0.1:{free_port()}"), "recs", "changelog", "dlq")

    async def run() -> None:
        out = Outgoing()
        out.recommendations[0].append((b"user", b"{}"))
        ticket = sink.submit(out)
        await asyncio.wait([ticket.future], timeout=60)
        try:
            ticket.check()
        finally:
            await sink.stop()

    with pytest.raises(SinkError, match="bootstrap"):
        asyncio.run(run())
    assert sink.producer is None  # not half-started: the next batch tries to connect again
