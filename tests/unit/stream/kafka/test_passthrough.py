"""Client properties passed through by their own names (stream.kafka.passthrough), SASL OAUTHBEARER
included, per-topic names and the input shapes' settings."""

from __future__ import annotations

import asyncio
import base64
import json

import orjson
import pytest

from stream.kafka.config import aiokafka_config, confluent_config, consumer_config, faust_broker_kwargs, producer_config
from stream.kafka.passthrough import untranslated, unsecured_jwt
from stream.kafka.topics import TopicNames, topic_specs
from stream.pipeline.events import EVENTS, MISSING_FIELD, Event, InputShape, Limits, Rejected, decode_event
from stream.settings import Settings, SettingsError

BASE = Settings.of(bootstrap_servers="127.0.0.1:9092")
OAUTH = BASE.replace(security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER", librdkafka_config=(
    "sasl.oauthbearer.method=oidc; sasl.oauthbearer.client.id=gf; sasl.oauthbearer.client.secret=s3;"
    "sasl.oauthbearer.token.endpoint.url=https://idp.example/token; sasl.oauthbearer.scope=kafka"))


def test_librdkafka_properties_win_over_defaults_and_map_to_aiokafka() -> None:
    s = BASE.replace(librdkafka_config="linger.ms=50\nclient.id=shop-gf\nsocket.keepalive.enable=true",
                     aiokafka_config='{"metadata_max_age_ms": 60000}')
    assert producer_config(s)["linger.ms"] == "50" and consumer_config(s)["client.id"] == "shop-gf"
    assert confluent_config(s)["socket.keepalive.enable"] == "true"
    config = aiokafka_config(s)
    assert config["client_id"] == "shop-gf" and config["linger_ms"] == 50 and config["metadata_max_age_ms"] == 60000
    assert untranslated(s) == ["socket.keepalive.enable"]
    assert confluent_config(BASE.replace(librdkafka_config='{"fetch.wait.max.ms": 5}'))["fetch.wait.max.ms"] == 5


def test_properties_gruflow_owns_are_refused() -> None:
    with pytest.raises(SettingsError, match="partitioner"):
        producer_config(BASE.replace(librdkafka_config="partitioner=consistent"))
    with pytest.raises(SettingsError, match="name=value"):
        confluent_config(BASE.replace(librdkafka_config="linger.ms"))


def test_oauthbearer_oidc_maps_to_librdkafka_and_a_token_provider_for_aiokafka_and_faust() -> None:
    c = confluent_config(OAUTH)
    assert c["sasl.mechanism"] == "OAUTHBEARER" and "sasl.username" not in c
    assert c["sasl.oauthbearer.method"] == "oidc" and c["sasl.oauthbearer.client.id"] == "gf"
    a = aiokafka_config(OAUTH)
    assert a["sasl_mechanism"] == "OAUTHBEARER" and a["sasl_oauth_token_provider"].props[
        "sasl.oauthbearer.token.endpoint.url"] == "https://idp.example/token"
    from aiokafka.abc import AbstractTokenProvider

    assert isinstance(a["sasl_oauth_token_provider"], AbstractTokenProvider)
    creds = faust_broker_kwargs(OAUTH)["broker_credentials"]
    assert type(creds).__name__ == "OAuthCredentials" and creds.ssl_context is not None


def test_oauthbearer_needs_a_token_source() -> None:
    with pytest.raises(SettingsError, match="unsecure.jwt"):
        aiokafka_config(BASE.replace(security_protocol="SASL_PLAINTEXT", sasl_mechanism="OAUTHBEARER"))
    with pytest.raises(SettingsError, match="client.secret"):
        aiokafka_config(BASE.replace(security_protocol="SASL_PLAINTEXT", sasl_mechanism="OAUTHBEARER",
                                     librdkafka_config="sasl.oauthbearer.method=oidc;sasl.oauthbearer.client.id=x;"
                                                       "sasl.oauthbearer.token.endpoint.url=http://x"))


def test_unsecured_jwt_provider_makes_a_token_like_librdkafka() -> None:
    s = BASE.replace(security_protocol="SASL_PLAINTEXT", sasl_mechanism="OAUTHBEARER",
                     librdkafka_config="enable.sasl.oauthbearer.unsecure.jwt=true;"
                                       "sasl.oauthbearer.config=principal=alice lifeSeconds=600")
    token = asyncio.run(aiokafka_config(s)["sasl_oauth_token_provider"].token())
    head, claims, sig = token.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    assert sig == "" and decoded["sub"] == "alice" and decoded["exp"] - decoded["iat"] == 600
    assert unsecured_jwt("bob", 10, now_s=0).count(".") == 2


def test_every_topic_name_on_its_own() -> None:
    s = BASE.replace(topic_prefix="p.", topic_recommendations="shop.recs", topic_item_rules="catalogue.rules")
    names = TopicNames.from_settings(s)
    assert (names.clicks, names.recommendations, names.item_rules) == ("p.clicks", "shop.recs", "catalogue.rules")
    assert names.inputs == ("p.clicks", "p.purchases")
    one = TopicNames.from_settings(s.replace(topic_events="shop.events"))
    assert one.inputs == ("shop.events",) and one.kinds() == {"shop.events": EVENTS}
    assert [t.name for t in topic_specs(s.replace(topic_events="shop.events"))][:2] == ["shop.events", "shop.recs"]
    assert Settings.from_env({"GRUFLOW_TOPIC_DLQ": "bad.events"}).topic("dlq") == "bad.events"


def test_field_map_and_event_type_map() -> None:
    shape = InputShape.parse("user_id=visitorid, item_id=itemid, ts=timestamp, event_type=event",
                             "addtocart=cart;transaction=purchase")
    value = orjson.dumps({"visitorid": 7, "itemid": 99, "timestamp": 1_700_000_000_000, "event": "transaction"})
    got = decode_event(value, b"7", EVENTS, Limits(), shape=shape)
    assert isinstance(got, Event) and (got.user_id, got.item_id, got.event_type) == ("7", "99", 3)
    ours = orjson.dumps({"user_id": "7", "item_id": "1", "ts": 1_700_000_000_000, "event_type": "view"})
    missing = decode_event(ours, b"7", EVENTS, Limits(), shape=shape)
    assert isinstance(missing, Rejected) and missing.reason == MISSING_FIELD
    with pytest.raises(SettingsError, match="not one of gruflow's fields"):
        Settings.from_env({"GRUFLOW_FIELD_MAP": "visitor=visitorid"})
    with pytest.raises(SettingsError, match="GRUFLOW_EVENT_TYPE_MAP"):
        Settings.from_env({"GRUFLOW_EVENT_TYPE_MAP": "addtocart=basket"})
