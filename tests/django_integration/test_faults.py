"""Fault injection in the Django glue: requests (WSGI and ASGI), the ORM, a thread's
connection, an atomic block and the native pool answer exactly as without pgleakguard; the
fault is logged once and counted."""

from __future__ import annotations

import logging
from typing import Any, Callable

import pytest
from asgiref.sync import async_to_sync
from django.apps import apps
from django.conf import settings
from django.contrib.contenttypes.models import ContentType
from django.core import checks
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler
from django.db import connection, connections, transaction
from django.test import Client

import pgleakguard
from pgleakguard import _safety
from pgleakguard.integrations import django as django_hooks

from . import views
from .helpers import asgi_get, database_settings, wsgi_get
from conftest import EventLog

NATIVE_POOL = settings.NATIVE_POOL
pytestmark = [
    pytest.mark.allow_internal_errors,
    pytest.mark.django_db(
        transaction=True, databases=["default", "pooled"] if NATIVE_POOL else ["default"]
    ),
]


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected fault")


FAULTS = [
    ("first use of a connection", django_hooks.DjangoIntegration, "touched"),
    ("tracking a connection", django_hooks.DjangoIntegration, "_track"),
    ("close", django_hooks.DjangoIntegration, "closed"),
    ("connection parameters (tag)", django_hooks.DjangoIntegration, "tagged"),
    ("request end check", django_hooks.DjangoIntegration, "_check"),
    ("parking between requests", django_hooks.DjangoIntegration, "_park_thread_connections"),
    ("main thread outside requests", django_hooks.DjangoIntegration, "_main_thread_use"),
    ("naming what Django took first", django_hooks.DjangoIntegration, "named_later"),
    ("call-site capture", django_hooks, "capture"),
    ("request description", django_hooks, "_describe"),
    ("sync_to_async's awaiting task", django_hooks, "_awaiting_here"),
    ("ASGI persistent-connection check", django_hooks, "persistent_connections_under_asgi"),
]


def workload(client: Client) -> list[Any]:
    """What a Django project does: requests (WSGI, ASGI, ATOMIC_REQUESTS), the ORM, a
    thread, atomic blocks, a close, and the native pool."""
    out: list[Any] = []
    response = client.get("/count/")
    out.append((response.status_code, response.content))
    status, body = wsgi_get(WSGIHandler(), "/count/")
    out.append((status, body))
    with database_settings(ATOMIC_REQUESTS=True):
        out.append(wsgi_get(WSGIHandler(), "/count/"))
    out.append(async_to_sync(asgi_get)(ASGIHandler(), "/async-count/"))
    out.append(client.get("/thread-leak/").status_code)
    with transaction.atomic():
        out.append(ContentType.objects.filter(app_label="contenttypes").count())
    connection.close()
    out.append(ContentType.objects.count() > 0)
    if NATIVE_POOL:
        out.append(ContentType.objects.using("pooled").count() > 0)
        out.append(async_to_sync(asgi_get)(ASGIHandler(), "/async-pooled/"))
        out.append(client.get("/pooled-leak/").status_code)
        connections["pooled"].close()
    for leaked in views.LEAKED:
        if leaked is not connections["default"]:
            leaked.inc_thread_sharing()
            leaked.close()
    views.LEAKED.clear()
    return out


@pytest.fixture
def expected(client: Client, pooled: Any) -> list[Any]:
    pgleakguard.uninstall()
    return workload(client)  # without pgleakguard


@pytest.mark.parametrize(("where", "owner", "name"), FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_never_changes_what_django_answers(
    where: str,
    owner: Any,
    name: str,
    client: Client,
    expected: list[Any],
    install: Callable[..., EventLog],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    connection.close()  # the next use opens a new connection, under the fault
    monkeypatch.setattr(owner, name, _boom)
    _safety.forget_logged()
    install(leak_threshold=60, idle_in_transaction_threshold=60)
    before = _safety.internal_error_count()
    with caplog.at_level(logging.ERROR, logger="pgleakguard"):
        got = workload(client)
        got_again = workload(client)
    assert got == expected
    assert got_again == expected
    errors = _safety.internal_error_count() - before
    assert errors >= 1, f"the fault in {where} was never hit"
    logged = [r for r in caplog.records if "pgleakguard internal error" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]  # once, not once per call


def test_fault_in_the_apps_ready_never_stops_django(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, client: Client
) -> None:
    monkeypatch.setattr(django_hooks, "settings_options", _boom)
    _safety.forget_logged()
    before = _safety.internal_error_count()
    with caplog.at_level(logging.ERROR, logger="pgleakguard"):
        apps.get_app_config("pgleakguard").ready()  # what django.setup() runs
    assert _safety.internal_error_count() - before == 1
    assert [r.getMessage() for r in caplog.records] == [
        "pgleakguard internal error (your code was not affected; "
        "further errors from this place are only counted)"
    ]
    assert not pgleakguard.stats()["installed"]
    [warning] = [m for m in checks.run_checks() if m.id == "pgleakguard.W001"]
    assert warning.msg == (
        "pgleakguard is not installed: internal error RuntimeError('injected fault') "
        "(logged on the pgleakguard logger)"
    )
    assert client.get("/count/").status_code == 200  # the project runs on
    monkeypatch.undo()
    apps.get_app_config("pgleakguard").ready()
    assert [m for m in checks.run_checks() if m.id == "pgleakguard.W001"] == []
