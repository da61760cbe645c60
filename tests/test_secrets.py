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
from server_helpers import ensure_role

SENTINEL = "Sentinel-pw-4c1d"
#: A password with every character a DSN treats specially; each piece between them is
#: searched for, so a password cut at a delimiter cannot slip through either.
PIECES = ("Kiwi7", "Mango8", "Papaya9", "Lychee0", "Quince1", "Ugli2", "Yuzu3")
SPECIAL = "Kiwi7@Mango8:Papaya9/Lychee0'Quince1\"Ugli2%40Yuzu3\\?#&= end"


def forms(pg_dsn: str, password: str = SENTINEL) -> dict[str, str]:
    """The password in each DSN form: URL (percent-encoded), key=value (plain and quoted)."""
    params = {k: v for k, v in conninfo_to_dict(pg_dsn).items() if k != "password"}
    host = str(params.get("host", ""))
    user = params.get("user") or "postgres"
    db = params.get("dbname") or "postgres"
    port = f"&port={params['port']}" if params.get("port") else ""
    encoded = quote(password, safe="")
    return {
        "url": f"postgresql://{user}:{encoded}@/{db}?host={quote(host, safe='')}{port}",
        "keyvalue": make_conninfo(**params, password=password),
        "quoted": make_conninfo(**params) + f" password='{password} x'",
        "plain": make_conninfo(**params),
        "url-query": f"postgresql://{user}@/{db}?host={quote(host, safe='')}{port}"
        f"&password={encoded}",
    }


def secrets_in(text: str) -> list[str]:
    """The sentinel and the special password's pieces that appear in ``text``."""
    return [s for s in (SENTINEL, *PIECES) if s in text]


