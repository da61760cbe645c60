"""What to do about a diagnosis: triage SQL now, and permanent fixes (version-gated)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Sequence

from .. import tagging
from . import pgbouncer
from .analysis import Diagnosis, Suspect
from .sql import quote_ident, quote_literal
from .terminate import Filters, terminate_sql
from .units import format_duration, pg_interval

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclasses.dataclass(frozen=True)
class Fix:
    """One permanent fix: what to run or configure, and why."""

    #: Short name: the setting, or ``CONNECTION LIMIT``, ``PgBouncer``, ``SQLAlchemy`` ...
    name: str
    why: str
    #: What to run or put in a file.
    text: str
    #: ``sql``, ``ini``, ``python``, ``yaml`` or ``properties``.
    language: str
    #: First PostgreSQL major version that has it (``None``: every supported version).
    min_version: int | None = None
    #: True/False: the server has it / lacks it; None: the version is unknown.
    applies: bool | None = True
    #: The server's current value, when known.
    current: str | None = None


@dataclasses.dataclass(frozen=True)
class Triage:
    """Emergency SQL ending one group of suspects, with the filters spelled out."""

    title: str
    filters: Filters
    sql: str
    sessions: int


# -- triage -------------------------------------------------------------------------------


#: Triage statements printed at most (the biggest groups; terminate covers the rest).
MAX_TRIAGE = 10


def triage(diag: Diagnosis) -> tuple[list[Triage], int]:
    """Terminate statements for the biggest groups of suspects (by state and service, or
    application, or user), and how many groups there are in all.

    A group from one process is pinned to its tag (service and pid); a service's many
    processes are matched by service. The threshold in the SQL is the diagnosis threshold,
    so it ends the suspects listed and whatever joined them since, never a busy session.
    """
    groups: dict[tuple[str, str, str], list[Suspect]] = {}
    for sus in diag.suspects:
        s = sus.session
        tag = tagging.parse(s.application_name)
        if tag is not None:
            key = (sus.reason, "service", tag.service)
        elif s.application_name:
            key = (sus.reason, "application", s.application_name)
        else:
            key = (sus.reason, "user", s.user or "")
        groups.setdefault(key, []).append(sus)
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return [_triage_one(diag, key, members) for key, members in ranked[:MAX_TRIAGE]], len(ranked)


def _triage_one(diag: Diagnosis, key: tuple[str, str, str], members: list[Suspect]) -> Triage:
    reason, kind, name = key
    limit = (
        diag.options.idle_threshold
        if reason == "idle"
        else diag.options.idle_in_transaction_threshold
    )
    filters = Filters(idle_for=limit, states=(reason,))
    who = f"{kind} {name}"
    if kind == "service":
        tags = {tagging.parse(m.session.application_name) for m in members}
        pids = sorted({t.pid for t in tags if t is not None})
        if len(pids) == 1:
            filters = dataclasses.replace(filters, tag=(name, pids[0]))
            who = f"service {name}, pid {pids[0]}"
        else:
            filters = dataclasses.replace(filters, application=name)
            who = f"service {name} ({len(pids)} processes)"
    elif kind == "application":
        filters = dataclasses.replace(filters, application=name)
    else:
        filters = dataclasses.replace(filters, user=name)
    title = (
        f"End the {len(members)} session(s) of {who} in state '{reason}' "
        f"for more than {format_duration(limit)}"
    )
    return Triage(title, filters, terminate_sql(filters), len(members))


# -- server settings ----------------------------------------------------------------------


def _current(diag: Diagnosis, name: str) -> str | None:
    setting = diag.settings.values.get(name)
    if setting is None:
        return None
    if setting.value in ("0", "-1") and setting.unit in ("ms", "s", "min"):
        return "0 (off)"
    return setting.value + (setting.unit or "")


def _gate(diag: Diagnosis, name: str, why: str, text: str, since: int | None) -> Fix:
    applies = True if since is None else diag.settings.supports(since)
    return Fix(name, why, text, "sql", since, applies, _current(diag, name))


def _roles_of(suspects: Sequence[Suspect], states: tuple[str, ...]) -> list[str]:
    counts = Counter(s.session.user for s in suspects if s.reason in states and s.session.user)
    return [role for role, _ in counts.most_common(5)]


def _alter(setting: str, value: str, roles: Sequence[str]) -> str:
    lines = [f"ALTER SYSTEM SET {setting} = {quote_literal(value)};", "SELECT pg_reload_conf();"]
    if roles:
        lines.append("-- or only for the roles seen leaking:")
        lines += [
            f"ALTER ROLE {quote_ident(r)} SET {setting} = {quote_literal(value)};" for r in roles
        ]
    return "\n".join(lines)


def timeout_fixes(diag: Diagnosis) -> list[Fix]:
    """Server-side timeouts that end leaked sessions by themselves."""
    in_xact = _roles_of(diag.suspects, ("idle in transaction", "idle in transaction (aborted)"))
    idle = _roles_of(diag.suspects, ("idle",))
    idle_value = pg_interval(max(diag.options.idle_threshold, 300))
    return [
        _gate(
            diag,
            "idle_in_transaction_session_timeout",
            "ends a session left idle inside a transaction (it holds locks and a slot, and "
            "blocks vacuum); the application sees its connection closed",
            _alter("idle_in_transaction_session_timeout", "60s", in_xact),
            None,
        ),
        _gate(
            diag,
            "idle_session_timeout",
            "ends a session idle outside a transaction for longer than this; set it per role "
            "for applications, not where PgBouncer connects, and have pools test connections "
            "(pool_pre_ping, CONN_HEALTH_CHECKS)",
            _alter("idle_session_timeout", idle_value, idle),
            14,
        ),
        _gate(
            diag,
            "client_connection_check_interval",
            "notices a client that went away during a long query and ends the query",
            _alter("client_connection_check_interval", "10s", ()),
            14,
        ),
        _gate(
            diag,
            "transaction_timeout",
            "ends any transaction (idle or not) older than this: the backstop for leaked "
            "transactions; per role, above your longest legitimate transaction",
            _alter("transaction_timeout", "10min", in_xact),
            17,
        ),
        Fix(
            "tcp_keepalives_*",
            "finds clients that vanished without closing (crashed host, dropped NAT entry) in "
            "about 2 minutes instead of hours; TCP connections only",
            "\n".join(
                [
                    "ALTER SYSTEM SET tcp_keepalives_idle = '60s';",
                    "ALTER SYSTEM SET tcp_keepalives_interval = '10s';",
                    "ALTER SYSTEM SET tcp_keepalives_count = 6;",
                    "SELECT pg_reload_conf();",
                ]
            ),
            "sql",
            None,
            True,
            _current(diag, "tcp_keepalives_idle"),
        ),
    ]


def connection_limit(seen: int, suspected: int, usable: int | None) -> int:
    """A CONNECTION LIMIT with headroom: 1.5x the sessions not suspected of leaking, at least
    10, never above the usable slots."""
    limit = max(10, math.ceil(1.5 * max(0, seen - suspected)))
    return min(limit, usable) if usable else limit


def limit_fixes(diag: Diagnosis) -> list[Fix]:
    """ALTER ROLE / ALTER DATABASE ... CONNECTION LIMIT from the observed usage."""
    suspected = {s.session.backend_pid for s in diag.suspects}
    usable = diag.settings.usable
    lines = [
        "-- limit = max(10, 1.5 x sessions not suspected of leaking), at most the usable slots;",
        "-- a role or database over its limit gets an error instead of taking every slot",
        "-- (superusers are not limited)",
    ]
    for kind, attr in (("ROLE", "user"), ("DATABASE", "database")):
        seen: Counter[str] = Counter()
        leaking: Counter[str] = Counter()
        for s in diag.sessions:
            name = getattr(s, attr)
            if name:
                seen[name] += 1
                leaking[name] += s.backend_pid in suspected
        for name, count in seen.most_common(10):
            limit = connection_limit(count, leaking[name], usable)
            lines.append(
                f"ALTER {kind} {quote_ident(name)} CONNECTION LIMIT {limit};"
                f"  -- seen {count}, {leaking[name]} suspected"
            )
    return [
        Fix(
            "CONNECTION LIMIT",
            "caps what one role or database can take, so one leaking service cannot exhaust "
            "the server",
            "\n".join(lines),
            "sql",
        )
    ]


# -- PgBouncer ----------------------------------------------------------------------------


def pgbouncer_config(
    diag: Diagnosis, features: Sequence[pgbouncer.SessionFeature], upstream: str | None
) -> pgbouncer.PgBouncerConfig:
    """A PgBouncer setup for this workload: pool mode from the session features seen, sizes
    from the active sessions per (database, user)."""
    mode, reasons = pgbouncer.pool_mode_for(features)
    active = sum(1 for s in diag.sessions if s.state == "active" and s.backend_pid != diag.self_pid)
    pairs = {(s.database, s.user) for s in diag.sessions if s.database and s.user}
    size, budget, clients = pgbouncer.size_pool(
        active, len(pairs), diag.settings.usable, diag.total
    )
    target = upstream or "host=127.0.0.1 port=5432"
    # Plain names get their own entry; any other database goes through the "*" fallback.
    names = sorted({d for d, _ in pairs if _PLAIN_NAME.match(d)})
    databases = [(db, f"{target} dbname={db}") for db in names]
    databases.append(("*", target))
    reasons = list(reasons) + [
        f"default_pool_size {size}: 1.5 x {active} active session(s) over {max(1, len(pairs))} "
        f"(database, user) pair(s), at least 5; max_db_connections {budget}: 80% of "
        f"{diag.settings.usable if diag.settings.usable is not None else 'the'} usable slots",
    ]
    if upstream is None:
        reasons.append("edit host and port under [databases]: the snapshot does not say them")
    return pgbouncer.PgBouncerConfig(
        pool_mode=mode,
        default_pool_size=size,
        max_db_connections=budget,
        max_client_conn=clients,
        reserve_pool_size=max(1, size // 5),
        databases=databases,
        reasons=reasons,
    )


# -- application pools --------------------------------------------------------------------


def pool_size(diag: Diagnosis) -> tuple[int, int, str]:
    """(pool size per process, processes seen, the arithmetic in words)."""
    processes = {
        (s.service, s.client_pid) if s.client_pid else (s.application_name, s.client_addr)
        for s in diag.sessions
        if s.backend_pid != diag.self_pid
    }
    count = max(1, len(processes))
    usable = diag.settings.usable
    budget = math.floor(0.8 * (usable if usable is not None else max(diag.total, 20)))
    size = max(2, min(20, budget // count))
    how = (
        f"pool size {size} = min(20, 80% of {usable if usable is not None else budget} "
        f"{'usable slots' if usable is not None else 'sessions'} / {count} client process(es))"
        ", at least 2; 20 is about what one PostgreSQL server runs at once"
    )
    return size, count, how


def pool_fixes(diag: Diagnosis, transaction_pooling: bool) -> list[Fix]:
    """Pool settings for SQLAlchemy, Django, Rails ActiveRecord and HikariCP."""
    size, _, how = pool_size(diag)
    bouncer = transaction_pooling
    sqlalchemy = "\n".join(
        [
            f"# {how}",
            "engine = create_engine(",
            "    url,",
            f"    pool_size={size},",
            "    max_overflow=0,        # a hard cap: the pool never opens more",
            "    pool_timeout=10,       # fail fast instead of queueing for 30 s",
            "    pool_recycle=1800,     # below any server or proxy idle timeout",
            "    pool_pre_ping=True,    # survives idle_session_timeout and restarts",
            ")",
            "# always: with engine.connect() as conn: ...  (never keep a connection)",
        ]
    )
    django_opts = f'"OPTIONS": {{"pool": {{"min_size": 2, "max_size": {size}, "timeout": 10}}}},'
    django = "\n".join(
        [
            f"# {how}",
            "DATABASES['default'].update({",
            "    # Django 5.1+ with psycopg 3: a real pool (CONN_MAX_AGE must then be 0)",
            f"    {django_opts}",
            "    # older Django: persistent connections, checked before reuse",
            "    # 'CONN_MAX_AGE': 60, 'CONN_HEALTH_CHECKS': True,",
            *(
                ["    'DISABLE_SERVER_SIDE_CURSORS': True,  # PgBouncer transaction mode"]
                if bouncer
                else []
            ),
            "})",
        ]
    )
    rails = "\n".join(
        [
            f"# {how}",
            "production:",
            f"  pool: {size}              # match your Puma threads per process",
            "  checkout_timeout: 5",
            "  idle_timeout: 300        # close connections idle for 5 min",
            "  reaping_frequency: 60    # reclaim connections of dead threads",
            *(
                [
                    "  prepared_statements: false  # PgBouncer transaction mode",
                    "  advisory_locks: false",
                ]
                if bouncer
                else []
            ),
        ]
    )
    hikari = "\n".join(
        [
            f"# {how}",
            f"maximumPoolSize={size}",
            f"minimumIdle={size}",
            "connectionTimeout=10000",
            "idleTimeout=600000",
            "maxLifetime=1800000",
            "# logs the stack of any connection held longer than 60 s",
            "leakDetectionThreshold=60000",
            *(
                ["# PgBouncer transaction mode: add prepareThreshold=0 to the JDBC URL"]
                if bouncer
                else []
            ),
        ]
    )
    why = "a bounded pool per process, failing fast, with leaked connections found"
    return [
        Fix("SQLAlchemy", why, sqlalchemy, "python"),
        Fix("Django", why, django, "python"),
        Fix("Rails ActiveRecord", why, rails, "yaml"),
        Fix("HikariCP", why, hikari, "properties"),
    ]
