"""``python manage.py pgleakguard diagnose``: the diagnosis against the project's database.

When the installed pgleakguard has a ``pgleakguard diagnose`` command, it runs with the
configured database's DSN (the password goes through ``PGPASSWORD``, never printed).
Without it, this prints what this process and the server know: the open checkouts of this
process with their tags, and the sessions in pg_stat_activity tagged with this service.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections

import pgleakguard
from pgleakguard import _runtime, tagging
from pgleakguard.integrations.django import project_name

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

_ACTIVITY_SQL = """
SELECT pid, application_name, coalesce(state, ''),
       extract(epoch FROM now() - backend_start)::float8,
       extract(epoch FROM now() - xact_start)::float8,
       coalesce(query, ''), pid = pg_backend_pid()
FROM pg_stat_activity
WHERE application_name <> ''
ORDER BY backend_start
"""


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


def cli_commands() -> set[str]:
    """The subcommands of the ``pgleakguard`` console command."""
    from pgleakguard import cli

    for action in cli._parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


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
        "pgleakguard for this project's database. diagnose: who holds the connections "
        "(open checkouts of this process, sessions tagged with this service)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["diagnose"], help="what to do")
        parser.add_argument(
            "--database",
            default=DEFAULT_DB_ALIAS,
            help="the DATABASES alias to diagnose (default: %(default)s)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        wrapper = connections[options["database"]]
        if wrapper.vendor != "postgresql":
            raise CommandError(f"database {options['database']!r} is not PostgreSQL")
        dsn, password = conninfo(wrapper.get_connection_params())
        if "diagnose" in cli_commands():
            from pgleakguard import cli

            self.stdout.write(f"pgleakguard diagnose --dsn {dsn!r}")
            self.stdout.flush()
            with _pgpassword(password):
                code = cli.main(["diagnose", "--dsn", dsn])
            if code:
                raise CommandError(f"pgleakguard diagnose exited with status {code}")
            return
        self._fallback(options["database"], dsn, wrapper)

    def _fallback(self, alias: str, dsn: str, wrapper: Any) -> None:
        state = _runtime.current()
        service = (state.config.service if state else None) or project_name()
        write = self.stdout.write
        write(f"database {alias!r}: {dsn}")
        write(f"service: {service or '-'}  pid: {os.getpid()}  installed: {state is not None}")
        checkouts = pgleakguard.open_checkouts()
        write(f"\nOpen checkouts in this process: {len(checkouts)}")
        for info in checkouts:
            write(
                f"  #{info.checkout_id} {info.integration} pool={info.pool or '-'} "
                f"backend_pid={info.backend_pid or '-'} "
                f"application_name={info.application_name or '-'} age={info.age:.1f}s "
                f"transaction={info.transaction_status or '-'} "
                f"holder={info.holder_kind} {info.holder!r}"
                f"{'' if info.holder_alive else ' (ended)'}"
            )
            write(f"    checked out at {info.callsite}")
        with wrapper.cursor() as cursor:
            cursor.execute(_ACTIVITY_SQL)
            rows = cursor.fetchall()
        ours = []
        for pid, name, status, age, xact, query, me in rows:
            tag = tagging.parse(name)
            if tag is not None and tag.service == tagging.clean_service(service or ""):
                site = tag.callsite or tagging.parse_sql_comment(query).get("callsite")
                ours.append((pid, tag.pid, status, age, xact, site, me))
        write(f"\nSessions in pg_stat_activity tagged with service {service!r}: {len(ours)}")
        for pid, owner, status, age, xact, site, me in ours:
            xact_text = f"{xact:.1f}s" if xact is not None else "-"
            write(
                f"  backend_pid={pid} process={owner}{' (this command)' if me else ''} "
                f"state={status or '-'} age={age:.1f}s transaction_age={xact_text} "
                f"call-site={site or '-'}"
            )
