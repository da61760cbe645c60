"""PgBouncer: which pool mode the workload allows, and a pgbouncer.ini for it.

Transaction pooling hands a server connection to a client for one transaction only, so
anything that lives in the session breaks under it. Each such feature seen in the workload
is named as the reason for session pooling.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Sequence

from .model import Session

#: Parameters PgBouncer itself tracks per client: SETting them is fine in transaction mode.
TRACKED_PARAMETERS = frozenset(
    {"application_name", "client_encoding", "datestyle", "timezone", "standard_conforming_strings"}
)
_LEADING_COMMENTS = re.compile(r"^(?:\s+|/\*.*?\*/|--[^\n]*\n)*", re.S)
#: (feature, pattern, unless): a query matching ``pattern`` and not ``unless`` shows it.
_FEATURES: tuple[tuple[str, re.Pattern[str], re.Pattern[str] | None], ...] = (
    ("LISTEN", re.compile(r"^LISTEN\b", re.I), None),
    ("SQL PREPARE", re.compile(r"^PREPARE\b", re.I), None),
    ("WITH HOLD cursors", re.compile(r"^DECLARE\b[^;]*\bWITH\s+HOLD\b", re.I | re.S), None),
    (
        "temp tables",
        re.compile(
            r"\bCREATE\s+(?:GLOBAL\s+|LOCAL\s+)?TEMP(?:ORARY)?\s+TABLE\b|\bINTO\s+TEMP(?:ORARY)?\b",
            re.I,
        ),
        # ON COMMIT DROP: the table ends with the transaction, which is safe to pool.
        re.compile(r"\bON\s+COMMIT\s+DROP\b", re.I),
    ),
    ("advisory locks", re.compile(r"\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\(", re.I), None),
)
_SET = re.compile(
    r"^SET\s+(?:SESSION\s+)?(?!LOCAL\b|TRANSACTION\b|SESSION\s+CHARACTERISTICS\b)"
    r"(\"?[A-Za-z_][A-Za-z0-9_.]*\"?)",
    re.I,
)
#: SET's special forms and the parameter each sets (SET TIME ZONE is SET timezone).
_SET_FORMS = {"time": "timezone", "names": "client_encoding"}
# Cheap pre-check: only queries with one of these words can show a session feature.
_MAYBE = re.compile(r"listen|prepare|hold|temp|advisory|set", re.I)
_SET_CONFIG = re.compile(r"\bset_config\s*\(\s*'([^']+)'\s*,[^,]*,\s*false\s*\)", re.I)
_XACT_LOCK = re.compile(r"\bpg_(?:try_)?advisory_xact_lock(?:_shared)?\s*\(", re.I)

#: What each session feature does under transaction pooling.
CONSEQUENCES = {
    "LISTEN": "notifications go to whichever client holds the server connection next",
    "SQL PREPARE": "the prepared statement is missing on the next server connection",
    "WITH HOLD cursors": "the cursor stays on a server connection the client no longer has",
    "temp tables": "the table is gone, or another client sees it",
    "advisory locks": "a session lock stays held by a server connection other clients reuse",
    "session SET": "the setting leaks to other clients and is lost for this one",
}


@dataclasses.dataclass(frozen=True)
class SessionFeature:
    """A session-level feature seen in the workload: the reason transaction pooling breaks."""

    name: str
    backend_pids: tuple[int, ...]
    #: A sample of what showed it (a query, or where it was seen).
    example: str

    @property
    def reason(self) -> str:
        """``LISTEN (3 sessions, e.g. backend 123: LISTEN orders): notifications go ...``."""
        count = len(self.backend_pids)
        return (
            f"{self.name} ({count} session{'s' if count != 1 else ''}, e.g. {self.example}): "
            f"{CONSEQUENCES[self.name]}"
        )


def session_features(
    sessions: Iterable[Session], advisory_lock_pids: Sequence[int] = ()
) -> list[SessionFeature]:
    """Session-level features in the sessions' last queries, and advisory locks in pg_locks.

    An advisory lock held by an idle session is a session lock; one held inside a
    transaction is counted too (pg_locks does not say its level) unless the session's last
    query took it with pg_advisory_xact_lock.
    """
    seen: dict[str, list[tuple[int, str]]] = {}
    by_pid: dict[int, Session] = {}
    for s in sessions:
        by_pid[s.backend_pid] = s
        if not s.query or s.hidden or _MAYBE.search(s.query) is None:
            continue
        text = _LEADING_COMMENTS.sub("", s.query, count=1)
        for name in _features_of(text):
            seen.setdefault(name, []).append((s.backend_pid, _short(text)))
    locks = seen.setdefault("advisory locks", [])
    for pid in advisory_lock_pids:
        holder = by_pid.get(pid)
        if holder is None or any(p == pid for p, _ in locks):
            continue
        if holder.state == "idle":
            locks.append((pid, "an advisory lock in pg_locks while idle (a session lock)"))
        elif not (holder.query and _XACT_LOCK.search(holder.query)):
            locks.append(
                (
                    pid,
                    "an advisory lock in pg_locks (a session lock unless taken with "
                    "pg_advisory_xact_lock)",
                )
            )
    out = []
    for name in (*(n for n, _, _ in _FEATURES), "session SET"):
        hits = sorted(seen.get(name, []))
        if hits:
            example = f"backend {hits[0][0]}: {hits[0][1]}"
            out.append(SessionFeature(name, tuple(p for p, _ in hits), example))
    return out


def _features_of(text: str) -> list[str]:
    found = [
        name
        for name, pattern, unless in _FEATURES
        if pattern.search(text) and not (unless and unless.search(text))
    ]
    m = _SET.match(text)
    params = [m.group(1).strip('"')] if m else []
    params = [_SET_FORMS.get(p.lower(), p) for p in params]
    params += _SET_CONFIG.findall(text)
    if any(p.lower() not in TRACKED_PARAMETERS for p in params):
        found.append("session SET")
    return found


def _short(text: str, limit: int = 60) -> str:
    one = " ".join(text.split())
    return one if len(one) <= limit else one[: limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class PgBouncerConfig:
    """The numbers and choices that go into a pgbouncer.ini."""

    pool_mode: str
    default_pool_size: int
    max_db_connections: int
    max_client_conn: int
    reserve_pool_size: int
    #: ``[databases]`` entries: name -> connection string (``*`` is the fallback).
    databases: Sequence[tuple[str, str]]
    listen_addr: str = "127.0.0.1"
    listen_port: int = 6432
    auth_type: str = "scram-sha-256"
    auth_file: str = "/etc/pgbouncer/userlist.txt"
    #: Why the pool mode and the sizes are what they are (written as comments).
    reasons: Sequence[str] = ()


#: What the last query of a session cannot show, said wherever transaction pooling is chosen.
WEAK_EVIDENCE = (
    "weak evidence: only each session's last query is visible, so a LISTEN, PREPARE, SET or "
    "temp table issued earlier in a session is not (LISTEN usually is), and there is no "
    "server-wide view of who listens; check the application for them before switching"
)


def pool_mode_for(
    features: Sequence[SessionFeature], sessions: int = 0, hidden: int = 0, grant: str = ""
) -> tuple[str, list[str]]:
    """``transaction`` when no session feature is in use and every session could be checked;
    ``session`` otherwise. The reasons say what was seen and how little it proves.

    ``sessions``: how many were looked at; ``hidden``: how many of them showed
    ``<insufficient privilege>`` (their queries could not be checked); ``grant``: the fix.
    """
    if features:
        return "session", [f"session pooling because of {f.reason}" for f in features]
    if hidden:
        return "session", [
            f"session pooling, the safe choice: session features could not be checked in "
            f"{hidden} of {sessions} sessions, whose queries show <insufficient privilege>"
            + (f" (fix: {grant})" if grant else "")
            + "; use transaction pooling only once the application is known not to use "
            "LISTEN, advisory locks, SQL PREPARE, WITH HOLD cursors, temp tables or session SET"
        ]
    return "transaction", [
        "transaction pooling: no session features (LISTEN, advisory locks, SQL PREPARE, "
        f"WITH HOLD cursors, temp tables, session SET) in the last query of the {sessions} "
        "sessions seen, nor advisory locks in pg_locks",
        WEAK_EVIDENCE,
    ]


def features_phrase(features: Sequence[SessionFeature], hidden: int = 0) -> str:
    """``LISTEN, temp tables``; ``none seen`` (or, with hidden sessions, how many could not
    be checked)."""
    named = ", ".join(f.name for f in features)
    if hidden:
        unchecked = f"{hidden} hidden session(s) not checked"
        return f"{named}; {unchecked}" if named else unchecked
    return named or "none seen"


def size_pool(active: int, pairs: int, usable: int | None, total: int) -> tuple[int, int, int]:
    """(default_pool_size, max_db_connections, max_client_conn) from the observed usage.

    The server side gets 80% of the usable slots at most (the rest for admin, migrations,
    cron); each (database, user) pool gets 1.5x its share of the active sessions, at least 5.
    """
    budget = max(1, math.floor(0.8 * (usable if usable is not None else max(total, 20))))
    pairs = max(1, pairs)
    per_pair = max(5, math.ceil(1.5 * active / pairs))
    default_pool_size = min(per_pair, max(1, budget // pairs))
    max_client_conn = max(100, math.ceil(2 * total / 100) * 100)
    return default_pool_size, budget, max_client_conn


def render_ini(cfg: PgBouncerConfig, header: Sequence[str] = ()) -> str:
    """pgbouncer.ini text (accepted by PgBouncer 1.18 and later)."""
    lines = [f";; {h}" for h in header]
    lines += [f";; {r}" for r in cfg.reasons]
    lines += ["", "[databases]"]
    lines += [f"{name} = {conn}" for name, conn in cfg.databases]
    lines += [
        "",
        "[pgbouncer]",
        f"listen_addr = {cfg.listen_addr}",
        f"listen_port = {cfg.listen_port}",
        "; TCP only; set a directory here to also listen on a Unix socket",
        "unix_socket_dir =",
        f"auth_type = {cfg.auth_type}",
        f"auth_file = {cfg.auth_file}",
        "",
        f"pool_mode = {cfg.pool_mode}",
        "; server connections per (database, user) pair",
        f"default_pool_size = {cfg.default_pool_size}",
        "min_pool_size = 0",
        f"reserve_pool_size = {cfg.reserve_pool_size}",
        "reserve_pool_timeout = 3",
        "; never more server connections per database than this (max_connections minus headroom)",
        f"max_db_connections = {cfg.max_db_connections}",
        f"max_client_conn = {cfg.max_client_conn}",
        "",
        "; a client idle inside a transaction for 60 s is disconnected: no leaked transaction",
        "; can pin a server connection for long",
        "idle_transaction_timeout = 60",
        "; a client waiting this long for a server connection gets an error instead of hanging",
        "query_wait_timeout = 30",
        "server_idle_timeout = 600",
        "server_lifetime = 3600",
        "server_check_delay = 30",
        "; JDBC (HikariCP) sends extra_float_digits at startup",
        "ignore_startup_parameters = extra_float_digits",
        "",
        "; PgBouncer 1.21+: protocol-level prepared statements in transaction mode",
        "; max_prepared_statements = 200",
        "",
    ]
    return "\n".join(lines)
