"""``python manage.py pgleakguard diagnose``: ``pgleakguard diagnose`` against the
project's database (the password goes through ``PGPASSWORD``, never printed)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections

# libpq connection keywords passed on to `pgleakguard diagnose` (the password is not).
_LIBPQ_KEYS = (
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "service",
    "options",
    "connect_timeout",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslcrl",
    "target_session_attrs",
    "channel_binding",
    "gssencmode",
)


def conninfo(params: dict[str, Any]) -> tuple[str, str | None]:
    """A libpq ``key=value`` DSN for Django's connection parameters, and the password."""
    parts = []
    for key in _LIBPQ_KEYS:
        value = params.get(key)
        if value is None or value == "" or isinstance(value, bool):
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


class Command(BaseCommand):  # type: ignore[misc]
    """``pgleakguard diagnose [--database ALIAS]``."""

    help = (
        "pgleakguard for this project's database. diagnose: who holds the connections, "
        "the leak suspects by service and call-site, and the fixes."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["diagnose"], help="what to do")
        parser.add_argument(
            "--database",
            default=DEFAULT_DB_ALIAS,
            help="the DATABASES alias to diagnose (default: %(default)s)",
        )
        parser.add_argument(
            "diagnose_args",
            nargs=argparse.REMAINDER,
            help="further options for `pgleakguard diagnose` (e.g. --format json)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        from pgleakguard import cli

        wrapper = connections[options["database"]]
        if wrapper.vendor != "postgresql":
            raise CommandError(f"database {options['database']!r} is not PostgreSQL")
        dsn, password = conninfo(wrapper.get_connection_params())
        self.stdout.write(f"pgleakguard diagnose --dsn {dsn!r}")
        self.stdout.flush()
        with _pgpassword(password), redirect_stdout(self.stdout):
            code = cli.main(["diagnose", "--dsn", dsn, *options["diagnose_args"]])
        if code:
            raise CommandError(f"pgleakguard diagnose exited with status {code}")
