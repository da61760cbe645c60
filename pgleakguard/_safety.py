"""Internal-error containment: pgleakguard must never change what the user's call does.

Every piece of bookkeeping inside a hook runs under :func:`guard` (or :func:`safe_call`).
An exception there is swallowed, counted, and logged once per code location on the
``pgleakguard`` logger; the user's own call always runs outside of it.

Work that talks to a server of its own accord (the ``activity_dsn`` lookup, a retag ``SET``)
runs under :func:`operational_guard`: a server or network that says no is not a bug of
ours, so it is one WARNING line without traceback, counted apart.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from time import monotonic
from typing import Any, Callable, TypeVar

logger = logging.getLogger("pgleakguard")

T = TypeVar("T")

_lock = threading.Lock()
_count = 0
_logged: set[tuple[str, int]] = set()
_last_error: BaseException | None = None
_last_report: traceback.TracebackException | None = None
_operational = 0
_operational_logged: dict[str, float] = {}  # what -> when it was last logged

#: An operational failure of one kind is logged at most once per this many seconds.
OPERATIONAL_LOG_INTERVAL = 60.0

# Failures of the world rather than of pgleakguard, by "module.Class" anywhere in the MRO
# (no driver is imported to check them).
_OPERATIONAL = frozenset(
    {
        "pgleakguard.ServerError",
        "psycopg.OperationalError",
        "psycopg2.OperationalError",
        "asyncpg.PostgresConnectionError",
        "asyncpg.InterfaceError",
        "sqlalchemy.OperationalError",
    }
)


def internal_error_count() -> int:
    """How many internal errors pgleakguard has swallowed in this process."""
    return _count


def last_internal_error() -> BaseException | None:
    """The most recent swallowed internal error (for pgleakguard's own tests), without its
    traceback: that would keep the frames, and the user's objects in them, alive."""
    return _last_error


def last_internal_traceback() -> str:
    """The traceback of :func:`last_internal_error`, as text."""
    report = _last_report
    return "".join(report.format()) if report is not None else ""


def operational_error_count() -> int:
    """How many operational failures (a server or network said no) pgleakguard has met."""
    return _operational


def forget_logged() -> None:
    """Log the next error from every place again (tests use it to see the one line)."""
    with _lock:
        _logged.clear()
        _operational_logged.clear()


def reset_after_fork() -> None:
    """In a forked child: a new lock (another thread may have held the parent's at fork),
    and counters and log-once memory of its own (the parent's errors are not the child's)."""
    global _lock, _count, _operational, _last_error, _last_report
    _lock = threading.Lock()
    _count = _operational = 0
    _last_error = _last_report = None
    _logged.clear()
    _operational_logged.clear()


def is_operational(exc: BaseException) -> bool:
    """Whether ``exc`` says the server or the network refused, not that pgleakguard broke."""
    if isinstance(exc, OSError):
        return True
    return any(
        f"{cls.__module__.partition('.')[0]}.{cls.__name__}" in _OPERATIONAL
        for cls in type(exc).__mro__
    )


def record_operational_error(what: str, exc: BaseException) -> None:
    """Count ``exc`` and log it as one WARNING line (no traceback), at most once a minute
    for each ``what``."""
    global _operational
    now = monotonic()
    with _lock:
        _operational += 1
        last = _operational_logged.get(what)
        due = last is None or now - last >= OPERATIONAL_LOG_INTERVAL
        if due:
            _operational_logged[what] = now
    if due:
        # Only the first line of the error, cut short: drivers' messages may run long.
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        with suppress(Exception):
            logger.warning(
                "pgleakguard: %s failed: %s (your code was not affected; "
                "stats()['operational_errors'] counts these)",
                what,
                text,
            )


def record_internal_error(exc: BaseException) -> None:
    """Count ``exc`` and log it the first time its origin is seen."""
    global _count, _last_error, _last_report
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else ("?", 0)
    report = traceback.TracebackException.from_exception(exc, lookup_lines=False)
    with _lock:
        _count += 1
        _last_error, _last_report = exc, report
        first = where not in _logged
        if first:
            _logged.add(where)
    if first:
        # A broken logging setup must not break the caller either.
        with suppress(Exception):
            logger.error(
                "pgleakguard internal error (your code was not affected; "
                "further errors from this place are only counted)",
                exc_info=exc,
            )
    # Kept, the traceback would hold every frame it passed through, and so the user's
    # connections in them, until the next internal error: keep its text only.
    seen: set[int] = set()
    chained: BaseException | None = exc
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        chained.__traceback__ = None
        chained = chained.__cause__ or chained.__context__


@contextmanager
def guard() -> Iterator[None]:
    """Swallow, count and log once any exception raised inside the block."""
    try:
        yield
    except Exception as exc:
        record_internal_error(exc)


@contextmanager
def operational_guard(what: str) -> Iterator[None]:
    """Like :func:`guard`, but a server or network failure (:func:`is_operational`) is an
    operational error of ``what``, not an internal one."""
    try:
        yield
    except Exception as exc:
        if is_operational(exc):
            record_operational_error(what, exc)
        else:
            record_internal_error(exc)


def safe_call(func: Callable[..., T], *args: Any, default: T) -> T:
    """Call ``func``; on an internal error return ``default`` instead."""
    try:
        return func(*args)
    except Exception as exc:
        record_internal_error(exc)
        return default
