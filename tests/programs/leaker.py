"""A service that leaks one connection of each kind, for the server-side tests.

Usage: leaker.py DSN SERVICE. Prints one JSON line (its pid, and the backend pid of each
leaked connection), then holds the connections until stdin closes. Each leaking query
carries a sqlcommenter comment naming its own line, as pgleakguard's SQL comments do; one
connection carries its call-site in application_name instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import psycopg

import pgleakguard
from pgleakguard import tagging

DSN, SERVICE = sys.argv[1], sys.argv[2]
FILE = os.path.basename(__file__)


def q(sql: str) -> str:
    """``sql`` with a comment naming the caller's line."""
    line = sys._getframe(1).f_lineno
    return (
        sql + " " + tagging.sql_comment(callsite=f"{FILE}:{line}", pid=os.getpid(), service=SERVICE)
    )


def main() -> None:
    pgleakguard.install(service=SERVICE, leak_threshold=3600, idle_in_transaction_threshold=3600)
    idle = psycopg.connect(DSN, autocommit=True)
    idle.execute(q("SELECT 1"))  # leak: idle
    in_transaction = psycopg.connect(DSN)
    in_transaction.execute(q("SELECT 2"))  # leak: in-transaction
    aborted = psycopg.connect(DSN)
    with contextlib.suppress(psycopg.errors.DivisionByZero):
        aborted.execute(q("SELECT 1/0"))  # leak: aborted
    named = psycopg.connect(DSN, autocommit=True)
    tag = tagging.build(SERVICE, os.getpid(), __file__, sys._getframe().f_lineno)  # leak: named
    named.execute(f"SET application_name = '{tag}'")
    conns = {"idle": idle, "in_transaction": in_transaction, "aborted": aborted, "named": named}
    info = {"pid": os.getpid(), "backends": {k: c.info.backend_pid for k, c in conns.items()}}
    print(json.dumps(info), flush=True)
    sys.stdin.read()
    for conn in conns.values():
        conn.close()


if __name__ == "__main__":
    main()
