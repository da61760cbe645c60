"""Fault injection at every hook entry point: the user's operation completes exactly as
without pgleakguard, one line is logged (not one per call), and the counter goes up."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
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

from conftest import EventLog, settle, wait_until

pytestmark = pytest.mark.allow_internal_errors


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected fault")


def injected(where: str) -> tuple[Callable[..., Any], list[int]]:
    """A fault for ``where``: a function that raises ``injected fault: <where>``, and the
    list it appends to on every call (so a test can tell the fault was reached)."""
    calls: list[int] = []

    def boom(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise RuntimeError(f"injected fault: {where}")

    return boom, calls


# Each fault: (what is broken, the object, the attribute); the same user workload runs.
FAULTS = [
    ("psycopg connect: tag", psycopg_hooks.PsycopgIntegration, "connect_kwargs"),
    ("psycopg connect: track", psycopg_hooks.PsycopgIntegration, "connected"),
    ("psycopg wait: statement starts", psycopg_hooks, "_busy"),
    ("psycopg wait: activity", psycopg_hooks, "_touch"),
    ("psycopg close / pool checkin", pgleakguard.tracker.Tracker, "end"),
    ("every checkout", pgleakguard.tracker.Tracker, "begin"),
    ("call-site capture", pgleakguard.tracker, "_capture"),
    ("pool timeout culprits", pool_hooks, "describe_holders"),
    ("pool metrics", pool_hooks, "pool_stats"),
    ("SQLAlchemy connect: tag", tagging, "application_name"),
    ("SQLAlchemy first connection: pool name", sa_hooks, "pool_name"),
    ("SQLAlchemy timeout culprits", sa_hooks, "describe_holders"),
    ("SQLAlchemy comments", tagging, "sql_comment"),
    ("OpenTelemetry checkout", Telemetry, "checked_out"),
    ("OpenTelemetry checkin", Telemetry, "checked_in"),
    ("OpenTelemetry waits", Telemetry, "waited"),
]
# The async entry points (AsyncConnection.connect / wait / close, AsyncConnectionPool.getconn /
# putconn / its PoolTimeout) reach the same glue: every fault but SQLAlchemy's.
ASYNC_FAULTS = [f for f in FAULTS if f[1] is not sa_hooks and f[2] != "sql_comment"]
CASES = [(*f, "sync") for f in FAULTS] + [(*f, "async") for f in ASYNC_FAULTS]


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


async def aworkload(dsn: str) -> list[Any]:
    """The same with asyncio: raw AsyncConnection, the async pool and its timeout."""
    results: list[Any] = []
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        results.append(await (await conn.execute("SELECT 40 + 2")).fetchone())
    pool = psycopg_pool.AsyncConnectionPool(dsn, min_size=1, max_size=1, name="af", open=False)
    async with pool, pool.connection() as conn:
        results.append(await (await conn.execute("SELECT 'pool'")).fetchone())
        with pytest.raises(psycopg_pool.PoolTimeout) as timeout:
            await pool.getconn(timeout=0.05)
        results.append(str(timeout.value).splitlines()[0])
    return results


WORKLOADS: dict[str, Callable[[str], list[Any]]] = {
    "sync": workload,
    "async": lambda dsn: asyncio.run(aworkload(dsn)),
}


@pytest.fixture(scope="module")
def expected(pg_dsn: str) -> dict[str, list[Any]]:
    return {flavor: run(pg_dsn) for flavor, run in WORKLOADS.items()}  # without pgleakguard


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


@pytest.mark.parametrize(
    ("where", "owner", "name", "flavor"), CASES, ids=[f"{c[0]} ({c[3]})" for c in CASES]
)
def test_fault_never_changes_the_users_operation(
    where: str,
    owner: Any,
    name: str,
    flavor: str,
    pg_dsn: str,
    expected: dict[str, list[Any]],
    install: Callable[..., EventLog],
    otel_sdk: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    boom, calls = injected(where)
    monkeypatch.setattr(owner, name, boom)
    _safety.forget_logged()
    install(
        sql_comments=True,
        meter_provider=otel_sdk["meter_provider"],
        tracer_provider=otel_sdk["tracer_provider"],
    )
    before = _safety.internal_error_count()
    run = WORKLOADS[flavor]
    with caplog.at_level(logging.ERROR, logger="pgleakguard"):
        got = run(pg_dsn)
        got_again = run(pg_dsn)
        collect(otel_sdk)
    assert got == expected[flavor]
    assert got_again == expected[flavor]
    assert calls, f"the fault in {where} was never reached"
    # every time the hook was reached its fault was swallowed and counted, and nothing else
    assert _safety.internal_error_count() - before == len(calls)
    assert str(_safety.last_internal_error()) == f"injected fault: {where}"
    assert_logged_once(caplog, where)


def assert_logged_once(caplog: pytest.LogCaptureFixture, where: str) -> None:
    """One "internal error" line (not one per call), carrying the injected fault."""
    logged = [r for r in caplog.records if "pgleakguard internal error" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert logged[0].exc_info is not None
    assert str(logged[0].exc_info[1]) == f"injected fault: {where}"


@pytest.mark.parametrize("part", ["tick", "scan", "flush"])
def test_a_fault_in_the_watchdog_is_logged_once_and_it_keeps_watching(
    part: str,
    pg_dsn: str,
    install: Callable[..., EventLog],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    where = f"watchdog {part}"
    boom, calls = injected(where)
    events = install(leak_threshold=0.2)
    state = _runtime.current()
    assert state is not None
    if part == "tick":  # the OpenTelemetry check before each scan: broken for good
        monkeypatch.setattr(state.watchdog, "tick", boom)
    else:  # the scan, or the handing over of what it found: broken three times
        owner = watchdog.Watchdog if part == "scan" else pgleakguard.tracker.Tracker
        original = getattr(owner, part)

        def flaky(*args: Any) -> None:
            if len(calls) < 3:
                boom()
            original(*args)

        monkeypatch.setattr(owner, part, flaky)
    _safety.forget_logged()
    before = _safety.internal_error_count()
    with caplog.at_level(logging.ERROR, logger="pgleakguard"), psycopg.connect(pg_dsn) as conn:
        [event] = events.wait_for("held_too_long")
        assert event.backend_pid == conn.info.backend_pid
        scans = state.watchdog.scans
        settle()  # and it goes on scanning
        assert state.watchdog.scans >= scans + 3
    assert len(calls) >= 3 if part == "tick" else len(calls) == 3
    assert _safety.internal_error_count() - before == len(calls)
    assert_logged_once(caplog, where)


RECORDING = "recording"


@pytest.mark.parametrize("broken", ["LoggingSink", "JsonLinesSink", "on_leak"])
def test_a_fault_in_one_sink_is_logged_once_and_the_others_get_every_event(
    broken: str,
    pg_dsn: str,
    install: Callable[..., EventLog],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    where = f"sink {broken}"
    boom, calls = injected(where)
    if broken != "on_leak":
        monkeypatch.setattr(getattr(sinks, broken), "__call__", boom)
    jsonl = tmp_path / "leaks.jsonl"
    callback = EventLog()
    install(
        leak_threshold=0.1,
        jsonl_path=str(jsonl),
        on_leak=boom if broken == "on_leak" else callback.append,
    )
    _safety.forget_logged()
    before = _safety.internal_error_count()
    with caplog.at_level(logging.WARNING, logger="pgleakguard"):
        conns = [psycopg.connect(pg_dsn) for _ in range(2)]
        wait_until(lambda: len(calls) == 2)
        settle()
    pids = sorted(c.info.backend_pid for c in conns)
    for conn in conns:
        conn.close()
    assert len(calls) == 2  # each held_too_long reached the broken sink, once
    assert _safety.internal_error_count() - before == 2
    assert_logged_once(caplog, where)
    reports = [r for r in caplog.records if "connection leak [held_too_long" in r.getMessage()]
    if broken != "LoggingSink":
        assert len(reports) == 2
    if broken != "JsonLinesSink":
        assert (
            sorted(json.loads(line)["backend_pid"] for line in jsonl.read_text().splitlines())
            == pids
        )
    if broken != "on_leak":
        assert sorted(e.backend_pid for e in callback.leaks("held_too_long")) == pids


def test_a_stuck_on_leak_callback_starves_neither_the_sinks_nor_the_watchdog(
    pg_dsn: str, install: Callable[..., EventLog], tmp_path: Path
) -> None:
    gate = threading.Event()
    entered: list[Any] = []

    def stuck(event: Any) -> None:
        entered.append(event)
        gate.wait(30)

    jsonl = tmp_path / "leaks.jsonl"
    install(leak_threshold=0.1, on_leak=stuck, jsonl_path=str(jsonl))
    state = _runtime.current()
    assert state is not None
    received = EventLog()
    state.dispatcher.sinks.append(received.append)
    conns = [psycopg.connect(pg_dsn) for _ in range(3)]
    try:
        received.wait_for("held_too_long", count=3)  # every event reached our sinks
        assert len(jsonl.read_text().splitlines()) == 3
        settle()  # the watchdog scans on
        assert len(entered) == 1 and not gate.is_set()  # while the callback is still stuck
    finally:
        gate.set()
    pgleakguard.check()
    assert len(entered) == 3  # and once it returns, it gets the rest, in order
    assert [e.checkout_id for e in entered] == [e.checkout_id for e in received.leaks()]
    assert pgleakguard.stats()["dropped_events"] == 0
    for conn in conns:
        conn.close()


def test_event_queue_is_bounded_drops_are_counted_and_logged_once(
    pg_dsn: str, install: Callable[..., EventLog], caplog: pytest.LogCaptureFixture
) -> None:
    gate = threading.Event()
    entered = threading.Event()
    delivered: list[Any] = []

    def stuck(event: Any) -> None:
        delivered.append(event)
        entered.set()
        gate.wait(30)

    install(leak_threshold=0.05, on_leak=stuck)
    state = _runtime.current()
    assert state is not None
    assert state.delivery._limit == state.callback_delivery._limit == sinks.QUEUE_LIMIT == 10_000
    state.callback_delivery._limit = 2
    received = EventLog()
    state.dispatcher.sinks.append(received.append)
    conns = [psycopg.connect(pg_dsn)]
    try:
        assert entered.wait(10)  # the callback holds the first event
        with caplog.at_level(logging.WARNING, logger="pgleakguard"):
            conns += [psycopg.connect(pg_dsn) for _ in range(5)]
            received.wait_for("held_too_long", count=6)
            pgleakguard.check()
        # two wait in the queue, three were dropped
        assert pgleakguard.stats()["dropped_events"] == 3
        warned = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        assert warned == [
            "pgleakguard: 2 events are waiting for the on_leak callback (slow or stuck); new "
            "events are dropped, counted in stats()['dropped_events']"
        ]
    finally:
        gate.set()
    pgleakguard.check()
    assert len(delivered) == 3
    for conn in conns:
        conn.close()


def test_sinks_run_on_their_thread_and_on_leak_on_its_own(
    pg_dsn: str, install: Callable[..., EventLog]
) -> None:
    threads: list[tuple[str, str]] = []
    install(on_leak=lambda e: threads.append(("on_leak", threading.current_thread().name)))
    state = _runtime.current()
    assert state is not None
    state.dispatcher.sinks.append(
        lambda e: threads.append(("sink", threading.current_thread().name))
    )
    with psycopg.connect(pg_dsn):
        wait_until(lambda: len(threads) == 2)
    assert sorted(threads) == [("on_leak", "pgleakguard-on-leak"), ("sink", "pgleakguard-sinks")]


def test_a_logging_filter_that_raises_does_not_reach_the_caller(
    pg_dsn: str, install: Callable[..., EventLog]
) -> None:
    # logging swallows a handler's emit() errors itself; a filter's reach pgleakguard.
    class Broken(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            raise OSError("filter broke")

    broken = Broken()
    logger = logging.getLogger("pgleakguard")
    _safety.forget_logged()
    before = _safety.internal_error_count()
    logger.addFilter(broken)
    try:
        events = install(leak_threshold=0.1)
        with psycopg.connect(pg_dsn) as conn:
            [event] = events.wait_for("held_too_long")  # the callback still got it
            assert conn.execute("SELECT 1").fetchone() == (1,)
            pgleakguard.check()
    finally:
        logger.removeFilter(broken)
    assert _safety.internal_error_count() - before == 1
    assert str(_safety.last_internal_error()) == "filter broke"
    assert event.kind == "held_too_long"
