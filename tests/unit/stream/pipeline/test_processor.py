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
from stream.pipeline.processor import PopularityBaseline, ProcessorConfig, process_batch

torch.set_num_threads(1)
GAP = 60_000
CFG = ProcessorConfig(k=5, session_gap_ms=GAP)


@pytest.fixture(scope="module")
def model() -> Recommender:
    n_items = 50
    net = GRU4RecNet(n_items, GRU4RecParams(layers=(16,), seed=3))
    pop = np.arange(n_items, 0, -1, dtype=np.float64)  # row 0 most popular
    return Recommender(net, Vocabulary(f"i{r}" for r in range(n_items)), version=7, popularity=pop)


def _ev(user: str, item: str, ts: int, offset: int = -1, etype: int = 1, source: int = 0) -> Event:
    return Event(user, item, etype, ts, user.encode(), "clicks", 0, offset, ts, source)


def _run(model: Recommender, store: MemoryStore, events: list[Event], pop: PopularityBaseline | None = None):
    keys = list(dict.fromkeys(e.key for e in events))
    result = process_batch(model, events, store.get_many(keys), CFG, pop)
    store.put_many(result.states)
    return result


def _reference_hidden(model: Recommender, items: list[str], types: list[int]) -> np.ndarray:
    """One user's hidden state, stepped one event at a time (no batching)."""
    h = model.zero_state(1)
    for item, t in zip(items, types):
        h = model.step(h, np.array([model.vocab.row(item)]), np.array([t]))
    return h[0]


def test_one_output_per_event_in_order_with_contract_fields(model: Recommender) -> None:
    store = MemoryStore()
    events = [_ev("a", "i1", 1000), _ev("b", "i2", 1000), _ev("a", "i3", 2000)]
    result = _run(model, store, events)
    assert [k for k, _ in result.outputs] == [b"a", b"b", b"a"]
    for (key, value), e in zip(result.outputs, events):
        msg = orjson.loads(value)
        assert set(msg) == {"user_id", "items", "model_version", "event_ts", "published_ts"}
        assert msg["user_id"] == e.user_id and msg["event_ts"] == e.ts_ms and msg["model_version"] == 7
        assert len(msg["items"]) == CFG.k
        scores = [it["score"] for it in msg["items"]]
        assert scores == sorted(scores, reverse=True)
        assert all(it["item_id"] in model.vocab for it in msg["items"])


def test_batched_waves_equal_sequential_steps(model: Recommender) -> None:
    seqs = {"a": ["i1", "i4", "i9", "i4"], "b": ["i2"], "c": ["i3", "i3"]}
    events, t = [], 1000
    for step in range(4):
        for user, items in seqs.items():
            if step < len(items):
                events.append(_ev(user, items[step], t))
                t += 10
    one_batch = MemoryStore()
    _run(model, one_batch, events)
    per_event = MemoryStore()
    for e in events:
        _run(model, per_event, [e])
    for user, items in seqs.items():
        ref = _reference_hidden(model, items, [1] * len(items))
        for store in (one_batch, per_event):
            st = store.get_many([user.encode()])[user.encode()]
            np.testing.assert_allclose(st.hidden, ref, rtol=1e-5, atol=1e-6)
            assert st.session_events == len(items)


def test_recommendations_match_top_k_of_the_new_state(model: Recommender) -> None:
    store = MemoryStore()
    result = _run(model, store, [_ev("a", "i1", 1000), _ev("a", "i2", 1500)])
    ref = _reference_hidden(model, ["i1", "i2"], [1, 1])
    rows, _ = model.top_k(ref[None, :], CFG.k)
    got = [it["item_id"] for it in orjson.loads(result.outputs[-1][1])["items"]]
    assert got == model.vocab.item_ids(rows[0].tolist())
    st = store.get_many([b"a"])[b"a"]
    assert st.recs.tolist() == rows[0].tolist() and st.model_version == 7


def test_session_gap_zeroes_the_hidden_state(model: Recommender) -> None:
    store = MemoryStore()
    _run(model, store, [_ev("a", "i1", 1000), _ev("a", "i2", 2000)])
    _run(model, store, [_ev("a", "i5", 2000 + GAP + 1)])
    st = store.get_many([b"a"])[b"a"]
    np.testing.assert_allclose(st.hidden, _reference_hidden(model, ["i5"], [1]), rtol=1e-5, atol=1e-6)
    assert st.session_events == 1 and st.last_ts_ms == 2000 + GAP + 1


