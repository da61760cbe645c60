"""application_name tags: built safe, parsed back, visible in pg_stat_activity."""

from __future__ import annotations

import os
import re

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgleakguard import tagging

from conftest import EventLog

SAFE = re.compile(r"^[A-Za-z0-9._:/@-]+$")


def test_build_and_parse_round_trip() -> None:
    name = tagging.build("billing", 4123, "/srv/app/orders.py", 42)
    assert name == "billing/pid:4123/orders.py:42"
    assert tagging.parse(name) == tagging.Tag("billing", 4123, "orders.py", 42)
    assert tagging.parse("billing/pid:4123") == tagging.Tag("billing", 4123)
    assert tagging.parse("psql") is None
    assert tagging.parse("") is None


@given(
    service=st.text(min_size=0, max_size=200),
    pid=st.integers(min_value=0, max_value=4_194_304),
    file=st.one_of(st.none(), st.text(min_size=1, max_size=120)),
    line=st.integers(min_value=1, max_value=10_000_000),
)
def test_any_input_gives_a_safe_parseable_tag_within_63_bytes(
    service: str, pid: int, file: str | None, line: int
) -> None:
    name = tagging.build(service, pid, file, line if file else None)
    assert len(name.encode()) <= 63
    assert SAFE.match(name), name
    tag = tagging.parse(name)
    assert tag is not None and tag.pid == pid


def test_connection_carries_service_and_pid(pg_dsn: str, install: object) -> None:
    install(service="billing")  # type: ignore[operator]
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        ).fetchone()
    assert row is not None
    assert row[0] == f"billing/pid:{os.getpid()}"


@pytest.mark.parametrize("how", ["kwarg", "conninfo", "env"])
def test_user_application_name_is_kept_as_the_service(
    how: str, pg_dsn: str, events: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    if how == "kwarg":
        conn = psycopg.connect(pg_dsn, application_name="my app")
    elif how == "conninfo":
        conn = psycopg.connect(pg_dsn + "&application_name=myapp")
    else:
        monkeypatch.setenv("PGAPPNAME", "myapp")
        conn = psycopg.connect(pg_dsn)
    with conn:
        name = conn.info.parameter_status("application_name")
    expected = "my-app" if how == "kwarg" else "myapp"
    assert name == f"{expected}/pid:{os.getpid()}"


def test_tagging_can_be_turned_off(pg_dsn: str, install: object) -> None:
    install(tag_application_name=False)  # type: ignore[operator]
    with psycopg.connect(pg_dsn, application_name="mine") as conn:
        assert conn.info.parameter_status("application_name") == "mine"


def test_sql_comment_round_trip() -> None:
    comment = tagging.sql_comment(service="billing", pid=4123, callsite="orders.py:42")
    assert comment == "/*callsite='orders.py:42',pid='4123',service='billing'*/"
    query = "SELECT * FROM orders " + comment
    assert tagging.parse_sql_comment(query) == {
        "callsite": "orders.py:42",
        "pid": "4123",
        "service": "billing",
    }
    assert tagging.strip_sql_comment(query) == "SELECT * FROM orders"
    assert tagging.parse_sql_comment("SELECT 1") == {}
    assert tagging.parse_sql_comment("SELECT 1 /* a plain comment */") == {}
    # sqlcommenter values are URL-encoded; other tools' comments are read too.
    assert tagging.parse_sql_comment("SELECT 1 /*route='%2Fapi%2Fv1',db_driver='x'*/;") == {
        "route": "/api/v1",
        "db_driver": "x",
    }


@given(values=st.dictionaries(st.from_regex(r"[a-z_]{1,10}", fullmatch=True), st.text(max_size=40)))
def test_any_sql_comment_is_parseable_and_has_no_percent(values: dict[str, str]) -> None:
    comment = tagging.sql_comment(**values)
    assert "%" not in comment
    parsed = tagging.parse_sql_comment("SELECT 1 " + comment)
    assert set(parsed) == set(values)
    for key, value in values.items():
        assert parsed[key] == re.sub(r"[^A-Za-z0-9._:/@-]", "-", value)


def test_a_psycopg_query_with_the_comment_runs_and_shows_it(pg_dsn: str) -> None:
    comment = tagging.sql_comment(callsite="orders.py:42", service="billing 100%")
    with psycopg.connect(pg_dsn) as conn, psycopg.connect(pg_dsn) as observer:
        # No placeholder confusion: the comment has no "%" even when a value had one.
        conn.execute("SELECT %s " + comment, [1])
        row = observer.execute(
            "SELECT query FROM pg_stat_activity WHERE pid = %s", [conn.info.backend_pid]
        ).fetchone()
    assert row is not None
    assert row[0] == "SELECT $1 " + comment
    assert tagging.parse_sql_comment(row[0]) == {
        "callsite": "orders.py:42",
        "service": "billing-100-",
    }
