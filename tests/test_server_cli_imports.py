"""The server-side commands cost nothing until used, and say which extra is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg

from pgleakguard import server

BLOCK = "import sys; sys.modules['psycopg'] = None; sys.modules['rich'] = None; "


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_the_cli_imports_neither_psycopg_nor_rich() -> None:
    proc = _python(
        "import sys, pgleakguard.cli as cli; cli._parser(); "
        "print(sorted(m for m in ('psycopg', 'rich') if m in sys.modules))"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_without_the_cli_extra_a_live_command_says_what_to_install() -> None:
    proc = _python(
        BLOCK + "from pgleakguard.cli import main; sys.exit(main(['diagnose', '--dsn', 'x']))"
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "pgleakguard: error: talking to PostgreSQL needs psycopg: pip install 'pgleakguard[cli]'"
    ]


def test_a_snapshot_needs_no_extra(tmp_path: Path) -> None:
    snap = tmp_path / "s.csv"
    snap.write_text("pid,state,state_change\n7,idle,2024-05-01 09:00:00+00\n")
    proc = _python(
        BLOCK + f"from pgleakguard.cli import main; sys.exit(main(['diagnose', '--snapshot', "
        f"{str(snap)!r}, '--format', 'markdown']))"
    )
    assert proc.returncode == 0, proc.stderr
    assert "| idle | 1 | 100% |" in proc.stdout


def test_the_activity_query_of_older_versions_runs_with_nulls_for_missing_columns(
    pg_dsn: str,
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for version, present in (
            (120000, set()),
            (130000, {"leader_pid"}),
            (140000, {"leader_pid", "query_id"}),
        ):
            sql = server.activity_sql(version)
            assert ("a.leader_pid" in sql) == ("leader_pid" in present)
            assert ("a.query_id" in sql) == ("query_id" in present)
            cur = conn.execute(sql)
            names = [d.name for d in cur.description or []]
            assert names[:3] == ["now", "datname", "pid"]
            assert {"leader_pid", "query_id", "backend_type"} <= set(names)
            mine = [r for r in cur.fetchall() if r[2] == conn.info.backend_pid]
            assert len(mine) == 1
