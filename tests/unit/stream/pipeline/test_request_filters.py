"""A request's own category filter (``filter=category:a,b`` / ``filter=-category:c``), without Kafka: parsing
with its 400s, how it narrows the settings' filters, and the masking it causes in the answers themselves
(masked before the top-K, so K items come back while enough items pass)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch

from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.recommender import Recommender
from model.vocab import Vocabulary
from stream.pipeline.ranking import RuleContext
from stream.pipeline.rules import (NOTHING_INCLUDED, Catalogue, ItemRule, RuleConfig, catalogue_masks,
                                   request_categories)
from stream.pipeline.serving import (CategoryFilter, RequestError, ServeLimits, Session, answer_many, parse_filters,
                                     parse_session, session_query, user_query)

torch.set_num_threads(1)
N = 60
LIMITS = ServeLimits(default_k=5, max_k=20, max_items=4, max_id_bytes=16, because_items=0, max_filter_values=4)
# items i0..i59: category "c<row % 3>", except every tenth item, which has no rule (so no category)
CATEGORY = {f"i{r}": f"c{r % 3}" for r in range(N) if r % 10}


@pytest.fixture(scope="module")
def model() -> Recommender:
    net = GRU4RecNet(N, GRU4RecParams(layers=(8,), seed=4))
    return Recommender(net, Vocabulary(f"i{r}" for r in range(N)), version=2,
                       popularity=np.arange(N, 0, -1, dtype=np.float64))


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    cat = Catalogue()
    for item, category in CATEGORY.items():
        cat.apply(item, ItemRule(category=category))
    return cat


def parse(*values: str) -> CategoryFilter:
    return parse_filters(list(values), LIMITS)


def test_filters_parse_into_include_and_exclude_sets() -> None:
    assert parse() == CategoryFilter() and not parse()
    assert parse("category:shoes,hats") == CategoryFilter(frozenset({"shoes", "hats"}))
    assert parse("-category: toys ") == CategoryFilter(exclude=frozenset({"toys"}))
    got = parse("category:a", "category:b", "-category:a")  # repeated filters add up
    assert got == CategoryFilter(frozenset({"a", "b"}), frozenset({"a"})) and got


@pytest.mark.parametrize("values,code", [
    (["shoes"], "bad_filter"), (["brand:x"], "bad_filter"), (["category:"], "bad_filter"),
    (["category:a,,b"], "bad_filter"), (["+category:a"], "bad_filter"), (["--category:a"], "bad_filter"),
    (["category:" + "x" * 17], "bad_filter"),
    (["category:a,b,c,d,e"], "too_many_filter_values"), (["category:a,b", "-category:c,d", "category:e"],
                                                         "too_many_filter_values"),
])
def test_bad_filters_are_400s_with_a_code(values: list[str], code: str) -> None:
    with pytest.raises(RequestError) as err:
        parse_filters(values, LIMITS)
    assert (err.value.status, err.value.code) == (400, code)
    assert orjson.loads(err.value.body())["error"] == code


def test_a_post_body_filter_adds_up_with_the_query_strings() -> None:
    s = parse_session(b'{"items": ["i1"], "filter": "-category:c1"}', LIMITS, ["category:c2"])
    assert s == Session(("i1",), (0,), 5, CategoryFilter(frozenset({"c2"}), frozenset({"c1"})))
    s = parse_session(b'{"items": ["i1"], "filter": ["category:c0", "category:c2"]}', LIMITS)
    assert s.categories.include == {"c0", "c2"}
    for body in (b'{"items": ["i1"], "filter": 3}', b'{"items": ["i1"], "filter": [["category:a"]]}',
                 b'{"items": ["i1"], "filter": "nope"}'):
        with pytest.raises(RequestError) as err:
            parse_session(body, LIMITS)
        assert err.value.code == "bad_filter"


def test_a_request_narrows_the_settings_filters_and_never_widens_them() -> None:
    none = RuleConfig()
    assert request_categories(none, frozenset({"a"}), frozenset({"b"})) == ({"a"}, {"b"})
    shop = RuleConfig(include_categories=frozenset({"a", "b"}), exclude_categories=frozenset({"x"}))
    assert request_categories(shop, frozenset(), frozenset({"y"})) == ({"a", "b"}, {"x", "y"})
    assert request_categories(shop, frozenset({"b", "c"}), frozenset()) == ({"b"}, {"x"})
    assert request_categories(shop, frozenset({"c"}), frozenset()) == (NOTHING_INCLUDED, {"x"})


def test_nothing_included_masks_every_item(model: Recommender, catalogue: Catalogue) -> None:
    masks = catalogue_masks(catalogue.view(), model.vocab, include=NOTHING_INCLUDED)
    assert masks["category"].tolist() == list(range(N))


def answers(model: Recommender, catalogue: Catalogue, queries: list, include: frozenset = frozenset(),
            exclude: frozenset = frozenset()) -> list[list[str]]:
    ctx = RuleContext(RuleConfig(candidates=2), catalogue_masks(catalogue.view(), model.vocab, include, exclude))
    docs = answer_many(model, queries, LIMITS, None, ctx if ctx.active else None)
    return [[i["item_id"] for i in d["items"]] for d in docs]


def test_filtered_answers_keep_k_items_of_the_allowed_categories(model: Recommender, catalogue: Catalogue) -> None:
    queries = [session_query(model, Session(("i4", "i17", "i33"), (0, 1, 0), 12), 0),  # a session state
               user_query(model, None, 12)]  # a cold start: the popular items
    plain = answers(model, catalogue, queries)
    assert all(any(CATEGORY.get(i) == "c1" for i in lst) for lst in plain), "c1 is in the lists unfiltered"
    without_c1 = answers(model, catalogue, queries, exclude=frozenset({"c1"}))
    only_c2 = answers(model, catalogue, queries, include=frozenset({"c2"}))
    for lst in without_c1 + only_c2:
        assert len(lst) == 12, "masked before the top-K: K items while enough pass"
    assert not [i for lst in without_c1 for i in lst if CATEGORY.get(i) == "c1"]
    assert {CATEGORY.get(i) for lst in only_c2 for i in lst} == {"c2"}  # items without a category are out too
    # what is left keeps the unfiltered order: the filter only removes items
    rest = [i for i in plain[1] if CATEGORY.get(i) != "c1"]
    assert without_c1[1][:len(rest)] == rest


def test_fewer_allowed_items_than_k_gives_them_all_and_nothing_gives_an_empty_list(model: Recommender,
                                                                                    catalogue: Catalogue) -> None:
    small = Catalogue()
    for item in ("i3", "i8", "i13"):
        small.apply(item, ItemRule(category="rare"))
    (lst,) = answers(model, small, [user_query(model, None, 10)], include=frozenset({"rare"}))
    assert sorted(lst) == ["i13", "i3", "i8"]
    (lst,) = answers(model, catalogue, [user_query(model, None, 10)], include=NOTHING_INCLUDED)
    assert lst == []
