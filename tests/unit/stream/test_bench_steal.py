"""What the bench reads of the machine: steal time (/proc/stat), the share of the CPUs a VM's host took
during a run, and the processor's name (/proc/cpuinfo)."""

from __future__ import annotations

import sys
import time

import pytest

from stream.bench import _StealMeter, _cpu_model, _steal_s


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


def test_cpu_model_is_the_first_model_name(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Some CPU 9000\n\n"
                    "processor\t: 1\nmodel name\t: Another CPU\n")
    assert _cpu_model(str(info)) == "Some CPU 9000"
    info.write_text("processor\t: 0\nmodel name\t:\n")  # present but empty: unknown
    assert _cpu_model(str(info)) is None
    assert _cpu_model(str(tmp_path / "missing")) is None
