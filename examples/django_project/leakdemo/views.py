"""Views that start background jobs which forget their database connection."""

from __future__ import annotations

import itertools
import threading
from typing import Any

from django.db import connections
from django.http import HttpRequest, HttpResponse

#: Kept by the jobs between runs; by mistake this keeps their connections too (without it
#: the garbage collector would close them some time later: still a leak, reported as such).
JOB_STATE: list[Any] = []
_pooled_runs = itertools.count(1)


def export_report(alias: str) -> None:
    """Background job: counts sessions and ends without closing its thread's connection."""
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity")
        JOB_STATE.append((cursor.fetchone(), connections[alias]))  # BUG: and no close()


def start_export(request: HttpRequest) -> HttpResponse:
    """Starts the export in a background thread and answers at once."""
    job = threading.Thread(target=export_report, args=("default",), name="export-job")
    job.start()
    job.join()  # only so that the demo's output comes in order
    return HttpResponse("export started\n", status=202)


def start_pooled_export(request: HttpRequest) -> HttpResponse:
    """The same job on the pooled database: each run keeps one of the pool's connections."""
    job = threading.Thread(
        target=export_report, args=("reports",), name=f"pooled-export-{next(_pooled_runs)}"
    )
    job.start()
    job.join()
    return HttpResponse("pooled export started\n", status=202)


def pooled_status(request: HttpRequest) -> HttpResponse:
    """An ordinary request on the pooled database."""
    with connections["reports"].cursor() as cursor:
        cursor.execute("SELECT 1")
    return HttpResponse("ok\n")
