"""Checkouts, the registry of open ones, and the tracker that integrations call.

Integrations call :meth:`Tracker.begin` when application code takes a connection and
:meth:`Tracker.end` when it gives it back. Everything else (owner, stack, age, leaks) is
derived here, so integration modules stay thin glue.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading
import weakref
from collections import deque
from collections.abc import Sequence
from contextlib import suppress
from functools import partial
from time import monotonic, time
from typing import Any, Callable, Optional

from . import callsite as _callsite
from . import tagging as _tagging
from ._safety import guard, logger, record_internal_error
from .callsite import Stack
from .config import Config
from .events import (
    GARBAGE_COLLECTED,
    NEVER_CLOSED,
    CheckoutInfo,
    Event,
    LeakEvent,
    ReturnedEvent,
    severity_of,
)

# libpq's PGTransactionStatusType, shared by psycopg and the watchdog.
TX_IDLE, TX_ACTIVE, TX_INTRANS, TX_INERROR, TX_UNKNOWN = range(5)
TX_NAMES = ("IDLE", "ACTIVE", "INTRANS", "INERROR", "UNKNOWN")

#: Attribute set on a DBAPI connection while a checkout holds it (the only thing we add).
CHECKOUT_ATTR = "_pgleakguard_checkout"

_get_running_loop = asyncio.events._get_running_loop
_current_task = asyncio.current_task
_current_thread = threading.current_thread
_weakref = weakref.ref
# Per thread: (weakref to the Thread, its name), made at the thread's first checkout.
_thread_owner = threading.local()
_capture = _callsite.capture
_main_thread = threading.main_thread()


_Finding = tuple[str, "Checkout", Optional[dict[str, Any]]]

# Before Python 3.12, asyncio.wait_for runs its awaitable in a task of its own, which ends
# the moment it hands the connection over: the holder is the task awaiting wait_for.
_release_waiter = getattr(asyncio.tasks, "_release_waiter", None)
if sys.version_info >= (3, 12):
    _release_waiter = None


def _wait_for_caller(task: Any) -> Any:
    """``task``, or the task awaiting it if ``task`` is one that ``asyncio.wait_for`` made
    (Python < 3.12): wait_for's done callback releases a future that the caller awaits."""
    for callback, _ in getattr(task, "_callbacks", None) or ():
        if type(callback) is partial and callback.func is _release_waiter:
            for wakeup, _ in getattr(callback.args[0], "_callbacks", None) or ():
                caller = getattr(wakeup, "__self__", None)
                # (a task: C or pure-Python, which the C Task class does not cover)
                if hasattr(caller, "get_coro") and hasattr(caller, "done"):
                    return _wait_for_caller(caller)  # wait_for inside wait_for
    return task


