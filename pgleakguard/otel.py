"""OpenTelemetry: pool metrics per the database semantic conventions and a span per leak.

Only ``opentelemetry-api`` is used. Until an SDK provider is configured (globally, or
passed as ``meter_provider`` / ``tracer_provider``) nothing is recorded; the watchdog
notices a provider configured later.

Pool names (``db.client.connection.pool.name``): a pool's own name (psycopg_pool's
``name``, SQLAlchemy's engine name); a Django connection without the native pool is named
after its alias (``default``); a raw psycopg connection after its server, as the convention
asks of unnamed pools: ``host:port/dbname`` (the host is the socket directory on a Unix
socket).
"""

from __future__ import annotations

import atexit
import logging
import weakref
from collections import OrderedDict
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from ._safety import record_internal_error
from ._version import __version__
from .events import GARBAGE_COLLECTED, LEAK_KINDS, NEVER_CLOSED, Event, LeakEvent, severity_of
from .tracker import Checkout

if TYPE_CHECKING:
    from .tracker import Tracker

logger = logging.getLogger("pgleakguard")

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
#: The pool name of a checkout begun before OpenTelemetry was attached (no name was read).
UNNAMED = "unnamed"
#: How many ended, already reported checkouts are remembered for their leak spans.
ENDED_KEPT = 1000

#: Histogram buckets (seconds) for connection create and wait times: the semantic
#: conventions' advice for database client durations (db.client.operation.duration; the
#: connection-pool histograms come with none). The SDK's default buckets are meant for
#: milliseconds and would put every wait under 5 s in one bucket.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
#: Use time also reaches into minutes, where held_too_long reports begin.
USE_TIME_BUCKETS = (*DURATION_BUCKETS, 30.0, 60.0, 300.0)

#: Leaks after which the connection can never be returned.
FINAL_KINDS = (GARBAGE_COLLECTED, NEVER_CLOSED)

#: Pool facts an integration can read without I/O: idle, max, idle_max, idle_min, pending.
PoolStats = Callable[[Any], "dict[str, int]"]
_Callback = Callable[[CallbackOptions], "list[Observation]"]


def _configured(provider: Any) -> bool:
    # The API hands out proxy / no-op providers until an SDK provider is set.
    return type(provider).__name__ not in (
        "_ProxyMeterProvider",
        "NoOpMeterProvider",
        "ProxyTracerProvider",
        "NoOpTracerProvider",
    )


class CheckoutTelemetry:
    """What OpenTelemetry keeps per checkout (in ``Checkout.span``): the pool name of an
    unpooled connection, the span active at checkout, and the optional checkout span."""

    __slots__ = ("name", "parent", "checkout_span")

    def __init__(self, name: str | None, parent: SpanContext | None, checkout_span: Any) -> None:
        self.name = name
        self.parent = parent
        self.checkout_span = checkout_span


def unpooled_name(conn: Any) -> str:
    """The pool name of a connection no pool owns (read in the connecting thread: psycopg's
    ``info`` reads libpq's own fields, no I/O, but is not safe from another thread)."""
    alias = getattr(conn, "alias", None)  # a Django DatabaseWrapper
    if isinstance(alias, str):
        return alias
    info = getattr(conn, "info", None)  # psycopg 3
    host, port, dbname = (getattr(info, key, None) for key in ("host", "port", "dbname"))
    if host is None or dbname is None:
        return UNNAMED
    return f"{host}:{port}/{dbname}"


