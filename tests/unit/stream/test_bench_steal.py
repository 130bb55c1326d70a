"""The bench's steal-time reading (/proc/stat): the share of the CPUs a VM's host took during a run."""

from __future__ import annotations

import sys
import time

import pytest

from stream.bench import _StealMeter, _steal_s


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_steal_time_is_read_and_only_grows():
    first = _steal_s()
    assert first is not None and first >= 0.0
    meter = _StealMeter().start()
    time.sleep(0.05)
    stolen = meter.stop()
    assert stolen is not None and 0.0 <= stolen <= 64.0  # CPUs: never more than the machine has
    assert _steal_s() >= first


def test_no_proc_stat_gives_none(monkeypatch):
    import stream.bench as bench

    monkeypatch.setattr(bench, "_steal_s", lambda: None)
    assert bench._StealMeter().start().stop() is None
