"""A real Prometheus server (Debian's package, unpacked by `make tools`) scrapes a real worker and a real
trainer on 127.0.0.1 and evaluates gruflow's alert rules; its HTTP API must show what the rules and the
dashboard promise: the no-promotion alert is about trainers only, and the first refusal of a model is
visible to increase()."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from stream.online import model_sync
from stream.kafka.broker import free_port
from stream.tools.processes import stop_process
from stream.kafka.topics import ensure_topics
from workerkit import REPO, WorkerProc, save_tiny_model

pytestmark = pytest.mark.integration

RULES = REPO / "deploy" / "prometheus" / "rules" / "gruflow-alerts.yml"


def find_prometheus() -> Path | None:
    for candidate in (os.environ.get("PROMETHEUS"), REPO / ".cache" / "tools" / "prometheus" / "usr" / "bin" / "prometheus",
                      shutil.which("prometheus")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


class Prometheus:
    def __init__(self, binary: Path, workdir: Path, targets: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        shutil.copy(RULES, workdir / "rules.yml")
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": ["rules.yml"],
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                                     for job, target in targets.items()]}
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([str(binary), f"--config.file={workdir / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={workdir / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir)

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait(self, expr: str, ok: Callable[[list[dict[str, Any]]], bool], timeout: float, what: str) -> list:
        deadline = time.monotonic() + timeout
        result: list = []
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log_path.read_text()[-3000:]}"
            try:
                result = self.query(expr)
                if ok(result):
                    return result
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{what}: {expr} gave {result} after {timeout:.0f} s")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


class TrainerProc:
    """``python -m stream.cli trainer`` as a subprocess."""

    def __init__(self, kafka: Any, settings: Any, model_path: Path, log_dir: Path) -> None:
        self.url = f"http://127.0.0.1:{settings.process.web_port}"
        self.log_path = log_dir / "trainer.log"
        self._log = open(self.log_path, "wb")
        env = kafka.env(settings, GRUFLOW_MODEL_PATH=str(model_path), GRUFLOW_TRAINER_TORCH_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "trainer"], cwd=REPO, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"trainer exited:\n{self.log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"trainer not ready:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        stop_process(self.proc, grace_s=60.0)
        self._log.close()


def no_promotion_expr() -> str:
    rules = yaml.safe_load(RULES.read_text())
    return next(r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == "GruflowNoModelPromotion")


def test_real_prometheus_sees_what_the_rules_promise(kafka, tmp_path: Path) -> None:
    binary = find_prometheus()
    if binary is None:
        pytest.skip("prometheus not found: `make tools` unpacks Debian's prometheus package into .cache/tools "
                    "(needs apt-get), or set PROMETHEUS=/path/to/prometheus")
    model_path = save_tiny_model(tmp_path / "tiny.gfc")
    settings = kafka.settings(partitions=2)
    ensure_topics(settings)
    trainer_settings = settings.replace(web_port=free_port())
    worker = WorkerProc(kafka, settings, model_path, tmp_path, name="scraped")
    trainer = TrainerProc(kafka, trainer_settings, model_path, tmp_path)
    prom: Prometheus | None = None
    try:
        trainer.wait_ready()
        worker.start()
        prom = Prometheus(binary, tmp_path, {"gruflow-worker": f"127.0.0.1:{settings.process.web_port}",
                                             "gruflow-trainer": f"127.0.0.1:{trainer_settings.process.web_port}"})
        prom.wait('up{job=~"gruflow-.*"} == 1', lambda r: len(r) == 2, 60, "both targets scraped")
        # a few scrapes of the untouched worker first
        prom.wait('count_over_time(gruflow_ready{job="gruflow-worker"}[1m])', lambda r: r and float(r[0]["value"][1]) >= 3,
                  30, "three scrapes of the worker")

        # the no-promotion alert: the trainer's series is there (nothing promoted yet), the worker has none
        by_job = {r["metric"]["job"] for r in prom.query(no_promotion_expr())}
        assert by_job == {"gruflow-trainer"}, f"the no-promotion expression returned jobs {by_job}"
        assert prom.query('gruflow_model_promotions_total{job="gruflow-worker"}') == []
        pending = prom.wait('ALERTS{alertname="GruflowNoModelPromotion"}', lambda r: len(r) >= 1, 30,
                            "the rule evaluated")
        assert {r["metric"]["job"] for r in pending} == {"gruflow-trainer"}
        assert prom.query('gruflow_trainer_buffer_events{job="gruflow-worker"}') == []
        assert prom.query('gruflow_events_in_total{job="gruflow-trainer"}') == []

        # one corrupt model version: the worker refuses it once; increase() must see that first refusal
        model_sync.publish_version(settings, b"not a checkpoint at all" * 10, 1000, 1)
        assert worker.wait_metric("gruflow_model_refusals_total", lambda v: v == 1, timeout=60,
                                  reason=model_sync.R_CORRUPT), "the worker did not refuse the corrupt version"
        expr = 'sum by (reason) (increase(gruflow_model_refusals_total{job="gruflow-worker"}[1m]))'
        result = prom.wait(expr, lambda r: any(x["metric"]["reason"] == model_sync.R_CORRUPT
                                               and float(x["value"][1]) >= 0.9 for x in r), 30,
                           "the refusal in increase()")
        values = {x["metric"]["reason"]: float(x["value"][1]) for x in result}
        assert values[model_sync.R_CORRUPT] <= 2.0
        assert all(v == 0.0 for reason, v in values.items() if reason != model_sync.R_CORRUPT)
    finally:
        if prom is not None:
            prom.stop()
        worker.kill()
        trainer.stop()
