"""Process-wide state: install(), uninstall(), and what survives fork and exit."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from time import monotonic
from typing import Any

from . import _safety, callsite
from .config import Config
from .events import NEVER_CLOSED, SUSPECTED_KINDS, CheckoutInfo, Event
from .integrations import Integration, enable
from .sinks import Delivery, Dispatcher, sinks_for
from .tracker import Tracker
from .watchdog import Watchdog

logger = logging.getLogger("pgleakguard")

#: Seconds uninstall() and the interpreter's exit wait, in all, for the last events to
#: reach the sinks and the on_leak callback.
SHUTDOWN_TIMEOUT = 2.0


class Installed:
    """What one install() set up."""

    def __init__(self, config: Config) -> None:
        self.config = config
        #: pgleakguard's own sinks (logging, JSON lines, OpenTelemetry): quick, never stuck.
        self.dispatcher = Dispatcher(sinks_for(config))
        #: The user's on_leak callback, on a thread of its own: however slow it is, the
        #: sinks above still get every event.
        self.callbacks = Dispatcher([config.on_leak] if config.on_leak else [])
        self.callback_delivery = Delivery(
            self.callbacks, "pgleakguard-on-leak", "the on_leak callback"
        )
        self.delivery = Delivery(self._deliver, "pgleakguard-sinks", "pgleakguard's sinks")
        self.tracker = Tracker(config, self._deliver_now)
        #: The exit report ran (it may be registered twice: see otel._report_before_sdk_shutdown).
        self.exited = False
        self.tracker.enqueue = self.delivery.put
        self.watchdog = Watchdog(self.tracker, self.delivery.put)
        self.tracker._on_begin = self.watchdog.ensure_started
        if config.otel:
            self.watchdog.tick = self.otel_tick
            # An SDK is configured through the opentelemetry package: while nobody has
            # imported it there is none, and importing it (15 ms) can wait.
            if config.meter_provider or config.tracer_provider or "opentelemetry" in sys.modules:
                self.attach_telemetry()
        if config.activity_dsn:
            from .server import ActivityLookup

            self.delivery.enrich = ActivityLookup(
                config.activity_dsn, config.max_sql_length, config.redact_sql
            )
        self.integrations: list[Integration] = []

    def _deliver(self, event: Event) -> None:
        # On the pgleakguard-sinks thread: our sinks, then the callback's own queue.
        self.dispatcher(event)
        if self.callbacks.sinks:
            self.callback_delivery.put(event)

    def _deliver_now(self, event: Event) -> None:
        # In the calling thread (the pytest plugin's end-of-test reports): every sink.
        self.dispatcher(event)
        self.callbacks(event)

    def drain(self, timeout: float) -> bool:
        """Wait until every queued event reached every sink; False on timeout."""
        deadline = monotonic() + timeout
        return self.delivery.drain(timeout) and self.callback_delivery.drain(
            max(0.0, deadline - monotonic())
        )

    def shut_down(self, at_exit: bool = False, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Stop the watchdog, hand what it found (and at exit, the checkouts never closed)
        to the delivery threads and give them up to ``timeout`` seconds in all: a stuck
        sink or callback never holds the caller (the interpreter's exit) longer. What is
        left undelivered is counted as dropped."""
        deadline = monotonic() + timeout
        self.watchdog.stop(timeout)
        if at_exit:
            for rec in self.tracker.registry.snapshot():
                if (
                    not rec.closed
                    and not rec.parked
                    and all(kind in SUSPECTED_KINDS for kind in rec.reported)
                ):
                    self.tracker.report(rec, NEVER_CLOSED)
        self.tracker.flush(self.delivery.put)
        dropped = self.callback_delivery.dropped
        ours = self.delivery.stop(max(0.0, deadline - monotonic()))
        theirs = self.callback_delivery.stop(max(0.0, deadline - monotonic()))
        if ours and not theirs:  # (if our own sinks are stuck, so may the logging be)
            logger.warning(
                "pgleakguard: gave up waiting for the on_leak callback after %.0fs; "
                "%d event(s) not delivered to it",
                timeout,
                self.callback_delivery.dropped - dropped,
            )

    def attach_telemetry(self) -> None:
        """Record OpenTelemetry metrics and leak spans (from when a provider is configured)."""
        from .otel import Telemetry

        config = self.config
        telemetry = Telemetry(
            config.meter_provider,
            config.tracer_provider,
            config.otel_checkout_spans,
            self.tracker,
        )
        self.tracker.telemetry = telemetry
        self.dispatcher.sinks.append(telemetry)

    def otel_tick(self) -> None:
        """Before each watchdog scan: notice an SDK configured since install()."""
        telemetry = self.tracker.telemetry
        if telemetry is None:
            if "opentelemetry" in sys.modules:
                self.attach_telemetry()
        elif not (telemetry.metrics_on and telemetry.traces_on):
            telemetry.refresh()


_lock = threading.RLock()
_state: Installed | None = None


def current() -> Installed | None:
    """The active installation, if any."""
    return _state


