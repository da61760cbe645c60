"""`pgleakguard recommend`: the arithmetic behind a safe max_connections, and pgbouncer.ini
files (from recommend and from diagnose) that the real pgbouncer runs; clients connected
through it are still named by their tags."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from server_helpers import (
    cli,
    cli_json,
    free_port,
    leaker_line,
    leaking_program,
    pgbouncer,
)

PASSWORD = "bouncer-only-pw"


def test_recommend_shows_the_arithmetic_for_16gb() -> None:
    doc = cli_json("recommend", "--ram", "16GB", "--instances", "4")
    steps = {s["name"]: s["value"] for s in doc["steps"]}
    assert steps == {
        "shared_buffers": "4 GiB",
        "OS and page cache": "4 GiB",
        "autovacuum": "192 MiB",
        "background workers": "112 MiB",
        "left for connections": "7.7 GiB",
        "per connection": "18 MiB",
        "max_connections": "438",
        "usable by applications": "435",
        "pool per app instance": "97",
        "PgBouncer max_db_connections": "348",
        "PgBouncer default_pool_size": "20",
    }
    assert doc["max_connections"] == 438
    assert doc["postgresql_conf"] == {
        "max_connections": "438",
        "shared_buffers": "4GB",
        "effective_cache_size": "12GB",
        "work_mem": "4MB",
        "maintenance_work_mem": "1GB",
    }
    text = cli("recommend", "--ram", "16GB", "--instances", "4").stdout
    rows = [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()]
    assert ["max_connections", "left for connections / per connection, rounded down", "438"] in rows
    assert [
        "per connection",
        "work_mem 4 MiB x hash_mem_multiplier 2 + backend 10 MiB",
        "18 MiB",
    ] in rows


def test_recommend_reads_the_server_settings(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        shared = conn.execute("SHOW shared_buffers").fetchone()
    assert shared is not None
    doc = cli_json("recommend", "--ram", "8GB", "--dsn", pg_dsn, "--cpus", "4")
    assert "shared_buffers" in doc["read_from_server"]
    steps = {s["name"]: s for s in doc["steps"]}
    assert steps["shared_buffers"]["formula"] == "from the server"
    assert steps["shared_buffers"]["value"] == shared[0].replace("MB", " MiB")
    assert steps["PgBouncer default_pool_size"]["value"] == "8"
    assert doc["notes"][0].startswith("The server now has max_connections = ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ram", "lots"], "argument --ram: 'lots' is not a size: expected a number and a unit"),
        (["--ram", "16GB", "--instances", "0"], "argument --instances: '0' is not a whole number"),
    ],
)
def test_recommend_rejects_bad_input_in_one_line(args: list[str], message: str) -> None:
    proc = cli("recommend", *args)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"pgleakguard recommend: error: {message}")


def test_too_little_ram_is_one_line() -> None:
    proc = cli("recommend", "--ram", "512MB", "--shared-buffers", "400MB")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "pgleakguard: error: 512 MiB of RAM leaves nothing for connections after "
        "shared_buffers 400 MiB, the OS reserve and workers"
    ]


@pytest.fixture
def bouncer_dir(tmp_path: Path) -> Path:
    """A directory the pgbouncer user can read, with a userlist for the superuser."""
    (tmp_path / "userlist.txt").write_text(f'"postgres" "{PASSWORD}"\n')
    return tmp_path


def _bouncer_args(where: Path, port: int) -> list[str]:
    return [
        "--pgbouncer-out",
        str(where / "pgbouncer.ini"),
        "--pgbouncer-listen",
        f"127.0.0.1:{port}",
        "--pgbouncer-auth-file",
        str(where / "userlist.txt"),
    ]


def _through(port: int) -> str:
    return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres"


@pytest.fixture
def recommended_bouncer(pg_dsn: str, bouncer_dir: Path) -> Iterator[int]:
    port = free_port()
    proc = cli("recommend", "--ram", "4GB", "--dsn", pg_dsn, *_bouncer_args(bouncer_dir, port))
    assert proc.returncode == 0, proc.stderr
    assert f"pgleakguard: wrote {bouncer_dir / 'pgbouncer.ini'}" in proc.stderr
    ini = (bouncer_dir / "pgbouncer.ini").read_text()
    assert "pool_mode = transaction" in ini
    with pgbouncer(bouncer_dir / "pgbouncer.ini", port):
        yield port


def test_recommended_pgbouncer_ini_runs_and_diagnose_still_names_its_clients(
    pg_dsn: str, recommended_bouncer: int
) -> None:
    with leaking_program(_through(recommended_bouncer)) as leaker:
        doc = cli_json(
            "diagnose",
            "--dsn",
            pg_dsn,
            "--idle-threshold",
            "0s",
            "--idle-in-transaction-threshold",
            "0s",
        )
    # Transaction pooling: the two sessions inside a transaction keep their server
    # connections, and PgBouncer passed the client's application_name on to them.
    held = {
        (s["reason"], s["service"], s["client_pid"], s["callsite"])
        for s in doc["suspects"]
        if s["client_pid"] == leaker.pid and s["reason"] != "idle"
    }
    assert held == {
        (
            "idle in transaction",
            "billing",
            leaker.pid,
            f"leaker.py:{leaker_line('in-transaction')}",
        ),
        (
            "idle in transaction (aborted)",
            "billing",
            leaker.pid,
            f"leaker.py:{leaker_line('aborted')}",
        ),
    }
    assert PASSWORD not in str(doc)


def test_diagnose_pgbouncer_ini_runs_in_pgbouncer(pg_dsn: str, bouncer_dir: Path) -> None:
    port = free_port()
    proc = cli("diagnose", "--dsn", pg_dsn, *_bouncer_args(bouncer_dir, port))
    assert proc.returncode == 0, proc.stderr
    ini = (bouncer_dir / "pgbouncer.ini").read_text()
    [entry] = [line for line in ini.splitlines() if line.startswith("postgres = ")]
    assert entry.endswith(" dbname=postgres")
    with pgbouncer(bouncer_dir / "pgbouncer.ini", port), psycopg.connect(_through(port)) as conn:
        row: Any = conn.execute("SELECT current_database(), current_user").fetchone()
    assert row == ("postgres", "postgres")
