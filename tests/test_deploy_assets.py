"""Deploy-side assets are checked by the real tools that consume them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from conftest import skip_or_fail

ASSETS = Path(__file__).parent.parent / "integrations"


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        skip_or_fail("promtool is not installed (Debian package: prometheus)")
    assert tool is not None
    return tool


def test_prometheus_alert_rules_pass_promtool_check() -> None:
    proc = subprocess.run(
        [_promtool(), "check", "rules", "alerts.yml"],
        cwd=ASSETS / "prometheus",
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 5 rules found" in proc.stdout


def test_prometheus_alerts_fire_on_the_series_they_are_for() -> None:
    proc = subprocess.run(
        [_promtool(), "test", "rules", "alerts_test.yml"],
        cwd=ASSETS / "prometheus",
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_alert_rules_use_the_names_the_sdk_exports() -> None:
    rules = (ASSETS / "prometheus" / "alerts.yml").read_text()
    # OpenTelemetry -> Prometheus naming of the instruments pgleakguard.otel creates
    for name in (
        "pgleakguard_leaks_total",
        "db_client_connection_count",
        "db_client_connection_max",
        "db_client_connection_timeouts_total",
        "pgleakguard_checkout_oldest_age_seconds",
    ):
        assert name in rules


def test_collector_config_wires_otlp_to_prometheus_and_traces() -> None:
    config = yaml.safe_load((ASSETS / "otel-collector" / "config.yaml").read_text())
    pipelines = config["service"]["pipelines"]
    assert pipelines["metrics"]["receivers"] == ["otlp"]
    assert pipelines["metrics"]["exporters"] == ["prometheus"]
    assert pipelines["traces"]["exporters"] == ["otlp/traces"]
    for pipeline in pipelines.values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"{component} is not defined in {kind}"
