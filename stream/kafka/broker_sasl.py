"""An optional SASL listener for the embedded broker, so that gruflow's SASL clients (librdkafka's, faust's
and aiokafka's) are tested against a real Apache Kafka broker rather than at the configuration level only.

The listener is SASL_PLAINTEXT and takes the mechanisms gruflow supports:

- OAUTHBEARER, validated by Kafka's default server callback, the unsecured JWS validator: it accepts an
  unsigned JWT (``alg: none``) with a ``sub`` claim and an ``exp`` in the future, i.e. what librdkafka's
  ``enable.sasl.oauthbearer.unsecure.jwt=true`` and ``passthrough.unsecured_jwt`` make;
- PLAIN, with one user declared in the listener's JAAS configuration (``PLAIN_USER``);
- SCRAM-SHA-256 and SCRAM-SHA-512, with users whose credentials are stored in the cluster's metadata
  (``add_scram_user``, through the admin API over the PLAINTEXT listener, as an operator would with
  ``kafka-configs.sh --alter --add-config SCRAM-SHA-256=[...]``).

Development and tests only: a production cluster validates signed tokens against its identity provider's
keys and keeps passwords out of its configuration files. The broker's own traffic stays on its PLAINTEXT
listener.
"""

from __future__ import annotations

from stream.settings import Secret, Settings

LISTENER = "SASL"  # the listener's name in server.properties (listener.name.sasl.*)
MECHANISMS = ("OAUTHBEARER", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
BROKER_SUB = "gruflow-broker"  # the principal of the broker's own (unused) OAUTHBEARER login on that listener
PLAIN_USER = ("gruflow-plain", "gruflow-plain-secret")  # the one PLAIN user (name, password)
OAUTH_MODULE = "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule"
PLAIN_MODULE = "org.apache.kafka.common.security.plain.PlainLoginModule"
SCRAM_MODULE = "org.apache.kafka.common.security.scram.ScramLoginModule"


def with_sasl_listener(props: dict[str, str], host: str, port: int) -> dict[str, str]:
    """``props`` (the embedded broker's server.properties) plus a SASL_PLAINTEXT listener on ``host:port``
    that takes ``MECHANISMS``."""
    name = LISTENER.lower()
    out = dict(props)
    out["listeners"] = f"{props['listeners']},{LISTENER}://{host}:{port}"
    out["advertised.listeners"] = f"{props['advertised.listeners']},{LISTENER}://{host}:{port}"
    out["listener.security.protocol.map"] = f"{props['listener.security.protocol.map']},{LISTENER}:SASL_PLAINTEXT"
    out[f"listener.name.{name}.sasl.enabled.mechanisms"] = ",".join(MECHANISMS)
    out[f"listener.name.{name}.oauthbearer.sasl.jaas.config"] = (
        f'{OAUTH_MODULE} required unsecuredLoginStringClaim_sub="{BROKER_SUB}";')
    user, password = PLAIN_USER
    out[f"listener.name.{name}.plain.sasl.jaas.config"] = f'{PLAIN_MODULE} required user_{user}="{password}";'
    for mechanism in ("scram-sha-256", "scram-sha-512"):
        out[f"listener.name.{name}.{mechanism}.sasl.jaas.config"] = f"{SCRAM_MODULE} required;"
    return out


def add_scram_user(bootstrap_servers: str, user: str, password: str, mechanism: str = "SCRAM-SHA-256",
                   timeout_s: float = 30.0) -> None:
    """Store a SCRAM credential for ``user`` in the cluster (the admin API's AlterUserScramCredentials),
    through the PLAINTEXT listener at ``bootstrap_servers``."""
    from confluent_kafka.admin import AdminClient, ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion

    kind = {"SCRAM-SHA-256": ScramMechanism.SCRAM_SHA_256, "SCRAM-SHA-512": ScramMechanism.SCRAM_SHA_512}[mechanism]
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    upsert = UserScramCredentialUpsertion(user, ScramCredentialInfo(kind, 4096), password.encode())
    for future in admin.alter_user_scram_credentials([upsert]).values():
        future.result(timeout=timeout_s)


def oauthbearer_client_settings(base: Settings, bootstrap_servers: str, principal: str) -> Settings:
    """``base`` as an OAUTHBEARER client of that listener: unsecured JWTs naming ``principal`` (librdkafka's
    own properties; gruflow's aiokafka clients get a token provider made from the same ones)."""
    return base.replace(
        bootstrap_servers=bootstrap_servers, security_protocol="SASL_PLAINTEXT", sasl_mechanism="OAUTHBEARER",
        librdkafka_config=f"enable.sasl.oauthbearer.unsecure.jwt=true;sasl.oauthbearer.config=principal={principal}")


def password_client_settings(base: Settings, bootstrap_servers: str, mechanism: str, user: str,
                             password: str) -> Settings:
    """``base`` as a PLAIN or SCRAM client of that listener, configured through gruflow's own settings
    (GRUFLOW_SASL_MECHANISM, GRUFLOW_SASL_USERNAME, GRUFLOW_SASL_PASSWORD)."""
    return base.replace(bootstrap_servers=bootstrap_servers, security_protocol="SASL_PLAINTEXT",
                        sasl_mechanism=mechanism, sasl_username=user, sasl_password=Secret(password))
