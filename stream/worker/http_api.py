"""Recommendations on request, on the worker's web port (docs/http-api.md).

- ``GET /users/{user_id}/recommendations?k=&sync=`` answers from the user's state as this worker last
  decided it (batches in flight included) with the served model. The user's state lives in one
  partition of the state table; if another worker owns it, the request is forwarded there once. The
  owner comes from faust's assignment (``app.router.table_metadata``: every worker's canonical URL,
  GRUFLOW_ADVERTISED_URL, with its active changelog partitions); the partition from the key, with the
  murmur2 hash the producers and faust use. A forwarded request that lands on a worker that does not
  own the partition either (a rebalance in between) gets 503, never a second hop.
- ``sync=true``: read-your-writes. The request first asks the broker for the end offsets of the user's
  input partitions, then waits until the worker has applied every event below them, so an event the
  client sent (and the broker acknowledged) before the request is reflected in the answer.
- ``POST /recommendations`` steps a fresh hidden state through an anonymous visitor's items and
  answers; nothing is stored.
- ``filter=category:a,b`` / ``filter=-category:c`` (both endpoints; POST also in its body): the request's
  own category filter, masked before the top-K like the settings' rules, which it narrows and never widens
  (``serving.parse_filters``, ``rules.request_categories``).

The endpoints run on an event loop of their own, in a thread of their own (``WebServerThread``), never on
the stream's (faust's) loop: aiohttp's work per request does not queue behind the stream's batches, nor the
stream behind it. Only two things hop to the stream's loop, where faust keeps them: the partition handles of
a turn of the request thread, and the ``sync`` wait (``_on_stream_loop``). A known user's request of the
default shape (k at most the stream's K, no filter of its own) is answered on the requests' loop from the
list the stream published after the user's last event, while nothing it depends on has changed
(``Pipeline.answers``, stream/pipeline/answer_cache.py, locked between the two threads): no scoring at all.
Every other request is scored in a thread of its own for requests, and so are the users' state reads: a
request does not wait behind a stream batch in the compute thread (docs/serving-cost.md). Each request is
bounded by GRUFLOW_SERVE_TIMEOUT_S (504).
Errors are JSON ``{"error", "detail"}`` and never repeat the user id.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from stream.observe.metrics import Metrics
from stream.pipeline.rules import request_categories
from stream.pipeline.serving import (BODY_TOO_LARGE, NOT_READY, OWNER_UNREACHABLE, TIMEOUT, CategoryFilter, Query,
                                     RequestError, ServeLimits, Session, answer_from_list, answer_many, check_user_id,
                                     parse_filters, parse_k, parse_session, session_queries, user_query)
from stream.settings import Settings
from stream.kafka.topics import STATE_TABLE_NAME
from stream.worker.partitions import ActivePartitions

log = logging.getLogger("gruflow.http")


@dataclass(frozen=True)
class UserAsk:
    """A known user's request: the state to read (in the request thread) and the list's length."""

    partition: int
    key: bytes
    k: int


# a request waiting for the request thread: (model, category filter, a UserAsk or an anonymous Session, future)
_Waiting = tuple[Any, CategoryFilter, "UserAsk | Session", asyncio.Future]


def _moving() -> RequestError:
    return RequestError(503, NOT_READY, "the user's partition is moving to another worker; retry")
ROUTED_HEADER = "X-Gruflow-Routed"  # set on a forwarded request: the receiver answers or says 503, never forwards
_JSON = "application/json"
_PARTITIONS_REMEMBERED = 16_384  # users whose partition is kept (about 3 MB)


def _true(raw: str | None) -> bool:
    return (raw or "").lower() in ("1", "true", "yes")


class EndOffsets:
    """Log end offsets from the broker, through one long-lived group-less consumer in its own thread
    (read-your-writes requests; neither loop nor the request thread waits on the broker)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gruflow-end-offsets")
        self._consumer: Any = None
        self._lock = threading.Lock()

    def _ends(self, tps: list[tuple[str, int]], timeout: float) -> dict[tuple[str, int], int]:
        from confluent_kafka import Consumer, TopicPartition

        from stream.kafka.config import consumer_config

        with self._lock:
            if self._consumer is None:
                self._consumer = Consumer(consumer_config(self.settings, group_id=None,
                                                          **{"isolation.level": "read_uncommitted"}))
            return {(t, p): self._consumer.get_watermark_offsets(TopicPartition(t, p), timeout=timeout)[1]
                    for t, p in tps}

    async def ends(self, tps: list[tuple[str, int]], timeout: float) -> dict[tuple[str, int], int]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._ends, tps, timeout)

    def close(self) -> None:
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None
        self._executor.shutdown(wait=False)


