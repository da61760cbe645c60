"""``pgleakguard diagnose``, and what every server-side command shares.

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
from typing import TYPE_CHECKING, Any, Callable

from . import analysis, report, snapshot
from .model import ServerSettings, Session, Setting
from .recommend import TooLittleMemory
from .render import Block, print_rich, to_markdown, to_text
from .units import to_epoch

if TYPE_CHECKING:
    from ..server import LiveRead

#: Environment variable read when ``--dsn`` is not given (keeps passwords out of ``ps``).
DSN_ENV = "PGLEAKGUARD_DSN"


class CommandError(Exception):
    """Bad input or a failed step: one line for the user, exit code 2."""


def run(command: Callable[[argparse.Namespace], int], options: argparse.Namespace) -> int:
    """Run ``command``; every expected failure becomes ``pgleakguard: error: ...`` and 2."""
    from ..server import ServerError

    try:
        return command(options)
    except ServerError as exc:
        return fail(str(exc), exc.hint)
    except (CommandError, TooLittleMemory) as exc:
        return fail(str(exc))
    except snapshot.SnapshotError as exc:
        return fail(f"{options.snapshot}: {exc}")
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python's exit flush quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        name = exc.filename if exc.filename is not None else ""
        return fail(f"{name}: {exc.strerror}" if name else str(exc))


def fail(message: str, hint: str | None = None) -> int:
    """Print the one error line (and the hint's line, if any); return exit code 2."""
    print(f"pgleakguard: error: {message}", file=sys.stderr)
    if hint:
        print(f"pgleakguard: hint: {hint}", file=sys.stderr)
    return 2


def dsn_of(options: argparse.Namespace, required: bool = True) -> str | None:
    """``--dsn``, else ``$PGLEAKGUARD_DSN``."""
    dsn = getattr(options, "dsn", None) or os.environ.get(DSN_ENV)
    if not dsn and required:
        # diagnose can also read a file instead of a server: say so where it applies.
        snapshot = " or --snapshot FILE" if hasattr(options, "snapshot") else ""
        raise CommandError(f"give --dsn DSN{snapshot} (or set ${DSN_ENV})")
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
        from rich.console import Console

        print_rich(blocks, Console())
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
        redact_sql=options.redact_sql,
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
        write_file(options.pgbouncer_out, rep.pgbouncer_ini)
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


def read_live(dsn: str, purpose: str, **read: Any) -> LiveRead:
    """Connect, read the server once (:func:`pgleakguard.server.read_server`), disconnect."""
    from .. import server

    conn = server.connect(dsn, purpose=purpose)
    try:
        return server.read_server(conn, **read)
    except Exception as exc:
        raise psycopg_error(exc, dsn) from None
    finally:
        conn.close()


def _diagnose_live(options: argparse.Namespace, opts: analysis.Options) -> report.Report:
    dsn = dsn_of(options)
    assert dsn is not None
    live = read_live(dsn, "diagnose", client_backends_only=not options.all_backends)
    return report.build(live_diagnosis(live, opts, dsn), live.advisory_lock_pids, live.upstream)


def live_diagnosis(live: LiveRead, opts: analysis.Options, dsn: str) -> analysis.Diagnosis:
    """The diagnosis of one read of a live server (the moment is the server's now())."""
    from .. import server

    return analysis.diagnose(
        [Session.from_row(r) for r in live.rows],
        live.settings,
        opts,
        to_epoch(live.rows[0].get("now")) if live.rows else None,
        source=server.redact_dsn(dsn),
        source_kind="dsn",
        role=live.role,
        self_pid=live.self_pid,
        blockers=live.blockers,
    )


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


def write_file(path: str, text: str) -> None:
    """Write ``text`` to ``path`` and say so on stderr."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(f"pgleakguard: wrote {path}", file=sys.stderr)
