"""The bench's runs against a started worker: the backlog end to end (with the raw consumer's rate),
latency at the offered rate, latency while a trainer process fine-tunes and publishes, and the latency of
``stream.lab.echo`` (a service that computes nothing) in the worker's place."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stream.lab.bench_load import (RecReader, latency_window, measured_latencies, offer_measured, percentiles,
                                   raw_consume, scrape_total, warm_up)
from stream.lab.bench_machine import StealMeter, log, peak_rss_bytes
from stream.settings import ENV_PREFIX, Settings
from stream.tools.harness import PROJECT_ROOT, GruflowProcess, label_value, scrape, stop_process


@dataclass(frozen=True)
class Backlog:
    """The backlog run's figures: the worker's sustained rate and the raw consumer's on the same topic."""

    events_per_s: float
    events: int
    cpu_steal: float | None
    raw_events_per_s: float
    worker_scorer_path: str | None
    worker_calibration: str | None  # what the worker's own calibration measured of each path (its log line)


def _start_profiler(profile: str, pid: int) -> subprocess.Popen[bytes]:
    """py-spy on the worker for 20 s of the backlog, once it is past startup and recovery."""
    time.sleep(8)  # let it get through startup and recovery
    py_spy = str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration", "20",
                             "--rate", "50", "--output", profile, "--nonblocking",
                             "--format", "flamegraph" if profile.endswith(".svg") else "raw"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def calibration_line(log_path: Path) -> str | None:
    """The worker's last calibration line (``model.topk_calibration.calibrate`` logs each path's rate), so a
    path kept against the bench's own calibration can be told apart from a slow machine."""
    marker = "top-K path for model version"
    try:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if marker in line]
    except OSError:
        return None
    return lines[-1][lines[-1].index(marker):] if lines else None


def backlog_run(args: argparse.Namespace, settings: Settings, reader: RecReader, worker: subprocess.Popen[bytes],
                n: int, work: Path) -> Backlog:
    """The worker through the backlog of ``n`` events produced before it started: events/s from the first to
    the last publication stamp; then a plain confluent-kafka consumer reads the same topics."""
    log(f"worker pid {worker.pid} started; processing the backlog ...")
    steal = StealMeter().start()
    profiler = _start_profiler(args.profile, worker.pid) if args.profile else None
    if not reader.wait_count(n, 600):
        raise RuntimeError(f"only {reader.count} of {n} recommendations arrived; worker log: {work / 'worker.log'}")
    throughput_steal = steal.stop()
    worker_scorer_path = label_value(scrape(f"http://127.0.0.1:{settings.process.web_port}"), "gruflow_scorer_info",
                                     "path")
    pub = np.asarray(reader.published, dtype=np.float64)
    span_s = (pub.max() - pub.min()) / 1000.0
    events_per_s = n / span_s if span_s > 0 else float("nan")
    log(f"throughput: {events_per_s:,.0f} events/s over {span_s:.1f} s")
    raw = raw_consume(settings, n)
    log(f"raw confluent consumer: {raw:,.0f} msg/s")
    if profiler is not None:
        profiler.wait(60)
    return Backlog(events_per_s, n, throughput_steal, raw, worker_scorer_path, calibration_line(work / "worker.log"))


def latency_run(args: argparse.Namespace, settings: Settings, reader: RecReader) -> tuple[np.ndarray, float | None]:
    """``--warmup-seconds`` of unmeasured load, then the measured window: latencies (ms) and the host's steal."""
    if args.warmup_seconds > 0:
        log(f"warm-up (not measured): {args.rate:,.0f} events/s for {args.warmup_seconds:.0f} s ...")
        warm_up(settings, reader, args, args.warmup_seconds)
    log(f"latency run: {args.rate:,.0f} events/s for {args.latency_seconds:.0f} s ...")
    return latency_window(settings, reader, args)


def start_trainer(env: dict[str, str], port: int, args: argparse.Namespace, log_path: Path,
                  cwd: Path) -> subprocess.Popen[bytes]:
    tenv = dict(env)
    tenv.update({ENV_PREFIX + "WEB_PORT": str(port), ENV_PREFIX + "WEB_HOST": "127.0.0.1",
                 ENV_PREFIX + "FINETUNE_INTERVAL_S": str(args.train_interval),
                 ENV_PREFIX + "BUFFER_MAX_EVENTS": str(args.train_buffer),
                 ENV_PREFIX + "TRAINER_TORCH_THREADS": "1"})
    trainer = GruflowProcess("trainer", tenv, port, log_path, cwd=cwd).start(wait=False)
    assert trainer.proc is not None
    return trainer.proc


