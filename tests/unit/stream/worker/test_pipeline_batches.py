"""The worker's batch path (``Pipeline.handle``) without a broker: a real Pipeline, real model, metrics,
decoding and batch computation, with an in-memory state store, a fake sink and a fake consumer
(tests/unit/stream/worker/pipelinekit.py). What a state or an answer should be comes from the same
events stepped through ``process_batch`` offline, one step per micro-batch."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator

import orjson
import pytest
import torch

from pipelinekit import Offline, Offsets, Rig, answer, decoded, event_value, make_rig, same_state
from state.codec import decode
from stream.pipeline.control import forget_request
from stream.pipeline.events import KEY_MISMATCH, NOT_JSON, WRONG_TOPIC
from stream.worker.sinks import SinkError

torch.set_num_threads(1)
T0 = int(time.time() * 1000) - 3_600_000  # an hour ago: valid event times


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.close()
    gc.unfreeze()  # the pipeline freezes the collector's heap after its first batch; not the test runner's


def _rig(rigs: list[Rig], **kw) -> Rig:
    rig = make_rig(**kw)
    rigs.append(rig)
    return rig


def _clicks(rig: Rig, offsets: Offsets, partition: int, events: list[tuple[str, str, int]], etype: str = "click"):
    """One partition's records of (user, item, ts) events."""
    kind = "purchases" if etype == "purchase" else "clicks"
    return offsets.records(rig.tp(kind, partition), [(u.encode(), event_value(u, i, ts, etype)) for u, i, ts in events],
                           T0)


def _handle(rig: Rig, batch, generation: int) -> None:
    """One batch, and every batch in flight finished (delivered, written, acked) before the loop ends."""
    async def run() -> None:
        await rig.pipeline.handle(batch, generation)
        await asyncio.wait_for(rig.pipeline.drain(), 60)

    asyncio.run(run())


def _outputs(rig: Rig) -> list:
    """Each batch's outgoing records, through whichever path the rig's guarantee takes."""
    return rig.sink.sent if rig.pipeline.exactly_once else rig.sink.submitted


def _acked(rig: Rig) -> list[tuple]:
    return [(tp.topic, tp.partition, tuple(offs)) for tp, offs in rig.app.consumer.acks]


def test_valid_events_each_get_an_answer_and_the_states_of_an_offline_step(rigs) -> None:
    rig, offsets = _rig(rigs), Offsets()
    batch = [_clicks(rig, offsets, 0, [("a", "i1", T0), ("b", "i2", T0 + 1), ("a", "i5", T0 + 2)]),
             _clicks(rig, offsets, 1, [("c", "i7", T0 + 3), ("c", "i3", T0 + 4)])]
    _handle(rig, batch, 1)

    offline = Offline.like(rig)
    offline.step(decoded(rig, batch))
    sent = rig.sink.submitted
    assert len(sent) == 1
    answers = [(k, answer(v)) for p in sorted(sent[0].recommendations) for k, v in sent[0].recommendations[p]]
    assert answers == offline.outputs  # one per event, the partitions' events in order
    assert sorted(sent[0].recommendations) == [0, 1] and not sent[0].dlq
    states = rig.store.states()
    assert set(states) == {b"a", b"b", b"c"}
    for key, st in states.items():
        same_state(st, offline.state(key))
    assert set(rig.store.data[0]) == {b"a", b"b"} and set(rig.store.data[1]) == {b"c"}
    # the changelog carries exactly what was written locally
    assert {k: v for p in sent[0].changelog for k, v in sent[0].changelog[p]} == \
        {k: v for part in rig.store.data.values() for k, v in part.items()}
    assert _acked(rig) == [(rig.names.clicks, 0, (0, 1, 2)), (rig.names.clicks, 1, (0, 1))]
    assert rig.sample("gruflow_recommendations_out_total") == 5
    assert rig.sample("gruflow_events_in_total", topic="clicks", event_type="click") == 5
    # delivery, then the local write, then the acks
    kinds = [entry[0] for entry in rig.journal]
    assert kinds == ["submit", "deliver", "write", "write", "ack", "ack"]
    assert rig.store.changelog_marks == [({0: 1, 1: 0}, False)]


