"""Settings of the Django tests. The conftest fills in the server from the ``pg_dsn`` fixture
(pytest-django then creates ``test_postgres`` on it)."""

from __future__ import annotations

from typing import Any

import django

SECRET_KEY = "pgleakguard-tests"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "pgleakguard.integrations.django"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "django_integration.urls"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

#: Django's native psycopg pool (OPTIONS "pool") exists from Django 5.1.
NATIVE_POOL = django.VERSION >= (5, 1)

DATABASES: dict[str, dict[str, Any]] = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "postgres",
        "USER": "postgres",
        "HOST": "",
        "CONN_MAX_AGE": 0,
    },
}
if NATIVE_POOL:
    DATABASES["pooled"] = {
        **DATABASES["default"],
        "OPTIONS": {"pool": {"min_size": 0, "max_size": 2, "timeout": 0.5}},
    }

PGLEAKGUARD = {"leak_threshold": 45, "idle_in_transaction_threshold": 20}
