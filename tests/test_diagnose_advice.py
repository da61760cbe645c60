"""The advice `diagnose` prints, figure by figure, from pg_stat_activity snapshots whose every
value is known: CONNECTION LIMIT per role, pool settings for each ORM (run with the real
SQLAlchemy, psycopg_pool and Django), PgBouncer's pool mode and what it rests on, sessions in
the reserved slots, sessions that cannot be measured, and triage titles for superusers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
import yaml
from psycopg_pool import ConnectionPool

from pgleakguard.diagnose.pgbouncer import WEAK_EVIDENCE

from server_helpers import cli, cli_json

NOW = ("--now", "2024-05-01 10:00:00+00")
COLUMNS = "pid,usename,rolsuper,datname,application_name,client_addr,state_change,state,query"


def snapshot(tmp_path: Path, rows: list[str], columns: str = COLUMNS) -> str:
    path = tmp_path / "activity.csv"
    path.write_text("\n".join([columns, *rows]) + "\n")
    return str(path)


def night_rows(extra: tuple[str, ...] = ()) -> list[str]:
    """web: a pool of 40 idle for 2 h (the night) and 2 active, over two processes; jobs: 3
    idle and 12 left idle in a transaction for 1 h; postgres (a superuser): one psql."""
    rows = [
        f"{1000 + i},web,f,shop,web/pid:{900 + i % 2},10.0.0.5,2024-05-01 08:00:00+00,idle,SELECT 1"
        for i in range(40)
    ]
    rows += [
        f"{1100 + i},web,f,shop,web/pid:900,10.0.0.5,2024-05-01 09:59:59+00,active,SELECT 1"
        for i in range(2)
    ]
    rows += [
        f"{2000 + i},jobs,f,shop,jobs/pid:950,10.0.0.6,2024-05-01 09:59:00+00,idle,SELECT 1"
        for i in range(3)
    ]
    rows += [
        f"{2100 + i},jobs,f,shop,jobs/pid:950,10.0.0.6,2024-05-01 09:00:00+00,"
        "idle in transaction,UPDATE jobs SET n = n + 1"
        for i in range(12)
    ]
    rows.append("3000,postgres,t,shop,psql,,2024-05-01 09:59:59+00,active,SELECT 1")
    return [*rows, *extra]


def diagnose_night(tmp_path: Path, *extra: str) -> Any:
    path = snapshot(tmp_path, night_rows(extra))
    return cli_json("diagnose", "--snapshot", path, "--max-connections", "100", *NOW)


def fix(doc: Any, name: str) -> str:
    return str(next(f["text"] for f in doc["fixes"] if f["name"] == name))


def test_connection_limits_count_idle_pools_spare_leaks_and_skip_superusers(
    tmp_path: Path,
) -> None:
    doc = diagnose_night(tmp_path)
    # The idle pool is 40 suspects (idle > 10m) but counts as in use: no limit of 10 for web.
    assert len(doc["suspects"]) == 52
    assert fix(doc, "CONNECTION LIMIT").splitlines() == [
        "-- limit = 1.5 x the role's sessions in use (all but those leaked idle in a transaction),",
        "-- at least 10, at most the usable slots; a role over its limit gets an error instead",
        "-- of taking every slot. Per role, not per database: a database limit caps every",
        "-- service using it. Superusers are never limited.",
        'ALTER ROLE "web" CONNECTION LIMIT 63;  -- seen 42, 0 leaked in a transaction, 42 in use',
        'ALTER ROLE "jobs" CONNECTION LIMIT 10;  -- seen 15, 12 leaked in a transaction, 3 in use',
        "--   jobs has 15 sessions now: its new connections fail until the leaked ones end "
        "(triage above)",
        "-- postgres: a superuser, CONNECTION LIMIT does not apply",
    ]


HOW = (
    "# pool size 19 = min(20, 80% of 97 usable slots / 4 client process(es)), at least 2; "
    "20 is about what one PostgreSQL server runs at once"
)


def test_pool_settings_for_each_orm_carry_the_computed_size_and_run(
    tmp_path: Path, pg_dsn: str
) -> None:
    doc = diagnose_night(tmp_path)
    assert doc["pgbouncer"]["pool_mode"] == "transaction"
    texts = {f["name"]: f["text"] for f in doc["fixes"] if f["language"] != "sql"}
    assert list(texts) == ["SQLAlchemy", "psycopg_pool", "Django", "Rails ActiveRecord", "HikariCP"]
    assert all(text.splitlines()[0] == HOW for text in texts.values())

    # SQLAlchemy with psycopg 3 behind transaction pooling: no prepared statements.
    url = pg_dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    space: dict[str, Any] = {"create_engine": sa.create_engine, "url": url}
    exec(texts["SQLAlchemy"], space)
    engine = space["engine"]
    try:
        assert (engine.pool.size(), engine.pool._max_overflow, engine.pool.timeout()) == (19, 0, 10)
        with engine.connect() as conn:
            assert conn.connection.dbapi_connection.prepare_threshold is None
    finally:
        engine.dispose()

    space = {"ConnectionPool": ConnectionPool, "conninfo": pg_dsn}
    exec(texts["psycopg_pool"], space)
    pool: ConnectionPool[psycopg.Connection[Any]] = space["pool"]
    try:
        assert (pool.min_size, pool.max_size, pool.timeout, pool.max_idle) == (2, 19, 10, 300)
        with pool.connection() as conn:
            assert conn.prepare_threshold is None
    finally:
        pool.close()

    databases: dict[str, Any] = {"default": {"OPTIONS": {}}}
    exec(texts["Django"], {"DATABASES": databases})
    assert databases["default"]["OPTIONS"] == {
        "pool": {"min_size": 2, "max_size": 19, "timeout": 10}
    }
    assert databases["default"]["DISABLE_SERVER_SIDE_CURSORS"] is True
    assert '"server_side_binding": True' in texts["Django"]

    assert yaml.safe_load(texts["Rails ActiveRecord"]) == {
        "production": {
            "pool": 19,
            "checkout_timeout": 5,
            "idle_timeout": 300,
            "reaping_frequency": 60,
            "prepared_statements": False,
            "advisory_locks": False,
        }
    }
    properties = dict(
        line.split("=", 1) for line in texts["HikariCP"].splitlines() if not line.startswith("#")
    )
    assert properties["maximumPoolSize"] == properties["minimumIdle"] == "19"
    assert (
        "# PgBouncer transaction mode: add prepareThreshold=0 to the JDBC URL" in texts["HikariCP"]
    )


def test_session_pooling_drops_the_transaction_mode_settings(tmp_path: Path) -> None:
    listener = "4000,web,f,shop,web/pid:900,10.0.0.5,2024-05-01 09:59:00+00,idle,LISTEN jobs"
    doc = diagnose_night(tmp_path, listener)
    assert doc["pgbouncer"]["pool_mode"] == "session"
    texts = {f["name"]: f["text"] for f in doc["fixes"] if f["language"] != "sql"}
    for name, text in texts.items():
        assert not any(
            word in text
            for word in ("prepare", "PgBouncer", "server_side_binding", "advisory_locks")
        ), name


def test_no_session_features_gives_transaction_pooling_with_its_weak_evidence(
    tmp_path: Path,
) -> None:
    doc = diagnose_night(tmp_path)
    reasons = doc["pgbouncer"]["reasons"]
    assert reasons[:2] == [
        "transaction pooling: no session features (LISTEN, advisory locks, SQL PREPARE, "
        "WITH HOLD cursors, temp tables, session SET) in the last query of the 58 sessions "
        "seen, nor advisory locks in pg_locks",
        WEAK_EVIDENCE,
    ]
    assert f";; {WEAK_EVIDENCE}" in doc["pgbouncer"]["ini"].splitlines()


def test_transaction_scoped_statements_are_not_session_features(tmp_path: Path) -> None:
    queries = [
        "SET TIME ZONE 'UTC'",  # PgBouncer tracks TimeZone
        "SET SESSION TIME ZONE 'Europe/Paris'",
        "SET NAMES 'UTF8'",  # client_encoding, tracked too
        "CREATE TEMP TABLE t1 (x int) ON COMMIT DROP",  # gone at commit
        "SET LOCAL search_path = app",
        "CREATE TEMP TABLE t2 (x int) ON COMMIT DELETE ROWS",  # the table stays
        "SET SESSION AUTHORIZATION app",
        "SET search_path = app",
    ]
    rows = [
        f'{300 + i},app,f,shop,svc,,2024-05-01 09:59:00+00,idle,"{q}"'
        for i, q in enumerate(queries)
    ]
    doc = cli_json("diagnose", "--snapshot", snapshot(tmp_path, rows), *NOW)
    found = {f["name"]: f["backend_pids"] for f in doc["pgbouncer"]["session_features"]}
    assert found == {"temp tables": [305], "session SET": [306, 307]}


def test_sessions_in_the_reserved_slots_are_explained(tmp_path: Path) -> None:
    rows = [
        f"{100 + i},app,f,shop,api/pid:7,10.0.0.5,2024-05-01 09:59:59+00,active,SELECT 1"
        for i in range(97)
    ]
    rows += [
        f"{300 + i},postgres,t,shop,psql,,2024-05-01 09:59:59+00,active,SELECT 1" for i in range(2)
    ]
    path = snapshot(tmp_path, rows)
    args = ("diagnose", "--snapshot", path, "--max-connections", "100", *NOW)
    doc = cli_json(*args)
    [finding] = [f for f in doc["findings"] if f["kind"] == "reserved_slots"]
    assert finding["summary"] == (
        "99 client sessions of 97 slots: 2 of them are in the 3 reserved slot(s), which only "
        "superusers may use; 2 session(s) run as superuser postgres; every other role already "
        'gets "remaining connection slots are reserved"'
    )
    assert finding["backend_pids"] == [300, 301]
    assert f"1. {finding['summary']}" in cli(*args).stdout


def test_a_snapshot_without_state_change_says_the_suspects_cannot_be_measured(
    tmp_path: Path,
) -> None:
    rows = ["1,app,shop,idle in transaction,UPDATE t SET x = 1", "2,app,shop,idle,SELECT 1"]
    rows.append("3,app,shop,active,SELECT 2")
    path = snapshot(tmp_path, rows, "pid,usename,datname,state,query")
    args = ("diagnose", "--snapshot", path, *NOW)
    doc = cli_json(*args)
    assert doc["suspects"] == []
    [finding] = doc["findings"]
    assert finding["kind"] == "unmeasured"
    assert finding["summary"] == (
        "2 of 3 sessions could be leaks but cannot be measured (1 idle, 1 idle in "
        "transaction): state_change is missing (export every pg_stat_activity column)"
    )
    assert finding["backend_pids"] == [1, 2]
    text = cli(*args).stdout
    assert f"1. {finding['summary']}" in text
    assert "No leak suspects and nothing unusual" not in text

    # No timestamp at all and no --now: the moment itself is unknown.
    doc = cli_json("diagnose", "--snapshot", path)
    assert doc["findings"][0]["summary"] == (
        "2 of 3 sessions could be leaks but cannot be measured (1 idle, 1 idle in "
        "transaction): the moment of the snapshot is unknown (no now column, no timestamps: "
        "give --now)"
    )


def test_triage_titles_say_which_superusers_sessions_their_sql_ends(tmp_path: Path) -> None:
    rows = [
        "10,postgres,t,shop,psql,,2024-05-01 09:00:00+00,idle,SELECT 1",
        "11,app,,shop,cron,,2024-05-01 09:00:00+00,idle,SELECT 1",
        "12,app,,shop,cron,,2024-05-01 09:00:00+00,idle,SELECT 1",
        "13,app,,shop,billing/pid:5,,2024-05-01 09:00:00+00,idle,SELECT 1",
    ]
    doc = cli_json("diagnose", "--snapshot", snapshot(tmp_path, rows), *NOW)
    triage = {t["title"]: t["sql"] for t in doc["triage"]}
    spared = "AND NOT EXISTS (SELECT 1 FROM pg_roles AS r WHERE r.oid = a.usesysid AND r.rolsuper)"
    assert {title: spared in sql for title, sql in triage.items()} == {
        # Unknown superuser-ness outside a pgleakguard tag: spared, and said so.
        "End the 2 session(s) of application cron in state 'idle' for more than 10m "
        "(superusers' sessions are spared: which roles are superusers is unknown, export "
        "rolsuper with the snapshot)": True,
        # A superuser's psql: included, as the title says, with a warning.
        "End the 1 session(s) of application psql in state 'idle' for more than 10m (1 of "
        "them run as superuser postgres: this SQL includes superusers' sessions; check they "
        "are not an administrator's)": False,
        # A tag names the application, never an administrator: included.
        "End the 1 session(s) of service billing, pid 5 in state 'idle' for more than 10m": False,
    }