class Checkout:
    """One period during which application code holds a database connection.

    Holds no strong reference to the connection, its owner or any frame.
    """

    __slots__ = (
        "id",
        "connection_id",
        "integration",
        "pool",
        "pool_id",
        "backend_pid",
        "application_name",
        "service",
        "stack",
        "started",
        "owner",
        "owner_is_task",
        "owner_name",
        "last_activity",
        "tx_status",
        "trace_id",
        "span_id",
        "reported",
        "closed",
        "parked",
        "watch_transaction",
        "conn_ref",
        "details",
        "span",
    )

    id: int
    connection_id: int
    integration: str
    pool: str | None
    #: id() of the pool object, where the integration knows it (two pools may share a name).
    pool_id: int | None
    backend_pid: int | None
    application_name: str | None
    service: str | None
    stack: Stack
    started: float
    owner: weakref.ref[Any] | None
    owner_is_task: bool
    owner_name: str
    last_activity: float
    tx_status: int | None
    trace_id: str | None
    span_id: str | None
    reported: tuple[str, ...]
    closed: bool
    #: Kept open for reuse by a framework (a persistent Django connection between
    #: requests): no application code holds it, so only owner_exited applies.
    parked: bool
    #: Parked, but a transaction left idle on it is still reported (idle_in_transaction):
    #: its age is no leak, an idle transaction is (Django's main-thread connection in a
    #: management command or a task).
    watch_transaction: bool
    conn_ref: _ConnRef | None
    details: dict[str, Any] | None
    span: Any  # OpenTelemetry's per-checkout state (pgleakguard.otel.CheckoutTelemetry)

    def owner_object(self) -> Any:
        """The owning Thread or Task if it still exists."""
        return self.owner() if self.owner is not None else None

    def owner_alive(self) -> bool:
        """False once the owning thread has ended or the owning task is done."""
        owner = self.owner_object()
        if owner is None:
            return False
        if self.owner_is_task:
            return not owner.done()
        # The main thread is marked stopped before atexit handlers run: its end is the
        # process's end, reported as never_closed, not owner_exited.
        return owner is _main_thread or bool(owner.is_alive())

    def info(self, now: float) -> dict[str, Any]:
        """The fields of :class:`CheckoutInfo` for this checkout at monotonic time ``now``."""
        tx = self.tx_status
        return {
            "checkout_id": self.id,
            "integration": self.integration,
            "pool": self.pool,
            "backend_pid": self.backend_pid,
            "application_name": self.application_name,
            "service": self.service,
            "callsite": _callsite.callsite_of(self.stack),
            "age": max(0.0, now - self.started),
            "idle": max(0.0, now - self.last_activity),
            "transaction_status": TX_NAMES[tx] if tx is not None and 0 <= tx < 5 else None,
            "holder": self.owner_name,
            "holder_kind": "task" if self.owner_is_task else "thread",
            "holder_alive": self.owner_alive(),
            "started_at": time() - (now - self.started),
            "trace_id": self.trace_id,
            "span_id": self.span_id,
        }

    def holder_frames(self, depth: int) -> _callsite.Stack | None:
        """What the holder is running now: a live thread's frames or a pending task's."""
        owner = self.owner_object()
        if owner is None:
            return None
        if self.owner_is_task:
            if owner.done():
                return None
            chain = _callsite.task_frames(owner)[-depth:]
            flat: list[Any] = []
            for frame in reversed(chain):  # innermost await first, like a live thread's stack
                flat += (frame.f_code, frame.f_lasti)
            return tuple(flat)
        if not owner.is_alive() or owner.ident is None:
            return None
        live = sys._current_frames().get(owner.ident)
        if owner is _current_thread():  # reported from the holder's own thread (scope_ended):
            live = _callsite.outside_pgleakguard(live)  # the reporting is not its work
        return _callsite.frames_from_live(live, depth)


