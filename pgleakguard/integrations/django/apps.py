"""The Django app: ``"pgleakguard.integrations.django"`` in INSTALLED_APPS installs
pgleakguard when Django starts, with the options of ``settings.PGLEAKGUARD``."""

from __future__ import annotations

import logging
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core import checks

from ..._safety import record_internal_error, safe_call

logger = logging.getLogger("pgleakguard")

_install_error: str | None = None


class PgLeakGuardConfig(AppConfig):  # type: ignore[misc]
    """Installs pgleakguard in :meth:`ready`."""

    name = "pgleakguard.integrations.django"
    label = "pgleakguard"
    verbose_name = "pgleakguard"

    def ready(self) -> None:
        """Install from ``settings.PGLEAKGUARD`` then ``PGLEAKGUARD_*``. An installation made
        earlier (``pgleakguard run``, or ``install()`` in your code) is kept when the setting
        is absent. A bad option is logged and reported by ``manage.py check``; it never
        stops the project."""
        global _install_error
        import pgleakguard

        from . import settings_options

        checks.register(check_installed, "pgleakguard")
        checks.register(check_persistent_connections_under_asgi, "pgleakguard")
        if pgleakguard.stats()["installed"] and not getattr(settings, "PGLEAKGUARD", None):
            return
        try:
            pgleakguard.install(**settings_options())
        except (TypeError, ValueError, pgleakguard.DidNotEnable) as exc:
            _install_error = str(exc)
            logger.error("pgleakguard is not installed: %s", exc)
        except Exception as exc:  # a bug of ours: Django starts all the same
            _install_error = f"internal error {exc!r} (logged on the pgleakguard logger)"
            record_internal_error(exc)
        else:
            _install_error = None


def check_installed(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """System check: a warning when settings.PGLEAKGUARD kept pgleakguard from installing."""
    if _install_error is None:
        return []
    return [
        checks.Warning(
            f"pgleakguard is not installed: {_install_error}",
            hint="Fix settings.PGLEAKGUARD or the PGLEAKGUARD_* environment variables.",
            id="pgleakguard.W001",
        )
    ]


def check_persistent_connections_under_asgi(
    app_configs: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """System check: a warning for persistent connections (CONN_MAX_AGE > 0 or None) when
    the project is served over ASGI, where Django leaks one per request (Django's docs say
    to disable them under ASGI)."""
    from . import persistent_connections_under_asgi

    found: list[tuple[str, str]] = safe_call(persistent_connections_under_asgi, default=[])
    return [checks.Warning(problem, hint=fix, id="pgleakguard.W002") for problem, fix in found]
