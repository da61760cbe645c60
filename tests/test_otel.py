"""OpenTelemetry: semantic-convention pool metrics and a leak span in the trace of the request
that leaked, with the real SDK and in-memory exporters."""

from __future__ import annotations

import asyncio
import gc
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psycopg
import psycopg_pool
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import Gauge, Histogram, Sum
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, StatusCode, TraceFlags
from sqlalchemy import create_engine, exc, text
from sqlalchemy.ext.asyncio import create_async_engine

import pgleakguard
from pgleakguard import _runtime, _safety
from pgleakguard.otel import DURATION_BUCKETS, USE_TIME_BUCKETS, Telemetry

from conftest import EventLog, marked_line
from otel_sdk import POOL, Otel, all_instruments_workload, points, pool, sa_url, value

HERE = __file__


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {condition}")
        time.sleep(0.01)


def server_name(conn: psycopg.Connection[Any]) -> str:
    return f"{conn.info.host}:{conn.info.port}/{conn.info.dbname}"


# -- metrics ---------------------------------------------------------------------------------


def test_psycopg_pool_metrics_follow_the_semantic_conventions(
    pg_dsn: str, otel: Otel, install: Callable[..., EventLog]
) -> None:
    install(leak_threshold=60, **otel.options())
    labels = pool("orders")
    with psycopg_pool.ConnectionPool(pg_dsn, min_size=2, max_size=3, name="orders") as p:
        p.wait()
        before_a = time.monotonic()
        a = p.getconn()
        after_a = time.monotonic()
        b, c = p.getconn(), p.getconn()
        p.putconn(c)
        d = p.getconn()
        # a fourth client waits for a connection while the metrics are collected
        waiter = threading.Thread(target=lambda: p.putconn(p.getconn(timeout=10)))
        waiter.start()
        wait_until(lambda: p.get_stats()["requests_waiting"] == 1)
        collecting = time.monotonic()
        busy = otel.metrics()
        collected = time.monotonic()
        p.putconn(a)
        waiter.join()
        e = p.getconn()
        with pytest.raises(psycopg_pool.PoolTimeout):
            p.getconn(timeout=0.1)
        after = otel.metrics()
        for conn in (b, d, e):
            p.putconn(conn)

    count = busy["db.client.connection.count"]
    assert value(count, **pool("orders", "used")) == 3
    assert value(count, **pool("orders", "idle")) == 0
    assert value(busy["db.client.connection.pending_requests"], **labels) == 1
    assert value(busy["db.client.connection.max"], **labels) == 3
    assert value(busy["db.client.connection.idle.min"], **labels) == 2
    assert value(busy["pgleakguard.checkout.count"], **labels) == 3
    # the oldest checkout is a: taken between before_a and after_a, seen during the collection
    oldest = value(busy["pgleakguard.checkout.oldest_age"], **labels)
    assert collecting - after_a <= oldest <= collected - before_a

    assert value(after["db.client.connection.timeouts"], **labels) == 1
    [wait] = points(after["db.client.connection.wait_time"], **labels)
    assert wait.count == 6  # a, b, c, d, the waiter's, e
    assert tuple(wait.explicit_bounds) == DURATION_BUCKETS
    [use] = points(after["db.client.connection.use_time"], **labels)
    assert use.count == 3  # c, a, the waiter's
    assert tuple(use.explicit_bounds) == USE_TIME_BUCKETS
    [create] = points(after["db.client.connection.create_time"], **labels)
    assert create.count == 3 and create.sum > 0
    assert tuple(create.explicit_bounds) == DURATION_BUCKETS


def test_histogram_buckets_are_in_seconds(
    pg_dsn: str, otel: Otel, install: Callable[..., EventLog]
) -> None:
    """Sub-second use times land in sub-second buckets, not all in the SDK's first one."""
    install(leak_threshold=60, **otel.options())
    with psycopg_pool.ConnectionPool(pg_dsn, min_size=1, max_size=1, name="b") as p:
        with p.connection():
            pass  # well under 5 ms
        with p.connection():
            time.sleep(0.06)  # between 0.05 and 0.1 s
    [use] = points(otel.metrics()["db.client.connection.use_time"], **pool("b"))
    counts = dict(zip([*USE_TIME_BUCKETS, float("inf")], use.bucket_counts))
    assert counts[0.1] == 1  # (0.05, 0.1]
    assert counts[0.001] + counts[0.005] == 1
    assert sum(use.bucket_counts) == 2