def test_unknown_item_counts_moves_time_and_falls_back_to_popular(model: Recommender) -> None:
    store = MemoryStore()
    result = _run(model, store, [_ev("new", "not-in-vocab", 5000)])
    assert result.unknown_items == 1
    items = [it["item_id"] for it in orjson.loads(result.outputs[0][1])["items"]]
    assert items == model.vocab.item_ids(model.popular(CFG.k)[0].tolist())
    st = store.get_many([b"new"])[b"new"]
    assert st.hidden is None and st.last_ts_ms == 5000 and st.session_events == 1
    # a user with a hidden state keeps it (no GRU step) and gets recommendations from it
    _run(model, store, [_ev("new", "i3", 6000)])
    before = store.get_many([b"new"])[b"new"].hidden.copy()
    _run(model, store, [_ev("new", "unknown-2", 7000)])
    after = store.get_many([b"new"])[b"new"]
    np.testing.assert_array_equal(after.hidden, before)
    assert after.last_ts_ms == 7000 and after.session_events == 3


def test_prequential_counts_hits_against_previously_published_recs(model: Recommender) -> None:
    store = MemoryStore()
    first = _run(model, store, [_ev("a", "i1", 1000)])
    assert not first.prequential.get(("gru", "7"))  # nothing was published to "a" before
    shown = [it["item_id"] for it in orjson.loads(first.outputs[0][1])["items"]]
    missing = next(i for i in model.vocab.ids if i not in shown)
    # second event hits rank 3 of what was shown; third (same batch) misses what the second produced
    second_batch = [_ev("a", shown[2], 2000)]
    out2 = _run(model, store, second_batch)
    p = out2.prequential[("gru", "7")]
    assert (p.events, p.hits) == (1, 1) and p.reciprocal_rank == pytest.approx(1 / 3)
    shown2 = [it["item_id"] for it in orjson.loads(out2.outputs[0][1])["items"]]
    miss = next(i for i in model.vocab.ids if i not in shown2 and i != missing)
    out3 = _run(model, store, [_ev("a", miss, 3000), _ev("a", "unknown", 3100)])
    p3 = out3.prequential[("gru", "7")]
    assert (p3.events, p3.hits, p3.reciprocal_rank) == (2, 0, 0.0)


def test_popularity_baseline_is_scored_on_the_same_events(model: Recommender) -> None:
    store = MemoryStore()
    pop = PopularityBaseline()
    _run(model, store, [_ev("a", "i4", 1000), _ev("b", "i4", 1000), _ev("c", "i8", 1000)], pop)
    assert pop.top(2).tolist() == [4, 8]
    result = _run(model, store, [_ev("a", "i4", 2000), _ev("b", "i8", 2000), _ev("d", "i4", 2000)], pop)
    p = result.prequential[("popularity", "")]
    assert p.events == result.prequential[("gru", "7")].events == 2  # "d" had nothing published before
    assert p.hits == 2 and p.reciprocal_rank == pytest.approx(1 + 1 / 2)


def test_redelivered_events_are_answered_but_not_applied_twice(model: Recommender) -> None:
    events = [_ev("a", "i1", 1000, offset=10), _ev("a", "i2", 1100, offset=11), _ev("a", "i3", 1200, offset=12)]
    once = MemoryStore()
    _run(model, once, events)
    twice = MemoryStore()
    _run(model, twice, events[:2])
    replay = _run(model, twice, events)  # 10 and 11 again (crash before the offset commit), then 12
    assert len(replay.outputs) == 3 and replay.duplicates == 2
    a, b = once.get_many([b"a"])[b"a"], twice.get_many([b"a"])[b"a"]
    np.testing.assert_array_equal(a.hidden, b.hidden)
    assert a.session_events == b.session_events == 3 and b.offsets == [12, -1]
    assert sum(p.events for (m, _), p in replay.prequential.items() if m == "gru") == 1


