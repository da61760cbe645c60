"""OpenTelemetry under Django: a persistent connection between requests is idle, not used;
each request's use of it is one use_time point; connections are named after their alias;
a request's leak span is in the request's trace."""

from __future__ import annotations

import time
from typing import Any, Callable

import pytest
from django.core.handlers.wsgi import WSGIHandler

import pgleakguard

from . import views
from .helpers import database_settings, wsgi_get
from conftest import EventLog, marked_line
from otel_sdk import Otel, points, pool, value

VIEWS = views.__file__
pytestmark = pytest.mark.django_db(transaction=True)


def timed_get(handler: WSGIHandler, path: str) -> float:
    """One request through the real WSGI handler in this thread; how long it took."""
    started = time.monotonic()
    status, _ = wsgi_get(handler, path)
    assert status == "200 OK"
    return time.monotonic() - started


def test_persistent_connection_between_requests_is_idle_and_each_request_one_use(
    otel: Otel, install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=60, **otel.options())
    handler = WSGIHandler()
    with database_settings(CONN_MAX_AGE=60):
        first = timed_get(handler, "/count/")
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < 0.3:  # nothing happens for a while
            time.sleep(0.05)
        between = otel.metrics()
        second = timed_get(handler, "/count/")
        after = otel.metrics()
        state = pgleakguard._runtime.current()
        assert state is not None
        [rec] = state.tracker.registry.snapshot()
        assert rec.parked  # Django keeps it for the next request
    count = between["db.client.connection.count"]
    assert value(count, **pool("default", "used")) == 0
    assert value(count, **pool("default", "idle")) == 1
    # nothing is held by application code: no checkout count, no oldest age
    assert "pgleakguard.checkout.count" not in between
    assert "pgleakguard.checkout.oldest_age" not in between
    [use] = points(between["db.client.connection.use_time"], **pool("default"))
    assert use.count == 1 and 0 < use.sum < first
    [use] = points(after["db.client.connection.use_time"], **pool("default"))
    assert use.count == 2 and 0 < use.sum < first + second
    count = after["db.client.connection.count"]
    assert (value(count, **pool("default", "used")), value(count, **pool("default", "idle"))) == (
        0,
        1,
    )
    pgleakguard.check()
    assert events == []


def test_connection_closed_after_each_request_leaves_nothing_open(
    otel: Otel, install: Callable[..., EventLog]
) -> None:
    install(leak_threshold=60, **otel.options())
    handler = WSGIHandler()
    with database_settings(CONN_MAX_AGE=0):
        took = timed_get(handler, "/count/")
        m = otel.metrics()
    assert "db.client.connection.count" not in m  # no connection of any state is left
    [use] = points(m["db.client.connection.use_time"], **pool("default"))
    assert use.count == 1 and 0 < use.sum < took


def test_leak_span_of_a_request_is_in_the_requests_trace(
    otel: Otel, install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=60, otel_checkout_spans=True, **otel.options())
    tracer = otel.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("GET /atomic-leak/") as request:
        wsgi_get(WSGIHandler(), "/atomic-leak/")
    [event] = events.wait_for("scope_ended")
    views.LEAKED.pop().__exit__(None, None, None)
    [leak] = otel.spans("pgleakguard.leak")
    # the leak span's parent is the checkout span, a child of the request span
    [checkout] = otel.spans("pgleakguard.checkout")
    assert checkout.parent is not None and leak.parent is not None
    assert checkout.parent.span_id == request.get_span_context().span_id
    assert leak.parent.span_id == checkout.context.span_id
    assert leak.context.trace_id == request.get_span_context().trace_id
    attrs: dict[str, Any] = dict(leak.attributes or {})
    assert attrs["db.client.connection.pool.name"] == "default"
    assert attrs["code.line.number"] == marked_line(VIEWS, "atomic-view")
    assert attrs["pgleakguard.leak.kind"] == "scope_ended"
    assert event.trace_id == format(request.get_span_context().trace_id, "032x")
