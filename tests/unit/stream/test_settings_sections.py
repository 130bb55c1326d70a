"""The settings come in frozen sections behind the same GRUFLOW_* names; each field says what it means."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from pathlib import Path

import pytest

from stream.settings import SECTION_OF, SECTIONS, Secret, Settings, SettingsError

DOCS = Path(__file__).resolve().parents[3] / "docs" / "settings.md"


def test_every_field_has_a_section_a_unique_name_and_a_description() -> None:
    all_fields = [f for cls in SECTIONS.values() for f in fields(cls)]
    assert len(all_fields) == len(SECTION_OF) == len(Settings.env_names())
    for f in all_fields:
        assert len(f.metadata.get("description", "")) > 5, f"{f.name} has no description"
    assert [f.name for f in fields(Settings)] == list(SECTIONS)


def test_sections_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.worker.batch_max_events = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.worker = settings.worker  # type: ignore[misc]


def test_env_names_land_in_their_sections() -> None:
    s = Settings.from_env({"GRUFLOW_TOP_K": "7", "GRUFLOW_PARTITIONS": "3", "GRUFLOW_BOOTSTRAP_SERVERS": "k:9092",
                           "GRUFLOW_FINETUNE_EVERY_EVENTS": "11", "GRUFLOW_DATA_DIR": "/d"})
    assert (s.scoring.top_k, s.topics.partitions, s.connection.bootstrap_servers) == (7, 3, "k:9092")
    assert (s.trainer.finetune_every_events, s.process.data_dir) == (11, Path("/d"))
    assert s.worker == Settings().worker  # untouched sections keep their defaults


def test_replace_routes_names_and_refuses_unknown_ones() -> None:
    s = Settings.of(top_k=5).replace(partitions=2, app_id="x")
    assert (s.scoring.top_k, s.topics.partitions, s.process.app_id) == (5, 2, "x")
    with pytest.raises(TypeError, match="top_kk"):
        Settings().replace(top_kk=1)
    with pytest.raises(SettingsError, match="GRUFLOW_TOP_KK"):
        Settings.from_env({"GRUFLOW_TOP_KK": "1"})


def test_subprocess_env_round_trips() -> None:
    s = Settings.of(top_k=9, sasl_password=Secret("pw"), state_ttl_s=5.0, topic_prefix="t.")
    env = {k: v for k, v in s.subprocess_env().items() if k.startswith("GRUFLOW_")}
    assert set(env) == Settings.env_names()
    assert Settings.from_env(env) == s


def test_describe_gives_sources_and_masks_secrets() -> None:
    environ = {"GRUFLOW_SASL_PASSWORD": "hunter2", "GRUFLOW_TOP_K": "7"}
    rows = {r.env_name: r for r in Settings.from_env(environ).describe(environ)}
    assert set(rows) == Settings.env_names()
    assert rows["GRUFLOW_SASL_PASSWORD"].value == "***" and rows["GRUFLOW_SASL_PASSWORD"].source == "env"
    assert (rows["GRUFLOW_TOP_K"].value, rows["GRUFLOW_TOP_K"].source, rows["GRUFLOW_TOP_K"].section) == \
        ("7", "env", "scoring")
    assert rows["GRUFLOW_PARTITIONS"].source == "default"
    assert all("hunter2" not in str(r) for r in rows.values())


def test_docs_list_every_setting() -> None:
    text = DOCS.read_text()
    missing = sorted(n for n in Settings.env_names() if f"`{n}`" not in text)
    assert not missing, f"docs/settings.md misses {missing} (regenerate: python -m stream.settings > docs/settings.md)"
