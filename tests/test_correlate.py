"""In-process correlation: checkouts joined with their pg_stat_activity rows, and leak
reports that carry the row (activity_dsn), on a real PostgreSQL."""

from __future__ import annotations

import logging
from typing import Any, Callable

import psycopg
import pytest

import pgleakguard
from pgleakguard import _safety, server

from conftest import EventLog


def test_correlate_pairs_each_checkout_with_its_row(pg_dsn: str, events: EventLog) -> None:
    held = psycopg.connect(pg_dsn)
    held.execute("SELECT 42")
    quiet = psycopg.connect(pg_dsn, autocommit=True)
    try:
        pairs = pgleakguard.correlate(pg_dsn)
        rows = {p.checkout.backend_pid: p.activity for p in pairs}
        assert [p.checkout.backend_pid for p in pairs] == [
            held.info.backend_pid,
            quiet.info.backend_pid,
        ]
        held_row = rows[held.info.backend_pid]
        assert held_row is not None
        assert held_row["state"] == "idle in transaction"
        assert held_row["query"] == "SELECT 42"
        assert held_row["xact_start"] is not None and held_row["xact_start"].endswith("Z")
        quiet_row = rows[quiet.info.backend_pid]
        assert quiet_row is not None and quiet_row["state"] == "idle"
        assert quiet_row["xact_start"] is None
        # pgleakguard's own connection is not a checkout of the user's.
        assert len(pgleakguard.open_checkouts()) == 2
    finally:
        held.close()
        quiet.close()


def test_correlate_on_a_user_connection_leaves_its_transaction_state_alone(
    pg_dsn: str, events: EventLog
) -> None:
    with psycopg.connect(pg_dsn) as conn:
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        [pair] = pgleakguard.correlate(conn)
        assert pair.activity is not None and pair.activity["state"] == "active"
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        conn.execute("SELECT 7")
        [pair] = pgleakguard.correlate(conn)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert pair.as_dict()["pg_stat_activity"]["state"] == "active"
        assert pair.as_dict()["backend_pid"] == conn.info.backend_pid


def test_correlate_refuses_a_failed_transaction_in_one_line(pg_dsn: str, events: EventLog) -> None:
    with psycopg.connect(pg_dsn) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        with pytest.raises(server.ServerError, match="^the connection is in a failed transaction"):
            pgleakguard.correlate(conn)


def test_leak_report_carries_the_pg_stat_activity_row(
    pg_dsn: str, install: Callable[..., EventLog]
) -> None:
    events = install(activity_dsn=pg_dsn, leak_threshold=60)
    conn = psycopg.connect(pg_dsn)
    try:
        conn.execute("SELECT 'forgotten'")
        [event] = events.wait_for("idle_in_transaction")
        row = event.details["pg_stat_activity"]
        assert row["state"] == "idle in transaction"
        assert row["query"] == "SELECT 'forgotten'"
        assert row["wait_event"] == "ClientRead"
        assert row["state_change"] is not None and row["xact_start"] is not None
        text = event.render()
        assert "  pg_stat_activity: state='idle in transaction' state_change=" in text
        assert "query=\"SELECT 'forgotten'\"" in text
        assert event.as_dict()["details"]["pg_stat_activity"]["backend_type"] == "client backend"
        assert [c.backend_pid for c in pgleakguard.open_checkouts()] == [conn.info.backend_pid]
    finally:
        conn.close()


def test_an_unreachable_activity_dsn_is_one_warning_line_and_the_report_still_comes(
    pg_dsn: str, install: Callable[..., EventLog], tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _safety.forget_logged()
    bad = f"postgresql://app:s3cret@/postgres?host={tmp_path}&port=1"
    events = install(activity_dsn=bad, leak_threshold=60)
    before = pgleakguard.stats()["operational_errors"]
    conn = psycopg.connect(pg_dsn)
    try:
        with caplog.at_level(logging.WARNING, logger="pgleakguard"):
            conn.execute("SELECT 1")
            [event] = events.wait_for("idle_in_transaction")
        assert "pg_stat_activity" not in event.details
        # not an internal error (the autouse fixture checks): the server said no
        assert pgleakguard.stats()["operational_errors"] == before + 1
        [record] = [r for r in caplog.records if "activity_dsn lookup" in r.getMessage()]
        assert (record.levelno, record.exc_info) == (logging.WARNING, None)
        assert record.getMessage().startswith(
            "pgleakguard: activity_dsn lookup failed: cannot connect to "
            f"postgresql://app@/postgres?host={tmp_path}&port=1: "
        )
        assert "s3cret" not in caplog.text
    finally:
        conn.close()


def test_activity_dsn_is_not_shown_by_repr() -> None:
    config = pgleakguard.Config.load(activity_dsn="postgresql://app:s3cret@db/prod")
    assert config.activity_dsn == "postgresql://app:s3cret@db/prod"
    assert "s3cret" not in repr(config)


def test_correlate_takes_a_sqlalchemy_connection_engine_or_async_engine(
    pg_dsn: str, events: EventLog
) -> None:
    import asyncio

    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = sa.create_engine("postgresql+psycopg" + pg_dsn[len("postgresql") :])
    async_engine = create_async_engine("postgresql+asyncpg" + pg_dsn[len("postgresql") :])
    held = psycopg.connect(pg_dsn)
    held.execute("SELECT 'held'")
    try:
        with engine.connect() as busy, engine.connect() as other:
            busy.execute(sa.text("SELECT 'via sqlalchemy'"))
            busy_driver: Any = busy.connection.driver_connection
            other_driver: Any = other.connection.driver_connection
            pid = busy_driver.info.backend_pid
            for given in (other, engine, async_engine):
                rows: Any = {
                    p.checkout.backend_pid: p.activity for p in pgleakguard.correlate(given)
                }
                assert rows[held.info.backend_pid]["query"] == "SELECT 'held'"
                assert rows[pid]["query"] == "SELECT 'via sqlalchemy'"
                assert rows[pid]["state"] == "idle in transaction"
            # A transaction correlate() had to open is rolled back; one already open stays.
            assert not other.in_transaction()
            assert other_driver.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            pgleakguard.correlate(busy)
            assert busy.in_transaction()
            assert busy_driver.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    finally:
        held.close()
        engine.dispose()
        asyncio.run(async_engine.dispose())


def test_correlate_refuses_anything_else_in_one_line(events: EventLog) -> None:
    import sqlite3

    with pytest.raises(TypeError) as raised:
        pgleakguard.correlate(sqlite3.connect(":memory:"))
    assert str(raised.value) == (
        "correlate() takes a DSN, a psycopg connection, or a SQLAlchemy Engine or Connection, "
        "not Connection"
    )


def test_correlate_names_the_driver_of_a_sqlalchemy_connection_it_cannot_use(
    pg_dsn: str, events: EventLog
) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine("postgresql+psycopg2" + pg_dsn[len("postgresql") :])
    try:
        with engine.connect() as sa_conn, pytest.raises(TypeError) as raised:
            pgleakguard.correlate(sa_conn)
        assert str(raised.value) == (
            "correlate() takes a SQLAlchemy Connection only with the psycopg driver "
            "(postgresql+psycopg://), not connection: pass its Engine instead"
        )
    finally:
        engine.dispose()


def test_server_error_is_exported() -> None:
    assert pgleakguard.ServerError is server.ServerError
    assert "ServerError" in pgleakguard.__all__