#: name -> (unit, kind of data point) for every instrument pgleakguard creates.
INSTRUMENTS = {
    "db.client.connection.count": ("{connection}", "updown"),
    "db.client.connection.max": ("{connection}", "updown"),
    "db.client.connection.idle.max": ("{connection}", "updown"),
    "db.client.connection.idle.min": ("{connection}", "updown"),
    "db.client.connection.pending_requests": ("{request}", "updown"),
    "db.client.connection.timeouts": ("{timeout}", "counter"),
    "db.client.connection.create_time": ("s", "histogram"),
    "db.client.connection.wait_time": ("s", "histogram"),
    "db.client.connection.use_time": ("s", "histogram"),
    "pgleakguard.leaks": ("{leak}", "counter"),
    "pgleakguard.checkout.count": ("{checkout}", "updown"),
    "pgleakguard.checkout.oldest_age": ("s", "gauge"),
}


def kind_of(metric: Any) -> str:
    data = metric.data
    if isinstance(data, Histogram):
        return "histogram"
    if isinstance(data, Gauge):
        return "gauge"
    assert isinstance(data, Sum)
    return "counter" if data.is_monotonic else "updown"


def test_every_instrument_has_its_unit_and_kind(
    pg_dsn: str, otel: Otel, install: Callable[..., EventLog]
) -> None:
    install(leak_threshold=60, **otel.options())
    m = all_instruments_workload(pg_dsn, otel)
    assert {name: (metric.unit, kind_of(metric)) for name, metric in m.items()} == INSTRUMENTS


def test_sqlalchemy_pool_metrics_with_waits_and_timeouts(
    pg_dsn: str, otel: Otel, install: Callable[..., EventLog]
) -> None:
    install(leak_threshold=60, **otel.options())
    engine = create_engine(
        sa_url(pg_dsn), pool_size=1, max_overflow=1, pool_timeout=10, logging_name="sa"
    )
    name = "sa"
    with engine.connect() as one:
        one.execute(text("SELECT 1"))
    held, other = engine.connect(), engine.connect()  # both slots taken
    waiter = threading.Thread(target=lambda: engine.connect().close())
    waiter.start()
    wait_until(
        lambda: value(otel.metrics()["db.client.connection.pending_requests"], **pool(name)) == 1
    )
    busy = otel.metrics()
    other.close()
    waiter.join()
    short = create_engine(
        sa_url(pg_dsn), pool_size=1, max_overflow=0, pool_timeout=0.05, logging_name="short"
    )
    with short.connect(), pytest.raises(exc.TimeoutError):
        short.connect()
    m = otel.metrics()
    held.close()
    engine.dispose()
    short.dispose()
    count = busy["db.client.connection.count"]
    assert value(count, **pool(name, "used")) == 2
    assert value(count, **pool(name, "idle")) == 0
    assert value(busy["db.client.connection.max"], **pool(name)) == 2
    assert value(busy["db.client.connection.idle.max"], **pool(name)) == 1
    assert value(m["db.client.connection.pending_requests"], **pool(name)) == 0
    [use] = points(m["db.client.connection.use_time"], **pool(name))
    assert use.count == 3  # the first connect, other, the waiter's
    [wait] = points(m["db.client.connection.wait_time"], **pool(name))
    assert wait.count == 4  # the first connect, held, other, the waiter's
    [create] = points(m["db.client.connection.create_time"], **pool(name))
    assert create.count == 2
    # each pool's series starts at 0, before its first timeout
    assert value(m["db.client.connection.timeouts"], **pool(name)) == 0
    assert value(m["db.client.connection.timeouts"], **pool("short")) == 1


