"""Fault injection at the SQLAlchemy hook entry points the shared workload of
test_fault_injection.py does not reach: psycopg2 and asyncpg transaction following, detach,
retag, AsyncEngine checkouts and timeouts, pending-request counting, instrument_engine.

Each fault proves that the user's results and exceptions are those of a run without
pgleakguard, that one line is logged (not one per call), that the counter goes up, and
that the named hooks were the ones that hit it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Callable

import pytest
import sqlalchemy
from sqlalchemy import create_engine, exc, text
from sqlalchemy.ext.asyncio import create_async_engine

import pgleakguard
from pgleakguard import _runtime, _safety
from pgleakguard.integrations import sqlalchemy as sa_hooks
from pgleakguard.tracker import Tracker

from conftest import EventLog
from test_fault_injection import _boom, collect, otel_sdk  # noqa: F401 (otel_sdk: a fixture)

pytestmark = pytest.mark.allow_internal_errors
if sqlalchemy.__version__.startswith("1."):
    pytest.skip("the workload uses psycopg 3 and 2.0-style commit()", allow_module_level=True)


def url(dsn: str, driver: str) -> str:
    return dsn.replace("postgresql://", f"postgresql+{driver}://", 1)


def sa_workload(dsn: str) -> list[Any]:
    """A user of psycopg2 and of two async drivers: statements, commit, a failing statement,
    rollback, a pool timeout, a detached connection."""
    results: list[Any] = []
    engine = create_engine(url(dsn, "psycopg2"), pool_size=1, max_overflow=0, pool_timeout=0.05)
    with engine.connect() as conn:
        results.append(conn.execute(text("SELECT 'psycopg2'")).scalar_one())
        conn.commit()
        with pytest.raises(exc.ProgrammingError) as error:
            conn.execute(text("SELECT no_such_column"))
        results.append(str(error.value.orig).splitlines()[0])
        conn.rollback()
        with pytest.raises(exc.TimeoutError) as timeout:
            engine.connect()
        results.append(str(timeout.value).split(" (Background")[0].splitlines()[0])
    conn = engine.connect()
    conn.detach()  # leaves the pool: ends with close_detached
    results.append(conn.execute(text("SELECT 'detached'")).scalar_one())
    conn.close()
    engine.dispose()
    for driver in ("asyncpg", "psycopg"):
        results += asyncio.run(_async_workload(url(dsn, driver)))
    return results


async def _async_workload(dsn: str) -> list[Any]:
    results: list[Any] = []
    engine = create_async_engine(dsn, pool_size=1, max_overflow=0, pool_timeout=0.05)
    async with engine.connect() as conn:
        results.append((await conn.execute(text("SELECT 'async'"))).scalar_one())
        await conn.commit()
        with pytest.raises(exc.DBAPIError) as error:
            await conn.execute(text("SELECT no_such_column"))
        results.append((type(error.value).__name__, str(error.value.orig).splitlines()[0]))
        await conn.rollback()
        with pytest.raises(exc.TimeoutError) as timeout:
            await engine.connect()
        results.append(str(timeout.value).split(" (Background")[0].splitlines()[0])
    await engine.dispose()
    return results


@pytest.fixture(scope="module")
def expected(pg_dsn: str) -> list[Any]:
    return sa_workload(pg_dsn)  # without pgleakguard


class Fault:
    """An injected fault that remembers which functions of the SQLAlchemy integration
    were running when it was hit."""

    def __init__(self) -> None:
        self.hooks: set[str] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_globals.get("__name__") == sa_hooks.__name__:
                self.hooks.add(frame.f_code.co_name)
            frame = frame.f_back  # type: ignore[assignment]
        return _boom(*args, **kwargs)


class BrokenMapping(dict):  # type: ignore[type-arg]
    """A dict of the integration's that fails on every use."""

    def __init__(self, fault: Fault) -> None:
        super().__init__()
        self.fault = fault

    def get(self, *args: Any) -> Any:
        return self.fault()

    def __getitem__(self, key: Any) -> Any:
        return self.fault()

    def __setitem__(self, key: Any, value: Any) -> None:
        self.fault()

    def pop(self, *args: Any) -> Any:
        return self.fault()


