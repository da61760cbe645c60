"""The real OpenTelemetry SDK with in-memory readers, for the tests that look at what
pgleakguard records (imported by those tests only: the rest of the suite runs without it)."""

from __future__ import annotations

from typing import Any

import psycopg_pool
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Sampler
from sqlalchemy import create_engine

POOL = "db.client.connection.pool.name"
STATE = "db.client.connection.state"


class Otel:
    """A real SDK: metrics through an in-memory reader, spans through an in-memory exporter."""

    def __init__(self, sampler: Sampler | None = None) -> None:
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider(sampler=sampler)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def metrics(self, scope: str | None = "pgleakguard") -> dict[str, Any]:
        """name -> metric (with .unit and .data.data_points) from one collection, of the
        instrumentation scope ``scope`` (None: every scope)."""
        return {
            name: metric
            for (scope_name, name), metric in self.metrics_by_scope().items()
            if scope in (None, scope_name)
        }

    def metrics_by_scope(self) -> dict[tuple[str, str], Any]:
        """(instrumentation scope, name) -> metric, from one collection."""
        data = self.reader.get_metrics_data()
        out: dict[tuple[str, str], Any] = {}
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    out[scope.scope.name, metric.name] = metric
        return out

    def spans(self, name: str) -> list[ReadableSpan]:
        """The finished spans called ``name``."""
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def options(self) -> dict[str, Any]:
        return {"meter_provider": self.meter_provider, "tracer_provider": self.tracer_provider}

    def shutdown(self) -> None:
        self.meter_provider.shutdown()
        self.tracer_provider.shutdown()


def points(metric: Any, **attrs: str) -> list[Any]:
    """The data points of ``metric`` whose attributes include ``attrs``."""
    return [
        p
        for p in metric.data.data_points
        if all(p.attributes.get(k) == v for k, v in attrs.items())
    ]


def value(metric: Any, **attrs: str) -> Any:
    """The value of the one data point of ``metric`` with ``attrs``."""
    [point] = points(metric, **attrs)
    return point.value


def pool(name: str, state: str | None = None) -> dict[str, str]:
    """The attributes of pool ``name`` (and connection ``state``), as keyword arguments."""
    attrs = {POOL: name}
    if state is not None:
        attrs[STATE] = state
    return attrs


def sa_url(dsn: str, driver: str = "psycopg") -> str:
    """``dsn`` as a SQLAlchemy URL for ``driver``."""
    return dsn.replace("postgresql://", f"postgresql+{driver}://")


def all_instruments_workload(dsn: str, otel: Otel) -> dict[str, Any]:
    """Every instrument with a data point (pgleakguard installed with ``otel``'s providers):
    a pool with a timeout, SQLAlchemy's QueuePool; the metrics collected meanwhile."""
    engine = create_engine(sa_url(dsn), pool_size=1, max_overflow=0)
    with psycopg_pool.ConnectionPool(dsn, min_size=1, max_size=1, name="all") as p:
        with p.connection(), pytest.raises(psycopg_pool.PoolTimeout):
            p.getconn(timeout=0.05)
        with engine.connect():
            m = otel.metrics()
    engine.dispose()
    return m
