"""Internal-error containment: pgleakguard must never change what the user's call does.

Every piece of bookkeeping inside a hook runs under :func:`guard` (or :func:`safe_call`).
An exception there is swallowed, counted, and logged once per code location on the
``pgleakguard`` logger; the user's own call always runs outside of it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, Callable, TypeVar

logger = logging.getLogger("pgleakguard")

T = TypeVar("T")

_lock = threading.Lock()
_count = 0
_logged: set[tuple[str, int]] = set()
_last_error: BaseException | None = None


def internal_error_count() -> int:
    """How many internal errors pgleakguard has swallowed in this process."""
    return _count


def last_internal_error() -> BaseException | None:
    """The most recent swallowed internal error (for pgleakguard's own tests)."""
    return _last_error


def forget_logged() -> None:
    """Log the next error from every place again (tests use it to see the one line)."""
    with _lock:
        _logged.clear()


def record_internal_error(exc: BaseException) -> None:
    """Count ``exc`` and log it the first time its origin is seen."""
    global _count, _last_error
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else ("?", 0)
    with _lock:
        _count += 1
        _last_error = exc
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


@contextmanager
def guard() -> Iterator[None]:
    """Swallow, count and log once any exception raised inside the block."""
    try:
        yield
    except Exception as exc:
        record_internal_error(exc)


def safe_call(func: Callable[..., T], *args: Any, default: T) -> T:
    """Call ``func``; on an internal error return ``default`` instead."""
    try:
        return func(*args)
    except Exception as exc:
        record_internal_error(exc)
        return default
