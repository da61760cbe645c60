"""One daemon thread per process that turns registry state into leak events."""

from __future__ import annotations

import threading
from time import monotonic
from typing import Callable

from ._safety import guard
from .events import HELD_TOO_LONG, IDLE_IN_TRANSACTION, OWNER_EXITED, Event
from .tracker import TX_INERROR, TX_INTRANS, TX_UNKNOWN, Tracker


class Watchdog:
    """Scans open checkouts on a schedule; started lazily, restarted after fork."""

    def __init__(self, tracker: Tracker, deliver: Callable[[Event], None] | None = None) -> None:
        self.tracker = tracker
        self._deliver = deliver
        cfg = tracker.config
        self.leak_threshold = cfg.leak_threshold
        self.idle_threshold = cfg.idle_in_transaction_threshold
        # A quarter of the smallest threshold, so a leak is seen within 25% of its threshold;
        # never busier than 10 ms, never lazier than 1 s (owner_exited latency).
        self.interval = min(1.0, max(0.01, min(self.leak_threshold, self.idle_threshold) / 4))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.scans = 0
        # Parked checkouts whose owner has ended, by checkout id: when a scan first saw it.
        self._orphaned: dict[int, float] = {}
        #: Called before each scheduled scan (the OpenTelemetry layer's provider check).
        self.tick: Callable[[], None] | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def ensure_started(self) -> None:
        """Start the thread if it is not running (cheap when it is)."""
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                self._stop.clear()
                thread = threading.Thread(
                    target=self._run, name="pgleakguard-watchdog", daemon=True
                )
                thread.start()
                self._thread = thread

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread and wait for it (a scan in progress finishes first)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None

    def reset_after_fork(self) -> None:
        """In a forked child the thread is gone: forget it so the next checkout restarts it.
        The child counts its own scans, and the parent's orphans are not its own."""
        self._thread = None
        self._stop = threading.Event()
        self._start_lock = threading.Lock()
        self.scans = 0
        self._orphaned = {}

    def _run(self) -> None:
        stop = self._stop
        while not stop.wait(self.interval):
            if self.tick is not None:
                with guard():
                    self.tick()
            with guard():
                self.scan()
            with guard():
                self.tracker.flush(self._deliver)

    def scan(self) -> None:
        """Look at every open checkout once and report what crossed a line."""
        self.scans += 1
        tracker = self.tracker
        now = monotonic()
        held_since = now - self.leak_threshold
        idle_since = now - self.idle_threshold
        # Many checkouts share an owner: ask each owner once per scan.
        owner_alive: dict[int, bool] = {}
        orphaned, self._orphaned = self._orphaned, {}
        for rec in tracker.registry.snapshot():
            if rec.closed:
                continue
            tx = rec.tx_status
            if tx == TX_UNKNOWN and rec.pool is None:
                # A broken raw connection (server closed it, network gone) holds no server
                # slot and no pool slot: no leak. A pool's broken one still holds its slot.
                tracker.registry.remove(rec)
                continue
            ref = rec.owner
            key = id(ref)
            alive = owner_alive.get(key)
            if alive is None:
                alive = owner_alive[key] = rec.owner_alive()
            if not alive:
                if OWNER_EXITED in rec.reported:
                    continue
                if rec.parked:
                    # A framework's connection kept for reuse (Django's persistent one) whose
                    # thread ended: a worker that stops (gunicorn's gthread at max_requests)
                    # takes it down with its process in a moment. Still open leak_threshold
                    # after the end was seen, it is leaked (until the garbage collector frees
                    # it, reported then as garbage_collected).
                    seen = self._orphaned[rec.id] = orphaned.get(rec.id, now)
                    if seen > held_since:
                        continue
                tracker.report(rec, OWNER_EXITED)
                continue
            if rec.parked:
                if not rec.watch_transaction:
                    continue
            elif rec.started < held_since and HELD_TOO_LONG not in rec.reported:
                tracker.report(rec, HELD_TOO_LONG)
            if (
                (tx in (TX_INTRANS, TX_INERROR))
                and rec.last_activity < idle_since
                and IDLE_IN_TRANSACTION not in rec.reported
            ):
                tracker.report(rec, IDLE_IN_TRANSACTION)
