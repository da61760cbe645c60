"""Fault injection at every hook entry point: the user's operation completes exactly as
without pgleakguard, one line is logged (not one per call), and the counter goes up."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, Callable

import psycopg
import psycopg_pool
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import create_engine, exc, text

import pgleakguard
from pgleakguard import _runtime, _safety, sinks, tagging, watchdog
from pgleakguard.integrations import psycopg as psycopg_hooks
from pgleakguard.integrations import psycopg_pool as pool_hooks
from pgleakguard.integrations import sqlalchemy as sa_hooks
from pgleakguard.otel import Telemetry

from conftest import EventLog

pytestmark = pytest.mark.allow_internal_errors


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected fault")


# Each fault: (what is broken, the object, the attribute); the same user workload runs.
FAULTS = [
    ("psycopg connect: tag", psycopg_hooks.PsycopgIntegration, "connect_kwargs"),
    ("psycopg connect: track", psycopg_hooks.PsycopgIntegration, "connected"),
    ("psycopg wait: activity", psycopg_hooks, "_touch"),
    ("psycopg close / pool checkin", pgleakguard.tracker.Tracker, "end"),
    ("every checkout", pgleakguard.tracker.Tracker, "begin"),
    ("call-site capture", pgleakguard.tracker, "_capture"),
    ("pool timeout culprits", pool_hooks, "describe_holders"),
    ("pool metrics", pool_hooks, "pool_stats"),
    ("SQLAlchemy connect: tag", tagging, "application_name"),
    ("SQLAlchemy engine_connect", sa_hooks, "pool_name"),
    ("SQLAlchemy timeout culprits", sa_hooks, "describe_holders"),
    ("SQLAlchemy comments", tagging, "sql_comment"),
    ("OpenTelemetry checkout", Telemetry, "checked_out"),
    ("OpenTelemetry checkin", Telemetry, "checked_in"),
    ("OpenTelemetry waits", Telemetry, "waited"),
]


def workload(dsn: str) -> list[Any]:
    """What a user does: raw connections, pool checkouts, a pool timeout, SQLAlchemy."""
    results: list[Any] = []
    with psycopg.connect(dsn) as conn:
        results.append(conn.execute("SELECT 40 + 2").fetchone())
    with (
        psycopg_pool.ConnectionPool(dsn, min_size=1, max_size=1, name="f") as pool,
        pool.connection() as conn,
    ):
        results.append(conn.execute("SELECT 'pool'").fetchone())
        with pytest.raises(psycopg_pool.PoolTimeout) as timeout:
            pool.getconn(timeout=0.05)
        results.append(str(timeout.value).splitlines()[0])
    engine = create_engine(
        dsn.replace("postgresql://", "postgresql+psycopg://"),
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.05,
    )
    with engine.connect() as conn:
        results.append(tuple(conn.execute(text("SELECT 'sa'")).one()))
        with pytest.raises(exc.TimeoutError) as sa_timeout:
            engine.connect()
        # the original text (before SQLAlchemy's link, which pgleakguard moves down a line)
        results.append(str(sa_timeout.value).split(" (Background")[0].splitlines()[0])
        results.append(sa_timeout.value.code)
    engine.dispose()
    return results


@pytest.fixture(scope="module")
def expected(pg_dsn: str) -> list[Any]:
    return workload(pg_dsn)  # without pgleakguard


def collect(sdk: dict[str, Any]) -> None:
    """An exporter's collection: runs the observable instruments' callbacks."""
    sdk["reader"].get_metrics_data()


@pytest.fixture
def otel_sdk() -> Iterator[dict[str, Any]]:
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    tracers = TracerProvider()
    yield {"meter_provider": meters, "tracer_provider": tracers, "reader": reader}
    meters.shutdown()
    tracers.shutdown()


@pytest.mark.parametrize(("where", "owner", "name"), FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_never_changes_the_users_operation(
    where: str,
    owner: Any,
    name: str,
    pg_dsn: str,
    expected: list[Any],
    install: Callable[..., EventLog],
    otel_sdk: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(owner, name, _boom)
    _safety.forget_logged()
    install(
        sql_comments=True,
        meter_provider=otel_sdk["meter_provider"],
        tracer_provider=otel_sdk["tracer_provider"],
    )
    before = _safety.internal_error_count()
    with caplog.at_level(logging.ERROR, logger="pgleakguard"):
        got = workload(pg_dsn)
        got_again = workload(pg_dsn)
        collect(otel_sdk)
    assert got == expected
    assert got_again == expected
    errors = _safety.internal_error_count() - before
    assert errors >= 1, f"the fault in {where} was never hit"
    assert pgleakguard.stats()["internal_errors"] >= errors
    logged = [r for r in caplog.records if "pgleakguard internal error" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]  # once, not once per call


def test_fault_in_the_watchdog_scan_does_not_stop_it(
    pg_dsn: str, install: Callable[..., EventLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    events = install(leak_threshold=0.2)
    original = watchdog.Watchdog.scan
    calls = {"n": 0}

    def flaky(self: Any) -> None:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise RuntimeError("injected fault")
        original(self)

    monkeypatch.setattr(watchdog.Watchdog, "scan", flaky)
    with psycopg.connect(pg_dsn):
        events.wait_for("held_too_long")
    assert calls["n"] > 3
    assert _safety.internal_error_count() >= 3


def test_a_raising_or_slow_sink_never_delays_the_watchdog(
    pg_dsn: str, install: Callable[..., EventLog], tmp_path: Any
) -> None:
    received = EventLog()
    slow_calls: list[float] = []

    def slow_sink(event: Any) -> None:
        slow_calls.append(time.monotonic())
        time.sleep(2.0)

    def raising_sink(event: Any) -> None:
        raise ValueError("sink broke")

    install(leak_threshold=0.1, on_leak=slow_sink, jsonl_path=str(tmp_path / "no/such/dir.jsonl"))
    state = _runtime.current()
    assert state is not None
    state.dispatcher.sinks[1:1] = [raising_sink]
    state.dispatcher.sinks.append(received.append)
    scans_before = state.watchdog.scans
    conns = [psycopg.connect(pg_dsn) for _ in range(3)]
    time.sleep(1.0)
    # the watchdog kept its schedule (every 25 ms) while the slow sink slept
    assert state.watchdog.scans - scans_before >= 20
    received.wait_for("held_too_long", timeout=15, count=3)  # the last sink still got all
    assert len(slow_calls) >= 1
    assert _safety.internal_error_count() >= 2
    for conn in conns:
        conn.close()


def test_event_queue_is_bounded(pg_dsn: str, install: Callable[..., EventLog]) -> None:
    import threading

    gate = threading.Event()
    install(leak_threshold=0.05, on_leak=lambda e: gate.wait(10))
    state = _runtime.current()
    assert state is not None
    state.delivery._limit = 2
    conns = [psycopg.connect(pg_dsn) for _ in range(6)]
    deadline = time.monotonic() + 10
    while pgleakguard.stats()["dropped_events"] < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pgleakguard.stats()["dropped_events"] >= 3
    gate.set()
    for conn in conns:
        conn.close()


def test_logging_handler_that_raises_does_not_reach_the_caller(
    pg_dsn: str, install: Callable[..., EventLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Broken(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise OSError("disk full")

    monkeypatch.setattr(logging, "raiseExceptions", False)
    handler = Broken()
    logging.getLogger("pgleakguard").addHandler(handler)
    try:
        events = install(leak_threshold=0.1)
        with psycopg.connect(pg_dsn) as conn:
            events.wait_for("held_too_long")
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        logging.getLogger("pgleakguard").removeHandler(handler)


def test_sinks_module_exposes_one_delivery_thread() -> None:
    assert sinks.Delivery.__doc__ and "bounded" in sinks.Delivery.__doc__
