"""Security paths on a real broker, a real worker process and a real trainer (docs/security.md):

- a bot-like user is answered by the worker but not learned from by the trainer, counted by reason,
  and its id goes to the flagged-users topic, never to an INFO log line or a metric label;
- ``gruflow forget USER_ID`` removes the user from the state table (RocksDB), the changelog and the
  trainer's buffer, and leaves other users alone.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
import rocksdict

from stream.worker.app import table_dir
from stream.observe.metrics import Metrics
from stream.kafka.topics import STATE_TABLE_NAME, TopicNames, ensure_topics
from stream.pipeline.training_filter import FILTER_REASONS, FilterConfig
from workerkit import REPO, Ev, TopicReader, WorkerProc, produce, read_states, save_tiny_model

pytestmark = pytest.mark.integration


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _humans(n: int, per_user: int, t0: int, seed: int, prefix: str) -> list[Ev]:
    """Sessions with irregular gaps of 5-90 s: what the filter must let through."""
    rng = np.random.default_rng(seed)
    out = []
    for u in range(n):
        t = t0 + 7919 * u
        for _ in range(per_user):
            t += int(rng.uniform(5_000, 90_000))
            out.append(Ev(f"{prefix}{u}", f"i{int(rng.integers(0, 300))}", t))
    return out


def _start_trainer(settings, metrics):
    from stream.online.trainer import Trainer

    trainer = Trainer(settings, metrics, serve_http=False).start()
    _wait(trainer.ready.is_set, 90, "trainer consumer to be assigned")
    return trainer


def _metrics_text(worker: WorkerProc, metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return worker.get("/metrics")[1] + generate_latest(metrics.registry).decode()


def test_bot_is_answered_not_learned_and_its_id_stays_out_of_logs_and_labels(kafka, tmp_path: Path,
                                                                            caplog) -> None:
    caplog.set_level(logging.INFO, logger="gruflow")
    path = save_tiny_model(tmp_path / "tiny.gfc")
    settings = kafka.settings(partitions=2, model_path=str(path), training_filter=True,
                              finetune_every_events=10**9, finetune_interval_s=0.0, buffer_max_age_s=1e9)
    ensure_topics(settings)
    t0 = int(time.time() * 1000) - 7_200_000
    humans = _humans(6, 8, t0, seed=3, prefix="shopper-")
    bot_user = "bot-7f3a9c"
    bot = [Ev(bot_user, f"i{(37 * j) % 300}", t0 + 600_000 + 1000 * j) for j in range(11)] + \
          [Ev(bot_user, "i5", t0 + 600_000 + 11_000)]  # random filler on a 1 s timer, then the target
    metrics = Metrics.create(role="trainer")
    trainer = _start_trainer(settings, metrics)
    reader = TopicReader(settings, TopicNames.from_settings(settings).recommendations)
    flagged = TopicReader(settings, TopicNames.from_settings(settings).flagged)
    try:
        with WorkerProc(kafka, settings, path, tmp_path) as worker:
            sent = produce(settings, humans + bot)
            want = {(e.user, e.ts) for e in humans + bot}
            seen = reader.poll_until(lambda c: want <= set(c.answered()), 120, "every event answered")
            # answered: every bot event got a recommendation like anyone else's
            assert sum(1 for r in seen.recommendations() if r["user_id"] == bot_user) == len(bot)
            assert trainer.wait_consumed(sent, 60), trainer.error
            # not learned from: no bot session in the buffer, every human one is
            users = trainer.buffer.users()
            assert bot_user not in users
            assert {e.user for e in humans} <= users
            assert trainer.buffer.n_events == len(humans)
            # counted by reason: the events after the flag, plus the one that raised it
            min_events = FilterConfig().min_events
            filtered = {r: trainer.filtered(r) for r in FILTER_REASONS}
            assert sum(filtered.values()) == len(bot) - (min_events - 1), filtered
            assert filtered["flagged_user"] == len(bot) - min_events
            # the id is on the flagged topic, with its reason
            got = flagged.poll_until(lambda c: len(c.messages) >= 1, 30, "the flagged-user sample")
            sample = [orjson.loads(m.value()) for m in got.messages]
            assert [s["user_id"] for s in sample] == [bot_user]
            assert sample[0]["reason"] in FILTER_REASONS and sample[0]["reason"] != "flagged_user"
            # ... and nowhere else: metric labels of both processes, INFO logs of both
            text = _metrics_text(worker, metrics)
            for path in (f"/no-such-page?user_id={bot_user}", f"/recommendations?user_id={bot_user}"):
                code, body = worker.get(path)  # an HTTP error answers without echoing the id
                assert code >= 400 and bot_user not in body, (path, code)
            assert "gruflow_training_filtered_total" in text and "gruflow_events_in_total" in text
        worker_log = worker.log_path.read_text(errors="replace")
        assert "worker" in worker_log.lower()  # the scan reads a real log
        for who in [bot_user] + sorted({e.user for e in humans}):
            assert who not in text, f"user id in a metric label: {who}"
            assert who not in worker_log, f"user id in the worker log: {who}"
            assert who not in caplog.text, f"user id in the trainer log: {who}"
    finally:
        trainer.stop()
        reader.close()
        flagged.close()


def _local_users(settings) -> set[str]:
    users: set[str] = set()
    for p in range(settings.topics.partitions):
        for path in Path(table_dir(settings)).rglob(f"{STATE_TABLE_NAME}-{p}.db"):
            db = rocksdict.Rdict(str(path), options=rocksdict.Options(raw_mode=True),
                                 access_type=rocksdict.AccessType.read_only())
            try:
                users |= {k.decode() for k in db.keys() if not k.startswith(b"__faust")}
            finally:
                db.close()
    return users


def test_forget_removes_a_user_from_state_table_changelog_and_trainer_buffer(kafka, tmp_path: Path) -> None:
    path = save_tiny_model(tmp_path / "tiny.gfc")
    settings = kafka.settings(partitions=2, model_path=str(path), finetune_every_events=10**9,
                              finetune_interval_s=0.0, buffer_max_age_s=1e9)
    ensure_topics(settings)
    t0 = int(time.time() * 1000) - 3_600_000
    events = _humans(4, 5, t0, seed=9, prefix="customer-")
    gone, kept = "customer-1", {"customer-0", "customer-2", "customer-3"}
    metrics = Metrics.create(role="trainer")
    trainer = _start_trainer(settings, metrics)
    reader = TopicReader(settings, TopicNames.from_settings(settings).recommendations)
    try:
        with WorkerProc(kafka, settings, path, tmp_path) as worker:
            sent = produce(settings, events)
            want = {(e.user, e.ts) for e in events}
            reader.poll_until(lambda c: want <= set(c.answered()), 120, "every event answered")
            assert trainer.wait_consumed(sent, 60), trainer.error
            assert gone in trainer.buffer.users()
            _wait(lambda: gone in read_states(settings, read_committed=False), 60, "the user's state in the changelog")

            out = subprocess.run([sys.executable, "-m", "stream.cli", "forget", gone], cwd=REPO,
                                 env=kafka.env(settings), capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert gone not in out.stdout  # the command does not echo the id either

            _wait(lambda: trainer.forgotten >= 1, 60, "the trainer to apply the request")
            assert worker.wait_metric("gruflow_forgotten_users_total", lambda v: v >= 1, 60), worker.log_tail()
            assert gone not in trainer.buffer.users()
            assert kept <= trainer.buffer.users()
            states = read_states(settings, read_committed=False)
            assert gone not in states and kept <= set(states)
        local = _local_users(settings)  # the worker has stopped: its RocksDB can be opened
        assert gone not in local and kept <= local
    finally:
        trainer.stop()
        reader.close()
