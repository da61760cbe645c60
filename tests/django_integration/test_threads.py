"""Threads that keep their Django connection: ended threads, executor workers, idle
transactions, and what is still open at exit. Each report names the leaking line."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
from django.contrib.contenttypes.models import ContentType
from django.core.handlers.wsgi import WSGIHandler
from django.db import connection, connections, transaction

import pgleakguard
from pgleakguard import CallSite

from . import views
from .helpers import close_from_here, database_settings, session, wait_gone, wsgi_get
from conftest import EventLog, marked_line

HERE = __file__
VIEWS = views.__file__
pytestmark = pytest.mark.django_db(transaction=True)


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def test_thread_that_ends_without_closing_its_connection(events: EventLog, pg_dsn: str) -> None:
    kept: list[tuple[Any, int]] = []

    def nightly_export() -> None:
        ContentType.objects.count()  # leak: dj-thread
        kept.append((connections["default"], backend_pid()))

    job = threading.Thread(target=nightly_export, name="nightly-export")
    job.start()
    job.join()
    [event] = events.wait_for("owner_exited")
    wrapper, pid = kept[0]
    assert event.callsite == CallSite(HERE, marked_line(HERE, "dj-thread"), "nightly_export")
    assert (event.integration, event.pool, event.backend_pid) == ("django", None, pid)
    assert (event.holder, event.holder_kind) == ("nightly-export", "thread")
    assert not event.holder_alive
    assert event.severity == "definite"
    assert session(pg_dsn, pid) is not None  # the server really still has the session
    close_from_here(wrapper)
    assert events.wait_returned().checkout_id == event.checkout_id
    wait_gone(pg_dsn, pid)
    pgleakguard.check()
    assert [e.kind for e in events.leaks()] == ["owner_exited"]


def test_executor_worker_that_keeps_its_connection_is_held_too_long(
    install: Callable[..., EventLog],
) -> None:
    events = install(leak_threshold=0.3, idle_in_transaction_threshold=30)

    def refresh_report() -> int:
        ContentType.objects.count()  # leak: dj-executor
        return backend_pid()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reports") as executor:
        pid = executor.submit(refresh_report).result()
        [event] = events.wait_for("held_too_long")
        assert event.callsite == CallSite(HERE, marked_line(HERE, "dj-executor"), "refresh_report")
        assert (event.holder, event.holder_alive, event.backend_pid) == ("reports_0", True, pid)
        assert event.severity == "suspected"
        assert event.holder_stack  # what the idle worker is doing now
        executor.submit(connections.close_all).result()
        returned = events.wait_returned()
    assert returned.checkout_id == event.checkout_id
    assert returned.kinds == ("held_too_long",)
    assert [e.kind for e in events.leaks()] == ["held_too_long"]


def test_worker_idle_inside_a_transaction(install: Callable[..., EventLog]) -> None:
    events = install(leak_threshold=30, idle_in_transaction_threshold=0.3)
    reported = threading.Event()

    def import_batch() -> None:
        try:
            with transaction.atomic():  # leak: dj-idle
                ContentType.objects.count()
                reported.wait(10)
        finally:
            connections.close_all()

    worker = threading.Thread(target=import_batch, name="importer")
    worker.start()
    try:
        [event] = events.wait_for("idle_in_transaction")
    finally:
        reported.set()
        worker.join()
    assert event.callsite == CallSite(HERE, marked_line(HERE, "dj-idle"), "import_batch")
    assert event.transaction_status == "INTRANS"
    assert events.wait_returned().kinds == ("idle_in_transaction",)


def test_main_threads_transaction_left_idle_outside_requests_is_idle_in_transaction(
    install: Callable[..., EventLog],
) -> None:
    # a management command, a cron job, a Celery prefork task: the main thread's connection
    events = install(leak_threshold=0.1, idle_in_transaction_threshold=0.2)
    ContentType.objects.count()  # its age is no leak: it is Django's for the process
    with transaction.atomic():
        ContentType.objects.filter(app_label="auth").count()  # leak: dj-main-idle
        [first] = events.wait_for("idle_in_transaction")
    with transaction.atomic():
        ContentType.objects.filter(app_label="admin").count()  # leak: dj-main-idle-2
        second = events.wait_for("idle_in_transaction", count=2)[1]
    name = "test_main_threads_transaction_left_idle_outside_requests_is_idle_in_transaction"
    assert first.callsite == CallSite(HERE, marked_line(HERE, "dj-main-idle"), name)
    assert second.callsite == CallSite(HERE, marked_line(HERE, "dj-main-idle-2"), name)
    assert second.checkout_id > first.checkout_id  # each transaction is a checkout of its own
    for event in (first, second):
        assert (event.holder, event.transaction_status) == ("MainThread", "INTRANS")
        assert event.severity == "suspected"
    ContentType.objects.count()  # committed: nothing to report, however long it stays open
    pgleakguard.check()
    assert [e.kind for e in events.leaks()] == ["idle_in_transaction"] * 2
    [held] = pgleakguard.open_checkouts()
    assert (held.holder, held.transaction_status) == ("MainThread", "IDLE")


def test_persistent_connection_of_an_ended_worker_thread_is_owner_exited_after_leak_threshold(
    install: Callable[..., EventLog],
) -> None:
    # A thread that ends with its persistent connection parked: leaked until the garbage
    # collector frees it; but a stopping worker (gunicorn gthread at max_requests) takes it
    # down with its process in a moment, so it is reported only if still open leak_threshold
    # after the watchdog saw the end.
    events = install(leak_threshold=2.0, idle_in_transaction_threshold=30)
    handler = WSGIHandler()
    kept: list[tuple[Any, int]] = []

    def worker() -> None:
        for _ in range(3):
            status, body = wsgi_get(handler, "/pid/")
        kept.append((connections["default"], int(body)))

    with database_settings(CONN_MAX_AGE=60):
        thread = threading.Thread(target=worker, name="gthread-1")
        thread.start()
        thread.join()
        ended = time.time()
        pgleakguard.check()
        assert events == []
        [event] = events.wait_for("owner_exited")
    wrapper, pid = kept[0]
    assert event.detected_at - ended >= 2.0
    assert event.callsite == CallSite(VIEWS, marked_line(VIEWS, "pid-view"), "backend_pid")
    assert (event.holder, event.holder_alive, event.backend_pid) == ("gthread-1", False, pid)
    close_from_here(wrapper)
    assert events.wait_returned().checkout_id == event.checkout_id
    assert [e.kind for e in events.leaks()] == ["owner_exited"]


_RECYCLED_WORKER_SCRIPT = """
import threading, wsgiref.util, django
from django.conf import settings
from django.http import HttpResponse
from django.urls import path