def test_async_pool_metrics(pg_dsn: str, otel: Otel, install: Callable[..., EventLog]) -> None:
    install(leak_threshold=60, **otel.options())

    async def work() -> dict[str, Any]:
        async with psycopg_pool.AsyncConnectionPool(
            pg_dsn, min_size=1, max_size=2, name="apool"
        ) as p:
            async with p.connection() as conn:
                await conn.execute("SELECT 1")
            held = await p.getconn()
            m = otel.metrics()
            await p.putconn(held)
            return m

    busy = asyncio.run(work())
    after = otel.metrics()
    count = busy["db.client.connection.count"]
    assert value(count, **pool("apool", "used")) == 1
    assert value(busy["db.client.connection.max"], **pool("apool")) == 2
    [wait] = points(after["db.client.connection.wait_time"], **pool("apool"))
    [use] = points(after["db.client.connection.use_time"], **pool("apool"))
    assert (wait.count, use.count) == (2, 2)


def test_async_engine_metrics(pg_dsn: str, otel: Otel, install: Callable[..., EventLog]) -> None:
    install(leak_threshold=60, **otel.options())

    async def work() -> dict[str, Any]:
        engine = create_async_engine(sa_url(pg_dsn), pool_size=2, max_overflow=0)
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            m = otel.metrics()
        await engine.dispose()
        return m

    busy = asyncio.run(work())
    after = otel.metrics()
    name = "postgresql+psycopg:///postgres"
    assert value(busy["db.client.connection.count"], **pool(name, "used")) == 1
    assert value(busy["db.client.connection.max"], **pool(name)) == 2
    [use] = points(after["db.client.connection.use_time"], **pool(name))
    assert use.count == 1


def test_raw_psycopg_connection_is_named_after_its_server(
    pg_dsn: str, otel: Otel, install: Callable[..., EventLog]
) -> None:
    install(leak_threshold=60, **otel.options())
    with psycopg.connect(pg_dsn) as conn:
        name = server_name(conn)
        conn.execute("SELECT 1")
        busy = otel.metrics()
    after = otel.metrics()
    assert name.endswith("/postgres") and "unnamed" not in name
    assert value(busy["db.client.connection.count"], **pool(name, "used")) == 1
    assert value(busy["db.client.connection.count"], **pool(name, "idle")) == 0
    assert value(busy["pgleakguard.checkout.count"], **pool(name)) == 1
    [use] = points(after["db.client.connection.use_time"], **pool(name))
    assert use.count == 1
    assert "db.client.connection.count" not in after


def test_metrics_of_a_forked_child_are_its_own(pg_dsn: str, tmp_path: Path) -> None:
    script = tmp_path / "forked.py"
    script.write_text(FORKED)
    proc = subprocess.run(
        [sys.executable, str(script), pg_dsn], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["parent", "1", "child", "2"]


FORKED = """
import os, sys
import psycopg
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
import pgleakguard

reader = InMemoryMetricReader()
pgleakguard.install(meter_provider=MeterProvider(metric_readers=[reader]), leak_threshold=60)

def used():
    data = reader.get_metrics_data()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == "pgleakguard.checkout.count":
                    return sum(p.value for p in m.data.data_points)
    return 0

conn = psycopg.connect(sys.argv[1])
print("parent", used(), flush=True)
conn.close()
pid = os.fork()
if pid == 0:  # the child takes two connections of its own
    a, b = psycopg.connect(sys.argv[1]), psycopg.connect(sys.argv[1])
    print("child", used(), flush=True)
    a.close(); b.close()
    os._exit(0)
os.waitpid(pid, 0)
"""


# -- spans -----------------------------------------------------------------------------------


def test_leak_span_carries_the_call_site_and_is_in_the_requests_trace(
    pg_dsn: str, otel: Otel, install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=60, **otel.options())
    tracer = otel.tracer_provider.get_tracer("app")
    kept: list[Any] = []

    def background_job() -> None:
        kept.append(psycopg.connect(pg_dsn))  # leak: otel-leak

    with tracer.start_as_current_span("GET /orders") as request:
        # the thread runs inside the request's context, as executors propagating it do
        ctx = otel_context.get_current()
        worker = threading.Thread(target=lambda: otel_context.attach(ctx) and background_job())
        worker.start()
        worker.join()
    [event] = events.wait_for("owner_exited")
    [span] = otel.spans("pgleakguard.leak")
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
    assert attrs[POOL] == server_name(kept[0])
    # a child of the request's span (which was sampled): in the same trace, no link needed
    request_ctx = request.get_span_context()
    assert span.parent is not None
    assert (span.parent.trace_id, span.parent.span_id) == (
        request_ctx.trace_id,
        request_ctx.span_id,
    )
    assert span.context.trace_id == request_ctx.trace_id
    assert list(span.links) == []
    assert event.trace_id == format(request_ctx.trace_id, "032x")
    leaks = otel.metrics()["pgleakguard.leaks"]
    assert value(leaks, **{"pgleakguard.leak.kind": "owner_exited"}) == 1
    kept[0].close()


def remote_parent(sampled: bool) -> SpanContext:
    """The context of an incoming request (a traceparent header), sampled upstream or not."""
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, flags)


