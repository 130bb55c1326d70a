"""``gruflow_consumer_lag_messages`` is the committed lag: what KEDA and the lag alert act on."""

from __future__ import annotations

from stream.worker.upkeep import committed_lag


def test_lag_counts_from_the_committed_offset_not_the_read_position() -> None:
    # a worker that read everything but whose commits stopped at 100 is 900 behind, not 0
    assert committed_lag({"clicks-0": 1000}, {"clicks-0": 100}) == 900


def test_lag_sums_partitions_and_counts_unknown_ends_as_zero() -> None:
    ends = {"clicks-0": 50, "clicks-1": 70, "purchases-0": None}
    assert committed_lag(ends, {"clicks-0": 50, "clicks-1": 20, "purchases-0": 3}) == 50


def test_a_partition_without_a_commit_counts_from_its_start() -> None:
    assert committed_lag({"clicks-0": 40}, {"clicks-0": None}) == 40
    assert committed_lag({"clicks-0": 40}, {}) == 40