class Telemetry:
    """Records pool metrics and leak spans once an SDK provider is there."""

    def __init__(
        self,
        meter_provider: Any = None,
        tracer_provider: Any = None,
        checkout_spans: bool = False,
        tracker: Tracker | None = None,
    ) -> None:
        self._meter_provider = meter_provider
        self._tracer_provider = tracer_provider
        self._tracker = tracker
        self.checkout_spans = checkout_spans
        #: Read on hot paths: record nothing until a provider is configured.
        self.metrics_on = False
        self.traces_on = False
        self._tracer: Any = None
        self._pools: dict[str, tuple[weakref.ref[Any], PoolStats]] = {}
        self._attrs: dict[str, dict[str, str]] = {}
        #: Checkouts that ended after a leak of theirs was found but before the sinks saw it
        #: (a request's scope_ended is delivered after Django closed the connection): the
        #: leak span still goes into their trace. Checkout id -> (span context, pool name).
        self._ended: OrderedDict[int, tuple[SpanContext | None, str]] = OrderedDict()
        try:
            self.refresh()
        except Exception as exc:  # install() goes on; the watchdog tries again
            record_internal_error(exc)

    # -- providers ------------------------------------------------------------------------

    def refresh(self) -> None:
        """Start recording if a provider has been configured since (cheap; watchdog calls)."""
        if not self.metrics_on:
            provider = self._meter_provider or metrics.get_meter_provider()
            if _configured(provider):
                self._create_instruments(provider.get_meter("pgleakguard", __version__))
                self.metrics_on = True
                _report_before_sdk_shutdown()
        if not self.traces_on:
            provider = self._tracer_provider or trace.get_tracer_provider()
            if _configured(provider):
                self._tracer = provider.get_tracer("pgleakguard", __version__)
                self.traces_on = True
                _report_before_sdk_shutdown()

    def _create_instruments(self, meter: Any) -> None:
        self.use_time = meter.create_histogram(
            "db.client.connection.use_time",
            unit="s",
            description="The time between borrowing a connection and returning it to the pool.",
            explicit_bucket_boundaries_advisory=USE_TIME_BUCKETS,
        )
        self.wait_time = meter.create_histogram(
            "db.client.connection.wait_time",
            unit="s",
            description="The time it took to obtain an open connection from the pool.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.create_time = meter.create_histogram(
            "db.client.connection.create_time",
            unit="s",
            description="The time it took to create a new connection.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.timeouts = meter.create_counter(
            "db.client.connection.timeouts",
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to "
            "obtain a connection from the pool.",
        )
        self.leaks = meter.create_counter(
            "pgleakguard.leaks", unit="{leak}", description="Connection leaks reported."
        )
        # Every series exists from the start at 0: Prometheus' increase() needs a sample
        # before the first leak to see it.
        for kind in LEAK_KINDS:
            self.leaks.add(0, _leak_attrs(kind))
        observe = meter.create_observable_up_down_counter
        observe(
            "db.client.connection.count",
            [self._guarded(self._observe_count)],
            unit="{connection}",
            description="The number of connections that are currently in state described "
            "by the state attribute.",
        )
        # psycopg_pool has no idle minimum: its min_size (the connections it keeps open, all
        # idle when none is in use) is the nearest figure, reported as idle.min.
        for key, name, unit, text in (
            ("max", "db.client.connection.max", "{connection}", "open connections allowed"),
            (
                "idle_max",
                "db.client.connection.idle.max",
                "{connection}",
                "idle connections allowed",
            ),
            ("idle_min", "db.client.connection.idle.min", "{connection}", "idle connections kept"),
            ("pending", "db.client.connection.pending_requests", "{request}", "pending requests"),
        ):
            observe(
                name,
                [self._guarded(self._stat_callback(key))],
                unit=unit,
                description=f"Number of {text}.",
            )
        observe(
            "pgleakguard.checkout.count",
            [self._guarded(self._observe_open)],
            unit="{checkout}",
            description="Connections checked out by application code now.",
        )
        meter.create_observable_gauge(
            "pgleakguard.checkout.oldest_age",
            [self._guarded(self._observe_oldest)],
            unit="s",
            description="Age of the oldest open checkout.",
        )

    # -- hot-path hooks (called only when metrics_on / traces_on) -------------------------

    def attrs(self, pool: str | None) -> dict[str, str]:
        """The (cached) attribute set of one pool."""
        name = pool or UNNAMED
        found = self._attrs.get(name)
        if found is None:
            found = self._attrs[name] = {POOL_NAME: name}
        return found

    def waited(self, pool: str | None, seconds: float, timed_out: bool) -> None:
        """One acquisition from a pool: its wait time, and whether it timed out."""
        if timed_out:
            self.timeouts.add(1, self.attrs(pool))
        else:
            self.wait_time.record(seconds, self.attrs(pool))

    def created(self, pool: str | None, seconds: float) -> None:
        """A pool opened a new physical connection in ``seconds``."""
        self.create_time.record(seconds, self.attrs(pool))

    def register_pool(self, name: str | None, pool: Any, stats: PoolStats) -> None:
        """Let the observable instruments read ``pool``'s own figures."""
        if name is not None:
            known = self._pools.get(name)
            if known is None or known[0]() is not pool:
                if known is None:
                    self.timeouts.add(0, self.attrs(name))  # the series exists before a timeout
                self._pools[name] = (weakref.ref(pool), stats)

    def checked_out(self, rec: Checkout) -> None:
        """At checkout, in the caller's thread: name an unpooled connection; remember the
        active span (the leak span's parent or link); start the optional checkout span."""
        name = None
        if rec.pool is None:  # named even before an SDK is configured: it may come later
            conn = rec.conn_ref() if rec.conn_ref is not None else None
            name = unpooled_name(conn)
        parent = span = None
        if self.traces_on:
            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                parent = ctx
                rec.trace_id = format(ctx.trace_id, "032x")
                rec.span_id = format(ctx.span_id, "016x")
            else:  # a resumed checkout must not keep the previous request's ids
                rec.trace_id = rec.span_id = None
            if self.checkout_spans:
                span = self._tracer.start_span(
                    "pgleakguard.checkout",
                    kind=SpanKind.CLIENT,
                    attributes=self.attrs(name or rec.pool),
                )
        if name is not None or parent is not None or span is not None:
            rec.span = CheckoutTelemetry(name, parent, span)

    def checked_in(self, rec: Checkout, used: float) -> None:
        """The checkout is over (returned, closed, or parked by Django): record its use
        time once and end its checkout span."""
        state: CheckoutTelemetry | None = rec.span
        if self.metrics_on and not rec.parked:  # a parked checkout's use was recorded at park
            self.use_time.record(used, self.attrs(self.pool_of(rec)))
        if state is not None:
            span, state.checkout_span = state.checkout_span, None
            parent, state.parent = state.parent, None
            if rec.reported and self.traces_on:
                self._ended[rec.id] = (
                    span.get_span_context() if span is not None else parent,
                    self.pool_of(rec),
                )
                while len(self._ended) > ENDED_KEPT:
                    self._ended.popitem(last=False)
            if span is not None:
                span.end()

    def pool_of(self, rec: Checkout) -> str:
        """The pool name ``rec`` is recorded under."""
        if rec.pool is not None:
            return rec.pool
        state: CheckoutTelemetry | None = rec.span
        return (state.name if state is not None else None) or UNNAMED

    # -- sink -----------------------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        """Count each leak and emit a ``pgleakguard.leak`` span in the checkout's trace."""
        if not isinstance(event, LeakEvent):
            return
        if self.metrics_on:
            self.leaks.add(1, _leak_attrs(event.kind))
        if not self.traces_on:
            return
        rec = self._find(event.checkout_id)
        state: CheckoutTelemetry | None = rec.span if rec is not None else None
        checkout_span = state.checkout_span if state is not None else None
        ended = self._ended.pop(event.checkout_id, None) if rec is None else None
        if checkout_span is not None:
            parent: SpanContext | None = checkout_span.get_span_context()
        elif state is not None and state.parent is not None:
            parent = state.parent
        elif ended is not None:
            parent = ended[0]
        elif event.trace_id and event.span_id:  # the checkout is gone: its flags are unknown
            parent = SpanContext(
                int(event.trace_id, 16),
                int(event.span_id, 16),
                False,
                TraceFlags(TraceFlags.DEFAULT),
            )
        else:
            parent = None
        attributes = leak_attributes(event)
        if rec is not None:
            attributes[POOL_NAME] = self.pool_of(rec)
        elif ended is not None:
            attributes[POOL_NAME] = ended[1]
        if parent is not None and parent.trace_flags.sampled:
            # In the request's trace: sampled as the request was, found from the request.
            context = trace.set_span_in_context(NonRecordingSpan(parent))
            links = []
        else:
            # A root span of its own, left to the root sampler; the link names the checkout's
            # span with its real flags.
            context = trace.set_span_in_context(trace.INVALID_SPAN)
            links = [Link(parent, {"pgleakguard.link": "checkout"})] if parent else []
        span = self._tracer.start_span(
            "pgleakguard.leak",
            context=context,
            kind=SpanKind.INTERNAL,
            links=links,
            attributes=attributes,
        )
        span.set_status(Status(StatusCode.ERROR, f"connection leak: {event.kind}"))
        span.end()
        if state is not None and checkout_span is not None and event.kind in FINAL_KINDS:
            # Nothing will return this connection now: its checkout span ends with the leak.
            state.checkout_span = None
            checkout_span.add_event("pgleakguard.leak", {"pgleakguard.leak.kind": event.kind})
            checkout_span.set_status(Status(StatusCode.ERROR, f"connection leak: {event.kind}"))
            checkout_span.end()

    def _find(self, checkout_id: int) -> Checkout | None:
        """The checkout a leak event is about: open, or recently garbage collected."""
        tracker = self._tracker
        if tracker is None:
            return None
        rec = tracker.registry._open.get(checkout_id)
        if rec is None:
            rec = next((r for r in list(tracker.collected) if r.id == checkout_id), None)
        return rec

    # -- observable callbacks -------------------------------------------------------------

    def _guarded(self, callback: _Callback) -> _Callback:
        # The SDK would log each failure of a callback at every collection, and count none:
        # ours are counted, logged once, and observe nothing.
        def observe(options: CallbackOptions) -> list[Observation]:
            try:
                return callback(options)
            except Exception as exc:
                record_internal_error(exc)
                return []

        return observe

    def _open_checkouts(self) -> list[Checkout]:
        # Through the tracker each time: a forked child has a registry of its own.
        return self._tracker.registry.snapshot() if self._tracker is not None else []

    def _by_pool(self) -> tuple[dict[str, list[Checkout]], dict[str, int]]:
        """Open checkouts by pool name: those application code holds, and the number
        parked (Django's persistent connections between requests: open, unused)."""
        held: dict[str, list[Checkout]] = {}
        parked: dict[str, int] = {}
        for rec in self._open_checkouts():
            if rec.closed:
                continue
            name = self.pool_of(rec)
            if rec.parked:
                parked[name] = parked.get(name, 0) + 1
            else:
                held.setdefault(name, []).append(rec)
        return held, parked

    def _stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name, (ref, read) in list(self._pools.items()):
            pool = ref()
            if pool is None:
                del self._pools[name]
                continue
            try:
                out[name] = read(pool)
            except Exception as exc:
                record_internal_error(exc)
        return out

    def _observe_count(self, options: CallbackOptions) -> list[Observation]:
        held, parked = self._by_pool()
        stats = self._stats()
        out = []
        for name in sorted(set(held) | set(parked) | set(stats)):
            used = len(held.get(name, ()))
            idle = stats.get(name, {}).get("idle")
            if idle is None:
                idle = parked.get(name, 0)
            else:  # the pool counts its own idle ones; a parked checkout holds one of its slots
                used += parked.get(name, 0)
            out.append(Observation(used, {**self.attrs(name), STATE: "used"}))
            out.append(Observation(idle, {**self.attrs(name), STATE: "idle"}))
        return out

    def _stat_callback(self, key: str) -> _Callback:
        def observe(options: CallbackOptions) -> list[Observation]:
            return [
                Observation(values[key], self.attrs(name))
                for name, values in sorted(self._stats().items())
                if key in values
            ]

        return observe

    def _observe_open(self, options: CallbackOptions) -> list[Observation]:
        held, _ = self._by_pool()
        return [Observation(len(recs), self.attrs(name)) for name, recs in held.items()]

    def _observe_oldest(self, options: CallbackOptions) -> list[Observation]:
        held, _ = self._by_pool()
        now = monotonic()
        return [
            Observation(now - min(r.started for r in recs), self.attrs(name))
            for name, recs in held.items()
        ]


