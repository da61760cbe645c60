"""OpenTelemetry: semantic-convention pool metrics and a leak span linked to its request,
with the real SDK and in-memory exporters."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psycopg
import psycopg_pool
import pytest
from opentelemetry.trace import StatusCode
from sqlalchemy import create_engine, text

import pgleakguard
from pgleakguard import _runtime

from conftest import EventLog, marked_line
from otel_sdk import Otel

HERE = __file__
POOL = "db.client.connection.pool.name"


def points(metric: Any, **attrs: str) -> list[Any]:
    return [
        p
        for p in metric.data.data_points
        if all(p.attributes.get(k) == v for k, v in attrs.items())
    ]


def value(metric: Any, **attrs: str) -> Any:
    [point] = points(metric, **attrs)
    return point.value


def test_psycopg_pool_metrics_follow_the_semantic_conventions(
    pg_dsn: str, otel: Otel, install: Callable[..., EventLog]
) -> None:
    install(leak_threshold=60, **otel.options())
    labels = {POOL: "orders"}
    with psycopg_pool.ConnectionPool(pg_dsn, min_size=2, max_size=3, name="orders") as pool:
        pool.wait()
        a, b, c = pool.getconn(), pool.getconn(), pool.getconn()
        pool.putconn(c)
        d = pool.getconn()
        # a fourth client waits for a connection while the metrics are collected
        waiter = threading.Thread(target=lambda: pool.putconn(pool.getconn(timeout=10)))
        waiter.start()
        deadline = time.monotonic() + 10
        while pool.get_stats()["requests_waiting"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = otel.metrics()
        pool.putconn(a)
        waiter.join()
        e = pool.getconn()
        with pytest.raises(psycopg_pool.PoolTimeout):
            pool.getconn(timeout=0.1)
        after = otel.metrics()
        for conn in (b, d, e):
            pool.putconn(conn)

    count = busy["db.client.connection.count"]
    assert count.unit == "{connection}"
    assert value(count, **labels, **{"db.client.connection.state": "used"}) == 3
    assert value(count, **labels, **{"db.client.connection.state": "idle"}) == 0
    pending = busy["db.client.connection.pending_requests"]
    assert (pending.unit, value(pending, **labels)) == ("{request}", 1)
    assert busy["db.client.connection.max"].unit == "{connection}"
    assert value(busy["db.client.connection.max"], **labels) == 3
    assert value(busy["db.client.connection.idle.min"], **labels) == 2
    assert value(busy["pgleakguard.checkouts.open"], **labels) == 3
    oldest = busy["pgleakguard.checkout.oldest_age"]
    assert oldest.unit == "s" and value(oldest, **labels) > 0

    timeouts = after["db.client.connection.timeouts"]
    assert (timeouts.unit, value(timeouts, **labels)) == ("{timeout}", 1)
    wait = after["db.client.connection.wait_time"]
    [wait_point] = points(wait, **labels)
    assert (wait.unit, wait_point.count) == ("s", 6)  # a, b, c, d, the waiter's, e
    use = after["db.client.connection.use_time"]
    [use_point] = points(use, **labels)
    assert (use.unit, use_point.count) == ("s", 3)  # c, a, the waiter's
    [create_point] = points(after["db.client.connection.create_time"], **labels)
    assert create_point.count == 3 and create_point.sum > 0


def test_sqlalchemy_pool_metrics(pg_dsn: str, otel: Otel, install: Callable[..., EventLog]) -> None:
    install(leak_threshold=60, **otel.options())
    engine = create_engine(
        pg_dsn.replace("postgresql://", "postgresql+psycopg://"), pool_size=2, max_overflow=1
    )
    name = "postgresql+psycopg:///postgres"
    with engine.connect() as one:
        one.execute(text("SELECT 1"))
    held = engine.connect()
    m = otel.metrics()
    held.close()
    engine.dispose()
    count = m["db.client.connection.count"]
    assert value(count, **{POOL: name, "db.client.connection.state": "used"}) == 1
    assert value(count, **{POOL: name, "db.client.connection.state": "idle"}) == 0
    assert value(m["db.client.connection.max"], **{POOL: name}) == 3
    assert value(m["db.client.connection.idle.max"], **{POOL: name}) == 2
    [use] = points(m["db.client.connection.use_time"], **{POOL: name})
    assert use.count == 1
    [wait] = points(m["db.client.connection.wait_time"], **{POOL: name})
    assert wait.count == 2
    [create] = points(m["db.client.connection.create_time"], **{POOL: name})
    assert create.count == 1


def test_leak_span_carries_the_call_site_and_links_to_the_request(
    pg_dsn: str, otel: Otel, install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=60, **otel.options())
    tracer = otel.tracer_provider.get_tracer("app")
    kept: list[Any] = []

    def background_job() -> None:
        kept.append(psycopg.connect(pg_dsn))  # leak: otel-leak

    with tracer.start_as_current_span("GET /orders") as request:
        # the thread runs inside the request's context, as executors propagating it do
        from opentelemetry import context

        ctx = context.get_current()
        worker = threading.Thread(target=lambda: context.attach(ctx) and background_job())
        worker.start()
        worker.join()
    [event] = events.wait_for("owner_exited")
    spans = [s for s in otel.exporter.get_finished_spans() if s.name == "pgleakguard.leak"]
    assert len(spans) == 1
    span = spans[0]
    assert span.status.status_code is StatusCode.ERROR
    attrs = dict(span.attributes or {})
    line = marked_line(HERE, "otel-leak")
    assert attrs["db.system.name"] == "postgresql"
    assert attrs["code.file.path"] == HERE
    assert attrs["code.line.number"] == line
    assert attrs["code.function.name"] == "background_job"
    assert f'File "{HERE}", line {line}, in background_job' in attrs["code.stacktrace"]
    assert attrs["pgleakguard.leak.kind"] == "owner_exited"
    assert attrs["pgleakguard.checkout.age"] == pytest.approx(event.age, abs=1e-3)
    assert attrs["pgleakguard.backend_pid"] == kept[0].info.backend_pid
    assert attrs[POOL] == "unnamed"
    [link] = span.links
    assert link.context.span_id == request.get_span_context().span_id
    assert link.context.trace_id == request.get_span_context().trace_id
    assert event.trace_id == format(request.get_span_context().trace_id, "032x")
    leaks = otel.metrics()["pgleakguard.leaks"]
    assert value(leaks, **{"pgleakguard.leak.kind": "owner_exited"}) == 1
    kept[0].close()


def test_checkout_spans_are_optional(
    pg_dsn: str, otel: Otel, install: Callable[..., EventLog]
) -> None:
    install(**otel.options())
    with psycopg_pool.ConnectionPool(pg_dsn, min_size=1, name="p") as pool:
        with pool.connection():
            pass
        assert [s.name for s in otel.exporter.get_finished_spans()] == []
        pgleakguard.install(otel_checkout_spans=True, service="tests", **otel.options())
        with pool.connection():
            pass
    [span] = otel.exporter.get_finished_spans()
    assert span.name == "pgleakguard.checkout"
    assert dict(span.attributes or {}) == {POOL: "p"}


def test_without_an_sdk_nothing_is_recorded_and_nothing_breaks(
    pg_dsn: str, events: EventLog
) -> None:
    state = _runtime.current()
    assert state is not None and state.tracker.telemetry is not None
    assert not state.tracker.telemetry.metrics_on
    assert not state.tracker.telemetry.traces_on
    with psycopg_pool.ConnectionPool(pg_dsn, min_size=1, timeout=0.1) as pool:
        kept = pool.getconn()
        with pytest.raises(psycopg_pool.PoolTimeout):
            pool.getconn()
        events.wait_for("held_too_long")
        pool.putconn(kept)


LATE_SDK = """
import sys, time
import psycopg
import pgleakguard

