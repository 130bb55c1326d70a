"""One harness for running gruflow the way an operator does, shared by the demo, the lab (bench,
experiment, faults) and the integration tests: start ``gruflow worker`` (or ``trainer``) as a subprocess
configured by GRUFLOW_* variables and wait until ``/readyz`` answers 200; read ``/metrics``; train a
quick model to serve; run against the configured cluster or an embedded broker (``kafka_for``)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping

# the directory that holds the ``stream`` package: child processes start there so ``python -m stream...``
# resolves to this copy of gruflow
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# {(sample name, sorted label pairs): value}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class NotReady(RuntimeError):
    """A gruflow process exited or did not become ready in time; the message ends with its log's tail."""


def cluster_settings(args: Any, settings: Any, command: str, alternative: str = "") -> Any:
    """The settings of a tool that talks to a running cluster: ``settings`` if given, else from the environment
    with ``--bootstrap`` (``args.bootstrap``) winning. SettingsError when they name no cluster, since such a
    tool has nothing to start an embedded broker for (``alternative`` ends the message with another way)."""
    from stream.settings import Settings, SettingsError

    if settings is None:
        settings = Settings.from_env(bootstrap_servers=getattr(args, "bootstrap", None))
    if settings.embedded:
        raise SettingsError(f"`gruflow {command}` needs a running Kafka cluster: set GRUFLOW_BOOTSTRAP_SERVERS or "
                            f"--bootstrap (e.g. the address `gruflow broker` prints){alternative}")
    return settings


@contextlib.contextmanager
def kafka_for(settings: Any, **broker_options: Any) -> Iterator[Any]:
    """``settings`` pointed at a running Kafka for the ``with`` block: the cluster they name, or, when they name
    none, an embedded broker started here (``broker_options`` go to ``EmbeddedKafka``) and stopped on exit."""
    if not settings.embedded:
        yield settings
        return
    from stream.kafka.broker import EmbeddedKafka

    with EmbeddedKafka.from_settings(settings, **broker_options) as kafka:
        yield kafka.settings(settings)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body) of a GET; an HTTP error status is returned, not raised (OSError when unreachable)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(url: str, timeout: float = 2.0) -> Samples:
    """``url``/metrics (``url`` = http://host:port) as samples; OSError when the endpoint is unreachable."""
    from prometheus_client.parser import text_string_to_metric_families

    _, text = http_get(url.rstrip("/") + "/metrics", timeout)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


class RunningTotals:
    """Counter totals over scrapes, for counters whose series can disappear: the worker drops the
    prequential series of model versions it no longer serves, so a sum over one scrape undercounts.
    Each series' growth since the previous scrape is added up (a series that restarts counts from 0);
    what a series gained after its last scrape and before its removal is not seen."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.totals: Samples = {}

    def update(self, samples: Samples) -> "RunningTotals":
        for (name, labels), value in samples.items():
            if name not in self.names:
                continue
            prev = self._last.get((name, labels), 0.0)
            self._last[(name, labels)] = value
            key = (name, tuple(kv for kv in labels if kv[0] != "version"))
            self.totals[key] = self.totals.get(key, 0.0) + (value - prev if value >= prev else value)
        return self

    def total(self, name: str, **labels: str) -> float:
        return total(self.totals, name, **labels)


def label_value(samples: Samples, name: str, label: str) -> str | None:
    """``label`` of the first sample of ``name`` (an Info metric), or None."""
    for (n, lab), _ in samples.items():
        if n == name:
            return dict(lab).get(label)
    return None


def is_ready(url: str) -> bool:
    try:
        return http_get(url.rstrip("/") + "/readyz", timeout=2)[0] == 200
    except OSError:
        return False


def stop_process(proc: subprocess.Popen[bytes] | None, grace_s: float = 30.0) -> int | None:
    """SIGTERM (a clean shutdown: commits, broker leave), then SIGKILL if it does not exit in time; the exit
    code (None if there was no process)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class GruflowProcess:
    """``python -m stream.cli <command> [args]`` as a subprocess with its output in ``log_path``; ``port`` is
    its web port (/readyz, /metrics)."""

    def __init__(self, command: str | list[str], env: Mapping[str, str], port: int, log_path: Path, *,
                 cwd: Path = PROJECT_ROOT) -> None:
        self.args = [command] if isinstance(command, str) else list(command)
        self.command, self.env, self.port, self.log_path, self.cwd = self.args[0], dict(env), port, log_path, cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.settings: Any = None  # the Settings it runs with, when built by ``worker``

    @classmethod
    def worker(cls, settings: Any, log_path: Path, **extra_env: str) -> "GruflowProcess":
        """A worker configured exactly like ``settings`` (a stream.settings.Settings)."""
        env = settings.subprocess_env(PYTHONUNBUFFERED=os.environ.get("PYTHONUNBUFFERED", "1"), **extra_env)
        proc = cls("worker", env, settings.process.web_port, log_path)
        proc.settings = settings
        return proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True, timeout: float = 180.0) -> "GruflowProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "stream.cli", *self.args], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd)
        self.starts += 1
        if wait:
            self.wait_ready(timeout)
        return self

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            code = self.exited()
            if code is not None:
                raise NotReady(f"{self.command} exited with {code}; log {self.log_path}:\n{log_tail(self.log_path)}")
            if is_ready(self.url):
                return
            if time.monotonic() > deadline:
                raise NotReady(f"{self.command} not ready after {timeout:.0f} s; log {self.log_path}:\n"
                               f"{log_tail(self.log_path)}")
            time.sleep(0.3)

    def scrape(self) -> Samples:
        return scrape(self.url)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code (None if it was never started)."""
        return stop_process(self.proc, timeout)

    def __enter__(self) -> "GruflowProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def train_quick_model(train: Any, path: Path, *, hidden: int = 64, n_epochs: int = 2, n_sample: int = 512,
                      batch_size: int = 64, learning_rate: float = 0.08, vocab: Any = None,
                      popularity_floor: float = 0.0, progress: bool = False,
                      metadata: Mapping[str, Any] | None = None) -> tuple[int, float]:
    """A small GRU4Rec (the official cross-entropy setup, which is faster per event than the BPR-max
    default) trained on ``train`` and saved as a checkpoint at ``path``, with torch on at most two
    threads. Returns (items, seconds)."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.params import OFFICIAL
    from model.train import train_model

    params = dataclasses.replace(OFFICIAL, layers=(hidden,), n_epochs=n_epochs, batch_size=batch_size,
                                 n_sample=n_sample, learning_rate=learning_rate)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.monotonic()
    try:
        net, vocab, popularity = train_model(train, params, progress=progress, vocab=vocab)
    finally:
        torch.set_num_threads(threads)
    save_checkpoint(path, net, vocab, params, popularity + popularity_floor, dict(metadata or {"version": 1}))
    return len(vocab), time.monotonic() - t0
