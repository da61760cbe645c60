"""The server's side: pg_stat_activity (version-aware SQL), settings, and the join with checkouts.

Works for PostgreSQL 12 to 18 and for a role with ``pg_monitor`` (no superuser needed).
psycopg is imported only when a function here talks to a server, so importing this module
costs nothing. DSNs are shown only through :func:`redact_dsn`: no password reaches any
output or log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from .events import CheckoutInfo, Event, LeakEvent

if TYPE_CHECKING:
    import psycopg

    from .diagnose.model import ServerSettings

#: Settings diagnose and recommend read (those a version lacks are simply absent).
SETTINGS = (
    "max_connections",
    "superuser_reserved_connections",
    "reserved_connections",
    "shared_buffers",
    "work_mem",
    "maintenance_work_mem",
    "autovacuum_work_mem",
    "hash_mem_multiplier",
    "max_worker_processes",
    "max_parallel_workers",
    "autovacuum_max_workers",
    "max_wal_senders",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "transaction_timeout",
    "client_connection_check_interval",
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
    "track_activity_query_size",
    "port",
    "unix_socket_directories",
    "listen_addresses",
)

#: pg_stat_activity columns read, with the major version that introduced each (12 = always).
ACTIVITY_COLUMNS: tuple[tuple[str, int], ...] = (
    ("datname", 12),
    ("pid", 12),
    ("leader_pid", 13),
    ("usename", 12),
    ("application_name", 12),
    ("client_addr", 12),
    ("client_hostname", 12),
    ("client_port", 12),
    ("backend_start", 12),
    ("xact_start", 12),
    ("query_start", 12),
    ("state_change", 12),
    ("wait_event_type", 12),
    ("wait_event", 12),
    ("state", 12),
    ("query_id", 14),
    ("query", 12),
    ("backend_type", 12),
    ("rolsuper", 12),
)
# rolsuper: pg_roles is readable by every role; diagnose needs it to know what the triage SQL
# (which spares superusers unless told otherwise) will end.
_CAST = {
    "client_addr": "host(a.client_addr)",
    "rolsuper": "(SELECT r.rolsuper FROM pg_roles AS r WHERE r.oid = a.usesysid)",
}
_NULL_CAST = {"leader_pid": "NULL::integer", "query_id": "NULL::bigint"}

#: The fields of a pg_stat_activity row put into leak reports and correlations.
ROW_FIELDS = (
    "state",
    "state_change",
    "xact_start",
    "query_start",
    "wait_event_type",
    "wait_event",
    "backend_type",
    "query",
)

#: ``password=value`` (also ``sslpassword``, or a misspelt key ending in "password") in a
#: key=value DSN, a URI query or an error message; the value quoted ('...' with backslash
#: escapes, maybe unterminated) or bare.
_KV_PASSWORD = re.compile(r"(?i)\w*password\s*=\s*('(?:[^'\\]|\\.)*(?:'|\Z)|(?:\\.|\S)+)")
#: ``scheme://user:secret@``: everything from the first ':' of the user info to the last '@'
#: of the word, so a password holding unencoded '@', '/' or ':' is covered whole.
_URI_PASSWORD = re.compile(r"([\w+.-]*://[^\s:/@]*):\S*@")
#: The same in a DSN, where nothing else follows: the password may hold spaces too.
_DSN_URI_PASSWORD = re.compile(r"(?s)([\w+.-]*://[^\s:/@]*):.*@")
#: ``?password=...`` / ``&sslpassword=...`` in a URI's query, with the '&' after it.
_QUERY_PASSWORD = re.compile(r"(?i)([?&])(?:ssl)?password=[^&\s]*&?")
_TRAILING_SEPARATOR = re.compile(r"[?&](?=\s|\Z)")
_URI_PREFIX = re.compile(r"^(?:postgresql|postgres)://")
#: Where libpq cuts a URI into user, password, host, port, dbname and parameters: a password
#: holding one of these unencoded is read in pieces, and an error may quote a piece.
_URI_DELIMITERS = re.compile(r"[@/:?#,&=\[\]\s]")
#: libpq's "missing "=" after "TOKEN"": the token may be the tail of an unquoted password.
_MISSING_EQUALS = re.compile(r'(missing "=" after )"[^"]*"')


class ServerError(Exception):
    """Talking to the server failed; the message is one line and holds no password.

    ``hint``, when set, is one more line saying what to do about it.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def redact_dsn(dsn: str) -> str:
    """``dsn`` with any password removed (URI and ``key=value`` forms).

    Never raises: a DSN too malformed to parse has every ``user:...@`` and ``password=...``
    cut out by pattern, so not even a broken DSN shows its password.
    """
    shown = dsn
    if _URI_PREFIX.match(dsn) and not _ambiguous_userinfo(dsn):
        with contextlib.suppress(ValueError):  # urlsplit: "Invalid IPv6 URL" and friends
            shown = _redact_uri(dsn)
    return _mask(_DSN_URI_PASSWORD.sub(r"\1@", shown))


