"""Recommendations on request: request checking and the answers themselves. Pure (no Kafka, no web server).

Both answers score through ``stream.pipeline.ranking.score_states``, the stream's own top-K step, so a
request gets the list the stream would publish for the same state. A user's answer comes from the
stored state as the worker last decided it; an anonymous session's from a fresh hidden state stepped
through its items, which is then forgotten. Users without a hidden state in the current session (never
seen, or only unknown items so far) get the model's popular items, marked ``cold_start``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import orjson

from model.events import EventType
from model.recommender import Recommender
from state.codec import UserState
from stream.pipeline.answer_cache import CachedList
from stream.pipeline.because import because_rows
from stream.pipeline.ranking import RuleContext, TopK, score_states
from stream.pipeline.recommendation_json import vocab_ids as _vocab_ids
from stream.pipeline.rules import as_lists, user_exclusions

# request error codes (the "error" field of a 4xx/5xx answer)
BAD_K = "bad_k"
BAD_USER_ID = "bad_user_id"
BAD_BODY = "bad_body"
TOO_MANY_ITEMS = "too_many_items"
BAD_FILTER = "bad_filter"
TOO_MANY_FILTER_VALUES = "too_many_filter_values"
BODY_TOO_LARGE = "body_too_large"
NOT_READY = "not_ready"
TIMEOUT = "timeout"
OWNER_UNREACHABLE = "owner_unreachable"
_TYPES = {"view": EventType.VIEW, "click": EventType.CLICK, "cart": EventType.CART, "purchase": EventType.PURCHASE}


class RequestError(Exception):
    """A request that cannot be answered: HTTP ``status`` with a JSON body {"error": code, "detail": ...}.
    The detail never repeats the user id."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail

    def body(self) -> bytes:
        return orjson.dumps({"error": self.code, "detail": self.detail})


@dataclass(frozen=True)
class ServeLimits:
    default_k: int = 20
    max_k: int = 100
    max_items: int = 50
    max_id_bytes: int = 256
    because_items: int = 2  # 0 = answers carry no "because"
    max_filter_values: int = 32  # categories one request's filters may name, all together


@dataclass(frozen=True)
class CategoryFilter:
    """A request's own category filter (item categories of the item-rules topic): only items of an
    ``include`` category (empty: no such filter), never items of an ``exclude`` category."""

    include: frozenset[str] = frozenset()
    exclude: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude)


@dataclass(frozen=True)
class Session:
    """An anonymous visitor's events: item ids and event types, oldest first."""

    items: tuple[str, ...]
    types: tuple[int, ...]
    k: int
    categories: CategoryFilter = CategoryFilter()


def parse_k(raw: str | None, limits: ServeLimits) -> int:
    if raw is None or raw == "":
        return min(limits.default_k, limits.max_k)
    try:
        k = int(raw)
    except ValueError:
        raise RequestError(400, BAD_K, "k must be an integer") from None
    if not 1 <= k <= limits.max_k:
        raise RequestError(400, BAD_K, f"k must be between 1 and {limits.max_k}")
    return k


def check_user_id(user_id: str, limits: ServeLimits) -> bytes:
    key = user_id.encode("utf-8", "surrogatepass")
    if not key or len(key) > limits.max_id_bytes:
        raise RequestError(400, BAD_USER_ID, f"a user id has 1 to {limits.max_id_bytes} UTF-8 bytes")
    return key


_FILTER_SYNTAX = "a filter is category:<c>[,<c>...] (only these categories) or -category:<c>[,<c>...] (never these)"


def parse_filters(values: Sequence[str], limits: ServeLimits) -> CategoryFilter:
    """The ``filter`` values of one request, each ``category:a,b`` (include) or ``-category:c`` (exclude).
    Repeated filters of a kind add their categories up; an excluded category is never shown, even if it is
    also included. Values are trimmed; empty ones, other fields and more than ``limits.max_filter_values``
    categories in all are refused (400)."""
    include: set[str] = set()
    exclude: set[str] = set()
    named = 0
    for value in values:
        negate = value.startswith("-")
        field, sep, rest = (value[1:] if negate else value).partition(":")
        if not sep or field.strip() != "category":
            raise RequestError(400, BAD_FILTER, _FILTER_SYNTAX)
        cats = [c.strip() for c in rest.split(",")]
        if not all(cats):
            raise RequestError(400, BAD_FILTER, "a filter names no empty category; " + _FILTER_SYNTAX)
        if any(len(c.encode("utf-8", "surrogatepass")) > limits.max_id_bytes for c in cats):
            raise RequestError(400, BAD_FILTER, f"a category has at most {limits.max_id_bytes} UTF-8 bytes")
        named += len(cats)
        if named > limits.max_filter_values:
            raise RequestError(400, TOO_MANY_FILTER_VALUES,
                               f"the filters may name at most {limits.max_filter_values} categories in all")
        (exclude if negate else include).update(cats)
    return CategoryFilter(frozenset(include), frozenset(exclude))


