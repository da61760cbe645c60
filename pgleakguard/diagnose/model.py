"""The data diagnose works on: sessions (pg_stat_activity rows) and server settings."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

from .. import tagging
from .units import KIB, iso, pg_size, to_epoch

#: Every value pg_stat_activity.state can take (PostgreSQL 12 to 18).
STATES = (
    "active",
    "idle",
    "idle in transaction",
    "idle in transaction (aborted)",
    "fastpath function call",
    "disabled",
)
#: What pg_stat_activity shows instead of another role's query without pg_read_all_stats.
INSUFFICIENT_PRIVILEGE = "<insufficient privilege>"
#: The state breakdown's key for rows whose state the reader may not see.
HIDDEN_STATE = "(hidden: insufficient privilege)"

_INT_COLUMNS = ("pid", "leader_pid", "client_port")
_TIME_COLUMNS = ("backend_start", "xact_start", "query_start", "state_change")


class RowError(ValueError):
    """A pg_stat_activity row holds a value that cannot be read; says which column."""


class Session:
    """One pg_stat_activity row, normalized, with the owner read back from its tags."""

    __slots__ = (
        "backend_pid",
        "leader_pid",
        "database",
        "user",
        "application_name",
        "client_addr",
        "client_hostname",
        "client_port",
        "backend_type",
        "state",
        "backend_start",
        "xact_start",
        "query_start",
        "state_change",
        "wait_event_type",
        "wait_event",
        "query",
        "hidden",
        "service",
        "client_pid",
        "callsite",
        "tagged",
        "superuser",
    )

    backend_pid: int
    leader_pid: int | None
    database: str | None
    user: str | None
    application_name: str | None
    client_addr: str | None
    client_hostname: str | None
    client_port: int | None
    backend_type: str | None
    state: str | None
    backend_start: float | None
    xact_start: float | None
    query_start: float | None
    state_change: float | None
    wait_event_type: str | None
    wait_event: str | None
    query: str | None
    #: True when the reader may not see this session's state and query.
    hidden: bool
    #: From the application_name tag or the last query's SQL comment.
    service: str | None
    client_pid: int | None
    callsite: str | None
    #: True when the owner came from a pgleakguard tag (not just a plain application_name).
    tagged: bool
    #: Whether the session's role is a superuser (``rolsuper`` column); ``None`` when unknown.
    superuser: bool | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Session:
        """Build from a row keyed by pg_stat_activity column names; missing columns are NULL.

        ``rolsuper`` (pg_roles, joined on usesysid) says whether the role is a superuser.

        Raises :class:`RowError` naming the column whose value cannot be read.
        """
        self = cls()
        get = row.get
        ints: dict[str, int | None] = {}
        for name in _INT_COLUMNS:
            ints[name] = _int(name, get(name))
        if ints["pid"] is None:
            raise RowError("pid is empty")
        self.backend_pid = ints["pid"]
        self.leader_pid = ints["leader_pid"]
        self.client_port = ints["client_port"]
        for name in _TIME_COLUMNS:
            value = get(name)
            try:
                setattr(self, name, to_epoch(value))
            except ValueError:
                raise RowError(f"{name} {value!r} is not a timestamp") from None
        self.database = _text(get("datname"))
        self.user = _text(get("usename"))
        self.application_name = _text(get("application_name"))
        self.client_addr = _text(get("client_addr"))
        self.client_hostname = _text(get("client_hostname"))
        self.backend_type = _text(get("backend_type"))
        self.state = _text(get("state"))
        self.wait_event_type = _text(get("wait_event_type"))
        self.wait_event = _text(get("wait_event"))
        query = get("query")
        self.query = None if query is None else str(query)
        self.hidden = self.query == INSUFFICIENT_PRIVILEGE
        self.superuser = _flag("rolsuper", get("rolsuper"))
        self._read_tags()
        return self

    def redacted(self) -> Session:
        """A copy whose query has its literals replaced by ``?`` (tags already read)."""
        from ..sqltext import redact

        other = copy.copy(self)
        if self.query is not None and not self.hidden:
            other.query = redact(self.query)
        return other

    def _read_tags(self) -> None:
        tag = tagging.parse(self.application_name)
        comment = tagging.parse_sql_comment(self.query) if not self.hidden else {}
        self.tagged = tag is not None or bool(comment)
        self.service = comment.get("service") or (tag.service if tag is not None else None)
        pid = comment.get("pid")
        self.client_pid = int(pid) if pid and pid.isdigit() else (tag.pid if tag else None)
        self.callsite = comment.get("callsite") or (tag.callsite if tag is not None else None)

    @property
    def owner(self) -> str:
        """Who this session belongs to, in words: ``service billing``, ``application 'psql'``."""
        if self.service:
            return f"service {self.service}"
        if self.application_name:
            return f"application {self.application_name!r}"
        if self.user:
            return f"user {self.user}"
        return "an unnamed client"

    def idle_for(self, now: float) -> float | None:
        """Seconds since the state last changed (how long it has been idle, if idle)."""
        return None if self.state_change is None else max(0.0, now - self.state_change)

    def as_dict(self, now: float) -> dict[str, Any]:
        """The JSON form used by ``diagnose --format json`` (see the README)."""
        xact = None if self.xact_start is None else max(0.0, now - self.xact_start)
        return {
            "backend_pid": self.backend_pid,
            "state": self.state,
            "seconds_in_state": _round(self.idle_for(now)),
            "transaction_seconds": _round(xact),
            "state_change": iso(self.state_change),
            "xact_start": iso(self.xact_start),
            "user": self.user,
            "database": self.database,
            "application_name": self.application_name,
            "client_addr": self.client_addr,
            "service": self.service,
            "client_pid": self.client_pid,
            "callsite": self.callsite,
            "wait_event_type": self.wait_event_type,
            "wait_event": self.wait_event,
            "query": None if self.hidden else self.query,
        }


@dataclasses.dataclass(frozen=True)
class Setting:
    """One pg_settings row: the raw value and its unit (``8kB``, ``ms``, ``s`` ...)."""

    value: str
    unit: str | None = None


_UNIT_BYTES = {"B": 1, "kB": KIB, "8kB": 8 * KIB, "16kB": 16 * KIB, "MB": KIB * KIB}
_UNIT_SECONDS = {"us": 1e-6, "ms": 0.001, "s": 1.0, "min": 60.0}


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What diagnose knows about the server; every field may be unknown (a snapshot file)."""

    version_num: int | None = None
    version: str | None = None
    values: Mapping[str, Setting] = dataclasses.field(default_factory=dict)
    #: Names of values that were assumed (PostgreSQL defaults), not read from the server.
    assumed: tuple[str, ...] = ()

    def integer(self, name: str) -> int | None:
        """A setting as an integer (``None`` when unknown)."""
        setting = self.values.get(name)
        try:
            return int(float(setting.value)) if setting is not None else None
        except ValueError:
            return None

    def size(self, name: str) -> int | None:
        """A memory setting in bytes (``None`` when unknown or ``-1``)."""
        setting = self.values.get(name)
        number = self.integer(name)
        if setting is None or number is None or number < 0:
            return None
        return number * _UNIT_BYTES.get(setting.unit or "B", 1)

    def seconds(self, name: str) -> float | None:
        """A time setting in seconds (``0`` means off, as in PostgreSQL)."""
        setting = self.values.get(name)
        number = self.integer(name)
        if setting is None or number is None:
            return None
        return number * _UNIT_SECONDS.get(setting.unit or "s", 1.0)

    def show(self, name: str) -> str:
        """A setting as ``SHOW`` prints it: memory in ``kB``/``MB``/``GB`` (``16384`` pages of
        ``8kB`` are ``128MB``), other values with their unit (``60000ms``)."""
        setting = self.values[name]
        size = self.size(name) if setting.unit in _UNIT_BYTES else None
        return pg_size(size) if size is not None else setting.value + (setting.unit or "")

    @property
    def major(self) -> int | None:
        """Major version: 12 ... 18."""
        return None if self.version_num is None else self.version_num // 10000

    @property
    def reserved(self) -> int | None:
        """Slots ordinary roles cannot use: superuser_reserved + reserved_connections (16+)."""
        superuser = self.integer("superuser_reserved_connections")
        if superuser is None:
            return None
        return superuser + (self.integer("reserved_connections") or 0)

    @property
    def usable(self) -> int | None:
        """Connection slots left for ordinary roles: max_connections minus the reserved ones."""
        total, reserved = self.integer("max_connections"), self.reserved
        return None if total is None or reserved is None else max(0, total - reserved)

    def supports(self, major: int) -> bool | None:
        """True/False when the version is known to be at least/below ``major``; None if unknown."""
        return None if self.major is None else self.major >= major


def _int(name: str, value: Any) -> int | None:
    if value is None or value == "":
        return None
    if value.__class__ is int or (value.__class__ is str and value.isdigit()):
        return int(value)
    text = str(value).strip()
    if not text.lstrip("-").isdigit():
        raise RowError(f"{name} {value!r} is not a whole number")
    return int(text)


_TRUE = ("t", "true", "on", "yes", "1")
_FALSE = ("f", "false", "off", "no", "0")


def _flag(name: str, value: Any) -> bool | None:
    # A driver gives a bool; CSV and psql exports give t/f; JSON gives true/false.
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise RowError(f"{name} {value!r} is not a boolean")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if text != "" else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
