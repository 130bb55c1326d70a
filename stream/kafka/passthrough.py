"""Client properties passed through to librdkafka (confluent-kafka) and aiokafka by their own names.

``GRUFLOW_LIBRDKAFKA_CONFIG`` holds librdkafka properties (``name=value`` per line or ``;``-separated,
or a JSON object). They go verbatim to every confluent-kafka client, after gruflow's defaults (so they
win), except the few gruflow must own to keep its guarantees (``OWNED``). The ones aiokafka also knows
are translated by ``AIOKAFKA_NAMES`` for gruflow's aiokafka producer; the SASL OAUTHBEARER ones become an
aiokafka token provider, which faust's clients get too (``faust.OAuthCredentials``).
``GRUFLOW_AIOKAFKA_CONFIG`` holds aiokafka's own keyword names for gruflow's aiokafka producer; they win
over translated ones. The mapping is documented in docs/kafka-setups.md.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
import urllib.request
from typing import Any

import orjson

from stream.settings import Settings, SettingsError

# gruflow sets these itself: the partitioner keeps producers on faust's partitions, the rest are the
# processing guarantee and the group-less reads
OWNED = frozenset({"partitioner", "group.id", "enable.auto.commit", "isolation.level", "transactional.id"})

# librdkafka name -> aiokafka keyword (client and producer); values are converted to aiokafka's types
AIOKAFKA_NAMES: dict[str, str] = {
    "client.id": "client_id",
    "request.timeout.ms": "request_timeout_ms",
    "metadata.max.age.ms": "metadata_max_age_ms",
    "retry.backoff.ms": "retry_backoff_ms",
    "connections.max.idle.ms": "connections_max_idle_ms",
    "sasl.kerberos.service.name": "sasl_kerberos_service_name",
    "linger.ms": "linger_ms",
    "batch.size": "max_batch_size",
    "compression.type": "compression_type",
    "acks": "acks",
    "message.max.bytes": "max_request_size",
}
# turned into an aiokafka token provider (see ``token_provider``), not keyword arguments
OAUTH_PREFIXES = ("sasl.oauthbearer.", "enable.sasl.oauthbearer.")


def parse_properties(raw: str, name: str) -> dict[str, Any]:
    """``raw`` as a dict: a JSON object, or ``name=value`` entries one per line or ``;``-separated."""
    raw = raw.strip()
    if not raw:
        return {}
    if raw.startswith("{"):
        try:
            return orjson.loads(raw)  # a JSON text that starts with "{" is an object or is refused here
        except orjson.JSONDecodeError as exc:
            raise SettingsError(f"{name}: not a JSON object: {exc}") from None
    out: dict[str, Any] = {}
    for part in raw.replace("\n", ";").split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"{name}: {part.strip()!r} is not name=value")
        out[key.strip()] = value.strip()
    return out


def librdkafka_properties(settings: Settings) -> dict[str, Any]:
    props = parse_properties(settings.connection.librdkafka_config, "GRUFLOW_LIBRDKAFKA_CONFIG")
    owned = sorted(OWNED & props.keys())
    if owned:
        raise SettingsError(f"GRUFLOW_LIBRDKAFKA_CONFIG: gruflow sets {', '.join(owned)} itself (its processing "
                            "guarantee and partitioning depend on them)")
    return {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in props.items()}


def _typed(value: Any) -> Any:
    """A text value as aiokafka wants it: integers and booleans as such."""
    if not isinstance(value, str):
        return value
    if value.lstrip("-").isdigit():
        return int(value)
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def aiokafka_properties(settings: Settings) -> dict[str, Any]:
    """aiokafka keywords for gruflow's own aiokafka clients: translated librdkafka names, then
    GRUFLOW_AIOKAFKA_CONFIG (aiokafka's names, which win)."""
    out = {AIOKAFKA_NAMES[k]: _typed(v) for k, v in librdkafka_properties(settings).items() if k in AIOKAFKA_NAMES}
    out.update({k: _typed(v) for k, v in parse_properties(settings.connection.aiokafka_config, "GRUFLOW_AIOKAFKA_CONFIG").items()})
    return out


def untranslated(settings: Settings) -> list[str]:
    """librdkafka properties that have no aiokafka counterpart (logged once at start-up)."""
    return sorted(k for k in librdkafka_properties(settings)
                  if k not in AIOKAFKA_NAMES and not k.startswith(OAUTH_PREFIXES))


def unsecured_jwt(principal: str, lifetime_s: int, now_s: float | None = None, scope: str = "") -> str:
    """An unsigned JWT (alg "none"): what librdkafka's ``enable.sasl.oauthbearer.unsecure.jwt`` makes,
    and what a Kafka broker with its default (unsecured) OAUTHBEARER validator accepts. Development only."""
    now = int(time.time() if now_s is None else now_s)
    claims: dict[str, Any] = {"sub": principal, "iat": now, "exp": now + lifetime_s}
    if scope:
        claims["scope"] = scope

    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part(claims)}."


