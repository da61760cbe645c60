"""Requests as scopes: a request that leaves an atomic block open is scope_ended, named at
its line; persistent connections, health checks and pytest-django's own connection report
nothing, through the test client and through Django's real WSGI handler in real threads."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import psycopg
import pytest
from django.contrib.contenttypes.models import ContentType
from django.core.handlers.wsgi import WSGIHandler
from django.db import connections, transaction
from django.test import Client

import pgleakguard
from pgleakguard import CallSite

from . import helpers, views
from .helpers import close_from_here, database_settings, wsgi_get
from conftest import EventLog, marked_line, wait_until

VIEWS = views.__file__
HELPERS = helpers.__file__
PGLEAKGUARD = os.path.dirname(pgleakguard.__file__)


def quiet(install: Callable[..., EventLog], seconds: float = 0.5) -> EventLog:
    """pgleakguard with ``seconds`` thresholds: a false positive would show within them."""
    return install(leak_threshold=seconds, idle_in_transaction_threshold=seconds)


def wait_past_thresholds(seconds: float = 0.5) -> None:
    """Let every threshold pass, then make the watchdog look once more."""
    time.sleep(seconds * 1.5)
    pgleakguard.check()


@pytest.mark.django_db(transaction=True)
def test_request_that_leaves_an_atomic_block_open_is_scope_ended(
    client: Client, install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=60, idle_in_transaction_threshold=60)
    assert client.get("/atomic-leak/").status_code == 200
    [event] = events.wait_for("scope_ended")
    assert event.callsite == CallSite(VIEWS, marked_line(VIEWS, "atomic-view"), "atomic_leak")
    assert event.details == {
        "scope": "request GET /atomic-leak/",
        "state": "inside an atomic block the request opened",
    }
    assert (event.integration, event.holder, event.severity) == ("django", "MainThread", "definite")
    assert event.transaction_status == "INTRANS"
    assert "scope=request GET /atomic-leak/" in event.render()
    views.LEAKED.pop().__exit__(None, None, None)
    assert client.get("/count/").status_code == 200  # the next request is fine again
    pgleakguard.check()
    assert [e.kind for e in events.leaks()] == ["scope_ended"]


@pytest.mark.django_db(transaction=True)
def test_scope_ended_is_delivered_off_the_request_thread_with_its_activity_row(
    client: Client, install: Callable[..., EventLog], pg_dsn: str
) -> None:
    gate = threading.Event()
    seen: list[tuple[str, Any]] = []

    def slow(event: Any) -> None:  # a callback slower than any request
        seen.append((threading.current_thread().name, event))
        gate.wait(10)

    install(leak_threshold=60, idle_in_transaction_threshold=60, on_leak=slow, activity_dsn=pg_dsn)
    try:
        assert client.get("/atomic-leak/").status_code == 200  # without waiting for it
        assert not gate.is_set()
        wait_until(lambda: seen)
    finally:
        gate.set()
    [(thread, event)] = seen
    assert (thread, event.kind) == ("pgleakguard-on-leak", "scope_ended")
    # the delivery thread added the server's view of the connection the request left behind
    assert event.details["pg_stat_activity"]["state"] == "idle in transaction"
    views.LEAKED.pop().__exit__(None, None, None)


@pytest.mark.django_db(transaction=True)
def test_real_wsgi_handler_reports_the_open_atomic_block_before_django_closes_it(
    install: Callable[..., EventLog],
) -> None:
    events = install(leak_threshold=60, idle_in_transaction_threshold=60)
    handler = WSGIHandler()
    server = threading.Thread(target=wsgi_get, args=(handler, "/atomic-leak/"), name="wsgi-1")
    server.start()
    server.join()
    [event] = events.wait_for("scope_ended")
    assert event.callsite.line == marked_line(VIEWS, "atomic-view")
    assert event.holder == "wsgi-1"
    # reported from the request's own thread while the server closes the response (which
    # sends request_finished); none of the reporting is in the holder's stack
    assert event.holder_stack is not None
    ours = [(f["line"], f["function"]) for f in event.holder_stack if f["file"] == HELPERS]
    assert ours == [(marked_line(HELPERS, "request-finished"), "wsgi_get")]
    assert not [f for f in event.holder_stack if f["file"].startswith(PGLEAKGUARD)]
    # then Django's close_old_connections closed it (rolling the transaction back)
    returned = events.wait_returned()
    assert (returned.checkout_id, returned.kinds) == (event.checkout_id, ("scope_ended",))
    pgleakguard.check()
    assert [e.kind for e in events.leaks()] == ["scope_ended"]


@pytest.mark.parametrize(
    "request_held",
    [
        lambda: wsgi_get(WSGIHandler(), "/held/"),
        lambda: Client().get("/held/"),
    ],
    ids=["real-wsgi-handler", "test-client"],
)
@pytest.mark.django_db(transaction=True)
def test_atomic_requests_name_the_views_query_not_the_server(
    request_held: Callable[[], object], install: Callable[..., EventLog]
) -> None:
    # Django's atomic() takes the connection before the view runs, called from the server
    events = install(leak_threshold=60, idle_in_transaction_threshold=0.2)

    def serve() -> None:
        request_held()
        connections.close_all()  # what a server thread does (the test client leaves it open)

    with database_settings(ATOMIC_REQUESTS=True):
        server = threading.Thread(target=serve, name="wsgi-1")
        server.start()
        try:
            [event] = events.wait_for("idle_in_transaction")
        finally:
            views.RELEASE.set()
            server.join()
    line = marked_line(VIEWS, "held-view")
    assert event.callsite == CallSite(VIEWS, line, "held_until_released")
    assert event.stack[0]["code"] == "n = ContentType.objects.count()  # leak: held-view"
    assert (event.holder, event.transaction_status) == ("wsgi-1", "INTRANS")
    # Django committed the view's transaction; then the connection was closed
    returned = events.wait_returned()
    assert (returned.checkout_id, returned.callsite) == (event.checkout_id, event.callsite)
    assert [e.kind for e in events.leaks()] == ["idle_in_transaction"]


@pytest.mark.parametrize("max_age", [0, 60])
@pytest.mark.django_db(transaction=True)
def test_200_requests_in_the_main_thread_report_nothing(
    max_age: int, install: Callable[..., EventLog]
) -> None:
    # the real WSGI handler (the test client keeps the connection whatever CONN_MAX_AGE says)
    events = quiet(install)
    handler = WSGIHandler()
    with database_settings(CONN_MAX_AGE=max_age):
        pids = []
        for _ in range(200):
            status, body = wsgi_get(handler, "/pid/")
            assert status == "200 OK"
            pids.append(int(body))
        wait_past_thresholds()
        held = pgleakguard.open_checkouts()
    if max_age == 0:  # Django closed each request's connection
        assert (len(set(pids)), held) == (200, [])
    else:  # one persistent connection, parked between requests
        assert len(set(pids)) == 1
        assert [(h.holder, h.backend_pid) for h in held] == [("MainThread", pids[0])]
    assert events == []


@pytest.mark.parametrize("max_age", [0, 60, None])
@pytest.mark.django_db(transaction=True)
def test_real_wsgi_handler_in_worker_threads_reports_nothing(
    max_age: int | None, install: Callable[..., EventLog]
) -> None:
    events = quiet(install)
    handler = WSGIHandler()
    pids: list[int] = []
    served = threading.Barrier(5)
    inspected = threading.Event()

    def worker() -> None:  # a gthread-style worker: many requests, then the server stops
        for _ in range(50):
            status, body = wsgi_get(handler, "/pid/")
            assert status == "200 OK"
            pids.append(int(body))
        served.wait(10)
        inspected.wait(10)
        connections.close_all()

    with database_settings(CONN_MAX_AGE=max_age):
        threads = [threading.Thread(target=worker, name=f"gthread-{i}") for i in range(4)]
        for t in threads:
            t.start()
        served.wait(10)
        wait_past_thresholds()
        held = pgleakguard.open_checkouts()
        inspected.set()
        for t in threads:
            t.join()
    persistent = max_age != 0
    # persistent: each worker keeps (parked) one connection for all its requests
    assert len(pids) == 200
    assert len(set(pids)) == (4 if persistent else 200)
    holders = [f"gthread-{i}" for i in range(4)] if persistent else []
    assert sorted(h.holder for h in held) == holders
    pgleakguard.check()
    assert events == []
    assert pgleakguard.open_checkouts() == []


@pytest.mark.django_db(transaction=True)
def test_health_check_replaces_a_terminated_persistent_connection_silently(
    install: Callable[..., EventLog], pg_dsn: str
) -> None:
    events = quiet(install)
    handler = WSGIHandler()
    with (
        database_settings(CONN_MAX_AGE=None, CONN_HEALTH_CHECKS=True),
        ThreadPoolExecutor(1, thread_name_prefix="gthread") as worker,
    ):
        first = int(worker.submit(wsgi_get, handler, "/pid/").result()[1])
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [first])
        second = int(worker.submit(wsgi_get, handler, "/pid/").result()[1])
        assert second != first
        [held] = pgleakguard.open_checkouts()
        assert held.backend_pid == second
        wait_past_thresholds()
        worker.submit(connections.close_all).result()
    assert events == []
    assert pgleakguard.open_checkouts() == []


@pytest.mark.django_db
def test_pytest_djangos_test_database_connection_is_not_a_leak(
    client: Client, install: Callable[..., EventLog]
) -> None:
    events = quiet(install)
    ContentType.objects.count()  # inside pytest-django's per-test atomic block
    for _ in range(50):
        assert client.get("/count/").status_code == 200
    with transaction.atomic():  # the test's own atomic block, inside the test case's
        ContentType.objects.count()
        wait_past_thresholds()  # the transaction is the test case's: not idle_in_transaction
    wait_past_thresholds()
    [held] = pgleakguard.open_checkouts()
    assert (held.holder, held.transaction_status) == ("MainThread", "INTRANS")
    assert events == []


@pytest.mark.django_db(transaction=True)
def test_request_started_thread_that_ends_holding_its_connection(
    client: Client, events: EventLog
) -> None:
    assert client.get("/thread-leak/").status_code == 200
    [event] = events.wait_for("owner_exited")
    assert event.callsite == CallSite(VIEWS, marked_line(VIEWS, "export"), "export")
    assert event.holder == "export-job"
    close_from_here(views.LEAKED.pop())
    assert events.wait_returned().checkout_id == event.checkout_id


@pytest.mark.django_db(transaction=True)
def test_slow_request_is_held_too_long_and_its_persistent_connection_then_parked(
    install: Callable[..., EventLog],
) -> None:
    events = install(leak_threshold=0.2, idle_in_transaction_threshold=30)
    handler = WSGIHandler()
    with (
        database_settings(CONN_MAX_AGE=60),
        ThreadPoolExecutor(1, thread_name_prefix="gthread") as worker,
    ):
        assert worker.submit(wsgi_get, handler, "/slow/?seconds=0.6").result()[0] == "200 OK"
        [event] = events.wait_for("held_too_long")
        assert event.callsite == CallSite(VIEWS, marked_line(VIEWS, "slow-view"), "slow_report")
        # the request ended: Django keeps the connection, the application no longer holds it
        returned = events.wait_returned()
        assert (returned.checkout_id, returned.kinds) == (event.checkout_id, ("held_too_long",))
        [parked] = pgleakguard.open_checkouts()
        assert parked.backend_pid == event.backend_pid
        # the next request takes it again: a new checkout, quick this time
        assert worker.submit(wsgi_get, handler, "/slow/").result()[0] == "200 OK"
        [again] = pgleakguard.open_checkouts()
        assert again.backend_pid == event.backend_pid and again.checkout_id > event.checkout_id
        wait_past_thresholds(0.2)
        worker.submit(connections.close_all).result()
    assert [e.kind for e in events.leaks()] == ["held_too_long"]
