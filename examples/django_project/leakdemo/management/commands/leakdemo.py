"""``python manage.py leakdemo``: request the leaking views and show pgleakguard's reports."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import OperationalError, connections
from django.test import Client

import pgleakguard
from leakdemo import views


class Command(BaseCommand):  # type: ignore[misc]
    help = "Request the leaking views in-process and print what pgleakguard reports."

    def handle(self, *args: Any, **options: Any) -> None:
        client = Client()
        self.stdout.write("== GET /export/: a background export ends holding its connection\n")
        client.get("/export/")
        pgleakguard.check()  # the watchdog reports it within a second; report it now
        if "reports" in settings.DATABASES:
            self.stdout.write("== GET /pooled-export/ twice: each export keeps a pool connection\n")
            client.get("/pooled-export/")
            client.get("/pooled-export/")
            pgleakguard.check()
            self.stdout.write("== GET /pooled/: the pool is empty\n")
            try:
                client.get("/pooled/")
            except OperationalError as exc:  # Django's wrapper around psycopg_pool.PoolTimeout
                self.stdout.write(f"PoolTimeout: {exc}\n")
        for _, wrapper in views.JOB_STATE:  # what the jobs should have done
            wrapper.inc_thread_sharing()
            wrapper.close()
        pgleakguard.check()
        if "reports" in settings.DATABASES:
            connections["reports"].close_pool()
