"""An embedded, single-node Apache Kafka 4.x broker (KRaft: broker + controller in one JVM).

gruflow's default when no bootstrap servers are configured. The broker jars come from Maven Central
through ``stream/kafka/pom.xml`` into a cache directory (resolved once). Without a data directory each
start formats a fresh KRaft storage directory in a temp dir (removed on stop) and runs ``kafka.Kafka`` on
free loopback ports. With ``data_dir`` the broker keeps its logs there and comes back on them: the first
start formats it and records the ports it chose (``ports.json``); later starts skip the format (the
cluster id stays the one in ``meta.properties``) and bind the same ports, because clients reconnect to
the advertised listener they know and the KRaft voter set names the controller's endpoint.

No orphaned JVMs: ``stop()`` runs on context exit, at interpreter exit, on SIGTERM (chained to the
previous handler) and, should the Python parent be SIGKILLed, the kernel kills the JVM too
(``PR_SET_PDEATHSIG``). The JVM runs in its own process group so that a Ctrl-C in the terminal reaches
Python first and the broker outlives the workers it serves during a clean shutdown.

Usage::

    with EmbeddedKafka() as kafka:
        settings = settings.replace(bootstrap_servers=kafka.bootstrap_servers)
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable

from stream.settings import Settings
from stream.kafka.broker_process import (RUN_DIR_PREFIX, _live, _live_lock, _pdeathsig_preexec, _signal_group, _spawn,
                                         _stop_all, _sweep_stale_run_dirs)
from stream.kafka.broker_setup import (LOG4J2_PROPERTIES, PORTS_FILE, BrokerError, _cluster_id, _forget_storage,
                                       _is_formatted, _log, _mb, _random_cluster_id, _read_ports, _write_ports,
                                       cds_flags, default_cache_dir, find_java, free_port, kafka_version,
                                       publish_cds, resolve_jars, server_properties)




_atexit_registered = False


# --------------------------------------------------------------------------- the broker


class EmbeddedKafka:
    """A single-node Apache Kafka broker in a child JVM. ``start()`` returns once it answers clients.

    ``port=None`` picks free loopback ports. ``data_dir`` keeps the broker's data (and its ports) across
    restarts, a kill -9 of the JVM included; without it every start is a new, empty cluster. Signal
    handlers are installed only when started from the main thread; the atexit hook and the parent-death
    signal work from any thread.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        controller_port: int | None = None,
        cache_dir: Path | str | None = None,
        heap: str = "512m",
        startup_timeout: float = 120.0,
        log_level: str = "INFO",
        keep_run_dir: bool = False,
        quiet: bool = False,
        data_dir: Path | str | None = None,
        sasl: bool = False,
    ) -> None:
        self.host = "127.0.0.1"
        self._want_port, self._want_controller_port = port, controller_port
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir is not None else None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.heap = heap
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        self.keep_run_dir = keep_run_dir
        self.quiet = quiet
        self.sasl = sasl  # also a SASL listener: OAUTHBEARER, PLAIN, SCRAM (stream/kafka/broker_sasl.py)
        self.sasl_port = 0
        self.port = 0
        self.controller_port = 0
        self.run_dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._prev_handlers: dict[int, Any] = {}
        self._java = ""
        self._server_dump: Path | None = None
        self._stop_lock = threading.RLock()

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> "EmbeddedKafka":
        kwargs.setdefault("cache_dir", default_cache_dir(settings))
        return cls(**kwargs)

    # -- properties

    @property
    def bootstrap_servers(self) -> str:
        if not self.port:
            raise BrokerError("the embedded broker is not started")
        return f"{self.host}:{self.port}"

    @property
    def sasl_bootstrap_servers(self) -> str:
        """The SASL listener (``sasl=True``; a new free port on every start, data dir or not)."""
        if not self.sasl_port:
            raise BrokerError("the embedded broker has no SASL listener (start it with sasl=True)")
        return f"{self.host}:{self.sasl_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def log_file(self) -> Path | None:
        return self.run_dir / "logs" / "server.log" if self.run_dir else None

    def settings(self, base: Settings | None = None) -> Settings:
        """``base`` (default: from the environment) pointed at this broker, without SASL/SSL."""
        base = base if base is not None else Settings.from_env()
        return base.replace(
            bootstrap_servers=self.bootstrap_servers, security_protocol="PLAINTEXT", sasl_mechanism=""
        )

    # -- lifecycle

    def __enter__(self) -> "EmbeddedKafka":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "EmbeddedKafka":
        if self.running:
            return self
        java = find_java()
        lib = resolve_jars(self.cache_dir)
        _sweep_stale_run_dirs()
        # a free port can be taken between probe and bind; ports a data dir recorded are not re-chosen
        attempts = 1 if self._want_port or self._stored_ports() else 3
        for attempt in range(attempts):
            self._prepare_run_dir()
            formatted = self._launch(java, lib)
            try:
                self._wait_ready()
                break
            except BrokerError as exc:
                port_clash = "Address already in use" in self._log_tail(200)
                self.stop()
                if port_clash and self.data_dir is not None:
                    if formatted:  # a fresh data dir: its format named these ports; start over on others
                        _forget_storage(self.data_dir)
                    else:
                        raise BrokerError(
                            f"port {self.port} or {self.controller_port}, recorded in {self.data_dir / PORTS_FILE} "
                            f"for this data directory, is taken by another process; the broker must come back "
                            f"on the same ports so that its clients and its KRaft quorum find it. Stop that "
                            f"process, or start on a new data directory."
                        ) from exc
                if not port_clash or attempt == attempts - 1:
                    raise exc
                _log("port taken while starting; retrying on other ports")
        return self

    def _stored_ports(self) -> tuple[int, int] | None:
        return _read_ports(self.data_dir) if self.data_dir is not None else None

    def _prepare_run_dir(self) -> None:
        stored = self._stored_ports()
        if stored is not None and self._want_port and self._want_port != stored[0]:
            raise BrokerError(
                f"{self.data_dir} belongs to a broker on port {stored[0]} (see {PORTS_FILE}); its clients "
                f"reconnect there. Start it without --port, or with --port {stored[0]}."
            )
        self.port = self._want_port or (stored[0] if stored else free_port(self.host))
        self.controller_port = self._want_controller_port or (stored[1] if stored else free_port(self.host))
        while self.controller_port == self.port:
            self.controller_port = free_port(self.host)
        self.sasl_port = 0
        while self.sasl and self.sasl_port in (0, self.port, self.controller_port):
            self.sasl_port = free_port(self.host)
        if self.data_dir is not None:
            self.run_dir = self.data_dir
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "logs").mkdir(exist_ok=True)
        else:
            self.run_dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
            (self.run_dir / "owner.pid").write_text(str(os.getpid()))
            (self.run_dir / "logs").mkdir()
        (self.run_dir / "server.properties").write_text(
            server_properties(self.port, self.controller_port, self.run_dir / "data", self.host, self.sasl_port)
        )
        (self.run_dir / "log4j2.properties").write_text(
            LOG4J2_PROPERTIES.format(log_file=self.run_dir / "logs" / "server.log", level=self.log_level)
        )

    def _java_cmd(self, java: str, lib: Path, main: str, *args: str, short_lived: bool = False,
                  cds: list[str] = ()) -> list[str]:
        assert self.run_dir is not None
        return [
            java,
            *(["-XX:TieredStopAtLevel=1"] if short_lived else []),  # quick start for one-shot tools
            *cds,
            f"-Xmx{self.heap}",
            f"-Xms{min(128, _mb(self.heap))}m",
            "-XX:+UseSerialGC",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.run_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.run_dir / 'logs'}",
            "-cp",
            f"{lib}/*",
            main,
            *args,
        ]

    def _launch(self, java: str, lib: Path) -> bool:
        """Format the storage unless it was formatted before (a data dir's restart), then start the JVM.
        Returns whether this call formatted."""
        assert self.run_dir is not None
        props = str(self.run_dir / "server.properties")
        formatted = not _is_formatted(self.run_dir / "data")
        if formatted:
            self._format(java, lib, props)
            if self.data_dir is not None:  # the format wrote the controller's endpoint into the voter set
                _write_ports(self.data_dir, self.port, self.controller_port)
        elif not self.quiet:
            _log(f"reusing the Kafka data in {self.run_dir / 'data'} (cluster id {_cluster_id(self.run_dir / 'data')})")
        out = open(self.run_dir / "logs" / "stdout.log", "wb")
        cds, self._server_dump = cds_flags(self.cache_dir, self.run_dir, "server", java)
        self._java = java
        self.proc = _spawn(
            self._java_cmd(java, lib, "kafka.Kafka", props, cds=cds),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.run_dir,
            start_new_session=True, preexec_fn=_pdeathsig_preexec(os.getpid()),
        )
        out.close()
        self._register()
        return formatted

    def _format(self, java: str, lib: Path, props: str) -> None:
        cds, dump = cds_flags(self.cache_dir, self.run_dir, "storage-tool", java)
        fmt = subprocess.run(
            self._java_cmd(java, lib, "kafka.tools.StorageTool", "format", "--standalone", "-t", _random_cluster_id(),
                           "-c", props, short_lived=True, cds=cds),
            capture_output=True, text=True, timeout=120,
        )
        if fmt.returncode != 0:
            raise BrokerError(f"formatting the KRaft storage failed (exit {fmt.returncode}):\n{fmt.stdout}{fmt.stderr}")
        publish_cds(self.cache_dir, dump, "storage-tool", java)

    def _wait_ready(self) -> None:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        started = time.monotonic()
        deadline = started + self.startup_timeout
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 0,
                             "logger": _SilentLogger()})
        last_error: object = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = self.proc.returncode if self.proc else None
                raise BrokerError(f"the Kafka broker exited during startup (exit {code}). {self._describe_log()}")
            try:
                metadata = admin.list_topics(timeout=2)
                if metadata.brokers:
                    if not self.quiet:
                        _log(f"Kafka up on {self.bootstrap_servers} (Apache Kafka {kafka_version()}, "
                             f"pid {self.pid}, started in {time.monotonic() - started:.1f} s)")
                    return
            except KafkaException as exc:
                last_error = exc
            time.sleep(0.25)
        raise BrokerError(
            f"the Kafka broker did not answer on {self.bootstrap_servers} within {self.startup_timeout:.0f} s "
            f"(last error: {last_error}). {self._describe_log()}"
        )

    def _describe_log(self) -> str:
        return f"Broker log ({self.log_file}), last lines:\n{self._log_tail(40)}"

    def _log_tail(self, n: int) -> str:
        if self.run_dir is None:
            return ""
        lines: list[str] = []
        for name in ("server.log", "stdout.log"):
            path = self.run_dir / "logs" / name
            if path.is_file():
                lines += path.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 20.0) -> None:
        """Controlled shutdown (SIGTERM), SIGKILL after ``timeout``; removes the run directory unless it is a
        data dir (or ``keep_run_dir``). Idempotent."""
        with self._stop_lock:
            proc, self.proc = self.proc, None
            if proc is not None and proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                    publish_cds(self.cache_dir, self._server_dump, "server", self._java)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait(10)
            self._server_dump = None
            if proc is not None and not self.quiet:
                _log(f"Kafka on {self.host}:{self.port} stopped")
            self._unregister()
            if self.run_dir is not None and not self.keep_run_dir and self.data_dir is None:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                self.run_dir = None

    # -- guards: atexit, SIGTERM/SIGINT chained

    def _register(self) -> None:
        global _atexit_registered
        with _live_lock:
            _live.add(self)
            if not _atexit_registered:
                atexit.register(_stop_all)
                _atexit_registered = True
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig not in self._prev_handlers:
                self._prev_handlers[sig] = signal.signal(sig, self._on_signal)

    def _unregister(self) -> None:
        with _live_lock:
            _live.discard(self)
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, prev in list(self._prev_handlers.items()):
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, prev)
                del self._prev_handlers[sig]
            # else another handler was installed on top of ours and may still chain to it: keep forwarding

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Chain to whatever handled the signal before; stop the broker first when that would end the process
        without running Python cleanup (SIG_DFL for SIGTERM)."""
        prev = self._prev_handlers.get(signum, signal.SIG_DFL)
        if prev == signal.SIG_IGN:
            return
        if callable(prev):
            prev(signum, frame)  # e.g. SIGINT -> KeyboardInterrupt: context exit / atexit stop the broker
            return
        self.stop()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


class _SilentLogger:
    """librdkafka logs 'connection refused' while the broker boots; not worth showing."""

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Callable[..., None]:
        return self.log


def run_forever(settings: Settings | None = None, *, port: int | None = None, create_topics: bool = True,
                data_dir: Path | str | None = None) -> int:
    """``gruflow broker``: run the embedded broker until SIGTERM/Ctrl-C, with gruflow's topics created;
    with ``data_dir``, on the data (and ports) of its previous run there."""
    settings = settings if settings is not None else Settings.from_env()
    stop = threading.Event()
    try:
        with EmbeddedKafka.from_settings(settings, port=port, data_dir=data_dir) as kafka:
            if create_topics:
                from stream.kafka.topics import ensure_topics

                ensure_topics(kafka.settings(settings))
            print(f"GRUFLOW_BOOTSTRAP_SERVERS={kafka.bootstrap_servers}", flush=True)
            _log("broker running; Ctrl-C to stop")
            while not stop.wait(1.0):
                if not kafka.running:
                    _log(f"the broker exited unexpectedly. {kafka._describe_log()}")
                    return 1
    except KeyboardInterrupt:
        pass
    return 0
