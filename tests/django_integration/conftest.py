"""Django for this directory only: its settings are loaded when pytest collects it, and the
database settings are filled in from ``pg_dsn`` before pytest-django creates the test
database. The rest of the suite runs as without Django."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import django
import pytest
from psycopg.conninfo import conninfo_to_dict

import pgleakguard

# Load the settings module without leaving DJANGO_SETTINGS_MODULE to other tests' children.
os.environ["DJANGO_SETTINGS_MODULE"] = "django_integration.settings"
try:
    django.setup()
finally:
    del os.environ["DJANGO_SETTINGS_MODULE"]
pgleakguard.uninstall()  # the app installed it from settings; each test installs its own

from django.conf import settings  # noqa: E402
from django.db import connections  # noqa: E402

from . import views  # noqa: E402


@pytest.fixture(scope="session")
def django_db_modify_db_settings(
    django_db_modify_db_settings_parallel_suffix: None, pg_dsn: str
) -> None:
    """Point every alias at the ``pg_dsn`` server (a Unix socket dir or a host)."""
    params = conninfo_to_dict(pg_dsn)
    for db in settings.DATABASES.values():
        db["NAME"] = params.get("dbname") or "postgres"
        db["USER"] = params.get("user") or ""
        db["PASSWORD"] = params.get("password") or ""
        db["HOST"] = params.get("host") or ""
        db["PORT"] = str(params.get("port") or "")


@pytest.fixture(autouse=True)
def _forget_leaked() -> Iterator[None]:
    yield
    views.LEAKED.clear()
    views.RELEASE.clear()


@pytest.fixture(scope="session")
def _pools_closed_before_the_test_database_is_dropped(django_db_setup: None) -> Iterator[None]:
    yield
    if settings.NATIVE_POOL:
        connections["pooled"].close_pool()


@pytest.fixture
def pooled(_pools_closed_before_the_test_database_is_dropped: None) -> Iterator[Any]:
    """The ``pooled`` alias (native pool, max_size 2, timeout 0.5 s), with a fresh pool;
    ``None`` before Django 5.1, which has no native pool."""
    if not settings.NATIVE_POOL:
        yield None
        return
    wrapper = connections["pooled"]
    wrapper.close()
    wrapper.close_pool()
    yield wrapper
    wrapper.close()
