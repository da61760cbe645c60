"""Where events go: the ``pgleakguard`` logger, a user callback, a JSON-lines file."""

from __future__ import annotations

import json
import logging
import threading
from typing import Callable

from ._safety import guard
from .config import Config
from .events import Event, LeakEvent

logger = logging.getLogger("pgleakguard")

Sink = Callable[[Event], None]


class LoggingSink:
    """Logs each leak's rendered report at ``level`` (returns at INFO)."""

    def __init__(self, level: str = "WARNING") -> None:
        self.level = logging.getLevelName(level)

    def __call__(self, event: Event) -> None:
        level = self.level if isinstance(event, LeakEvent) else logging.INFO
        logger.log(level, "%s", event.render())


class JsonLinesSink:
    """Appends ``event.as_dict()`` as one JSON object per line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        line = json.dumps(event.as_dict(), default=str, sort_keys=True)
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


class Dispatcher:
    """Hands each event to every sink; one failing sink never starves the others."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def __call__(self, event: Event) -> None:
        for sink in self.sinks:
            with guard():
                sink(event)


def sinks_for(config: Config) -> list[Sink]:
    """The sinks a configuration asks for: logging always, then callback and JSON file."""
    sinks: list[Sink] = [LoggingSink(config.log_level)]
    if config.on_leak is not None:
        sinks.append(config.on_leak)
    if config.jsonl_path:
        sinks.append(JsonLinesSink(config.jsonl_path))
    return sinks
