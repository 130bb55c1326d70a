"""Recommendations on request against the embedded Apache Kafka broker, as a shop's web server would ask:
a user owned by the other worker, read-your-writes, the cold start, anonymous sessions, bad requests."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from stream.kafka.topics import ensure_topics
from workerkit import (Ev, TopicReader, WorkerProc, answer_items, expected_answers, make_events, produce,
                       same_answer, save_tiny_model)

pytestmark = pytest.mark.integration


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return save_tiny_model(tmp_path / "tiny.gfc")


def request(worker: WorkerProc, path: str, body: bytes | None = None, timeout: float = 10.0) -> tuple[int, dict]:
    return worker.request(path, body, timeout)


def last_event_of(events: list[Ev]) -> dict[str, Ev]:
    return {e.user: e for e in events}


def test_two_workers_answer_for_each_other_and_read_your_writes(kafka, tmp_path: Path, model_path: Path) -> None:
    settings = kafka.settings(partitions=4, top_k=5)
    ensure_topics(settings)
    events = make_events(n_users=16, per_user=4, seed=5)
    reader = TopicReader(settings, settings.topic("recommendations"))
    a_settings = settings
    b_settings = kafka.settings(partitions=4, top_k=5, topic_prefix=settings.topics.topic_prefix,
                                app_id=settings.process.app_id)
    a = WorkerProc(kafka, a_settings, model_path, tmp_path, name="a",
                   GRUFLOW_ADVERTISED_URL=f"http://127.0.0.1:{a_settings.process.web_port}")
    b = WorkerProc(kafka, b_settings, model_path, tmp_path, name="b",
                   GRUFLOW_ADVERTISED_URL=f"http://127.0.0.1:{b_settings.process.web_port}")
    try:
        with a, b:
            produce(settings, events)
            want = {(e.user, e.ts) for e in events}
            reader.poll_until(lambda c: want <= set(c.answered()), 90, "a recommendation per event")
            for w in (a, b):  # both hold partitions once the group settled
                assert w.wait_metric("gruflow_state_entries", lambda v: v > 0, timeout=60), w.log_tail()
            expected = expected_answers(model_path, events, settings)
            for user, e in last_event_of(events).items():
                for w in (a, b):
                    status, doc = request(w, f"/users/{user}/recommendations")
                    assert status == 200, doc
                    assert doc["cold_start"] is False and doc["known_user"] is True
                    assert same_answer(answer_items(doc), expected[(user, e.ts)]), (user, w.url, doc)
            # every user was asked of both workers: each forwarded the users the other one owns
            assert a.metric("gruflow_http_routed_requests_total") > 0
            assert b.metric("gruflow_http_routed_requests_total") > 0
            assert a.metric("gruflow_http_routed_requests_total") + b.metric("gruflow_http_routed_requests_total") \
                == len(last_event_of(events))
            # the owners answered from the lists published after each user's last event, not by scoring
            assert a.metric("gruflow_http_cached_answers_total") + b.metric("gruflow_http_cached_answers_total") > 0

            # read-your-writes: an event, then at once a request (to either worker) that must reflect it
            later = events[-1].ts
            for n, user in enumerate(("u3", "u8", "u11")):
                new = Ev(user, f"i{100 + n}", later + 1000 * (n + 1), "cart")
                events.append(new)
                produce(settings, [new])
                status, doc = request((a, b)[n % 2], f"/users/{user}/recommendations?sync=true")
                assert status == 200, doc
                want_items = expected_answers(model_path, events, settings)[(user, new.ts)]
                assert same_answer(answer_items(doc), want_items), (user, doc)

            # an unknown user: the cold-start answer (popular items), marked
            status, doc = request(b, "/users/nobody-at-all/recommendations?k=3")
            assert status == 200 and doc["cold_start"] is True and doc["known_user"] is False
            assert [i["item_id"] for i in doc["items"]] == ["i0", "i1", "i2"]  # the tiny model's popularity
    finally:
        reader.close()


BAD_REQUESTS = [
    ("GET", "/users/u1/recommendations?k=0", None, 400, "bad_k"),
    ("GET", "/users/u1/recommendations?k=abc", None, 400, "bad_k"),
    ("GET", "/users/u1/recommendations?k=101", None, 400, "bad_k"),
    ("GET", "/users/" + "x" * 300 + "/recommendations", None, 400, "bad_user_id"),
    ("POST", "/recommendations", b"{not json", 400, "bad_body"),
    ("POST", "/recommendations", b'["i1"]', 400, "bad_body"),
    ("POST", "/recommendations", orjson.dumps({"items": [f"i{i}" for i in range(51)]}), 400, "too_many_items"),
    ("POST", "/recommendations", orjson.dumps({"items": ["i1", "i2"], "event_types": ["view"]}), 400, "bad_body"),
    ("POST", "/recommendations", orjson.dumps({"items": ["i1"], "event_types": ["teleport"]}), 400, "bad_body"),
    ("POST", "/recommendations", orjson.dumps({"items": ["i1"], "k": 500}), 400, "bad_k"),
    ("POST", "/recommendations", orjson.dumps({"items": ["i1"] * 10, "pad": "x" * 20000}), 413, "body_too_large"),
]


def test_bad_requests_get_4xx_json_and_anonymous_sessions_store_nothing(kafka, tmp_path: Path,
                                                                       model_path: Path) -> None:
    settings = kafka.settings(partitions=2, top_k=5)
    ensure_topics(settings)
    events = make_events(n_users=3, per_user=3, seed=9)
    reader = TopicReader(settings, settings.topic("recommendations"))
    try:
        with WorkerProc(kafka, settings, model_path, tmp_path, GRUFLOW_BECAUSE="true") as worker:
            produce(settings, events)
            reader.poll_until(lambda c: len(c.messages) >= len(events), 90, "a recommendation per event")
            for method, path, body, status, code in BAD_REQUESTS:
                got, doc = request(worker, path, body if method == "POST" else None)
                assert (got, doc["error"]) == (status, code), (path, doc)
                assert "u1" not in doc["detail"] and "xxxx" not in doc["detail"]
            assert worker.metric("gruflow_http_requests_total", status="400") == \
                sum(1 for r in BAD_REQUESTS if r[3] == 400)
            assert worker.get("/readyz")[0] == 200 and worker.proc.poll() is None  # still up

            # an anonymous visitor: the answer of a fresh state stepped through the items; nothing stored
            assert worker.wait_metric("gruflow_state_entries", lambda v: v == 3, timeout=30)
            session = [Ev("visitor", "i7", 1, "view"), Ev("visitor", "i42", 2, "cart"), Ev("visitor", "i9", 3, "click")]
            body = orjson.dumps({"items": [e.item for e in session], "event_types": [e.etype for e in session],
                                 "k": 5})
            status, doc = request(worker, "/recommendations", body)
            assert status == 200 and doc["cold_start"] is False, doc
            want = expected_answers(model_path, session, settings)[("visitor", 3)]
            assert same_answer(answer_items(doc), want), doc
            # "because" names items of the session only
            assert all(set(i.get("because", [])) <= {"i7", "i42", "i9"} for i in doc["items"])
            assert any(i.get("because") for i in doc["items"]), doc
            status, doc = request(worker, "/recommendations", orjson.dumps({"items": ["not-in-the-catalogue"]}))
            assert status == 200 and doc["cold_start"] is True
            # a user's answer carries "because" from the user's own recent items
            user_items = {e.item for e in events if e.user == "u1"}
            status, doc = request(worker, "/users/u1/recommendations")
            assert status == 200 and doc["known_user"]
            assert all(set(i.get("because", [])) <= user_items for i in doc["items"])
            assert worker.metric("gruflow_http_requests_total", endpoint="anonymous", status="200") == 2
            assert not worker.wait_metric("gruflow_state_entries", lambda v: v != 3, timeout=4)
    finally:
        reader.close()
