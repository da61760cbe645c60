"""The application code under test: a report helper that forgets to return its connection."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text


def order_count(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM pg_class")).scalar_one())


def export_report(engine: Any) -> list[Any]:
    conn = engine.connect()  # BUG: never closed; should be `with engine.connect() as conn:`
    return list(conn.execute(text("SELECT relname FROM pg_class LIMIT 3")).scalars())
