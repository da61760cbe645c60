"""The ``diagnose``, ``recommend`` and ``terminate`` commands (``watch`` is in watch.py).

Each takes the parsed arguments and returns the exit code. Bad input raises
:class:`CommandError`; :func:`run` turns it (and server and snapshot errors) into one line
on stderr and exit code 2. psycopg and rich are imported only when a command needs them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, Callable

from . import analysis, recommend, report, snapshot
from .model import ServerSettings, Session, Setting
from .render import Block, Code, Heading, Table, Text, to_markdown, to_rich, to_text
from .sql import quote_ident
from .terminate import STATE_ALIASES, Filters, conditions, select_sql, terminate_sql
from .units import format_duration, format_size, to_epoch

#: Environment variable read when ``--dsn`` is not given (keeps passwords out of ``ps``).
DSN_ENV = "PGLEAKGUARD_DSN"


class CommandError(Exception):
    """Bad input or a failed step: one line for the user, exit code 2."""


def run(command: Callable[[argparse.Namespace], int], options: argparse.Namespace) -> int:
    """Run ``command``; every expected failure becomes ``pgleakguard: error: ...`` and 2."""
    from ..server import ServerError

    try:
        return command(options)
    except (CommandError, ServerError, recommend.TooLittleMemory) as exc:
        return fail(str(exc))
    except snapshot.SnapshotError as exc:
        return fail(f"{options.snapshot}: {exc}")
    except OSError as exc:
        name = exc.filename if exc.filename is not None else ""
        return fail(f"{name}: {exc.strerror}" if name else str(exc))


def fail(message: str) -> int:
    """Print the one error line; return exit code 2."""
    print(f"pgleakguard: error: {message}", file=sys.stderr)
    return 2


def dsn_of(options: argparse.Namespace, required: bool = True) -> str | None:
    """``--dsn``, else ``$PGLEAKGUARD_DSN``."""
    dsn = getattr(options, "dsn", None) or os.environ.get(DSN_ENV)
    if not dsn and required:
        raise CommandError(f"give --dsn DSN (or set ${DSN_ENV})")
    return dsn or None


def psycopg_error(exc: Exception, dsn: str) -> CommandError:
    """A database error as one password-free line."""
    from ..server import scrub

    return CommandError(scrub(str(exc), dsn))


def emit(blocks: Sequence[Block], fmt: str, document: Any = None) -> None:
    """Print a report: JSON, markdown, rich tables on a terminal, else plain text."""
    if fmt == "json":
        print(json.dumps(document, indent=2, default=str))
    elif fmt == "markdown":
        sys.stdout.write(to_markdown(blocks))
    elif sys.stdout.isatty() and _has_rich():
        from rich.console import Console, Group

        Console().print(Group(*to_rich(blocks)))
    else:
        sys.stdout.write(to_text(blocks))


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


# -- diagnose -----------------------------------------------------------------------------


def analysis_options(options: argparse.Namespace) -> analysis.Options:
    """Thresholds from ``--idle-threshold`` and friends."""
    return analysis.Options(
        idle_threshold=options.idle_threshold,
        idle_in_transaction_threshold=options.idle_in_transaction_threshold,
        long_query_threshold=options.long_query_threshold,
    )


def snapshot_settings(options: argparse.Namespace) -> ServerSettings:
    """What ``--max-connections``, ``--reserved-connections`` and ``--server-version`` say."""
    values: dict[str, Setting] = {}
    assumed: list[str] = []
    if options.max_connections is not None:
        values["max_connections"] = Setting(str(options.max_connections))
        reserved = options.reserved_connections
        if reserved is None:
            reserved = 3
            assumed.append("superuser_reserved_connections=3 (the default)")
        values["superuser_reserved_connections"] = Setting(str(reserved))
    version = options.server_version
    return ServerSettings(
        version_num=version * 10000 if version else None,
        version=str(version) if version else None,
        values=values,
        assumed=tuple(assumed),
    )


def diagnose_command(options: argparse.Namespace) -> int:
    """``pgleakguard diagnose``: breakdown, suspects, findings, triage SQL and fixes."""
    opts = analysis_options(options)
    read = _diagnose_snapshot if options.snapshot else _diagnose_live
    rep = read(options, opts)
    rep = _with_pgbouncer_site(rep, options)
    if options.pgbouncer_out:
        _write(options.pgbouncer_out, rep.pgbouncer_ini)
    emit(report.blocks(rep), options.format, report.as_json(rep))
    return 0


def _diagnose_snapshot(options: argparse.Namespace, opts: analysis.Options) -> report.Report:
    snap = snapshot.load(options.snapshot)
    sessions = snap.sessions
    if not options.all_backends:
        sessions = [s for s in sessions if s.backend_type in (None, "client backend")]
    now = options.now if options.now is not None else snap.now
    diag = analysis.diagnose(
        sessions,
        snapshot_settings(options),
        opts,
        now,
        source=options.snapshot,
        source_kind="snapshot",
    )
    return report.build(diag)


def _diagnose_live(options: argparse.Namespace, opts: analysis.Options) -> report.Report:
    from .. import server

    dsn = dsn_of(options)
    assert dsn is not None
    conn = server.connect(dsn, purpose="diagnose")
    try:
        live = server.read_server(conn, client_backends_only=not options.all_backends)
    except Exception as exc:
        raise psycopg_error(exc, dsn) from None
    finally:
        conn.close()
    diag = analysis.diagnose(
        [Session.from_row(r) for r in live.rows],
        live.settings,
        opts,
        _now_of(live.rows),
        source=server.redact_dsn(dsn),
        source_kind="dsn",
        role=live.role,
        self_pid=live.self_pid,
        blockers=live.blockers,
    )
    return report.build(diag, live.advisory_lock_pids, live.upstream)


def _now_of(rows: Sequence[dict[str, Any]]) -> float | None:
    # Every row carries the server's now(); with no rows there is nothing to measure.
    return to_epoch(rows[0].get("now")) if rows else None


def _with_pgbouncer_site(rep: report.Report, options: argparse.Namespace) -> report.Report:
    from . import pgbouncer

    site = pgbouncer_site(options)
    if not site:
        return rep
    config = dataclasses.replace(rep.pgbouncer, **site)
    ini = pgbouncer.render_ini(config, ["pgbouncer.ini generated by pgleakguard diagnose"])
    return dataclasses.replace(rep, pgbouncer=config, pgbouncer_ini=ini)


def pgbouncer_site(options: argparse.Namespace) -> dict[str, Any]:
    """listen_addr/listen_port/auth_file/auth_type from ``--pgbouncer-*`` options."""
    site: dict[str, Any] = {}
    if options.pgbouncer_listen:
        host, _, port = options.pgbouncer_listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise CommandError(
                f"--pgbouncer-listen {options.pgbouncer_listen!r}: expected HOST:PORT, "
                "e.g. 127.0.0.1:6432"
            )
        site["listen_addr"], site["listen_port"] = host, int(port)
    if options.pgbouncer_auth_file:
        site["auth_file"] = options.pgbouncer_auth_file
    if options.pgbouncer_auth_type:
        site["auth_type"] = options.pgbouncer_auth_type
    return site


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(f"pgleakguard: wrote {path}", file=sys.stderr)


# -- recommend ----------------------------------------------------------------------------


def recommend_command(options: argparse.Namespace) -> int:
    """``pgleakguard recommend``: safe max_connections from RAM, and a pgbouncer.ini."""
    from . import pgbouncer

    settings: ServerSettings | None = None
    upstream = None
    source = "defaults"
    dsn = dsn_of(options, required=False)
    if dsn:
        from .. import server

        conn = server.connect(dsn, purpose="recommend")
        try:
            live = server.read_server(conn)
        except Exception as exc:
            raise psycopg_error(exc, dsn) from None
        finally:
            conn.close()
        settings, upstream, source = live.settings, live.upstream, server.redact_dsn(dsn)
    rec = recommend.recommend(
        options.ram,
        settings,
        instances=options.instances,
        cpus=options.cpus,
        work_mem=options.work_mem,
        shared_buffers=options.shared_buffers,
    )
    config = pgbouncer.PgBouncerConfig(
        pool_mode="transaction",
        default_pool_size=rec.pgbouncer_pool_size,
        max_db_connections=rec.pgbouncer_max_db_connections,
        max_client_conn=rec.pgbouncer_max_client_conn,
        reserve_pool_size=max(1, rec.pgbouncer_pool_size // 5),
        databases=[("*", upstream or "host=127.0.0.1 port=5432")],
        reasons=[
            "transaction pooling: switch to session if the application uses LISTEN, "
            "advisory locks, SQL PREPARE, WITH HOLD cursors, temp tables or session SET "
            "(pgleakguard diagnose names them)",
            *([] if upstream else ["edit host and port under [databases]"]),
        ],
    )
    config = dataclasses.replace(config, **pgbouncer_site(options))
    ini = pgbouncer.render_ini(
        config, [f"pgbouncer.ini generated by pgleakguard recommend --ram {format_size(rec.ram)}"]
    )
    if options.pgbouncer_out:
        _write(options.pgbouncer_out, ini)
    emit(_recommend_blocks(rec, source, ini), options.format, _recommend_json(rec, source, ini))
    return 0


def _recommend_blocks(rec: recommend.Recommendation, source: str, ini: str) -> list[Block]:
    rows = [[s.name, s.formula, s.value] for s in rec.steps]
    from_server = ", ".join(rec.from_server) or "none (PostgreSQL defaults)"
    conf = "\n".join(f"{k} = {v}" for k, v in rec.conf.items())
    return [
        Text(
            f"pgleakguard recommend: {format_size(rec.ram)} of RAM, {rec.instances} application "
            f"instance(s); settings from {source} (read: {from_server})"
        ),
        Heading("Arithmetic"),
        Table(["step", "how", "value"], rows, frozenset({2})),
        Text(
            f"Safe max_connections: {rec.max_connections} ({rec.usable} usable by applications; "
            f"pool per instance without PgBouncer: {rec.pool_per_instance})"
        ),
        Heading("postgresql.conf"),
        Code(conf, "ini"),
        Heading("Notes"),
        Text("\n".join(f"- {n}" for n in rec.notes)),
        Heading("pgbouncer.ini"),
        Code(ini, "ini"),
    ]


def _recommend_json(rec: recommend.Recommendation, source: str, ini: str) -> dict[str, Any]:
    return {
        "version": 1,
        "source": source,
        "ram_bytes": rec.ram,
        "instances": rec.instances,
        "steps": [
            {"name": s.name, "formula": s.formula, "value": s.value, "number": s.number}
            for s in rec.steps
        ],
        "max_connections": rec.max_connections,
        "reserved_connections": rec.reserved,
        "usable_connections": rec.usable,
        "pool_per_instance": rec.pool_per_instance,
        "postgresql_conf": rec.conf,
        "read_from_server": list(rec.from_server),
        "notes": rec.notes,
        "pgbouncer": {
            "default_pool_size": rec.pgbouncer_pool_size,
            "max_db_connections": rec.pgbouncer_max_db_connections,
            "max_client_conn": rec.pgbouncer_max_client_conn,
            "ini": ini,
        },
    }


# -- terminate ----------------------------------------------------------------------------


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
        _warn_hidden(conn, dsn)
        if not options.execute:
            _show_plan(filters, matched, options.format, dry_run=True)
            return 0
        if not matched:
            _show_plan(filters, matched, options.format, dry_run=False)
            return 0
        pinned = dataclasses.replace(filters, pids=tuple(int(r["pid"]) for r in matched))
        if not options.yes and not _confirm(matched, options.format):
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


def _confirm(matched: Sequence[dict[str, Any]], fmt: str) -> bool:
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
