"""What to do about a diagnosis: triage SQL now, and permanent fixes (version-gated)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Sequence

from .. import tagging
from . import pgbouncer
from .analysis import Diagnosis, Suspect, grant_advice
from .recommend import MAX_POOL
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
    The title says exactly what the SQL ends, superusers' sessions included (see
    :func:`_superusers`).
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
    include, note = _superusers(kind, members)
    filters = dataclasses.replace(filters, include_superusers=include)
    title = (
        f"End the {len(members)} session(s) of {who} in state '{reason}' "
        f"for more than {format_duration(limit)}{note}"
    )
    return Triage(title, filters, terminate_sql(filters), len(members))


def _superusers(kind: str, members: Sequence[Suspect]) -> tuple[bool, str]:
    """Whether the group's SQL must include superusers' sessions, and the title's note.

    The terminate SQL spares superusers' sessions unless told otherwise (an administrator's
    psql may be among them). A group with sessions of a superuser includes them, or the SQL
    would end fewer sessions than its title says. A group picked by a pgleakguard tag
    includes them too when superuser-ness is unknown (a snapshot): the tag names the
    application, never an administrator's session.
    """
    supers = sorted({m.session.user or "?" for m in members if m.session.superuser})
    count = sum(1 for m in members if m.session.superuser)
    unknown = any(m.session.superuser is None for m in members)
    if count:
        check = "" if kind == "service" else "; check they are not an administrator's"
        return True, (
            f" ({count} of them run as superuser {', '.join(supers)}: this SQL includes "
            f"superusers' sessions{check})"
        )
    if unknown and kind == "service":
        return True, ""
    if unknown:
        return False, (
            " (superusers' sessions are spared: which roles are superusers is unknown, "
            "export rolsuper with the snapshot)"
        )
    return False, ""


# -- server settings ----------------------------------------------------------------------


def _current(diag: Diagnosis, name: str) -> str | None:
    setting = diag.settings.values.get(name)
    if setting is None:
        return None
    if name.startswith("tcp_keepalives_") and setting.value == "0":
        # PostgreSQL shows the socket's value: 0 only where there is no TCP (a Unix socket).
        return "unknown: read over a Unix socket, where it always shows 0"
    if setting.value in ("0", "-1") and setting.unit in ("ms", "s", "min"):
        return "0 (off)"
    return setting.value + (setting.unit or "")


def _gate(diag: Diagnosis, name: str, why: str, text: str, since: int | None) -> Fix:
    applies = True if since is None else diag.settings.supports(since)
    return Fix(name, why, text, "sql", since, applies, _current(diag, name))


def _roles_of(suspects: Sequence[Suspect], states: tuple[str, ...]) -> list[tuple[str, bool]]:
    """The five roles with most suspects in ``states``, each with whether it is a superuser."""
    counts = Counter(s.session.user for s in suspects if s.reason in states and s.session.user)
    supers = {s.session.user for s in suspects if s.session.superuser}
    return [(role, role in supers) for role, _ in counts.most_common(5)]


def _alter(setting: str, value: str, roles: Sequence[tuple[str, bool]]) -> str:
    lines = [f"ALTER SYSTEM SET {setting} = {quote_literal(value)};", "SELECT pg_reload_conf();"]
    if roles:
        lines.append("-- or only for the roles seen leaking:")
        lines += _alter_roles(setting, value, roles)
    return "\n".join(lines)


def _alter_roles(setting: str, value: str, roles: Sequence[tuple[str, bool]]) -> list[str]:
    """``ALTER ROLE ... SET`` for each role (its new sessions get it); a line to edit when
    no role was seen. A superuser role is only named: administrators' sessions would get
    the timeout too."""
    lines = [
        f"-- not for {quote_ident(r)}: a superuser, its administrators' sessions would get it too"
        if superuser
        else f"ALTER ROLE {quote_ident(r)} SET {setting} = {quote_literal(value)};"
        for r, superuser in roles
    ]
    if all(superuser for _, superuser in roles):
        lines.append(f"-- ALTER ROLE <application role> SET {setting} = {quote_literal(value)};")
    return lines


def timeout_fixes(diag: Diagnosis) -> list[Fix]:
    """Server-side timeouts that end leaked sessions by themselves.

    The two that would end legitimate sessions if set server-wide (idle pooled connections,
    PgBouncer's server connections, pg_dump, migrations) are given per role only.
    """
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
            "ends a session idle outside a transaction for longer than this; per application "
            "role, never server-wide (it would also close every service's idle pooled "
            "connections and PgBouncer's idle server connections), and have pools test "
            "connections (pool_pre_ping, CONN_HEALTH_CHECKS)",
            "\n".join(_alter_roles("idle_session_timeout", idle_value, idle)),
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
            "transactions; per application role, above its longest legitimate transaction, "
            "never server-wide (it would also end pg_dump, migrations and other long jobs)",
            "\n".join(_alter_roles("transaction_timeout", "10min", in_xact)),
            17,
        ),
        Fix(
            "tcp_keepalives_*",
            "finds clients that vanished without closing (crashed host, dropped NAT entry) in "
            "about 2 minutes instead of hours (0 means the OS default: 2 hours on Linux); TCP "
            "connections only",
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


#: States of a session that holds a transaction open: a leak, not a pool member.
_IN_TRANSACTION = ("idle in transaction", "idle in transaction (aborted)")


def connection_limit(in_use: int, usable: int | None) -> int:
    """A CONNECTION LIMIT with headroom: 1.5x the sessions in use, at least 10, never below
    what is in use, at most the usable slots."""
    limit = max(10, in_use, math.ceil(1.5 * in_use))
    return min(limit, usable) if usable else limit


def limit_fixes(diag: Diagnosis) -> list[Fix]:
    """ALTER ROLE ... CONNECTION LIMIT from the observed usage, per non-superuser role.

    In use: every session of the role except those suspected of leaking a transaction; idle
    pool members count (a pool idle for hours at night is still the pool). No per-database
    limit: it would cap every service of that database at once.
    """
    leaked = {s.session.backend_pid for s in diag.suspects if s.reason in _IN_TRANSACTION}
    usable = diag.settings.usable
    lines = [
        "-- limit = 1.5 x the role's sessions in use (all but those leaked idle in a transaction),",
        "-- at least 10, at most the usable slots; a role over its limit gets an error instead",
        "-- of taking every slot. Per role, not per database: a database limit caps every",
        "-- service using it. Superusers are never limited.",
    ]
    seen: Counter[str] = Counter()
    leaking: Counter[str] = Counter()
    supers: set[str] = set()
    for s in diag.sessions:
        if s.user:
            seen[s.user] += 1
            leaking[s.user] += s.backend_pid in leaked
            if s.superuser:
                supers.add(s.user)
    for name, count in seen.most_common(10):
        if name in supers:
            lines.append(f"-- {name}: a superuser, CONNECTION LIMIT does not apply")
            continue
        in_use = count - leaking[name]
        limit = connection_limit(in_use, usable)
        figures = f"seen {count}, {leaking[name]} leaked in a transaction, {in_use} in use"
        if usable is not None and limit >= usable:
            lines.append(
                f"-- {name}: no limit below the {usable} usable slots leaves it headroom "
                f"({figures})"
            )
            continue
        lines.append(f"ALTER ROLE {quote_ident(name)} CONNECTION LIMIT {limit};  -- {figures}")
        if count > limit:
            lines.append(
                f"--   {name} has {count} sessions now: its new connections fail until the "
                "leaked ones end (triage above)"
            )
    return [
        Fix(
            "CONNECTION LIMIT",
            "caps what one role can take, so one leaking service cannot exhaust the server",
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
    mode, reasons = pgbouncer.pool_mode_for(
        features, diag.total, diag.hidden, grant_advice(diag.role) if diag.hidden else ""
    )
    active = sum(1 for s in diag.sessions if s.state == "active")
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
    }
    count = max(1, len(processes))
    usable = diag.settings.usable
    base = usable if usable is not None else max(diag.total, 20)
    budget = math.floor(0.8 * base)
    size = max(2, min(MAX_POOL, budget // count))
    how = (
        f"pool size {size} = min({MAX_POOL}, 80% of {base} "
        f"{'usable slots' if usable is not None else 'sessions'} / {count} client process(es))"
        f", at least 2; {MAX_POOL} is about what one PostgreSQL server runs at once"
    )
    return size, count, how


#: psycopg 3 prepares a statement run 5 times on a connection; PgBouncer transaction mode
#: then hands the next transaction another server connection, without it.
_PSYCOPG_PREPARE = [
    "# PgBouncer transaction mode (psycopg 3): no prepared statements, which it loses",
    "# before PgBouncer 1.21 or without max_prepared_statements",
]


def pool_fixes(diag: Diagnosis, transaction_pooling: bool) -> list[Fix]:
    """Pool settings for SQLAlchemy, psycopg_pool, Django, Rails ActiveRecord and HikariCP;
    with ``transaction_pooling`` (PgBouncer) also what each must turn off."""
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
            *(
                [
                    *(f"    {line}" for line in _PSYCOPG_PREPARE),
                    '    connect_args={"prepare_threshold": None},',
                ]
                if bouncer
                else []
            ),
            ")",
            "# always: with engine.connect() as conn: ...  (never keep a connection)",
        ]
    )
    psycopg_pool = "\n".join(
        [
            f"# {how}",
            "pool = ConnectionPool(",
            "    conninfo,",
            "    open=True,             # or: with ConnectionPool(...) as pool:",
            "    min_size=2,",
            f"    max_size={size},",
            "    timeout=10,            # fail fast instead of queueing for 30 s",
            "    max_idle=300,          # close connections idle for 5 min",
            "    max_lifetime=1800,     # below any server or proxy idle timeout",
            "    check=ConnectionPool.check_connection,  # survives idle_session_timeout",
            *(
                [
                    *(f"    {line}" for line in _PSYCOPG_PREPARE),
                    '    kwargs={"prepare_threshold": None},',
                ]
                if bouncer
                else []
            ),
            ")",
            "# always: with pool.connection() as conn: ...  (never keep a connection)",
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
                [
                    "    'DISABLE_SERVER_SIDE_CURSORS': True,  # PgBouncer transaction mode",
                    '    # and keep OPTIONS without "server_side_binding": True or a',
                    '    # "prepare_threshold" (Django turns psycopg\'s prepared statements off)',
                ]
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
        Fix("psycopg_pool", why, psycopg_pool, "python"),
        Fix("Django", why, django, "python"),
        Fix("Rails ActiveRecord", why, rails, "yaml"),
        Fix("HikariCP", why, hikari, "properties"),
    ]