def _ambiguous_userinfo(uri: str) -> bool:
    # A password holding an unencoded '@', '/', '?' or '#': where libpq or urlsplit end it is
    # not where the user meant it to end, so everything up to the last '@' is the password.
    rest = uri.split("://", 1)[1]
    userinfo = rest[: rest.rfind("@")] if "@" in rest else ""
    return any(ch in userinfo for ch in "@/?#")


def _redact_uri(dsn: str) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{hosts}" if user else hosts
    query = [(k, v) for k, v in parse_qsl(parts.query) if not _is_password_key(k)]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="/"), ""))


def _is_password_key(key: str) -> bool:
    return key.lower() in ("password", "sslpassword")


def _mask(text: str) -> str:
    """``text`` without URI passwords and ``password=`` values, spaces normalised."""
    text = _URI_PASSWORD.sub(r"\1@", text)
    text = _TRAILING_SEPARATOR.sub("", _QUERY_PASSWORD.sub(r"\1", text))
    return " ".join(_KV_PASSWORD.sub("", text).split())


def _secrets(dsn: str) -> set[str]:
    """Every string of ``dsn`` that may be its password, as written and percent-decoded."""
    found: set[str] = set()
    for m in _KV_PASSWORD.finditer(dsn):
        value = m.group(1)
        found.add(value)
        if value.startswith("'"):
            found.add(re.sub(r"\\(.)", r"\1", value[1:].removesuffix("'")))
    for m in _DSN_URI_PASSWORD.finditer(dsn):
        secret = m.group(0)[len(m.group(1)) + 1 : -1]
        found.add(secret)
        # libpq may have read a password with an unencoded delimiter as host, port or dbname.
        found.update(p for p in _URI_DELIMITERS.split(secret) if len(p) >= 3)
    if _URI_PREFIX.match(dsn):
        with contextlib.suppress(ValueError):
            parts = urlsplit(dsn)
            found.update(v for k, v in parse_qsl(parts.query) if _is_password_key(k))
            found.add(parts.password or "")
    found |= {unquote(s) for s in found}
    found.discard("")
    return found


def scrub(message: str, dsn: str) -> str:
    """An error message on one line, with the DSN's password (if any) masked.

    Whatever ``dsn`` looks like: the DSN itself is shown redacted, and every string that may
    be its password (or a piece libpq read as host or port) becomes ``***``.
    """
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    text = text.replace(" ".join(dsn.split()), redact_dsn(dsn)) if dsn.strip() else text
    for secret in sorted(_secrets(dsn), key=len, reverse=True):
        text = text.replace(secret, "***")
    return _mask(_MISSING_EQUALS.sub(r'\1"***"', text))


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise ServerError(
            "talking to PostgreSQL needs psycopg: pip install 'pgleakguard[cli]'"
        ) from None
    return psycopg


