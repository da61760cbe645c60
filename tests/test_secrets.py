"""A password never leaves through pgleakguard: reports, logs, exceptions, JSON, OpenTelemetry,
application_name, CLI output. And SQL in reports is cut and, on request, redacted.

The test server trusts local connections, so every DSN below connects whatever its password
says: the sentinel travels through every code path and is then searched for in everything
that came out.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import psycopg
import psycopg_pool
import pytest
import sqlalchemy as sa
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgleakguard
from pgleakguard import _safety

from conftest import EventLog

SENTINEL = "Sentinel-pw-4c1d"


def forms(pg_dsn: str) -> dict[str, str]:
    """The sentinel password in each DSN form: URL, key=value (plain and quoted)."""
    params = {k: v for k, v in conninfo_to_dict(pg_dsn).items() if k != "password"}
    host = str(params.get("host", ""))
    user = params.get("user") or "postgres"
    db = params.get("dbname") or "postgres"
    port = f"&port={params['port']}" if params.get("port") else ""
    return {
        "url": f"postgresql://{user}:{SENTINEL}@/{db}?host={quote(host, safe='')}{port}",
        "keyvalue": make_conninfo(**params, password=SENTINEL),
        "quoted": make_conninfo(**params) + f" password='{SENTINEL} x'",
        "plain": make_conninfo(**params),
    }


class Captured:
    """Everything that left pgleakguard, as text."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, what: str, text: Any) -> None:
        self.parts.append(f"--- {what}\n{text}")

    def assert_clean(self) -> None:
        text = "\n".join(self.parts)
        assert text.strip(), "nothing was captured: the test checks nothing"
        where = [p.splitlines()[0] for p in self.parts if SENTINEL in p]
        assert not where, f"the password appeared in: {where}"


