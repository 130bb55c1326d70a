"""The shared harness reads a real health server: the one the worker and the trainer both use
(stream/observe/web.py), here served from its own thread as the trainer serves it."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stream.observe.metrics import Metrics
from stream.observe.web import WebServerThread
from stream.tools import harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scrape_and_readiness_against_the_threaded_health_server() -> None:
    metrics = Metrics.create(role="trainer")
    metrics.finetune_rounds.inc(3)
    state = {"ok": False}
    port = _free_port()
    server = WebServerThread(metrics, lambda: (state["ok"], "ready" if state["ok"] else "not ready"), "127.0.0.1", port)
    server.start()
    try:
        url = f"http://127.0.0.1:{port}"
        assert harness.http_get(url + "/livez") == (200, "ok\n")
        assert not harness.is_ready(url) and harness.http_get(url + "/readyz") == (503, "not ready\n")
        state["ok"] = True
        assert harness.is_ready(url)
        samples = harness.scrape(url)
        assert harness.total(samples, "gruflow_finetune_rounds_total") == 3
        assert "gruflow_ready" not in {name for name, _ in samples}  # a trainer family set has no ready gauge
    finally:
        server.stop()
    with pytest.raises(OSError):
        harness.scrape(f"http://127.0.0.1:{port}")


def test_a_process_that_exits_is_not_ready_and_says_why(tmp_path: Path) -> None:
    proc = harness.GruflowProcess(["no-such-command"], {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)},
                                  _free_port(), tmp_path / "p.log")
    with pytest.raises(harness.NotReady, match="exited with 2"):
        proc.start(timeout=60)
    assert "invalid choice" in (tmp_path / "p.log").read_text()
    assert proc.stop() == 2


def test_stop_process_terminates() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert harness.stop_process(proc, grace_s=10) == -15
    assert harness.stop_process(None) is None


def test_label_value_and_total_select_by_labels() -> None:
    samples: harness.Samples = {("m_total", (("k", "20"), ("model", "gru"))): 2.0,
                                ("m_total", (("k", "20"), ("model", "popularity"))): 5.0,
                                ("info", (("path", "int8"),)): 1.0}
    assert harness.total(samples, "m_total") == 7.0 and harness.total(samples, "m_total", model="gru") == 2.0
    assert harness.label_value(samples, "info", "path") == "int8" and harness.label_value(samples, "x", "y") is None


def test_running_totals_keep_what_dropped_series_counted() -> None:
    """The worker removes the prequential series of versions it no longer serves: totals over scrapes
    must still include them, and a series that starts again counts from 0."""
    totals = harness.RunningTotals(("e_total",))
    v = lambda version: ("e_total", (("model", "gru"), ("version", version)))  # noqa: E731
    totals.update({v("1"): 10.0})
    totals.update({v("1"): 15.0, v("2"): 4.0})
    totals.update({v("2"): 9.0, ("other_total", ()): 100.0})  # version 1's series removed
    totals.update({v("1"): 2.0, v("2"): 9.0})  # version 1 served again: a new series
    assert totals.total("e_total", model="gru") == 15 + 9 + 2
    assert totals.total("other_total") == 0.0


def test_cluster_settings_refuse_settings_that_name_no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tool that talks to a running cluster (replay, tail) says so, and how to name one, instead of starting."""
    from argparse import Namespace

    from stream.settings import Settings, SettingsError

    with pytest.raises(SettingsError) as info:
        harness.cluster_settings(Namespace(), Settings(), "replay", ", or use `gruflow demo`")
    assert str(info.value).startswith("`gruflow replay` needs a running Kafka cluster: set GRUFLOW_BOOTSTRAP_SERVERS")
    assert str(info.value).endswith("prints), or use `gruflow demo`")
    named = Settings.of(bootstrap_servers="broker-a:9092")
    assert harness.cluster_settings(Namespace(), named, "tail") is named
    monkeypatch.delenv("GRUFLOW_BOOTSTRAP_SERVERS", raising=False)
    from_args = harness.cluster_settings(Namespace(bootstrap="broker-b:9092"), None, "tail")
    assert from_args.connection.bootstrap_servers == "broker-b:9092"


def test_kafka_for_leaves_a_named_cluster_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings that name a cluster pass through unchanged, and no broker is started for them."""
    from stream.kafka import broker
    from stream.settings import Settings

    def no_broker(*args: object, **kwargs: object) -> None:
        raise AssertionError("kafka_for started a broker although the settings name a cluster")

    monkeypatch.setattr(broker.EmbeddedKafka, "start", no_broker)
    named = Settings.of(bootstrap_servers="broker-a:9092")
    with harness.kafka_for(named, quiet=True) as settings:
        assert settings is named