def test_bad_records_go_to_the_dead_letter_topic_with_their_reason_and_are_acked(rigs) -> None:
    rig, offsets = _rig(rigs), Offsets()
    good = event_value("a", "i1", T0)
    bad = {
        NOT_JSON: (b"a", b"{not json"),
        KEY_MISMATCH: (b"someone-else", event_value("a", "i2", T0 + 1)),
        WRONG_TOPIC: (b"a", event_value("a", "i3", T0 + 2, "purchase")),  # a purchase on the clicks topic
    }
    batch = [offsets.records(rig.tp("clicks"), [bad[NOT_JSON], (b"a", good), bad[KEY_MISMATCH], bad[WRONG_TOPIC]],
                             T0)]
    _handle(rig, batch, 1)

    out = rig.sink.submitted[0]
    dead = out.dlq[0]
    assert [(k, v) for k, v, _ in dead] == [bad[NOT_JSON], bad[KEY_MISMATCH], bad[WRONG_TOPIC]]  # original bytes
    headers = [dict(h) for _, _, h in dead]
    assert [h["gruflow-reason"].decode() for h in headers] == [NOT_JSON, KEY_MISMATCH, WRONG_TOPIC]
    assert [int(h["gruflow-offset"]) for h in headers] == [0, 2, 3]
    assert all(h["gruflow-topic"].decode() == rig.names.clicks and h["gruflow-detail"] for h in headers)
    for reason in bad:
        assert rig.sample("gruflow_dlq_total", reason=reason) == 1
    # the one good event is answered and stored; every offset, bad ones included, is acked
    assert [k for k, _ in out.recommendations[0]] == [b"a"]
    offline = Offline.like(rig)
    offline.step(decoded(rig, batch))
    same_state(rig.store.states()[b"a"], offline.state(b"a"))
    assert _acked(rig) == [(rig.names.clicks, 0, (0, 1, 2, 3))]


def test_a_batch_of_only_bad_records_is_acked_with_nothing_stored(rigs) -> None:
    rig, offsets = _rig(rigs), Offsets()
    batch = [offsets.records(rig.tp("clicks"), [(b"a", b"[1, 2]"), (None, b"")], T0)]
    _handle(rig, batch, 1)
    assert len(rig.sink.submitted[0].dlq[0]) == 2 and not rig.sink.submitted[0].recommendations
    assert rig.store.states() == {}
    assert _acked(rig) == [(rig.names.clicks, 0, (0, 1))]
    assert sum(rig.sample("gruflow_dlq_total", reason=r) for r in ("not_object", "not_json", "key_mismatch",
                                                                    "missing_field")) == 2


@pytest.mark.parametrize("change", ["generation", "should_stop"])
def test_a_rebalance_during_the_computation_drops_the_batch_unwritten_and_unacked(rigs, change) -> None:
    rig, offsets = _rig(rigs), Offsets()
    batch = [_clicks(rig, offsets, 0, [("a", "i1", T0), ("a", "i2", T0 + 1)])]
    compute = rig.pipeline._compute

    def compute_then_rebalance(*args):
        result = compute(*args)
        if change == "generation":
            rig.app.consumer_generation_id = 2
        else:
            rig.app.should_stop = True
        return result

    rig.pipeline._compute = compute_then_rebalance  # type: ignore[method-assign]
    _handle(rig, batch, 1)
    assert rig.sink.submitted == [] and rig.store.states() == {} and rig.app.consumer.acks == []
    assert rig.sample("gruflow_recommendations_out_total") == 0

    if change == "generation":  # the new owner (here: the same worker, next generation) processes it again
        rig.pipeline._compute = compute  # type: ignore[method-assign]
        _handle(rig, batch, 2)
        offline = Offline.like(rig)
        offline.step(decoded(rig, batch))
        same_state(rig.store.states()[b"a"], offline.state(b"a"))
        assert _acked(rig) == [(rig.names.clicks, 0, (0, 1))]


