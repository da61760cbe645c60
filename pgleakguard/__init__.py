"""pgleakguard: find PostgreSQL connection leaks and name the line of code that caused them.

import pgleakguard
pgleakguard.install(service="billing")
"""

from __future__ import annotations

from ._runtime import check, install, instrument_engine, open_checkouts, stats, uninstall
from ._version import __version__
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
from .server import Correlation, correlate

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
    "__version__",
    "check",
    "correlate",
    "install",
    "instrument_engine",
    "open_checkouts",
    "stats",
    "uninstall",
]
