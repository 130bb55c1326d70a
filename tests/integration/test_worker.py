"""The worker end to end on the embedded Apache Kafka broker: answers, dead letters, health endpoints."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson
import pytest

from stream.pipeline import events as ev
from stream.kafka.config import admin_config
from stream.settings import INPUT_MESSAGE_MAX_BYTES
from stream.kafka.topics import (DLQ_HEADER_ROOM, KAFKA_DEFAULT_MESSAGE_MAX_BYTES, dead_letter_budget, ensure_topics,
                           max_message_bytes)
from workerkit import (Ev, TopicReader, WorkerProc, assert_same_states, expected_states, make_events, produce,
                       read_states, save_tiny_model)

pytestmark = pytest.mark.integration


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return save_tiny_model(tmp_path / "tiny.gfc")


def test_every_valid_event_of_both_topics_is_answered(kafka, tmp_path: Path, model_path: Path) -> None:
    settings = kafka.settings(partitions=4, top_k=7)
    ensure_topics(settings)
    events = make_events(n_users=12, per_user=6, seed=1, purchases=True)
    events.append(Ev("cold", "not-in-the-catalogue", events[-1].ts + 1))  # unknown item, user without state
    assert {e.kind for e in events} == {"clicks", "purchases"}
    reader = TopicReader(settings, settings.topic("recommendations"))
    try:
        with WorkerProc(kafka, settings, model_path, tmp_path) as worker:
            assert worker.get("/livez")[0] == 200
            produce(settings, events)
            want = {(e.user, e.ts) for e in events}
            seen = reader.poll_until(lambda c: want <= set(c.answered()), 90, "a recommendation per event")
            recs = seen.recommendations()
            assert all(len(r["items"]) == 7 and r["model_version"] == 1 for r in recs)
            assert all(r["published_ts"] >= r["event_ts"] for r in recs)
            by_key = {m.key() for m in seen.messages}
            assert by_key == {e.user.encode() for e in events}
            # metrics are counted once the broker acknowledged a batch, a moment after readers see it
            assert worker.wait_metric("gruflow_recommendations_out_total", lambda v: v == len(events))
            for kind in ("clicks", "purchases"):
                n = sum(1 for e in events if e.kind == kind)
                assert worker.metric("gruflow_events_in_total", topic=kind) == n
            assert worker.metric("gruflow_unknown_items_total") == 1
            assert worker.metric("gruflow_prequential_events_total", model="gru") > 0
            assert worker.metric("gruflow_prequential_events_total", model="gru") == \
                worker.metric("gruflow_prequential_events_total", model="popularity")
        both_topics = {e.user for e in events if e.kind == "purchases"}
        assert_same_states(read_states(settings), expected_states(model_path, events, settings),
                           hidden_for={e.user for e in events} - both_topics)
    finally:
        reader.close()


def _bad_inputs(t: int) -> list[tuple[str, str, bytes | None, bytes | None]]:
    """(expected reason, topic kind, key, value) for every kind of bad input."""
    def j(**f: object) -> bytes:
        base: dict[str, object] = {"user_id": "bad", "item_id": "i1", "event_type": "click", "ts": t}
        base.update(f)
        return orjson.dumps({k: v for k, v in base.items() if v is not None})

    return [
        (ev.NOT_JSON, "clicks", b"bad", b"\x00\xffnot json"),
        (ev.NOT_OBJECT, "clicks", b"bad", b"[1, 2, 3]"),
        (ev.MISSING_FIELD, "clicks", b"bad", j(item_id=None)),
        (ev.BAD_TYPE, "clicks", b"bad", j(item_id=[1])),
        (ev.EMPTY_ID, "clicks", b"bad", j(item_id="")),
        (ev.ID_TOO_LONG, "clicks", b"bad", j(item_id="x" * 300)),
        (ev.UNKNOWN_EVENT_TYPE, "clicks", b"bad", j(event_type="wishlist")),
        (ev.WRONG_TOPIC, "clicks", b"bad", j(event_type="purchase")),
        (ev.WRONG_TOPIC, "purchases", b"bad", j(event_type="view")),
        (ev.BAD_TIMESTAMP, "clicks", b"bad", j(ts="not a time")),
        (ev.ABSURD_TIMESTAMP, "clicks", b"bad", j(ts=t // 1000)),
        (ev.OVERSIZE, "clicks", b"bad", j(pad="p" * 70_000)),
        (ev.KEY_MISMATCH, "clicks", b"someone-else", j()),
    ]


def _largest_input(settings, user: str) -> bytes:
    """An oversize JSON event as large as the clicks topic takes (less record and batch overhead)."""
    room = max_message_bytes(settings, settings.topic("clicks")) - 128
    head, tail = b'{"user_id":"' + user.encode() + b'","pad":"', b'"}'
    largest = head + b"p" * (room - len(head) - len(tail)) + tail
    assert len(largest) == room
    return largest


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_each_bad_input_goes_to_the_dlq_and_the_stream_keeps_working(kafka, tmp_path: Path, model_path: Path,
                                                                      guarantee: str) -> None:
    """Under both guarantees: dead letters are written by different producers (see stream/worker/sinks.py)."""
    exactly_once = guarantee == "exactly_once"
    settings = kafka.settings(partitions=4, processing_guarantee=guarantee)
    ensure_topics(settings)
    before = make_events(n_users=5, per_user=2, seed=2)
    after = make_events(n_users=5, per_user=2, seed=3, t0=before[-1].ts + 10_000)
    bad = _bad_inputs(before[-1].ts)
    # every reason of a record the client can read (unreadable_record: tests/integration/test_unreadable_records.py)
    assert {r for r, *_ in bad} | {ev.UNREADABLE_RECORD} == set(ev.REASONS)
    # and an oversize record as big as the input topic takes: it must fit in the dlq with its headers
    # (if it did not, its batch would fail after every restart)
    bad.append((ev.OVERSIZE, "clicks", b"bad", _largest_input(settings, "bad")))
    assert dead_letter_budget(settings) == INPUT_MESSAGE_MAX_BYTES  # gruflow's own dlq: nothing is cut
    dlq = TopicReader(settings, settings.topic("dlq"), read_committed=exactly_once)
    recs = TopicReader(settings, settings.topic("recommendations"), read_committed=exactly_once)
    try:
        with WorkerProc(kafka, settings, model_path, tmp_path) as worker:
            produce(settings, before)
            produce(settings, [], [(kind, key, value) for _, kind, key, value in bad[:-1]])
            produce(settings, [], [bad[-1][1:]])  # alone: in a record batch of its own
            produce(settings, after)
            dead = dlq.poll_until(lambda c: len(c.messages) >= len(bad), 90, "every bad input in the dlq")
            want = {(e.user, e.ts) for e in before + after}
            recs.poll_until(lambda c: want <= set(c.answered()), 90, "answers to the valid events")
            reasons = Counter(dict(m.headers())["gruflow-reason"].decode() for m in dead.messages)
            assert reasons == Counter(r for r, *_ in bad)
            originals = {(kind, key, value) for _, kind, key, value in bad}
            for m in dead.messages:
                h = dict(m.headers())
                kind = "purchases" if h["gruflow-topic"].decode() == settings.topic("purchases") else "clicks"
                assert (kind, m.key(), m.value()) in originals  # original bytes, unchanged
                assert int(h["gruflow-offset"]) >= 0 and int(h["gruflow-partition"]) == m.partition()
                assert h["gruflow-detail"]
            # metrics are counted once the broker acknowledged a batch, a moment after readers see it
            assert worker.wait_metric("gruflow_recommendations_out_total", lambda v: v == len(before) + len(after))
            assert worker.wait_metric("gruflow_dlq_total", lambda v: v == len(bad))
            for reason, n in reasons.items():
                assert worker.metric("gruflow_dlq_total", reason=reason) == n
            assert not any(r["user_id"] in ("bad", "someone-else") for r in recs.seen.recommendations())
    finally:
        dlq.close()
        recs.close()


def test_a_dlq_created_before_with_a_smaller_limit_gets_cut_dead_letters(kafka, tmp_path: Path,
                                                                         model_path: Path) -> None:
    """A dlq that already existed with the usual 1 MB limit: a bad record as large as the input topic takes
    is dead-lettered cut to what fits (and says its size), and the stream goes on."""
    from confluent_kafka.admin import AdminClient, NewTopic

    settings = kafka.settings(partitions=2)
    admin = AdminClient(admin_config(settings))
    created = admin.create_topics([NewTopic(settings.topic("dlq"), num_partitions=2, replication_factor=1,
                                            config={"max.message.bytes": str(KAFKA_DEFAULT_MESSAGE_MAX_BYTES)})])
    created[settings.topic("dlq")].result(30)
    ensure_topics(settings)
    budget = dead_letter_budget(settings)
    assert budget == KAFKA_DEFAULT_MESSAGE_MAX_BYTES - DLQ_HEADER_ROOM < INPUT_MESSAGE_MAX_BYTES
    largest = _largest_input(settings, "big")
    events = make_events(n_users=4, per_user=3, seed=6)
    dlq = TopicReader(settings, settings.topic("dlq"))
    recs = TopicReader(settings, settings.topic("recommendations"))
    try:
        with WorkerProc(kafka, settings, model_path, tmp_path):
            produce(settings, [], [("clicks", b"big", largest)])
            produce(settings, events)
            dead = dlq.poll_until(lambda c: len(c.messages) >= 1, 90, "the large dead letter")
            recs.poll_until(lambda c: {(e.user, e.ts) for e in events} <= set(c.answered()), 90,
                            "answers to the valid events after it")
        (m,) = dead.messages
        h = dict(m.headers())
        assert h["gruflow-reason"].decode() == ev.OVERSIZE
        assert int(h["gruflow-original-bytes"]) == len(b"big") + len(largest)
        assert m.key() == b"big" and len(m.key()) + len(m.value()) == budget
        assert largest.startswith(m.value())
    finally:
        dlq.close()
        recs.close()


def test_health_endpoints_and_metric_names(kafka, tmp_path: Path, model_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    settings = kafka.settings(partitions=2)
    ensure_topics(settings)
    with WorkerProc(kafka, settings, model_path, tmp_path) as worker:
        assert worker.get("/readyz") == (200, "ready\n")
        assert worker.get("/livez")[0] == 200
        status, text = worker.get("/metrics")
        assert status == 200
        names = {f.name for f in text_string_to_metric_families(text)}
        assert {"gruflow_events_in", "gruflow_dlq", "gruflow_end_to_end_latency_seconds", "gruflow_model_version",
                "gruflow_state_entries", "gruflow_prequential_hits"} <= names
        assert all(n.startswith("gruflow_") for n in names)
        assert worker.metric("gruflow_model_version") == 1
        assert worker.metric("gruflow_ready") == 1


def _catalogue_model(path: Path, n_items: int = 8000, hidden: int = 32) -> Path:
    """A model large enough for the worker's fast top-K, with scores spread out like a trained one's."""
    import numpy as np
    import torch

    from model.checkpoint import save_checkpoint
    from model.network import GRU4RecNet
    from model.params import GRU4RecParams
    from model.vocab import Vocabulary

    params = GRU4RecParams(layers=(hidden,), seed=5)
    net = GRU4RecNet(n_items, params)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        net.Wy.weight.copy_(torch.randn(net.Wy.weight.shape, generator=g) * 0.3)
        net.By.weight.copy_(torch.randn(net.By.weight.shape, generator=g) * 0.5)
    vocab = Vocabulary(f"i{r}" for r in range(n_items))
    return save_checkpoint(path, net, vocab, params, np.linspace(n_items, 1, n_items), {"version": 1})


def test_the_worker_reports_the_top_k_path_it_chose(kafka, tmp_path: Path) -> None:
    """Chosen by calibration at start-up, before the worker is ready; a setting can force it."""
    from model.topk import PATHS

    settings = kafka.settings(partitions=1)
    ensure_topics(settings)
    model = _catalogue_model(tmp_path / "catalogue.gfc")
    for forced in ("auto", "float32"):
        with WorkerProc(kafka, settings, model, tmp_path, name=f"worker-{forced}",
                        GRUFLOW_SCORER_PATH=forced) as worker:
            _, text = worker.get("/metrics")
            paths = [p for p in PATHS if worker.metric("gruflow_scorer_info", path=p) == 1.0]
            assert len(paths) == 1, text
            assert forced == "auto" or paths == [forced]
