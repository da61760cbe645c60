"""A service that leaks one connection of each kind, for the server-side tests.

Usage: leaker.py DSN SERVICE. Prints one JSON line (its pid, and the backend pid of each
leaked connection), then holds the connections until stdin closes.

Every tag comes from pgleakguard itself, nothing is written by hand: install() tags each
connection's application_name with service and pid, retag_on_checkout adds the checkout's
call-site to it, and sql_comments appends the call-site to every query SQLAlchemy sends.
So the call-site diagnose reads back (the line marked ``# leak: <kind>``) is the line that
checked the connection out, and a regression in the SDK's tagging fails the tests. The
``named`` connection runs no query of its own: its last query is the retag, and its
call-site can only come from application_name.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import psycopg
import sqlalchemy as sa

import pgleakguard

DSN, SERVICE = sys.argv[1], sys.argv[2]


def main() -> None:
    pgleakguard.install(
        service=SERVICE,
        sql_comments=True,
        retag_on_checkout=True,
        leak_threshold=3600,
        idle_in_transaction_threshold=3600,
    )
    # The DSN as psycopg reads it (a URI or key=value pairs), passed on as keyword arguments.
    params = psycopg.conninfo.conninfo_to_dict(DSN)
    engine = sa.create_engine("postgresql+psycopg://", connect_args=params)
    idle = engine.connect()  # leak: idle
    idle = idle.execution_options(isolation_level="AUTOCOMMIT")
    idle.execute(sa.text("SELECT 1"))
    in_transaction = engine.connect()  # leak: in-transaction
    in_transaction.execute(sa.text("SELECT 2"))
    aborted = engine.connect()  # leak: aborted
    with contextlib.suppress(sa.exc.DBAPIError):
        aborted.execute(sa.text("SELECT 1/0"))
    named = engine.connect()  # leak: named
    conns = {"idle": idle, "in_transaction": in_transaction, "aborted": aborted, "named": named}
    backends = {
        kind: conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
        for kind, conn in conns.items()
    }
    print(json.dumps({"pid": os.getpid(), "backends": backends}), flush=True)
    sys.stdin.read()
    for conn in conns.values():
        with contextlib.suppress(sa.exc.DBAPIError):
            conn.close()
    engine.dispose()


if __name__ == "__main__":
    main()
