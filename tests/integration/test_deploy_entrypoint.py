"""The container's way of running gruflow, against the embedded broker: `gruflow train ... --out` makes
the initial model (docker-compose's model-init service), `gruflow worker` runs with GRUFLOW_* variables
only (the image's ENTRYPOINT + CMD); its /livez and /readyz answer as the Kubernetes probes expect, and
its /metrics passes `promtool check metrics`.

Lives beside the `kafka` fixture (tests/integration/conftest.py) so that one broker serves the session;
the deploy tests' own helpers are in tests/deploy/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import orjson
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GRUFLOW = Path(sys.executable).parent / "gruflow"  # the console script, as in the image
STARTUP_DEADLINE_S = 240.0  # torch import + model load + group join on 2 busy cores; a deadline, not a measurement


def dockerfile_healthcheck() -> list[str]:
    """The exec-form command of the Dockerfile's HEALTHCHECK."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    (cmd,) = re.findall(r"^HEALTHCHECK .*?CMD (\[.*\])\s*$", text, flags=re.M)
    return json.loads(cmd)


def find_promtool() -> Path | None:
    cached = ROOT / ".cache" / "tools" / "prometheus" / "usr" / "bin" / "promtool"
    for candidate in (os.environ.get("PROMTOOL"), cached, shutil.which("promtool")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body); HTTP errors are answers too (503 from /readyz)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode(errors="replace")


