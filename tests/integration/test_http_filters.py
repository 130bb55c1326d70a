"""A request's own category filter, end to end: item categories produced to the item-rules topic as a shop's
catalogue would, a worker against the embedded broker, and requests as a shop's web server would make them.
An excluded category never appears, an included one is all that appears, K items still come back, and bad
filters get a 400 while the worker keeps consuming."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from stream.kafka.topics import ensure_topics
from workerkit import N_ITEMS, Ev, TopicReader, WorkerProc, make_events, produce, save_tiny_model

pytestmark = pytest.mark.integration

K = 10
CATEGORY = {f"i{r}": f"c{r % 3}" for r in range(N_ITEMS)}


def produce_categories(settings) -> None:
    from confluent_kafka import Producer

    from stream.kafka.config import producer_config

    p = Producer(producer_config(settings))
    for item, category in CATEGORY.items():
        p.produce(settings.topic("item-rules"), orjson.dumps({"category": category}), item.encode())
    assert p.flush(30) == 0


def categories(doc: dict) -> set[str]:
    return {CATEGORY[i["item_id"]] for i in doc["items"]}


def test_excluded_categories_never_appear_and_included_ones_are_all_that_appears(kafka, tmp_path: Path) -> None:
    settings = kafka.settings(partitions=2, top_k=K)
    ensure_topics(settings)
    model = save_tiny_model(tmp_path / "tiny.gfc")
    produce_categories(settings)
    events = make_events(n_users=4, per_user=3, seed=21)
    users = sorted({e.user for e in events})
    reader = TopicReader(settings, settings.topic("recommendations"))
    try:
        with WorkerProc(kafka, settings, model, tmp_path, name="filters") as worker:
            produce(settings, events)
            reader.poll_until(lambda c: len(c.messages) >= len(events), 90, "a recommendation per event")
            assert worker.wait_metric("gruflow_item_rules_items", lambda v: v == N_ITEMS, timeout=30), \
                worker.log_tail()
            for user in [*users, "never-seen"]:
                status, plain = worker.request(f"/users/{user}/recommendations?k={K}")
                assert status == 200 and len(plain["items"]) == K, plain
                assert "c1" in categories(plain), "the unfiltered list has c1 items: the filter has work to do"
                status, doc = worker.request(f"/users/{user}/recommendations?k={K}&filter=-category:c1")
                assert status == 200 and len(doc["items"]) == K, doc
                assert "c1" not in categories(doc)
                status, doc = worker.request(f"/users/{user}/recommendations?k={K}&filter=category:c2")
                assert status == 200 and len(doc["items"]) == K and categories(doc) == {"c2"}, doc
                assert doc["cold_start"] is (user == "never-seen")

            # an anonymous visitor: the filter in the body, in the query string, or both (they add up)
            session = {"items": ["i4", "i17", "i33"], "event_types": ["view", "cart", "view"], "k": 8}
            status, doc = worker.request("/recommendations", orjson.dumps({**session, "filter": "category:c0"}))
            assert status == 200 and doc["cold_start"] is False and len(doc["items"]) == 8
            assert categories(doc) == {"c0"}, doc
            status, doc = worker.request("/recommendations?filter=-category:c0,c1", orjson.dumps(session))
            assert status == 200 and len(doc["items"]) == 8 and categories(doc) == {"c2"}, doc
            status, doc = worker.request("/recommendations?filter=category:c0,c1",
                                         orjson.dumps({**session, "filter": ["-category:c0"]}))
            assert status == 200 and len(doc["items"]) == 8 and categories(doc) == {"c1"}, doc

            bad = [(f"/users/{users[0]}/recommendations?filter=category", None, "bad_filter"),
                   (f"/users/{users[0]}/recommendations?filter=brand:acme", None, "bad_filter"),
                   (f"/users/{users[0]}/recommendations?filter=category:a,,b", None, "bad_filter"),
                   (f"/users/{users[0]}/recommendations?filter=category:" + ",".join(f"x{n}" for n in range(33)),
                    None, "too_many_filter_values"),
                   ("/recommendations", orjson.dumps({**session, "filter": 7}), "bad_filter"),
                   ("/recommendations?filter=-kategorie:c1", orjson.dumps(session), "bad_filter")]
            for path, body, code in bad:
                status, doc = worker.request(path, body)
                assert (status, doc["error"]) == (400, code), (path, doc)
                assert users[0] not in doc["detail"]
            # still up, and still consuming
            assert worker.get("/readyz")[0] == 200 and worker.proc.poll() is None
            late = Ev(users[0], "i5", int(time.time() * 1000), "click")
            produce(settings, [late])
            got = reader.poll_until(lambda c: (late.user, late.ts) in set(c.answered()), 60, "the late event's answer")
            assert (late.user, late.ts) in set(got.answered())
            assert worker.metric("gruflow_http_requests_total", status="400") == len(bad)
    finally:
        reader.close()