class ServeEndpoints:
    """The request handlers; ``runtime`` (stream.app.Runtime) is set once the faust app exists, and until
    then every request gets 503."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.runtime: Any = None
        # the loop of the stream (faust's): the partition handles and the read-your-writes waits are taken
        # there; None when the requests are served on that same loop (tests)
        self.stream_loop: asyncio.AbstractEventLoop | None = None
        sv = settings.serving
        self.serving = sv
        self.limits = ServeLimits(default_k=settings.scoring.top_k, max_k=sv.serve_max_k,
                                  max_items=sv.serve_max_items, max_id_bytes=settings.worker.max_id_bytes,
                                  because_items=2 if sv.because else 0)
        self.history = sv.because_history if sv.because else 0
        self.end_offsets = EndOffsets(settings)
        self._client: aiohttp.ClientSession | None = None
        self._waiting: list[_Waiting] = []  # requests waiting for the request thread
        # requests are scored in a thread of their own: torch, the compiled top-K and RocksDB release the GIL, so
        # on 2 cores a request overlaps a stream batch instead of queueing behind it (docs/serving-cost.md)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gruflow-requests")
        self._draining = False
        self._actives: ActivePartitions | None = None
        self._partition_of: Callable[[bytes], int] | None = None
        self._counted: dict[tuple[str, int], tuple[Any, Any]] = {}  # (endpoint, status) -> its metric children

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/users/{user_id}/recommendations", self.user_recommendations)
        app.router.add_post("/recommendations", self.anonymous_recommendations)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        self.end_offsets.close()
        self._executor.shutdown(wait=False)

    # --- handlers ----------------------------------------------------------------------------------------
    async def user_recommendations(self, request: web.Request) -> web.Response:
        return await self._timed("user", request, self._user)

    async def anonymous_recommendations(self, request: web.Request) -> web.Response:
        return await self._timed("anonymous", request, self._anonymous)

    async def _timed(self, endpoint: str, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.Response]]) -> web.Response:
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.serving.serve_timeout_s):  # in this task: no task per request
                response = await handler(request)
        except RequestError as exc:
            response = web.Response(body=exc.body(), status=exc.status, content_type=_JSON)
        except TimeoutError:
            err = RequestError(504, TIMEOUT, f"not answered within {self.serving.serve_timeout_s:g} s")
            response = web.Response(body=err.body(), status=504, content_type=_JSON)
        counted = self._counted.get((endpoint, response.status))
        if counted is None:
            counted = self._counted[endpoint, response.status] = (
                self.metrics.http_requests.labels(endpoint=endpoint, status=str(response.status)),
                self.metrics.http_latency.labels(endpoint=endpoint))
        counted[0].inc()
        counted[1].observe(time.perf_counter() - t0)
        return response

    async def _user(self, request: web.Request) -> web.Response:
        key = check_user_id(request.match_info["user_id"], self.limits)
        k = parse_k(request.query.get("k"), self.limits)
        categories = parse_filters(request.query.getall("filter", []), self.limits)
        rt = self._ready_runtime()
        pipeline = rt.pipeline
        partition = self.partition_for(key)
        if partition not in self.active_partitions():
            return await self._forward(request, partition)
        if _true(request.query.get("sync")):
            names = pipeline.names
            tps = [(topic, partition) for topic in names.inputs]
            ends = await self.end_offsets.ends(tps, self.serving.serve_timeout_s)
            await self._on_stream_loop(pipeline.wait_applied(ends))
            if partition not in self.active_partitions():  # moved while waiting
                raise _moving()
        model = rt.holder.current
        if not categories:
            cached = pipeline.answers.get(key, pipeline.answer_stamp(model), k)
            if cached is not None:
                self.metrics.http_cached_answers.inc()
                body = orjson.dumps(answer_from_list(model, cached, k, self.limits))
                return web.Response(body=body, content_type=_JSON)
        body = await self._compute(model, UserAsk(partition, key, k), categories)
        return web.Response(body=body, content_type=_JSON)

    async def _anonymous(self, request: web.Request) -> web.Response:
        limit = self.serving.serve_max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise RequestError(413, BODY_TOO_LARGE, f"the body may have at most {limit} bytes")
        body = await request.content.read(limit + 1)
        if len(body) > limit:
            raise RequestError(413, BODY_TOO_LARGE, f"the body may have at most {limit} bytes")
        session = parse_session(body, self.limits, request.query.getall("filter", []))
        rt = self._ready_runtime()
        body = await self._compute(rt.holder.current, session, session.categories)
        return web.Response(body=body, content_type=_JSON)

    # --- helpers -----------------------------------------------------------------------------------------
    def _ready_runtime(self) -> Any:
        rt = self.runtime
        if rt is None:
            raise RequestError(503, NOT_READY, "the worker is starting")
        ok, reason = rt.ready()
        if not ok:
            raise RequestError(503, NOT_READY, reason)
        return rt

    def active_partitions(self) -> frozenset[int]:
        """The state table's partitions active here (faust's assignment, kept between rebalances)."""
        if self._actives is None:
            rt = self.runtime
            self._actives = ActivePartitions(rt.app, rt.pipeline.names.changelog)
        try:
            return self._actives.get()
        except RuntimeError:  # read from the requests' thread while a rebalance changed the assignment
            raise _moving() from None

    def partition_for(self, key: bytes) -> int:
        """The state table's partition of a user (murmur2 in Python), remembered for the users asked for most
        recently: a shop asks for the same users again and again (page loads)."""
        if self._partition_of is None:
            remember = functools.lru_cache(maxsize=_PARTITIONS_REMEMBERED)
            self._partition_of = remember(self.runtime.pipeline.store.partition_for)
        return self._partition_of(key)

    async def _compute(self, model: Any, ask: UserAsk | Session,
                       categories: CategoryFilter = CategoryFilter()) -> bytes:
        """The answer to ``ask`` with ``model`` (its JSON), ranked with the request's own ``categories`` filter on
        top of the settings' rules. Requests that arrive while the request thread is busy are answered
        together by its next turn: one hop to the thread, one state read per partition, one GRU pass for the
        anonymous sessions and one top-K per model and filter, so a burst costs about what one batch of events
        costs."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((model, categories, ask, future))
        if not self._draining:
            self._draining = True
            asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                waiting, self._waiting = self._waiting, []
                wanted = {ask.partition for _, _, ask, _ in waiting if isinstance(ask, UserAsk)}
                actives, dbs = await self._on_stream_loop(self._partition_dbs(wanted)) if wanted else (None, {})
                batch = self._bound(waiting, actives, dbs)
                if not batch:
                    continue
                try:
                    docs = await loop.run_in_executor(self._executor, self._answer_batch, batch, dbs)
                except Exception as exc:  # noqa: BLE001 - each request reports it (500) instead of hanging
                    for *_, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (*_, future), doc in zip(batch, docs):
                    if not future.done():  # a request that timed out is not waiting any more
                        future.set_result(doc)
        finally:
            self._draining = False

    async def _partition_dbs(self, partitions: set[int]) -> tuple[frozenset[int], dict[int, Any]]:
        """On the stream's loop, just before a turn of the request thread: this worker's active partitions,
        and the database handle of each of ``partitions`` that is active (faust opens and drops them on that
        loop)."""
        actives = self.active_partitions()
        store = self.runtime.pipeline.store
        return actives, {p: store.partition_db(p) for p in partitions if p in actives}

    @staticmethod
    def _bound(waiting: list[_Waiting], actives: frozenset[int] | None,
               dbs: dict[int, Any]) -> list[_Waiting]:
        """The requests a turn answers; 503 for one whose partition left this worker since it was checked."""
        batch = []
        for item in waiting:
            ask, future = item[2], item[3]
            if isinstance(ask, UserAsk) and ask.partition not in dbs:
                if not future.done():
                    future.set_exception(_moving())
                continue
            batch.append(item)
        return batch

    async def _on_stream_loop(self, work: Awaitable[Any]) -> Any:
        """``work`` run on the stream's loop, awaited from the requests' loop."""
        loop = self.stream_loop
        if loop is None or loop is asyncio.get_running_loop():
            return await work
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, loop))  # type: ignore[arg-type]

    def _queries(self, batch: list[_Waiting], dbs: dict[int, Any]) -> list[Query]:
        """In the request thread: the query of each request. The users' states come from one read per
        partition, as the worker last decided them; the anonymous sessions of a model are stepped together."""
        pipeline = self.runtime.pipeline
        keys: dict[int, dict[bytes, None]] = {}
        sessions: dict[int, list[int]] = {}
        for i, (model, _, ask, _) in enumerate(batch):
            if isinstance(ask, UserAsk):
                keys.setdefault(ask.partition, {})[ask.key] = None
            else:
                sessions.setdefault(id(model), []).append(i)
        states = {p: pipeline.read_states(p, list(ks), dbs[p]) for p, ks in keys.items()}
        queries: list[Query | None] = [None] * len(batch)
        for idx in sessions.values():
            model = batch[idx[0]][0]
            for i, q in zip(idx, session_queries(model, [batch[i][2] for i in idx], self.history)):
                queries[i] = q
        for i, (model, _, ask, _) in enumerate(batch):
            if isinstance(ask, UserAsk):
                queries[i] = user_query(model, states[ask.partition].get(ask.key), ask.k)
        return queries  # type: ignore[return-value]

    def _answer_batch(self, batch: list[_Waiting], dbs: dict[int, Any]) -> list[bytes]:
        """In the request thread: the answers of a batch as JSON, ranked per model (a swap may split one) and
        category filter (each filter masks its own catalogue rows)."""
        pipeline = self.runtime.pipeline
        scorers = pipeline.scorers
        queries = self._queries(batch, dbs)
        docs: list[bytes | None] = [None] * len(batch)
        groups: dict[tuple[int, CategoryFilter], list[int]] = {}
        for i, (model, categories, *_) in enumerate(batch):
            groups.setdefault((id(model), categories), []).append(i)
        for (_, categories), idx in groups.items():
            model = batch[idx[0]][0]
            scorer = scorers.get(model)
            include, exclude = (request_categories(pipeline.rules, categories.include, categories.exclude)
                                if categories else (None, None))
            # the stream's business rules; a request's list is not counted against the exposure cap (it
            # damps what the stream publishes, which requests only read)
            rules = pipeline.rule_context(model, include, exclude, record=False)
            for i, doc in zip(idx, answer_many(model, [queries[i] for i in idx], self.limits,
                                               scorer.top_k if scorer is not None else None, rules)):
                docs[i] = orjson.dumps(doc)
        return docs  # type: ignore[return-value]

    def owner_url(self, partition: int) -> str | None:
        """The canonical URL of the worker whose active partitions include ``partition`` of the state table."""
        app = self.runtime.app
        changelog = self.runtime.pipeline.names.changelog
        try:
            for url, topics in app.router.table_metadata(STATE_TABLE_NAME).items():
                if partition in topics.get(changelog, ()):
                    return str(url)
        except RuntimeError:  # read from the requests' thread while a rebalance changed the assignment
            return None
        return None

    async def _forward(self, request: web.Request, partition: int) -> web.Response:
        if request.headers.get(ROUTED_HEADER):
            raise RequestError(503, NOT_READY, "the user's partition is moving to another worker; retry")
        owner = self.owner_url(partition)
        if owner is None or owner.rstrip("/") == self.settings.web_url():
            raise RequestError(503, NOT_READY, "no worker owns the user's partition yet; retry")
        if self._client is None:
            self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.serving.serve_timeout_s))
        url = URL(owner.rstrip("/") + str(request.rel_url), encoded=True)
        self.metrics.http_routed.inc()
        try:
            async with self._client.get(url, headers={ROUTED_HEADER: "1"}) as response:
                body = await response.read()
                return web.Response(body=body, status=response.status, content_type=_JSON)
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("forwarding a request to %s failed: %r", owner, exc)
            raise RequestError(503, OWNER_UNREACHABLE, "the worker owning the user's partition did not answer; "
                                                       "retry") from None
