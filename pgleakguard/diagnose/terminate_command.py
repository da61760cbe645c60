"""``pgleakguard terminate``: list the sessions the filters match, and end them on request."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from ..sqltext import mask_passwords, redact
from .commands import CommandError, dsn_of, emit, psycopg_error
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
    """``pgleakguard terminate``: list (dry run) or end the matching sessions.

    Exit code 1 when the user said no, or when some session could not be ended.
    """
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
        role = _warn_hidden(conn, dsn)
        _warn_cannot_end(role, matched)
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
        outcome = _end_each(conn, filters, matched, dsn)
    finally:
        conn.close()
    _show_result(pinned, matched, outcome, options.format)
    return 1 if outcome.failed else 0


@dataclasses.dataclass
class Outcome:
    """What --execute did, session by session."""

    ended: list[int] = dataclasses.field(default_factory=list)
    #: Backend pid -> the server's error (e.g. "permission denied to terminate process").
    failed: dict[int, str] = dataclasses.field(default_factory=dict)


def _end_each(conn: Any, filters: Filters, matched: Sequence[dict[str, Any]], dsn: str) -> Outcome:
    # One statement per session: a refusal (another role's session without pg_signal_backend)
    # fails that session alone, and the report says exactly which ones were ended.
    import psycopg

    outcome = Outcome()
    for pid in sorted(int(r["pid"]) for r in matched):
        sql = terminate_sql(dataclasses.replace(filters, pids=(pid,)))
        try:
            rows = conn.execute(sql).fetchall()
        except psycopg.errors.InsufficientPrivilege as exc:
            outcome.failed[pid] = exc.diag.message_primary or str(exc)
            continue
        except psycopg.Error as exc:
            so_far = ", ".join(map(str, outcome.ended)) or "none"
            raise CommandError(f"{psycopg_error(exc, dsn)} (ended before that: {so_far})") from None
        if rows and rows[0][-1]:
            outcome.ended.append(pid)
    return outcome


def _warn_hidden(conn: Any, dsn: str) -> str:
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
    return str(row["role"])


def _warn_cannot_end(role: str, matched: Sequence[dict[str, Any]]) -> None:
    # Listed is not endable: say so before --execute finds out session by session.
    for reason, needs in (
        ("other role", f"GRANT pg_signal_backend TO {quote_ident(role)};"),
        ("superuser", "only a superuser may end a superuser's session"),
    ):
        pids = [str(r["pid"]) for r in matched if r["cannot_end"] == reason]
        if pids:
            whose = "other roles'" if reason == "other role" else "superusers'"
            print(
                f"pgleakguard: warning: {role} may not end {len(pids)} of the {len(matched)} "
                f"session(s) listed ({whose}: {', '.join(pids)}): {needs}",
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
                "can_end": r["cannot_end"] is None,
            }
            for r in matched
        ],
        "ended": ended,
        # With --execute: the sessions the server refused to end, and why.
        "failed": None if ended is None else [],
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
    outcome: Outcome,
    fmt: str,
) -> None:
    done = outcome.ended
    gone = sorted({int(r["pid"]) for r in matched} - set(done) - set(outcome.failed))
    lines = [f"pgleakguard terminate: ended {len(done)} of {len(matched)} session(s)"]
    if done:
        lines.append("ended backends: " + ", ".join(str(p) for p in done))
    for pid, error in sorted(outcome.failed.items()):
        lines.append(f"not ended: {pid} ({error})")
    if gone:
        lines.append("not ended (gone or no longer matching): " + ", ".join(str(p) for p in gone))
    blocks: list[Block] = [
        Text("\n".join(lines)),
        Heading("SQL run (once per session, each pinned to its pid)"),
        Code(terminate_sql(pinned)),
    ]
    document = _plan_json(pinned, matched, done)
    document["failed"] = [{"backend_pid": p, "error": e} for p, e in sorted(outcome.failed.items())]
    emit(blocks, fmt, document)
