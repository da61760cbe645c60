"""A small service that leaks psycopg_pool connections in a helper function.

Run it with ``make demo`` (or ``pgleakguard demo examples/psycopg_pool_leak.py``), or against
your own server with ``DATABASE_URL=postgresql://... python examples/psycopg_pool_leak.py``.

``export_report`` takes a connection from the pool in a background thread and, by mistake,
keeps it instead of giving it back. pgleakguard reports each one, naming the helper's line,
and when the pool runs dry the PoolTimeout itself names the culprit.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

from psycopg_pool import ConnectionPool, PoolTimeout

import pgleakguard

REPORT_CONNECTIONS: list[Any] = []


def export_report(pool: ConnectionPool[Any]) -> None:
    """Background job: runs a report query and forgets to return the connection."""
    conn = pool.getconn()
    conn.execute("SELECT count(*) FROM pg_stat_activity")
    REPORT_CONNECTIONS.append(conn)  # BUG: should be pool.putconn(conn)


def handle_request(pool: ConnectionPool[Any]) -> None:
    """A web request: needs a connection for a moment, done properly."""
    with pool.connection(timeout=1.0) as conn:
        conn.execute("SELECT 1")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s\n", stream=sys.stdout)
    pgleakguard.install(service="orders-demo", leak_threshold=2.0)
    dsn = os.environ.get("DATABASE_URL", "")
    with ConnectionPool(dsn, min_size=2, max_size=2, timeout=1.0, name="orders") as pool:
        handle_request(pool)
        print("== two report jobs run in background threads and end ...\n", flush=True)
        jobs = [
            threading.Thread(target=export_report, args=(pool,), name=f"report-{i}") for i in (1, 2)
        ]
        for job in jobs:
            job.start()
        for job in jobs:
            job.join()
        pgleakguard.check()  # (the watchdog would within a second) report the ended threads
        print("== ... and the next request finds the pool empty:\n", flush=True)
        try:
            handle_request(pool)
        except PoolTimeout as exc:
            print(f"PoolTimeout: {exc}\n", flush=True)
        for conn in REPORT_CONNECTIONS:
            conn.rollback()
            pool.putconn(conn)
        pgleakguard.check()


if __name__ == "__main__":
    main()