def wait_for(what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path,
             deadline_s: float = STARTUP_DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"gruflow worker exited with {proc.returncode} while waiting for {what}:\n{tail(log)}")
        try:
            if check():
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"no {what} within {deadline_s:.0f} s:\n{tail(log)}")


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def sample(metrics: str, name: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The initial model, made the way docker-compose's model-init service makes it (smaller)."""
    out = tmp_path_factory.mktemp("deploy-model") / "initial.gfc"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRUFLOW_")}
    result = subprocess.run(
        [str(GRUFLOW), "train", "synthetic:300", "--format", "synthetic", "--params",
         "n_epochs=1,layers=16,embedding=0,batch_size=32,n_sample=64", "--threads", "1", "--no-progress",
         "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, f"gruflow train failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert out.is_file() and out.stat().st_size > 0
    return out


@pytest.fixture
def worker(kafka, model_path: Path, tmp_path: Path) -> Iterator[tuple[object, str, subprocess.Popen[bytes], Path]]:
    from stream.kafka.topics import ensure_topics

    settings = kafka.settings(partitions=2, model_path=str(model_path), torch_threads=1)
    ensure_topics(settings)  # docker-compose: kafka-init; Kubernetes: the KafkaTopics
    log = tmp_path / "worker.log"
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(GRUFLOW), "worker"], env=kafka.env(settings), cwd=workdir, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield settings, f"http://127.0.0.1:{settings.process.web_port}", proc, log
    finally:
        stop(proc)


def produce_events(settings) -> int:
    """A few events of three users, plus one malformed message (a DLQ reason), keyed by user id."""
    from confluent_kafka import Producer

    from stream.kafka.config import producer_config

    producer = Producer(producer_config(settings))
    now_ms = int(time.time() * 1000)
    n = 0
    for user in ("u1", "u2", "u3"):
        for i in range(4):
            event = {"user_id": user, "item_id": f"i{i}", "event_type": "view", "ts": now_ms + i}
            producer.produce(settings.topic("clicks"), key=user.encode(), value=orjson.dumps(event))
            n += 1
    producer.produce(settings.topic("clicks"), key=b"u1", value=b"{not json")
    assert producer.flush(30) == 0, "events not delivered to the embedded broker"
    return n


def test_worker_as_in_the_container_serves_probes_and_valid_metrics(worker) -> None:
    settings, base, proc, log = worker
    wait_for("/livez 200", lambda: get(base + "/livez")[0] == 200, proc, log)
    wait_for("/readyz 200 (state recovered, model loaded)", lambda: get(base + "/readyz")[0] == 200, proc, log)
    events = produce_events(settings)

    def answered() -> bool:
        return sample(get(base + "/metrics")[2], "gruflow_recommendations_out_total") >= events

    wait_for(f"{events} recommendations in /metrics", answered, proc, log)
    status, content_type, metrics = get(base + "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert sample(metrics, "gruflow_dlq_total") >= 1
    assert sample(metrics, "gruflow_end_to_end_latency_seconds_count") >= 1
    assert sample(metrics, "gruflow_ready") == 1
    assert get(base + "/livez")[0] == 200
    # the image's HEALTHCHECK command itself, pointed at this worker's port
    check = dockerfile_healthcheck()
    assert check[0] == "python"
    health = subprocess.run([sys.executable, *check[1:]], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "GRUFLOW_WEB_PORT": str(settings.process.web_port)})
    assert health.returncode == 0, f"the Dockerfile HEALTHCHECK fails against a live worker:\n{health.stderr}"

    promtool = find_promtool()
    if promtool is None:
        pytest.skip("promtool not found (`make tools` installs it from Debian's prometheus package); "
                    "the probes were checked, `promtool check metrics` was not")
    result = subprocess.run([str(promtool), "check", "metrics"], input=metrics, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"promtool check metrics:\n{result.stdout}{result.stderr}"


def test_liveness_does_not_depend_on_the_broker(kafka, model_path: Path, tmp_path: Path) -> None:
    """A worker whose broker is unreachable stays alive (/livez 200: no restart loop from the liveness
    probe) and is not ready (/readyz 503: no traffic, no recovery yet)."""
    from stream.kafka.broker import free_port

    settings = kafka.settings(partitions=2, model_path=str(model_path),
                              bootstrap_servers=f"127.0.0.1:{free_port()}")  # nothing listens there
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(GRUFLOW), "worker"], env=kafka.env(settings), cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{settings.process.web_port}"
    try:
        wait_for("/livez 200 without a broker", lambda: get(base + "/livez")[0] == 200, proc, log)
        assert get(base + "/readyz")[0] == 503
        time.sleep(5)  # a few reconnect attempts later: still alive, still not ready
        assert proc.poll() is None, f"worker exited without a broker:\n{tail(log)}"
        assert get(base + "/livez")[0] == 200
        assert get(base + "/readyz")[0] == 503
    finally:
        stop(proc)


def test_trainer_as_in_the_container_serves_probes_and_valid_metrics(kafka, model_path: Path, tmp_path: Path) -> None:
    """`gruflow trainer` (the trainer Deployment's args): publishes GRUFLOW_MODEL_PATH as the first version,
    answers /livez and /readyz, and its /metrics passes `promtool check metrics` too."""
    from stream.kafka.topics import ensure_topics

    settings = kafka.settings(partitions=2, model_path=str(model_path), trainer_torch_threads=1)
    ensure_topics(settings)
    log = tmp_path / "trainer.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(GRUFLOW), "trainer"], env=kafka.env(settings), cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{settings.process.web_port}"
    try:
        wait_for("trainer /livez 200", lambda: get(base + "/livez")[0] == 200, proc, log)
        wait_for("trainer /readyz 200", lambda: get(base + "/readyz")[0] == 200, proc, log)
        status, content_type, metrics = get(base + "/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        assert sample(metrics, "gruflow_model_version") >= 1, "the initial model is published as a version"
        assert sample(metrics, "gruflow_vocabulary_items") > 0
        promtool = find_promtool()
        if promtool is None:
            pytest.skip("promtool not found (`make tools`); the trainer's probes were checked, its metrics were not")
        result = subprocess.run([str(promtool), "check", "metrics"], input=metrics, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, f"promtool check metrics:\n{result.stdout}{result.stderr}"
    finally:
        stop(proc)
