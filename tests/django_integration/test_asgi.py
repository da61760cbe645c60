"""Django's real ASGI handler: async views, the ORM in sync_to_async worker threads. The
call-site of a query awaited in an async view is the view's ``await`` line."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from django.core import checks
from django.core.handlers.asgi import ASGIHandler

import pgleakguard
from pgleakguard import CallSite

from . import views
from .helpers import asgi_get as get
from .helpers import close_from_here, database_settings, wait_gone
from conftest import EventLog, marked_line

VIEWS = views.__file__
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def persistent(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """CONN_MAX_AGE = 60 (or the indirect parameter: None, unlimited) for the test."""
    with database_settings(CONN_MAX_AGE=getattr(request, "param", 60)) as settings_dict:
        yield settings_dict


@pytest.fixture
def atomic_requests() -> Iterator[dict[str, Any]]:
    """ATOMIC_REQUESTS = True for the test."""
    with database_settings(ATOMIC_REQUESTS=True) as settings_dict:
        yield settings_dict


async def test_async_and_sync_views_report_nothing(install: Callable[..., EventLog]) -> None:
    events = install(leak_threshold=0.5, idle_in_transaction_threshold=0.5)
    handler = ASGIHandler()
    for path in ["/async-count/", "/count/"] * 25:
        status, body = await get(handler, path)
        assert (status, int(body) > 0) == (200, True)
    await asyncio.sleep(0.75)
    pgleakguard.check()
    assert events == []
    assert pgleakguard.open_checkouts() == []


async def test_query_in_a_thread_the_request_does_not_own_is_scope_ended(
    events: EventLog,
) -> None:
    status, _ = await get(ASGIHandler(), "/async-executor-leak/")
    assert status == 200
    [event] = await asyncio.to_thread(events.wait_for, "scope_ended")
    line = marked_line(VIEWS, "executor-query")
    assert event.callsite == CallSite(VIEWS, line, "unclosed_query")
    assert event.details == {"scope": "request GET /async-executor-leak/", "state": "still open"}
    assert event.holder.startswith("asyncio_") and event.holder_alive
    await asyncio.to_thread(close_from_here, views.LEAKED.pop())
    returned = await asyncio.to_thread(events.wait_returned)
    assert returned.checkout_id == event.checkout_id


async def test_atomic_requests_name_the_sync_views_query_under_asgi(
    atomic_requests: dict[str, Any], install: Callable[..., EventLog]
) -> None:
    # the view's transaction is opened by Django in the request's worker thread, whose own
    # stack and awaiting task hold nothing but Django, asgiref and asyncio
    events = install(leak_threshold=60, idle_in_transaction_threshold=0.2)
    request = asyncio.ensure_future(get(ASGIHandler(), "/held/"))
    try:
        [event] = await asyncio.to_thread(events.wait_for, "idle_in_transaction")
    finally:
        views.RELEASE.set()
        assert (await request)[0] == 200
    line = marked_line(VIEWS, "held-view")
    assert event.callsite == CallSite(VIEWS, line, "held_until_released")
    assert event.transaction_status == "INTRANS"
    assert event.holder.startswith("ThreadPoolExecutor-")


@pytest.mark.parametrize("persistent", [60, None], indirect=True, ids=["60", "None"])
@pytest.mark.filterwarnings("ignore::ResourceWarning")  # psycopg, on the collected ones
async def test_persistent_connections_under_asgi_end_with_each_requests_thread(
    persistent: dict[str, Any], events: EventLog, pg_dsn: str
) -> None:
    handler = ASGIHandler()
    gc.disable()  # the ended threads' connections wait for the collector: let them wait
    try:
        for _ in range(2):
            assert (await get(handler, "/async-count/"))[0] == 200
        leaks = await asyncio.to_thread(events.wait_for, "owner_exited", 10.0, 2)
    finally:
        gc.enable()
    line = marked_line(VIEWS, "async-count")
    for event in leaks:
        # the query ran in the request's worker thread; the call-site is the view's await
        assert event.callsite == CallSite(VIEWS, line, "async_count")
        assert event.holder.startswith("ThreadPoolExecutor-") and not event.holder_alive
        assert (
            event.stack[0]["code"] == "n = await ContentType.objects.acount()  # leak: async-count"
        )
    gc.collect()  # what finally closes them
    for event in leaks:
        assert event.backend_pid is not None
        await asyncio.to_thread(wait_gone, pg_dsn, event.backend_pid)
    await asyncio.to_thread(events.wait_for, "garbage_collected", 10.0, 2)
    assert (
        sorted(e.kind for e in events.leaks()) == ["garbage_collected"] * 2 + ["owner_exited"] * 2
    )


W002 = (
    "DATABASES['default'] has CONN_MAX_AGE=60 under ASGI: each request leaves its connection "
    "open in a thread that has ended, until the garbage collector closes it (each is "
    "reported as a leak).",
    "Use CONN_MAX_AGE = 0, or Django's native pool (OPTIONS['pool'], Django 5.1+), under ASGI.",
)


def _w002() -> list[tuple[str, str]]:
    return [(m.msg, m.hint) for m in checks.run_checks() if m.id == "pgleakguard.W002"]


def test_system_check_warns_of_persistent_connections_when_asgi_application_is_set(
    persistent: dict[str, Any], settings: Any, install: Callable[..., EventLog]
) -> None:
    install()
    assert _w002() == []  # WSGI, as far as anyone can tell
    settings.ASGI_APPLICATION = "shop.asgi.application"
    assert _w002() == [W002]  # the pooled alias (CONN_MAX_AGE 0) is fine
    persistent["CONN_MAX_AGE"] = 0
    assert _w002() == []


async def test_first_asgi_request_logs_the_persistent_connections_warning_once(
    persistent: dict[str, Any], install: Callable[..., EventLog], caplog: pytest.LogCaptureFixture
) -> None:
    install()
    with caplog.at_level(logging.WARNING, logger="pgleakguard"):
        for _ in range(3):
            assert await get(ASGIHandler(), "/ping/") == (200, b"pong")
    assert [r.getMessage() for r in caplog.records if r.name == "pgleakguard"] == [
        f"pgleakguard: {W002[0]} {W002[1]}"
    ]
    assert await asyncio.to_thread(_w002) == [W002]  # and manage.py check says it too
