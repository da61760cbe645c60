"""pgleakguard: find PostgreSQL connection leaks and name the line of code that caused them.

import pgleakguard
pgleakguard.install(service="billing")

The names below, and the public submodules ``pgleakguard.tagging`` (build and read the
application_name and SQL-comment tags) and ``pgleakguard.testing`` (``assert_no_leaks()``),
are imported on first use, so that importing the package (as pytest does for the plugin, in
every test run) costs next to nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from . import tagging as tagging  # submodules, resolved lazily below
    from . import testing as testing
    from ._runtime import check, install, instrument_engine, open_checkouts, stats, uninstall
    from .callsite import CallSite
    from .config import Config
    from .events import (
        GARBAGE_COLLECTED,
        HELD_TOO_LONG,
        IDLE_IN_TRANSACTION,
        LEAK_KINDS,
        NEVER_CLOSED,
        OWNER_EXITED,
        SCOPE_ENDED,
        CheckoutInfo,
        Event,
        LeakEvent,
        ReturnedEvent,
    )
    from .integrations import DidNotEnable
    from .server import Correlation, ServerError, correlate

# Where each public name lives: module -> names.
_HOMES = {
    "_runtime": "check install instrument_engine open_checkouts stats uninstall",
    "callsite": "CallSite",
    "config": "Config",
    "events": "GARBAGE_COLLECTED HELD_TOO_LONG IDLE_IN_TRANSACTION LEAK_KINDS NEVER_CLOSED "
    "OWNER_EXITED SCOPE_ENDED CheckoutInfo Event LeakEvent ReturnedEvent",
    "integrations": "DidNotEnable",
    "server": "Correlation ServerError correlate",
}
_HOME = {name: module for module, names in _HOMES.items() for name in names.split()}

# Submodules the documentation tells users to reach as ``pgleakguard.<name>`` after a plain
# ``import pgleakguard``.
_SUBMODULES = frozenset({"tagging", "testing"})

__all__ = [
    "GARBAGE_COLLECTED",
    "HELD_TOO_LONG",
    "IDLE_IN_TRANSACTION",
    "LEAK_KINDS",
    "NEVER_CLOSED",
    "OWNER_EXITED",
    "SCOPE_ENDED",
    "CallSite",
    "CheckoutInfo",
    "Config",
    "Correlation",
    "DidNotEnable",
    "Event",
    "LeakEvent",
    "ReturnedEvent",
    "ServerError",
    "__version__",
    "check",
    "correlate",
    "install",
    "instrument_engine",
    "open_checkouts",
    "stats",
    "uninstall",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        # Importing a submodule binds it as an attribute of the package.
        return importlib.import_module(f"{__name__}.{name}")
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'pgleakguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})
