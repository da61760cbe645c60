"""Configuration: keyword arguments beat ``PGLEAKGUARD_*`` environment variables beat defaults."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any, Callable

from .events import Event

#: Integration names accepted by ``integrations=``.
KNOWN_INTEGRATIONS = ("psycopg", "psycopg_pool", "sqlalchemy", "django")

_BOOLEANS = (
    "capture_stack",
    "tag_application_name",
    "sql_comments",
    "retag_on_checkout",
    "otel",
    "otel_checkout_spans",
    "redact_sql",
)
_WHOLE_NUMBERS = {
    "stack_depth": (1, 1000, "a whole number of frames from 1 to 1000"),
    "max_open_checkouts": (1, 10_000_000, "a whole number from 1 to 10000000"),
    "max_sql_length": (10, 1_000_000, "a whole number of characters from 10 to 1000000"),
}
_OBJECTS = ("on_leak", "meter_provider", "tracer_provider")  # keyword only, never from env
_PROVIDERS = {"meter_provider": "get_meter", "tracer_provider": "get_tracer"}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything :func:`pgleakguard.install` can be told. Build it with :meth:`Config.load`."""

    #: Service name put in each connection's application_name and in every report.
    service: str | None = None
    #: Seconds a checkout may be held before it is reported as ``held_too_long``.
    leak_threshold: float = 30.0
    #: Seconds a transaction may sit idle before it is reported as ``idle_in_transaction``.
    idle_in_transaction_threshold: float = 10.0
    #: Capture the whole acquisition stack (else only the call-site frame).
    capture_stack: bool = True
    #: Frames kept per acquisition stack, starting at the call-site.
    stack_depth: int = 20
    #: Called with every event (LeakEvent or ReturnedEvent), in order, from a daemon thread
    #: of its own (``pgleakguard-on-leak``): a slow callback delays no other sink.
    on_leak: Callable[[Event], None] | None = None
    #: "auto", or the integrations to enable by name.
    integrations: tuple[str, ...] = ("auto",)
    #: Level at which the logging sink writes leak reports: a level name, or a number
    #: (kept as its name when it is a standard level, else as digits, e.g. ``"15"``).
    log_level: str = "WARNING"
    #: Extra module prefixes skipped when looking for the call-site (e.g. your DB helper package).
    ignore_modules: tuple[str, ...] = ()
    #: Tag each new connection's application_name with service and pid.
    tag_application_name: bool = True
    #: Append every event as one JSON object per line to this file.
    jsonl_path: str | None = None
    #: SQLAlchemy: append a sqlcommenter comment (service, pid, call-site) to statements.
    sql_comments: bool = False
    #: SQLAlchemy: put the checkout's call-site in application_name at each checkout
    #: (one ``SET`` round trip, only when the tag changes, never inside a transaction).
    retag_on_checkout: bool = False
    #: At most this many open checkouts are tracked (memory stays bounded); more are counted.
    max_open_checkouts: int = 100_000
    #: OpenTelemetry pool metrics and leak spans (recorded once an SDK is configured).
    otel: bool = True
    #: OpenTelemetry: also a span per checkout, from checkout to return.
    otel_checkout_spans: bool = False
    #: OpenTelemetry providers to use instead of the global ones (keyword only).
    meter_provider: Any = None
    tracer_provider: Any = None
    #: SQL text in reports (a leak's pg_stat_activity row, correlate()) is cut to this length.
    max_sql_length: int = 1000
    #: Replace the literals of SQL text in reports with ``?`` (values stay out of logs).
    redact_sql: bool = False
    #: When set, the delivery thread (``pgleakguard-sinks``) adds each leak's
    #: pg_stat_activity row to its report, read over its own short-lived connection to this
    #: DSN (``pg_monitor`` is enough). Left out of repr() and of every error message: a DSN
    #: may hold a password.
    activity_dsn: str | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> Config:
        """Merge ``kwargs`` over ``PGLEAKGUARD_<OPTION>`` variables over the defaults.

        Raises ``TypeError`` for an unknown option and ``ValueError`` naming the option,
        the value and what is accepted for a bad one.
        """
        env = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - set(fields))
        if unknown:
            raise TypeError(
                f"pgleakguard: unknown option(s) {', '.join(unknown)}; "
                f"known options: {', '.join(fields)}"
            )
        values: dict[str, Any] = {}
        for name in fields:
            if name in kwargs:
                values[name] = convert(name, kwargs[name])
                continue
            var = "PGLEAKGUARD_" + name.upper()
            if name not in _OBJECTS and env.get(var, "") != "":
                values[name] = convert(name, env[var], source="$" + var)
        return cls(**values)


#: Options whose value never appears in an error message.
_SECRET = ("activity_dsn",)


def _bad(name: str, value: Any, accepted: str, source: str | None) -> ValueError:
    where = f" (from {source})" if source else ""
    shown = f"<{type(value).__name__}, not shown>" if name in _SECRET else repr(value)
    return ValueError(f"pgleakguard: invalid {name}={shown}{where}: expected {accepted}")


def convert(name: str, value: Any, source: str | None = None) -> Any:
    """The value of option ``name`` given as ``value``, checked and converted; else a
    ``ValueError`` naming the option, where it came from (``source``: ``"$VARIABLE"``,
    ``"--option"``), the value (never a DSN's) and what is accepted."""
    if name in ("leak_threshold", "idle_in_transaction_threshold"):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = -1.0
        if isinstance(value, bool) or not number > 0 or number != number or number == float("inf"):
            raise _bad(name, value, "a positive number of seconds, e.g. 30 or 0.5", source)
        return number
    if name in _WHOLE_NUMBERS:
        low, high, accepted = _WHOLE_NUMBERS[name]
        try:
            number = int(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
            number = low - 1
        if isinstance(value, (bool, float)) or not low <= number <= high:
            raise _bad(name, value, accepted, source)
        return number
    if name in _BOOLEANS:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise _bad(name, value, "true or false (1/0, yes/no, on/off)", source)
    if name == "log_level":
        level = value.strip().upper() if isinstance(value, str) else value
        if isinstance(level, str) and level.isdigit():
            level = int(level)
        if isinstance(level, int) and not isinstance(level, bool) and 1 <= level <= 100:
            standard = logging.getLevelName(level)
            return standard if standard in _LOG_LEVELS else str(level)
        if level not in _LOG_LEVELS:
            accepted = "one of " + ", ".join(_LOG_LEVELS) + " or a number from 1 to 100"
            raise _bad(name, value, accepted, source)
        return level
    if name == "integrations":
        names = _names(value)
        if names is None:
            raise _bad(name, value, '"auto" or a list of names', source)
        if names == ("auto",):
            return names
        bad = [n for n in names if n not in KNOWN_INTEGRATIONS]
        if bad or not names:
            raise _bad(name, value, '"auto" or names from ' + ", ".join(KNOWN_INTEGRATIONS), source)
        return names
    if name == "ignore_modules":
        names = _names(value)
        if names is None:
            raise _bad(name, value, "module names, e.g. myapp.db", source)
        return names
    if name in _PROVIDERS:
        method = _PROVIDERS[name]
        if value is not None and not callable(getattr(value, method, None)):
            raise _bad(name, value, f"an OpenTelemetry provider (with {method}()), or None", source)
        return value
    if name == "on_leak":
        if value is not None and not callable(value):
            raise _bad(name, value, "a callable taking one event, or None", source)
        return value
    # service, jsonl_path, activity_dsn: strings
    if value is not None and not isinstance(value, str):
        raise _bad(name, value, "a string", source)
    return value or None


def _names(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None
