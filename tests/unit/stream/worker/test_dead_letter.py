"""Dead letters always fit in the dlq: the topic limits and the record the worker builds for a bad input."""

from __future__ import annotations

import pytest

from stream.settings import INPUT_MESSAGE_MAX_BYTES, Settings, SettingsError
from stream.worker.sinks import dead_letter
from stream.kafka.topics import DLQ_MESSAGE_MAX_BYTES, TopicNames, topic_specs

# what a record adds to its key, value and headers in a one-record batch (batch header 61 bytes, record
# length/attributes/delta varints); generous
RECORD_OVERHEAD = 128


def _size(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    return (len(key or b"") + len(value or b"") + sum(len(k) + len(v) + 10 for k, v in headers)
            + RECORD_OVERHEAD)


def test_the_dlq_takes_the_largest_input_record_with_its_headers() -> None:
    settings = Settings()
    names = TopicNames.from_settings(settings)
    limits = {s.name: int(s.config["max.message.bytes"]) for s in topic_specs(settings)
              if "max.message.bytes" in s.config}
    assert limits[names.clicks] == limits[names.purchases] == INPUT_MESSAGE_MAX_BYTES
    assert limits[names.dlq] == DLQ_MESSAGE_MAX_BYTES
    key = b"u" * 256
    value = b"v" * (INPUT_MESSAGE_MAX_BYTES - len(key) - RECORD_OVERHEAD)
    # the longest detail and source a dead letter carries
    record = dead_letter(key, value, "oversize", "d" * 2000, names.clicks, 10_000, 2**62, 2**41)
    assert record[0] == key and record[1] == value  # whole, unchanged
    assert _size(*record) <= DLQ_MESSAGE_MAX_BYTES


def test_a_bad_input_keeps_its_bytes_and_says_where_it_came_from() -> None:
    key, value, headers = dead_letter(b"user-1", b"\x00not json", "not_json", "why", "t.clicks", 3, 42, 1700)
    assert (key, value) == (b"user-1", b"\x00not json")
    h = dict(headers)
    assert h["gruflow-reason"] == b"not_json" and h["gruflow-detail"] == b"why"
    assert (h["gruflow-topic"], h["gruflow-partition"], h["gruflow-offset"], h["gruflow-timestamp"]) == \
        (b"t.clicks", b"3", b"42", b"1700")
    assert "gruflow-original-bytes" not in h


@pytest.mark.parametrize("key_len", [0, 10, INPUT_MESSAGE_MAX_BYTES + 5])
def test_a_record_bigger_than_the_inputs_allow_is_cut_to_fit_and_says_so(key_len: int) -> None:
    """Input topics created elsewhere may take bigger records than gruflow's: the dead letter keeps the
    start of the record (as much as gruflow's own input topics would take) rather than failing its batch."""
    key = b"k" * key_len if key_len else None
    value = bytes(range(256)) * (3 * INPUT_MESSAGE_MAX_BYTES // 256)
    k2, v2, headers = dead_letter(key, value, "oversize", "too big", "t.clicks", 0, 1, None)
    kept = len(k2 or b"") + len(v2 or b"")
    assert kept == INPUT_MESSAGE_MAX_BYTES
    assert (key or b"").startswith(k2 or b"") and value.startswith(v2 or b"")
    assert dict(headers)["gruflow-original-bytes"] == str(len(key or b"") + len(value)).encode()
    assert _size(k2, v2, headers) <= DLQ_MESSAGE_MAX_BYTES


def test_the_event_size_limit_cannot_exceed_what_the_input_topics_take() -> None:
    assert Settings.from_env({"GRUFLOW_MAX_MESSAGE_BYTES": str(INPUT_MESSAGE_MAX_BYTES)}).worker.max_message_bytes \
        == INPUT_MESSAGE_MAX_BYTES
    with pytest.raises(SettingsError, match="GRUFLOW_MAX_MESSAGE_BYTES"):
        Settings.from_env({"GRUFLOW_MAX_MESSAGE_BYTES": str(INPUT_MESSAGE_MAX_BYTES + 1)})
    with pytest.raises(SettingsError, match="GRUFLOW_MAX_MESSAGE_BYTES"):
        Settings.from_env({"GRUFLOW_MAX_MESSAGE_BYTES": "0"})


def test_a_smaller_budget_cuts_key_and_value_together() -> None:
    """The worker's budget when the dlq existed before with a smaller limit (stream.kafka.topics.dead_letter_budget)."""
    key, value = b"user-7", b"x" * 5000
    k2, v2, headers = dead_letter(key, value, "oversize", "big", "t.clicks", 1, 2, 3, max_bytes=1000)
    assert k2 == key and v2 == value[:1000 - len(key)]
    assert dict(headers)["gruflow-original-bytes"] == str(len(key) + len(value)).encode()
    # at the budget exactly: whole
    k3, v3, headers = dead_letter(key, value[:994], "oversize", "big", "t.clicks", 1, 2, 3, max_bytes=1000)
    assert (k3, v3) == (key, value[:994]) and "gruflow-original-bytes" not in dict(headers)
