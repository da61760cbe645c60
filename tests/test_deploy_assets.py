"""Deploy-side assets are checked by the real tools that consume them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import yaml
from opentelemetry.sdk.metrics.export import Histogram, Sum

from conftest import EventLog, skip_or_fail
from otel_sdk import Otel, all_instruments_workload

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


def prometheus_names(metric: Any) -> set[str]:
    """The series names the Collector's Prometheus exporter makes of an exported metric
    (the OpenTelemetry-to-Prometheus rules: dots to underscores, the unit as a suffix with
    {annotations} dropped, _total on counters, _bucket/_sum/_count on histograms)."""
    name = re.sub(r"[^a-zA-Z0-9_:]", "_", metric.name)
    unit = {"s": "seconds"}.get(metric.unit, "" if metric.unit.startswith("{") else metric.unit)
    if unit and not name.endswith(f"_{unit}"):
        name = f"{name}_{unit}"
    data = metric.data
    if isinstance(data, Histogram):
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    if isinstance(data, Sum) and data.is_monotonic:
        return {f"{name}_total"}
    return {name}


def test_alert_rules_use_the_names_the_sdk_exports(
    pg_dsn: str, otel: Otel, install: Callable[..., EventLog]
) -> None:
    install(leak_threshold=60, **otel.options())
    exported = all_instruments_workload(pg_dsn, otel).values()
    names = set().union(*(prometheus_names(m) for m in exported))
    labels = {"service_name", "service_instance_id", "le"} | {
        key.replace(".", "_") for m in exported for p in m.data.data_points for key in p.attributes
    }
    for asset in ("alerts.yml", "alerts_test.yml"):
        rules = (ASSETS / "prometheus" / asset).read_text()
        used = set(re.findall(r"\b(?:db_client|pgleakguard)_[a-z_]+", rules))
        series = {n for n in used if not n.endswith(("_name", "_kind", "_severity", "_state"))}
        assert series <= names, f"{asset} uses series no instrument exports: {series - names}"
        assert series, asset
        used_labels = set(re.findall(r"([a-z_]+)=\"", rules)) | set(
            re.findall(r"\$labels\.([a-z_]+)", rules)
        )
        used_labels -= {"severity", "alertname"}  # the rules' own labels
        assert used_labels <= labels, f"{asset} uses labels never exported: {used_labels - labels}"
    assert "pgleakguard_checkout_oldest_age_seconds" in names
    assert "db_client_connection_use_time_seconds_bucket" in names


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
