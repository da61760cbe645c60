"""A minimal project with pgleakguard in INSTALLED_APPS. The database is $DATABASE_URL
(``pgleakguard demo`` sets it to a throwaway PostgreSQL)."""

from __future__ import annotations

import os
from typing import Any

import django
from psycopg.conninfo import conninfo_to_dict

SECRET_KEY = "leakdemo-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "leakdemo.urls"
INSTALLED_APPS = ["leakdemo", "pgleakguard.integrations.django"]
MIDDLEWARE: list[str] = []

_db = conninfo_to_dict(os.environ.get("DATABASE_URL", ""))
DATABASES: dict[str, dict[str, Any]] = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _db.get("dbname") or "postgres",
        "USER": _db.get("user") or "",
        "PASSWORD": _db.get("password") or "",
        "HOST": _db.get("host") or "",
        "PORT": str(_db.get("port") or ""),
    },
}
if django.VERSION >= (5, 1):  # Django's native psycopg pool
    DATABASES["reports"] = {
        **DATABASES["default"],
        "OPTIONS": {"pool": {"name": "reports", "min_size": 1, "max_size": 2, "timeout": 1.0}},
    }

# pgleakguard's options (the names of pgleakguard.install()); the service defaults to
# the project's name, "leakdemo".
PGLEAKGUARD = {"leak_threshold": 5}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(message)s\n"}},
    "handlers": {
        "stdout": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stdout",
            "formatter": "plain",
        }
    },
    "loggers": {"pgleakguard": {"handlers": ["stdout"], "level": "INFO", "propagate": False}},
}
