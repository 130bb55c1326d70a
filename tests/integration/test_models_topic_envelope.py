"""Records on the models topic that are not model chunks, written by other clients, never stop a reader.

A running trainer and a running worker (real processes, real broker) read the models topic while kcat and
confluent-kafka put records there that confluent-kafka, the topic's reader, handles badly or that are
plain garbage: header names that are not UTF-8 (the record behind issue 17), null header values, values
that are not a model envelope, a truncated envelope, an envelope of an unknown protocol. Both processes
keep running, count each such record as a refusal once per pass over the topic, and the model the
trainer then promotes reaches the worker, which serves it.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from stream.online import model_envelope, model_sync
from stream.kafka.topics import TopicNames, ensure_topics
from test_unreadable_records import BAD_NAME, kcat, produce_with_header
from workerkit import TopicReader, WorkerProc, make_events, produce, save_tiny_model

pytestmark = pytest.mark.integration

ROUND_EVENTS = 400  # the trainer fine-tunes after this many events (and promotes: guardrail tolerance 1.0)


def _send_bad_records(settings, tag: str) -> dict[str, int]:
    """Records that are not model chunks, onto partition 0 of the models topic; returns how many of each
    refusal reason a reader must count for them."""
    topic = TopicNames.from_settings(settings).models
    via = "kcat" if kcat() is not None else "raw-batch"  # the same bytes either way; kcat is what the issue used
    send = lambda key, value, headers, how=via: produce_with_header(  # noqa: E731 - one line per record below
        settings, how, topic, 0, f"{tag}/{key}".encode(), value, headers)
    # the record, alone and among the headers protocol 1 put on a chunk
    send("name", b"v", [(BAD_NAME, b"v")])
    send("legacy", b"\x00" * 64, [(b"gruflow-protocol", b"1"), (b"gruflow-version", b"3"), (BAD_NAME, b"\xff"),
                                  (b"gruflow-chunk", b"0"), (b"gruflow-chunks", b"1")])
    # null header values, and no headers at all under garbage values
    send("null", b"garbage", [(b"gruflow-protocol", None), (b"gruflow-version", None)], how="confluent")
    send("garbage", b"\x00\xffnot a model chunk", [], how="confluent")
    send("empty", b"", [], how="confluent")
    # an envelope cut short, one whose descriptor is not JSON, one whose descriptor lacks the fields, and an
    # envelope of a protocol this gruflow does not know
    send("truncated", model_envelope.MAGIC + b"\x02\x00", [], how="confluent")
    send("notjson", model_envelope.MAGIC + struct.pack(">BI", 2, 3) + b"{{{payload", [], how="confluent")
    send("fields", model_envelope.pack({"version": "three"}, b"payload"), [], how="confluent")
    send("future", model_envelope.MAGIC + struct.pack(">BI", 9, 2) + b"{}payload", [], how="confluent")
    return {model_sync.R_ENVELOPE: 8, model_sync.R_PROTOCOL: 1}


def _refusals(proc: WorkerProc) -> dict[str, float]:
    return {reason: proc.metric("gruflow_model_refusals_total", reason=reason) for reason in model_sync.REFUSAL_REASONS}


def _wait_refusals(procs: list[WorkerProc], want: dict[str, float], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            assert p.proc is not None and p.proc.poll() is None, f"{p.command} exited:\n{p.log_tail()}"
        got = [_refusals(p) for p in procs]
        if all(g == want for g in got) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all(g == want for g in got), f"refusals {got}, want {want} in each of {[p.command for p in procs]}"


def test_worker_and_trainer_refuse_foreign_records_on_the_models_topic_and_serve_the_next_model(
        kafka, tmp_path: Path) -> None:
    from stream.kafka.broker import free_port

    settings = kafka.settings(partitions=2, batch_max_ms=10.0)
    ensure_topics(settings)
    model_path = save_tiny_model(tmp_path / "base.gfc")
    per_pass = _send_bad_records(settings, "before")
    zero = {reason: 0.0 for reason in model_sync.REFUSAL_REASONS}

    trainer = WorkerProc(kafka, settings.replace(data_dir=tmp_path / "trainer", web_port=free_port(),
                                                 finetune_every_events=ROUND_EVENTS, finetune_interval_s=0.0,
                                                 guardrail_tolerance=1.0),
                         model_path, tmp_path, name="trainer", command="trainer")
    worker = WorkerProc(kafka, settings.replace(data_dir=tmp_path / "worker"), model_path, tmp_path)
    recs = TopicReader(settings, TopicNames.from_settings(settings).recommendations)
    try:
        # the trainer reads the topic at start (nothing valid: it publishes its model as version 1) and then
        # follows it; the worker loads version 1 from the topic at start and then follows it: two passes each
        trainer.start()
        worker.start()
        assert worker.wait_metric("gruflow_model_version", lambda v: v == 1, timeout=60), worker.log_tail()
        _wait_refusals([trainer, worker], {**zero, **{r: 2 * n for r, n in per_pass.items()}})

        # the same records again while both follow the topic
        _send_bad_records(settings, "while")
        _wait_refusals([trainer, worker], {**zero, **{r: 3 * n for r, n in per_pass.items()}})

        # events: the worker answers them, the trainer fine-tunes on them and promotes version 2
        t0 = int(time.time() * 1000) - 3_600_000
        first = make_events(50, ROUND_EVENTS // 50 + 2, seed=3, t0=t0)
        produce(settings, first)
        assert trainer.wait_metric("gruflow_model_promotions_total", lambda v: v >= 1, timeout=240), \
            trainer.log_tail()
        assert worker.wait_metric("gruflow_model_version", lambda v: v == 2, timeout=60), worker.log_tail()
        later = make_events(20, 2, seed=4, t0=t0 + 100_000, prefix="later")
        produce(settings, later)
        seen = recs.poll_until(lambda c: {(e.user, e.ts) for e in first + later} <= set(c.answered()), 120,
                               "answers to every event")
        versions = {r["model_version"] for r in seen.recommendations() if r["user_id"].startswith("later")}
        assert versions == {2}, versions
        assert worker.metric("gruflow_model_swaps_total") == 1
        _wait_refusals([trainer, worker], {**zero, **{r: 3 * n for r, n in per_pass.items()}}, timeout=0)
        for p in (trainer, worker):
            assert p.proc is not None and p.proc.poll() is None, f"{p.command} exited:\n{p.log_tail()}"
            assert p.get("/readyz")[0] == 200, p.log_tail()
    finally:
        recs.close()
        for p in (worker, trainer):
            try:
                p.stop()
            finally:
                p.kill()
