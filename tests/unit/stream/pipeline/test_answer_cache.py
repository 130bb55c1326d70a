"""The kept lists of requests: a list answers only under the stamp it was ranked with, while young enough, for
at most its own length; the least recently used users leave first."""

from __future__ import annotations

import sys
import threading

import numpy as np

from stream.pipeline.answer_cache import AnswerCache, FinalLists, Stamp

STAMP = Stamp(model_id=7, model_version=2, catalogue_version=0, generation=3)


def _lists(keys: list[bytes], stamp: Stamp | None = STAMP, k: int = 4) -> FinalLists:
    n = len(keys)
    rows = np.arange(n * k, dtype=np.int64).reshape(n, k)
    rows[:, -1] = -2  # a padded slot (the stream's PAD) ends the list
    return FinalLists(keys, rows, np.ones((n, k), dtype=np.float32), None, np.array([True] * n), stamp)


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_list_answers_under_its_own_stamp_only() -> None:
    cache = AnswerCache(10, 60.0)
    cache.remember(_lists([b"a", b"b"]))
    got = cache.get(b"a", STAMP, 4)
    assert got is not None and got.rows.tolist() == [0, 1, 2, -1] and got.cold_start is False
    for other in (Stamp(8, 2, 0, 3), Stamp(7, 3, 0, 3), Stamp(7, 2, 1, 3), Stamp(7, 2, 0, 4)):
        assert cache.get(b"b", other, 4) is None
    assert len(cache) == 1  # the stale entry went


def test_age_length_and_capacity_bound_what_answers() -> None:
    clock = Clock()
    cache = AnswerCache(2, 30.0, clock)
    cache.remember(_lists([b"a", b"b"]))
    assert cache.get(b"a", STAMP, 5) is None and cache.get(b"a", STAMP, 4) is not None  # k beyond the list
    cache.remember(_lists([b"c"]))  # "b" is the least recently used now
    assert cache.get(b"b", STAMP, 1) is None and cache.get(b"a", STAMP, 1) is not None
    clock.now += 31
    assert cache.get(b"a", STAMP, 1) is None and cache.get(b"c", STAMP, 1) is None


def test_forget_clear_unstamped_and_disabled() -> None:
    cache = AnswerCache(10, 60.0)
    cache.remember(_lists([b"a", b"b", b"c"]))
    cache.forget([b"a", b"zzz"])
    assert cache.get(b"a", STAMP, 1) is None and cache.get(b"b", STAMP, 1) is not None
    cache.clear()
    assert len(cache) == 0
    cache.remember(_lists([b"a"], stamp=None))
    assert len(cache) == 0  # the worker stamps what it keeps
    for off in (AnswerCache(0, 60.0), AnswerCache(10, 0.0)):
        off.remember(_lists([b"a"]))
        assert not off.enabled and off.get(b"a", STAMP, 1) is None


def test_a_state_deleted_by_the_same_batch_takes_its_list_with_it() -> None:
    cache = AnswerCache(10, 60.0)
    cache.remember(_lists([b"a", b"b"]))
    cache.remember(_lists([b"b", b"c"]), deleted=[b"a", b"c"])  # forgotten/evicted after the batch's own writes
    assert [key for key in (b"a", b"b", b"c") if cache.get(key, STAMP, 1) is not None] == [b"b"]


def test_the_streams_writes_and_the_requests_reads_may_run_in_two_threads() -> None:
    """The stream's loop keeps lists while the requests' thread reads them, and drops those under an older
    stamp: neither sees a half-done change (a KeyError, an OrderedDict mutated while it is walked)."""
    cache = AnswerCache(capacity=64, max_age_s=60.0)
    keys = [f"u{i}".encode() for i in range(200)]
    newer = Stamp(model_id=7, model_version=3, catalogue_version=0, generation=3)
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                for key in keys:
                    entry = cache.get(key, STAMP, 3)
                    assert entry is None or entry.stamp == STAMP
                    cache.get(key, newer, 3)  # drops a list kept under STAMP
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(300):
            cache.remember(_lists(keys[i % 150:i % 150 + 50]), deleted=keys[:i % 7])
    finally:
        stop.set()
        reader.join(10)
    assert errors == []
    assert len(cache) <= 64


def test_a_batchs_lists_and_deletions_land_as_one_change() -> None:
    """A reader between the lists and the deletions of one ``remember`` would see a user the batch forgot:
    each batch here keeps one user and forgets the other, so a reader never sees two."""
    cache = AnswerCache(capacity=8, max_age_s=60.0)
    cache.remember(_lists([b"x"]))
    seen: list[int] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(len(cache))

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the interpreter over as often as it can
    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(3000):
            keep, gone = (b"y", b"x") if i % 2 == 0 else (b"x", b"y")
            cache.remember(_lists([keep]), deleted=[gone])
    finally:
        stop.set()
        reader.join(10)
        sys.setswitchinterval(switch)
    assert seen and max(seen) == 1


def test_a_batch_beyond_the_capacity_keeps_its_last_users() -> None:
    cache = AnswerCache(capacity=3, max_age_s=60.0)
    keys = [f"u{i}".encode() for i in range(5)]
    cache.remember(_lists(keys))
    kept = [key for key in keys if cache.get(key, STAMP, 1) is not None]
    assert kept == keys[2:]
    got = cache.get(b"u4", STAMP, 4)
    assert got is not None and got.rows.tolist() == [16, 17, 18, -1]


def test_because_is_kept_per_user_and_another_list_length_starts_afresh() -> None:
    cache = AnswerCache(capacity=100, max_age_s=60.0)
    with_because = _lists([b"a", b"b"])
    because = np.arange(2 * 4 * 2, dtype=np.int32).reshape(2, 4, 2)
    cache.remember(FinalLists(with_because.keys, with_because.rows, with_because.scores, because,
                              np.array([True, False]), STAMP))
    cache.remember(_lists([b"c"]))  # a batch without attributions
    a, b, c = (cache.get(key, STAMP, 4) for key in (b"a", b"b", b"c"))
    assert a is not None and a.because is not None and a.because.tolist() == because[0].tolist()
    assert b is not None and b.cold_start and b.because is not None and b.because.tolist() == because[1].tolist()
    assert c is not None and c.because is None and not c.cold_start
    cache.remember(_lists([f"n{i}".encode() for i in range(70)]))  # grows past its first rows
    assert cache.get(b"a", STAMP, 4) is not None and len(cache) == 73
    cache.remember(_lists([b"d"], k=6))
    assert len(cache) == 1 and cache.get(b"a", STAMP, 1) is None
    d = cache.get(b"d", STAMP, 6)
    assert d is not None and d.rows.tolist() == [0, 1, 2, 3, 4, -1]
