"""Where events go: the ``pgleakguard`` logger, a user callback, a JSON-lines file."""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
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


class Delivery:
    """A daemon thread that hands events to the sinks, so a slow or stuck sink never delays
    the watchdog's scans. The queue is bounded: past ``limit`` events are dropped, counted."""

    def __init__(self, dispatch: Sink, limit: int = 10_000) -> None:
        self._dispatch = dispatch
        self._limit = limit
        self._queue: deque[Event] = deque()
        self._busy = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        #: Events dropped because the queue was full.
        self.dropped = 0
        #: Adds server-side context to a batch of events before the sinks see it
        #: (``activity_dsn``); runs here, never in the watchdog or the user's threads.
        self.enrich: Callable[[list[Event]], None] | None = None

    def put(self, event: Event) -> None:
        with self._cond:
            if len(self._queue) >= self._limit:
                self.dropped += 1
                return
            self._queue.append(event)
            self._cond.notify()
            if self._thread is None:
                self._stop = False
                self._thread = threading.Thread(
                    target=self._run, name="pgleakguard-sinks", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
                self._busy += len(batch)
            try:
                if self.enrich is not None:
                    with guard():
                        self.enrich(batch)
                for event in batch:
                    self._dispatch(event)
            finally:
                with self._cond:
                    self._busy -= len(batch)
                    self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until every queued event was delivered; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def stop(self, timeout: float) -> None:
        """Deliver what is queued (up to ``timeout``), then end the thread."""
        self.drain(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def reset_after_fork(self) -> None:
        """In a forked child the thread is gone and the queue is the parent's."""
        self._queue.clear()
        self._busy = 0
        self._cond = threading.Condition()
        self._thread = None


def sinks_for(config: Config) -> list[Sink]:
    """The sinks a configuration asks for: logging always, then callback and JSON file."""
    sinks: list[Sink] = [LoggingSink(config.log_level)]
    if config.on_leak is not None:
        sinks.append(config.on_leak)
    if config.jsonl_path:
        sinks.append(JsonLinesSink(config.jsonl_path))
    return sinks
