"""OpenTelemetry: pool metrics per the database semantic conventions and a span per leak.

Only ``opentelemetry-api`` is used. Until an SDK provider is configured (globally, or
passed as ``meter_provider`` / ``tracer_provider``) nothing is recorded and the hot path
pays one attribute check; the watchdog notices a provider configured later.
"""

from __future__ import annotations

import logging
import weakref
from time import monotonic
from typing import Any, Callable

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from ._safety import record_internal_error
from ._version import __version__
from .events import Event, LeakEvent
from .tracker import Checkout

logger = logging.getLogger("pgleakguard")

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"

#: Pool facts an integration can read without I/O: idle, max, idle_max, idle_min, pending.
PoolStats = Callable[[Any], "dict[str, int]"]


def _configured(provider: Any) -> bool:
    # The API hands out proxy / no-op providers until an SDK provider is set.
    return type(provider).__name__ not in (
        "_ProxyMeterProvider",
        "NoOpMeterProvider",
        "ProxyTracerProvider",
        "NoOpTracerProvider",
    )


class Telemetry:
    """Records pool metrics and leak spans once an SDK provider is there."""

    def __init__(
        self,
        meter_provider: Any = None,
        tracer_provider: Any = None,
        checkout_spans: bool = False,
        open_checkouts: Callable[[], list[Checkout]] = list,
    ) -> None:
        self._meter_provider = meter_provider
        self._tracer_provider = tracer_provider
        self._open_checkouts = open_checkouts
        self.checkout_spans = checkout_spans
        #: Read on hot paths: record nothing until a provider is configured.
        self.metrics_on = False
        self.traces_on = False
        self._tracer: Any = None
        self._pools: dict[str, tuple[weakref.ref[Any], PoolStats]] = {}
        self._attrs: dict[str | None, dict[str, str]] = {}
        self.refresh()

    # -- providers ------------------------------------------------------------------------

    def refresh(self) -> None:
        """Start recording if a provider has been configured since (cheap; watchdog calls)."""
        if not self.metrics_on:
            provider = self._meter_provider or metrics.get_meter_provider()
            if _configured(provider):
                self._create_instruments(provider.get_meter("pgleakguard", __version__))
                self.metrics_on = True
        if not self.traces_on:
            provider = self._tracer_provider or trace.get_tracer_provider()
            if _configured(provider):
                self._tracer = provider.get_tracer("pgleakguard", __version__)
                self.traces_on = True

    def _create_instruments(self, meter: Any) -> None:
        self.use_time = meter.create_histogram(
            "db.client.connection.use_time",
            unit="s",
            description="The time between borrowing a connection and returning it to the pool.",
        )
        self.wait_time = meter.create_histogram(
            "db.client.connection.wait_time",
            unit="s",
            description="The time it took to obtain an open connection from the pool.",
        )
        self.create_time = meter.create_histogram(
            "db.client.connection.create_time",
            unit="s",
            description="The time it took to create a new connection.",
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
        observe = meter.create_observable_up_down_counter
        observe(
            "db.client.connection.count",
            [self._observe_count],
            unit="{connection}",
            description="The number of connections that are currently in state described "
            "by the state attribute.",
        )
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
            observe(name, [self._stat_callback(key)], unit=unit, description=f"Number of {text}.")
        observe(
            "pgleakguard.checkouts.open",
            [self._observe_open],
            unit="{checkout}",
            description="Connections checked out by application code now.",
        )
        meter.create_observable_gauge(
            "pgleakguard.checkout.oldest_age",
            [self._observe_oldest],
            unit="s",
            description="Age of the oldest open checkout.",
        )

    # -- hot-path hooks (called only when metrics_on / traces_on) -------------------------

    def attrs(self, pool: str | None) -> dict[str, str]:
        """The (cached) attribute set of one pool."""
        found = self._attrs.get(pool)
        if found is None:
            found = self._attrs[pool] = {POOL_NAME: pool or "unnamed"}
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
                self._pools[name] = (weakref.ref(pool), stats)

    def checked_out(self, rec: Checkout) -> None:
        """Remember the active span (for the leak span's link); start a checkout span."""
        if not self.traces_on:
            return
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            rec.trace_id = format(ctx.trace_id, "032x")
            rec.span_id = format(ctx.span_id, "016x")
        if self.checkout_spans:
            rec.span = self._tracer.start_span(
                "pgleakguard.checkout", kind=SpanKind.CLIENT, attributes=self.attrs(rec.pool)
            )

    def checked_in(self, rec: Checkout, used: float) -> None:
        """Record the use time; end the checkout span."""
        if self.metrics_on:
            self.use_time.record(used, self.attrs(rec.pool))
        span, rec.span = rec.span, None
        if span is not None:
            span.end()

    # -- sink -----------------------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        """Count each leak and emit a ``pgleakguard.leak`` span linked to the checkout's span."""
        if not isinstance(event, LeakEvent):
            return
        if self.metrics_on:
            self.leaks.add(
                1,
                {"pgleakguard.leak.kind": event.kind, "pgleakguard.leak.severity": event.severity},
            )
        if not self.traces_on:
            return
        links = []
        if event.trace_id and event.span_id:
            linked = SpanContext(
                int(event.trace_id, 16),
                int(event.span_id, 16),
                is_remote=False,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
            )
            links.append(Link(linked, {"pgleakguard.link": "checkout"}))
        span = self._tracer.start_span(
            "pgleakguard.leak",
            context=trace.set_span_in_context(trace.INVALID_SPAN),  # a root span of its own
            kind=SpanKind.INTERNAL,
            links=links,
            attributes=leak_attributes(event),
        )
        span.set_status(Status(StatusCode.ERROR, f"connection leak: {event.kind}"))
        span.end()

    # -- observable callbacks -------------------------------------------------------------

    def _by_pool(self) -> dict[str | None, list[Checkout]]:
        groups: dict[str | None, list[Checkout]] = {}
        for rec in self._open_checkouts():
            if not rec.closed:
                groups.setdefault(rec.pool, []).append(rec)
        return groups

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
        used = self._by_pool()
        stats = self._stats()
        out = []
        for name in sorted(set(used) | set(stats), key=str):
            out.append(Observation(len(used.get(name, ())), {**self.attrs(name), STATE: "used"}))
            idle = stats.get(name or "", {}).get("idle")
            if idle is not None:
                out.append(Observation(idle, {**self.attrs(name), STATE: "idle"}))
        return out

    def _stat_callback(self, key: str) -> Callable[[CallbackOptions], list[Observation]]:
        def observe(options: CallbackOptions) -> list[Observation]:
            return [
                Observation(values[key], self.attrs(name))
                for name, values in sorted(self._stats().items())
                if key in values
            ]

        return observe

    def _observe_open(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(len(recs), self.attrs(name)) for name, recs in self._by_pool().items()]

    def _observe_oldest(self, options: CallbackOptions) -> list[Observation]:
        now = monotonic()
        return [
            Observation(now - min(r.started for r in recs), self.attrs(name))
            for name, recs in self._by_pool().items()
        ]


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
        POOL_NAME: event.pool or "unnamed",
        "pgleakguard.integration": event.integration,
        "pgleakguard.holder": event.holder,
    }
    if event.backend_pid is not None:
        attrs["pgleakguard.backend_pid"] = event.backend_pid
    if event.service:
        attrs["pgleakguard.service"] = event.service
    return attrs