def connect(
    dsn: str, *, purpose: str = "cli", timeout: float = 5.0, statement_timeout: float = 10.0
) -> psycopg.Connection[Any]:
    """An autocommit connection for pgleakguard's own queries, never tracked as a checkout.

    Raises :class:`ServerError` with a one-line, password-free message.
    """
    pg = _psycopg()
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(dsn)
    except UnicodeDecodeError:  # psycopg decodes what libpq parsed: %ff is no UTF-8
        raise ServerError(
            f"bad DSN '{redact_dsn(dsn)}': a percent-encoded value is not UTF-8"
        ) from None
    except pg.Error as exc:
        raise ServerError(scrub(f"bad DSN '{redact_dsn(dsn)}': {exc}", dsn)) from None
    kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": max(1, int(timeout))}
    if "application_name" not in params:
        kwargs["application_name"] = f"pgleakguard-{purpose}"
    try:
        conn: psycopg.Connection[Any] = pg.connect(dsn, **kwargs)
    except UnicodeError as exc:  # the host name, IDNA-encoded for the resolver
        message = scrub(f"cannot connect to {redact_dsn(dsn)}: bad host name ({exc})", dsn)
        raise ServerError(message) from None
    except pg.Error as exc:
        message = scrub(f"cannot connect to {redact_dsn(dsn)}: {exc}", dsn)
        raise ServerError(message, full_server_hint(message)) from None
    _untrack(conn)
    try:
        conn.execute(f"SET statement_timeout = {int(statement_timeout * 1000)}")
    except pg.Error as exc:
        conn.close()
        raise ServerError(scrub(str(exc), dsn)) from None
    return conn


#: What PostgreSQL says when every slot an ordinary role may use is taken (SQLSTATE 53300).
_SERVER_FULL = ("too many clients already", "remaining connection slots are reserved")

#: How a superuser exports the sessions for ``diagnose --snapshot`` (the file's ``now`` column
#: dates it).
SNAPSHOT_EXPORT = (
    "psql -X -c \"\\copy (select now(), * from pg_stat_activity) to 'activity.csv' csv header\""
)


def full_server_hint(message: str) -> str | None:
    """For a "server is full" connection error: how to get in anyway (else ``None``)."""
    if not any(text in message for text in _SERVER_FULL):
        return None
    return (
        "every slot this role may use is taken: connect as a superuser (they have the "
        "superuser_reserved_connections slots) or, on PostgreSQL 16+, as a role granted "
        "pg_use_reserved_connections (reserved_connections slots); or have a superuser run "
        f"{SNAPSHOT_EXPORT} and then: pgleakguard diagnose --snapshot activity.csv"
    )


def _untrack(conn: Any) -> None:
    # pgleakguard's own connection is not the user's checkout: take it out of the registry.
    from . import _runtime
    from .tracker import CHECKOUT_ATTR

    rec = conn.__dict__.pop(CHECKOUT_ATTR, None)
    state = _runtime.current()
    if rec is not None and state is not None:
        state.tracker.end(rec)


def read_settings(conn: psycopg.Connection[Any]) -> ServerSettings:
    """The server's version and the :data:`SETTINGS` it has (pg_settings is readable by all)."""
    from .diagnose.model import ServerSettings, Setting

    rows = conn.execute(
        "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s)", [list(SETTINGS)]
    ).fetchall()
    version = conn.execute("SELECT current_setting('server_version')").fetchone()
    return ServerSettings(
        version_num=conn.info.server_version,
        version=str(version[0]) if version else None,
        values={name: Setting(str(value), unit) for name, value, unit in rows},
    )


