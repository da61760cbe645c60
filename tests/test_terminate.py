"""`pgleakguard terminate` on a real PostgreSQL: a dry run by default; with --execute it ends
exactly the sessions the filters name and spares the others (busy ones, other applications,
superusers, its own)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from cli_terminal import run_in_terminal
from server_helpers import cli, ensure_role

FILTERS = ("--idle-for", "500ms", "--application", "billing")


class Sessions:
    """Named backend pids of the sessions a test starts with."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conns: dict[str, psycopg.Connection[Any]] = {}
        self.pids: dict[str, int] = {}

    def open(self, name: str, dsn: str, application: str, sql: str, autocommit: bool) -> None:
        conn = psycopg.connect(dsn, application_name=application, autocommit=autocommit)
        conn.execute(sql)
        self.conns[name] = conn
        self.pids[name] = conn.info.backend_pid

    def alive(self) -> set[str]:
        """Names of the sessions the server still lists."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity").fetchall()
        listed = {r[0] for r in rows}
        return {name for name, pid in self.pids.items() if pid in listed}


@pytest.fixture
def sessions(pg_dsn: str) -> Iterator[Sessions]:
    """a, b: role pgl_app, service billing, idle and idle in transaction (the targets);
    c: another application; d: a superuser's billing session; e: billing, but busy."""
    app = ensure_role(pg_dsn, "pgl_app", monitor=False)
    s = Sessions(pg_dsn)
    s.open("a", app, "billing/pid:111", "SELECT 1", autocommit=True)
    s.open("b", app, "billing/pid:111/orders.py:9", "SELECT 2", autocommit=False)
    s.open("c", app, "reports", "SELECT 3", autocommit=True)
    s.open("d", pg_dsn, "billing/pid:222", "SELECT 4", autocommit=True)
    busy = psycopg.connect(app, application_name="billing/pid:111", autocommit=True)
    s.pids["e"] = busy.info.backend_pid
    sleeper = threading.Thread(
        target=lambda: _swallow(busy.execute, "SELECT pg_sleep(30)"), name="busy-session"
    )
    sleeper.start()
    _wait_active(pg_dsn, s.pids["e"])
    time.sleep(0.6)  # a to d have now been idle longer than --idle-for 500ms
    try:
        yield s
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_cancel_backend(%s)", [s.pids["e"]])
        sleeper.join()
        busy.close()
        for conn in s.conns.values():
            conn.close()


def _swallow(func: Any, *args: Any) -> None:
    with contextlib.suppress(psycopg.Error):  # cancelled at teardown
        func(*args)


def _wait_active(dsn: str, pid: int) -> None:
    deadline = time.monotonic() + 10
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT state FROM pg_stat_activity WHERE pid = %s", [pid]
            ).fetchone()
            if row and row[0] == "active":
                return
            time.sleep(0.02)
    raise AssertionError("the busy session never became active")


def run_json(*args: str, input: str | None = None) -> tuple[int, Any]:
    proc = cli("terminate", *args, "--format", "json", input=input)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout) if proc.stdout else None


def test_dry_run_lists_the_sessions_and_ends_none(pg_dsn: str, sessions: Sessions) -> None:
    code, doc = run_json("--dsn", pg_dsn, *FILTERS)
    assert code == 0
    assert doc["dry_run"] is True and doc["ended"] is None
    assert sorted(r["backend_pid"] for r in doc["sessions"]) == sorted(
        [sessions.pids["a"], sessions.pids["b"]]
    )
    assert sessions.alive() == {"a", "b", "c", "d", "e"}
    text = cli("terminate", "--dsn", pg_dsn, *FILTERS).stdout
    assert "pgleakguard terminate: dry run: nothing was ended; add --execute" in text
    shown = {line.strip() for line in text.splitlines()}
    for line in (
        "WHERE a.backend_type = 'client backend'",
        "AND a.pid <> pg_backend_pid()",
        "AND a.state IN ('idle', 'idle in transaction', 'idle in transaction (aborted)')",
        "AND a.state_change < now() - interval '0.500 seconds'",
        "AND (a.application_name = 'billing' OR a.application_name LIKE 'billing/pid:%')",
        "-- superusers' sessions are spared",
        "AND NOT EXISTS (SELECT 1 FROM pg_roles AS r WHERE r.oid = a.usesysid AND r.rolsuper)",
    ):
        assert line in shown, line


def test_execute_ends_exactly_the_matching_sessions(pg_dsn: str, sessions: Sessions) -> None:
    code, doc = run_json("--dsn", pg_dsn, *FILTERS, "--execute", "--yes")
    assert code == 0
    assert doc["ended"] == sorted([sessions.pids["a"], sessions.pids["b"]])
    assert f"AND a.pid = ANY('{{{','.join(map(str, doc['ended']))}}}'::integer[])" in doc["sql"]
    assert sessions.alive() == {"c", "d", "e"}
    with pytest.raises(psycopg.OperationalError):
        sessions.conns["a"].execute("SELECT 1")


def test_execute_asks_first_and_a_no_ends_nothing(pg_dsn: str, sessions: Sessions) -> None:
    proc = cli("terminate", "--dsn", pg_dsn, *FILTERS, "--execute", input="n\n")
    assert proc.returncode == 1
    assert "End these 2 session(s)? [y/N] " in proc.stderr
    assert proc.stderr.splitlines()[-1].endswith("pgleakguard: nothing ended")
    assert sessions.alive() == {"a", "b", "c", "d", "e"}


