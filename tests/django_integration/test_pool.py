"""Django's native pool (Django >= 5.1, OPTIONS "pool"): one checkout per pool checkout,
named after the view or job; a PoolTimeout names the holders."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Callable

import django
import pytest
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler
from django.db import OperationalError
from django.test import Client

import pgleakguard
from pgleakguard import CallSite

from . import views
from .helpers import asgi_get, close_from_here, wsgi_get
from conftest import EventLog, marked_line

VIEWS = views.__file__
pytestmark = [
    pytest.mark.skipif(
        not settings.NATIVE_POOL, reason=f"Django {django.get_version()} has no native pool (5.1+)"
    ),
    pytest.mark.django_db(
        transaction=True, databases=["default", "pooled"] if settings.NATIVE_POOL else ["default"]
    ),
]


def test_pool_checkout_is_counted_once_and_named_after_the_view(
    pooled: Any, install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=0.5, idle_in_transaction_threshold=0.5)
    handler = WSGIHandler()
    replies: list[tuple[str, bytes]] = []
    for i in range(3):  # each request checks a connection out of the pool and back in
        server = threading.Thread(
            target=lambda: replies.append(wsgi_get(handler, "/pooled/")), name=f"wsgi-{i}"
        )
        server.start()
        server.join()
    name = pooled.pool.name
    line = marked_line(VIEWS, "pooled-view")
    for i, (status, body) in enumerate(replies):
        assert status == "200 OK"
        assert json.loads(body)["held"] == [["psycopg_pool", name, VIEWS, line, f"wsgi-{i}"]]
    assert pgleakguard.open_checkouts() == []  # Django gave them back at the end of each
    assert pooled.pool.get_stats()["pool_available"] >= 1
    pgleakguard.check()
    assert events == []


def test_threads_that_keep_pool_connections_and_the_pool_timeout_that_follows(
    client: Client, pooled: Any, events: EventLog
) -> None:
    for _ in range(2):
        assert client.get("/pooled-leak/").status_code == 200
    leaks = events.wait_for("owner_exited", count=2)
    name = pooled.pool.name
    line = marked_line(VIEWS, "export")
    for event, holder in zip(leaks, ("pooled-export-1", "pooled-export-2")):
        assert event.callsite == CallSite(VIEWS, line, "export")
        assert (event.integration, event.pool, event.holder) == ("psycopg_pool", name, holder)
    with pytest.raises(OperationalError) as info:
        client.get("/pooled/")
    message = str(info.value)
    assert message.startswith("couldn't get a connection after 0.50 sec\n")
    assert (
        f"\npgleakguard: 2 connection(s) of pool '{name}' checked out, by call-site:\n"
        f"  2 x {VIEWS}:{line} in export (oldest " in message
    )
    assert message.endswith("; held by pooled-export-1, pooled-export-2)")
    for wrapper in views.LEAKED:
        close_from_here(wrapper)  # back to the pool
    assert json.loads(client.get("/pooled/").content)["count"] >= 1
    pgleakguard.check()
    assert sorted(e.kinds for e in events.returned()) == [("owner_exited",)] * 2
    assert [e.kind for e in events.leaks()] == ["owner_exited", "owner_exited"]


async def test_pool_connection_a_request_leaves_checked_out_in_another_thread_is_scope_ended(
    pooled: Any, events: EventLog
) -> None:
    status, _ = await asgi_get(ASGIHandler(), "/async-executor-pooled-leak/")
    assert status == 200
    [event] = await asyncio.to_thread(events.wait_for, "scope_ended")
    line = marked_line(VIEWS, "executor-pooled")
    assert event.callsite == CallSite(VIEWS, line, "unreturned_pooled_query")
    assert event.details == {
        "scope": "request GET /async-executor-pooled-leak/",
        "state": "still checked out from the pool",
    }
    assert (event.integration, event.pool) == ("psycopg_pool", pooled.pool.name)
    assert event.holder.startswith("asyncio_") and event.holder_alive
    await asyncio.to_thread(close_from_here, views.LEAKED.pop())  # back to the pool
    returned = await asyncio.to_thread(events.wait_returned)
    assert returned.checkout_id == event.checkout_id
    assert pooled.pool.get_stats()["pool_available"] >= 1


async def test_asgi_requests_on_the_native_pool_report_nothing(
    pooled: Any, install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=0.5, idle_in_transaction_threshold=0.5)
    handler = ASGIHandler()
    for _ in range(20):
        status, body = await asgi_get(handler, "/async-pooled/")
        assert (status, int(body) > 0) == (200, True)
    await asyncio.sleep(0.75)  # past both thresholds: a false positive would show
    await asyncio.to_thread(pgleakguard.check)
    assert events == []
    assert pgleakguard.open_checkouts() == []  # every request gave its connection back
    assert pooled.pool.get_stats()["pool_available"] >= 1
