"""The trainer: reads the input topics into a bounded session buffer, runs guarded fine-tune rounds
off the consuming thread, and publishes promoted versions to the models topic.

Threads: one confluent-kafka consumer thread (own consumer group ``<app_id>-trainer``) that only
decodes and buffers, one round thread that trains with ``settings.trainer_torch_threads`` torch
threads, the models-topic subscriber (to follow rollbacks published by ``gruflow model rollback``)
and, for a separate trainer process, a small HTTP server with /metrics, /livez and /readyz.
The trainer is the single owner of the vocabulary: workers only ever receive grown vocabularies
from it, so every worker maps item ids to the same rows.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from typing import Any, Callable

from model.finetune import FineTuneConfig, FineTuner, ModelState, RoundResult, SessionBuffer
from stream.observe.metrics import Metrics
from stream.online.model_store import ModelStore
from stream.online.model_protocol import header_meta
from stream.settings import Settings
from stream.pipeline.training_filter import FilterConfig, TrainingFilter
from stream.online.training_guard import FlaggedSample
from stream.pipeline.control import control_action, event_source

log = logging.getLogger("gruflow.trainer")


class TrainerError(RuntimeError):
    """The trainer cannot start; the message says what to do."""


def state_from_recommender(rec: Any) -> ModelState:
    """A private copy of a served model for the fine-tuner (the caller's object stays untouched)."""
    import numpy as np

    net = copy.deepcopy(rec.net)
    pop = np.asarray(rec.popularity if rec.popularity is not None else np.zeros(len(rec.vocab)), dtype=np.float64)
    return ModelState(net, type(rec.vocab)(rec.vocab.ids), net.params, pop.copy(), dict(rec.metadata or {}),
                      int(rec.version))


def checkpoint_bytes(state: ModelState, metadata: dict) -> bytes:
    from model.checkpoint import checkpoint_to_bytes

    return checkpoint_to_bytes(state.net, state.vocab, state.params, state.popularity, metadata)


class Trainer:
    def __init__(self, settings: Settings, metrics: Metrics | None = None, *, serve_http: bool = True,
                 config: FineTuneConfig | None = None, progress: bool = False) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics.create(role="trainer")
        self.serve_http = serve_http
        self.config = config or FineTuneConfig.from_settings(settings.trainer,
                                                                 session_gap_s=settings.worker.session_gap_s)
        self.progress = progress
        self.store = ModelStore.from_settings(settings)
        self.buffer = SessionBuffer(self.config.buffer_max_events, self.config.buffer_max_age_s,
                                    self.config.session_gap_s, self.config.reservoir_sessions, self.config.seed)
        self.filter = TrainingFilter(FilterConfig.from_settings(settings))
        self._flagged = FlaggedSample(settings)
        self.tuner: FineTuner | None = None
        self._lock = threading.Lock()  # guards the buffer and the counters below
        self._cond = threading.Condition(self._lock)
        self._events_since = 0
        self._last_round = time.monotonic()
        self._round_requested = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._published: dict[int, int] = {}  # version -> chunks, on the topic (newest models_keep)
        self._own_versions: set[int] = set()
        self._max_version = 0
        self._subscriber: Any = None
        self._http: Any = None  # stream.observe.web.WebServerThread
        self.rounds_done = 0
        self.events_consumed = 0
        self.forgotten = 0
        self.results: list[RoundResult] = []
        self.ready = threading.Event()
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Trainer":
        from stream.online import model_sync
        from stream.worker.model_holder import ModelHolder

        infos = model_sync.list_versions(self.settings)
        self._published = {i.version: i.chunks for i in infos}
        self._max_version = max(self._published, default=0)
        rec = model_sync.load_latest(self.settings, self.metrics)
        if rec is None:
            rec = self._publish_initial()
        self.tuner = FineTuner(state_from_recommender(rec), self.config)
        self.metrics.vocabulary_size.set(len(rec.vocab))
        self.metrics.model_version.set(rec.version)
        holder = ModelHolder(rec)
        # refusals (corrupt, non-finite, absurd, stale versions) are counted here too; swaps are not: the
        # trainer's gruflow_model_version follows its own promotions and adoptions
        self._subscriber = model_sync.ModelSubscriber(self.settings, holder, self.metrics, on_version=self._on_version,
                                                      serving=False)
        self._subscriber.start()
        if self.serve_http:
            self._start_http()
        for target, name in ((self._consume, "gruflow-trainer-consumer"), (self._rounds, "gruflow-trainer-rounds")):
            t = threading.Thread(target=self._guard(target), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("trainer started from model version %d (%d items)", rec.version, len(rec.vocab))
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()
        if self._subscriber is not None:
            self._subscriber.stop()
        self._flagged.close()
        if self._http is not None:
            self._http.stop()
            self._http = None

    def __enter__(self) -> "Trainer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _guard(self, fn: Any) -> Any:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - surfaced through .error and /readyz
                self.error = exc
                self.ready.clear()
                log.exception("trainer thread %s failed", threading.current_thread().name)
        return run

    def _publish_initial(self) -> Any:
        """First start of a deployment: serve GRUFLOW_MODEL_PATH as version 1 through the topic."""
        from model.checkpoint import load_checkpoint
        from model.weight_check import weight_problem

        path = self.settings.scoring.model_path
        if not path:
            raise TrainerError("no model to fine-tune: the models topic is empty and GRUFLOW_MODEL_PATH is not set; "
                               "train one with `gruflow train` and set GRUFLOW_MODEL_PATH")
        ckpt = load_checkpoint(path)
        problem = weight_problem(ckpt.net, ckpt.popularity)
        if problem is not None:
            self.metrics.model_refusals.labels(reason=problem.reason).inc()
            raise TrainerError(f"refused to fine-tune or publish {path} ({problem.reason}): {problem}")
        version = self._max_version + 1
        meta = {**(ckpt.metadata or {}), "version": version, "parent_version": 0, "source": str(path),
                "created_at": time.time()}
        from model.checkpoint import checkpoint_to_bytes

        data = checkpoint_to_bytes(ckpt.net, ckpt.vocab, ckpt.params, ckpt.popularity, meta)
        self._publish(data, version, 0, meta)
        ckpt.metadata = meta
        return ckpt.recommender(version)

    # ------------------------------------------------------------------ consuming
    def _consume(self) -> None:
        from confluent_kafka import Consumer, KafkaError

        from stream.pipeline.events import Event, InputShape, Limits, decode_event
        from stream.kafka.config import consumer_config
        from stream.kafka.topics import TopicNames

        names = TopicNames.from_settings(self.settings)
        kinds = names.kinds()
        shape = InputShape.parse(self.settings.worker.field_map, self.settings.worker.event_type_map)
        limits = Limits(self.settings.worker.max_message_bytes, self.settings.worker.max_id_bytes)
        consumer = Consumer(consumer_config(self.settings, f"{self.settings.process.app_id}-trainer"))
        assigned = threading.Event()
        consumer.subscribe([*names.inputs, names.control], on_assign=lambda c, parts: assigned.set())
        want_source = bool(self.filter.config.sources)
        try:
            while not self._stop.is_set():
                msgs = consumer.consume(2000, 0.2)
                if assigned.is_set() and not self.ready.is_set() and self.error is None:
                    self.ready.set()
                if not msgs:
                    self._maybe_trigger()
                    continue
                batch = []
                forget: list[str] = []
                for m in msgs:
                    if m.error() is not None:
                        if m.error().code() != KafkaError._PARTITION_EOF:
                            log.warning("trainer consumer: %s", m.error())
                        continue
                    if m.topic() == names.control:
                        user = control_action(m.key(), m.value())
                        if user is not None:
                            forget.append(user)
                        continue
                    ev = decode_event(m.value(), m.key(), kinds.get(m.topic(), "clicks"), limits, topic=m.topic(),
                                      shape=shape if shape.active else None)
                    if isinstance(ev, Event):
                        batch.append((ev, event_source(m.value()) if want_source else ""))
                with self._cond:
                    self._learn(batch)
                    self.events_consumed += len(batch)
                    self.metrics.buffer_events.set(self.buffer.n_events)
                    self.metrics.buffer_bytes.set(self.buffer.nbytes)
                    self._cond.notify_all()
                for user in forget:  # after the poll's events: the request erases everything before it
                    self.forget(user)
        finally:
            consumer.close()

    def _learn(self, batch: list) -> None:
        """Buffer what the input filter lets through; the caller holds the lock."""
        for ev, source in batch:
            verdict = self.filter.observe(ev.user_id, ev.item_id, ev.ts_ms / 1000.0, source)
            if verdict.learn:
                self.buffer.add(ev.user_id, ev.item_id, ev.ts_ms / 1000.0, ev.event_type, ev.category, ev.price)
                continue
            self.metrics.training_filtered.labels(reason=verdict.reason).inc()
            if verdict.newly_flagged:
                self.buffer.remove_user(ev.user_id)
                self._flagged.offer(ev.user_id, verdict.reason)
        self._events_since += len(batch)

    def forget(self, user: str) -> int:
        """Right to erasure: drop the user's buffered sessions and filter statistics. Returns the
        events removed. Called for each ``forget`` request on the control topic."""
        with self._cond:
            removed = self.buffer.remove_user(user)
            self.filter.forget(user)
            self.forgotten += 1
            self._cond.notify_all()
        log.info("forgot a user on request (%d buffered events removed)", removed)
        return removed

    @staticmethod
    def filter_reasons() -> tuple[str, ...]:
        from stream.pipeline.training_filter import FILTER_REASONS

        return FILTER_REASONS

    def filtered(self, reason: str) -> int:
        """Events not learned from for ``reason`` (the gruflow_training_filtered_total series)."""
        value = self.metrics.registry.get_sample_value("gruflow_training_filtered_total", {"reason": reason})
        return int(value or 0)

    def _maybe_trigger(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def request_round(self) -> None:
        """Run a round as soon as the round thread is free (tests, experiment)."""
        with self._cond:
            self._round_requested = True
            self._cond.notify_all()

    def wait_consumed(self, n: int, timeout: float) -> bool:
        return self._wait_for(lambda: self.events_consumed >= n, timeout)

    def wait_rounds(self, n: int, timeout: float) -> bool:
        return self._wait_for(lambda: self.rounds_done >= n, timeout)

    def _wait_for(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``done()`` or a failure of the trainer (which ends the wait early: it will not come)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done() and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return done()

    # ------------------------------------------------------------------ rounds
    def _due(self) -> bool:
        if self._round_requested:
            return True
        if self._events_since <= 0:
            return False
        t = self.settings.trainer
        if t.finetune_every_events > 0 and self._events_since >= t.finetune_every_events:
            return True
        return t.finetune_interval_s > 0 and time.monotonic() - self._last_round >= t.finetune_interval_s

    def _rounds(self) -> None:
        import torch

        torch.set_num_threads(max(1, self.settings.trainer.trainer_torch_threads))
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set() and not self._due():
                    self._cond.wait(1.0)
                if self._stop.is_set():
                    return
                frame = self.buffer.to_frame()
                stats = self.buffer.drain_stats()
                first = self.buffer.first_time
                self._events_since = 0
                self._round_requested = False
                self._last_round = time.monotonic()
            self.run_round(frame, stats, first)

    def run_round(self, frame: Any, stats: Any, first_time: float = math.nan) -> RoundResult:
        assert self.tuner is not None
        base = self.tuner.current
        result = self.tuner.run_round(frame, stats, first_time, progress=self.progress)
        m = self.metrics
        if result.status != "skipped":
            m.finetune_rounds.inc()
            m.finetune_duration.observe(result.duration_s)
            if math.isfinite(result.loss):
                m.finetune_loss.set(result.loss)
        if result.promoted and self.tuner.current is not base:
            result = RoundResult("rejected", "superseded by a version published meanwhile (rollback)",
                                 None, result.current_scores, result.candidate_scores, result.loss,
                                 result.train_events, result.holdout_events, (), 0, result.duration_s)
        if result.promoted:
            cand = result.candidate
            # past every number on the topic, refused versions included: a number is never published twice
            seen = self._subscriber.highest_seen if self._subscriber is not None else 0
            version = max(self._max_version, seen) + 1
            meta = {**cand.metadata, "version": version}
            cand.metadata = meta
            self._publish(checkpoint_bytes(cand, meta), version, base.version, meta)
            self.tuner.accept(cand, version)
            m.promotions.inc()
            m.model_version.set(version)
            m.vocabulary_size.set(len(cand.vocab))
            m.new_items.inc(len(result.new_items))
            m.retired_items.inc(result.retired_items)
            log.info("promoted version %d: recall@%d %.4f -> %.4f, mrr %.4f -> %.4f, +%d items, loss %.4f, %.1fs",
                     version, self.config.guardrail_cutoff, result.current_scores["recall"],
                     result.candidate_scores["recall"], result.current_scores["mrr"],
                     result.candidate_scores["mrr"], len(result.new_items), result.loss, result.duration_s)
        elif result.status == "diverged":
            m.finetune_diverged.inc()
            log.warning("discarded a fine-tune round (%s); version %d stays current", result.reason, base.version)
        elif result.status == "rejected":
            m.rejections.inc()
            if result.concentration:
                m.concentration_refusals.labels(reason=result.concentration).inc()
            log.warning("rejected candidate (%s): current recall %.4f mrr %.4f, candidate recall %.4f mrr %.4f",
                        result.reason, result.current_scores.get("recall", math.nan),
                        result.current_scores.get("mrr", math.nan), result.candidate_scores.get("recall", math.nan),
                        result.candidate_scores.get("mrr", math.nan))
        else:
            log.info("fine-tune round skipped: %s", result.reason)
        with self._cond:
            self.results.append(result)
            del self.results[:-100]
            self.rounds_done += 1
            self._cond.notify_all()
        return result

    def _publish(self, data: bytes, version: int, parent: int, meta: dict) -> None:
        from stream.online import model_sync
        self._own_versions.add(version)
        self._max_version = max(self._max_version, version)
        self._published[version] = model_sync.publish_version(self.settings, data, version, parent, header_meta(meta))
        self.store.save(version, data, header_meta(meta))
        old = sorted(self._published)[: max(0, len(self._published) - self.settings.trainer.models_keep)]
        for v in old:
            model_sync.delete_version(self.settings, v, self._published.pop(v))

    def _on_version(self, rec: Any) -> None:
        """A version arrived on the models topic: adopt it unless it is one of ours (a rollback)."""
        self._max_version = max(self._max_version, int(rec.version))
        if rec.version in self._own_versions or self.tuner is None:
            return
        if rec.version > self.tuner.current.version:
            log.info("adopting model version %d published by someone else (rollback_of=%s)", rec.version,
                     (rec.metadata or {}).get("rollback_of"))
            self.tuner.adopt(state_from_recommender(rec))
            self.metrics.model_version.set(rec.version)

    # ------------------------------------------------------------------ http
    def _start_http(self) -> None:
        from stream.observe.web import WebServerThread

        def ready() -> tuple[bool, str]:
            ok = self.ready.is_set() and self.error is None
            return ok, "ready" if ok else "not ready"

        p = self.settings.process
        self._http = WebServerThread(self.metrics, ready, p.web_host, p.web_port)
        self._http.start()