class Captured:
    """Everything that left pgleakguard, as text."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, what: str, text: Any) -> None:
        self.parts.append(f"--- {what}\n{text}")

    def assert_clean(self) -> None:
        text = "\n".join(self.parts)
        assert text.strip(), "nothing was captured: the test checks nothing"
        where = [p.splitlines()[0] for p in self.parts if secrets_in(p)]
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


@pytest.mark.parametrize(
    ("form", "password"),
    [
        ("url", SENTINEL),
        ("keyvalue", SENTINEL),
        ("quoted", SENTINEL),
        ("url", SPECIAL),
        ("url-query", SPECIAL),
        ("keyvalue", SPECIAL),
    ],
)
def test_cli_output_never_shows_the_password(pg_dsn: str, form: str, password: str) -> None:
    dsn = forms(pg_dsn, password)[form]
    unreachable = dsn.replace("host=", "port=1&host=") if "://" in dsn else dsn + " port=1"
    seen = []
    for args in CLI_CASES:
        for target, code in ((dsn, 0), (unreachable, 2)):
            proc = cli(*args, "--dsn", target)
            assert proc.returncode == code, (args, proc.stderr)
            seen.append(proc.stdout + proc.stderr)
            if code == 2:
                assert proc.stderr.startswith("pgleakguard: error: cannot connect to "), proc.stderr
                assert len(proc.stderr.splitlines()) == 1
        # The same through $PGLEAKGUARD_DSN (what keeps the password out of `ps`).
        env_proc = cli(*args, env_dsn=dsn)
        assert env_proc.returncode == 0, (args, env_proc.stderr)
        seen.append(env_proc.stdout + env_proc.stderr)
    assert [secrets_in(text) for text in seen] == [[]] * len(seen)
    assert sum('"version": 1' in text for text in seen) >= 6  # the real commands ran


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


#: DSNs libpq or urllib cannot parse (or parse other than meant), and their one line.
MALFORMED = {
    f"postgresql://u:{SENTINEL}@[::1/db": "pgleakguard: error: bad DSN 'postgresql://u@[::1/db': "
    'end of string reached when looking for matching "]" in IPv6 host address in URI: '
    '"postgresql://u@[::1/db"',
    f"postgresql://u:{SENTINEL}%zz@/db?host=/nowhere": "pgleakguard: error: bad DSN "
    "'postgresql://u@/db?host=/nowhere': invalid percent-encoded token: \"***\"",
    f"host=/nowhere password='{SENTINEL}": "pgleakguard: error: bad DSN 'host=/nowhere': "
    "unterminated quoted string in connection info string",
    f"host=/nowhere password={SENTINEL} x-{SENTINEL}": "pgleakguard: error: bad DSN "
    '\'host=/nowhere x-***\': missing "=" after "***" in connection info string',
    f" postgresql://u:{SENTINEL}@/db": "pgleakguard: error: bad DSN 'postgresql://u@/db': "
    'missing "=" after "***" in connection info string',
}


@pytest.mark.parametrize("dsn", MALFORMED)
def test_a_malformed_url_is_one_line_without_the_password(dsn: str) -> None:
    for args in (("diagnose",), ("watch", "--once"), ("terminate", "--idle-for", "1m")):
        proc = cli(*args, "--dsn", dsn)
        assert proc.returncode == 2
        assert proc.stderr.splitlines() == [MALFORMED[dsn]]
        assert proc.stdout == ""


def test_a_password_with_unencoded_delimiters_is_never_shown_even_in_pieces() -> None:
    # libpq reads "u:Kiwi7@Mango8:..." as user u, password Kiwi7 and host "Mango8:...": the
    # error names that host. Every piece of what was meant as the password is masked.
    for dsn in (
        f"postgresql://u:{SPECIAL.replace(' ', '')}@/db?host=/nowhere",
        "postgresql://u:Kiwi7/Mango8@/db?host=/nowhere",
        "postgresql://u:Kiwi7@Mango8@/db?host=/nowhere",
    ):
        proc = cli("diagnose", "--dsn", dsn)
        assert proc.returncode == 2
        assert proc.stderr.startswith("pgleakguard: error: ")
        assert len(proc.stderr.splitlines()) == 1
        assert secrets_in(proc.stderr) == [], proc.stderr


def test_redact_dsn_never_raises_and_keeps_user_host_and_database() -> None:
    from pgleakguard.server import redact_dsn

    assert redact_dsn(f"postgresql://u:{SENTINEL}@[::1/db") == "postgresql://u@[::1/db"
    assert redact_dsn("postgresql://u:p%40ss@db:5432/prod") == "postgresql://u@db:5432/prod"
    assert redact_dsn("postgresql://u:Kiwi7/Mango8@db/prod") == "postgresql://u@db/prod"
    assert redact_dsn("postgresql://u:a@b:c@db/prod?sslpassword=x") == "postgresql://u@db/prod"
    assert redact_dsn("host=db sslpassword=x password='a b\\' c' user=u") == "host=db user=u"
    assert redact_dsn(f"x postgresql://u:{SENTINEL}@h") == "x postgresql://u@h"


@pytest.mark.allow_internal_errors  # an activity_dsn that cannot be used may be counted as one
def test_a_malformed_dsn_in_install_correlate_and_the_server_check_shows_no_password(
    pg_dsn: str, install: Callable[..., EventLog], caplog: pytest.LogCaptureFixture
) -> None:
    from pgleakguard.testing import ServerCheck

    dsn = f"postgresql://postgres:{SENTINEL}@[::1/postgres"
    expected = "bad DSN 'postgresql://postgres@[::1/postgres'"
    with pytest.raises(pgleakguard.ServerError) as raised:
        pgleakguard.correlate(dsn)
    assert str(raised.value).startswith(expected)
    with pytest.raises(pgleakguard.ServerError) as raised:
        ServerCheck(dsn)  # what --pgleakguard-dsn runs
    assert str(raised.value).startswith(expected)
    assert SENTINEL not in str(raised.value)

    _safety.forget_logged()
    events = install(leak_threshold=0.2, activity_dsn=dsn)
    with caplog.at_level(logging.DEBUG, logger="pgleakguard"):
        conn = psycopg.connect(pg_dsn)
        [leak] = events.wait_for("held_too_long")
        pgleakguard.check()
        conn.close()
    assert expected in caplog.text
    assert SENTINEL not in caplog.text + leak.render()


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


def test_redact_replaces_every_kind_of_literal() -> None:
    from pgleakguard.sqltext import redact

    # standard_conforming_strings is on: a backslash does not escape the closing quote.
    assert redact("SELECT 'C:\\' AS path, 'secret-token' AS t") == "SELECT ? AS path, ? AS t"
    assert redact("SELECT E'it\\'s', 'it''s', U&'d\\0061t', B'101', X'ff', N'x'") == (
        "SELECT ?, ?, ?, ?, ?, ?"
    )
    assert redact("SELECT $$a 'b'$$, $tag$ $$ x $tag$, $1") == "SELECT ?, ?, $1"
    assert redact("SELECT 0xDEADBEEF, 0o17, 0b101, 4111_1111_1111_1111, 1.5e10, .5, 3.") == (
        "SELECT ?, ?, ?, ?, ?, ?, ?"
    )
    kept = "SELECT t1.c2, \"it's\" FROM t1 -- it's\n/*callsite='a.py:1'*/"
    assert redact(kept) == kept
    assert redact("SELECT 'cut by track_activity_query_size") == "SELECT ?"


@pytest.mark.parametrize(
    ("query", "masked"),
    [
        ("ALTER ROLE svc PASSWORD 'Hunter2'", "ALTER ROLE svc PASSWORD '***'"),
        (
            "CREATE USER u WITH LOGIN ENCRYPTED PASSWORD E'a\\'b' VALID UNTIL 'infinity'",
            "CREATE USER u WITH LOGIN ENCRYPTED PASSWORD '***' VALID UNTIL 'infinity'",
        ),
        ("alter role svc password $x$Hunter2$x$", "alter role svc password '***'"),
        (
            "CREATE USER MAPPING FOR app SERVER remote OPTIONS (user 'app', password 'Hunter2')",
            "CREATE USER MAPPING FOR app SERVER remote OPTIONS (user 'app', password '***')",
        ),
        (
            "SELECT dblink_connect('host=db password=Hunter2 dbname=x')",
            "SELECT dblink_connect('host=db password=*** dbname=x')",
        ),
        (
            "SELECT dblink_connect('host=db password=''Hunter 2'' dbname=x')",
            "SELECT dblink_connect('host=db password=*** dbname=x')",
        ),
        (
            "CREATE SUBSCRIPTION s CONNECTION 'postgresql://rep:Hunter2@db/x' PUBLICATION p",
            "CREATE SUBSCRIPTION s CONNECTION 'postgresql://rep:***@db/x' PUBLICATION p",
        ),
        ("SET password_encryption = 'scram-sha-256'", "SET password_encryption = 'scram-sha-256'"),
        ("SELECT 'no secret here' AS password", "SELECT 'no secret here' AS password"),
    ],
)
def test_passwords_in_queries_are_masked(query: str, masked: str) -> None:
    from pgleakguard.sqltext import for_report, mask_passwords

    assert mask_passwords(query) == masked
    assert for_report(query, 1000, False) == masked


PLAINTEXT = "Hunter2-plaintext"


def test_a_password_set_by_a_query_is_masked_in_every_output_without_redact_sql(
    pg_dsn: str, install: Callable[..., EventLog], tmp_path: Path
) -> None:
    from server_helpers import cli as run

    ensure_role(pg_dsn, "pgl_svc", monitor=False)
    events = install(activity_dsn=pg_dsn, idle_in_transaction_threshold=0.2, leak_threshold=60)
    conn = psycopg.connect(pg_dsn)
    conn.execute(f"ALTER ROLE pgl_svc PASSWORD '{PLAINTEXT}'")  # then idle in transaction
    masked = "ALTER ROLE pgl_svc PASSWORD '***'"
    pid = conn.info.backend_pid
    try:
        [leak] = events.wait_for("idle_in_transaction")
        assert leak.details["pg_stat_activity"]["query"] == masked
        [pair] = pgleakguard.correlate(pg_dsn)
        assert pair.activity is not None and pair.activity["query"] == masked

        fast = ("--idle-in-transaction-threshold", "0s")
        doc = json.loads(run("diagnose", "--dsn", pg_dsn, "--format", "json", *fast).stdout)
        [suspect] = [s for s in doc["suspects"] if s["backend_pid"] == pid]
        assert suspect["query"] == masked
        snapshot = tmp_path / "activity.json"
        row = {
            "pid": pid,
            "state": "idle in transaction",
            "state_change": "2024-05-01 09:00:00+00",
            "query": f"ALTER ROLE pgl_svc PASSWORD '{PLAINTEXT}'",
        }
        snapshot.write_text(json.dumps([row]))
        outputs = [json.dumps(doc), leak.render(), json.dumps(leak.as_dict())]
        for args in (
            ("diagnose", "--dsn", pg_dsn, "--format", "text", *fast),
            ("diagnose", "--dsn", pg_dsn, "--format", "markdown", *fast),
            ("diagnose", "--snapshot", str(snapshot), "--now", "2024-05-01 10:00:00+00"),
            ("watch", "--dsn", pg_dsn, "--once", *fast),
            ("terminate", "--dsn", pg_dsn, "--idle-for", "0s", "--include-superusers"),
        ):
            proc = run(*args)
            assert proc.returncode == 0, proc.stderr
            assert "PASSWORD '***'" in proc.stdout, args
            outputs.append(proc.stdout + proc.stderr)
        assert [PLAINTEXT in text for text in outputs] == [False] * len(outputs)
    finally:
        conn.close()
