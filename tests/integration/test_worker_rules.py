"""Business rules at scoring time, end to end: a worker against the embedded broker, events and
item-rules records produced as a shop would, the recommendations read back from the topic.

The model is the tiny test model with one item (``BOOSTED``) given a large output bias, so it is in
every list the model makes: each rule below has something to take away, and the tests check that it
does (lists of other users, or before the rule, still hold the item).
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from stream.kafka.topics import ensure_topics
from workerkit import Ev, TopicReader, WorkerProc, produce, save_tiny_model

pytestmark = pytest.mark.integration

BOOSTED = "i0"
K = 10


def boosted_model(tmp_path: Path, bias: float = 3.0) -> Path:
    """The tiny model with ``BOOSTED``'s output bias raised: far above any other item's score."""
    path = save_tiny_model(tmp_path / "tiny.gfc")
    ckpt = load_checkpoint(path)
    with torch.no_grad():
        ckpt.net.By.weight[ckpt.vocab.row(BOOSTED)] += bias
    return save_checkpoint(tmp_path / "boosted.gfc", ckpt.net, ckpt.vocab, ckpt.params, ckpt.popularity,
                           {"version": 1})


def items_of(rec: dict) -> list[str]:
    return [i["item_id"] for i in rec["items"]]


def produce_rule(settings, item_id: str, value: dict | None) -> None:
    from confluent_kafka import Producer

    from stream.kafka.config import producer_config

    p = Producer(producer_config(settings))
    p.produce(settings.topic("item-rules"), None if value is None else orjson.dumps(value), item_id.encode())
    assert p.flush(30) == 0


def test_bought_item_never_returns_and_unavailable_item_leaves_within_5s(kafka, tmp_path: Path) -> None:
    settings = kafka.settings(partitions=2, top_k=K, rule_bought="forever", batch_max_ms=10)
    ensure_topics(settings)
    model = boosted_model(tmp_path)
    t0 = int(time.time() * 1000) - 600_000
    reader = TopicReader(settings, settings.topic("recommendations"))
    with WorkerProc(kafka, settings, model, tmp_path, name="rules") as worker:
        # the buyer views, buys the boosted item, clicks on; others only view. Purchases and clicks are
        # on two topics, so each step waits for its answers (the rules follow the order of processing)
        steps = [[Ev("buyer", f"i{j + 5}", t0 + j, "view") for j in range(3)]
                 + [Ev(f"other{u}", f"i{j + 30}", t0 + 100 * u + j, "view") for u in range(4) for j in range(3)],
                 [Ev("buyer", BOOSTED, t0 + 10, "purchase")],
                 [Ev("buyer", f"i{j + 20}", t0 + 20 + j, "click") for j in range(6)]]
        sent = 0
        for events in steps:
            produce(settings, events)
            sent += len(events)
            seen = reader.poll_until(lambda c: len(c.messages) >= sent, 90, "answers to every event")
        recs = seen.recommendations()
        buyer_after = [r for r in recs if r["user_id"] == "buyer" and r["event_ts"] >= t0 + 10]
        buyer_before = [r for r in recs if r["user_id"] == "buyer" and r["event_ts"] < t0 + 10]
        others = [r for r in recs if r["user_id"] != "buyer"]
        assert len(buyer_after) == 7 and buyer_before
        assert all(BOOSTED in items_of(r) for r in buyer_before + others), "the boosted item is in every list"
        assert not [r for r in buyer_after if BOOSTED in items_of(r)], "a bought item came back"
        assert all(len(r["items"]) == K for r in recs), "masked items are replaced: K items per list"
        assert worker.wait_metric("gruflow_rule_masked_items_total", lambda v: v >= 7, rule="bought")

        # the catalogue marks the boosted item unavailable; events keep coming
        produce_rule(settings, BOOSTED, {"available": False})
        marked_ms = int(time.time() * 1000)
        deadline = time.monotonic() + 9.0
        n = 0
        while time.monotonic() < deadline:
            produce(settings, [Ev(f"late{n % 7}", f"i{40 + n % 50}", t0 + 10_000 + n, "view")])
            n += 1
            time.sleep(0.2)
        late = [r for r in reader.drain(3.0).recommendations() if r["user_id"].startswith("late")]
        after_5s = [r for r in late if r["published_ts"] >= marked_ms + 5000]
        assert len(after_5s) >= 5, f"too few lists after 5 s: {len(after_5s)}"
        assert not [r for r in after_5s if BOOSTED in items_of(r)], "unavailable item still shown 5 s later"
        shown_after = [r["published_ts"] - marked_ms for r in late
                       if BOOSTED in items_of(r) and r["published_ts"] >= marked_ms]
        print(f"lists with the item published after the rule was produced: {len(shown_after)}, the last "
              f"{max(shown_after, default=0)} ms after it; {len(late)} lists in all")
        assert all(len(r["items"]) == K for r in late)
        assert worker.metric("gruflow_rule_masked_items_total", rule="unavailable") > 0
        assert worker.metric("gruflow_item_rules_items") == 1

        # a tombstone lifts the rule
        produce_rule(settings, BOOSTED, None)
        lifted_ms = int(time.time() * 1000)
        deadline = time.monotonic() + 10.0
        back = False
        while time.monotonic() < deadline and not back:
            produce(settings, [Ev(f"late{n % 7}", f"i{40 + n % 50}", t0 + 10_000 + n, "view")])
            n += 1
            time.sleep(0.3)
            back = any(BOOSTED in items_of(r) and r["published_ts"] >= lifted_ms
                       for r in reader.drain(0.5).recommendations() if r["user_id"].startswith("late"))
        assert back, "the item did not come back after its rule was deleted"
    reader.close()


def test_exposure_cap_holds_when_one_item_is_overwhelmingly_popular(kafka, tmp_path: Path) -> None:
    cap = 0.2
    settings = kafka.settings(partitions=2, top_k=K, exposure_cap=cap, exposure_window_s=600.0)
    ensure_topics(settings)
    model = boosted_model(tmp_path)
    t0 = int(time.time() * 1000) - 600_000
    # 70% of the events are on the boosted item, which also tops every list of the model
    events = [Ev(f"u{u}", BOOSTED if (u + j) % 10 < 7 else f"i{1 + (u * 7 + j) % 200}", t0 + 1000 * j + u)
              for j in range(8) for u in range(60)]
    reader = TopicReader(settings, settings.topic("recommendations"))
    with WorkerProc(kafka, settings, model, tmp_path, name="exposure") as worker:
        produce(settings, events)
        recs = reader.poll_until(lambda c: len(c.messages) >= len(events), 90, "answers").recommendations()
        damped = worker.metric("gruflow_rule_masked_items_total", rule="exposure")
    reader.close()
    holding = sum(BOOSTED in items_of(r) for r in recs)
    share = holding / len(recs)
    print(f"boosted item in {holding} of {len(recs)} lists ({share:.3f}), cap {cap}; damped out {damped:.0f}")
    assert len(recs) >= 100
    assert share <= cap, f"the item took {share:.3f} of the lists, cap {cap}"
    assert share >= cap / 2, "soft limiting keeps the item in lists up to its cap"
    assert damped >= len(recs) - holding - 1
    assert all(len(r["items"]) == K for r in recs)