def view(request):
    from django.db import connection
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return HttpResponse("ok")

urlpatterns = [path("", view)]
settings.configure(
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],
    INSTALLED_APPS=["pgleakguard.integrations.django"],
    PGLEAKGUARD={"leak_threshold": 60, "idle_in_transaction_threshold": 0.04},
    DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", "NAME": %(name)r,
                           "USER": %(user)r, "HOST": %(host)r, "PORT": %(port)r,
                           "CONN_MAX_AGE": 60}},
)
django.setup()
import pgleakguard
from django.core.handlers.wsgi import WSGIHandler

handler = WSGIHandler()

def serve():
    for _ in range(3):
        environ = {}
        wsgiref.util.setup_testing_defaults(environ)
        response = handler(environ, lambda status, headers: None)
        b"".join(response)
        response.close()

worker = threading.Thread(target=serve, name="gthread-1")
worker.start()
worker.join()  # the worker reached max_requests: its threads end, then its process
scans = pgleakguard.stats()["watchdog_scans"]
while pgleakguard.stats()["watchdog_scans"] < scans + 3:  # the watchdog sees the ended thread
    threading.Event().wait(0.01)
print("parked:", len(pgleakguard.open_checkouts()))
"""


def _run_django_script(script: Path, source: str) -> subprocess.CompletedProcess[str]:
    """Write ``source`` (with the test database's settings filled in) to ``script`` and run it
    in a Python process of its own."""
    db = connections["default"].settings_dict
    script.write_text(
        source % {"name": db["NAME"], "user": db["USER"], "host": db["HOST"], "port": db["PORT"]}
    )
    return subprocess.run(
        [sys.executable, str(script)],
        env=dict(os.environ, PYTHONPATH=str(Path(pgleakguard.__file__).parent.parent)),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_worker_that_stops_with_its_persistent_connections_reports_nothing(
    tmp_path: Path,
) -> None:
    script = tmp_path / "recycled_worker.py"
    proc = _run_django_script(script, _RECYCLED_WORKER_SCRIPT)
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout, proc.stderr) == ("parked: 1\n", "")


_EXIT_SCRIPT = """
import threading, django
from django.conf import settings
settings.configure(
    INSTALLED_APPS=["pgleakguard.integrations.django"],
    PGLEAKGUARD={"leak_threshold": 60},
    DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", "NAME": %(name)r,
                           "USER": %(user)r, "HOST": %(host)r, "PORT": %(port)r}},
)
django.setup()
from django.db import connection

