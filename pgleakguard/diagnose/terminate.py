"""The SQL that ends sessions: one builder for ``terminate`` and for diagnose's triage SQL.

Every filter is spelled out in the SQL itself, one condition per line with a comment, so
what is printed is exactly what runs. Client backends only (never replication, background
or parallel workers), never the session running it, and superusers' sessions only when
asked for.
"""

from __future__ import annotations

import dataclasses

from .sql import like_prefix, quote_literal
from .units import format_duration

#: States ``terminate`` ends by default: the ones a leaked connection sits in.
IDLE_STATES = ("idle", "idle in transaction", "idle in transaction (aborted)")
#: Short names accepted by ``--state``.
STATE_ALIASES = {
    "idle": "idle",
    "idle-in-transaction": "idle in transaction",
    "idle in transaction": "idle in transaction",
    "aborted": "idle in transaction (aborted)",
    "idle-in-transaction-aborted": "idle in transaction (aborted)",
    "idle in transaction (aborted)": "idle in transaction (aborted)",
    "active": "active",
    "fastpath": "fastpath function call",
    "fastpath function call": "fastpath function call",
    "disabled": "disabled",
}


@dataclasses.dataclass(frozen=True)
class Filters:
    """Which sessions to end. Every field narrows the selection."""

    #: Seconds since the session entered its state (pg_stat_activity.state_change).
    idle_for: float
    states: tuple[str, ...] = IDLE_STATES
    user: str | None = None
    #: An exact application_name, or a pgleakguard service (``billing`` matches ``billing/pid:N``).
    application: str | None = None
    #: The sessions of one tagged process: (service, client pid).
    tag: tuple[str, int] | None = None
    database: str | None = None
    include_superusers: bool = False
    #: Only these backend pids (``--execute`` pins the sessions the user confirmed).
    pids: tuple[int, ...] | None = None


def conditions(f: Filters) -> list[tuple[str, str]]:
    """(SQL condition, why) pairs, in the order they are printed."""
    out = [
        (
            "a.backend_type = 'client backend'",
            "client sessions only: never replication, background or parallel workers",
        ),
        ("a.pid <> pg_backend_pid()", "never the session running this"),
        (
            "a.state IN (" + ", ".join(quote_literal(s) for s in f.states) + ")",
            "state is " + (f.states[0] if len(f.states) == 1 else "one of: " + ", ".join(f.states)),
        ),
        (
            f"a.state_change < now() - interval '{_seconds(f.idle_for)} seconds'",
            f"in that state for more than {format_duration(f.idle_for)}",
        ),
    ]
    if f.user is not None:
        out.append((f"a.usename = {quote_literal(f.user)}", f"user is {f.user}"))
    if f.database is not None:
        out.append((f"a.datname = {quote_literal(f.database)}", f"database is {f.database}"))
    if f.application is not None:
        pattern = quote_literal(like_prefix(f.application + "/pid:"))
        out.append(
            (
                f"(a.application_name = {quote_literal(f.application)} "
                f"OR a.application_name LIKE {pattern})",
                f"application_name is {f.application} or a pgleakguard tag of service "
                f"{f.application}",
            )
        )
    if f.tag is not None:
        base = f"{f.tag[0]}/pid:{f.tag[1]}"
        out.append(
            (
                f"(a.application_name = {quote_literal(base)} "
                f"OR a.application_name LIKE {quote_literal(like_prefix(base + '/'))})",
                f"opened by service {f.tag[0]}, pid {f.tag[1]} (its application_name tag)",
            )
        )
    if not f.include_superusers:
        out.append(
            (
                "NOT EXISTS (SELECT 1 FROM pg_roles AS r WHERE r.oid = a.usesysid AND r.rolsuper)",
                "superusers' sessions are spared",
            )
        )
    if f.pids is not None:
        listed = ",".join(str(p) for p in sorted(f.pids)) or "0"
        out.append(
            (f"a.pid = ANY('{{{listed}}}'::integer[])", "only the sessions listed and confirmed")
        )
    return out


def _where(f: Filters) -> str:
    # Each condition under a comment saying what it does: the SQL reads as its own filter list.
    parts = []
    for i, (sql, why) in enumerate(conditions(f)):
        indent = "" if i == 0 else "  "
        parts += [f"{indent}-- {why}", f"{indent}{'WHERE' if i == 0 else 'AND'} {sql}"]
    return "\n".join(parts)


#: Why the role running the query may not end a session (NULL when it may): the rule of
#: PostgreSQL's pg_signal_backend(). A superuser may end any session; nobody else may end a
#: superuser's; other sessions need the privileges of their role or of pg_signal_backend.
CANNOT_END_SQL = (
    "CASE WHEN (SELECT r.rolsuper FROM pg_roles AS r WHERE r.rolname = current_user) THEN NULL\n"
    "         WHEN EXISTS (SELECT 1 FROM pg_roles AS r WHERE r.oid = a.usesysid AND r.rolsuper)\n"
    "           THEN 'superuser'\n"
    "         WHEN pg_has_role(a.usesysid, 'USAGE') OR pg_has_role('pg_signal_backend', 'USAGE')\n"
    "           THEN NULL\n"
    "         ELSE 'other role' END"
)


def select_sql(f: Filters) -> str:
    """The sessions the filters match (what a dry run lists), with ``cannot_end``:
    ``superuser`` or ``other role`` when the role running it may not end that session."""
    return (
        "SELECT a.pid, a.usename, a.datname, a.application_name, host(a.client_addr) "
        "AS client_addr, a.state,\n"
        "       extract(epoch FROM now() - a.state_change)::float8 AS seconds_in_state, "
        "a.query,\n"
        f"       {CANNOT_END_SQL} AS cannot_end\n"
        f"FROM pg_stat_activity AS a\n{_where(f)}\nORDER BY a.state_change, a.pid"
    )


def terminate_sql(f: Filters) -> str:
    """The statement that ends the matched sessions, returning each pid and the outcome."""
    return (
        "SELECT a.pid, a.usename, a.application_name, a.state, "
        "pg_terminate_backend(a.pid) AS terminated\n"
        f"FROM pg_stat_activity AS a\n{_where(f)}\nORDER BY a.pid;"
    )


def _seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.3f}"
