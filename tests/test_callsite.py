"""Call-sites are worked out per code object, never confused between equal ones."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

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
