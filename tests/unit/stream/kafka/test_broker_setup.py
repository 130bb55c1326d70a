"""The embedded broker's setup steps that need no JVM: tool discovery, the jar cache, the config files."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from stream.kafka import broker, broker_process, broker_sasl, broker_setup
from stream.kafka.broker_setup import BrokerError, default_cache_dir, find_java, find_mvn, kafka_version, resolve_jars
from stream.settings import Settings


def _fake_java(directory: Path, version_line: str) -> Path:
    java = directory / "java"
    java.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    return java


def test_missing_java_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(BrokerError) as info:
        find_java()
    message = str(info.value)
    assert "Java 17" in message and "openjdk-17" in message
    assert "GRUFLOW_BOOTSTRAP_SERVERS" in message and "docker compose" in message


def test_old_java_is_refused_new_java_is_taken(monkeypatch, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    (new / "bin").mkdir(parents=True)
    _fake_java(old, 'java version "1.8.0_292"')
    monkeypatch.setenv("PATH", str(old))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(BrokerError, match=r"version 8"):
        find_java()
    _fake_java(new / "bin", 'openjdk version "21.0.2" 2024-01-16')
    monkeypatch.setenv("JAVA_HOME", str(new))
    assert find_java() == str(new / "bin" / "java")


def test_missing_maven_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match="apt-get install maven"):
        find_mvn()


def test_resolved_cache_is_reused_without_maven(monkeypatch, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / f"kafka_2.13-{kafka_version()}.jar").write_bytes(b"")
    (tmp_path / ".resolved").write_text(hashlib.sha256(broker_setup.POM.read_bytes()).hexdigest() + "\n")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    assert resolve_jars(tmp_path) == lib


def test_stale_cache_needs_maven(monkeypatch, tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / ".resolved").write_text("another pom\n")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    with pytest.raises(BrokerError, match="Maven"):
        resolve_jars(tmp_path)


def test_cache_dir_setting_and_default(monkeypatch, tmp_path):
    assert default_cache_dir(Settings.of(kafka_cache_dir=str(tmp_path))) == tmp_path
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "gruflow" / f"kafka-{kafka_version()}"
    assert Settings.from_env({"GRUFLOW_KAFKA_CACHE_DIR": "/c"}).broker.kafka_cache_dir == "/c"


def test_kafka_version_is_4x():
    assert kafka_version().split(".")[0] == "4"


def test_server_properties_single_node_kraft(tmp_path):
    text = broker_setup.server_properties(19092, 19093, tmp_path / "data")
    props = dict(line.split("=", 1) for line in text.splitlines())
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert props["log.dirs"] == str(tmp_path / "data")
    assert props["auto.create.topics.enable"] == "false"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert int(props["message.max.bytes"]) > 8 * 1024 * 1024
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor",
                "transaction.state.log.min.isr"):
        assert props[key] == "1"


def test_cluster_ids_never_look_like_options():
    ids = {broker_setup._random_cluster_id() for _ in range(500)}
    assert len(ids) == 500
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)


def test_stale_run_dirs_of_dead_owners_are_swept(monkeypatch, tmp_path):
    monkeypatch.setattr(broker_process.tempfile, "gettempdir", lambda: str(tmp_path))
    dead, alive = tmp_path / f"{broker_process.RUN_DIR_PREFIX}dead", tmp_path / f"{broker_process.RUN_DIR_PREFIX}alive"
    for path, pid in ((dead, 2**22 + 12345), (alive, os.getppid())):
        path.mkdir()
        (path / "owner.pid").write_text(str(pid))
    broker_process._sweep_stale_run_dirs()
    assert not dead.exists() and alive.exists()


def test_a_data_dir_brings_back_its_ports_and_keeps_its_files(tmp_path):
    data_dir = tmp_path / "kafka"
    first = broker.EmbeddedKafka(data_dir=data_dir)
    first._prepare_run_dir()  # first start: free ports, chosen now
    assert first.run_dir == data_dir.resolve() and first.port and first.controller_port != first.port
    broker_setup._write_ports(data_dir, first.port, first.controller_port)  # what a successful format records

    again = broker.EmbeddedKafka(data_dir=data_dir)
    again._prepare_run_dir()
    assert (again.port, again.controller_port) == (first.port, first.controller_port)
    props = (data_dir / "server.properties").read_text()
    assert f"PLAINTEXT://127.0.0.1:{first.port}," in props and str(data_dir.resolve() / "data") in props
    again.stop()
    assert (data_dir / broker_setup.PORTS_FILE).is_file(), "stop() removed a data dir"

    with pytest.raises(BrokerError, match=f"--port {first.port}"):
        broker.EmbeddedKafka(data_dir=data_dir, port=first.port + 1)._prepare_run_dir()


def test_a_formatted_log_dir_is_recognised_with_its_cluster_id(tmp_path):
    assert not broker_setup._is_formatted(tmp_path)
    (tmp_path / "meta.properties").write_text("#\nnode.id=1\ncluster.id=AbC-123_xyz\nversion=1\n")
    assert broker_setup._is_formatted(tmp_path)
    assert broker_setup._cluster_id(tmp_path) == "AbC-123_xyz"


def test_an_unreadable_ports_file_is_an_error_not_new_ports(tmp_path):
    (tmp_path / broker_setup.PORTS_FILE).write_text("{not json")
    with pytest.raises(BrokerError, match="unreadable"):
        broker.EmbeddedKafka(data_dir=tmp_path)._prepare_run_dir()


def test_the_sasl_listener_is_an_option_of_the_broker_config(tmp_path):
    def props(text: str) -> dict[str, str]:
        return dict(line.split("=", 1) for line in text.splitlines() if line)

    plain = props(broker_setup.server_properties(9092, 9093, tmp_path))
    assert "SASL" not in plain["listeners"] and not [k for k in plain if "sasl" in k]
    sasl = props(broker_setup.server_properties(9092, 9093, tmp_path, sasl_port=9094))
    assert sasl["listeners"] == plain["listeners"] + ",SASL://127.0.0.1:9094"
    assert sasl["advertised.listeners"] == plain["advertised.listeners"] + ",SASL://127.0.0.1:9094"
    assert sasl["listener.security.protocol.map"].endswith(",SASL:SASL_PLAINTEXT")
    assert sasl["listener.name.sasl.sasl.enabled.mechanisms"] == "OAUTHBEARER,PLAIN,SCRAM-SHA-256,SCRAM-SHA-512"
    assert sasl["listener.name.sasl.oauthbearer.sasl.jaas.config"].startswith(
        "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required ")
    user, password = broker_sasl.PLAIN_USER
    assert sasl["listener.name.sasl.plain.sasl.jaas.config"] == (
        f'org.apache.kafka.common.security.plain.PlainLoginModule required user_{user}="{password}";')
    for mechanism in ("scram-sha-256", "scram-sha-512"):  # SCRAM users live in the cluster's metadata
        assert sasl[f"listener.name.sasl.{mechanism}.sasl.jaas.config"] == (
            "org.apache.kafka.common.security.scram.ScramLoginModule required;")
    assert sasl["inter.broker.listener.name"] == "PLAINTEXT"  # the broker's own traffic stays plaintext
    # no server callback handler is named: Kafka's default for OAUTHBEARER is the unsecured JWS validator
    assert not [k for k in sasl if "callback.handler" in k]