pgleakguard.install(leak_threshold=0.2, service="late")
assert "opentelemetry" not in sys.modules, "install() imported OpenTelemetry"
with psycopg.connect(sys.argv[1]) as conn:
    conn.execute("SELECT 1")
assert "opentelemetry" not in sys.modules, "a checkout imported OpenTelemetry"

# The application configures its SDK only now.
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
conn = psycopg.connect(sys.argv[1])
deadline = time.monotonic() + 10
while not exporter.get_finished_spans() and time.monotonic() < deadline:
    time.sleep(0.02)
[span] = exporter.get_finished_spans()
print(span.name, span.attributes["pgleakguard.leak.kind"])
conn.close()
"""


def test_opentelemetry_is_not_imported_until_the_application_imports_it(
    pg_dsn: str, tmp_path: Path
) -> None:
    script = tmp_path / "late_sdk.py"
    script.write_text(LATE_SDK)
    proc = subprocess.run(
        [sys.executable, str(script), pg_dsn], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "pgleakguard.leak held_too_long"


def test_otel_can_be_turned_off(install: Callable[..., EventLog]) -> None:
    install(otel=False)
    state = _runtime.current()
    assert state is not None and state.tracker.telemetry is None


@pytest.mark.parametrize("order", ["theirs_first", "ours_first"])
def test_coexists_with_opentelemetry_instrumentation_packages(
    order: str, pg_dsn: str, otel: Otel, install: Callable[..., EventLog]
) -> None:
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    engine = create_engine(pg_dsn.replace("postgresql://", "postgresql+psycopg://"))
    if order == "ours_first":
        install(**otel.options())
    psycopg_instrumentor = PsycopgInstrumentor()
    psycopg_instrumentor.instrument(tracer_provider=otel.tracer_provider, skip_dep_check=True)
    sa_instrumentor = SQLAlchemyInstrumentor()
    sa_instrumentor.instrument(
        engine=engine,
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
        skip_dep_check=True,
    )
    try:
        if order == "theirs_first":
            install(**otel.options())  # their wrappers stay in the chain
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        with psycopg.connect(pg_dsn) as raw:
            raw.execute("SELECT 2")
            [held] = pgleakguard.open_checkouts()
            assert (held.integration, held.backend_pid) == ("psycopg", raw.info.backend_pid)
        m = otel.metrics()
        spans = [s.name for s in otel.exporter.get_finished_spans()]
    finally:
        sa_instrumentor.uninstrument()
        psycopg_instrumentor.uninstrument()
        engine.dispose()
    # theirs and ours side by side, no name used twice with another unit
    assert "db.client.connections.usage" in m or "db.client.connection.count" in m
    units: dict[str, str] = {}
    for name, metric in m.items():
        assert units.setdefault(name, metric.unit) == metric.unit
    ours = {n for n in m if n.startswith(("db.client.connection.", "pgleakguard."))}
    assert "db.client.connection.count" in ours
    # their spans per statement, none from us (no leak), none duplicated by us
    assert spans.count("SELECT") == 2  # one per statement: SQLAlchemy's and psycopg's
    assert not [s for s in spans if s.startswith("pgleakguard")]