def test_superusers_sessions_only_with_include_superusers(pg_dsn: str, sessions: Sessions) -> None:
    proc = cli(
        "terminate", "--dsn", pg_dsn, *FILTERS, "--include-superusers", "--execute", input="y\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "pgleakguard terminate: ended 3 of 3 session(s)" in proc.stdout
    assert sessions.alive() == {"c", "e"}


def test_never_its_own_session_nor_background_processes(pg_dsn: str, sessions: Sessions) -> None:
    code, doc = run_json(
        "--dsn", pg_dsn, "--idle-for", "0s", "--state", "active", "--include-superusers"
    )
    listed = {r["backend_pid"] for r in doc["sessions"]}
    assert sessions.pids["e"] in listed
    assert all(r["application_name"] != "pgleakguard-terminate" for r in doc["sessions"])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type <> 'client backend'"
        )
        background = {r[0] for r in rows.fetchall()}
    assert background and not (listed & background)


def test_a_role_that_cannot_see_the_sessions_is_told_the_grant(
    pg_dsn: str, sessions: Sessions
) -> None:
    plain = ensure_role(pg_dsn, "pgl_plain", monitor=False)
    proc = cli("terminate", "--dsn", plain, "--idle-for", "0s", "--user", "postgres")
    assert proc.returncode == 0, proc.stderr
    [note] = proc.stderr.splitlines()
    assert note.startswith("pgleakguard: note: ")
    assert note.endswith(
        "session(s) of other roles are hidden from pgl_plain (<insufficient privilege>) and "
        'cannot match; to see and end them: GRANT pg_monitor, pg_signal_backend TO "pgl_plain";'
    )
    assert "Sessions it would end (0)" in proc.stdout
    assert sessions.alive() == {"a", "b", "c", "d", "e"}


def test_a_bad_state_is_one_line() -> None:
    proc = cli("terminate", "--idle-for", "10m", "--state", "sleepy")
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith(
        "pgleakguard terminate: error: argument --state: invalid choice: 'sleepy'"
    )


def test_sql_copied_from_an_80_column_terminal_is_the_sql_printed(pg_dsn: str) -> None:
    code, shown = run_in_terminal("terminate", "--dsn", pg_dsn, "--idle-for", "10m")
    assert code == 0, shown
    lines = shown.splitlines()
    assert "Sessions it would end (0)" in lines
    assert any("┃ backend ┃" in ln for ln in lines)  # rich drew the table: the terminal path
    # Longer than 80 columns, yet each reaches the terminal as one line: no '(aborted)' left
    # alone on a line of its own, no literal split in two.
    for line in (
        "      -- state is one of: idle, idle in transaction, idle in transaction (aborted)",
        "      AND a.state IN ('idle', 'idle in transaction', 'idle in transaction (aborted)')",
        "      AND NOT EXISTS (SELECT 1 FROM pg_roles AS r WHERE r.oid = a.usesysid AND "
        "r.rolsuper)",
    ):
        assert len(line) > 80 and line in lines, shown


@pytest.fixture
def mixed(pg_dsn: str) -> Iterator[tuple[str, Sessions]]:
    """Role pgl_ops (pg_monitor, no pg_signal_backend) and its DSN; sessions of application
    opsjob: own1 and own2 are pgl_ops's own, other is pgl_app's, boss is a superuser's."""
    ops = ensure_role(pg_dsn, "pgl_ops", monitor=True)
    app = ensure_role(pg_dsn, "pgl_app", monitor=False)
    s = Sessions(pg_dsn)
    for name, dsn in (("own1", ops), ("other", app), ("own2", ops), ("boss", pg_dsn)):
        s.open(name, dsn, "opsjob", "SELECT 1", autocommit=True)
    try:
        yield ops, s
    finally:
        for conn in s.conns.values():
            conn.close()


OPSJOB = ("--idle-for", "0s", "--application", "opsjob", "--include-superusers")


def test_the_dry_run_warns_of_sessions_the_role_may_not_end(mixed: tuple[str, Sessions]) -> None:
    ops, s = mixed
    proc = cli("terminate", "--dsn", ops, *OPSJOB, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        f"pgleakguard: warning: pgl_ops may not end 1 of the 4 session(s) listed (other roles': "
        f'{s.pids["other"]}): GRANT pg_signal_backend TO "pgl_ops";',
        f"pgleakguard: warning: pgl_ops may not end 1 of the 4 session(s) listed (superusers': "
        f"{s.pids['boss']}): only a superuser may end a superuser's session",
    ]
    doc = json.loads(proc.stdout)
    can_end = {r["backend_pid"]: r["can_end"] for r in doc["sessions"]}
    assert can_end == {
        s.pids["own1"]: True,
        s.pids["own2"]: True,
        s.pids["other"]: False,
        s.pids["boss"]: False,
    }
    assert s.alive() == {"own1", "own2", "other", "boss"}


def test_execute_ends_what_it_may_and_names_each_refusal(mixed: tuple[str, Sessions]) -> None:
    ops, s = mixed
    proc = cli("terminate", "--dsn", ops, *OPSJOB, "--execute", "--yes", "--format", "json")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ended"] == sorted([s.pids["own1"], s.pids["own2"]])
    assert doc["failed"] == [
        {"backend_pid": pid, "error": "permission denied to terminate process"}
        for pid in sorted([s.pids["other"], s.pids["boss"]])
    ]
    assert s.alive() == {"other", "boss"}
    text = cli("terminate", "--dsn", ops, *OPSJOB, "--execute", "--yes").stdout.splitlines()
    assert text[:3] == [
        "pgleakguard terminate: ended 0 of 2 session(s)",
        f"not ended: {min(s.pids['other'], s.pids['boss'])} (permission denied to terminate "
        "process)",
        f"not ended: {max(s.pids['other'], s.pids['boss'])} (permission denied to terminate "
        "process)",
    ]
