"""Process-wide state: install(), uninstall(), and what survives fork and exit."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import Any

from . import _safety, callsite
from .config import Config
from .events import NEVER_CLOSED, SUSPECTED_KINDS, CheckoutInfo
from .integrations import Integration, enable
from .sinks import Delivery, Dispatcher, sinks_for
from .tracker import Tracker
from .watchdog import Watchdog

logger = logging.getLogger("pgleakguard")


class Installed:
    """What one install() set up."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.dispatcher = Dispatcher(sinks_for(config))
        self.tracker = Tracker(config, self.dispatcher)
        self.delivery = Delivery(self.dispatcher)
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

    Options (all optional; each can also come from ``PGLEAKGUARD_<OPTION>``): service,
    leak_threshold, idle_in_transaction_threshold, capture_stack, stack_depth, on_leak,
    integrations, log_level, ignore_modules, tag_application_name, jsonl_path, sql_comments,
    retag_on_checkout, activity_dsn.
    Calling it again with the same options does nothing; with other options it re-installs.
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
    """Remove every hook and stop the watchdog. Open checkouts are forgotten."""
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
    state.watchdog.stop()
    state.delivery.stop(timeout=2.0)
    state.tracker.flush()


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
    """Track one SQLAlchemy Engine or AsyncEngine created before install() or with the
    sqlalchemy integration not enabled. Idempotent; undone by uninstall()."""
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
        state.watchdog.scan()
        state.tracker.flush(state.delivery.put)
        state.delivery.drain(timeout=10.0)


def stats() -> dict[str, Any]:
    """Counters: internal errors swallowed, open checkouts, leaks reported by kind."""
    state = _state
    return {
        "installed": state is not None,
        "internal_errors": _safety.internal_error_count(),
        "open_checkouts": len(state.tracker.registry) if state is not None else 0,
        "leaks": dict(state.tracker.leak_counts) if state is not None else {},
        "watchdog_scans": state.watchdog.scans if state is not None else 0,
        "untracked_checkouts": state.tracker.untracked if state is not None else 0,
        "dropped_events": state.delivery.dropped if state is not None else 0,
    }


def _after_fork_in_child() -> None:
    state = _state
    if state is not None:
        state.tracker.reset_after_fork()
        state.watchdog.reset_after_fork()
        state.delivery.reset_after_fork()


def _at_exit() -> None:
    state = _state
    if state is None:
        return
    with _safety.guard():
        state.watchdog.stop()
        state.delivery.stop(timeout=2.0)
        for rec in state.tracker.registry.snapshot():
            if (
                not rec.closed
                and not rec.parked
                and all(kind in SUSPECTED_KINDS for kind in rec.reported)
            ):
                state.tracker.report(rec, NEVER_CLOSED)
        state.tracker.flush()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
