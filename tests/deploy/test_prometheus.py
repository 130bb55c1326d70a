"""Prometheus config, alert rules and their unit tests pass promtool (Debian's prometheus package,
unpacked by `make tools`); every gruflow metric the rules and the dashboard query exists in
stream/observe/metrics.py."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploykit import DEPLOY, load_yaml
from stream.observe.metrics import ROLES, Metrics

PROM = DEPLOY / "prometheus"
RULES = PROM / "rules" / "gruflow-alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gruflow.json"
METRIC = re.compile(r"\bgruflow_[a-z0-9_]+")
# Grafana's variables, replaced by a value of the kind Prometheus sees
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$window": "30m", "$k": "20", "$job": ".*"}


def run(promtool: Path, *args: str, cwd: Path = PROM, stdin: str | None = None) -> str:
    result = subprocess.run([str(promtool), *args], capture_output=True, text=True, cwd=cwd, input=stdin, timeout=120)
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def known_series() -> set[str]:
    """Every series name gruflow exports (a counter foo exports foo_total, a histogram foo_bucket ...)."""
    suffixes = {"counter": ["_total", "_created"], "gauge": [""], "summary": ["", "_count", "_sum", "_created"],
                "histogram": ["_bucket", "_count", "_sum", "_created"], "info": ["_info"]}
    names = set()
    for family in (f for role in ROLES for f in Metrics.create(role=role).registry.collect()):
        names.update(family.name + s for s in suffixes[family.type])
    return names


def rule_exprs() -> list[str]:
    return [r["expr"] for g in load_yaml(RULES)["groups"] for r in g["rules"]]


def recorded_names() -> set[str]:
    return {r["record"] for g in load_yaml(RULES)["groups"] for r in g["rules"] if "record" in r}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def test_promtool_check_config(promtool: Path) -> None:
    out = run(promtool, "check", "config", "prometheus.yml")
    assert "SUCCESS" in out and "1 rule files found" in out


def test_promtool_check_rules(promtool: Path) -> None:
    out = run(promtool, "check", "rules", str(RULES.relative_to(PROM)))
    assert f"SUCCESS: {len(rule_exprs())} rules found" in out


def test_promtool_test_rules(promtool: Path) -> None:
    out = run(promtool, "test", "rules", "tests/alerts_test.yml")
    assert "SUCCESS" in out
    tested = {t["alertname"] for case in load_yaml(PROM / "tests" / "alerts_test.yml")["tests"]
              for t in case.get("alert_rule_test", [])}
    alerts = {r["alert"] for g in load_yaml(RULES)["groups"] for r in g["rules"] if "alert" in r}
    assert tested == alerts, f"alerts without a unit test: {alerts - tested}"


def test_promtool_test_rules_catches_a_wrong_expectation(promtool: Path, tmp_path: Path) -> None:
    tests = load_yaml(PROM / "tests" / "alerts_test.yml")
    tests["rule_files"] = [str(RULES)]
    for case in tests["tests"]:
        for alert in case.get("alert_rule_test", []):
            alert["exp_alerts"] = [] if alert["exp_alerts"] else [{"exp_labels": {"severity": "warning"}}]
    broken = tmp_path / "broken_test.yml"
    broken.write_text(yaml.safe_dump(tests))
    result = subprocess.run([str(promtool), "test", "rules", str(broken)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr


def test_dashboard_queries_are_valid_promql(promtool: Path, tmp_path: Path) -> None:
    """promtool has no PromQL linter of its own; a rules file of the dashboard's queries gets them parsed."""
    exprs = dashboard_exprs()
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": substitute(e)}
                                                        for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    out = run(promtool, "check", "rules", str(path), cwd=tmp_path)
    assert f"SUCCESS: {len(exprs)} rules found" in out


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_queried_metrics_exist(source: str) -> None:
    exprs = rule_exprs() if source == "rules" else dashboard_exprs()
    used = {m for e in exprs for m in METRIC.findall(e)}
    recorded = {m for name in recorded_names() for m in METRIC.findall(name)}
    assert used, "no gruflow metric queried"
    unknown = used - known_series() - recorded
    assert not unknown, f"{source} query metrics that stream/observe/metrics.py does not export: {sorted(unknown)}"


def test_dashboard_covers_what_operators_need() -> None:
    used = {m for e in dashboard_exprs() for m in METRIC.findall(e)}
    required = {
        "gruflow_events_in_total", "gruflow_recommendations_out_total", "gruflow_dlq_total",
        "gruflow_end_to_end_latency_seconds_bucket", "gruflow_consumer_lag_messages",
        "gruflow_prequential_hits_total", "gruflow_prequential_events_total",
        "gruflow_prequential_reciprocal_rank_total", "gruflow_model_version", "gruflow_finetune_loss",
        "gruflow_finetune_duration_seconds_bucket", "gruflow_model_promotions_total", "gruflow_state_entries",
        "gruflow_rocksdb_bytes", "gruflow_http_requests_total", "gruflow_http_request_duration_seconds_bucket",
    }
    assert required <= used, f"dashboard lacks {sorted(required - used)}"
    text = " ".join(dashboard_exprs())
    assert "histogram_quantile(0.5," in text and "histogram_quantile(0.99," in text
    assert 'model' in text and "by (reason)" in text


def test_dashboard_structure() -> None:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    datasource = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == datasource["uid"]
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], f"panel {panel['title']} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for var in re.findall(r"\$(\w+)", " ".join(t["expr"] for t in panel["targets"])):
            assert var in variables or var.startswith("__"), f"panel {panel['title']} uses undefined ${var}"
        for key in ("x", "y", "w", "h"):
            assert isinstance(panel["gridPos"][key], int)
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
