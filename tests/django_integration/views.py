"""Views of the Django tests. ``# leak: NAME`` marks the line each leak must be reported at."""

from __future__ import annotations

import threading
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib.contenttypes.models import ContentType
from django.db import connections, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse

import pgleakguard

#: What the leaking code keeps (atomic blocks, connections), so tests can clean up.
LEAKED: list[Any] = []


def ping(request: HttpRequest) -> HttpResponse:
    return HttpResponse("pong")


def count(request: HttpRequest) -> HttpResponse:
    return HttpResponse(str(ContentType.objects.count()))


def atomic_leak(request: HttpRequest) -> HttpResponse:
    block = transaction.atomic()
    block.__enter__()  # leak: atomic-view
    ContentType.objects.count()
    LEAKED.append(block)  # BUG: never exited
    return HttpResponse("ok")


def export(alias: str) -> None:
    """Background job: queries and ends without closing its thread's connection."""
    ContentType.objects.using(alias).count()  # leak: export
    LEAKED.append(connections[alias])


def thread_leak(request: HttpRequest) -> HttpResponse:
    job = threading.Thread(target=export, args=("default",), name="export-job")
    job.start()
    job.join()
    return HttpResponse("started")


def pooled_count(request: HttpRequest) -> JsonResponse:
    """Counts through the native pool; answers with what pgleakguard sees held meanwhile."""
    n = ContentType.objects.using("pooled").count()  # leak: pooled-view
    held = [
        [c.integration, c.pool, c.callsite.file, c.callsite.line, c.holder]
        for c in pgleakguard.open_checkouts()
    ]
    return JsonResponse({"count": n, "held": held})


def pooled_leak(request: HttpRequest) -> HttpResponse:
    name = f"pooled-export-{len(LEAKED) + 1}"
    job = threading.Thread(target=export, args=("pooled",), name=name)
    job.start()
    job.join()
    return HttpResponse("started")


async def async_count(request: HttpRequest) -> HttpResponse:
    n = await ContentType.objects.acount()  # leak: async-count
    return HttpResponse(str(n))


def unclosed_query() -> int:
    """Runs in the default executor: nothing closes that thread's connection."""
    n = ContentType.objects.count()  # leak: executor-query
    LEAKED.append(connections["default"])
    return n


async def async_executor_leak(request: HttpRequest) -> HttpResponse:
    n = await sync_to_async(unclosed_query, thread_sensitive=False)()
    return HttpResponse(str(n))


def unreturned_pooled_query() -> int:
    """Runs in the default executor: nothing gives that thread's pool connection back."""
    n = ContentType.objects.using("pooled").count()  # leak: executor-pooled
    LEAKED.append(connections["pooled"])
    return n


async def async_executor_pooled_leak(request: HttpRequest) -> HttpResponse:
    n = await sync_to_async(unreturned_pooled_query, thread_sensitive=False)()
    return HttpResponse(str(n))


async def async_pooled_count(request: HttpRequest) -> HttpResponse:
    n = await ContentType.objects.using("pooled").acount()
    return HttpResponse(str(n))


def backend_pid(request: HttpRequest) -> HttpResponse:
    with connections["default"].cursor() as cursor:  # leak: pid-view
        cursor.execute("SELECT pg_backend_pid()")
        return HttpResponse(str(cursor.fetchone()[0]))


def slow_report(request: HttpRequest) -> HttpResponse:
    """Holds its connection for a while, then finishes normally."""
    n = ContentType.objects.count()  # leak: slow-view
    threading.Event().wait(float(request.GET.get("seconds", "0")))
    return HttpResponse(str(n))


#: Set by a test to let ``held_until_released`` finish.
RELEASE = threading.Event()


def held_until_released(request: HttpRequest) -> HttpResponse:
    """Queries, then waits (as for a slow API) until the test releases it."""
    n = ContentType.objects.count()  # leak: held-view
    RELEASE.wait(10)
    return HttpResponse(str(n))