def _body_filters(raw: Any) -> list[str]:
    """A POST body's ``filter``: one filter string or a list of them."""
    if raw is None:
        return []
    raw = [raw] if isinstance(raw, str) else raw
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise RequestError(400, BAD_FILTER, '"filter" is a filter string or a list of them; ' + _FILTER_SYNTAX)
    return raw


def parse_session(body: bytes, limits: ServeLimits, query_filters: Sequence[str] = ()) -> Session:
    """``{"items": [id, ...], "event_types": ["view"|"click"|"cart"|"purchase", ...]?, "k": n?,
    "filter": "category:a,b" | [...]?}``; ``query_filters``: the URL's own ``filter`` values, which add up
    with the body's."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RequestError(400, BAD_BODY, "the body is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise RequestError(400, BAD_BODY, 'the body must be an object with a list "items"')
    items = doc["items"]
    if len(items) > limits.max_items:
        raise RequestError(400, TOO_MANY_ITEMS, f"at most {limits.max_items} items")
    ids = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise RequestError(400, BAD_BODY, "item ids are strings or integers")
        s = str(item)
        if not s or len(s.encode()) > limits.max_id_bytes:
            raise RequestError(400, BAD_BODY, f"an item id has 1 to {limits.max_id_bytes} bytes")
        ids.append(s)
    types = doc.get("event_types")
    if types is None:
        codes = (int(EventType.VIEW),) * len(ids)
    else:
        if not isinstance(types, list) or len(types) != len(ids):
            raise RequestError(400, BAD_BODY, '"event_types" must be a list as long as "items"')
        if any(t not in _TYPES for t in types):
            raise RequestError(400, BAD_BODY, f"event types are {sorted(_TYPES)}")
        codes = tuple(int(_TYPES[t]) for t in types)
    k = doc.get("k")
    categories = parse_filters([*query_filters, *_body_filters(doc.get("filter"))], limits)
    return Session(tuple(ids), codes, parse_k(None if k is None else str(k), limits), categories)


def step_session(model: Recommender, session: Session, history: int) -> tuple[np.ndarray | None, list[int]]:
    """A fresh hidden state stepped through the session's known items (unknown ones are skipped, as the
    stream does), and the rows of its last ``history`` known items; None when no item was known."""
    rows = model.vocab.rows(list(session.items))
    known = [i for i, r in enumerate(rows.tolist()) if r >= 0]
    if not known:
        return None, []
    H = model.zero_state(1)
    for i in known:
        H = model.step_few(H, rows[i:i + 1], np.asarray(session.types[i:i + 1], dtype=np.int64))
    if not np.isfinite(H).all():
        return None, []
    recent: list[int] = []
    for i in known:
        r = int(rows[i])
        recent = [x for x in recent if x != r] + [r]
    return H[0], recent[-history:] if history else []


def step_sessions(model: Recommender, sessions: Sequence[Session],
                  history: int) -> list[tuple[np.ndarray | None, list[int]]]:
    """``step_session`` of many sessions at once: step j advances every session that has a j-th known item
    by that item, as one batched GRU step (a GRU step is row by row, so each session's state is the one
    it gets on its own; only the matrix products' summation order may differ, as in the stream's
    batches)."""
    if len(sessions) < 2:  # nothing to batch: the index bookkeeping below would only add to one session's cost
        return [step_session(model, s, history) for s in sessions]
    lengths = [len(s.items) for s in sessions]
    rows = model.vocab.rows([item for s in sessions for item in s.items])
    types = np.fromiter((t for s in sessions for t in s.types), dtype=np.int64, count=len(rows))
    cuts = np.cumsum(lengths)[:-1]
    seqs = [(r[r >= 0], t[r >= 0]) for r, t in zip(np.split(rows, cuts), np.split(types, cuts))]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))  # longest first: live rows are a prefix
    H = model.zero_state(len(seqs))
    steps = len(seqs[order[0]][0]) if seqs else 0
    for j in range(steps):
        live = [i for i in order if len(seqs[i][0]) > j]
        H[live] = model.step_few(H[live], np.array([seqs[i][0][j] for i in live], dtype=np.int64),
                                 np.array([seqs[i][1][j] for i in live], dtype=np.int64))
    out: list[tuple[np.ndarray | None, list[int]]] = []
    for i, (known, _) in enumerate(seqs):
        if not len(known) or not np.isfinite(H[i]).all():
            out.append((None, []))
            continue
        recent = list(dict.fromkeys(reversed(known.tolist())))[::-1]  # last occurrence of each row, in order
        out.append((H[i], recent[-history:] if history else []))
    return out


@dataclass(frozen=True)
class Query:
    """One request ready to score: its hidden state (None: cold start), recent rows and k."""

    hidden: np.ndarray | None
    recent: list[int]
    k: int
    known_user: bool | None = None  # GET only: whether the user has a state record
    state: UserState | None = None  # GET only: the record, for the user's own business rules


def user_query(model: Recommender, state: UserState | None, k: int) -> Query:
    """A user's query from the stored state; a state of another size (another model's layers) or without a
    hidden state is a cold start, as in the stream."""
    if state is not None and state.hidden is not None and state.hidden.shape[0] == model.state_size:
        recent = state.recent.tolist() if state.recent is not None else []
        return Query(state.hidden, recent, k, True, state)
    return Query(None, [], k, state is not None, state)


def session_query(model: Recommender, session: Session, history: int) -> Query:
    hidden, recent = step_session(model, session, history)
    return Query(hidden, recent, session.k)


def session_queries(model: Recommender, sessions: Sequence[Session], history: int) -> list[Query]:
    """``session_query`` of many sessions, stepped together (``step_sessions``)."""
    return [Query(hidden, recent, s.k) for s, (hidden, recent) in zip(sessions, step_sessions(model, sessions,
                                                                                               history))]


def _items(rows: list[int], scores: list[float], why: list[list[int]] | None,
           ids: Sequence[str]) -> list[dict[str, Any]]:
    """One answer's items, best first, up to its first empty slot (row -1); ``why``: each slot's "because"
    rows (-1: none)."""
    n = rows.index(-1) if -1 in rows else len(rows)
    if why is None:
        return [{"item_id": ids[r], "score": round(s, 6)} for r, s in zip(rows[:n], scores[:n])]
    items = []
    for r, s, w in zip(rows[:n], scores[:n], why):
        item: dict[str, Any] = {"item_id": ids[r], "score": round(s, 6)}
        named = [ids[x] for x in w if x >= 0]
        if named:
            item["because"] = named
        items.append(item)
    return items


def answer_many(model: Recommender, queries: list[Query], limits: ServeLimits, top_k: TopK | None = None,
                rules: RuleContext | None = None) -> list[dict[str, Any]]:
    """The answer documents of many queries, scored together: one ranking pass (``score_states``, as the
    stream's batches, with the business rules of ``rules`` and each known user's own) and one attribution
    pass for all of them."""
    n = len(queries)
    has = np.array([q.hidden is not None and bool(np.isfinite(q.hidden).all()) for q in queries])
    H = model.zero_state(n)
    for i in np.flatnonzero(has).tolist():
        H[i] = queries[i].hidden
    kk = min(max(q.k for q in queries), model.n_items)
    users = None
    if rules is not None and rules.cfg.per_user:
        now_s = time.time()
        users = [user_exclusions(rules.cfg, *as_lists(q.state.bought, q.state.session_items), now_s)
                 if q.state is not None else [] for q in queries]
    rows, scores, _ = score_states(model, H, has, kk, top_k, rules, users)
    listed = np.where(rows < 0, -1, rows)
    because = None
    if limits.because_items and any(q.recent for q in queries):
        because = because_rows(model, listed, [q.recent for q in queries], has, limits.because_items)
    ids = _vocab_ids(model)
    version = int(model.version)
    docs = []
    all_rows, all_scores = listed.tolist(), scores.tolist()
    all_why = because.tolist() if because is not None else None
    for i, q in enumerate(queries):
        items = _items(all_rows[i][:q.k], all_scores[i][:q.k], all_why[i] if all_why is not None else None, ids)
        doc: dict[str, Any] = {"items": items, "cold_start": not bool(has[i]), "model_version": version}
        if q.known_user is not None:
            doc["known_user"] = q.known_user
        docs.append(doc)
    return docs


def answer_from_list(model: Recommender, cached: CachedList, k: int, limits: ServeLimits) -> dict[str, Any]:
    """A known user's answer from the list the stream published after the user's last event
    (``answer_cache.AnswerCache``): the document ``answer_user`` gives for the same state, model and rules."""
    why = cached.because[:k].tolist() if limits.because_items and cached.because is not None else None
    items = _items(cached.rows[:k].tolist(), cached.scores[:k].tolist(), why, _vocab_ids(model))
    return {"items": items, "cold_start": cached.cold_start, "model_version": int(model.version), "known_user": True}


def answer_user(model: Recommender, state: UserState | None, k: int, limits: ServeLimits,
                top_k: TopK | None = None, rules: RuleContext | None = None) -> dict[str, Any]:
    return answer_many(model, [user_query(model, state, k)], limits, top_k, rules)[0]


def answer_session(model: Recommender, session: Session, limits: ServeLimits, history: int,
                   top_k: TopK | None = None) -> dict[str, Any]:
    return answer_many(model, [session_query(model, session, history)], limits, top_k)[0]
