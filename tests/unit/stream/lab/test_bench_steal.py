"""What the bench reads of the machine: steal time (/proc/stat), the share of the CPUs a VM's host took
during a run, the processor's name and SIMD features (/proc/cpuinfo), and the worker's own calibration line."""

from __future__ import annotations

import sys
import time

import pytest

from stream.lab.bench_machine import StealMeter, cpu_flags, cpu_model, steal_s
from stream.tools.harness import label_value, scrape


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_steal_time_is_read_and_only_grows():
    first = steal_s()
    assert first is not None and first >= 0.0
    meter = StealMeter().start()
    time.sleep(0.05)
    stolen = meter.stop()
    assert stolen is not None and 0.0 <= stolen <= 64.0  # CPUs: never more than the machine has
    assert steal_s() >= first


def test_no_proc_stat_gives_none(monkeypatch):
    import stream.lab.bench_machine as machine

    monkeypatch.setattr(machine, "steal_s", lambda: None)
    assert machine.StealMeter().start().stop() is None


def test_cpu_model_is_the_first_model_name(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Some CPU 9000\n\n"
                    "processor\t: 1\nmodel name\t: Another CPU\n")
    assert cpu_model(str(info)) == "Some CPU 9000"
    info.write_text("processor\t: 0\nmodel name\t:\n")  # present but empty: unknown
    assert cpu_model(str(info)) is None
    assert cpu_model(str(tmp_path / "missing")) is None


def test_cpu_flags_say_which_simd_features_the_first_processor_has(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx avx2 fma\n\n"
                    "processor\t: 1\nflags\t\t: avx512f avx512_vnni\n")
    flags = cpu_flags(str(info))
    assert flags["avx2"] and not flags["avx512f"] and not flags["avx512_vnni"] and not flags["neon"]
    info.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")  # Arm names them Features
    flags = cpu_flags(str(info))
    assert flags["asimddp"] and not flags["avx2"]
    assert cpu_flags(str(tmp_path / "missing")) is None


def test_an_info_label_is_scraped_from_a_metrics_endpoint():
    from prometheus_client import CollectorRegistry, Info, start_http_server

    from stream.kafka.broker_setup import free_port

    registry = CollectorRegistry()
    Info("gruflow_scorer", "top-K path", registry=registry).info({"path": "int8"})
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        samples = scrape(f"http://127.0.0.1:{port}")
        assert label_value(samples, "gruflow_scorer_info", "path") == "int8"
        assert label_value(samples, "gruflow_missing_info", "path") is None
    finally:
        server.shutdown()
        thread.join(5)
    with pytest.raises(OSError):  # nothing listening
        scrape(f"http://127.0.0.1:{port}")


def test_the_workers_own_calibration_line_is_read_from_its_log(tmp_path) -> None:
    from stream.lab.bench_runs import calibration_line

    log = tmp_path / "worker.log"
    assert calibration_line(log) is None  # no log (the worker never started)
    log.write_text("2026-12-07 14:36:01,5 INFO gruflow.worker: event loop: uvloop.Loop\n"
                   "2026-12-07 14:36:04,1 INFO gruflow.topk: top-K path for model version 1 (1000000 items, k=20): "
                   "float32; rows/s of one thread on 64 probe states: float32 5,391, compiled 1,200 (0.91 s)\n")
    assert calibration_line(log) == ("top-K path for model version 1 (1000000 items, k=20): float32; rows/s of one "
                                     "thread on 64 probe states: float32 5,391, compiled 1,200 (0.91 s)")