class _ConnRef(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to a connection that knows its checkout, for the GC callback."""

    __slots__ = ("checkout",)
    checkout: Checkout


class Registry:
    """The open checkouts: O(1) add/remove, no strong refs to user objects.

    Each operation is one dict operation, atomic under the GIL (and per-object locked on
    free-threaded builds), so the hot path takes no lock of ours.
    """

    def __init__(self) -> None:
        self._open: dict[int, Checkout] = {}

    def add(self, checkout: Checkout) -> None:
        self._open[checkout.id] = checkout

    def remove(self, checkout: Checkout) -> bool:
        """Remove ``checkout``; False if it was not there (already removed)."""
        return self._open.pop(checkout.id, None) is not None

    def snapshot(self) -> list[Checkout]:
        return list(self._open.copy().values())

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, checkout: object) -> bool:
        return isinstance(checkout, Checkout) and self._open.get(checkout.id) is checkout


class Tracker:
    """The core: turns begin/end calls from integrations into checkouts and events."""

    def __init__(self, config: Config, dispatch: Callable[[Event], None]) -> None:
        self.config = config
        self.registry = Registry()
        self._dispatch = dispatch
        self._ids = itertools.count(1)
        # (kind, checkout, details) found outside the watchdog thread, e.g. by a GC callback,
        # where rendering or logging is unsafe; the watchdog (or flush()) turns them into events.
        # A ReturnedEvent is made when the checkout ends (a resumed one changes).
        self._pending: deque[_Finding | ReturnedEvent] = deque()
        #: Queues an event for the delivery thread (set by install(); see hand_over()).
        self.enqueue: Callable[[Event], None] | None = None
        self._depth = config.stack_depth if config.capture_stack else 1
        self._on_begin: Callable[[], None] | None = None
        self._watching = False
        self._service = config.service or _tagging.default_service()
        #: The OpenTelemetry layer (pgleakguard.otel.Telemetry), when enabled.
        self.telemetry: Any = None
        #: Leak events delivered so far, by kind.
        self.leak_counts: dict[str, int] = {}
        self._max_open = config.max_open_checkouts
        #: Checkouts not tracked because max_open_checkouts were open.
        self.untracked = 0
        #: Recent checkouts whose connection was garbage collected: a pool never gets
        #: those back, so its timeout message names them too.
        self.collected: deque[Checkout] = deque(maxlen=1000)
        #: Physical connections opened through a hooked library and still alive, by backend
        #: pid (pool-owned ones included): what this process can account for on the server.
        self.connections: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()

    # -- hot path -------------------------------------------------------------------------

    def begin(
        self,
        conn: Any,
        integration: str,
        pool: str | None = None,
        backend_pid: int | None = None,
        application_name: str | None = None,
        connection_id: int | None = None,
        skip: int = 1,
        pool_id: int | None = None,
    ) -> Checkout | None:
        """Start a checkout of ``conn`` by the calling code. ``skip`` frames are ours.

        Returns ``None`` (not tracked) once ``max_open_checkouts`` are open.
        """
        open_ = self.registry._open
        if len(open_) >= self._max_open:
            self._overflowed()
            return None
        rec = Checkout()
        rec.id = checkout_id = next(self._ids)
        task: Any = _current_task() if _get_running_loop() is not None else None
        awaiting = None
        if task is not None and _release_waiter is not None:
            holder = _wait_for_caller(task)
            if holder is not task:  # the stack goes on in the caller's coroutines
                task = awaiting = holder
        rec.stack = _capture(self._depth, skip + 1, awaiting)
        rec.connection_id = id(conn) if connection_id is None else connection_id
        rec.integration = integration
        rec.pool = pool
        rec.pool_id = pool_id
        rec.backend_pid = backend_pid
        rec.application_name = application_name
        rec.service = self._service
        rec.started = rec.last_activity = monotonic()
        if task is None:
            try:
                rec.owner, rec.owner_name = _thread_owner.value
            except AttributeError:  # this thread's first checkout
                thread = _current_thread()
                _thread_owner.value = (_weakref(thread), thread.name)
                rec.owner, rec.owner_name = _thread_owner.value
            rec.owner_is_task = False
        else:
            rec.owner_is_task = True
            rec.owner_name = task.get_name()
            rec.owner = _weakref(task)
        rec.tx_status = rec.trace_id = rec.span_id = rec.details = rec.span = None
        rec.reported = ()
        rec.closed = False
        rec.parked = rec.watch_transaction = False
        ref = rec.conn_ref = _ConnRef(conn, self._collected)
        ref.checkout = rec
        open_[checkout_id] = rec  # a single dict store: atomic, no lock needed
        if not self._watching:
            self._start_watching()
        telemetry = self.telemetry
        # An unpooled connection is named from the connection, in this thread (no hot path).
        if telemetry is not None and (telemetry.traces_on or pool is None):
            try:
                telemetry.checked_out(rec)
            except Exception as exc:
                record_internal_error(exc)
        return rec

    def mark(self) -> int:
        """A dividing id: checkouts begun before this call have smaller ids, those begun
        after it larger ones (the pytest plugin's per-test window)."""
        return next(self._ids)

    def connected(self, backend_pid: int | None, connection: Any) -> None:
        """A physical connection to ``backend_pid`` was opened (not a hot path)."""
        # An object that takes no weak reference is not accounted for (TypeError).
        if backend_pid:
            with suppress(TypeError):
                self.connections[backend_pid] = connection

    def _start_watching(self) -> None:
        # The first checkout starts the watchdog (again after a fork or a stop).
        self._watching = True
        if self._on_begin is not None:
            self._on_begin()

    def _overflowed(self) -> None:
        self.untracked += 1
        if self.untracked == 1:
            logger.warning(
                "pgleakguard: %d checkouts are open; new ones are not tracked until some are "
                "returned (raise max_open_checkouts if this is expected); stats() counts them",
                self._max_open,
            )

    def end(self, rec: Checkout) -> None:
        """The checkout is over: the connection was returned or closed.

        A pool may return a connection from its own GC callback (SQLAlchemy does); if the
        object we watch is already dead, that return is a garbage_collected leak.
        """
        ref = rec.conn_ref
        if ref is not None and ref() is None:
            self._collected(ref)
            return
        rec.closed = True
        rec.conn_ref = None
        if self.registry._open.pop(rec.id, None) is not None and rec.reported:
            self._pending.append(self._returned_event(rec))
        self._checked_in(rec)

    def _checked_in(self, rec: Checkout) -> None:
        # OpenTelemetry: the use time, and the end of the checkout span.
        telemetry = self.telemetry
        if telemetry is not None and (telemetry.metrics_on or rec.span is not None):
            try:
                telemetry.checked_in(rec, monotonic() - rec.started)
            except Exception as exc:
                record_internal_error(exc)

    def park(self, rec: Checkout, watch_transaction: bool = False) -> None:
        """A framework takes the connection back and keeps it open for reuse (Django's
        persistent connection between requests). No application code holds it now, so
        only owner_exited is reported until :meth:`resume` (and idle_in_transaction, with
        ``watch_transaction``); a reported checkout is over (a ReturnedEvent says after
        how long). Parking a parked checkout again sets ``watch_transaction`` only."""
        if rec.closed:
            return
        rec.watch_transaction = watch_transaction
        if rec.parked:
            return
        self._checked_in(rec)  # the request's use of it is over
        rec.parked = True
        if rec.reported:
            self._pending.append(self._returned_event(rec))

    def resume(self, rec: Checkout, skip: int = 1) -> None:
        """Application code takes a parked connection again: a new checkout of it, with a
        new id, call-site and age. ``skip`` frames are ours."""
        if not rec.parked or rec.closed:
            return
        self.registry.remove(rec)
        rec.id = next(self._ids)
        rec.stack = _callsite.capture(self._depth, skip + 1)
        rec.started = rec.last_activity = monotonic()
        rec.reported = ()
        rec.parked = False
        self.registry.add(rec)
        telemetry = self.telemetry
        if telemetry is not None:
            try:
                telemetry.checked_out(rec)
            except Exception as exc:
                record_internal_error(exc)

    # -- reporting ------------------------------------------------------------------------

    def _collected(self, ref: _ConnRef) -> None:
        # Runs inside the garbage collector, in whatever thread: no locks held long, no I/O.
        with guard():
            rec = ref.checkout
            if not rec.closed:
                rec.closed = True
                self.registry.remove(rec)
                if rec.pool is None and rec.tx_status == TX_UNKNOWN:
                    return  # a broken raw connection: it held no server slot, no pool slot
                self.collected.append(rec)
                self._pending.append((GARBAGE_COLLECTED, rec, None))

    def report(self, rec: Checkout, kind: str, details: dict[str, Any] | None = None) -> bool:
        """Queue a leak report for ``rec`` unless ``kind`` was already reported for it."""
        if kind in rec.reported:
            return False
        rec.reported += (kind,)
        self._pending.append((kind, rec, details))
        return True

    def report_now(self, rec: Checkout, event: LeakEvent) -> bool:
        """Deliver ``event``, a leak of ``rec`` found outside the watchdog (the pytest
        plugin's end-of-test check), to the sinks now, in the calling thread; unless its kind
        was already reported for ``rec``."""
        if event.kind in rec.reported:
            return False
        rec.reported += (event.kind,)
        self.leak_counts[event.kind] = self.leak_counts.get(event.kind, 0) + 1
        with guard():
            self._dispatch(event)
        return True

    def flush(self, deliver: Callable[[Event], None] | None = None) -> None:
        """Turn queued findings into events and hand them, in order, to ``deliver``
        (default: straight to the sinks, in the calling thread)."""
        deliver = deliver or self._dispatch
        events: list[Event] = []
        while True:
            try:
                item = self._pending.popleft()
            except IndexError:
                break
            with guard():
                if isinstance(item, ReturnedEvent):
                    events.append(item)
                else:
                    kind, rec, details = item
                    if kind not in rec.reported:
                        rec.reported += (kind,)
                    events.append(self.leak_event(rec, kind, details))
                    self.leak_counts[kind] = self.leak_counts.get(kind, 0) + 1
        for event in events:
            with guard():
                deliver(event)

    def hand_over(self) -> None:
        """Turn queued findings into events here and now (a holder's stack is where the
        holder is now), and queue them for the delivery thread: the calling thread (a
        request ending) never waits for a sink."""
        self.flush(self.enqueue)

    def leak_event(
        self, rec: Checkout, kind: str, details: dict[str, Any] | None = None
    ) -> LeakEvent:
        """Build the full report for ``rec`` (renders stacks: not for hot paths)."""
        depth = self.config.stack_depth
        # A collected connection has no holder any more; at exit, the holder is the exit.
        gone = kind in (GARBAGE_COLLECTED, NEVER_CLOSED)
        holder = None if gone else rec.holder_frames(depth)
        return LeakEvent(
            **rec.info(monotonic()),
            kind=kind,
            severity=severity_of(kind),
            stack=_callsite.frames_of(rec.stack),
            holder_stack=_callsite.frames_of(holder, app_only=False) if holder else None,
            details=dict(details or {}),
            detected_at=time(),
        )

    def _returned_event(self, rec: Checkout) -> ReturnedEvent:
        return ReturnedEvent(
            checkout_id=rec.id,
            kinds=rec.reported,
            integration=rec.integration,
            pool=rec.pool,
            backend_pid=rec.backend_pid,
            service=rec.service,
            callsite=_callsite.callsite_of(rec.stack),
            held_for=monotonic() - rec.started,
        )

    def open_checkouts(self) -> list[CheckoutInfo]:
        """Snapshots of every open checkout, oldest first."""
        now = monotonic()
        recs = sorted(self.registry.snapshot(), key=lambda r: r.started)
        return [CheckoutInfo(**r.info(now)) for r in recs]

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's checkouts are not ours (marked closed, so an
        integration that finds one on a connection tracks that connection afresh)."""
        for rec in self.registry.snapshot():
            rec.closed = True
        self.registry = Registry()
        self._pending.clear()
        self.connections = weakref.WeakValueDictionary()
        self._watching = False
        # The child starts counting afresh: its stats() and pool timeouts are its own.
        self.collected.clear()
        self.leak_counts = {}
        self.untracked = 0


def describe_holders(
    checkouts: list[Checkout], pool: str | None = None, collected: Sequence[Checkout] = ()
) -> str:
    """The culprit list a pool timeout should have printed: holders grouped by call-site.

    ``collected`` are checkouts whose connection was garbage collected unreturned: the pool
    lost those slots for good.
    """
    where = f" of pool {pool!r}" if pool else ""
    if not checkouts and not collected:
        return f"pgleakguard: no connection{where} is checked out by tracked code"
    lines = []
    if checkouts:
        lines.append(
            f"pgleakguard: {len(checkouts)} connection(s){where} checked out, by call-site:"
        )
        lines.extend(_grouped(checkouts))
    if collected:
        lines.append(
            f"pgleakguard: {len(collected)} connection(s){where} were garbage collected "
            "without being returned (their slots are lost), taken at:"
        )
        lines.extend(_grouped(collected))
    return "\n".join(lines)


def _grouped(checkouts: Sequence[Checkout]) -> list[str]:
    now = monotonic()
    groups: dict[str, list[Checkout]] = {}
    for rec in checkouts:
        groups.setdefault(str(_callsite.callsite_of(rec.stack)), []).append(rec)
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), min(r.started for r in kv[1])))
    lines = []
    for site, recs in ranked:
        oldest = now - min(r.started for r in recs)
        holders = sorted({r.owner_name for r in recs})
        shown = ", ".join(holders[:3])
        if len(holders) > 3:
            shown += f" and {len(holders) - 3} more"
        lines.append(f"  {len(recs)} x {site} (oldest {oldest:.1f}s; held by {shown})")
    return lines
