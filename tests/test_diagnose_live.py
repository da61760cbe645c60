"""`pgleakguard diagnose --dsn` against real servers (PostgreSQL 18, and Debian's 15):
a leaking program is named by service, pid and call-site, also for a pg_monitor role;
a role without it is told which GRANT it lacks."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgleakguard import server

from server_helpers import (
    Leaker,
    cli,
    cli_json,
    ensure_role,
    leaker_line,
    leaking_program,
    postgres15,
)

IMMEDIATE = ("--idle-threshold", "0s", "--idle-in-transaction-threshold", "0s")


@pytest.fixture(scope="session")
def pg15_dsn() -> Iterator[str]:
    """A throwaway Debian PostgreSQL 15 (skips, or fails under PGLEAKGUARD_REQUIRE_ALL=1)."""
    with postgres15() as dsn:
        yield dsn


@pytest.fixture(params=["pg18", "pg15"])
def server_dsn(request: pytest.FixtureRequest, pg_dsn: str) -> str:
    """Each server the diagnose tests run against."""
    if request.param == "pg18":
        return pg_dsn
    return str(request.getfixturevalue("pg15_dsn"))


@pytest.fixture
def leaker(server_dsn: str) -> Iterator[Leaker]:
    with leaking_program(server_dsn) as program:
        yield program


@pytest.fixture
def leaker18(pg_dsn: str) -> Iterator[Leaker]:
    """The leaking program on the default server only (for tests of the output formats)."""
    with leaking_program(pg_dsn) as program:
        yield program


def expected_suspects(leaker: Leaker) -> set[tuple[int, str, str, int, str]]:
    b = leaker.backends
    return {
        (b["idle"], "idle", "billing", leaker.pid, f"leaker.py:{leaker_line('idle')}"),
        (
            b["in_transaction"],
            "idle in transaction",
            "billing",
            leaker.pid,
            f"leaker.py:{leaker_line('in-transaction')}",
        ),
        (
            b["aborted"],
            "idle in transaction (aborted)",
            "billing",
            leaker.pid,
            f"leaker.py:{leaker_line('aborted')}",
        ),
        (b["named"], "idle", "billing", leaker.pid, f"leaker.py:{leaker_line('named')}"),
    }


def suspects_of(doc: dict[str, Any], leaker: Leaker) -> set[tuple[int, str, str, int, str]]:
    return {
        (s["backend_pid"], s["reason"], s["service"], s["client_pid"], s["callsite"])
        for s in doc["suspects"]
        if s["client_pid"] == leaker.pid
    }


def test_diagnose_names_service_pid_and_callsite_of_every_leaked_session(
    server_dsn: str, leaker: Leaker
) -> None:
    doc = cli_json("diagnose", "--dsn", server_dsn, *IMMEDIATE)
    assert doc["version"] == 1
    assert suspects_of(doc, leaker) == expected_suspects(leaker)
    assert doc["privileges"] is None
    leak = next(
        f
        for f in doc["findings"]
        if f["kind"] == "leak"
        and f["evidence"]["reason"] == "idle in transaction"
        and leaker.pid in f["evidence"]["client_pids"]
    )
    usable = doc["server"]["usable_connections"]
    assert leak["summary"].startswith(
        f"1 of {usable} slots are connections idle in transaction from service billing, "
        f"pid {leaker.pid}, last call-site leaker.py:{leaker_line('in-transaction')} (longest "
    )
    assert leak["backend_pids"] == [leaker.backends["in_transaction"]]


def test_diagnose_reads_the_server_settings_for_its_version(server_dsn: str) -> None:
    with psycopg.connect(server_dsn) as conn:
        version_num = conn.info.server_version
        max_conn = int(conn.execute("SHOW max_connections").fetchone()[0])  # type: ignore[index]
    doc = cli_json("diagnose", "--dsn", server_dsn)
    srv = doc["server"]
    assert srv["version_num"] == version_num
    assert srv["max_connections"] == max_conn
    reserved = srv["superuser_reserved_connections"] + (srv["reserved_connections"] or 0)
    assert srv["usable_connections"] == max_conn - reserved
    # reserved_connections exists from PostgreSQL 16 on; transaction_timeout from 17.
    assert (srv["reserved_connections"] is not None) == (version_num >= 160000)
    assert ("transaction_timeout" in srv["settings"]) == (version_num >= 170000)
    gated = {f["name"]: f["applies"] for f in doc["fixes"]}
    assert gated["transaction_timeout"] is (version_num >= 170000)
    assert gated["idle_session_timeout"] is True


def test_a_pg_monitor_role_sees_the_same_suspects(server_dsn: str, leaker: Leaker) -> None:
    monitor = ensure_role(server_dsn, "pgl_monitor", monitor=True)
    doc = cli_json("diagnose", "--dsn", monitor, *IMMEDIATE)
    assert doc["role"] == "pgl_monitor"
    assert suspects_of(doc, leaker) == expected_suspects(leaker)
    assert doc["totals"]["hidden"] == 0


def test_a_role_without_pg_monitor_is_told_the_grant_it_needs(
    server_dsn: str, leaker: Leaker
) -> None:
    plain = ensure_role(server_dsn, "pgl_plain", monitor=False)
    doc = cli_json("diagnose", "--dsn", plain, *IMMEDIATE)
    assert doc["privileges"] == {
        "hidden_sessions": doc["totals"]["hidden"],
        "grant": 'GRANT pg_monitor TO "pgl_plain";',
    }
    hidden = next(f for f in doc["findings"] if f["kind"] == "hidden")
    assert set(leaker.backends.values()) <= set(hidden["backend_pids"])
    # The application_name tags stay readable: the owner is still known.
    owners = {(o["service"], o["client_pid"]) for o in doc["owners"]}
    assert ("billing", leaker.pid) in owners
    text = cli("diagnose", "--dsn", plain, *IMMEDIATE).stdout
    assert (
        f"{doc['totals']['hidden']} session(s) show <insufficient privilege>: pgl_plain cannot "
        'see their state or query. Fix: GRANT pg_monitor TO "pgl_plain";'
    ) in text


def test_text_report_lists_every_state_and_the_triage_sql(pg_dsn: str, leaker18: Leaker) -> None:
    leaker = leaker18
    proc = cli("diagnose", "--dsn", pg_dsn, *IMMEDIATE)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for state in (
        "active",
        "idle",
        "idle in transaction",
        "idle in transaction (aborted)",
        "fastpath function call",
        "disabled",
    ):
        assert any(line.split("  ")[1:2] == [state] for line in lines), state
    assert f"  AND (a.application_name = 'billing/pid:{leaker.pid}' OR " in proc.stdout
    assert "  AND a.state IN ('idle in transaction')" in proc.stdout


def test_markdown_report_has_tables_and_fenced_sql(pg_dsn: str, leaker18: Leaker) -> None:
    proc = cli("diagnose", "--dsn", pg_dsn, "--format", "markdown", *IMMEDIATE)
    assert proc.returncode == 0, proc.stderr
    assert "| state | sessions | share |" in proc.stdout
    assert "| idle in transaction (aborted) | 1 |" in proc.stdout.replace("  ", " ")
    assert "## Findings (most slots first)" in proc.stdout
    assert "```sql\nSELECT a.pid, a.usename" in proc.stdout


def test_session_features_choose_pgbouncer_session_mode(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("LISTEN orders_changed")
        lock = conn.execute("SELECT pg_advisory_lock(42)")
        assert lock.fetchone() is not None
        conn.execute("SELECT 1")  # its last query no longer shows the lock: pg_locks does
        pid = conn.info.backend_pid
        doc = cli_json("diagnose", "--dsn", pg_dsn)
        conn.execute("SELECT pg_advisory_unlock(42)")
    features = {f["name"]: f["backend_pids"] for f in doc["pgbouncer"]["session_features"]}
    assert pid in features["advisory locks"]
    assert doc["pgbouncer"]["pool_mode"] == "session"
    assert "pool_mode = session" in doc["pgbouncer"]["ini"]


def test_redact_dsn_removes_every_password() -> None:
    assert (
        server.redact_dsn("postgresql://app:s3cret@db:5432/prod?password=x&sslmode=require")
        == "postgresql://app@db:5432/prod?sslmode=require"
    )
    assert server.redact_dsn("host=db password='s3 cret' user=app") == "host=db user=app"


def test_a_wrong_dsn_is_one_line_without_the_password(tmp_path: Any) -> None:
    dsn = f"postgresql://app:s3cret@/postgres?host={tmp_path}&port=1"
    proc = cli("diagnose", "--dsn", dsn)
    assert proc.returncode == 2
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith(
        f"pgleakguard: error: cannot connect to postgresql://app@/postgres?host={tmp_path}&port=1: "
    )
    assert "s3cret" not in proc.stderr


def test_bad_options_are_one_line_and_exit_2() -> None:
    proc = cli("diagnose", "--snapshot", "x.csv", "--idle-threshold", "10 parsecs")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "pgleakguard diagnose: error: argument --idle-threshold: '10 parsecs' is not a "
        "duration: expected a number and a unit (ms, s, m, h, d), e.g. 10m "
        "(see pgleakguard diagnose --help)"
    ]
    proc = cli("diagnose")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "pgleakguard: error: give --dsn DSN (or set $PGLEAKGUARD_DSN)"
    ]


def test_lock_waits_name_the_idle_transaction_that_blocks_them(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("CREATE TABLE IF NOT EXISTS pgl_accounts (id int PRIMARY KEY, n int)")
        admin.execute("INSERT INTO pgl_accounts VALUES (1, 0) ON CONFLICT DO NOTHING")
    holder = psycopg.connect(pg_dsn, application_name="billing/pid:31")
    holder.execute("UPDATE pgl_accounts SET n = n + 1 WHERE id = 1")
    waiter = psycopg.connect(pg_dsn, autocommit=True, application_name="api/pid:32")
    blocked = threading.Thread(
        target=waiter.execute, args=("UPDATE pgl_accounts SET n = n + 1 WHERE id = 1",)
    )
    holder_pid, waiter_pid = holder.info.backend_pid, waiter.info.backend_pid
    blocked.start()
    try:
        _wait_for_lock_wait(pg_dsn, waiter_pid)
        doc = cli_json("diagnose", "--dsn", pg_dsn, "--long-query-threshold", "0s")
    finally:
        holder.rollback()
        blocked.join()
        holder.close()
        waiter.close()
    findings = {f["kind"]: f for f in doc["findings"]}
    lock = findings["blocked"]
    assert lock["backend_pids"] == [waiter_pid]
    assert lock["evidence"]["blocking_pids"] == [holder_pid]
    assert lock["summary"].endswith(
        f"are waiting on locks; blocked by backend {holder_pid} (idle in transaction, "
        "service billing)"
    )
    assert waiter_pid in findings["long_query"]["backend_pids"]


def _wait_for_lock_wait(dsn: str, pid: int) -> None:
    deadline = time.monotonic() + 10
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid]
            ).fetchone()
            if row and row[0] == "Lock":
                return
            time.sleep(0.02)
    raise AssertionError("the second UPDATE never waited on the lock")