def training_phase(args: argparse.Namespace, settings: Settings, env: dict[str, str], reader: "RecReader",
                   work: Path, procs: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    """Start a trainer process, wait for its first finished round, then measure latency under training."""
    from stream.kafka.broker_setup import free_port

    rounds = ENV_PREFIX.lower() + "finetune_rounds_total"
    port = free_port()
    trainer = start_trainer(env, port, args, work / "trainer.log", PROJECT_ROOT)
    procs.append(trainer)
    log(f"trainer pid {trainer.pid} started; waiting for its first fine-tune round ...")
    deadline = time.monotonic() + args.train_wait
    while time.monotonic() < deadline and trainer.poll() is None and (scrape_total(port, rounds) or 0) < 1:
        time.sleep(0.5)
    if trainer.poll() is not None or (scrape_total(port, rounds) or 0) < 1:
        log(f"no fine-tune round finished within {args.train_wait:.0f} s (trainer log: {work / 'trainer.log'})")
        return {"finetune_rounds_during_measure": 0, "training_error": "no round finished before the measurement"}
    before_rounds = scrape_total(port, rounds) or 0
    log(f"latency run with training: {args.rate:,.0f} events/s for {args.latency_seconds:.0f} s ...")
    window, stolen = offer_measured(settings, reader, args, seed=4)
    after_rounds = scrape_total(port, rounds) or 0  # rounds finished while the load was offered
    lat = measured_latencies(reader, window)
    return {"latency_ms_during_training": percentiles(lat), "latency_events_during_training": int(lat.size),
            "finetune_rounds_during_measure": int(after_rounds - before_rounds),
            "latency_cpu_steal_during_training": stolen,
            "trainer_buffer_max_events": args.train_buffer, "trainer_peak_rss_bytes": peak_rss_bytes(trainer.pid)}


ECHO_WARMUP_S = 5.0  # the broker is warm by then; this covers the echo's own start


def echo_phase(args: argparse.Namespace, settings: Settings, work: Path) -> dict[str, Any]:
    """The latency of ``stream.lab.echo`` in the worker's place (its own topics), same load and reader."""
    from stream.kafka.topics import ensure_topics

    echo_settings = settings.replace(topic_prefix=settings.topics.topic_prefix.rstrip(".") + "-echo.")
    ensure_topics(echo_settings)
    log_path = work / "echo.log"
    echo = subprocess.Popen([sys.executable, "-m", "stream.lab.echo"], env=echo_settings.subprocess_env(),
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            cwd=PROJECT_ROOT)
    reader: RecReader | None = None
    try:
        reader = RecReader(echo_settings)
        deadline = time.monotonic() + 60
        while b"echo ready" not in log_path.read_bytes():
            if echo.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-500:].strip()  # the work dir goes at the end
                raise RuntimeError(f"the echo peer did not start; its log ends: {tail or '(empty)'}")
            time.sleep(0.2)
        log(f"latency peer (plain consume -> produce, pid {echo.pid}): {args.rate:,.0f} events/s for "
             f"{ECHO_WARMUP_S:.0f} s unmeasured, then {args.latency_seconds:.0f} s ...")
        warm_up(echo_settings, reader, args, ECHO_WARMUP_S)
        lat, stolen = latency_window(echo_settings, reader, args)
    finally:
        if reader is not None:
            reader.close()
        stop_process(echo)
    return {"echo_latency_ms": percentiles(lat), "echo_latency_events": int(lat.size),
            "echo_cpu_steal": stolen}


def training_comparison(args: argparse.Namespace, settings: Settings, env: dict[str, str], reader: RecReader,
                        work: Path, procs: list[subprocess.Popen[bytes]], lat: np.ndarray) -> dict[str, Any]:
    """The latency-while-training run, with its p99 over the worker's own p99 (``p99_ratio_training``)."""
    training = training_phase(args, settings, env, reader, work, procs)
    p99_train = (training.get("latency_ms_during_training") or {}).get("p99")
    p99 = float(np.percentile(lat, 99)) if lat.size else None
    training["p99_ratio_training"] = round(p99_train / p99, 3) if p99_train and p99 else None
    return training


def echo_comparison(args: argparse.Namespace, settings: Settings, work: Path, lat: np.ndarray) -> dict[str, Any]:
    """The echo peer's run, with the worker's p99 over the echo's (``latency_p99_ratio_to_echo``); called
    once the worker and trainer are stopped. A failed peer is reported as ``echo_error``."""
    try:
        echo = echo_phase(args, settings, work)
    except Exception as exc:  # noqa: BLE001 - the worker's figures stand without their peer
        log(f"latency peer failed: {exc!r}")
        return {"echo_error": repr(exc)}
    p99, p99_echo = percentiles(lat)["p99"], echo["echo_latency_ms"]["p99"]
    echo["latency_p99_ratio_to_echo"] = round(p99 / p99_echo, 2) if p99 and p99_echo else None
    return echo
