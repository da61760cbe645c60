"""`diagnose --snapshot`: pg_stat_activity exported by real psql (\\copy CSV, aligned table,
expanded) and as JSON reads back to the same suspects as the live server; broken files give
one line naming the line number, exit code 2, no traceback."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cli_terminal import run_in_terminal
from conftest import skip_or_fail
from server_helpers import Leaker, cli, cli_json, leaker_line, leaking_program

MULTILINE = "SELECT 'é' AS accent,\n       '日本' AS wide"
IMMEDIATE = ("--idle-threshold", "0s", "--idle-in-transaction-threshold", "0s")


@pytest.fixture(scope="module")
def exported(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One moment of a server with a leaking program, exported in every format."""
    psql = shutil.which("psql")
    if psql is None:
        skip_or_fail("psql not found (apt-get install postgresql-client)")
    out = tmp_path_factory.mktemp("snapshots")
    with leaking_program(pg_dsn) as leaker, psycopg.connect(pg_dsn, autocommit=True) as other:
        other.execute(MULTILINE)

        def run_psql(*args: str) -> str:
            proc = subprocess.run(
                [psql, "-X", "-q", "-d", pg_dsn, *args], capture_output=True, text=True, check=True
            )
            return proc.stdout

        files = {
            "csv": out / "activity.csv",
            "aligned": out / "activity.txt",
            "expanded": out / "activity-x.txt",
            "expanded-toggled": out / "activity-toggled.txt",
            "json": out / "activity.json",
            "jsonl": out / "activity.jsonl",
        }
        run_psql("-c", f"\\copy (select * from pg_stat_activity) to '{files['csv']}' csv header")
        files["aligned"].write_text(run_psql("-c", "select * from pg_stat_activity"))
        files["expanded"].write_text(run_psql("-x", "-c", "select * from pg_stat_activity"))
        # \x inside the session, without -q: psql first says "Expanded display is on."
        toggled = subprocess.run(
            [psql, "-X", "-d", pg_dsn, "-c", "\\x", "-c", "select * from pg_stat_activity"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert toggled.startswith("Expanded display is on.\n")
        files["expanded-toggled"].write_text(toggled)
        with psycopg.connect(pg_dsn) as conn:
            row = conn.execute("SELECT json_agg(a) FROM pg_stat_activity AS a").fetchone()
            assert row is not None
            files["json"].write_text(json.dumps(row[0], indent=1))
            lines = conn.execute("SELECT row_to_json(a)::text FROM pg_stat_activity AS a")
            files["jsonl"].write_text("\n".join(r[0] for r in lines.fetchall()) + "\n")
        yield {"leaker": leaker, "other": other.info.backend_pid, "files": files}


@pytest.mark.parametrize("fmt", ["csv", "aligned", "expanded", "expanded-toggled", "json", "jsonl"])
def test_each_export_format_gives_the_leaks_with_service_pid_and_callsite(
    fmt: str, exported: dict[str, Any]
) -> None:
    leaker: Leaker = exported["leaker"]
    doc = cli_json("diagnose", "--snapshot", str(exported["files"][fmt]), *IMMEDIATE)
    assert doc["source"]["kind"] == "snapshot"
    found = {
        (s["backend_pid"], s["reason"], s["service"], s["client_pid"], s["callsite"])
        for s in doc["suspects"]
        if s["client_pid"] == leaker.pid
    }
    b = leaker.backends
    assert found == {
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
    [other] = [s for s in doc["suspects"] if s["backend_pid"] == exported["other"]]
    assert other["query"] == MULTILINE
    # Only client backends by default: checkpointer, walwriter and friends are left out.
    assert doc["totals"]["sessions"] == sum(n for _, n in _states(doc))


def _states(doc: dict[str, Any]) -> list[tuple[str, int]]:
    return [(r["value"], r["sessions"]) for r in doc["breakdown"]["state"]]


COLUMNS = (
    "pid,usename,datname,application_name,client_addr,backend_start,state_change,"
    "state,query,backend_type"
)


def test_a_big_idle_leak_is_the_first_finding_with_its_evidence(tmp_path: Path) -> None:
    rows = [COLUMNS]
    comment = "/*callsite='orders.py:42',pid='4123',service='billing'*/"
    for i in range(83):
        rows.append(
            f"{1000 + i},app,shop,billing/pid:4123,10.0.0.5,2024-05-01 09:00:00+00,"
            f'2024-05-01 09:00:00+00,idle,"SELECT * FROM orders {comment}",client backend'
        )
    for i in range(14):
        rows.append(
            f"{2000 + i},app,shop,api/pid:77,10.0.0.6,2024-05-01 09:59:00+00,"
            f"2024-05-01 09:59:59.5+00,active,SELECT 1,client backend"
        )
    snap = tmp_path / "outage.csv"
    snap.write_text("\n".join(rows) + "\n")
    args = ("--snapshot", str(snap), "--max-connections", "100", "--now", "2024-05-01 10:00:00+00")
    doc = cli_json("diagnose", *args)
    first = doc["findings"][0]
    assert first["summary"] == (
        "83 of 97 slots are idle connections from service billing, pid 4123, "
        "last call-site orders.py:42 (longest 1h)"
    )
    assert first["backend_pids"] == list(range(1000, 1083))
    assert first["evidence"]["users"] == ["app"] and first["evidence"]["databases"] == ["shop"]
    assert doc["totals"] == {
        "sessions": 97,
        "usable_connections": 97,
        "used_percent": 100.0,
        "suspects": 83,
        "hidden": 0,
    }
    assert doc["server"]["assumed"] == ["superuser_reserved_connections=3 (the default)"]
    assert {r["value"]: r["sessions"] for r in doc["breakdown"]["client_addr"]} == {
        "10.0.0.5": 83,
        "10.0.0.6": 14,
    }
    [triage] = doc["triage"]
    assert triage["sessions"] == 83
    assert "AND (a.application_name = 'billing/pid:4123' OR " in triage["sql"]
    assert "AND a.state_change < now() - interval '600 seconds'" in triage["sql"]
    limits = next(f for f in doc["fixes"] if f["name"] == "CONNECTION LIMIT")["text"]
    assert (
        "-- app: no limit below the 97 usable slots leaves it headroom "
        "(seen 97, 0 leaked in a transaction, 97 in use)"
    ) in limits
    text = cli("diagnose", *args).stdout
    assert (
        "97 client sessions of 97 usable slots (100%): max_connections 100 - 3 reserved "
        "(superuser_reserved_connections 3); assumed: superuser_reserved_connections=3 "
        "(the default)"
    ) in text
    assert (
        "1. 83 of 97 slots are idle connections from service billing, pid 4123, last call-site "
        "orders.py:42 (longest 1h)"
    ) in text


def test_version_gated_fixes_follow_server_version(tmp_path: Path) -> None:
    snap = tmp_path / "s.csv"
    snap.write_text(COLUMNS + "\n1,app,shop,,,,2024-05-01 09:00:00+00,idle,SELECT 1,\n")
    for version, applies in (("13", False), ("14", True)):
        doc = cli_json("diagnose", "--snapshot", str(snap), "--server-version", version)
        fixes = {f["name"]: f["applies"] for f in doc["fixes"]}
        assert fixes["idle_session_timeout"] is applies
        assert fixes["client_connection_check_interval"] is applies
        assert fixes["transaction_timeout"] is False
        assert fixes["idle_in_transaction_session_timeout"] is True
    doc = cli_json("diagnose", "--snapshot", str(snap))
    assert {f["name"]: f["applies"] for f in doc["fixes"]}["transaction_timeout"] is None


BROKEN = [
    (
        "wrong-fields.csv",
        "pid,state,query\n1,idle,x\n2,idle\n",
        "line 3: 2 fields, but the header has 3 columns",
    ),
    ("bad-pid.csv", "pid,state\nabc,idle\n", "line 2: pid 'abc' is not a whole number"),
    (
        "bad-time.csv",
        "pid,state,state_change\n1,idle,2024-05-01 09:00:00+00\n2,idle,yesterday\n",
        "line 3: state_change 'yesterday' is not a timestamp",
    ),
    (
        "multi-line-record.csv",
        'pid,query\n1,"SELECT\n1"\nx,SELECT 2\n',
        "line 4: pid 'x' is not a whole number",
    ),
    (
        "unclosed-quote.csv",
        'pid,state,query\n1,idle,"SELECT 1\n2,idle,x\n',
        'line 2: bad CSV: a quoted field starting on this line has no closing quote (")',
    ),
    (
        "junk-after-quote.csv",
        'pid,state,query\n1,idle,SELECT 1\n2,idle,"SELECT 2"x\n',
        "line 3: bad CSV: ',' expected after '\"'",
    ),
    (
        "unclosed-quote-header.csv",
        'pid,"state\n1,idle\n',
        'line 1: bad CSV header: a quoted field starting on this line has no closing quote (")',
    ),
    ("cut.json", '[{"pid": 1},\n {"pid": 2', "line 2: invalid JSON: Expecting ',' delimiter"),
    ("not-closed.json", '[{"pid": 1},\n', "line 2: invalid JSON: the array is not closed"),
    ("numbers.json", "[\n 1\n]", "line 2: expected an object with pg_stat_activity columns, got 1"),
    (
        "no-pid.json",
        '[{"state": "idle"}]',
        "line 1: no pid column: export the pg_stat_activity columns",
    ),
    (
        "broken-row.txt",
        " pid | state\n-----+-------\n   1 | idle\n 2   idle\n(2 rows)\n",
        "line 4: expected 2 columns separated by '|' under the header's columns",
    ),
    (
        "broken-expanded.txt",
        "-[ RECORD 1 ]----\npid   | 1\nstate | idle\n-[ RECORD 2 ]----\npid   | 2\nstate idle\n",
        "line 6: expected 'column | value' inside a -[ RECORD n ]- block",
    ),
    (
        "expanded-column-twice.txt",
        "-[ RECORD 1 ]----\npid   | 1\npid   | 2\n",
        "line 3: column pid twice in one -[ RECORD n ]- block",
    ),
    (
        "expanded-before-record.txt",
        "pid   | 1\n-[ RECORD 1 ]----\npid   | 2\n",
        "line 1: expected 'column | value' inside a -[ RECORD n ]- block",
    ),
    ("empty.csv", "", "line 1: the file is empty"),
    (
        "prose.txt",
        "the database was slow\n",
        "line 1: not a pg_stat_activity export: expected CSV with a header (incl. pid), JSON, "
        "or psql table output",
    ),
]


@pytest.mark.parametrize(("name", "content", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_snapshot_is_one_line_with_the_line_number(
    name: str, content: str, message: str, tmp_path: Path
) -> None:
    path = tmp_path / name
    path.write_text(content)
    proc = cli("diagnose", "--snapshot", str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"pgleakguard: error: {path}: {message}"]


def test_a_missing_snapshot_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    proc = cli("diagnose", "--snapshot", str(path))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"pgleakguard: error: {path}: No such file or directory"]


def _snapshot(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "activity.csv"
    path.write_text("\n".join([COLUMNS, *rows]) + "\n")
    return path


def test_pools_holding_many_idle_connections_are_a_finding(tmp_path: Path) -> None:
    rows = [
        f"{100 + i},web,shop,web/pid:{900 + i % 2},10.0.0.7,2024-05-01 09:00:00+00,"
        "2024-05-01 09:59:00+00,idle,SELECT 1,client backend"
        for i in range(30)
    ]
    rows.append(
        "200,web,shop,web/pid:900,10.0.0.7,2024-05-01 09:00:00+00,2024-05-01 09:59:59+00,"
        "active,SELECT 2,client backend"
    )
    doc = cli_json(
        "diagnose",
        "--snapshot",
        str(_snapshot(tmp_path, rows)),
        "--max-connections",
        "100",
        "--now",
        "2024-05-01 10:00:00+00",
    )
    assert doc["suspects"] == []
    [finding] = doc["findings"]
    assert finding["kind"] == "idle_pool"
    assert finding["summary"] == (
        "30 of 97 slots are idle connections kept open by service web (2 processes, 1 active "
        "at the moment): pools larger than the work needs"
    )


def test_session_features_are_named_as_reasons_for_session_pooling(tmp_path: Path) -> None:
    queries = {
        "LISTEN orders_changed": "LISTEN",
        "PREPARE q AS SELECT 1": "SQL PREPARE",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1": "WITH HOLD cursors",
        "CREATE TEMP TABLE t (x int)": "temp tables",
        "SELECT pg_advisory_lock(42)": "advisory locks",
        "SET search_path = app": "session SET",
        "SET application_name = 'x'": None,  # PgBouncer tracks this one itself
        "SET LOCAL statement_timeout = 1000": None,
        "SELECT set_config('app.user', '7', true)": None,  # transaction-local
    }
    rows = [
        f'{300 + i},app,shop,svc,,2024-05-01 09:00:00+00,2024-05-01 09:59:00+00,idle,"{q}",'
        "client backend"
        for i, q in enumerate(queries)
    ]
    doc = cli_json("diagnose", "--snapshot", str(_snapshot(tmp_path, rows)))
    found = {f["name"]: f["backend_pids"] for f in doc["pgbouncer"]["session_features"]}
    assert found == {
        "LISTEN": [300],
        "SQL PREPARE": [301],
        "WITH HOLD cursors": [302],
        "temp tables": [303],
        "advisory locks": [304],
        "session SET": [305],
    }
    assert doc["pgbouncer"]["pool_mode"] == "session"
    assert (
        ";; session pooling because of LISTEN (1 session, e.g. backend 300: LISTEN "
        "orders_changed): notifications go to whichever client holds the server connection next"
    ) in doc["pgbouncer"]["ini"]


def test_on_an_80_column_terminal_tables_are_drawn_and_sql_lines_stay_whole(
    tmp_path: Path,
) -> None:
    comment = "/*callsite='orders.py:42',pid='4123',service='billing'*/"
    path = _snapshot(
        tmp_path,
        [
            f"{1000 + i},app,shop,billing/pid:4123,10.0.0.5,2024-05-01 09:00:00+00,"
            f'2024-05-01 09:00:00+00,idle,"SELECT * FROM orders {comment}",client backend'
            for i in range(3)
        ],
    )
    code, shown = run_in_terminal(
        "diagnose", "--snapshot", str(path), "--now", "2024-05-01 10:00:00+00"
    )
    assert code == 0, shown
    lines = shown.splitlines()
    assert any(ln.startswith("┃ state ") for ln in lines), shown  # rich tables: the terminal path
    for sql in (
        "      AND (a.application_name = 'billing/pid:4123' OR a.application_name LIKE "
        "'billing/pid:4123/%')",
        "    SELECT a.pid, a.usename, a.application_name, a.state, "
        "pg_terminate_backend(a.pid) AS terminated",
    ):
        assert len(sql) > 80 and sql in lines, shown


def _readme_json_fields() -> dict[str, str]:
    """The README's table of the --format json document: field -> its meaning."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### `--format json` (version 1)", 1)[1].split("\n#", 1)[0]
    fields: dict[str, str] = {}
    for line in section.splitlines():
        m = re.fullmatch(r"\| (.+?) \| (.+) \|", line)
        if m and m.group(1) not in ("field", "---"):
            for name in re.findall(r"`(\w+)`", m.group(1)):
                fields[name] = m.group(2)
    return fields


def test_the_json_document_has_exactly_the_fields_the_readme_documents(tmp_path: Path) -> None:
    comment = "/*callsite='orders.py:42',pid='4123',service='billing'*/"
    path = _snapshot(
        tmp_path,
        [
            *(
                f"{1000 + i},app,shop,billing/pid:4123,10.0.0.5,2024-05-01 09:00:00+00,"
                f'2024-05-01 09:00:00+00,idle in transaction,"LISTEN jobs {comment}",client backend'
                for i in range(3)
            ),
            "2000,,,,,,,,<insufficient privilege>,",
        ],
    )
    doc = cli_json(
        "diagnose",
        "--snapshot",
        str(path),
        "--now",
        "2024-05-01 10:00:00+00",
        "--max-connections",
        "100",
    )
    documented = _readme_json_fields()
    assert set(doc) == set(documented)

    def names(meaning: str) -> set[str]:
        return set(re.findall(r'[`"](\w+)[`"]', meaning))

    nested = {
        "source": doc["source"],
        "server": doc["server"],
        "thresholds": doc["thresholds"],
        "totals": doc["totals"],
        "breakdown": doc["breakdown"],
        "privileges": doc["privileges"],
        "pgbouncer": doc["pgbouncer"],
        "owners": doc["owners"][0],
        "suspects": doc["suspects"][0],
        "findings": doc["findings"][0],
        "triage": doc["triage"][0],
        "fixes": doc["fixes"][0],
    }
    for field, value in nested.items():
        undocumented = set(value) - names(documented[field])
        assert not undocumented, (field, undocumented)
    assert set(doc["breakdown"]["state"][0]) <= names(documented["breakdown"])
    [feature] = doc["pgbouncer"]["session_features"]
    assert set(feature) <= names(documented["pgbouncer"])


def test_sessions_beyond_the_usable_slots_are_said_to_be_in_the_reserved_ones(
    tmp_path: Path,
) -> None:
    path = _snapshot(
        tmp_path,
        [
            f"{1000 + i},postgres,shop,psql,,2024-05-01 09:00:00+00,2024-05-01 09:59:59+00,"
            "active,SELECT 1,client backend"
            for i in range(99)
        ],
    )
    text = cli("diagnose", "--snapshot", str(path), "--max-connections", "100").stdout
    assert text.splitlines()[1] == (
        "99 client sessions: all 97 usable slots taken and 2 of the 3 reserved ones: "
        "max_connections 100 - 3 reserved (superuser_reserved_connections 3); assumed: "
        "superuser_reserved_connections=3 (the default)"
    )
