"""Integrations: small classes that connect a library's hooks to the core tracker.

Each integration module imports its library at the top and raises :class:`DidNotEnable`
when it is missing. Auto-detection skips those quietly; an integration the user named
re-raises it. Every patch goes through :class:`Patcher`, so uninstall restores exactly
what was replaced.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, ClassVar

from ..tracker import Tracker

logger = logging.getLogger("pgleakguard")

#: identifier -> (module, class), in the order auto-detection enables them.
AVAILABLE: dict[str, tuple[str, str]] = {
    "psycopg": ("pgleakguard.integrations.psycopg", "PsycopgIntegration"),
    "psycopg_pool": ("pgleakguard.integrations.psycopg_pool", "PsycopgPoolIntegration"),
    "sqlalchemy": ("pgleakguard.integrations.sqlalchemy", "SQLAlchemyIntegration"),
    "django": ("pgleakguard.integrations.django", "DjangoIntegration"),
}
#: Integrations that see more with another one enabled (enabled too when installed).
COMPANIONS: dict[str, tuple[str, ...]] = {
    "psycopg_pool": ("psycopg",),
    "sqlalchemy": ("psycopg",),
    "django": ("psycopg", "psycopg_pool"),
}

_MISSING = object()


class DidNotEnable(Exception):
    """The integration cannot be enabled (its library is missing or too old)."""

    __module__ = "pgleakguard"


class Patcher:
    """Replaces class or module attributes and puts back exactly what was there."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any, Any]] = []

    def patch(self, owner: Any, name: str, replacement: Any) -> Any:
        """Set ``owner.name = replacement``; return the attribute it replaces (as looked up)."""
        original = getattr(owner, name)
        self._saved.append((owner, name, vars(owner).get(name, _MISSING), replacement))
        setattr(owner, name, replacement)
        return original

    def restore(self) -> None:
        """Undo every patch, newest first. An attribute another instrumentation has wrapped
        around ours since (``__wrapped__`` leads to ours, as functools.wraps and wrapt set
        it) is left alone: putting the original back would drop its wrapper. Our hook stays
        in its chain then."""
        while self._saved:
            owner, name, value, replacement = self._saved.pop()
            if _wraps(vars(owner).get(name), replacement):
                logger.debug(
                    "pgleakguard: %s.%s is wrapped by another instrumentation since "
                    "pgleakguard hooked it; left as is",
                    getattr(owner, "__name__", owner),
                    name,
                )
            elif value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


def _wraps(current: Any, ours: Any) -> bool:
    """Whether ``current`` is a wrapper around ``ours`` (not ours itself, nor what another
    tool's unwrap left of ours: OpenTelemetry's puts back a bound method)."""
    for _ in range(10):  # a chain of wrappers, not a cycle
        current = getattr(current, "__wrapped__", None)
        if current is None:
            return False
        if current is ours:
            return True
    return False


class Integration:
    """Base class: ``setup()`` hooks the library, ``teardown()`` unhooks it."""

    identifier: ClassVar[str]

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.patcher = Patcher()

    def setup(self) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        self.patcher.restore()


def enable(
    names: tuple[str, ...], tracker: Tracker, enabled_already: tuple[str, ...] = ()
) -> list[Integration]:
    """Enable ``names`` (or every available library for ``("auto",)``), with their
    companions, leaving out those in ``enabled_already``."""
    auto = names == ("auto",)
    wanted: list[tuple[str, bool]] = []  # (name, asked for by name)
    for name in AVAILABLE if auto else names:
        for companion in COMPANIONS.get(name, ()):
            if all(companion != n for n, _ in wanted):
                wanted.append((companion, False))
        wanted = [(n, named) for n, named in wanted if n != name]
        wanted.append((name, not auto))
    wanted = [(n, named) for n, named in wanted if n not in enabled_already]
    enabled: list[Integration] = []
    try:
        for name, named in wanted:
            if name not in AVAILABLE:
                raise DidNotEnable(f"pgleakguard: the {name!r} integration is not available yet")
            module_name, class_name = AVAILABLE[name]
            try:
                cls = getattr(importlib.import_module(module_name), class_name)
            except DidNotEnable:
                if not named:
                    logger.debug("pgleakguard: %s not installed, skipping", name)
                    continue
                raise
            integration: Integration = cls(tracker)
            integration.setup()
            enabled.append(integration)
    except BaseException:
        for integration in reversed(enabled):
            integration.teardown()
        raise
    return enabled