def poller():
    connection.ensure_connection()  # leak: dj-exit
    stop.wait()

stop = threading.Event()
threading.Thread(target=poller, name="poller", daemon=True).start()
connection.ensure_connection()  # the main thread's connection: Django's to keep
while len(__import__("pgleakguard").open_checkouts()) < 2:
    threading.Event().wait(0.01)
"""


def test_worker_connection_open_at_exit_is_never_closed_but_the_main_threads_is_not(
    tmp_path: Path,
) -> None:
    script = tmp_path / "exit_with_connections.py"
    proc = _run_django_script(script, _EXIT_SCRIPT)
    assert proc.returncode == 0, proc.stderr
    line = marked_line(str(script), "dj-exit")
    assert proc.stderr.count("pgleakguard: connection leak") == 1, proc.stderr
    assert f"[never_closed, definite] checked out at {script}:{line} in poller" in proc.stderr


_PSYCOPG2_SCRIPT = """
import sys, threading
sys.modules["psycopg"] = None  # as on a machine with psycopg2 only: Django picks psycopg2
import django
from django.conf import settings
settings.configure(
    INSTALLED_APPS=["pgleakguard.integrations.django"],
    PGLEAKGUARD={"leak_threshold": 60, "service": "legacy"},
    DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", "NAME": %(name)r,
                           "USER": %(user)r, "HOST": %(host)r, "PORT": %(port)r}},
)
django.setup()
import pgleakguard
from django.db import connection
assert connection.Database.__name__ == "psycopg2"

def job():
    with connection.cursor() as cursor:  # leak: dj-psycopg2
        cursor.execute("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        print("server-side:", cursor.fetchone()[0])

worker = threading.Thread(target=job, name="legacy-job")
worker.start()
worker.join()
pgleakguard.check()
"""


def test_psycopg2_backend_is_tracked_and_tagged(tmp_path: Path) -> None:
    db = connections["default"].settings_dict
    script = tmp_path / "psycopg2_backend.py"
    script.write_text(
        _PSYCOPG2_SCRIPT
        % {"name": db["NAME"], "user": db["USER"], "host": db["HOST"], "port": db["PORT"]}
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        env=dict(os.environ, PYTHONPATH=str(Path(pgleakguard.__file__).parent.parent)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    line = marked_line(str(script), "dj-psycopg2")
    assert f"[owner_exited, definite] checked out at {script}:{line} in job" in proc.stderr
    assert "integration=django" in proc.stderr
    child_pid = proc.stdout.split("server-side: legacy/pid:")[1].split()[0]
    assert f"application_name=legacy/pid:{child_pid}" in proc.stderr