def test_state_from_a_model_with_another_hidden_size_is_dropped(model: Recommender) -> None:
    other = Recommender(GRU4RecNet(50, GRU4RecParams(layers=(8,))), model.vocab, version=1)
    store = MemoryStore()
    _run(other, store, [_ev("a", "i1", 1000)])
    _run(model, store, [_ev("a", "i2", 1001)])
    st = store.get_many([b"a"])[b"a"]
    np.testing.assert_allclose(st.hidden, _reference_hidden(model, ["i2"], [1]), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def nan_cart_model(model: Recommender) -> Recommender:
    """``model`` whose event-type embedding of "cart" is NaN: a cart event's GRU step makes a NaN state,
    every other step and every score stays finite."""
    import copy

    net = copy.deepcopy(model.net)
    with torch.no_grad():
        net.T.weight[2] = float("nan")
    return Recommender(net, model.vocab, version=model.version, popularity=model.popularity)


def _scores(result) -> list[float]:
    return [it["score"] for _, value in result.outputs for it in orjson.loads(value)["items"]]


def test_a_non_finite_step_resets_the_user_and_is_counted(model: Recommender, nan_cart_model: Recommender) -> None:
    store = MemoryStore()
    events = [_ev("a", "i1", 1000), _ev("b", "i1", 1000), _ev("a", "i2", 1100, etype=2), _ev("c", "i4", 1100, etype=2),
              _ev("a", "i3", 1200)]
    result = _run(nan_cart_model, store, events)
    scores = _scores(result)
    assert all(s is not None and np.isfinite(s) for s in scores), scores
    # the cart event is answered like a user without a state: the popular items
    cart_items = [it["item_id"] for it in orjson.loads(result.outputs[2][1])["items"]]
    assert cart_items == model.vocab.item_ids(model.popular(CFG.k)[0].tolist())
    states = store.get_many([b"a", b"b", b"c"])
    # "a" starts over after the reset: its state is i3 stepped from zero; "c" ended on the reset
    np.testing.assert_allclose(states[b"a"].hidden, _reference_hidden(model, ["i3"], [1]), rtol=1e-5, atol=1e-6)
    assert states[b"c"].hidden is None and states[b"c"].session_events == 1
    np.testing.assert_allclose(states[b"b"].hidden, _reference_hidden(model, ["i1"], [1]), rtol=1e-5, atol=1e-6)
    assert all(st.hidden is None or np.isfinite(st.hidden).all() for st in states.values())
    assert result.state_resets == {"non_finite_step": 2}


def test_a_non_finite_stored_state_is_dropped_when_read(model: Recommender) -> None:
    store = MemoryStore()
    users = [b"a", b"b", b"c"]
    _run(model, store, [_ev(u.decode(), "i1", 1000, offset=1) for u in users])
    poisoned = store.get_many(users)
    for st in poisoned.values():
        st.hidden = np.full_like(st.hidden, np.nan)
    poisoned[b"c"].hidden[0] = np.inf
    store.put_many(poisoned)
    # "a" comes back with a new event, "b" with a redelivered one (answered, not applied), "c" with an
    # unknown item (shown without a step) and then a known one
    result = _run(model, store, [_ev("a", "i5", 2000, offset=2), _ev("b", "i1", 1000, offset=1),
                                 _ev("c", "nope", 2000, offset=2), _ev("c", "i6", 2100, offset=3)])
    assert all(s is not None and np.isfinite(s) for s in _scores(result))
    states = store.get_many(users)
    np.testing.assert_allclose(states[b"a"].hidden, _reference_hidden(model, ["i5"], [1]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(states[b"c"].hidden, _reference_hidden(model, ["i6"], [1]), rtol=1e-5, atol=1e-6)
    assert states[b"b"].hidden is None  # the NaN record is overwritten, not kept
    assert states[b"a"].session_events == 2 and states[b"a"].offsets == [2, -1]
    assert result.state_resets == {"non_finite_stored": 3}  # users, each counted once


def test_finite_batches_report_no_resets(model: Recommender) -> None:
    result = _run(model, MemoryStore(), [_ev("a", "i1", 1000), _ev("a", "i2", 1100, etype=2)])
    assert result.state_resets == {}


@pytest.mark.parametrize("n_items", [5000, 5003])
def test_fast_top_k_equals_the_recommenders(n_items: int, same_top_k) -> None:
    from model.topk import TopKScorer, block_topk

    net = GRU4RecNet(n_items, GRU4RecParams(layers=(24,), seed=5))
    with torch.no_grad():
        net.By.weight.normal_()  # spread scores like a trained model's biases
    rec = Recommender(net, Vocabulary(f"i{r}" for r in range(n_items)), version=1)
    rng = np.random.default_rng(0)
    hidden = rec.zero_state(300)
    for _ in range(3):
        hidden = rec.step(hidden, rng.integers(0, n_items, 300), rng.integers(0, 3, 300))
    want_rows, want_scores = rec.top_k(hidden, 20)
    same_top_k(rec, hidden, 20, want_rows, want_scores)  # the reference itself passes the check
    same_top_k(rec, hidden, 20, *TopKScorer(rec).top_k(hidden, 20))
    # retired items (online learning) are never recommended, on both paths alike
    retired = sorted(set(want_rows[:, 0].tolist()))[:10]
    rec2 = Recommender(net, rec.vocab, version=2, metadata={"retired_rows": retired})
    same_top_k(rec2, hidden, 20, *rec2.top_k(hidden, 20))
    same_top_k(rec2, hidden, 20, *TopKScorer(rec2).top_k(hidden, 20))
    # the block selection alone, on arbitrary scores
    scores = torch.from_numpy(rng.standard_normal((7, n_items)).astype(np.float32))
    v, r = block_topk(scores, 20)
    ev, er = torch.topk(scores, 20, dim=1)
    assert torch.equal(r, er) and torch.equal(v, ev)


def test_processor_uses_the_given_top_k(model: Recommender) -> None:
    calls = []

    def top_k(hidden: np.ndarray, k: int):
        calls.append(hidden.shape[0])
        return model.top_k(hidden, k)

    result = process_batch(model, [_ev("a", "i1", 1), _ev("b", "i2", 1)], {}, CFG, None, top_k)
    assert calls == [2] and len(result.outputs) == 2


def _documents_by_orjson(model: Recommender, events: list[Event], rows: np.ndarray, scores: np.ndarray,
                         published_ms: int) -> list[bytes]:
    ids = model.vocab.ids if hasattr(model.vocab, "ids") else model.vocab._ids
    out = []
    rounded = np.round(scores.astype(np.float64), 6).tolist()  # the contract: 6 decimals, as numpy rounds
    for e, rr, ss in zip(events, rows.tolist(), rounded):
        if -2 in rr:  # padding ends a row
            rr = rr[: rr.index(-2)]
        items = [{"item_id": ids[r], "score": s} for r, s in zip(rr, ss)]
        out.append(orjson.dumps({"user_id": e.user_id, "items": items, "model_version": int(model.version),
                                 "event_ts": e.ts_ms, "published_ts": published_ms}))
    return out


@pytest.mark.parametrize("k", [0, 1, 5])
def test_compiled_and_python_encoders_write_orjsons_documents(model: Recommender, monkeypatch, k: int) -> None:
    from model import native
    from stream.pipeline import recommendation_json as P
    rng = np.random.default_rng(5)
    n = 40
    users = ["a", "ünï\"cödé\\", "x" * 200, "\n\t", "7"]
    events = [_ev(users[i % len(users)], "i1", 1_700_000_000_000 + i * 13) for i in range(n)]
    rows = rng.integers(0, model.n_items, (n, k)).astype(np.int64)
    scores = (rng.standard_normal((n, k)) * 10.0 ** rng.integers(-8, 4, (n, k))).astype(np.float32)
    if k:
        rows[3, k // 2:] = -2  # a padded row (fewer popular items than k)
        rows[4, :] = -2  # nothing at all
        scores[5, 0] = 0.0
        scores[6, -1] = -1e-7
    expected = _documents_by_orjson(model, events, rows, scores, 1_700_000_000_999)
    compiled = P.encode_outputs(model, events, rows, scores, 1_700_000_000_999)
    assert [key for key, _ in compiled] == [e.key for e in events]
    if native.library() is not None:
        assert P.encode_compiled(native.library(), model, events, rows,
                                  orjson.dumps(np.round(scores.astype(np.float64), 6),
                                               option=orjson.OPT_SERIALIZE_NUMPY),
                                  b'],"model_version":7,"event_ts":', b',"published_ts":1700000000999}') is not None
    monkeypatch.setattr(native, "library", lambda: None)
    python = P.encode_outputs(model, events, rows, scores, 1_700_000_000_999)
    assert [v for _, v in compiled] == [v for _, v in python] == expected


def test_the_popularity_top_ranked_from_candidates_equals_a_full_ranking():
    """``PopularityBaseline.top`` ranks only the last top and the rows updated since; with many ties and a
    growing catalogue it must equal the full ranking (count desc, then row asc) after every update."""
    rng = np.random.default_rng(7)
    pop = PopularityBaseline()
    for step in range(300):
        n = 50 + step  # the catalogue grows
        pop.update(rng.integers(-1, n, size=int(rng.integers(0, 6))))
        k = 5 if step % 50 else 8  # a different k now and then: ranked in full
        c = pop.counts
        full = sorted(range(len(c)), key=lambda r: (-c[r], r))[:k]
        assert pop.top(k).tolist() == [r for r in full if c[r] > 0], step
