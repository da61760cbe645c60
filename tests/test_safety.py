"""Never break the host application: internal errors are swallowed, counted, logged once;
the user's own exceptions pass through untouched."""

from __future__ import annotations

import gc
import logging
import weakref
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
import pytest

import pgleakguard
from pgleakguard import _safety
from pgleakguard.tracker import Tracker

from conftest import EventLog


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected fault")


@pytest.mark.allow_internal_errors
@pytest.mark.parametrize("target", ["begin", "end"])
def test_fault_in_tracker_never_reaches_the_caller(
    target: str,
    pg_dsn: str,
    events: EventLog,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(Tracker, target, _boom)
    _safety.forget_logged()
    before = _safety.internal_error_count()
    with caplog.at_level(logging.ERROR, logger="pgleakguard"):
        for _ in range(3):
            with psycopg.connect(pg_dsn) as conn:
                assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
        with psycopg_pool.ConnectionPool(pg_dsn, min_size=1, max_size=1) as pool:
            for _ in range(3):
                with pool.connection() as conn:
                    assert conn.execute("SELECT 1").fetchone() == (1,)
    assert _safety.internal_error_count() - before == 6  # 3 raw + 3 pool
    logged = [r for r in caplog.records if "pgleakguard internal error" in r.getMessage()]
    assert len(logged) == 1  # one line, not one per call
    assert isinstance(logged[0].exc_info[1], RuntimeError)  # type: ignore[index]
    assert pgleakguard.stats()["internal_errors"] == _safety.internal_error_count()


def test_an_unwritable_jsonl_path_is_one_warning_and_the_other_sinks_still_work(
    pg_dsn: str, install: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "no" / "such" / "dir.jsonl"
    _safety.forget_logged()
    before = pgleakguard.stats()["operational_errors"]
    events = install(leak_threshold=0.1, jsonl_path=str(path))
    with (
        caplog.at_level(logging.WARNING, logger="pgleakguard"),
        psycopg.connect(pg_dsn),
        psycopg.connect(pg_dsn),
    ):
        events.wait_for("held_too_long", count=2)  # the callback got both
        pgleakguard.check()
    assert pgleakguard.stats()["operational_errors"] == before + 2
    warned = [r for r in caplog.records if r.getMessage().startswith("pgleakguard: writing")]
    assert [(r.getMessage(), r.exc_info) for r in warned] == [
        (
            f"pgleakguard: writing jsonl_path {path} failed: [Errno 2] No such file or "
            f"directory: '{path}' (your code was not affected; stats()['operational_errors'] "
            "counts these)",
            None,
        )
    ]
    reports = [r for r in caplog.records if "connection leak [held_too_long" in r.getMessage()]
    assert len(reports) == 2  # and the logging sink both


def test_user_exceptions_pass_through_unchanged(pg_dsn: str, events: EventLog) -> None:
    with pytest.raises(psycopg.OperationalError) as bad_dsn:
        psycopg.connect(pg_dsn + "&dbname=no_such_database_here")
    assert 'database "no_such_database_here" does not exist' in str(bad_dsn.value)

    with psycopg.connect(pg_dsn) as conn, pytest.raises(psycopg.errors.UndefinedTable):
        conn.execute("SELECT * FROM no_such_table")

    mine = KeyError("mine")
    with (
        psycopg_pool.ConnectionPool(pg_dsn, min_size=1, max_size=1) as pool,
        pytest.raises(KeyError) as raised,
        pool.connection(),
    ):
        raise mine
    assert raised.value is mine
    assert pgleakguard.open_checkouts() == []  # both ended despite the errors
    pgleakguard.check()
    assert events == []


MALFORMED_DSNS = [
    "host=db.invalid password=Sentinel-pw 'broken",
    "postgresql://app:Sentinel-pw@[::1/app",
    "postgresql://app:Sentinel-pw@db.invalid/app?sslmode=require&nosuch=1",
]


@pytest.mark.parametrize("dsn", MALFORMED_DSNS)
def test_malformed_dsn_gets_psycopgs_own_error_and_nothing_from_pgleakguard(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(psycopg.ProgrammingError) as bare:
        psycopg.connect(dsn)
    pgleakguard.install()
    with (
        caplog.at_level(logging.DEBUG, logger="pgleakguard"),
        pytest.raises(psycopg.ProgrammingError) as hooked,
    ):
        psycopg.connect(dsn)
    assert str(hooked.value) == str(bare.value)
    assert [r for r in caplog.records if r.name == "pgleakguard"] == []
    assert "Sentinel-pw" not in caplog.text


@pytest.mark.allow_internal_errors
def test_an_internal_error_keeps_no_reference_to_the_users_connection(
    pg_dsn: str, events: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_end(self: Any, rec: Any) -> None:
        raise RuntimeError("end broke")

    monkeypatch.setattr(Tracker, "end", broken_end)
    # (no log record either: a captured one would hold the traceback for the test's length)
    monkeypatch.setattr(logging.getLogger("pgleakguard"), "disabled", True)
    conn = psycopg.connect(pg_dsn)
    ref = weakref.ref(conn)
    conn.close()  # the close hook's frame, holding conn, is in the error's traceback
    del conn
    gc.collect()
    assert ref() is None  # the swallowed error does not keep it alive
    assert str(_safety.last_internal_error()) == "end broke"
    trace = _safety.last_internal_traceback()
    assert 'raise RuntimeError("end broke")' in trace and "in broken_end" in trace
