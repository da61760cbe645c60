"""A SQLAlchemy service whose background thread ends while holding a connection.

Run: ``pgleakguard demo examples/sqlalchemy_thread_leak.py`` (throwaway PostgreSQL), or
``DATABASE_URL=postgresql://... python examples/sqlalchemy_thread_leak.py``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

from sqlalchemy import create_engine, text

import pgleakguard

CACHE: list[Any] = []


def warm_cache(engine: Any) -> None:
    """Background job: opens a connection and, by mistake, keeps it after the thread ends."""
    conn = engine.connect()
    CACHE.append(conn.execute(text("SELECT now()")).scalar_one())
    CACHE.append(conn)  # BUG: the connection outlives the thread; should be `with engine.connect()`


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s\n", stream=sys.stdout)
    pgleakguard.install(service="catalog-demo", leak_threshold=5)
    url = os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(url, pool_size=2, max_overflow=0, pool_timeout=1)
    worker = threading.Thread(target=warm_cache, args=(engine,), name="cache-warmer")
    worker.start()
    worker.join()
    pgleakguard.check()  # the watchdog would report it within a second; report it now
    CACHE[-1].close()
    engine.dispose()


if __name__ == "__main__":
    main()
