"""``python manage.py pgleakguard diagnose``: ``pgleakguard diagnose`` against the
project's database (the password goes through ``PGPASSWORD``, never printed)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections

# libpq keywords Django may hold that are not the server to diagnose: ours would make
# diagnose's own session look like one of the project's (it names itself pgleakguard-cli).
_NOT_PASSED = frozenset({"application_name", "fallback_application_name", "client_encoding"})


def _libpq_keywords() -> frozenset[str]:
    """The connection keywords of this libpq that may be passed on: not the secret ones
    (libpq marks them: password, sslpassword), nor the debug ones."""
    try:
        from psycopg import pq
    except ImportError:
        raise CommandError(
            "pgleakguard diagnose talks to PostgreSQL through psycopg 3: "
            "pip install 'pgleakguard[cli]'"
        ) from None
    known = {o.keyword.decode() for o in pq.Conninfo.get_defaults() if o.dispchar == b""}
    return frozenset(known - _NOT_PASSED)


def conninfo(params: dict[str, Any]) -> tuple[str, str | None]:
    """A libpq ``key=value`` DSN for Django's connection parameters, and the password.

    Every libpq keyword Django would connect with is kept (host, port, passfile, sslmode,
    sslrootcert, service, options, ...); psycopg's own arguments (cursor_factory, context)
    are not libpq's and are left out. Secrets never go into the DSN, which diagnose
    prints: the password is returned apart (it goes through ``PGPASSWORD``); the others
    (sslpassword) have no environment variable and are not passed.
    """
    known = _libpq_keywords()
    parts = []
    for key, value in params.items():
        if key not in known or value is None or value == "" or isinstance(value, bool):
            continue
        text = str(value).replace("\\", "\\\\").replace("'", "\\'")
        parts.append(f"{key}='{text}'")
    password = params.get("password")
    return " ".join(parts), str(password) if password else None


@contextmanager
def _pgpassword(password: str | None) -> Iterator[None]:
    before = os.environ.get("PGPASSWORD")
    if password:
        os.environ["PGPASSWORD"] = password
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PGPASSWORD", None)
        else:
            os.environ["PGPASSWORD"] = before


class _ForwardingParser(CommandParser):  # type: ignore[misc]
    """Django's command parser that hands the options it does not know (those of
    ``pgleakguard diagnose``) on instead of rejecting them, so Django's own options
    (``--database``, ``-v``, ``--settings``) work before and after ``diagnose``."""

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        options, rest = self.parse_known_args(args, namespace)
        options.diagnose_args = rest
        return options


class Command(BaseCommand):  # type: ignore[misc]
    """``pgleakguard diagnose [--database ALIAS] [options of pgleakguard diagnose]``."""

    help = (
        "pgleakguard for this project's database. diagnose: who holds the connections, "
        "the leak suspects by service and call-site, and the fixes. Options after "
        "`diagnose` that are not listed here go to `pgleakguard diagnose` "
        "(see `pgleakguard diagnose --help`), e.g. --format json, --redact-sql."
    )
    #: ``call_command("pgleakguard", "diagnose", diagnose_args=["--format", "json"])``.
    stealth_options = ("diagnose_args",)

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        # No abbreviations: `--se` must not be taken for Django's --settings when it is
        # pgleakguard diagnose's --server-version.
        kwargs.setdefault("allow_abbrev", False)
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.__class__ = _ForwardingParser  # Django builds it; only parse_args differs
        return parser

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["diagnose"], help="what to do")
        parser.add_argument(
            "--database",
            default=DEFAULT_DB_ALIAS,
            help="the DATABASES alias to diagnose (default: %(default)s)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        from pgleakguard import cli

        alias = options["database"]
        if alias not in connections:
            raise CommandError(f"no database {alias!r} in settings.DATABASES")
        wrapper = connections[alias]
        if wrapper.vendor != "postgresql":
            raise CommandError(f"database {alias!r} is not PostgreSQL")
        dsn, password = conninfo(wrapper.get_connection_params())
        forwarded = list(options.get("diagnose_args") or ())
        if options.get("verbosity", 1) >= 1:
            # What runs, on stderr: stdout is diagnose's alone (``--format json`` parses).
            self.stderr.write(
                f"pgleakguard diagnose --dsn {dsn!r} {' '.join(forwarded)}".rstrip(),
                style_func=str,  # not styled as an error: it is not one
            )
            self.stderr.flush()
        code: int | str | None
        try:
            with _pgpassword(password), redirect_stdout(self.stdout):
                code = cli.main(["diagnose", "--dsn", dsn, *forwarded])
        except SystemExit as exc:  # argparse: a bad diagnose option (said on stderr)
            code = exc.code
        if code:
            raise CommandError(f"pgleakguard diagnose exited with status {code}")
