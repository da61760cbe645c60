"""What pgleakguard reports: plain data with ``as_dict()`` (JSON) and ``render()`` (text)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Union

from .callsite import CallSite, render_frames

#: Leak kinds, in the words used in reports, JSON and docs.
HELD_TOO_LONG = "held_too_long"
IDLE_IN_TRANSACTION = "idle_in_transaction"
OWNER_EXITED = "owner_exited"
GARBAGE_COLLECTED = "garbage_collected"
SCOPE_ENDED = "scope_ended"
NEVER_CLOSED = "never_closed"

LEAK_KINDS = (
    HELD_TOO_LONG,
    IDLE_IN_TRANSACTION,
    OWNER_EXITED,
    GARBAGE_COLLECTED,
    SCOPE_ENDED,
    NEVER_CLOSED,
)
#: Suspected kinds may be legitimate (a long report query); the others are certain leaks.
SUSPECTED_KINDS = frozenset({HELD_TOO_LONG, IDLE_IN_TRANSACTION})

_EXPLAIN = {
    HELD_TOO_LONG: "checked out longer than leak_threshold",
    IDLE_IN_TRANSACTION: "a transaction is open and nothing has run on it",
    OWNER_EXITED: "the thread or task that took it has ended, and it was never returned",
    GARBAGE_COLLECTED: "the connection object was garbage collected without being returned",
    SCOPE_ENDED: "the request or test that took it ended, and it is still held",
    NEVER_CLOSED: "still checked out at interpreter exit",
}


def severity_of(kind: str) -> str:
    """``"suspected"`` or ``"definite"``."""
    return "suspected" if kind in SUSPECTED_KINDS else "definite"


@dataclasses.dataclass(frozen=True)
class CheckoutInfo:
    """A snapshot of one open checkout: who holds which connection, since when, from where."""

    checkout_id: int
    integration: str
    pool: str | None
    backend_pid: int | None
    application_name: str | None
    service: str | None
    callsite: CallSite
    age: float
    idle: float | None
    transaction_status: str | None
    holder: str
    holder_kind: str
    holder_alive: bool
    started_at: float
    trace_id: str | None
    span_id: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict; the call-site is flattened to ``file``, ``line``, ``function``."""
        out = dataclasses.asdict(self)
        out["callsite"] = {
            "file": self.callsite.file,
            "line": self.callsite.line,
            "function": self.callsite.function,
        }
        return out


@dataclasses.dataclass(frozen=True)
class LeakEvent(CheckoutInfo):
    """A leaked (or suspected leaked) connection, with the stacks that explain it."""

    kind: str
    severity: str
    #: Acquisition stack, most recent call first: dicts with file, line, function, code.
    stack: list[dict[str, object]]
    #: What the holder is doing now (live thread or pending task), most recent call first.
    holder_stack: list[dict[str, object]] | None
    #: Extra context (e.g. ``scope`` for scope_ended, the pg_stat_activity row).
    details: dict[str, Any]
    detected_at: float

    def as_dict(self) -> dict[str, Any]:
        out = super().as_dict()
        out["event"] = "leak"
        return out

    def render(self) -> str:
        """The human report: kind, call-site, facts, acquisition stack, holder's stack."""
        alive = "" if self.holder_alive else " (ended)"
        facts = [
            f"service={self.service or '-'}",
            f"integration={self.integration}",
            f"pool={self.pool or '-'}",
            f"backend_pid={self.backend_pid if self.backend_pid is not None else '-'}",
            f"application_name={self.application_name or '-'}",
        ]
        state = [
            f"age={_secs(self.age)}",
            f"idle={_secs(self.idle) if self.idle is not None else '-'}",
            f"transaction={self.transaction_status or '-'}",
            f"holder={self.holder_kind} {self.holder!r}{alive}",
        ]
        lines = [
            f"pgleakguard: connection leak [{self.kind}, {self.severity}] "
            f"checked out at {self.callsite}",
            f"  {_EXPLAIN.get(self.kind, self.kind)}",
            "  " + " ".join(facts),
            "  " + " ".join(state),
        ]
        lines.extend(_detail(key, value) for key, value in sorted(self.details.items()))
        if self.trace_id:
            lines.append(f"  trace_id={self.trace_id} span_id={self.span_id}")
        if self.stack:
            lines.append("  Acquired at (most recent call last):")
            lines.append(render_frames(self.stack))
        if self.holder_stack:
            lines.append("  Holder is now at (most recent call last):")
            lines.append(render_frames(self.holder_stack))
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ReturnedEvent:
    """A checkout reported as a leak has finally been returned (as HikariCP reports it)."""

    checkout_id: int
    kinds: tuple[str, ...]
    integration: str
    pool: str | None
    backend_pid: int | None
    service: str | None
    callsite: CallSite
    held_for: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = dataclasses.asdict(self)
        out["kinds"] = list(self.kinds)
        out["event"] = "returned"
        return out

    def render(self) -> str:
        """One line: which reported checkout came back, after how long."""
        return (
            f"pgleakguard: previously reported connection returned after {_secs(self.held_for)} "
            f"(was {', '.join(self.kinds)}) checked out at {self.callsite} "
            f"backend_pid={self.backend_pid if self.backend_pid is not None else '-'}"
        )


Event = Union[LeakEvent, ReturnedEvent]
# A Union takes a docstring of its own, so help(pgleakguard.Event) says what it is.
Event.__doc__ = """What pgleakguard delivers to ``on_leak`` and its sinks: a :class:`LeakEvent`
(a connection leaked, or is suspected to) or a :class:`ReturnedEvent` (a reported checkout was
finally returned). Tell them apart with ``isinstance``; both have ``as_dict()`` and
``render()``."""


def _detail(key: str, value: Any) -> str:
    # A dict (the pg_stat_activity row) on one line: "key: a=1 b='two words'".
    if isinstance(value, dict):
        shown = (
            f"{k}={v!r}" if isinstance(v, str) and " " in v else f"{k}={v}"
            for k, v in value.items()
        )
        return f"  {key}: " + " ".join(shown)
    return f"  {key}={value}"


def _secs(value: float) -> str:
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 120:
        return f"{value:.1f}s"
    return f"{value / 60:.1f}min"


def now_wall() -> float:
    """Wall-clock time used in events (seconds since the epoch)."""
    return time.time()