def test_leak_span_of_a_sampled_request_is_kept_by_a_ratio_sampler_of_zero(
    pg_dsn: str, install: Callable[..., EventLog]
) -> None:
    """ParentBased(TraceIdRatioBased(0)): no root span is sampled, a sampled request's are."""
    sdk = Otel(sampler=ParentBased(TraceIdRatioBased(0)))
    try:
        events = install(leak_threshold=0.2, **sdk.options())
        tracer = sdk.tracer_provider.get_tracer("app")
        incoming = trace.set_span_in_context(NonRecordingSpan(remote_parent(sampled=True)))
        with tracer.start_as_current_span("GET /orders", context=incoming) as request:
            in_request = psycopg.connect(pg_dsn)
        outside = psycopg.connect(pg_dsn)  # no request: the leak span is a root span
        events.wait_for("held_too_long", count=2)
        in_request.close()
        outside.close()
        [span] = sdk.spans("pgleakguard.leak")
        assert span.parent is not None
        assert span.parent.span_id == request.get_span_context().span_id
        assert span.context.trace_id == remote_parent(True).trace_id
        assert span.context.trace_flags.sampled
    finally:
        sdk.shutdown()


def test_leak_span_of_an_unsampled_request_is_a_root_whose_link_has_the_real_flags(
    pg_dsn: str, otel: Otel, install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=0.2, **otel.options())
    token = otel_context.attach(
        trace.set_span_in_context(NonRecordingSpan(remote_parent(sampled=False)))
    )
    try:
        conn = psycopg.connect(pg_dsn)
    finally:
        otel_context.detach(token)
    events.wait_for("held_too_long")
    conn.close()
    [span] = otel.spans("pgleakguard.leak")
    assert span.parent is None  # a root: the default sampler (ParentBased(ALWAYS_ON)) keeps it
    [link] = span.links
    assert link.context.span_id == remote_parent(False).span_id
    assert link.context.trace_flags == TraceFlags.DEFAULT  # not claimed to be sampled


def test_checkout_spans_are_optional_and_children_of_the_request(
    pg_dsn: str, otel: Otel, install: Callable[..., EventLog]
) -> None:
    install(**otel.options())
    tracer = otel.tracer_provider.get_tracer("app")
    with psycopg_pool.ConnectionPool(pg_dsn, min_size=1, name="p") as p:
        with p.connection():
            pass
        assert otel.exporter.get_finished_spans() == ()
        pgleakguard.install(otel_checkout_spans=True, service="tests", **otel.options())
        with tracer.start_as_current_span("GET /") as request, p.connection():
            pass
    [span] = otel.spans("pgleakguard.checkout")
    assert dict(span.attributes or {}) == {POOL: "p"}
    assert span.parent is not None
    assert span.parent.span_id == request.get_span_context().span_id


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_checkout_span_ends_when_its_connection_is_garbage_collected(
    pg_dsn: str, otel: Otel, install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=60, otel_checkout_spans=True, **otel.options())

    def drop() -> None:
        psycopg.connect(pg_dsn)  # leak: otel-gc

    drop()
    gc.collect()
    events.wait_for("garbage_collected")
    wait_until(lambda: len(otel.spans("pgleakguard.leak")) == 1)
    [checkout] = otel.spans("pgleakguard.checkout")
    assert checkout.status.status_code is StatusCode.ERROR
    assert checkout.status.description == "connection leak: garbage_collected"
    assert [(e.name, dict(e.attributes or {})) for e in checkout.events] == [
        ("pgleakguard.leak", {"pgleakguard.leak.kind": "garbage_collected"})
    ]
    [leak] = otel.spans("pgleakguard.leak")
    assert leak.parent is not None and leak.parent.span_id == checkout.context.span_id
    assert dict(leak.attributes or {})["code.line.number"] == marked_line(HERE, "otel-gc")


