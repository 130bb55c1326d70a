"""An optional SASL OAUTHBEARER listener for the embedded broker, so that gruflow's OAUTHBEARER clients
(librdkafka's, and aiokafka's token provider in stream/kafka/passthrough.py) are tested against a real
Apache Kafka broker rather than at the configuration level only.

The listener is SASL_PLAINTEXT and validates tokens with Kafka's default OAUTHBEARER server callback,
the unsecured JWS validator: it accepts an unsigned JWT (``alg: none``) with a ``sub`` claim and a
``exp`` in the future, i.e. what librdkafka's ``enable.sasl.oauthbearer.unsecure.jwt=true`` and
``passthrough.unsecured_jwt`` make. Development and tests only; a production cluster validates signed
tokens against its identity provider's keys. The broker's own traffic stays on its PLAINTEXT listener.
"""

from __future__ import annotations

from stream.settings import Settings

LISTENER = "OAUTH"  # the listener's name in server.properties (listener.name.oauth.*)
BROKER_SUB = "gruflow-broker"  # the principal of the broker's own (unused) login on that listener
LOGIN_MODULE = "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule"


def with_oauthbearer_listener(props: dict[str, str], host: str, port: int) -> dict[str, str]:
    """``props`` (the embedded broker's server.properties) plus a SASL_PLAINTEXT listener on ``host:port``
    that takes OAUTHBEARER only, validated by Kafka's unsecured JWS validator (its default)."""
    name = LISTENER.lower()
    out = dict(props)
    out["listeners"] = f"{props['listeners']},{LISTENER}://{host}:{port}"
    out["advertised.listeners"] = f"{props['advertised.listeners']},{LISTENER}://{host}:{port}"
    out["listener.security.protocol.map"] = f"{props['listener.security.protocol.map']},{LISTENER}:SASL_PLAINTEXT"
    out[f"listener.name.{name}.sasl.enabled.mechanisms"] = "OAUTHBEARER"
    out[f"listener.name.{name}.oauthbearer.sasl.jaas.config"] = (
        f'{LOGIN_MODULE} required unsecuredLoginStringClaim_sub="{BROKER_SUB}";')
    return out


def oauthbearer_client_settings(base: Settings, bootstrap_servers: str, principal: str) -> Settings:
    """``base`` as a client of that listener: SASL_PLAINTEXT, OAUTHBEARER, unsecured JWTs naming ``principal``
    (librdkafka's own properties; gruflow's aiokafka clients get a token provider made from the same ones)."""
    return base.replace(
        bootstrap_servers=bootstrap_servers, security_protocol="SASL_PLAINTEXT", sasl_mechanism="OAUTHBEARER",
        librdkafka_config=f"enable.sasl.oauthbearer.unsecure.jwt=true;sasl.oauthbearer.config=principal={principal}")