def activity_sql(version_num: int, *, client_backends_only: bool = True) -> str:
    """The pg_stat_activity query for a server version (12 to 18).

    Columns the version lacks come back as NULL under the same name; ``now`` is the moment
    of the read. Only client backends unless ``client_backends_only`` is false.
    """
    major = version_num // 10000
    columns = ["now() AS now"]
    for name, since in ACTIVITY_COLUMNS:
        expr = _CAST.get(name, f"a.{name}") if major >= since else _NULL_CAST[name]
        columns.append(expr if expr == f"a.{name}" else f"{expr} AS {name}")
    # A role without pg_read_all_stats sees no backend_type for other roles' sessions; those
    # attached to a database are client sessions (rarely an autovacuum worker).
    where = (
        "\nWHERE a.backend_type = 'client backend'"
        "\n   OR (a.backend_type IS NULL AND a.datid IS NOT NULL)"
        if client_backends_only
        else ""
    )
    return (
        "SELECT "
        + ",\n       ".join(columns)
        + "\nFROM pg_stat_activity AS a"
        + where
        + "\nORDER BY a.pid"
    )


def read_activity(
    conn: psycopg.Connection[Any], version_num: int, *, client_backends_only: bool = True
) -> list[dict[str, Any]]:
    """pg_stat_activity rows as dicts keyed by column name (see :func:`activity_sql`), with
    the passwords in their queries masked (:func:`pgleakguard.sqltext.mask_passwords`)."""
    from psycopg.rows import dict_row

    from .sqltext import mask_passwords

    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(activity_sql(version_num, client_backends_only=client_backends_only))
        rows = cur.fetchall()
    for row in rows:
        if row["query"]:
            row["query"] = mask_passwords(row["query"])
    return rows


def whoami(conn: psycopg.Connection[Any]) -> tuple[str, int]:
    """The role this connection runs as and its own backend pid."""
    row = conn.execute("SELECT current_user, pg_backend_pid()").fetchone()
    assert row is not None
    return str(row[0]), int(row[1])


def advisory_lock_holders(conn: psycopg.Connection[Any]) -> list[int]:
    """Backend pids holding advisory locks (pg_locks is readable by every role)."""
    rows = conn.execute(
        "SELECT DISTINCT pid FROM pg_locks WHERE locktype = 'advisory' AND pid IS NOT NULL "
        "ORDER BY pid"
    ).fetchall()
    return [int(r[0]) for r in rows]


def lock_blockers(conn: psycopg.Connection[Any]) -> dict[int, list[int]]:
    """For each session waiting on a lock, the backend pids blocking it."""
    rows = conn.execute(
        "SELECT pid, pg_blocking_pids(pid) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
    ).fetchall()
    return {int(pid): sorted(int(b) for b in blockers or []) for pid, blockers in rows}


@dataclasses.dataclass
class LiveRead:
    """One read of a live server: settings, sessions and the context diagnose uses."""

    settings: ServerSettings
    rows: list[dict[str, Any]]
    role: str
    self_pid: int
    advisory_lock_pids: list[int]
    blockers: dict[int, list[int]]
    #: ``host=... port=...`` of this server, for a pgbouncer.ini.
    upstream: str
    #: Backend pid -> progress of its long operation (only when asked for).
    progress: dict[int, str]


def read_server(
    conn: psycopg.Connection[Any], *, client_backends_only: bool = True, progress: bool = False
) -> LiveRead:
    """Everything diagnose and watch read from a live server, in one go."""
    settings = read_settings(conn)
    version = settings.version_num or conn.info.server_version
    role, self_pid = whoami(conn)
    host = conn.info.host
    host_part = f"host={host}" if host and " " not in host else f"host='{host}'"
    return LiveRead(
        settings=settings,
        rows=read_activity(conn, version, client_backends_only=client_backends_only),
        role=role,
        self_pid=self_pid,
        advisory_lock_pids=advisory_lock_holders(conn),
        blockers=lock_blockers(conn),
        upstream=f"{host_part} port={conn.info.port}",
        progress=read_progress(conn, version) if progress else {},
    )


