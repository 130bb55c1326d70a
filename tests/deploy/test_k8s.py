"""k8s/ rendered offline (tests/deploy/kustomize_lite.py): core objects pass `kubernetes-validate
--strict`, and the fields gruflow relies on are checked, in core objects and custom resources alike."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploykit import DEPLOY, K8S, all_of, load_yaml, one
from kustomize_lite import render
from stream.settings import Settings
from stream.kafka.topics import STATE_TABLE_NAME, topic_specs

CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication", "KafkaTopic"}
# kubernetes-validate's newest schema, and an older release many clusters still run
K8S_VERSIONS = ["1.37.0", "1.30.0"]


def settings_from(objects: list[dict[str, Any]]) -> Settings:
    return Settings.from_env(one(objects, "ConfigMap", "gruflow-config")["data"])


def test_kinds(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = rendered
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ConfigMap", "ServiceAccount", "StatefulSet", "Deployment", "Service",
            "PodDisruptionBudget"} | (CUSTOM_KINDS - {"TriggerAuthentication"}) <= kinds
    namespace = one(objects, "Namespace")["metadata"]["name"]
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, f"{name}: {obj['kind']} outside the namespace"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_pass_kubernetes_validate_strict(rendered: tuple[str, list[dict[str, Any]]], version: str,
                                                      tmp_path: Path) -> None:
    name, objects = rendered
    core = [o for o in objects if o["kind"] not in CUSTOM_KINDS]
    assert len(core) >= 8
    out = tmp_path / "core.yaml"
    out.write_text(yaml.safe_dump_all(core, sort_keys=False))
    cli = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run([str(cli), "--strict", "-k", version, str(out)], capture_output=True, text=True,
                            timeout=300)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, f"{name}:\n{result.stdout}\n{result.stderr}"
    # kubernetes-validate only warns (and passes) when it has no schema: every core object must really pass
    passed = [line for line in lines if line.startswith("INFO") and " passed for resource " in line]
    assert len(passed) == len(core), f"{name}: not every object was validated:\n{result.stdout}"


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path: Path, base_objects: list[dict[str, Any]]) -> None:
    """--strict does catch a misplaced field, so the pass above means something."""
    sts = one(base_objects, "StatefulSet")
    broken = yaml.safe_load(yaml.safe_dump(sts))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/readyz"}
    out = tmp_path / "broken.yaml"
    out.write_text(yaml.safe_dump(broken))
    cli = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run([str(cli), "--strict", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "httpGett" in result.stdout


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: the renderer is not "
                    "cross-checked against kustomize (the other tests still use it)")
@pytest.mark.parametrize("kustomization", ["base", "overlays/example"])
def test_renderer_matches_kubectl_kustomize(kustomization: str) -> None:
    result = subprocess.run(["kubectl", "kustomize", str(K8S / kustomization)], capture_output=True, text=True,
                            timeout=120)
    if result.returncode != 0 and "unknown command" in result.stderr:
        pytest.skip(f"this kubectl has no kustomize: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    theirs = [o for o in yaml.safe_load_all(result.stdout) if o]

    def key(o: dict[str, Any]) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    mine = {key(o): o for o in render(K8S / kustomization)}
    assert mine == {key(o): o for o in theirs}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def test_worker_statefulset(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    settings = settings_from(objects)
    sts = one(objects, "StatefulSet", "gruflow-worker")
    spec = pod_spec(sts)
    container = spec["containers"][0]
    assert container["args"] == ["worker"]
    # headless service named by the StatefulSet, selecting its pods
    svc = one(objects, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # RocksDB on a PVC per replica, mounted at GRUFLOW_DATA_DIR
    claims = {c["metadata"]["name"]: c for c in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    state = [n for n, path in mounts.items() if path == str(settings.process.data_dir)]
    assert state and state[0] in claims, "GRUFLOW_DATA_DIR must be on a volumeClaimTemplate"
    assert claims[state[0]]["spec"]["accessModes"] == ["ReadWriteOnce"]
    # probes: liveness never depends on the broker, readiness = recovery done + model loaded
    port = next(p for p in container["ports"] if p["name"] == "web")
    assert port["containerPort"] == settings.process.web_port
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ("web", settings.process.web_port)
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(settings.process.web_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert sts["spec"]["replicas"] <= settings.topics.partitions


def test_credentials_come_from_a_secret_reference(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    assert not all_of(objects, "Secret"), "credentials are created out of band, never committed"
    for workload in all_of(objects, "StatefulSet") + all_of(objects, "Deployment"):
        container = pod_spec(workload)["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        for name in ("GRUFLOW_SASL_USERNAME", "GRUFLOW_SASL_PASSWORD"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "gruflow-kafka-credentials"
        config = one(objects, "ConfigMap", "gruflow-config")["data"]
        assert "GRUFLOW_SASL_PASSWORD" not in config
        tls = next(v for v in pod_spec(workload)["volumes"] if "secret" in v)
        mount = next(m for m in container["volumeMounts"] if m["name"] == tls["name"])
        if config.get("GRUFLOW_SSL_CAFILE"):
            assert config["GRUFLOW_SSL_CAFILE"].startswith(mount["mountPath"] + "/")


def test_trainer_is_a_single_replica(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    dep = one(objects, "Deployment", "gruflow-trainer")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate", "a rollout must never run two trainers"
    container = pod_spec(dep)["containers"][0]
    assert container["args"] == ["trainer"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert not [o for o in all_of(objects, "ScaledObject") if o["spec"]["scaleTargetRef"]["name"] == "gruflow-trainer"]
    # its data dir (initial model, kept versions) is on a claim that exists, so restarts do not retrain
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(settings_from(objects).process.data_dir))
    volume = next(v for v in pod_spec(dep)["volumes"] if v["name"] == mount["name"])
    claim = one(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    model_path = next(e["value"] for e in container["env"] if e["name"] == "GRUFLOW_MODEL_PATH")
    assert model_path.startswith(mount["mountPath"] + "/")


def test_pdb_covers_the_workers(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    pdb = one(objects, "PodDisruptionBudget")
    sts = one(objects, "StatefulSet", "gruflow-worker")
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1


def test_service_monitor(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in all_of(objects, "Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert {s["metadata"]["name"] for s in selected} == {"gruflow-worker", "gruflow-trainer"}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    for svc in selected:
        assert endpoint["port"] in [p["name"] for p in svc["spec"]["ports"]]


def test_scaled_object_is_capped_at_the_partition_count(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    settings = settings_from(objects)
    scaled = one(objects, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "gruflow-worker"}
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= settings.topics.partitions
    inputs = {settings.topic("clicks"), settings.topic("purchases")}
    triggers = spec["triggers"]
    assert {t["metadata"]["topic"] for t in triggers} == inputs
    auth_names = {a["metadata"]["name"] for a in all_of(objects, "TriggerAuthentication")}
    for trigger in triggers:
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert meta["consumerGroup"] == settings.process.app_id, "faust's consumer group is the app id"
        assert meta["bootstrapServers"] == settings.connection.bootstrap_servers
        assert meta["allowIdleConsumers"] == "false"
        assert int(meta["lagThreshold"]) > 0
        if settings.connection.security_protocol.startswith("SASL"):
            assert trigger["authenticationRef"]["name"] in auth_names
            # KEDA spells SCRAM-SHA-512 as scram_sha512
            assert meta["sasl"] == settings.connection.sasl_mechanism.lower().replace("-sha-", "_sha").replace("-", "_")
        if settings.connection.security_protocol.endswith("SSL"):
            assert meta["tls"] == "enable"


def test_kafka_topics_match_the_topic_layout(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """KafkaTopics = stream.kafka.topics.topic_specs(settings): names, partitions (co-partitioned inputs, state
    changelog), compaction of changelog and models, replicas = GRUFLOW_REPLICATION_FACTOR."""
    _, objects = rendered
    settings = settings_from(objects)
    topics = {t["spec"]["topicName"]: t for t in all_of(objects, "KafkaTopic")}
    specs = {s.name: s for s in topic_specs(settings)}
    assert set(topics) == set(specs)
    assert f"{settings.process.app_id}-{STATE_TABLE_NAME}-changelog" in topics
    clusters = {t["metadata"]["labels"]["strimzi.io/cluster"] for t in topics.values()}
    assert len(clusters) == 1
    bootstrap_host = settings.connection.bootstrap_servers.split(",")[0].split(":")[0]
    assert bootstrap_host.startswith(f"{clusters.pop()}-kafka-bootstrap."), "topics and clients on one cluster"
    for name, spec in specs.items():
        topic = topics[name]
        assert topic["apiVersion"] == "kafka.strimzi.io/v1beta2"
        assert topic["spec"]["partitions"] == spec.partitions
        assert topic["spec"]["replicas"] == settings.topics.replication_factor
        config = {k: str(v) for k, v in topic["spec"].get("config", {}).items()}
        assert spec.config.items() <= config.items(), f"{name}: {config} lacks {spec.config}"


def test_prometheus_rule_matches_the_compose_rules(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    rule = one(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == load_yaml(DEPLOY / "prometheus" / "rules" / "gruflow-alerts.yml")["groups"]
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    exprs = " ".join(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    assert f'k="{settings_from(objects).scoring.top_k}"' in exprs, "the prequential rules use K = GRUFLOW_TOP_K"
    assert {"GruflowConsumerLagGrowing", "GruflowDLQRateHigh", "GruflowNoModelPromotion",
            "GruflowPrequentialBelowPopularity"} <= alerts