def _exit_report() -> None:
    from . import _runtime

    _runtime._at_exit()


def _report_before_sdk_shutdown() -> None:
    # The SDK shuts a provider down at exit from an atexit handler registered when the
    # provider was made, and pgleakguard's exit report (never_closed), registered at import,
    # would run after it and reach no exporter. atexit runs the last registered first: this
    # one, (re-)registered once a provider is seen, runs before that provider's shutdown.
    atexit.unregister(_exit_report)
    atexit.register(_exit_report)


def _leak_attrs(kind: str) -> dict[str, str]:
    return {"pgleakguard.leak.kind": kind, "pgleakguard.leak.severity": severity_of(kind)}


def leak_attributes(event: LeakEvent) -> dict[str, Any]:
    """The leak span's attributes (semantic-convention names where one exists)."""
    attrs: dict[str, Any] = {
        "db.system.name": "postgresql",
        "code.function.name": event.callsite.function,
        "code.file.path": event.callsite.file,
        "code.line.number": event.callsite.line,
        "code.stacktrace": "\n".join(
            f'  File "{f["file"]}", line {f["line"]}, in {f["function"]}'
            for f in reversed(event.stack)
        ),
        "pgleakguard.leak.kind": event.kind,
        "pgleakguard.leak.severity": event.severity,
        "pgleakguard.checkout.age": round(event.age, 6),
        POOL_NAME: event.pool or UNNAMED,
        "pgleakguard.integration": event.integration,
        "pgleakguard.holder": event.holder,
    }
    if event.backend_pid is not None:
        attrs["pgleakguard.backend_pid"] = event.backend_pid
    if event.service:
        attrs["pgleakguard.service"] = event.service
    return attrs
