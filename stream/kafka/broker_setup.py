"""What the embedded broker needs before it starts: Java and Maven, the Apache Kafka jars (resolved once into a
cache directory from stream/kafka/pom.xml), free ports, the broker's configuration and log set-up, the JVM's
class-data sharing archives, and the KRaft storage directory (formatted once, its cluster id and listener
ports kept across restarts)."""

from __future__ import annotations
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from model.cache_dir import cache_root
from stream.kafka.broker_sasl import with_sasl_listener
from stream.kafka.config import MESSAGE_MAX_BYTES
from stream.settings import Settings


POM = Path(__file__).resolve().with_name("pom.xml")


MIN_JAVA = 17


PORTS_FILE = "ports.json"  # in a data dir: the listener ports chosen at its first start


_HELP = (
    "Alternatives: run any Kafka cluster (e.g. `docker compose up -d kafka` with the repo's "
    "docker-compose.yml) and point gruflow at it with GRUFLOW_BOOTSTRAP_SERVERS=host:port (or --bootstrap)."
)


class BrokerError(RuntimeError):
    """The embedded broker cannot be set up or started; the message says what to do."""


def _log(message: str) -> None:
    print(f"[gruflow] {message}", file=sys.stderr, flush=True)


def kafka_version(pom: Path = POM) -> str:
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom.read_text())
    if not match:
        raise BrokerError(f"{pom} has no <kafka.version> property")
    return match.group(1).strip()


def default_cache_dir(settings: Settings | None = None) -> Path:
    if settings is not None and settings.broker.kafka_cache_dir:
        return Path(settings.broker.kafka_cache_dir).expanduser()
    return cache_root() / f"kafka-{kafka_version()}"


def find_java() -> str:
    """Path of a Java >= 17 executable (JAVA_HOME first, then PATH), or a BrokerError saying what to install."""
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    which = shutil.which("java")
    if which:
        candidates.append(which)
    found = []
    for java in candidates:
        if not os.access(java, os.X_OK):
            continue
        major = _java_major(java)
        if major is not None and major >= MIN_JAVA:
            return java
        found.append(f"{java} (version {major})")
    what = "found " + ", ".join(found) if found else "no `java` on PATH or in JAVA_HOME"
    raise BrokerError(
        f"the embedded Apache Kafka broker needs Java {MIN_JAVA} or newer ({what}). Install a JRE, e.g. "
        f"`apt-get install openjdk-17-jre-headless` (Debian/Ubuntu) or `brew install openjdk@17` (macOS). {_HELP}"
    )


def _java_major(java: str) -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'version "([^"]+)"', out.stderr + out.stdout)
    if not match:
        return None
    parts = re.split(r"[._-]", match.group(1))
    try:
        major = int(parts[0])
        return int(parts[1]) if major == 1 else major  # "1.8.0_292" is Java 8
    except (ValueError, IndexError):
        return None


def find_mvn() -> str:
    mvn = shutil.which("mvn")
    if not mvn:
        raise BrokerError(
            "the embedded Apache Kafka broker's jars are fetched with Maven on first use, and `mvn` is not on PATH. "
            f"Install Maven, e.g. `apt-get install maven` (Debian/Ubuntu) or `brew install maven` (macOS). {_HELP}"
        )
    return mvn


def resolve_jars(cache_dir: Path | None = None, pom: Path = POM) -> Path:
    """Directory holding the broker's jars; runs Maven only when the cache is missing or stale.

    A stamp holds the pom's hash; a file lock keeps concurrent gruflow processes (tests, demo) from
    resolving into the same directory at once.
    """
    import fcntl

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    lib, stamp = cache_dir / "lib", cache_dir / ".resolved"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()

    def fresh() -> bool:
        return stamp.is_file() and stamp.read_text().strip() == digest and any(lib.glob("kafka_2.13-*.jar"))

    if fresh():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if fresh():
            return lib
        mvn = find_mvn()
        _log(f"resolving Apache Kafka {kafka_version(pom)} jars with Maven (first run only) into {lib} ...")
        tmp = cache_dir / f"lib.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={tmp}"]
        started = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cache_dir)
        if proc.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
            shutil.rmtree(tmp, ignore_errors=True)
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
            raise BrokerError(
                f"Maven could not resolve the Kafka broker jars (exit {proc.returncode}); it needs access to "
                f"Maven Central.\n$ {' '.join(cmd)}\n{tail}\n{_HELP}"
            )
        shutil.rmtree(lib, ignore_errors=True)
        tmp.rename(lib)
        stamp.write_text(digest + "\n")
        _log(f"Kafka jars resolved in {time.monotonic() - started:.0f} s ({len(list(lib.glob('*.jar')))} jars)")
    return lib


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_properties(port: int, controller_port: int, log_dir: Path, host: str = "127.0.0.1",
                      sasl_port: int = 0) -> str:
    """The broker's server.properties; ``sasl_port``: also a SASL listener there (OAUTHBEARER, PLAIN, SCRAM;
    stream/kafka/broker_sasl.py)."""
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.quorum.bootstrap.servers": f"{host}:{controller_port}",
        "log.dirs": str(log_dir),
        "num.partitions": "1",
        "auto.create.topics.enable": "false",
        # single node: internal topics with one replica, fewer partitions than the defaults for a fast start
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "8",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "message.max.bytes": str(MESSAGE_MAX_BYTES),
        "replica.fetch.max.bytes": str(MESSAGE_MAX_BYTES),
        "log.cleaner.enable": "true",
        "log.cleaner.backoff.ms": "1000",
        "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        # modest thread pools: the machine is shared with workers and tests
        "num.network.threads": "2",
        "num.io.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
        "background.threads": "4",
        "log.segment.bytes": str(256 * 1024 * 1024),
    }
    if sasl_port:
        props = with_sasl_listener(props, host, sasl_port)
    return "".join(f"{k}={v}\n" for k, v in props.items())


