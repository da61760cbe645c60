"""Call-sites are worked out per code object, never confused between equal ones."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pgleakguard

from conftest import EventLog

SOURCE = """
import psycopg


def take(dsn):
    return psycopg.connect(dsn)
"""


def test_identical_functions_in_two_files_each_get_their_own_call_site(
    tmp_path: Path, pg_dsn: str, events: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("orders_a", "orders_b"):
        (tmp_path / f"{name}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    first = importlib.import_module("orders_a")
    second = importlib.import_module("orders_b")
    try:
        # Equal code objects (co_filename plays no part in ==): a cache keyed on them
        # would name the first file for both.
        assert first.take.__code__ == second.take.__code__
        conns = [first.take(pg_dsn), second.take(pg_dsn)]
        files = [c.callsite.file for c in pgleakguard.open_checkouts()]
        assert files == [str(tmp_path / "orders_a.py"), str(tmp_path / "orders_b.py")]
        for conn in conns:
            conn.close()
    finally:
        sys.modules.pop("orders_a", None)
        sys.modules.pop("orders_b", None)


HELPER = """
import psycopg


def get(dsn):
    return psycopg.connect(dsn)  # helper line 6
"""

SERVICE = """
import mydb.helpers
import mydbx


def handler(dsn):
    return mydb.helpers.get(dsn)  # service line 7


def other(dsn):
    return mydbx.get(dsn)  # service line 11


def outer(dsn):
    return handler(dsn)  # service line 15
"""


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A user's service module calling a DB helper package (mydb) and a module whose name
    only starts like it (mydbx)."""
    (tmp_path / "mydb").mkdir()
    (tmp_path / "mydb" / "__init__.py").write_text("")
    (tmp_path / "mydb" / "helpers.py").write_text(HELPER)
    (tmp_path / "mydbx.py").write_text(HELPER)
    (tmp_path / "service.py").write_text(SERVICE)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield importlib.import_module("service")
    finally:
        for name in ("service", "mydb", "mydb.helpers", "mydbx"):
            sys.modules.pop(name, None)


def _where(conn: Any) -> list[tuple[str, int, str]]:
    [info] = pgleakguard.open_checkouts()
    conn.close()
    return [(Path(info.callsite.file).name, info.callsite.line, info.callsite.function)]


def test_ignore_modules_moves_the_call_site_out_of_the_users_db_helpers(
    service: Any, pg_dsn: str, install: Any
) -> None:
    install()
    assert _where(service.handler(pg_dsn)) == [("helpers.py", 6, "get")]
    install(ignore_modules="mydb")
    assert _where(service.handler(pg_dsn)) == [("service.py", 7, "handler")]
    # a prefix is a package name: mydbx is not inside mydb
    assert _where(service.other(pg_dsn)) == [("mydbx.py", 6, "get")]


@pytest.mark.parametrize(
    ("options", "frames"), [({"capture_stack": False}, 1), ({"stack_depth": 2}, 2)]
)
def test_stack_depth_and_capture_stack_bound_the_acquisition_stack(
    options: dict[str, Any], frames: int, service: Any, pg_dsn: str, install: Any
) -> None:
    events = install(ignore_modules="mydb", **options)
    with service.outer(pg_dsn):
        [event] = events.wait_for("held_too_long")
    got = [(Path(str(f["file"])).name, f["line"]) for f in event.stack]
    assert got == [("service.py", 7), ("service.py", 15)][:frames]
    assert event.callsite.line == 7


def test_a_module_named_like_a_pool_library_is_not_one(
    tmp_path: Path, pg_dsn: str, events: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # psycopg connections opened by sqlalchemy / psycopg_pool are tracked per checkout by
    # their integrations; sqlalchemy_utils is the user's own code: tracked from connect.
    (tmp_path / "sqlalchemy_utils.py").write_text(HELPER)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module("sqlalchemy_utils")
        assert _where(module.get(pg_dsn)) == [("sqlalchemy_utils.py", 6, "get")]
    finally:
        sys.modules.pop("sqlalchemy_utils", None)
