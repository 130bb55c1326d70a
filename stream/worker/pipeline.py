"""The worker's batch path: ``Pipeline.handle`` takes one micro-batch from ``BatchConsumer``:

    decode + validate (bad -> dlq)  ->  multi-get states per partition  ->  process_batch in a
    worker thread (GRU waves + one top-K pass)  ->  send changelog + recommendations + dlq
    (at-least-once: wait for delivery; exactly_once: into the partition's transaction)
    ->  write RocksDB (one WriteBatch per partition)  ->  ack the offsets.

A batch whose partitions were revoked while it was computed is dropped unacked; its new owner
processes it again from the committed offsets.

Beside it: stream/worker/batch_decode.py sorts a batch's records out, stream/worker/state_view.py holds the
states of batches in flight (read-your-writes), stream/worker/tombstones.py the TTL and forget deletions,
stream/worker/upkeep.py the metrics and gauges.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from aiokafka.errors import ProducerFenced

from model.retrieval_scorer import RetrievalPolicy
from model.topk_calibration import ScorerCache
from state.codec import encode as encode_state
from stream.compat import observe_many
from stream.kafka.topics import TopicNames
from stream.observe.metrics import TOPK_ROW_PATHS, Metrics
from stream.pipeline.answer_cache import AnswerCache, Stamp
from stream.pipeline.events import Event, InputShape, Limits
from stream.pipeline.exposure import ExposureWindow
from stream.pipeline.prequential import PopularityBaseline
from stream.pipeline.processor import ProcessorConfig, process_batch
from stream.pipeline.ranking import RuleContext
from stream.pipeline.rules import Catalogue, CatalogueMasks, RuleConfig
from stream.settings import Scoring, Settings
from stream.worker.batch_consumer import Batch, BatchConsumer
from stream.worker.batch_decode import BatchDecoder
from stream.worker.freeze_guard import FreezeGuard
from stream.worker.model_holder import ModelHolder
from stream.worker.sinks import Outgoing
from stream.worker.state_view import StateView
from stream.worker.table_store import TableStore
from stream.worker.tombstones import StateTtl, Writes, deleted_keys, forget_users
from stream.worker.upkeep import Upkeep, active_partitions

log = logging.getLogger("gruflow.worker")
_FAST_TOPK_MIN_ITEMS = 4096
_MAX_IN_FLIGHT = 3  # batches produced but not yet acknowledged by the broker


def retrieval_policy(sc: Scoring) -> RetrievalPolicy:
    """The ``GRUFLOW_RETRIEVAL*`` settings as the scorer cache's policy."""
    return RetrievalPolicy(mode=sc.retrieval, target_events_per_s=sc.retrieval_target_events_per_s,
                           nlist=sc.retrieval_nlist, nprobe=sc.retrieval_nprobe, n_candidates=sc.retrieval_candidates,
                           build_threads=sc.retrieval_build_threads, rebuild_every=sc.retrieval_rebuild_every)