def test_exactly_once_sends_into_the_transaction_then_writes_then_acks(rigs) -> None:
    rig, offsets = _rig(rigs, exactly_once=True), Offsets()
    batch = [_clicks(rig, offsets, 0, [("a", "i1", T0), ("b", "i4", T0 + 1)]),
             _clicks(rig, offsets, 1, [("c", "i2", T0 + 2)]),
             offsets.records(rig.tp("clicks", 1), [(b"c", b"nope")], T0)]
    _handle(rig, batch, 1)

    assert rig.sink.submitted == [] and len(rig.sink.sent) == 1
    assert [e[0] for e in rig.journal] == ["send", "write", "write", "ack", "ack", "ack"]
    offline = Offline.like(rig)
    offline.step(decoded(rig, batch))
    for key, st in rig.store.states().items():
        same_state(st, offline.state(key))
    sent = rig.sink.sent[0]
    assert [(k, answer(v)) for p in sorted(sent.recommendations) for k, v in sent.recommendations[p]] == offline.outputs
    assert [k for k, _, _ in sent.dlq[1]] == [b"c"]
    assert _acked(rig) == [(rig.names.clicks, 0, (0, 1)), (rig.names.clicks, 1, (0,)),
                           (rig.names.clicks, 1, (1,))]
    # the changelog offsets persist with the transaction's commit: the highest of each partition
    assert rig.store.changelog_marks == [({0: 1, 1: 0}, True)]
    assert rig.sample("gruflow_dlq_total", reason=NOT_JSON) == 1


@pytest.mark.parametrize("change", ["generation", "flow_stopped", "should_stop"])
def test_exactly_once_a_rebalance_before_the_send_sends_nothing(rigs, change) -> None:
    rig, offsets = _rig(rigs, exactly_once=True), Offsets()
    batch = [_clicks(rig, offsets, 0, [("a", "i1", T0)])]

    async def scenario() -> None:
        lock = rig.app.consumer.commit_lock
        await lock.acquire()  # a revocation holds the commit lock
        task = asyncio.ensure_future(rig.pipeline.handle(batch, 1))
        deadline = time.monotonic() + 60
        while not rig.pipeline.stream_time_ms:  # computed and staged: now it waits for the lock
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.01)
        if change == "generation":
            rig.app.consumer_generation_id = 2
        elif change == "flow_stopped":
            rig.app.consumer.flow_active = False
        else:
            rig.app.should_stop = True
        lock.release()
        await asyncio.wait_for(task, 60)

    asyncio.run(scenario())
    assert rig.sink.sent == [] and rig.store.states() == {} and rig.app.consumer.acks == []
    assert rig.store.changelog_marks == [] and rig.sample("gruflow_recommendations_out_total") == 0