def test_checkout_span_ends_with_the_never_closed_report_at_exit(
    pg_dsn: str, otel: Otel, install: Callable[..., EventLog]
) -> None:
    install(leak_threshold=60, otel_checkout_spans=True, **otel.options())
    conn = psycopg.connect(pg_dsn)
    _runtime._at_exit()  # what the interpreter's exit runs
    wait_until(lambda: len(otel.spans("pgleakguard.checkout")) == 1)
    [checkout] = otel.spans("pgleakguard.checkout")
    assert checkout.status.description == "connection leak: never_closed"
    conn.close()  # after the report: the span is not ended twice
    assert len(otel.spans("pgleakguard.checkout")) == 1
    [leak] = otel.spans("pgleakguard.leak")
    assert dict(leak.attributes or {})["pgleakguard.leak.kind"] == "never_closed"


def test_leak_spans_of_pooled_checkouts_name_their_pool(
    pg_dsn: str, otel: Otel, install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=0.2, **otel.options())
    engine = create_engine(sa_url(pg_dsn), pool_size=1, max_overflow=0)
    with psycopg_pool.ConnectionPool(pg_dsn, min_size=1, name="orders") as p:
        held = p.getconn()  # leak: pool-held
        sa = engine.connect()  # leak: sa-held
        events.wait_for("held_too_long", count=2)
        p.putconn(held)
        sa.close()
    engine.dispose()
    spans = {
        dict(s.attributes or {})[POOL]: dict(s.attributes or {})
        for s in otel.spans("pgleakguard.leak")
    }
    assert sorted(spans) == ["orders", "postgresql+psycopg:///postgres"]
    assert spans["orders"]["pgleakguard.integration"] == "psycopg_pool"
    assert spans["orders"]["code.line.number"] == marked_line(HERE, "pool-held")
    sa_attrs = spans["postgresql+psycopg:///postgres"]
    assert sa_attrs["pgleakguard.integration"] == "sqlalchemy"
    assert sa_attrs["code.line.number"] == marked_line(HERE, "sa-held")


# -- without an SDK, late SDK, off -----------------------------------------------------------


