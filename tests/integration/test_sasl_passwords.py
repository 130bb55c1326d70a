"""SASL PLAIN and SCRAM against a real Apache Kafka broker: the embedded broker's SASL listener
(stream/kafka/broker_sasl.py; PLAIN's user in the listener's JAAS line, SCRAM users stored in the cluster
through the admin API at the session's start) and gruflow's clients configured only through settings, as an
operator would (GRUFLOW_SECURITY_PROTOCOL=SASL_PLAINTEXT, GRUFLOW_SASL_MECHANISM, GRUFLOW_SASL_USERNAME,
GRUFLOW_SASL_PASSWORD):

- librdkafka (confluent-kafka): admin (topic creation), producer and group-less consumer, per mechanism;
- aiokafka with the configuration gruflow derives (``aiokafka_config``): producer and a group consumer;
- a whole worker (faust's consumer with its SASL credentials, gruflow's producers) over SCRAM-SHA-512 only.

Controls: the listener refuses a wrong password for each mechanism, so the passes above mean the broker
checked what gruflow's clients sent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from saslkit import aiokafka_read, aiokafka_send, librdkafka_round_trip, worker_answers_over_sasl
from stream.kafka.topics import ensure_topics

pytestmark = pytest.mark.integration

MECHANISMS = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_librdkafka_clients_authenticate_with_a_password(kafka, mechanism: str) -> None:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from stream.kafka.config import admin_config

    settings = kafka.password_settings(mechanism, partitions=2)
    librdkafka_round_trip(settings, kafka)
    # control: the same listener refuses the same user with a wrong password
    wrong = {**admin_config(settings), "sasl.password": "not-the-password"}
    with pytest.raises(KafkaException):
        AdminClient(wrong).list_topics(timeout=5)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_aiokafka_clients_authenticate_with_a_password(kafka, mechanism: str) -> None:
    from stream.kafka.config import aiokafka_config

    settings = kafka.password_settings(mechanism, partitions=2)
    names = ensure_topics(settings)
    config = aiokafka_config(settings)
    assert (config["sasl_mechanism"], config["security_protocol"]) == (mechanism, "SASL_PLAINTEXT")
    sent = [f"a{n}".encode() for n in range(5)]
    assert aiokafka_send(config, names.dlq, sent) is None
    assert sorted(aiokafka_read(config, names.dlq, f"{settings.process.app_id}-read", sent[-1])) == sent
    # control: a wrong password is refused
    assert aiokafka_send(config, names.dlq, [b"never"], sasl_plain_password="not-the-password") is not None


def test_a_worker_answers_over_scram_only(kafka, tmp_path: Path) -> None:
    settings = kafka.password_settings("SCRAM-SHA-512", partitions=2, top_k=5)
    assert settings.connection.sasl_mechanism == "SCRAM-SHA-512"
    worker_answers_over_sasl(kafka, settings, tmp_path, "scram", seed=19)
