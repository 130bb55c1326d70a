"""Recommendations on request, without Kafka: request checks, and answers equal to what the stream publishes."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch

from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.recommender import Recommender
from model.vocab import Vocabulary
from state.store import MemoryStore
from stream.pipeline.events import Event
from stream.pipeline.processor import ProcessorConfig, process_batch
from stream.pipeline.serving import (RequestError, ServeLimits, Session, answer_session, answer_user, check_user_id, parse_k,
                            parse_session)

torch.set_num_threads(1)
LIMITS = ServeLimits(default_k=5, max_k=10, max_items=4, max_id_bytes=16)


@pytest.fixture(scope="module")
def model() -> Recommender:
    n = 40
    net = GRU4RecNet(n, GRU4RecParams(layers=(12,), seed=5))
    return Recommender(net, Vocabulary(f"i{r}" for r in range(n)), version=3,
                       popularity=np.arange(n, 0, -1, dtype=np.float64))


def _ev(user: str, item: str, ts: int, etype: int = 1) -> Event:
    return Event(user, item, etype, ts, user.encode(), "clicks", 0, -1, ts, 0)


@pytest.mark.parametrize("raw,code", [("0", "bad_k"), ("11", "bad_k"), ("x", "bad_k"), ("-1", "bad_k")])
def test_bad_k_is_a_400(raw: str, code: str) -> None:
    with pytest.raises(RequestError) as err:
        parse_k(raw, LIMITS)
    assert (err.value.status, err.value.code) == (400, code)


def test_k_defaults_and_user_id_bounds() -> None:
    assert parse_k(None, LIMITS) == 5 and parse_k("10", LIMITS) == 10
    assert check_user_id("u1", LIMITS) == b"u1"
    for bad in ("", "x" * 17):
        with pytest.raises(RequestError) as err:
            check_user_id(bad, LIMITS)
        assert err.value.status == 400 and (not bad or bad not in err.value.detail)


@pytest.mark.parametrize("body,code", [
    (b"nope", "bad_body"), (b"[]", "bad_body"), (b'{"items": "i1"}', "bad_body"),
    (b'{"items": ["i1", "i2", "i3", "i4", "i5"]}', "too_many_items"), (b'{"items": [true]}', "bad_body"),
    (b'{"items": ["i1"], "event_types": ["view", "view"]}', "bad_body"),
    (b'{"items": ["i1"], "event_types": ["buy"]}', "bad_body"), (b'{"items": ["i1"], "k": 99}', "bad_k"),
    (b'{"items": [""]}', "bad_body"),
])
def test_bad_sessions_are_400s_with_a_code(body: bytes, code: str) -> None:
    with pytest.raises(RequestError) as err:
        parse_session(body, LIMITS)
    assert (err.value.status, err.value.code) == (400, code)
    assert orjson.loads(err.value.body())["error"] == code


def test_session_parsing_maps_types_and_integer_ids() -> None:
    s = parse_session(b'{"items": [7, "i3"], "event_types": ["cart", "purchase"], "k": 2}', LIMITS)
    assert s == Session(("7", "i3"), (2, 3), 2)
    assert parse_session(b'{"items": ["i1"]}', LIMITS).types == (0,)  # view by default


def test_a_users_answer_is_what_the_stream_published_for_its_last_event(model: Recommender) -> None:
    store = MemoryStore()
    cfg = ProcessorConfig(k=5)
    events = [_ev("a", "i4", 1000), _ev("a", "i9", 2000), _ev("b", "i1", 1500), _ev("a", "i2", 3000)]
    result = process_batch(model, events, {}, cfg)
    store.put_many(result.states)
    published = orjson.loads(result.outputs[-1][1])
    doc = answer_user(model, store.get_many([b"a"])[b"a"], 5, LIMITS)
    assert [i["item_id"] for i in doc["items"]] == [i["item_id"] for i in published["items"]]
    np.testing.assert_allclose([i["score"] for i in doc["items"]], [i["score"] for i in published["items"]],
                               atol=1e-5)
    assert doc["cold_start"] is False and doc["known_user"] is True and doc["model_version"] == 3


def test_unknown_users_and_sessions_of_unknown_items_get_the_marked_cold_start(model: Recommender) -> None:
    doc = answer_user(model, None, 3, LIMITS)
    assert doc["cold_start"] is True and doc["known_user"] is False
    assert [i["item_id"] for i in doc["items"]] == ["i0", "i1", "i2"]  # by popularity
    doc = answer_session(model, Session(("nope", "neither"), (0, 0), 3), LIMITS, 0)
    assert doc["cold_start"] is True


def test_an_anonymous_session_answers_like_a_user_with_the_same_events(model: Recommender) -> None:
    events = [_ev("v", "i4", 1000, 0), _ev("v", "missing", 1100, 0), _ev("v", "i7", 1200, 2)]
    published = orjson.loads(process_batch(model, events, {}, ProcessorConfig(k=6)).outputs[-1][1])
    doc = answer_session(model, Session(("i4", "missing", "i7"), (0, 0, 2), 6), LIMITS, 0)
    assert [i["item_id"] for i in doc["items"]] == [i["item_id"] for i in published["items"]]
    assert doc["cold_start"] is False


def test_because_names_recent_session_items_in_requests_and_in_the_stream(model: Recommender) -> None:
    limits = ServeLimits(default_k=5, max_k=10, max_items=10, because_items=2)
    cfg = ProcessorConfig(k=5, because_history=3)
    events = [_ev("a", f"i{r}", 1000 * (j + 1)) for j, r in enumerate((3, 8, 3, 15, 21))]
    result = process_batch(model, events, {}, cfg)
    state = result.states[b"a"]
    assert state.recent.tolist() == [3, 15, 21]  # distinct, newest last, bounded by the history
    published = orjson.loads(result.outputs[-1][1])
    why = [i.get("because", []) for i in published["items"]]
    assert any(why) and all(1 <= len(w) <= 2 and set(w) <= {"i3", "i15", "i21"} for w in why if w)
    doc = answer_user(model, state, 5, limits)
    assert [i.get("because", []) for i in doc["items"]] == why  # the request names the same items
    # off: no recent rows kept, no "because"
    plain = process_batch(model, events, {}, ProcessorConfig(k=5))
    assert plain.states[b"a"].recent is None and "because" not in plain.outputs[-1][1].decode()
    for (_, with_why), (_, without) in zip(result.outputs, plain.outputs):  # the same documents but "because"
        doc = orjson.loads(with_why)
        for item in doc["items"]:
            item.pop("because", None)
        other = orjson.loads(without)
        doc.pop("published_ts"), other.pop("published_ts")
        assert doc == other


def test_queries_scored_together_answer_as_each_alone(model: Recommender) -> None:
    from stream.pipeline.serving import answer_many, session_query, user_query

    limits = ServeLimits(default_k=5, max_k=10, max_items=10, because_items=2)
    result = process_batch(model, [_ev("a", "i4", 1000), _ev("a", "i9", 2000)], {}, ProcessorConfig(k=5,
                                                                                                   because_history=3))
    queries = [user_query(model, result.states[b"a"], 7), user_query(model, None, 2),
               session_query(model, Session(("i1", "i30"), (0, 2), 4), 3)]
    together = answer_many(model, queries, limits)
    alone = [answer_many(model, [q], limits)[0] for q in queries]
    assert [len(d["items"]) for d in together] == [7, 2, 4]
    for t, a in zip(together, alone):
        assert [i["item_id"] for i in t["items"]] == [i["item_id"] for i in a["items"]]
        assert [i.get("because") for i in t["items"]] == [i.get("because") for i in a["items"]]
        np.testing.assert_allclose([i["score"] for i in t["items"]], [i["score"] for i in a["items"]], atol=1e-5)
    assert [d["cold_start"] for d in together] == [False, True, False]
    assert together[0]["known_user"] is True and together[1]["known_user"] is False and "known_user" not in together[2]


def test_a_users_own_business_rules_apply_to_requests(model: Recommender) -> None:
    from stream.pipeline.ranking import RuleContext
    from stream.pipeline.rules import RuleConfig
    from stream.settings import Settings

    cfg = RuleConfig.from_settings(Settings.of(rule_bought="forever"))
    rules = RuleContext(cfg, {}, None, 2.0, record=False)
    events = [_ev("a", "i4", 1000), _ev("a", "i9", 2000)]
    plain = process_batch(model, events, {}, ProcessorConfig(k=5))
    bought = orjson.loads(plain.outputs[-1][1])["items"][0]["item_id"]  # the user buys the item shown first
    events.append(Event("a", bought, 3, 3000, b"a", "purchases", 0, -1, 3000, 1))
    result = process_batch(model, events, {}, ProcessorConfig(k=5), rules=rules)
    doc = answer_user(model, result.states[b"a"], 5, LIMITS, None, rules)
    assert len(doc["items"]) == 5 and bought not in [i["item_id"] for i in doc["items"]]
    assert [i["item_id"] for i in doc["items"]] == [i["item_id"] for i in orjson.loads(result.outputs[-1][1])["items"]]


def test_anonymous_sessions_stepped_together_answer_as_each_stepped_alone(model: Recommender) -> None:
    from stream.pipeline.serving import answer_many, session_queries, session_query, step_session, step_sessions

    limits = ServeLimits(default_k=5, max_k=10, max_items=10, because_items=2)
    rng = np.random.default_rng(3)
    sessions = [Session(("i1", "i30"), (0, 2), 4), Session(("nope",), (0,), 3), Session((), (), 2),
                Session(("i5", "i5", "gone", "i9", "i5", "i12"), (0, 1, 0, 2, 0, 3), 6)]
    sessions += [Session(tuple(f"i{r}" for r in rng.integers(0, 44, size=n)),
                         tuple(rng.integers(0, 4, size=n).tolist()), 5) for n in rng.integers(1, 9, size=12)]  # ids i40..i43 are unknown
    for history in (0, 3):
        together = step_sessions(model, sessions, history)
        alone = [step_session(model, s, history) for s in sessions]
        assert [h is None for h, _ in together] == [h is None for h, _ in alone]
        assert [recent for _, recent in together] == [recent for _, recent in alone]
        for (h_t, _), (h_a, _) in zip(together, alone):
            if h_a is not None:
                np.testing.assert_allclose(h_t, h_a, rtol=1e-6, atol=1e-6)
        docs = answer_many(model, session_queries(model, sessions, history), limits)
        one_by_one = answer_many(model, [session_query(model, s, history) for s in sessions], limits)
        assert [[i["item_id"] for i in d["items"]] for d in docs] == [[i["item_id"] for i in d["items"]]
                                                                      for d in one_by_one]
        assert [[i.get("because") for i in d["items"]] for d in docs] == [[i.get("because") for i in d["items"]]
                                                                          for d in one_by_one]
        assert [d["cold_start"] for d in docs] == [d["cold_start"] for d in one_by_one]
        assert sum(d["cold_start"] for d in docs) >= 2  # the unknown-only and the empty session
    assert step_sessions(model, [], 3) == []


def test_the_published_list_kept_for_requests_answers_as_scoring_the_state_does(model: Recommender) -> None:
    """Users with purchases masked, a denied item, "because" on, and one with only unknown items (cold start):
    the answer from the kept list equals the answer scored from the stored state, for every k up to K."""
    from dataclasses import replace

    from stream.pipeline.answer_cache import AnswerCache, Stamp
    from stream.pipeline.ranking import RuleContext
    from stream.pipeline.rules import RuleConfig
    from stream.pipeline.serving import answer_from_list
    from stream.settings import Settings

    limits = ServeLimits(default_k=5, max_k=10, max_items=10, because_items=2)
    cfg = RuleConfig.from_settings(Settings.of(rule_bought="forever"))
    denied = np.zeros(model.n_items, dtype=bool)
    denied[[2, 11]] = True
    rules = RuleContext(cfg, {"deny": np.flatnonzero(denied)}, None, 2.0, record=False)
    events = [_ev("a", "i4", 1000), _ev("b", "i9", 1100), _ev("a", "i7", 1200), _ev("c", "nope", 1300),
              Event("a", "i1", 3, 1400, b"a", "purchases", 0, -1, 1400, 1), _ev("b", "i30", 1500)]
    result = process_batch(model, events, {}, ProcessorConfig(k=5, because_history=3), rules=rules)
    stamp = Stamp(1, 3, 0, 1)
    cache = AnswerCache(10, 60.0)
    cache.remember(replace(result.lists, stamp=stamp))
    for user in (b"a", b"b", b"c"):
        for k in (1, 3, 5):
            kept = answer_from_list(model, cache.get(user, stamp, k), k, limits)
            scored = answer_user(model, result.states[user], k, limits, None, rules)
            assert [i["item_id"] for i in kept["items"]] == [i["item_id"] for i in scored["items"]]
            assert [i.get("because") for i in kept["items"]] == [i.get("because") for i in scored["items"]]
            np.testing.assert_allclose([i["score"] for i in kept["items"]], [i["score"] for i in scored["items"]],
                                       atol=1e-5)
            assert (kept["cold_start"], kept["known_user"], kept["model_version"]) == \
                (scored["cold_start"], scored["known_user"], scored["model_version"])
    assert answer_from_list(model, cache.get(b"c", stamp, 5), 5, limits)["cold_start"] is True
    assert not {"i1", "i2", "i11"} & {i["item_id"] for i in answer_from_list(model, cache.get(b"a", stamp, 5), 5,
                                                                               limits)["items"]}
