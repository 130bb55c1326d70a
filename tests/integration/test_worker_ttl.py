"""TTL eviction (GRUFLOW_STATE_TTL_S > 0): idle users leave the state table and its changelog.

The TTL runs on EVENT time: users whose newest event is more than the TTL older than the newest event
the worker has seen are listed by a periodic scan and deleted, with a changelog tombstone, by the next
batch of their partition. So the test sends "old" users, then users minutes later in event time on
every partition, then keeps sending small rounds of fresh users to every partition (the "later batch"
of each partition) until the worker reports the evictions.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import rocksdict
from aiokafka.partitioner import murmur2

from stream.worker.app import table_dir
from stream.kafka.topics import STATE_TABLE_NAME, changelog_topic, ensure_topics
from workerkit import Ev, TopicReader, WorkerProc, make_events, produce, read_states, save_tiny_model

pytestmark = pytest.mark.integration

TTL_S = 30.0  # event time; the worker scans every max(1, min(60, TTL / 10)) s of wall time
PARTITIONS = 3


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return save_tiny_model(tmp_path / "tiny.gfc")


def partition_of(user: str, partitions: int) -> int:
    """The partition of a user's events and state (murmur2, like the producers and faust)."""
    return (murmur2(user.encode()) & 0x7FFFFFFF) % partitions


def one_event_per_partition(prefix: str, ts: int, partitions: int) -> list[Ev]:
    """One event each for fresh users, at least one user on every partition."""
    out: list[Ev] = []
    covered: set[int] = set()
    i = 0
    while covered != set(range(partitions)):
        user = f"{prefix}{i}"
        p = partition_of(user, partitions)
        if p not in covered:
            covered.add(p)
            out.append(Ev(user, f"i{i % 50}", ts + i))
        i += 1
    return out


def settled(worker: WorkerProc) -> tuple[float, float]:
    """(state_entries, batches processed) once the gauge, refreshed every 2 s, stopped moving."""
    last = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = (worker.metric("gruflow_state_entries"), worker.metric("gruflow_batch_size_events_count"))
        if now == last:
            return now
        last = now
        time.sleep(2.5)
    raise AssertionError(f"state_entries / batches still moving after 30 s: {last}")


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_ttl_eviction_removes_idle_users_from_the_table_and_its_changelog(kafka, tmp_path: Path, model_path: Path,
                                                                          guarantee: str) -> None:
    exactly_once = guarantee == "exactly_once"
    settings = kafka.settings(partitions=PARTITIONS, state_ttl_s=TTL_S, processing_guarantee=guarantee)
    ensure_topics(settings)
    t0 = int(time.time() * 1000) - 3_600_000
    # one event per user: each user is written to RocksDB once (see the state_entries check below)
    old = make_events(n_users=12, per_user=1, seed=21, t0=t0, prefix="old")
    recent = make_events(n_users=12, per_user=1, seed=22, t0=t0 + 300_000, prefix="recent")
    old_users = {e.user for e in old}
    assert {partition_of(u, PARTITIONS) for u in old_users} == set(range(PARTITIONS)), "old users miss a partition"
    assert {partition_of(e.user, PARTITIONS) for e in recent} == set(range(PARTITIONS)), \
        "recent users miss a partition"
    reader: TopicReader | None = TopicReader(settings, settings.topic("recommendations"),
                                             read_committed=exactly_once)
    worker = WorkerProc(kafka, settings, model_path, tmp_path, name=f"ttl-{guarantee}")
    try:
        with worker:
            produce(settings, old)
            reader.poll_until(lambda c: {(e.user, e.ts) for e in old} <= set(c.answered()), 90, "old users' answers")
            assert old_users <= set(read_states(settings, read_committed=exactly_once)), "old users never stored"
            assert worker.metric("gruflow_state_evictions_total") == 0, "evicted before any user was idle"

            produce(settings, recent)
            sent = list(recent)
            reader.poll_until(lambda c: {(e.user, e.ts) for e in recent} <= set(c.answered()), 90,
                              "recent users' answers")
            entries_before, batches_before = settled(worker)
            assert entries_before >= len(old_users) + len(recent), f"state_entries {entries_before} before eviction"
            # every partition gets later batches until the scan has run and those batches deleted the
            # old users; each round moves event time by 1 s only, far less than the TTL
            deadline = time.monotonic() + 120
            rounds = 0
            while worker.metric("gruflow_state_evictions_total") < len(old_users):
                assert time.monotonic() < deadline, \
                    f"old users not evicted after {rounds} rounds:\n{worker.log_tail()}"
                rounds += 1
                poke = one_event_per_partition(f"poke{rounds}-", t0 + 300_000 + 1000 * rounds, PARTITIONS)
                produce(settings, poke)
                sent += poke
                reader.poll_until(lambda c: {(e.user, e.ts) for e in poke} <= set(c.answered()), 60,
                                  f"answers of round {rounds}")
                time.sleep(1.0)
            entries_after, batches_after = settled(worker)
            evicted = worker.metric("gruflow_state_evictions_total")
            # state_entries is RocksDB's key estimate: every put counts (users written since, and faust's
            # offset record, rewritten at most once per partition per batch) and every delete takes one
            # off; so the evictions must show up as at least this drop
            added = (len(sent) - len(recent)) + PARTITIONS * (batches_after - batches_before)
            assert entries_after <= entries_before + added - len(old_users), \
                f"state_entries {entries_before} -> {entries_after} after {len(old_users)} evictions " \
                f"and at most {added} writes"
        assert evicted == len(old_users), f"{evicted} evictions, {len(old_users)} idle users"
        alive = {e.user for e in sent}

        # the local table (the worker has stopped): exactly the users that are alive
        local: set[str] = set()
        for p in range(PARTITIONS):
            (path,) = Path(table_dir(settings)).rglob(f"{STATE_TABLE_NAME}-{p}.db")
            db = rocksdict.Rdict(str(path), options=rocksdict.Options(raw_mode=True),
                                 access_type=rocksdict.AccessType.read_only())
            try:
                local |= {k.decode() for k in db.keys() if not k.startswith(b"__faust")}
            finally:
                db.close()
        assert local == alive, f"local table: stale {sorted(local - alive)[:5]}, missing {sorted(alive - local)[:5]}"

        reader.close()  # the changelog reader below joins the same reader group
        reader = None

        # the changelog: old users end with a tombstone, recent users keep their state
        states = read_states(settings, read_committed=exactly_once)
        assert not old_users & set(states), f"still in the changelog: {sorted(old_users & set(states))[:5]}"
        assert alive <= set(states), f"recent users lost: {sorted(alive - set(states))[:5]}"
        changelog = TopicReader(settings, changelog_topic(settings), read_committed=exactly_once)
        try:
            changelog.poll_until(lambda c: old_users <= {m.key().decode() for m in c.messages if m.value() is None},
                                 30, "a tombstone for every old user")
        finally:
            changelog.close()
    finally:
        worker.kill()
        if reader is not None:
            reader.close()
