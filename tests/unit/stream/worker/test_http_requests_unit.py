"""The request handlers on a real aiohttp server with a fake runtime: readiness, forwarding guard, limits,
timeout and the metrics they count (the end-to-end tests are in tests/integration/test_http_api.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import torch
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.recommender import Recommender
from model.vocab import Vocabulary
from stream.observe.metrics import Metrics
from stream.pipeline.answer_cache import AnswerCache, FinalLists, Stamp
from stream.pipeline.ranking import RuleContext
from stream.pipeline.rules import Catalogue, ItemRule, RuleConfig, catalogue_masks
from stream.settings import Settings
from stream.worker.http_api import ROUTED_HEADER, ServeEndpoints, UserAsk

torch.set_num_threads(1)


@dataclass
class FakePipeline:
    owned: list[int]
    delay_s: float = 0.0
    turns: int = 0  # turns the request thread took
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1))  # the stream's compute thread
    answers: AnswerCache = field(default_factory=lambda: AnswerCache(100, 60.0))
    scorers: Any = None

    def __post_init__(self) -> None:
        pipeline = self

        class Store:
            @staticmethod
            def partition_for(key: bytes) -> int:
                return 0

            @staticmethod
            def partition_db(partition: int) -> str:
                return f"db{partition}"

        class Scorers:
            @staticmethod
            def get(model: Any) -> None:
                pipeline.turns += 1
                time.sleep(pipeline.delay_s)  # a busy request thread
                return None

        self.store, self.scorers = Store(), Scorers()

    rules: RuleConfig = field(default_factory=RuleConfig)
    catalogue: Catalogue = field(default_factory=Catalogue)

    def rule_context(self, model: Any, include: frozenset[str] | None = None,
                     exclude: frozenset[str] | None = None, record: bool = True) -> RuleContext | None:
        """As the worker's: the catalogue's masks with these category filters (None: the settings')."""
        cfg = self.rules
        masks = catalogue_masks(self.catalogue.view(), model.vocab,
                                cfg.include_categories if include is None else include,
                                cfg.exclude_categories if exclude is None else exclude)
        ctx = RuleContext(cfg, masks, None, time.time(), record)
        return ctx if ctx.active else None

    names: Any = field(default_factory=lambda: Names())
    reads: list = field(default_factory=list)  # (partition, keys, db handle) of each state read

    def answer_stamp(self, model: Any) -> Stamp:
        return Stamp(id(model), int(model.version), self.catalogue.view().version, 1)

    def read_states(self, partition: int, keys: list[bytes], db: Any = None) -> dict:
        self.reads.append((partition, list(keys), db))
        return {}


@dataclass
class Names:
    changelog: str = "state-changelog"


@dataclass
class FakeApp:
    """faust's public rebalance bookkeeping and the assignor's actives, from the fake pipeline's ``owned``."""

    pipeline: FakePipeline
    rebalancing: bool = False
    rebalancing_count: int = 1
    consumer_generation_id: int = 1
    asked: int = 0  # calls of assignor.assigned_actives()

    @property
    def assignor(self) -> Any:
        return self

    def assigned_actives(self) -> set:
        from faust.types import TP

        self.asked += 1
        return {TP(self.pipeline.names.changelog, p) for p in self.pipeline.owned} | {TP("clicks", 0)}


@dataclass
class FakeRuntime:
    pipeline: FakePipeline
    holder: Any
    ok: bool = True
    app: Any = None

    def __post_init__(self) -> None:
        self.app = self.app or FakeApp(self.pipeline)

    def ready(self) -> tuple[bool, str]:
        return (True, "ready") if self.ok else (False, "table recovery in progress (rebalance)")


def _model() -> Recommender:
    net = GRU4RecNet(30, GRU4RecParams(layers=(8,), seed=2))
    return Recommender(net, Vocabulary(f"i{r}" for r in range(30)), 4, np.arange(30, 0, -1, dtype=np.float64))


def _run(runtime: Any, requests: list[tuple[str, str, bytes | None, dict]], *,
         stream_loop: asyncio.AbstractEventLoop | None = None, **settings: Any) -> tuple[list, Metrics]:
    metrics = Metrics.create(role="worker")
    serve = ServeEndpoints(Settings.of(serve_max_body_bytes=512, **settings), metrics)
    serve.runtime = runtime
    serve.stream_loop = stream_loop

    async def go() -> list:
        app = web.Application()
        serve.add_routes(app)
        async with TestClient(TestServer(app)) as client:
            out = []
            for method, path, body, headers in requests:
                r = await client.request(method, path, data=body, headers=headers)
                out.append((r.status, orjson.loads(await r.read())))
            return out

    try:
        return asyncio.run(go()), metrics
    finally:
        asyncio.run(serve.close())


class Holder:
    current = _model()


def _endpoints() -> tuple[FakeRuntime, ServeEndpoints]:
    """The handlers over a fake runtime that owns partition 0, called directly (no web server)."""
    runtime = FakeRuntime(FakePipeline([0]), Holder())
    serve = ServeEndpoints(Settings(), Metrics.create(role="worker"))
    serve.runtime = runtime
    return runtime, serve


def test_answers_503_until_ready_then_200() -> None:
    got, metrics = _run(None, [("GET", "/users/u1/recommendations", None, {})])
    assert got[0][0] == 503 and got[0][1]["error"] == "not_ready"
    got, _ = _run(FakeRuntime(FakePipeline([0]), Holder(), ok=False), [("GET", "/users/u1/recommendations", None, {})])
    assert got[0] == (503, {"error": "not_ready", "detail": "table recovery in progress (rebalance)"})
    got, metrics = _run(FakeRuntime(FakePipeline([0]), Holder()), [("GET", "/users/u1/recommendations?k=3", None, {})])
    assert got[0][0] == 200 and got[0][1]["cold_start"] is True and len(got[0][1]["items"]) == 3
    assert metrics.http_requests.labels(endpoint="user", status="200")._value.get() == 1


def test_a_forwarded_request_for_a_partition_not_owned_here_is_not_forwarded_again() -> None:
    got, metrics = _run(FakeRuntime(FakePipeline([]), Holder()),
                        [("GET", "/users/u1/recommendations", None, {ROUTED_HEADER: "1"})])
    assert got[0][0] == 503 and got[0][1]["error"] == "not_ready"
    assert metrics.http_routed._value.get() == 0


def test_body_limit_and_timeout() -> None:
    runtime = FakeRuntime(FakePipeline([0], delay_s=0.5), Holder())
    got, metrics = _run(runtime, [
        ("POST", "/recommendations", orjson.dumps({"items": ["i1"], "pad": "x" * 600}), {}),
        ("POST", "/recommendations", orjson.dumps({"items": ["i1", "i2"]}), {}),
    ], serve_timeout_s=0.2)
    assert got[0] == (413, {"error": "body_too_large", "detail": "the body may have at most 512 bytes"})
    assert got[1][0] == 504 and got[1][1]["error"] == "timeout"
    assert metrics.http_requests.labels(endpoint="anonymous", status="504")._value.get() == 1
    assert metrics.http_latency.labels(endpoint="anonymous")._sum.get() > 0


def test_requests_waiting_for_the_request_thread_are_answered_in_one_turn() -> None:
    import threading

    runtime, serve = _endpoints()
    release = threading.Event()

    async def go() -> list:
        busy = asyncio.get_running_loop().run_in_executor(serve._executor, release.wait)  # earlier requests' turn
        asks = [UserAsk(0, b"u%d" % (k % 3), k) for k in range(1, 6)]
        answers = asyncio.gather(*(serve._compute(Holder.current, ask) for ask in asks))
        await asyncio.sleep(0.2)
        release.set()
        await busy
        return await answers

    docs = [orjson.loads(body) for body in asyncio.run(go())]
    assert [len(d["items"]) for d in docs] == [1, 2, 3, 4, 5] and all(d["cold_start"] for d in docs)
    assert runtime.pipeline.turns == 1  # one hop to the request thread, one top-K for the five
    # and one state read for the five (three users of one partition), on the handle the loop took
    assert runtime.pipeline.reads == [(0, [b"u1", b"u2", b"u0"], "db0")]


def test_category_filters_mask_the_answer_and_bad_ones_are_400s() -> None:
    pipeline = FakePipeline([0], rules=RuleConfig(exclude_categories=frozenset({"banned"})))
    for r in range(30):
        pipeline.catalogue.apply(f"i{r}", ItemRule(category=("even", "odd")[r % 2] if r != 4 else "banned"))
    got, metrics = _run(FakeRuntime(pipeline, Holder()), [
        ("GET", "/users/u1/recommendations?k=6&filter=category:even", None, {}),
        ("GET", "/users/u1/recommendations?k=6&filter=-category:even", None, {}),
        ("POST", "/recommendations?filter=category:odd", orjson.dumps({"items": ["i3"], "k": 4}), {}),
        ("POST", "/recommendations", orjson.dumps({"items": ["i3"], "filter": "category:banned"}), {}),
        ("GET", "/users/u1/recommendations?filter=color:red", None, {}),
        ("GET", "/users/u1/recommendations?filter=category:" + ",".join("x" * 40), None, {}),
        ("POST", "/recommendations", orjson.dumps({"items": ["i3"], "filter": {"category": "odd"}}), {}),
    ])

    def rows(doc: dict) -> list[int]:
        return [int(i["item_id"][1:]) for i in doc["items"]]

    (s1, even), (s2, not_even), (s3, odd), (s4, banned) = got[:4]
    assert (s1, s2, s3, s4) == (200, 200, 200, 200)
    assert len(rows(even)) == 6 and all(r % 2 == 0 and r != 4 for r in rows(even))
    assert len(rows(not_even)) == 6 and all(r % 2 == 1 for r in rows(not_even))
    assert len(rows(odd)) == 4 and all(r % 2 == 1 for r in rows(odd))
    assert banned["items"] == [], "a request cannot include what the settings exclude"
    assert [(s, d["error"]) for s, d in got[4:]] == [(400, "bad_filter"), (400, "too_many_filter_values"),
                                                     (400, "bad_filter")]
    assert metrics.http_requests.labels(endpoint="user", status="400")._value.get() == 2


def test_a_request_whose_partition_moved_while_it_waited_gets_503_and_the_assignor_is_asked_per_rebalance() -> None:
    import threading

    from stream.pipeline.serving import RequestError

    runtime, serve = _endpoints()
    release = threading.Event()

    async def go() -> tuple[Any, Any, Any]:
        busy = asyncio.get_running_loop().run_in_executor(serve._executor, release.wait)  # earlier requests' turn
        first = asyncio.ensure_future(serve._compute(Holder.current, UserAsk(0, b"u1", 3)))
        await asyncio.sleep(0.1)  # its turn is bound and waits for the request thread
        second = asyncio.ensure_future(serve._compute(Holder.current, UserAsk(0, b"u2", 3)))
        await asyncio.sleep(0.1)
        runtime.pipeline.owned = []  # a rebalance moves partition 0 away before the second's turn
        runtime.app.rebalancing_count += 1
        runtime.app.consumer_generation_id += 1
        release.set()
        await busy
        return await asyncio.gather(first, second, return_exceptions=True)

    for _ in range(20):
        assert 0 in serve.active_partitions()
    assert runtime.app.asked == 1
    first, second, = asyncio.run(go())
    assert isinstance(first, bytes) and len(orjson.loads(first)["items"]) == 3
    assert isinstance(second, RequestError) and (second.status, second.code) == (503, "not_ready")
    assert runtime.pipeline.reads == [(0, [b"u1"], "db0")]  # the moved partition was not read
    assert runtime.app.asked == 2


def test_a_request_is_answered_while_a_stream_batch_holds_the_compute_thread() -> None:
    import threading

    runtime, serve = _endpoints()
    release = threading.Event()

    async def go() -> bytes:
        busy = asyncio.get_running_loop().run_in_executor(runtime.pipeline.executor, release.wait)  # a stream batch
        try:
            return await asyncio.wait_for(serve._compute(Holder.current, UserAsk(0, b"u1", 3)), timeout=10)
        finally:
            release.set()
            await busy

    answer = asyncio.run(go())
    assert len(orjson.loads(answer)["items"]) == 3
    assert runtime.pipeline.reads == [(0, [b"u1"], "db0")]


def _published(pipeline: FakePipeline, key: bytes, rows: list[int], stamp: Stamp | None = None) -> None:
    """The list the stream published after ``key``'s last event, as the worker keeps it."""
    model = Holder.current
    k = len(rows)
    pipeline.answers.remember(FinalLists([key], np.array([rows]), np.linspace(2.0, 1.0, k, dtype=np.float32)[None],
                                         None, np.array([True]), stamp or pipeline.answer_stamp(model)))


def test_a_known_users_default_request_is_answered_from_the_published_list_without_a_turn() -> None:
    pipeline = FakePipeline([0])
    _published(pipeline, b"u1", [7, 3, 5, 9])
    got, metrics = _run(FakeRuntime(pipeline, Holder()), [("GET", "/users/u1/recommendations?k=3", None, {})])
    assert got[0][0] == 200
    assert [i["item_id"] for i in got[0][1]["items"]] == ["i7", "i3", "i5"]
    assert got[0][1]["cold_start"] is False and got[0][1]["known_user"] is True
    assert pipeline.turns == 0 and pipeline.reads == []
    assert metrics.http_cached_answers._value.get() == 1


def test_requests_the_published_list_cannot_answer_are_scored() -> None:
    """More items than the list has, a filter of the request's own, or a list of another model or rules."""
    pipeline = FakePipeline([0])
    _published(pipeline, b"u1", [7, 3, 5, 9])
    _published(pipeline, b"u2", [7, 3, 5, 9], Stamp(id(Holder.current), 4, -1, 1))  # ranked under older rules
    got, metrics = _run(FakeRuntime(pipeline, Holder()), [
        ("GET", "/users/u1/recommendations?k=5", None, {}),
        ("GET", "/users/u1/recommendations?k=3&filter=category:even", None, {}),
        ("GET", "/users/u2/recommendations?k=3", None, {}),
    ])
    assert [status for status, _ in got] == [200, 200, 200]
    assert all(doc["cold_start"] for _, doc in got)  # scored: the fake store has no state for them
    assert pipeline.turns == 3 and metrics.http_cached_answers._value.get() == 0
    assert len(pipeline.answers) == 1  # the stale list was dropped


def test_partition_handles_are_taken_on_the_streams_loop_when_requests_have_their_own() -> None:
    """As in the worker: the requests' loop runs in one thread, the stream's in another; faust's partition
    handles are only touched on the stream's loop."""
    stream_loop = asyncio.new_event_loop()
    stream_thread = threading.Thread(target=stream_loop.run_forever, daemon=True)
    stream_thread.start()
    runtime = FakeRuntime(FakePipeline([0]), Holder())
    taken_in: list[threading.Thread] = []

    def partition_db(partition: int) -> str:
        taken_in.append(threading.current_thread())
        return f"db{partition}"

    runtime.pipeline.store.partition_db = partition_db
    try:
        got, _ = _run(runtime, [("GET", "/users/u1/recommendations?k=3", None, {})], stream_loop=stream_loop)
    finally:
        stream_loop.call_soon_threadsafe(stream_loop.stop)
        stream_thread.join(5)
        stream_loop.close()
    assert got[0][0] == 200 and got[0][1]["cold_start"] is True
    assert taken_in == [stream_thread]
    assert runtime.pipeline.reads == [(0, [b"u1"], "db0")]