def test_without_an_sdk_nothing_is_recorded_and_nothing_breaks(
    pg_dsn: str,
    events: EventLog,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = _runtime.current()
    assert state is not None and state.tracker.telemetry is not None
    assert not state.tracker.telemetry.metrics_on
    assert not state.tracker.telemetry.traces_on
    with (
        caplog.at_level(logging.DEBUG),
        psycopg_pool.ConnectionPool(pg_dsn, min_size=1, timeout=0.1) as p,
    ):
        kept = p.getconn()
        with pytest.raises(psycopg_pool.PoolTimeout):
            p.getconn()
        [event] = events.wait_for("held_too_long")
        p.putconn(kept)
    assert event.trace_id is None
    assert [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")] == []
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


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


# -- next to the OpenTelemetry instrumentations ---------------------------------------------


@pytest.mark.parametrize("order", ["theirs_first", "ours_first"])
def test_coexists_with_opentelemetry_instrumentation_packages(
    order: str, pg_dsn: str, otel: Otel, install: Callable[..., EventLog]
) -> None:
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    engine = create_engine(sa_url(pg_dsn))
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
            by_scope = otel.metrics_by_scope()
        with psycopg.connect(pg_dsn) as raw:
            raw.execute("SELECT 2")
            [held] = pgleakguard.open_checkouts()
            assert (held.integration, held.backend_pid) == ("psycopg", raw.info.backend_pid)
        spans = [s.name for s in otel.exporter.get_finished_spans()]
    finally:
        sa_instrumentor.uninstrument()
        psycopg_instrumentor.uninstrument()
        engine.dispose()
    theirs = by_scope["opentelemetry.instrumentation.sqlalchemy", "db.client.connections.usage"]
    ours = by_scope["pgleakguard", "db.client.connection.count"]
    name = "postgresql+psycopg:///postgres"
    assert value(ours, **pool(name, "used")) == 1
    assert sum(p.value for p in theirs.data.data_points if p.attributes["state"] == "used") == 1
    # no metric name is exported twice with different units
    units: dict[str, set[str]] = {}
    for (_, metric_name), metric in by_scope.items():
        units.setdefault(metric_name, set()).add(metric.unit)
    assert {n: u for n, u in units.items() if len(u) > 1} == {}
    # their spans per statement, none from us (no leak), none duplicated by us
    assert spans.count("SELECT") == 2  # one per statement: SQLAlchemy's and psycopg's
    assert not [s for s in spans if s.startswith("pgleakguard")]


# -- fault injection -------------------------------------------------------------------------

#: Telemetry methods an internal error may come from; the user's work goes on.
FAULTS = ["_by_pool", "_stats", "created", "register_pool", "refresh", "__call__", "checked_out"]


@pytest.mark.allow_internal_errors
@pytest.mark.parametrize("method", FAULTS)
def test_a_fault_in_telemetry_is_counted_logged_once_and_changes_nothing(
    method: str,
    pg_dsn: str,
    otel: Otel,
    install: Callable[..., EventLog],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fault = RuntimeError(f"injected fault in {method}")

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise fault

    monkeypatch.setattr(Telemetry, method, boom)
    _safety.forget_logged()
    before = _safety.internal_error_count()
    with caplog.at_level(logging.WARNING):
        events = install(leak_threshold=0.2, **otel.options())  # refresh runs here
        with psycopg_pool.ConnectionPool(pg_dsn, min_size=1, max_size=1, name="f") as p:
            with p.connection() as conn:
                assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
            held = p.getconn()
            [event] = events.wait_for("held_too_long")  # the leak still reaches on_leak
            for _ in range(2):  # two collections: the callbacks run twice
                otel.reader.get_metrics_data()
            p.putconn(held)
    assert event.pool == "f"
    assert _safety.last_internal_error() is fault
    assert _safety.internal_error_count() > before
    ours = [r for r in caplog.records if "pgleakguard internal error" in r.getMessage()]
    assert len(ours) == 1
    # the SDK never sees our callbacks fail (it would log each failure of each collection)
    assert [r for r in caplog.records if "Callback failed" in r.getMessage()] == []


@pytest.mark.allow_internal_errors
def test_a_failing_pool_name_callback_counts_each_collection(
    pg_dsn: str, otel: Otel, install: Callable[..., EventLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(self: Any) -> Any:
        raise RuntimeError("injected fault in _by_pool")

    monkeypatch.setattr(Telemetry, "_by_pool", boom)
    install(leak_threshold=60, **otel.options())
    before = _safety.internal_error_count()
    otel.metrics()
    otel.metrics()
    # three callbacks read it (count, checkout count, oldest age), twice
    assert _safety.internal_error_count() - before == 6


AT_EXIT = """
import sys, time
import psycopg
import pgleakguard
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

pgleakguard.install(leak_threshold=60, otel_checkout_spans=True, service="exit")
provider = TracerProvider()  # registers its shutdown at exit, after pgleakguard's handler
provider.add_span_processor(
    SimpleSpanProcessor(
        ConsoleSpanExporter(
            out=sys.stdout,
            formatter=lambda s: f"{s.name} {s.status.description}\\n",
        )
    )
)
trace.set_tracer_provider(provider)
psycopg.connect(sys.argv[1]).close()  # starts the watchdog, which notices the provider
telemetry = pgleakguard._runtime.current().tracker.telemetry
deadline = time.monotonic() + 10
while not telemetry.traces_on and time.monotonic() < deadline:
    time.sleep(0.01)
conn = psycopg.connect(sys.argv[1])  # never closed
"""


def test_never_closed_spans_are_exported_before_the_sdk_shuts_down_at_exit(
    pg_dsn: str, tmp_path: Path
) -> None:
    script = tmp_path / "at_exit.py"
    script.write_text(AT_EXIT)
    proc = subprocess.run(
        [sys.executable, str(script), pg_dsn], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "pgleakguard.leak connection leak: never_closed",
        "pgleakguard.checkout connection leak: never_closed",
    ]
