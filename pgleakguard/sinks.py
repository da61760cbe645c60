"""Where events go: the ``pgleakguard`` logger, a JSON-lines file, the user's callback; and
the daemon threads that deliver them there."""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from typing import Callable

from ._safety import guard, operational_guard, record_operational_error
from .config import Config
from .events import Event, LeakEvent

logger = logging.getLogger("pgleakguard")

Sink = Callable[[Event], None]


class LoggingSink:
    """Logs each leak's rendered report at ``level`` (returns at INFO)."""

    def __init__(self, level: str = "WARNING") -> None:
        # A level name, or a number (a custom level such as 15) as the config keeps it.
        self.level: int = int(level) if level.isdigit() else logging.getLevelName(level)

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
        try:
            with self._lock, open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        except OSError as exc:  # no such directory, disk full: the machine's, not a bug
            record_operational_error(f"writing jsonl_path {self.path}", exc)


class Dispatcher:
    """Hands each event to every sink; one failing sink never starves the others."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def __call__(self, event: Event) -> None:
        for sink in self.sinks:
            with guard():
                sink(event)


#: Events one delivery thread may have waiting; past it new ones are dropped (and counted).
QUEUE_LIMIT = 10_000


class Delivery:
    """A daemon thread that hands events to ``dispatch``, so a slow or stuck sink never delays
    the watchdog's scans or the application's threads. The queue is bounded: past ``limit``
    waiting events new ones are dropped, counted in :attr:`dropped` and logged once."""

    def __init__(self, dispatch: Sink, name: str, what: str, limit: int = QUEUE_LIMIT) -> None:
        self._dispatch = dispatch
        self.name = name
        #: What the thread delivers to, in the words of the drop warning.
        self.what = what
        self._limit = limit
        self._queue: deque[Event] = deque()
        self._busy = 0
        self._cond = threading.Condition()
        self._stop = False
        self._abandoned = False
        self._thread: threading.Thread | None = None
        #: Events dropped: the queue was full, or delivery was given up at exit/uninstall.
        self.dropped = 0
        self._warned = False
        #: Adds server-side context to a batch of events before the sinks see it
        #: (``activity_dsn``); runs here, never in the watchdog or the user's threads.
        self.enrich: Callable[[list[Event]], None] | None = None

    def put(self, event: Event) -> None:
        """Queue ``event`` for delivery (never blocks on a sink)."""
        with self._cond:
            if len(self._queue) >= self._limit:
                self.dropped += 1
                warn, self._warned = not self._warned, True
            else:
                warn = False
                self._queue.append(event)
                self._cond.notify()
                if self._thread is None:
                    self._stop = self._abandoned = False
                    self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                    self._thread.start()
        if warn:
            logger.warning(
                "pgleakguard: %d events are waiting for %s (slow or stuck); new events are "
                "dropped, counted in stats()['dropped_events']",
                self._limit,
                self.what,
            )

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
                    with operational_guard("activity_dsn lookup"):
                        self.enrich(batch)
                for event in batch:
                    if self._abandoned:
                        break
                    self._dispatch(event)
            finally:
                with self._cond:
                    self._busy -= len(batch)
                    self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until every queued event was delivered; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def stop(self, timeout: float) -> bool:
        """Deliver what is queued for up to ``timeout`` seconds, then end the thread. What
        is still undelivered then is given up (counted as dropped): a stuck sink must not
        hold the process. False if something was given up."""
        delivered = self.drain(timeout)
        with self._cond:
            if not delivered:
                self.dropped += len(self._queue) + self._busy
                self._queue.clear()
                self._abandoned = True
            self._stop = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if delivered and thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        return delivered

    def reset_after_fork(self) -> None:
        """In a forked child the thread is gone and the queue is the parent's; the child
        counts (and warns about) its own drops."""
        self._queue.clear()
        self._busy = 0
        self._cond = threading.Condition()
        self._thread = None
        self._stop = self._abandoned = False
        self.dropped = 0
        self._warned = False


def sinks_for(config: Config) -> list[Sink]:
    """pgleakguard's own sinks a configuration asks for: logging always, then the JSON file.
    (The user's ``on_leak`` callback is delivered to on a thread of its own.)"""
    sinks: list[Sink] = [LoggingSink(config.log_level)]
    if config.jsonl_path:
        sinks.append(JsonLinesSink(config.jsonl_path))
    return sinks
