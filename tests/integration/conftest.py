"""Integration fixtures: ONE real Apache Kafka broker per test session (embedded, from Maven jars), or
the cluster in GRUFLOW_BOOTSTRAP_SERVERS when that is set (SASL/SSL settings from the environment too). The
embedded broker also has a SASL listener (``kafka.oauthbearer_settings()``, ``kafka.password_settings()``).

    def test_x(kafka):
        settings = kafka.settings(partitions=4)      # unique topic prefix, app id, data dir, web port
        ensure_topics(settings)
        env = kafka.env(settings)                     # os.environ + GRUFLOW_* for a worker subprocess
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from stream.kafka.broker_sasl import PLAIN_USER
from stream.settings import Settings


# the password users of the embedded broker's SASL listener, by mechanism (PLAIN's is in its JAAS line)
SASL_USERS = {"PLAIN": PLAIN_USER,
              "SCRAM-SHA-256": ("gruflow-scram256", "scram-256-secret"),
              "SCRAM-SHA-512": ("gruflow-scram512", "scram-512-secret")}


@dataclass
class KafkaFixture:
    bootstrap_servers: str
    base: Settings
    tmp_root: Path
    embedded: bool
    broker: Any = None  # the EmbeddedKafka, when embedded
    sasl_servers: str = ""  # its SASL listener (OAUTHBEARER, PLAIN, SCRAM; stream/kafka/broker_sasl.py)
    _counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def settings(self, **overrides: Any) -> Settings:
        """Settings for one test: its own topic prefix, app id (consumer group), data dir and web port, so
        tests never see each other's topics, offsets or state."""
        from stream.kafka.broker_setup import free_port

        n = next(self._counter)
        pid = os.getpid()
        values: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "topic_prefix": f"t{pid}-{n}-",
            "app_id": f"gruflow-test-{pid}-{n}",
            "data_dir": self.tmp_root / f"s{n}",
            "web_host": "127.0.0.1",
            "web_port": free_port(),
        }
        values.update(overrides)
        settings = self.base.replace(**values)
        settings.validate()
        Path(settings.process.data_dir).mkdir(parents=True, exist_ok=True)
        return settings

    def oauthbearer_settings(self, principal: str = "gruflow-test", **overrides: Any) -> Settings:
        """``settings(**overrides)`` as a client of the OAUTHBEARER listener, with unsecured JWTs for
        ``principal``; skips the test where there is no such listener (an external cluster)."""
        from stream.kafka.broker_sasl import oauthbearer_client_settings

        if not self.sasl_servers:
            pytest.skip("no SASL OAUTHBEARER listener: the tests run against an external cluster")
        return oauthbearer_client_settings(self.settings(**overrides), self.sasl_servers, principal)

    def password_settings(self, mechanism: str, **overrides: Any) -> Settings:
        """``settings(**overrides)`` as a PLAIN or SCRAM client of the SASL listener, with the user that
        mechanism knows (SCRAM users are stored in the cluster at the session's start); skips the test where
        there is no such listener (an external cluster)."""
        from stream.kafka.broker_sasl import password_client_settings

        if not self.sasl_servers:
            pytest.skip("no SASL listener: the tests run against an external cluster")
        user, password = SASL_USERS[mechanism]
        return password_client_settings(self.settings(**overrides), self.sasl_servers, mechanism, user, password)

    def env(self, settings: Settings, **extra: str) -> dict[str, str]:
        """os.environ without stray GRUFLOW_* variables, plus every field of ``settings`` as GRUFLOW_*, for
        starting gruflow subprocesses (workers) configured exactly like ``settings``."""
        return settings.subprocess_env(**extra)


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaFixture]:
    tmp_root = tmp_path_factory.mktemp("kafka-settings")
    base = Settings.from_env()
    if base.connection.bootstrap_servers:
        yield KafkaFixture(base.connection.bootstrap_servers, base, tmp_root, embedded=False)
        return
    from stream.kafka.broker import BrokerError, EmbeddedKafka

    broker = EmbeddedKafka.from_settings(base, sasl=True)
    try:
        broker.start()
    except BrokerError as exc:
        pytest.fail(f"cannot start the embedded Apache Kafka broker: {exc}", pytrace=False)
    try:
        from stream.kafka.broker_sasl import add_scram_user

        for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
            add_scram_user(broker.bootstrap_servers, *SASL_USERS[mechanism], mechanism=mechanism)
        yield KafkaFixture(broker.bootstrap_servers, broker.settings(base), tmp_root, embedded=True, broker=broker,
                           sasl_servers=broker.sasl_bootstrap_servers)
    finally:
        broker.stop()