def install(**options: Any) -> Config:
    """Start finding connection leaks in this process.

    Options (all optional; see :class:`~pgleakguard.Config`; each but the objects can also
    come from ``PGLEAKGUARD_<OPTION>``): service, leak_threshold,
    idle_in_transaction_threshold, capture_stack, stack_depth, on_leak, integrations,
    log_level, ignore_modules, tag_application_name, jsonl_path, sql_comments,
    retag_on_checkout, max_open_checkouts, otel, otel_checkout_spans, meter_provider,
    tracer_provider, max_sql_length, redact_sql, activity_dsn.
    Calling it again with the same options does nothing; with other options it re-installs
    (the checkouts open then are forgotten).
    """
    global _state
    config = Config.load(**options)
    with _lock:
        if _state is not None:
            if _state.config == config:
                return config
            _uninstall_locked()
        state = Installed(config)
        callsite.set_ignored_modules(config.ignore_modules)
        state.integrations = enable(config.integrations, state.tracker)
        _state = state
    logger.debug(
        "pgleakguard installed: %s", ", ".join(i.identifier for i in state.integrations) or "-"
    )
    return config


def uninstall() -> None:
    """Remove every hook and stop the watchdog. Open checkouts are forgotten; events found
    so far are delivered (waiting at most ``SHUTDOWN_TIMEOUT`` seconds for the sinks)."""
    with _lock:
        _uninstall_locked()


def _uninstall_locked() -> None:
    global _state
    state, _state = _state, None
    if state is None:
        return
    for integration in reversed(state.integrations):
        with _safety.guard():
            integration.teardown()
    with _safety.guard():
        state.shut_down()


def enable_integrations(names: tuple[str, ...]) -> list[str]:
    """Enable more integrations on the current installation (those not enabled yet, with
    their companions); the identifiers enabled now. The pytest plugin calls it for a library
    the test session imports after pgleakguard was installed."""
    with _lock:
        state = _state
        if state is None:
            raise RuntimeError("pgleakguard is not installed: call pgleakguard.install() first")
        have = tuple(i.identifier for i in state.integrations)
        added = enable(names, state.tracker, enabled_already=have)
        state.integrations.extend(added)
    return [i.identifier for i in added]


def instrument_engine(engine: Any) -> None:
    """Track one SQLAlchemy Engine or AsyncEngine when the sqlalchemy integration is not
    enabled (``install(integrations=[...])`` without it). With it enabled, ``install()``
    already tracks every PostgreSQL engine, existing or future, and this adds nothing.
    Idempotent; undone by uninstall()."""
    from .integrations.sqlalchemy import SQLAlchemyIntegration

    with _lock:
        state = _state
        if state is None:
            raise RuntimeError("pgleakguard is not installed: call pgleakguard.install() first")
        integration = next(
            (i for i in state.integrations if isinstance(i, SQLAlchemyIntegration)), None
        )
        if integration is None:
            integration = SQLAlchemyIntegration(state.tracker)
            state.integrations.append(integration)
        integration.setup_engine(engine)


def open_checkouts() -> list[CheckoutInfo]:
    """What application code holds right now, oldest first (empty when not installed)."""
    state = _state
    return state.tracker.open_checkouts() if state is not None else []


def check() -> None:
    """Run one watchdog scan now and deliver every pending event (tests, shutdown hooks)."""
    state = _state
    if state is not None:
        with _safety.guard():
            state.watchdog.scan()
            state.tracker.flush(state.delivery.put)
            state.drain(timeout=10.0)


def stats() -> dict[str, Any]:
    """Counters: whether installed, internal errors swallowed, operational errors (a server
    that refused the activity_dsn lookup...), open checkouts, leaks reported by kind,
    watchdog scans, checkouts not tracked (max_open_checkouts), events dropped."""
    state = _state
    return {
        "installed": state is not None,
        "internal_errors": _safety.internal_error_count(),
        "operational_errors": _safety.operational_error_count(),
        "open_checkouts": len(state.tracker.registry) if state is not None else 0,
        "leaks": dict(state.tracker.leak_counts) if state is not None else {},
        "watchdog_scans": state.watchdog.scans if state is not None else 0,
        "untracked_checkouts": state.tracker.untracked if state is not None else 0,
        "dropped_events": (
            state.delivery.dropped + state.callback_delivery.dropped if state is not None else 0
        ),
    }


def _after_fork_in_child() -> None:
    global _lock
    # Another thread may have held these locks at fork: in the child nobody ever releases them.
    _lock = threading.RLock()
    _safety.reset_after_fork()
    state = _state
    if state is not None:
        with _safety.guard():
            state.tracker.reset_after_fork()
            state.watchdog.reset_after_fork()
            state.delivery.reset_after_fork()
            state.callback_delivery.reset_after_fork()


def _at_exit() -> None:
    state = _state
    if state is None or state.exited:
        return
    state.exited = True
    with _safety.guard():
        state.shut_down(at_exit=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