@dataclass
class Pipeline:
    app: Any
    settings: Settings
    names: TopicNames
    store: TableStore
    holder: ModelHolder
    metrics: Metrics
    sink: Any
    exactly_once: bool
    dead_letter_bytes: int  # of a bad record's key + value (topics.dead_letter_budget)
    popularity: PopularityBaseline = field(default_factory=PopularityBaseline)
    catalogue: Catalogue = field(default_factory=Catalogue)  # filled by the item-rules reader
    stream_time_ms: int = 0  # the newest event time this worker has seen (the TTL's clock)
    _pending: deque = field(default_factory=deque)  # finishing tasks of batches in flight, oldest first
    _seq: int = 0
    _generation: int = -1
    _failure: BaseException | None = None
    _gc_frozen: bool = False

    def __post_init__(self) -> None:
        s = self.settings
        self.cfg = ProcessorConfig(k=s.scoring.top_k, session_gap_ms=int(s.worker.session_gap_s * 1000),
                                   because_history=s.serving.because_history if s.serving.because else 0)
        shape = InputShape.parse(s.worker.field_map, s.worker.event_type_map)
        kinds = self.names.kinds()
        limits = Limits(s.worker.max_message_bytes, s.worker.max_id_bytes)
        self.decoder = BatchDecoder(self.names.control, kinds, limits, shape if shape.active else None,
                                    self.dead_letter_bytes)
        self.view = StateView(self.store, self.app)
        self.ttl = StateTtl(s.worker.state_ttl_s)
        self.upkeep = Upkeep(self.app, self.store, self.metrics, kinds, self.names.changelog, s.scoring.top_k)
        # one compute thread: batches are sequential anyway; the top-K's threads (scoring_threads) and
        # torch's own do the maths
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gruflow-compute")
        self.state_lock = asyncio.Lock()
        m = self.metrics
        sc = s.scoring
        self.scorers = ScorerCache(sc.scoring_threads, min_items=_FAST_TOPK_MIN_ITEMS, compiled=sc.compiled_kernel,
                                   k=sc.top_k, path=sc.scorer_path, retrieval=retrieval_policy(sc),
                                   on_choice=lambda c: m.scorer.info({"path": c.path}))
        # a swapped-in model's scorer: calibrated in the swapping thread, before the model is served
        self.holder.on_prepare(self.prepare_scorer)
        self._topk_rows = {path: m.topk_rows.labels(path=path) for path in TOPK_ROW_PATHS}
        self.rules = RuleConfig.from_settings(s)
        self._catalogue_masks = CatalogueMasks()
        self.exposure = ExposureWindow(s.rules.exposure_window_s) if s.rules.exposure_cap > 0 else None
        self.freeze = FreezeGuard(s.worker.broker_session_timeout_s, on_freeze=self._on_freeze)
        # each user's last published list: written on the stream's loop, read by the requests' thread
        self.answers = AnswerCache(s.serving.serve_cache_users, s.serving.serve_cache_max_age_s)

    def _on_freeze(self) -> None:
        """A freeze seen: counted; under exactly_once the open transactions were aborted meanwhile by the
        partitions' new owner, so the local store is rebuilt at the next recovery (``mark_uncommitted``)."""
        self.metrics.worker_freezes.inc()
        if self.exactly_once:
            self.store.mark_uncommitted()

    # --- the batch ---------------------------------------------------------------------------
    async def handle(self, batch: Batch, generation: int) -> None:
        async with self.state_lock:
            await self._handle(batch, generation)

    async def _handle(self, batch: Batch, generation: int) -> None:
        if self._failure is not None:
            raise self._failure
        if generation != self._generation:
            await self.drain()  # batches of the old generation drop themselves unacked
            self.answers.clear()
            self.view.reset()
            self._generation = generation
        t0 = time.perf_counter()
        now_ms = int(time.time() * 1000)
        out, events, dead, forget = self.decoder.decode(batch, now_ms)
        part_of, states = self._batch_states(events)

        t1 = time.perf_counter()
        model = self.holder.current
        result = None
        if events:
            result, rows_by_path = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._compute, model, events, states)
            for path, rows in rows_by_path.items():
                self._topk_rows[path].inc(rows)
        if self.app.consumer_generation_id != generation or self.app.should_stop:
            log.info("rebalance during a batch of %d events: dropped unacked, it will be processed again",
                     len(events))
            return
        if self.freeze.hold_s() > 0 and not await self._wait_out_freeze(generation, len(events)):
            return

        t2 = time.perf_counter()
        local, created = self._stage(result, events, states, part_of, out)
        evicted = self.ttl.evict(batch, part_of, self.stream_time_ms, self.view.read, out, local)
        if forget:
            n = forget_users(forget, result.states if result is not None else {}, self.view.read, out, local)
            self.metrics.forgotten_users.inc(n)

        offsets = [(tp, [r.offset for r in records]) for tp, records in batch]
        staged = (local, created, offsets, generation, events, result, dead, evicted)
        if self.exactly_once:
            if not await self._send_in_transaction(out, *staged):
                return
        else:
            await self._send_pipelined(out, *staged)
        t3 = time.perf_counter()
        age = (now_ms - min(e.append_ts_ms for e in events)) / 1000.0 if events else 0.0
        self.upkeep.phase(len(events), age, t1 - t0, t2 - t1, t3 - t2)
        if not self._gc_frozen and events:
            # what is alive after the first batch (faust, the clients, torch, the first model) lives about
            # as long as the worker: keep it out of the collector's full passes, each of which would walk
            # it all while every thread waits (docs/hot-path.md). The cost: a reference cycle among those
            # objects is never collected (at most the first model's once a newer one is served)
            gc.freeze()
            self._gc_frozen = True

    def _batch_states(self, events: list[Event]) -> tuple[dict[bytes, int], dict[bytes, Any]]:
        """Each user's partition, and the states of the batch's users (one multi-get per partition)."""
        part_of: dict[bytes, int] = {}
        for e in events:
            part_of[e.key] = e.partition
        by_part: dict[int, list[bytes]] = defaultdict(list)
        for key, p in part_of.items():
            by_part[p].append(key)
        states = {}
        for p, keys in by_part.items():
            states.update(self.view.read(p, keys))
        return part_of, states

    def _stage(self, result: Any, events: list[Event], states: dict[bytes, Any], part_of: dict[bytes, int],
               out: Outgoing) -> tuple[Writes, set[bytes]]:
        """Recommendations and changelog records into ``out``; the RocksDB writes per partition, and the
        users this batch adds (read as absent)."""
        local: Writes = defaultdict(list)
        created: set[bytes] = set()  # users this batch adds to the state (read as absent)
        if result is not None:
            for i, (key, value) in enumerate(result.outputs):
                out.recommendations[events[i].partition].append((key, value))
            for key, st in result.states.items():
                p = part_of[key]
                if key not in states:
                    created.add(key)
                raw = encode_state(st)
                out.changelog[p].append((key, raw))
                local[p].append((key, raw))
            observe_many(self.metrics.state_record_bytes,
                         np.fromiter((len(raw) for recs in local.values() for _, raw in recs), dtype=np.float64))
            self.stream_time_ms = max(self.stream_time_ms, max(e.ts_ms for e in events))
        return local, created

    async def _send_in_transaction(self, out: Outgoing, local: Writes, created: set[bytes], offsets: list,
                                   generation: int, events: list[Event], result: Any, dead: Counter[str],
                                   evicted: int) -> bool:
        """exactly_once: outputs into the partitions' transactions, then RocksDB, then the acks; False when
        a rebalance came first (nothing sent, nothing acked)."""
        consumer: BatchConsumer = self.app.consumer
        async with consumer.commit_lock:
            # a revocation (which holds this lock) may have happened while waiting: its offsets are
            # forgotten and its records will be fetched again, so these outputs must not be sent
            if self.app.consumer_generation_id != generation or not consumer.flow_active \
                    or self.app.should_stop:
                log.info("rebalance before a batch of %d events was sent: dropped unacked, it will be "
                         "processed again", len(events))
                return False
            changelog_futs, futs = await self.sink.send(out)
            # delivered into the open transactions BEFORE the offsets are acked: aiokafka's
            # commit_transaction does not wait for records still queued (one produce request in flight
            # per broker), so a commit could carry this batch's offsets while its outputs went out
            # after the EndTxn and were refused, silently. A refused record raises here instead,
            # before anything is acked.
            try:
                await asyncio.gather(*futs)
            except ProducerFenced as exc:  # nothing written or acked: the batch is fetched again after the seek
                consumer.transactions.fenced(exc)
                log.info("a batch of %d events was dropped unacked: its transaction was fenced", len(events))
                return False
            self.answers.remember(result.lists if result is not None else None, deleted_keys(local))
            for p, recs in local.items():
                self.store.write_partition(p, recs, created)
            for tp, offs in offsets:
                consumer.ack_offsets(tp, offs)
            self.view.mark_applied(offsets)
        highest: dict[int, int] = {}
        for p, fut in changelog_futs:
            meta = fut.result()
            highest[p] = max(highest.get(p, -1), meta.offset)
        self.store.mark_changelog_offsets(highest, on_commit=True)
        self.upkeep.observe(events, result, dead, evicted, time.time())
        return True

    async def _send_pipelined(self, out: Outgoing, local: Writes, created: set[bytes], offsets: list,
                              generation: int, events: list[Event], result: Any, dead: Counter[str],
                              evicted: int) -> None:
        """at_least_once, pipelined: the next batch is computed while this one is in flight; its states are
        visible to it through the overlay, and RocksDB writes + acks happen in batch order on delivery."""
        ticket = self.sink.submit(out)
        self._seq += 1
        seq = self._seq
        self.answers.remember(result.lists if result is not None else None, deleted_keys(local))
        self.view.stage(seq, local)
        self.view.mark_applied(offsets)
        prev = self._pending[-1] if self._pending else None
        task = asyncio.ensure_future(self._finish(prev, seq, ticket, local, created, offsets, generation, events,
                                                  result, dead, evicted))
        self._pending.append(task)
        self._prune()
        while len(self._pending) > _MAX_IN_FLIGHT:
            await asyncio.wait([self._pending[0]])
            self._prune()

    def _compute(self, model: Any, events: list[Event], states: dict[bytes, Any]) -> tuple[Any, dict[str, int]]:
        """The compute thread's part: the batch, and how many of its rows each top-K path answered. Even
        the first batch of a model nobody prepared builds its scorer here, off the event loop."""
        # stamped before the rules are read: a catalogue that changes in between leaves an older stamp, so
        # these lists are scored again on request, never served under rules they were not ranked with
        stamp = self.answer_stamp(model)
        scorer = self.scorers.get(model)
        scored_before, int8_before = (scorer.rows_scored, scorer.rows_int8) if scorer is not None else (0, 0)
        result = process_batch(model, events, states, self.cfg, self.popularity,
                               scorer.top_k if scorer is not None else None, self.rule_context(model))
        if result.lists is not None:
            result.lists = replace(result.lists, stamp=stamp)
        if scorer is None:
            return result, {}
        int8 = scorer.rows_int8 - int8_before
        rest = scorer.rows_scored - scored_before - int8
        return result, {"int8": int8, "approximate" if scorer.path == "approximate" else "float32": rest}

    def answer_stamp(self, model: Any) -> Stamp:
        """What a list ranked now with ``model`` depends on besides the user's state (``AnswerCache``)."""
        return Stamp(id(model), int(model.version), self.catalogue.view().version,
                     getattr(self.app, "consumer_generation_id", None))

    def rule_context(self, model: Any, include: frozenset[str] | None = None,
                     exclude: frozenset[str] | None = None, record: bool = True) -> RuleContext | None:
        """The business rules of one ranking with ``model`` (None: no rule applies). ``include``/``exclude``
        replace the settings' category filters (a request's own filter); ``record``: the lists count
        against the exposure cap."""
        cfg = self.rules
        masks = self._catalogue_masks.get(self.catalogue.view(), model.vocab,
                                          cfg.include_categories if include is None else include,
                                          cfg.exclude_categories if exclude is None else exclude)
        ctx = RuleContext(cfg, masks, self.exposure, time.time(), record)
        return ctx if ctx.active else None

    def prepare_scorer(self, model: Any, serve: bool = False) -> None:
        """Calibrates ``model``'s top-K scorer (about a second at 20,000 items): in the thread that swaps a
        model in, and at start-up (``serve``: the model already served) in an executor, never on the event
        loop."""
        try:
            self.scorers.prepare(model, serve=serve)
        except Exception as exc:  # noqa: BLE001 - the swap goes on; the first batch builds it instead
            log.warning("could not prepare the top-K scorer of model version %s: %r",
                        getattr(model, "version", "?"), exc)

    async def _finish(self, prev: "asyncio.Task[None] | None", seq: int, ticket: Any, local: Writes,
                      created: set[bytes], offsets: list[tuple[Any, list[int]]], generation: int,
                      events: list[Event], result: Any, dead: Counter[str], evicted: int) -> None:
        """Once a batch is delivered (and every earlier batch finished): RocksDB, changelog offsets, acks."""
        try:
            if prev is not None:
                await asyncio.shield(prev)
            await asyncio.wait([ticket.future])  # not ``await``: ``check`` says why a batch was not delivered
            delivered = ticket.check()
            if self.freeze.hold_s() > 0 and not await self._wait_out_freeze(generation, len(events)):
                self.answers.clear()
                self.view.overlay.clear()
                return
            if self.app.consumer_generation_id != generation or self.app.should_stop:
                self.answers.clear()
                self.view.overlay.clear()  # the consumer seeks back to the committed offsets
                return
            for p, recs in local.items():
                self.store.write_partition(p, recs, created)
                self.view.settle(seq, recs)
            self.store.mark_changelog_offsets(delivered.changelog_offsets)
            consumer: BatchConsumer = self.app.consumer
            for tp, offs in offsets:
                consumer.ack_offsets(tp, offs)
            self.upkeep.observe(events, result, dead, evicted, delivered.delivered_at)
        except Exception as exc:
            if self._failure is None:
                self._failure = exc  # re-raised by the next batch: the worker crashes, nothing is acked
            raise

    async def _wait_out_freeze(self, generation: int, n_events: int) -> bool:
        """``FreezeGuard.wait_out``, still a member while the batch's generation is current."""
        return await self.freeze.wait_out(lambda: self.app.consumer_generation_id == generation
                                          and self.app.consumer.flow_active and not self.app.should_stop, n_events)

    def active_partitions(self) -> list[int]:
        return active_partitions(self.app, self.names.changelog)

    async def wait_applied(self, ends: dict[tuple[str, int], int]) -> None:
        """Return once every event below ``ends`` (input partition -> offset) is reflected in the states
        (the caller bounds the wait)."""
        await self.view.wait_applied(ends)

    def read_states(self, partition: int, keys: list[bytes], db: Any = None) -> dict[bytes, Any]:
        """States as the worker last decided them (in-flight batches' first, then RocksDB): what requests
        answer from. ``db``: the partition's handle (``store.partition_db``, taken on the event loop) when
        called from another thread (the request thread; ``StateView.read``)."""
        return self.view.read(partition, keys, db)

    async def scan_for_evictions(self) -> None:
        """The TTL's scan of the active partitions (``StateTtl.scan``)."""
        await self.ttl.scan(self.stream_time_ms, self.active_partitions(), self.store, self.state_lock)

    def _prune(self) -> None:
        """Forget finished batches (oldest first); a failed one fails the batch loop."""
        while self._pending and self._pending[0].done():
            task = self._pending.popleft()
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def drain(self) -> None:
        """Wait for the batches in flight (rebalance, shutdown)."""
        while self._pending:
            await asyncio.wait([self._pending[0]])
            self._prune()

    def close(self) -> None:
        """Before faust stops (and commits for the last time): the batches in flight finish, so that their
        offsets are in that commit; then the compute thread stops."""
        loop = self.app.loop
        if self._pending and not loop.is_running() and not loop.is_closed():
            try:
                loop.run_until_complete(asyncio.wait_for(self.drain(), 10.0))
            except Exception as exc:  # noqa: BLE001 - not acked: processed again after the restart
                log.warning("batches in flight did not finish before shutdown: %r", exc)
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def stop_output(self) -> None:
        """After faust has stopped: deliver what is still queued and close the output producer."""
        await self.sink.stop()
