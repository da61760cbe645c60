"""Fault injection in the Django glue: requests (WSGI and ASGI), the ORM, a thread's
connection, an atomic block and the native pool answer exactly as without pgleakguard; the
fault is logged once and counted."""

from __future__ import annotations

import logging
from typing import Any, Callable

import pytest
from asgiref.sync import async_to_sync
from django.contrib.contenttypes.models import ContentType
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler
from django.db import connection, connections, transaction
from django.test import Client

import pgleakguard
from pgleakguard import _safety
from pgleakguard.integrations import django as django_hooks

from . import views
from .helpers import asgi_get, wsgi_get
from conftest import EventLog

pytestmark = [pytest.mark.allow_internal_errors, pytest.mark.django_db(transaction=True)]


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected fault")


FAULTS = [
    ("first use of a connection", django_hooks.DjangoIntegration, "touched"),
    ("close", django_hooks.DjangoIntegration, "closed"),
    ("connection parameters (tag)", django_hooks.DjangoIntegration, "tagged"),
    ("request end check", django_hooks.DjangoIntegration, "_check"),
    ("parking between requests", django_hooks.DjangoIntegration, "_park_thread_connections"),
    ("request description", django_hooks, "_describe"),
]


def workload(client: Client) -> list[Any]:
    """What a Django project does: requests, the ORM, a thread, atomic blocks, a close."""
    out: list[Any] = []
    response = client.get("/count/")
    out.append((response.status_code, response.content))
    status, body = wsgi_get(WSGIHandler(), "/count/")
    out.append((status, body))
    out.append(async_to_sync(asgi_get)(ASGIHandler(), "/async-count/"))
    out.append(client.get("/thread-leak/").status_code)
    with transaction.atomic():
        out.append(ContentType.objects.filter(app_label="contenttypes").count())
    connection.close()
    out.append(ContentType.objects.count() > 0)
    for leaked in views.LEAKED:
        if leaked is not connections["default"]:
            leaked.inc_thread_sharing()
            leaked.close()
    views.LEAKED.clear()
    return out


@pytest.fixture
def expected(client: Client) -> list[Any]:
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