def _oauth_config_pairs(raw: str) -> dict[str, str]:
    """librdkafka's ``sasl.oauthbearer.config``: space-separated ``name=value`` (principal=, lifeSeconds=...)."""
    return dict(p.split("=", 1) for p in raw.split() if "=" in p)


class OAuthTokenProvider:
    """aiokafka's token provider built from librdkafka's OAUTHBEARER properties: either the OIDC client
    credentials grant (``sasl.oauthbearer.method=oidc`` with ``.client.id``, ``.client.secret``,
    ``.token.endpoint.url``, optional ``.scope``), or an unsecured JWT
    (``enable.sasl.oauthbearer.unsecure.jwt=true``, ``sasl.oauthbearer.config=principal=NAME``). A token
    is reused until 80% of its lifetime has passed."""

    def __init__(self, props: dict[str, Any]) -> None:
        self.props = props
        self._token = ""
        self._renew_at = 0.0

    async def token(self) -> str:
        import asyncio

        if time.time() >= self._renew_at:
            self._token, lifetime = await asyncio.to_thread(self.fetch)
            self._renew_at = time.time() + 0.8 * lifetime
        return self._token

    def extensions(self) -> dict[str, str]:
        return {}

    def fetch(self) -> tuple[str, float]:
        """A fresh token and its lifetime in seconds (blocking)."""
        p = self.props
        if str(p.get("sasl.oauthbearer.method", "default")).lower() == "oidc":
            form = {"grant_type": "client_credentials", "client_id": p.get("sasl.oauthbearer.client.id", ""),
                    "client_secret": p.get("sasl.oauthbearer.client.secret", "")}
            if p.get("sasl.oauthbearer.scope"):
                form["scope"] = p["sasl.oauthbearer.scope"]
            req = urllib.request.Request(p["sasl.oauthbearer.token.endpoint.url"],
                                         data=urllib.parse.urlencode(form).encode(), method="POST")
            with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 - the configured endpoint
                answer = orjson.loads(r.read())
            return answer["access_token"], float(answer.get("expires_in", 3600))
        conf = _oauth_config_pairs(str(p.get("sasl.oauthbearer.config", "")))
        lifetime = int(conf.get("lifeSeconds", 3600))
        return unsecured_jwt(conf.get("principal", "gruflow"), lifetime, scope=conf.get("scope", "")), lifetime


def token_provider(settings: Settings) -> Any:
    """The aiokafka token provider of an OAUTHBEARER setup, or None. Checked here so a missing property is
    a clear start-up error, not a failed connection later."""
    if settings.connection.sasl_mechanism.upper() != "OAUTHBEARER":
        return None
    from aiokafka.abc import AbstractTokenProvider

    props = {k: v for k, v in librdkafka_properties(settings).items() if k.startswith(OAUTH_PREFIXES)}
    oidc = str(props.get("sasl.oauthbearer.method", "default")).lower() == "oidc"
    unsecure = str(props.get("enable.sasl.oauthbearer.unsecure.jwt", "false")).lower() == "true"
    if oidc:
        missing = [k for k in ("client.id", "client.secret", "token.endpoint.url")
                   if not props.get("sasl.oauthbearer." + k)]
        if missing:
            raise SettingsError("GRUFLOW_SASL_MECHANISM=OAUTHBEARER with sasl.oauthbearer.method=oidc needs "
                                + ", ".join("sasl.oauthbearer." + k for k in missing) + " in GRUFLOW_LIBRDKAFKA_CONFIG")
    elif not unsecure:
        raise SettingsError("GRUFLOW_SASL_MECHANISM=OAUTHBEARER needs sasl.oauthbearer.method=oidc (with client id, "
                            "secret and token endpoint) or enable.sasl.oauthbearer.unsecure.jwt=true in "
                            "GRUFLOW_LIBRDKAFKA_CONFIG")
    provider = type("GruflowTokenProvider", (OAuthTokenProvider, AbstractTokenProvider), {})
    return provider(props)