# (what is broken, where: a module/class or "integration", the attribute, a function or a
# mapping, the hooks that must hit it)
SA_FAULTS = [
    ("pool connect event", sa_hooks, "backend_pid", "function", {"_on_connect"}),
    ("detach", "integration", "_detached", "mapping", {"_on_detach", "_on_close_detached"}),
    ("retag", sa_hooks, "_send_outside_transaction", "function", {"_retag"}),
    (
        "transaction following",
        sa_hooks,
        "_checkout_of",
        "function",
        {"_on_execute", "_on_end_transaction", "_on_error", "_add_comment"},
    ),
    ("driver transaction state", sa_hooks, "transaction_status", "function", {"_on_error"}),
    ("pending requests", "integration", "waiting", "mapping", {"acquiring", "acquired"}),
    ("first connection of an engine", sa_hooks, "pool_name", "function", {"first_sight"}),
    ("every checkout", Tracker, "begin", "function", {"_on_checkout"}),
    ("every checkin", Tracker, "end", "function", {"_on_checkin", "_on_close_detached"}),
    ("timeout culprits", sa_hooks, "describe_holders", "function", {"explain_timeout"}),
]


def _integration() -> Any:
    state = _runtime.current()
    assert state is not None
    [integration] = [i for i in state.integrations if i.identifier == "sqlalchemy"]
    return integration


@pytest.mark.parametrize(
    ("where", "owner", "name", "kind", "hooks"), SA_FAULTS, ids=[f[0] for f in SA_FAULTS]
)
def test_fault_in_a_sqlalchemy_hook_never_changes_the_users_operation(
    where: str,
    owner: Any,
    name: str,
    kind: str,
    hooks: set[str],
    pg_dsn: str,
    expected: list[Any],
    install: Callable[..., EventLog],
    otel_sdk: dict[str, Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _safety.forget_logged()
    install(
        retag_on_checkout=True,
        sql_comments=True,
        meter_provider=otel_sdk["meter_provider"],
        tracer_provider=otel_sdk["tracer_provider"],
    )
    fault = Fault()
    target = _integration() if owner == "integration" else owner
    monkeypatch.setattr(target, name, fault if kind == "function" else BrokenMapping(fault))
    before = _safety.internal_error_count()
    with caplog.at_level(logging.ERROR, logger="pgleakguard"):
        got = sa_workload(pg_dsn)
        got_again = sa_workload(pg_dsn)
        collect(otel_sdk)
    assert got == expected
    assert got_again == expected
    assert hooks <= fault.hooks, f"the fault in {where} was not hit by {hooks - fault.hooks}"
    errors = _safety.internal_error_count() - before
    assert errors >= 1
    assert pgleakguard.stats()["internal_errors"] >= errors
    logged = [r for r in caplog.records if "pgleakguard internal error" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]  # once, not once per call


def test_fault_in_instrument_engine_never_reaches_the_caller(
    pg_dsn: str,
    install: Callable[..., EventLog],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = create_engine(url(pg_dsn, "psycopg2"))
    try:
        with engine.connect() as conn:
            bare = conn.execute(text("SELECT current_user")).scalar_one()
        _safety.forget_logged()
        install(integrations=["psycopg"])
        fault = Fault()
        monkeypatch.setattr(sa_hooks, "pool_name", fault)
        before = _safety.internal_error_count()
        with caplog.at_level(logging.ERROR, logger="pgleakguard"):
            pgleakguard.instrument_engine(engine)  # returns: the caller never sees the fault
            with engine.connect() as conn:
                assert conn.execute(text("SELECT current_user")).scalar_one() == bare
                assert pgleakguard.open_checkouts() == []  # not tracked, nothing else changed
    finally:
        engine.dispose()
    assert fault.hooks >= {"setup_engine", "first_sight"}
    assert _safety.internal_error_count() - before == 1
    logged = [r for r in caplog.records if "pgleakguard internal error" in r.getMessage()]
    assert len(logged) == 1
