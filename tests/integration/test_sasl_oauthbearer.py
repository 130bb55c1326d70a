"""SASL OAUTHBEARER against a real Apache Kafka broker: the embedded broker's OAUTHBEARER listener
(stream/kafka/broker_sasl.py: SASL_PLAINTEXT, Kafka's default unsecured JWS validator) and gruflow's clients
configured only through settings, as an operator would (GRUFLOW_SECURITY_PROTOCOL=SASL_PLAINTEXT,
GRUFLOW_SASL_MECHANISM=OAUTHBEARER, librdkafka's ``enable.sasl.oauthbearer.unsecure.jwt=true`` and
``sasl.oauthbearer.config=principal=...`` in GRUFLOW_LIBRDKAFKA_CONFIG):

- librdkafka (confluent-kafka): admin (topic creation), producer, group-less consumer;
- aiokafka, through the token provider gruflow builds from the same properties (passthrough.py): producer
  and a group consumer, as faust's consumer connects;
- a whole worker (faust's aiokafka consumer with ``OAuthCredentials``, gruflow's producers, the item-rules
  reader) answering events over that listener only.

Controls: the listener refuses a token that is not a JWT, and an expired one, so the passes above mean the
broker checked the tokens gruflow's clients sent.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from saslkit import aiokafka_read, aiokafka_send, librdkafka_round_trip, worker_answers_over_sasl
from stream.kafka.passthrough import unsecured_jwt
from stream.kafka.topics import ensure_topics

pytestmark = pytest.mark.integration


def test_librdkafka_clients_authenticate_with_oauthbearer(kafka) -> None:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    librdkafka_round_trip(kafka.oauthbearer_settings(partitions=2), kafka)
    # control: the same listener refuses a token that is not a JWT
    refused = AdminClient({"bootstrap.servers": kafka.sasl_servers, "security.protocol": "SASL_PLAINTEXT",
                           "sasl.mechanism": "OAUTHBEARER", "oauth_cb": lambda _cfg: ("not-a-jwt", time.time() + 600)})
    with pytest.raises(KafkaException):
        refused.list_topics(timeout=5)


def failed_authentications(kafka) -> int:
    """Lines of the broker's log that report a refused client authentication."""
    log = kafka.broker.log_file
    return log.read_text(errors="replace").count("Failed authentication with") if log.is_file() else 0


def test_aiokafka_clients_authenticate_with_gruflows_token_provider(kafka) -> None:
    from aiokafka.abc import AbstractTokenProvider

    from stream.kafka.config import aiokafka_config

    settings = kafka.oauthbearer_settings(partitions=2)
    names = ensure_topics(settings)
    config = aiokafka_config(settings)
    assert config["sasl_mechanism"] == "OAUTHBEARER" and config["security_protocol"] == "SASL_PLAINTEXT"

    class Expired(AbstractTokenProvider):
        async def token(self) -> str:
            return unsecured_jwt("gruflow-test", 60, now_s=time.time() - 3600)

    group = f"{settings.process.app_id}-"
    sent = [f"a{n}".encode() for n in range(5)]
    assert aiokafka_send(config, names.dlq, sent) is None
    assert sorted(aiokafka_read(config, names.dlq, group + "first", sent[-1])) == sent
    # control: an expired token is refused by the broker. aiokafka (0.14) does not read the broker's error
    # challenge: it logs "Authenticated via OAUTHBEARER", and the refusal surfaces as failed requests
    before = failed_authentications(kafka)
    error = aiokafka_send(config, names.dlq, [b"never"], sasl_oauth_token_provider=Expired())
    assert error is not None, "the listener accepted an expired token: it checks nothing"
    assert failed_authentications(kafka) > before, "the broker did not log the refused authentication"
    assert aiokafka_send(config, names.dlq, [b"after"]) is None
    assert aiokafka_read(config, names.dlq, group + "second", b"after") == [*sent, b"after"]


def test_a_worker_answers_over_oauthbearer_only(kafka, tmp_path: Path) -> None:
    worker_answers_over_sasl(kafka, kafka.oauthbearer_settings(partitions=2, top_k=5), tmp_path, "oauth", seed=17)