LOG4J2_PROPERTIES = """\
# written by gruflow: broker log to a file in the run directory
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = FILE
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = INFO
"""


def _java_id(java: str) -> str:
    """Names CDS archives per JVM build: an archive only fits the JVM that wrote it."""
    real = os.path.realpath(java)
    try:
        stamp = f"{real}:{os.stat(real).st_mtime_ns}"
    except OSError:
        stamp = real
    return hashlib.sha1(stamp.encode()).hexdigest()[:12]


def _cds_archive(cache_dir: Path, name: str, java: str) -> Path:
    return cache_dir / f"cds-{name}-{_java_id(java)}.jsa"


def cds_flags(cache_dir: Path, run_dir: Path, name: str, java: str) -> tuple[list[str], Path | None]:
    """Class-data sharing: the first run dumps the classes it loaded into an archive that later runs
    map instead of parsing jars, which shortens JVM start-up. Returns (JVM flags, archive to publish
    into the cache after a clean exit or None)."""
    archive = _cds_archive(cache_dir, name, java)
    if archive.is_file():
        return [f"-XX:SharedArchiveFile={archive}", "-Xshare:auto"], None
    dump = run_dir / f"{name}.jsa"
    return [f"-XX:ArchiveClassesAtExit={dump}"], dump


def publish_cds(cache_dir: Path, dump: Path | None, name: str, java: str) -> None:
    """Copy a JVM's class-data dump into the cache, where the next start of ``name`` maps it."""
    if dump is None or not dump.is_file() or dump.stat().st_size == 0:
        return
    archive = _cds_archive(cache_dir, name, java)
    tmp = archive.with_suffix(f".tmp-{os.getpid()}")
    try:
        shutil.copyfile(dump, tmp)
        os.replace(tmp, archive)  # atomic: concurrent starts see a whole archive or none
    except OSError:
        tmp.unlink(missing_ok=True)


def _mb(size: str) -> int:
    size = size.strip().lower()
    factor = {"k": 1 / 1024, "m": 1, "g": 1024}.get(size[-1:], 1 / (1024 * 1024))
    return int(float(size.rstrip("kmg")) * factor)


def _is_formatted(log_dir: Path) -> bool:
    return (log_dir / "meta.properties").is_file()


def _cluster_id(log_dir: Path) -> str:
    """The cluster id a formatted log dir belongs to (``cluster.id`` in its meta.properties)."""
    for line in (log_dir / "meta.properties").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "cluster.id":
            return value.strip()
    return ""


def _read_ports(data_dir: Path) -> tuple[int, int] | None:
    """(listener port, controller port) a data dir's broker was started on, or None before its first start."""
    import json

    try:
        ports = json.loads((data_dir / PORTS_FILE).read_text())
        return int(ports["port"]), int(ports["controller_port"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise BrokerError(f"{data_dir / PORTS_FILE} is unreadable ({exc!r}); it names the ports this data "
                          f"directory's broker must come back on") from exc


def _write_ports(data_dir: Path, port: int, controller_port: int) -> None:
    import json

    tmp = data_dir / f"{PORTS_FILE}.tmp"
    tmp.write_text(json.dumps({"port": port, "controller_port": controller_port}) + "\n")
    os.replace(tmp, data_dir / PORTS_FILE)


def _forget_storage(data_dir: Path) -> None:
    """Undo a format that never served (its ports were taken): the next attempt formats on new ports."""
    shutil.rmtree(data_dir / "data", ignore_errors=True)
    (data_dir / PORTS_FILE).unlink(missing_ok=True)


def _random_cluster_id() -> str:
    """What `kafka-storage.sh random-uuid` prints: a URL-safe base64 UUID without padding, never starting
    with "-" (the tool's argument parser would read that as an option)."""
    import base64

    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id