#: (view, first version, label, SQL giving "done" and "total" per pid) for long operations.
_PROGRESS = (
    ("pg_stat_progress_vacuum", 12, "VACUUM", "heap_blks_scanned", "heap_blks_total", "blocks"),
    ("pg_stat_progress_create_index", 12, "CREATE INDEX", "blocks_done", "blocks_total", "blocks"),
    ("pg_stat_progress_cluster", 12, "CLUSTER", "heap_blks_scanned", "heap_blks_total", "blocks"),
    (
        "pg_stat_progress_analyze",
        13,
        "ANALYZE",
        "sample_blks_scanned",
        "sample_blks_total",
        "blocks",
    ),
    ("pg_stat_progress_basebackup", 13, "BASE BACKUP", "backup_streamed", "backup_total", "bytes"),
    ("pg_stat_progress_copy", 14, "COPY", "tuples_processed", "NULL::bigint", "tuples"),
)


def read_progress(conn: psycopg.Connection[Any], version_num: int) -> dict[int, str]:
    """What each long operation has done so far, by backend pid (pg_stat_progress_* views)."""
    major = version_num // 10000
    parts = []
    for view, since, label, done, total, unit in _PROGRESS:
        if major >= since:
            what = "p.command" if view.endswith(("copy", "cluster")) else f"'{label}'"
            parts.append(
                f"SELECT p.pid, {what}, p.{done}::bigint, {_col(total)}::bigint, '{unit}' "
                f"FROM {view} AS p"
            )
    out: dict[int, str] = {}
    for pid, label, done, total, unit in conn.execute(" UNION ALL ".join(parts)).fetchall():
        out[int(pid)] = progress_text(str(label), done, total, str(unit))
    return out


def _col(expr: str) -> str:
    return expr if expr.startswith("NULL") else f"p.{expr}"


def progress_text(label: str, done: int | None, total: int | None, unit: str) -> str:
    """``CREATE INDEX 45% (4500 of 10000 blocks)`` or ``COPY FROM 1200 tuples``."""
    if done is None:
        return label
    if total:
        return f"{label} {100 * done / total:.0f}% ({done} of {total} {unit})"
    return f"{label} {done} {unit}"


# -- in-process correlation -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Correlation:
    """One open checkout and its pg_stat_activity row (``None`` when the server has none)."""

    checkout: CheckoutInfo
    activity: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the checkout's fields and ``pg_stat_activity``."""
        out = self.checkout.as_dict()
        out["pg_stat_activity"] = self.activity
        return out


def activity_rows(
    conn: psycopg.Connection[Any], pids: Sequence[int], sql_limit: int = 1000, redact: bool = False
) -> dict[int, dict[str, Any]]:
    """pg_stat_activity rows for ``pids``: :data:`ROW_FIELDS`, timestamps as ISO text, the
    query cut to ``sql_limit`` characters (its literals replaced with ``redact``)."""
    if not pids:
        return {}
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT pid, " + ", ".join(ROW_FIELDS) + " FROM pg_stat_activity WHERE pid = ANY(%s)",
            [list(pids)],
        )
        rows = cur.fetchall()
    return {int(row["pid"]): _json_row(row, sql_limit, redact) for row in rows}


def _json_row(row: Mapping[str, Any], sql_limit: int, redact: bool) -> dict[str, Any]:
    from .diagnose.units import iso, to_epoch
    from .sqltext import for_report

    out: dict[str, Any] = {}
    for name in ROW_FIELDS:
        value = row.get(name)
        out[name] = iso(to_epoch(value)) if name.endswith(("_start", "_change")) else value
    out["query"] = for_report(out["query"], sql_limit, redact)
    return out


def sql_policy() -> tuple[int, bool]:
    """(max_sql_length, redact_sql) of the current installation, or the defaults."""
    from . import _runtime
    from .config import Config

    state = _runtime.current()
    config = state.config if state is not None else Config()
    return config.max_sql_length, config.redact_sql