@pytest.fixture
def everything(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> Captured:
    caplog.set_level(logging.DEBUG)
    return Captured()


@pytest.mark.allow_internal_errors  # the unreachable activity_dsn is counted as one
def test_no_report_log_exception_json_span_or_tag_carries_the_password(
    pg_dsn: str,
    install: Callable[..., EventLog],
    otel: Any,
    everything: Captured,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dsn = forms(pg_dsn)
    jsonl = tmp_path / "events.jsonl"
    bad_activity = dsn["url"].replace("host=", "port=1&host=")  # unreachable: its error is logged
    events = install(
        leak_threshold=0.2,
        jsonl_path=str(jsonl),
        activity_dsn=dsn["keyvalue"],
        **otel.options(),
    )
    held = [psycopg.connect(dsn["url"]), psycopg.connect(dsn["keyvalue"])]
    held.append(psycopg.connect(dsn["quoted"]))
    monkeypatch.setenv("PGPASSWORD", SENTINEL)
    held.append(psycopg.connect(dsn["plain"]))
    for conn in held:
        conn.execute("SELECT 1")

    with psycopg_pool.ConnectionPool(dsn["keyvalue"], min_size=1, max_size=1, timeout=0.2) as pool:
        pooled = pool.getconn()
        with pytest.raises(psycopg_pool.PoolTimeout) as pool_timeout:
            pool.getconn()
        everything.add("PoolTimeout", pool_timeout.value)

        url = "postgresql+psycopg" + dsn["url"][len("postgresql") :]
        engine = sa.create_engine(url, pool_size=1, max_overflow=0, pool_timeout=0.2)
        everything.add("engine repr", repr(engine))
        sa_conn = engine.connect()
        with pytest.raises(sa.exc.TimeoutError) as sa_timeout:
            engine.connect()
        everything.add("QueuePool timeout", sa_timeout.value)

        events.wait_for("held_too_long", count=6)
        everything.add("correlate", [c.as_dict() for c in pgleakguard.correlate(dsn["url"])])
        everything.add("open_checkouts", [c.as_dict() for c in pgleakguard.open_checkouts()])
        everything.add("stats", pgleakguard.stats())
        with psycopg.connect(pg_dsn) as reader:
            names = reader.execute("SELECT application_name FROM pg_stat_activity").fetchall()
        everything.add("application_name", names)
        assert any(name == (f"tests/pid:{__import__('os').getpid()}",) for name in names)

        pgleakguard.install(
            leak_threshold=0.2, activity_dsn=bad_activity, on_leak=events.append, service="tests"
        )
        events.clear()
        again = psycopg.connect(dsn["url"])
        events.wait_for("held_too_long")
        pgleakguard.check()
        again.close()
        pool.putconn(pooled)
        sa_conn.close()
        engine.dispose()
    for conn in held:
        conn.close()
    pgleakguard.uninstall()

    leaks = events.leaks()
    assert leaks
    everything.add("events", [e.render() for e in events] + [e.as_dict() for e in events])
    everything.add("jsonl", jsonl.read_text())
    everything.add("spans", [s.to_json() for s in otel.exporter.get_finished_spans()])
    everything.add("metrics", otel.reader.get_metrics_data().to_json())
    everything.add("log", "\n".join(caplog.text.splitlines()))
    captured = capfd.readouterr()
    everything.add("stdout/stderr", captured.out + captured.err)
    everything.assert_clean()


def test_an_unreachable_activity_dsn_logs_its_error_without_the_password(
    pg_dsn: str, install: Callable[..., EventLog], caplog: pytest.LogCaptureFixture
) -> None:
    dsn = forms(pg_dsn)["url"].replace("host=", "port=1&host=")
    _safety.forget_logged()  # an earlier test may have logged this place's one line
    events = install(leak_threshold=0.2, activity_dsn=dsn)
    with caplog.at_level(logging.WARNING, logger="pgleakguard"):  # an operational error
        conn = psycopg.connect(pg_dsn)
        [leak] = events.wait_for("held_too_long")
        pgleakguard.check()
        conn.close()
    assert "pg_stat_activity" not in leak.details
    assert "cannot connect to postgresql://postgres@/postgres?port=1" in caplog.text
    assert SENTINEL not in caplog.text + leak.render()


CLI_CASES = [
    ("diagnose", "--format", "json"),
    ("diagnose", "--format", "text"),
    ("diagnose", "--format", "markdown"),
    ("watch", "--once"),
    ("terminate", "--idle-for", "1h", "--format", "json"),
    ("recommend", "--ram", "4GB", "--format", "json"),
]


@pytest.mark.parametrize("form", ["url", "keyvalue", "quoted"])
def test_cli_output_never_shows_the_password(pg_dsn: str, form: str) -> None:
    dsn = forms(pg_dsn)[form]
    unreachable = dsn.replace("host=", "port=1&host=") if form == "url" else dsn + " port=1"
    seen = []
    for args in CLI_CASES:
        for target, code in ((dsn, 0), (unreachable, 2)):
            proc = cli(*args, "--dsn", target)
            assert proc.returncode == code, (args, proc.stderr)
            seen.append(proc.stdout + proc.stderr)
            if code == 2:
                assert proc.stderr.startswith("pgleakguard: error: cannot connect to "), proc.stderr
                assert len(proc.stderr.splitlines()) == 1
    env_proc = cli("diagnose", "--format", "json", env_dsn=dsn)
    assert env_proc.returncode == 0, env_proc.stderr
    seen.append(env_proc.stdout + env_proc.stderr)
    assert all(SENTINEL not in text for text in seen)
    assert sum('"version": 1' in text for text in seen) >= 3  # the real commands ran


def cli(*args: str, env_dsn: str | None = None) -> subprocess.CompletedProcess[str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PGLEAKGUARD_")}
    if env_dsn:
        env["PGLEAKGUARD_DSN"] = env_dsn
    return subprocess.run(
        [sys.executable, "-m", "pgleakguard.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_a_malformed_dsn_is_one_line_without_the_password() -> None:
    proc = cli("diagnose", "--dsn", f"host=/nowhere password={SENTINEL} dbname")
    assert proc.returncode == 2
    assert proc.stderr.startswith("pgleakguard: error: bad DSN ")
    assert len(proc.stderr.splitlines()) == 1
    assert SENTINEL not in proc.stdout + proc.stderr


# -- SQL text in reports ----------------------------------------------------------------------

SECRET_QUERY = "SELECT 'alice@example.com' AS email, 4111111111111111 AS card, pg_sleep(0)"


def test_leak_report_sql_is_cut_to_max_sql_length(
    pg_dsn: str, install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=0.2, activity_dsn=pg_dsn, max_sql_length=20)
    conn = psycopg.connect(pg_dsn, autocommit=True)
    conn.execute(SECRET_QUERY)
    [leak] = events.wait_for("held_too_long")
    pgleakguard.check()
    query = leak.details["pg_stat_activity"]["query"]
    assert query == f"{SECRET_QUERY[:20]}... ({len(SECRET_QUERY) - 20} more characters)"
    conn.close()


def test_redact_sql_replaces_the_literals_in_reports_and_correlations(
    pg_dsn: str, install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=0.2, activity_dsn=pg_dsn, redact_sql=True)
    conn = psycopg.connect(pg_dsn, autocommit=True)
    conn.execute(SECRET_QUERY)
    [leak] = events.wait_for("held_too_long")
    pgleakguard.check()
    redacted = "SELECT ? AS email, ? AS card, pg_sleep(?)"
    assert leak.details["pg_stat_activity"]["query"] == redacted
    assert "alice@example.com" not in leak.render()
    [pair] = pgleakguard.correlate(pg_dsn)
    assert pair.activity is not None and pair.activity["query"] == redacted
    conn.close()


def test_diagnose_redact_sql_shows_no_literal(pg_dsn: str, tmp_path: Path) -> None:
    snapshot = tmp_path / "activity.json"
    rows = [
        {
            "pid": 4000 + n,
            "state": "idle in transaction",
            "state_change": "2024-05-01 09:00:00+00",
            "xact_start": "2024-05-01 09:00:00+00",
            "backend_type": "client backend",
            "application_name": "billing/pid:4123",
            "usename": "app",
            "datname": "shop",
            "query": "UPDATE accounts SET token = 'tok-991' WHERE id = 7 "
            "/*callsite='orders.py:42',pid='4123',service='billing'*/",
        }
        for n in range(3)
    ]
    snapshot.write_text(json.dumps(rows))
    args = ("diagnose", "--snapshot", str(snapshot), "--now", "2024-05-01 10:00:00+00")
    plain = cli(*args, "--format", "json")
    assert "tok-991" in plain.stdout  # without the flag the query is shown as it was
    for fmt in ("json", "text", "markdown"):
        proc = cli(*args, "--format", fmt, "--redact-sql")
        assert proc.returncode == 0, proc.stderr
        assert "tok-991" not in proc.stdout
    document = json.loads(cli(*args, "--format", "json", "--redact-sql").stdout)
    suspect = document["suspects"][0]
    assert suspect["query"].startswith("UPDATE accounts SET token = ? WHERE id = ? /*callsite=")
    assert suspect["callsite"] == "orders.py:42"  # tags are read before redaction


def test_watch_and_terminate_redact_sql(pg_dsn: str) -> None:
    conn = psycopg.connect(pg_dsn)
    conn.execute("SELECT 'tok-4242'")  # now idle in transaction, its query holds the literal
    try:
        watch = ("watch", "--once", "--idle-in-transaction-threshold", "0s")
        terminate = ("terminate", "--idle-for", "0s", "--state", "idle-in-transaction")
        terminate += ("--include-superusers",)  # a dry run: nothing is ended
        for args in (watch, terminate):
            shown = cli(*args, "--dsn", pg_dsn)
            assert "tok-4242" in shown.stdout, shown.stdout  # shown as it is without the flag
            proc = cli(*args, "--dsn", pg_dsn, "--redact-sql")
            assert proc.returncode == 0, proc.stderr
            assert "tok-4242" not in proc.stdout
            assert "SELECT ?" in proc.stdout
    finally:
        conn.close()
