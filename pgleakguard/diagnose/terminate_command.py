"""``pgleakguard terminate``: list the sessions the filters match, and end them on request."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from ..sqltext import mask_passwords, redact
from .commands import dsn_of, emit, psycopg_error
from .render import Block, Code, Heading, Table, Text, to_text
from .sql import quote_ident
from .terminate import STATE_ALIASES, Filters, conditions, select_sql, terminate_sql
from .units import format_duration


def terminate_filters(options: argparse.Namespace) -> Filters:
    """The filters ``terminate`` was given."""
    states = (
        tuple(dict.fromkeys(STATE_ALIASES[s] for s in options.state)) if options.state else None
    )
    base = Filters(
        idle_for=options.idle_for,
        user=options.user,
        application=options.application,
        database=options.database,
        include_superusers=options.include_superusers,
    )
    return dataclasses.replace(base, states=states) if states else base


def terminate_command(options: argparse.Namespace) -> int:
    """``pgleakguard terminate``: list (dry run) or end the matching sessions."""
    from .. import server

    dsn = dsn_of(options)
    assert dsn is not None
    filters = terminate_filters(options)
    conn = server.connect(dsn, purpose="terminate")
    try:
        matched = _fetch(conn, select_sql(filters), dsn)
        for row in matched:
            if row["query"]:
                row["query"] = mask_passwords(row["query"])
                row["query"] = redact(row["query"]) if options.redact_sql else row["query"]
        _warn_hidden(conn, dsn)
        if not options.execute:
            _show_plan(filters, matched, options.format, dry_run=True)
            return 0
        if not matched:
            _show_plan(filters, matched, options.format, dry_run=False)
            return 0
        pinned = dataclasses.replace(filters, pids=tuple(int(r["pid"]) for r in matched))
        if not options.yes and not _confirm(matched):
            print("pgleakguard: nothing ended", file=sys.stderr)
            return 1
        ended = _fetch(conn, terminate_sql(pinned), dsn)
    finally:
        conn.close()
    _show_result(pinned, matched, ended, options.format)
    return 0


def _warn_hidden(conn: Any, dsn: str) -> None:
    # Sessions this role may not see cannot match any filter: say so, and what to grant.
    [row] = _fetch(conn, HIDDEN_SQL, dsn)
    if row["hidden"]:
        grant = "GRANT pg_monitor, pg_signal_backend TO " + quote_ident(str(row["role"])) + ";"
        print(
            f"pgleakguard: note: {row['hidden']} session(s) of other roles are hidden from "
            f"{row['role']} (<insufficient privilege>) and cannot match; to see and end them: "
            f"{grant}",
            file=sys.stderr,
        )


#: Client sessions of other roles whose state this role may not see.
HIDDEN_SQL = (
    "SELECT current_user AS role, count(*) AS hidden FROM pg_stat_activity "
    "WHERE query = '<insufficient privilege>' AND datid IS NOT NULL"
)


def _fetch(conn: Any, sql: str, dsn: str) -> list[dict[str, Any]]:
    from psycopg.rows import dict_row

    try:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(sql)
            return list(cur.fetchall())
    except Exception as exc:
        raise psycopg_error(exc, dsn) from None


def _session_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            str(r["pid"]),
            r["usename"] or "-",
            r["datname"] or "-",
            r["application_name"] or "-",
            r["state"] or "-",
            format_duration(r["seconds_in_state"]),
            " ".join((r["query"] or "-").split())[:60],
        ]
        for r in rows
    ]


_SESSION_COLUMNS = ["backend", "user", "database", "application", "state", "for", "last query"]


def _plan_blocks(filters: Filters, matched: Sequence[dict[str, Any]], dry_run: bool) -> list[Block]:
    head = (
        "dry run: nothing was ended; add --execute to end these sessions"
        if dry_run
        else "no session matches: nothing to end"
    )
    return [
        Text(f"pgleakguard terminate: {head}"),
        Heading("Filters"),
        Text("\n".join(f"- {why}" for _, why in conditions(filters))),
        Heading("SQL (--execute adds: AND a.pid = ANY(<the sessions listed>))"),
        Code(terminate_sql(filters)),
        Heading(f"Sessions it would end ({len(matched)})"),
        Table(_SESSION_COLUMNS, _session_rows(matched), frozenset({0})),
    ]


def _plan_json(filters: Filters, matched: Sequence[dict[str, Any]], ended: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "dry_run": ended is None,
        "filters": [why for _, why in conditions(filters)],
        "sql": terminate_sql(filters),
        "sessions": [
            {
                "backend_pid": r["pid"],
                "user": r["usename"],
                "database": r["datname"],
                "application_name": r["application_name"],
                "state": r["state"],
                "seconds_in_state": r["seconds_in_state"],
            }
            for r in matched
        ],
        "ended": ended,
    }


def _show_plan(
    filters: Filters, matched: Sequence[dict[str, Any]], fmt: str, dry_run: bool
) -> None:
    emit(_plan_blocks(filters, matched, dry_run), fmt, _plan_json(filters, matched, None))


def _confirm(matched: Sequence[dict[str, Any]]) -> bool:
    out = sys.stderr
    out.write(to_text([Table(_SESSION_COLUMNS, _session_rows(matched), frozenset({0}))]))
    out.write(f"End these {len(matched)} session(s)? [y/N] ")
    out.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def _show_result(
    pinned: Filters,
    matched: Sequence[dict[str, Any]],
    ended: Sequence[dict[str, Any]],
    fmt: str,
) -> None:
    done = sorted(int(r["pid"]) for r in ended if r["terminated"])
    gone = sorted({int(r["pid"]) for r in matched} - set(done))
    lines = [f"pgleakguard terminate: ended {len(done)} of {len(matched)} session(s)"]
    if done:
        lines.append("ended backends: " + ", ".join(str(p) for p in done))
    if gone:
        lines.append("not ended (gone or no longer matching): " + ", ".join(str(p) for p in gone))
    blocks: list[Block] = [Text("\n".join(lines)), Heading("SQL run"), Code(terminate_sql(pinned))]
    emit(blocks, fmt, _plan_json(pinned, matched, done))