def test_a_pipelined_batch_sees_the_state_of_the_batch_still_in_flight(rigs) -> None:
    rig, offsets = _rig(rigs, auto_deliver=False), Offsets()
    first = [_clicks(rig, offsets, 0, [("a", "i1", T0), ("b", "i2", T0 + 1)])]
    second = [_clicks(rig, offsets, 0, [("a", "i6", T0 + 2)])]
    offline = Offline.like(rig)

    async def scenario() -> None:
        await rig.pipeline.handle(first, 1)
        await rig.pipeline.handle(second, 1)
        # nothing delivered yet: nothing stored, nothing acked, yet the second batch continued user a
        assert rig.store.states() == {} and rig.app.consumer.acks == []
        offline.step(decoded(rig, first))
        offline.step(decoded(rig, second))
        out2 = rig.sink.submitted[1]
        assert [(k, answer(v)) for k, v in out2.recommendations[0]] == offline.outputs[2:]
        (key, raw), = out2.changelog[0]
        assert key == b"a"
        same_state(decode(raw), offline.state(b"a"))
        # requests read through the overlay too
        same_state(rig.pipeline.read_states(0, [b"a"])[b"a"], offline.state(b"a"))
        # the second batch is delivered first: it still waits for the first, so the order stays
        rig.sink.deliver(1)
        await asyncio.sleep(0.05)
        assert rig.app.consumer.acks == [] and rig.store.states() == {}
        rig.sink.deliver(0)
        await asyncio.wait_for(rig.pipeline.drain(), 60)

    asyncio.run(scenario())
    assert _acked(rig) == [(rig.names.clicks, 0, (0, 1)), (rig.names.clicks, 0, (2,))]
    writes = [e for e in rig.journal if e[0] == "write"]
    assert writes == [("write", 0, (b"a", b"b")), ("write", 0, (b"a",))]
    for key in (b"a", b"b"):
        same_state(rig.store.states()[key], offline.state(key))
    assert rig.pipeline.view.overlay == {}  # every in-flight state is in the store now


@pytest.mark.parametrize("exactly_once", [False, True])
def test_a_forget_request_tombstones_the_user(rigs, exactly_once) -> None:
    rig, offsets = _rig(rigs, exactly_once=exactly_once), Offsets()
    control = rig.tp("control", 0)

    async def scenario() -> None:
        await rig.pipeline.handle([_clicks(rig, offsets, 0, [("a", "i1", T0), ("b", "i2", T0 + 1)])], 1)
        key, value = forget_request("a")
        noise = (b"b", orjson.dumps({"action": "something else"}))  # not a request: ignored
        await rig.pipeline.handle([offsets.records(control, [(key, value), noise], T0)], 1)
        await rig.pipeline.drain()

    asyncio.run(scenario())
    out = _outputs(rig)[1]
    assert out.changelog[0] == [(b"a", None)] and not out.recommendations
    assert set(rig.store.states()) == {b"b"}
    assert rig.sample("gruflow_forgotten_users_total") == 1
    assert _acked(rig)[-1] == (control.topic, 0, (0, 1))


def _two_batches_in_flight(rig: Rig, offsets: Offsets) -> tuple[list, list]:
    """Two batches of one user, one event each (the sink delivers neither until the test says)."""
    return [_clicks(rig, offsets, 0, [("a", "i1", T0)])], [_clicks(rig, offsets, 0, [("a", "i2", T0 + 1)])]


def test_a_rebalance_before_delivery_writes_and_acks_nothing_of_the_batches_in_flight(rigs) -> None:
    rig, offsets = _rig(rigs, auto_deliver=False), Offsets()
    first, second = _two_batches_in_flight(rig, offsets)

    async def scenario() -> None:
        for batch in (first, second):
            await rig.pipeline.handle(batch, 1)
        rig.app.consumer_generation_id = 2
        rig.sink.deliver(0)
        rig.sink.deliver(1)
        await asyncio.wait_for(rig.pipeline.drain(), 60)
        assert rig.store.states() == {} and rig.app.consumer.acks == [] and rig.pipeline.view.overlay == {}
        # the new generation reads both batches again from the committed offsets, as one
        await rig.pipeline.handle(first + second, 2)
        rig.sink.deliver(2)
        await asyncio.wait_for(rig.pipeline.drain(), 60)

    asyncio.run(scenario())
    offline = Offline.like(rig)
    offline.step(decoded(rig, first + second))
    same_state(rig.store.states()[b"a"], offline.state(b"a"))
    assert _acked(rig) == [(rig.names.clicks, 0, (0,)), (rig.names.clicks, 0, (1,))]
    assert rig.sample("gruflow_recommendations_out_total") == 2


