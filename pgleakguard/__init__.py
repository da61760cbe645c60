"""pgleakguard: find PostgreSQL connection leaks and name the line of code that caused them.

import pgleakguard
pgleakguard.install(service="billing")

The names below are imported on first use, so that importing the package (as pytest does
for the plugin, in every test run) costs next to nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
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
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'pgleakguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