def correlate(connection_or_dsn: Any) -> list[Correlation]:
    """Pair each open checkout of this process with its pg_stat_activity row, by backend pid.

    Give a DSN or a SQLAlchemy Engine (pgleakguard opens and closes its own connection, so a
    full pool does not matter), or a psycopg connection or a SQLAlchemy Connection whose
    driver is psycopg (used as it is; a transaction it had to open is rolled back, one already
    open is left alone). Oldest checkout first; ``activity`` is ``None`` for a checkout whose
    backend the server does not list. Raises :class:`ServerError` when the server cannot be
    read, :class:`TypeError` for anything else than those four.
    """
    from ._runtime import open_checkouts

    pg = _psycopg()
    target = _correlation_target(pg, connection_or_dsn)
    checkouts = open_checkouts()
    pids = sorted({c.backend_pid for c in checkouts if c.backend_pid is not None})
    policy = sql_policy()
    if isinstance(target, str):
        conn = connect(target, purpose="correlate")
        try:
            rows = activity_rows(conn, pids, *policy)
        except pg.Error as exc:
            raise ServerError(scrub(str(exc), target)) from None
        finally:
            conn.close()
    else:
        rows = _rows_on_user_connection(pg, target, pids, policy)
    return [Correlation(c, rows.get(c.backend_pid) if c.backend_pid else None) for c in checkouts]


def _correlation_target(pg: Any, given: Any) -> Any:
    """A DSN or a psycopg connection for what :func:`correlate` was given."""
    if isinstance(given, (str, pg.Connection)):
        return given
    if "sqlalchemy" in sys.modules:
        from sqlalchemy.engine import Connection, Engine

        engine = getattr(given, "sync_engine", given)  # an AsyncEngine's Engine
        if isinstance(engine, Engine):
            # Any PostgreSQL driver: pgleakguard connects with psycopg to the engine's URL.
            url = engine.url.set(drivername="postgresql")
            return url.render_as_string(hide_password=False)
        if isinstance(given, Connection):
            driver = given.connection.driver_connection
            if isinstance(driver, pg.Connection):
                return driver
            raise TypeError(
                "correlate() takes a SQLAlchemy Connection only with the psycopg driver "
                f"(postgresql+psycopg://), not {type(driver).__name__}: pass its Engine instead"
            )
    raise TypeError(
        "correlate() takes a DSN, a psycopg connection, or a SQLAlchemy Engine or Connection, "
        f"not {type(given).__name__}"
    )


def _rows_on_user_connection(
    pg: Any, conn: Any, pids: Sequence[int], policy: tuple[int, bool]
) -> dict[int, dict[str, Any]]:
    status = conn.info.transaction_status
    if status == pg.pq.TransactionStatus.INERROR:
        raise ServerError("the connection is in a failed transaction: roll it back first")
    opened = status == pg.pq.TransactionStatus.IDLE and not conn.autocommit
    try:
        return activity_rows(conn, pids, *policy)
    except pg.Error as exc:
        raise ServerError(" ".join(str(exc).split())) from None
    finally:
        if opened:
            conn.rollback()


class ActivityLookup:
    """Adds each leak's pg_stat_activity row to ``details["pg_stat_activity"]``.

    Called by the sinks' delivery thread only (``activity_dsn`` option), over its own short-lived
    connection with a 2 s connect timeout and a 2 s statement timeout. After a failure it
    waits a minute before trying again; the failure itself is raised to the caller's guard.
    """

    retry_after = 60.0

    def __init__(self, dsn: str, sql_limit: int = 1000, redact: bool = False) -> None:
        self.dsn = dsn
        self.sql = (sql_limit, redact)
        self._quiet_until = 0.0

    def __call__(self, events: Sequence[Event]) -> None:
        leaks = [e for e in events if isinstance(e, LeakEvent) and e.backend_pid is not None]
        if not leaks or time.monotonic() < self._quiet_until:
            return
        try:
            conn = connect(self.dsn, purpose="activity", timeout=2, statement_timeout=2)
            try:
                pids = sorted({e.backend_pid for e in leaks if e.backend_pid})
                rows = activity_rows(conn, pids, *self.sql)
            finally:
                conn.close()
        except BaseException:
            self._quiet_until = time.monotonic() + self.retry_after
            raise
        for event in leaks:
            row = rows.get(event.backend_pid) if event.backend_pid is not None else None
            if row is not None:
                event.details["pg_stat_activity"] = row