def test_an_undelivered_batch_fails_the_worker_with_nothing_of_it_or_later_batches_acked(rigs) -> None:
    rig, offsets = _rig(rigs, auto_deliver=False), Offsets()
    first, second = _two_batches_in_flight(rig, offsets)

    async def scenario() -> None:
        for batch in (first, second):
            await rig.pipeline.handle(batch, 1)
        rig.sink.fail(0, ConnectionError("broker gone"))
        rig.sink.deliver(1)
        with pytest.raises(SinkError, match="broker gone"):
            await asyncio.wait_for(rig.pipeline.drain(), 60)
        with pytest.raises(SinkError):  # the batch loop stops: the worker crashes and restarts
            await rig.pipeline.handle([_clicks(rig, offsets, 0, [("b", "i3", T0 + 2)])], 1)
        with pytest.raises(SinkError, match="broker gone"):  # the batch after it fails with it, unwritten
            await asyncio.wait_for(rig.pipeline.drain(), 60)

    asyncio.run(scenario())
    assert rig.store.states() == {} and rig.app.consumer.acks == []
    assert len(rig.sink.submitted) == 2


def test_a_batch_delivered_again_after_a_restart_is_not_applied_twice(rigs) -> None:
    rig, offsets = _rig(rigs), Offsets()
    batch = [_clicks(rig, offsets, 0, [("a", "i1", T0), ("a", "i2", T0 + 1)])]

    async def scenario() -> None:
        await rig.pipeline.handle(batch, 1)
        await rig.pipeline.drain()
        rig.app.consumer_generation_id = 2  # stored and sent, but its acks were never committed
        await rig.pipeline.handle(batch, 2)
        await rig.pipeline.drain()

    asyncio.run(scenario())
    offline = Offline.like(rig)
    offline.step(decoded(rig, batch))
    same_state(rig.store.states()[b"a"], offline.state(b"a"))
    assert len(rig.sink.submitted) == 2 and _acked(rig)[0] == _acked(rig)[1]


def test_a_forget_request_wins_over_events_of_the_same_batch(rigs) -> None:
    rig, offsets = _rig(rigs), Offsets()
    key, value = forget_request("a")
    batch = [_clicks(rig, offsets, 0, [("a", "i1", T0), ("b", "i2", T0 + 1)]),
             offsets.records(rig.tp("control", 0), [(key, value)], T0)]

    async def scenario() -> None:
        await rig.pipeline.handle(batch, 1)
        await rig.pipeline.drain()

    asyncio.run(scenario())
    out = rig.sink.submitted[0]
    assert [k for k, _ in out.recommendations[0]] == [b"a", b"b"]  # each event is still answered
    assert out.changelog[0][-1] == (b"a", None)  # after the state the events made
    assert set(rig.store.states()) == {b"b"}


@pytest.mark.parametrize("exactly_once", [False, True])
def test_an_idle_user_is_evicted_by_event_time_and_an_active_one_kept(rigs, exactly_once) -> None:
    ttl_s = 60.0
    rig, offsets = _rig(rigs, state_ttl_s=ttl_s, exactly_once=exactly_once), Offsets()
    late = T0 + int(2 * ttl_s * 1000)

    async def scenario() -> None:
        await rig.pipeline.handle([_clicks(rig, offsets, 0, [("idle", "i1", T0), ("back", "i2", T0 + 1)])], 1)
        await rig.pipeline.handle([_clicks(rig, offsets, 0, [("busy", "i3", late)])], 1)
        await rig.pipeline.drain()
        await rig.pipeline.scan_for_evictions()
        # both older than the TTL; "back" returns in the next batch of the partition, which evicts "idle"
        assert rig.pipeline.ttl.candidates == {0: {b"idle", b"back"}}
        await rig.pipeline.handle([_clicks(rig, offsets, 0, [("back", "i4", late + 1)])], 1)
        await rig.pipeline.drain()

    asyncio.run(scenario())
    out = _outputs(rig)[-1]
    assert (b"idle", None) in out.changelog[0]
    assert set(rig.store.states()) == {b"back", b"busy"}
    assert rig.sample("gruflow_state_evictions_total") == 1
    assert rig.pipeline.ttl.candidates == {}
