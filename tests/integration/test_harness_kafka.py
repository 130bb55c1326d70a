"""The harness's ``kafka_for`` on a real embedded Apache Kafka broker: what bench, bench serve, the
experiments and the demo run on when GRUFLOW_BOOTSTRAP_SERVERS is unset."""

from __future__ import annotations

import socket

import pytest
from confluent_kafka.admin import AdminClient

from stream.settings import Settings
from stream.tools import harness


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_kafka_for_starts_an_embedded_broker_and_stops_it_also_on_error() -> None:
    base = Settings.from_env().replace(bootstrap_servers="")  # names no cluster: the embedded broker runs
    port = 0
    with pytest.raises(RuntimeError, match="the block failed"):
        with harness.kafka_for(base, quiet=True) as settings:
            assert not settings.embedded
            port = int(settings.connection.bootstrap_servers.rsplit(":", 1)[1])
            metadata = AdminClient({"bootstrap.servers": settings.connection.bootstrap_servers}).list_topics(timeout=30)
            assert metadata.brokers, "the embedded broker does not answer"
            with harness.kafka_for(settings) as same:  # now a cluster is named: nothing more is started
                assert same is settings
            raise RuntimeError("the block failed")
    assert port and _refused(port), f"the embedded broker on port {port} still listens after the block"
