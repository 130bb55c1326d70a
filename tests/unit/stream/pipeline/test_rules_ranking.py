"""Business rules at scoring time (stream.pipeline.rules / ranking / exposure) and the state record's rule
lists, on a real (tiny) model: masked before the top-K, K items kept, counted per rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.recommender import Recommender
from model.vocab import Vocabulary
from state.codec import BOUGHT_DTYPE, StateCodecError, UserState, decode, encode, encoded_size
from stream.pipeline.events import Event
from stream.pipeline.exposure import MIN_LISTS, ExposureWindow, damp, over_cap
from stream.pipeline.processor import ProcessorConfig, process_batch
from stream.pipeline.ranking import RuleContext, rank
from stream.pipeline.rules import (Catalogue, CatalogueMasks, ItemRule, RuleConfig, as_arrays, as_lists, catalogue_masks,
                                   parse_item_rule, remember, user_exclusions)

N = 200
T0 = 1_700_000_000_000


@pytest.fixture(scope="module")
def model() -> Recommender:
    torch.manual_seed(3)
    net = GRU4RecNet(N, GRU4RecParams(layers=(16,), seed=3))
    with torch.no_grad():
        net.By.weight[0] += 3.0  # item i0 tops every list
    return Recommender(net, Vocabulary(f"i{r}" for r in range(N)), version=1,
                       popularity=np.linspace(N, 1, N))


def ev(user: str, item: str, etype: int, ts: int, offset: int, source: int = 0) -> Event:
    return Event(user, item, etype, ts, user.encode(), "t", 0, offset, ts, source)


def items(out: bytes) -> list[str]:
    import orjson

    return [i["item_id"] for i in orjson.loads(out)["items"]]


def test_codec_keeps_rule_lists_and_stays_version_1_without_them() -> None:
    plain = UserState(np.ones(4, np.float32), T0, 3, 1, np.arange(5, dtype=np.int32), [7, -1])
    raw = encode(plain)
    assert raw[0] == 1 and len(raw) == encoded_size(4, 5)
    bought = np.array([(3, 1_700_000_000), (9, 1_700_000_100)], dtype=BOUGHT_DTYPE)
    rich = UserState(plain.hidden, T0, 3, 1, plain.recs, [7, -1], bought, np.array([4 * 5 + 1], np.int32))
    raw2 = encode(rich)
    assert raw2[0] == 2 and len(raw2) == encoded_size(4, 5, 2, 1)
    back = decode(raw2)
    assert back.bought.tolist() == bought.tolist() and back.session_items.tolist() == [21]
    with pytest.raises(StateCodecError):
        decode(raw2[:-1])


def test_item_rule_records() -> None:
    assert parse_item_rule(b'{"available": false, "category": 7}') == ItemRule(False, False, "7")
    assert parse_item_rule(None) is None
    for bad in (b"nope", b"[1]", b'{"deny": "yes"}', b'{"category": [1]}'):
        with pytest.raises(ValueError):
            parse_item_rule(bad)


def test_catalogue_masks_by_rule_and_category_filters(model: Recommender) -> None:
    cat = Catalogue()
    cat.apply("i1", ItemRule(available=False))
    cat.apply("i2", ItemRule(deny=True))
    cat.apply("i3", ItemRule(category="shoes"))
    cat.apply("i4", ItemRule(category="hats"))
    cat.apply("i2", None)  # tombstone lifts the deny
    masks = catalogue_masks(cat.view(), model.vocab, exclude=frozenset({"shoes"}))
    assert masks["unavailable"].tolist() == [1] and masks["deny"].tolist() == [] and masks["category"].tolist() == [3]
    only_hats = catalogue_masks(cat.view(), model.vocab, include=frozenset({"hats"}))
    assert set(range(N)) - set(only_hats["category"].tolist()) - {1} == {4}
    cache = CatalogueMasks()
    assert cache.get(cat.view(), model.vocab) is cache.get(cat.view(), model.vocab)


def test_bought_item_is_masked_from_its_own_list_and_k_items_remain(model: Recommender) -> None:
    cfg = RuleConfig(bought="forever")
    ctx = RuleContext(cfg, {}, None, 0.0)
    events = [ev("a", "i5", 0, T0, 1), ev("a", "i0", 3, T0 + 1, 1, 1), ev("a", "i6", 1, T0 + 2, 2),
              ev("b", "i5", 0, T0, 3)]
    result = process_batch(model, events, {}, ProcessorConfig(k=10), rules=ctx)
    lists = [items(v) for _, v in result.outputs]
    assert "i0" in lists[0] and "i0" in lists[3]  # before the purchase, and another user
    assert "i0" not in lists[1] and "i0" not in lists[2]
    assert all(len(x) == 10 for x in lists)
    assert result.rule_counts == {"bought": 2}
    state = result.states[b"a"]
    assert state.bought["row"].tolist() == [0]
    # the next batch reads the purchase from the stored state
    again = process_batch(model, [ev("a", "i7", 0, T0 + 3, 3)], {b"a": decode(encode(state))},
                          ProcessorConfig(k=10), rules=ctx)
    assert "i0" not in items(again.outputs[0][1])
    without = process_batch(model, [ev("a", "i7", 0, T0 + 3, 3)], {b"a": state}, ProcessorConfig(k=10))
    assert "i0" in items(without.outputs[0][1])


def test_bought_for_days_and_session_items() -> None:
    cfg = RuleConfig(bought="days", bought_days=1, session_viewed=True, session_cart=True, state_items=2)
    b, s = as_lists(np.zeros(0, BOUGHT_DTYPE), np.zeros(0, np.int32))
    b, s = remember(cfg, b, s, 4, "purchase", 1000)
    for row in (7, 8, 9):
        b, s = remember(cfg, b, s, row, "viewed", 1000)
    b, s = remember(cfg, b, s, 9, "cart", 1000)
    assert [c >> 2 for c in s] == [9, 9] and [c & 3 for c in s] == [0, 1]  # bounded to 2, newest kept
    arrays = as_arrays(b, s)
    assert arrays[0].dtype == BOUGHT_DTYPE and as_lists(*arrays) == (b, s)
    rules = dict(user_exclusions(cfg, b, s, 1000 + 3600))
    assert rules["bought"].tolist() == [4] and rules["session_viewed"].tolist() == [9]
    assert dict(user_exclusions(cfg, b, s, 1000 + 2 * 86400))["bought"].tolist() == []


def test_many_masked_items_fall_back_to_a_wider_pass(model: Recommender) -> None:
    hidden = np.random.default_rng(0).normal(size=(3, model.state_size)).astype(np.float32) * 0.3
    plain_rows, _ = model.top_k(hidden, 40)
    deny = np.unique(plain_rows[:, :30])
    ctx = RuleContext(RuleConfig(candidates=4), {"deny": deny}, None, 0.0)
    rows, _, counts = rank(model, hidden, np.array([True, True, False]), 10, ctx, [[], [], []])
    assert rows.shape == (3, 10) and (rows >= 0).all()
    assert not np.isin(rows, deny).any()
    exact, _ = model.top_k(hidden[:2], 10, exclude=[deny, deny])
    assert rows[:2].tolist() == exact.tolist()
    assert counts["deny"] >= 60


def test_exposure_cap_damps_softly_in_publishing_order() -> None:
    window = ExposureWindow(60.0)
    n, k = 2 * MIN_LISTS, 3
    rows = np.zeros((n, 5), dtype=np.int64)  # item 0 in every list, the others in one list each
    rows[:, 1:] = 10 + np.arange(4 * n).reshape(n, 4)
    scores = np.tile(np.array([[5.0, 1.0, 0.9, 0.8, 0.7]], np.float32), (n, 1))
    flags = over_cap(window, rows[:, :k], 0.25, 0.0)
    assert flags[:50, 0].sum() == 0 and flags[50:, 0].all()  # floor(0.25 * 200) lists keep item 0
    out, damped, left = damp(window, rows, scores, k, 0.25, 10.0, True, 0.0)
    # soft: ln(10) = 2.3 < 5 - 1, so item 0 still beats the others where it is damped
    assert left == 0 and (out[:, 0] == 0).all()
    assert damped[60, 0] == pytest.approx(5.0 - np.log(10.0)) and damped[10, 0] == 5.0
    out, _, left = damp(window, rows, scores, k, 0.25, 1e3, True, 0.0)
    assert (out == 0).any(axis=1).sum() == 50 and left == n - 50
    window.record(out, 0.0)
    assert window.share(0, 1.0) == pytest.approx(0.25)
    assert window.share(0, 61.0 + window.bucket_s) == 0.0  # out of the window
