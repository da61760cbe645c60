"""Getting into a full server: when every slot a role may use is taken, the connection error
comes with one more line saying how to get in anyway (a real server filled to the brim)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgleakguard.server import SNAPSHOT_EXPORT

from server_helpers import cli, ensure_role

HINT = (
    "pgleakguard: hint: every slot this role may use is taken: connect as a superuser (they "
    "have the superuser_reserved_connections slots) or, on PostgreSQL 16+, as a role granted "
    "pg_use_reserved_connections (reserved_connections slots); or have a superuser run "
    f"{SNAPSHOT_EXPORT} and then: pgleakguard diagnose --snapshot activity.csv"
)


def _settled_count(dsn: str) -> tuple[int, int]:
    """max_connections and the client backends once their number stays put for half a second:
    backends of connections closed just before (earlier tests) hold their slot until they
    have exited."""
    last: Any = None
    steady = 0
    deadline = time.monotonic() + 10
    with psycopg.connect(dsn, autocommit=True) as admin:
        while steady < 5 and time.monotonic() < deadline:
            row: Any = admin.execute(
                "SELECT current_setting('max_connections')::int, count(*) "
                "FROM pg_stat_activity WHERE backend_type = 'client backend'"
            ).fetchone()
            steady = steady + 1 if row == last else 0
            last = row
            time.sleep(0.1)
    total, used = last
    return int(total), int(used)


@contextlib.contextmanager
def filled(dsn: str, leave: int) -> Iterator[list[psycopg.Connection[Any]]]:
    """Superuser connections until only ``leave`` of max_connections are free."""
    total, used = _settled_count(dsn)
    if total > 300:
        pytest.skip(f"max_connections is {total}: too many connections to open for a test")
    conns: list[psycopg.Connection[Any]] = []
    try:
        # The admin connection above has gone: it is one of the slots to take.
        for _ in range(total - (used - 1) - leave):
            try:
                conns.append(psycopg.connect(dsn, autocommit=True))
            except psycopg.OperationalError as exc:
                # The admin backend may still be exiting: the server is full all the same.
                if leave or "too many clients" not in str(exc):
                    raise
                break
        if not leave:  # take any slot a backend still exiting gives back
            while len(conns) < total:
                try:
                    conns.append(psycopg.connect(dsn, autocommit=True))
                except psycopg.OperationalError as exc:
                    if "too many clients" not in str(exc):
                        raise
                    break
        yield conns
    finally:
        for conn in conns:
            conn.close()


def _reserved(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row: Any = conn.execute(
            "SELECT sum(setting::int) FROM pg_settings "
            "WHERE name IN ('superuser_reserved_connections', 'reserved_connections')"
        ).fetchone()
    return int(row[0])


def test_a_full_server_is_one_error_line_and_a_hint_for_a_pg_monitor_role(pg_dsn: str) -> None:
    monitor = ensure_role(pg_dsn, "pgl_mon", monitor=True)
    with filled(pg_dsn, leave=_reserved(pg_dsn)):
        with pytest.raises(psycopg.OperationalError, match="remaining connection slots"):
            psycopg.connect(monitor).close()  # the server really is full for this role
        proc = cli("diagnose", "--dsn", monitor)
    assert proc.returncode == 2
    error, hint = proc.stderr.splitlines()
    assert error.startswith("pgleakguard: error: cannot connect to ")
    assert "remaining connection slots are reserved for " in error
    assert hint == HINT


def test_too_many_clients_gets_the_hint_too(pg_dsn: str) -> None:
    with filled(pg_dsn, leave=0):
        proc = cli("watch", "--once", "--dsn", pg_dsn)
    assert proc.returncode == 2
    error, hint = proc.stderr.splitlines()
    assert error.endswith("FATAL: sorry, too many clients already")
    assert hint == HINT


def test_other_connection_errors_get_no_hint(tmp_path: Any) -> None:
    proc = cli("diagnose", "--dsn", f"host={tmp_path} port=1")
    assert proc.returncode == 2
    [error] = proc.stderr.splitlines()
    assert error.startswith("pgleakguard: error: cannot connect to ")
