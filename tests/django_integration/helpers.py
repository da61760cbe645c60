"""Helpers of the Django tests: real WSGI/ASGI handler calls, server-side checks."""

from __future__ import annotations

import asyncio
import time
import wsgiref.util
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler
from django.db import connections


def wsgi_get(handler: WSGIHandler, path: str) -> tuple[str, bytes]:
    """One GET through Django's real WSGI handler, as a WSGI server makes it (close() last)."""
    path, _, query = path.partition("?")
    environ: dict[str, Any] = {"PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": "GET"}
    wsgiref.util.setup_testing_defaults(environ)
    status: list[str] = []
    response = handler(environ, lambda s, headers, exc_info=None: status.append(s))
    try:
        body = b"".join(response)
    finally:
        response.close()  # leak: request-finished (sends request_finished)
    return status[0], body


async def asgi_get(handler: ASGIHandler, path: str) -> tuple[int, bytes]:
    """One GET through Django's real ASGI handler, as an ASGI server makes it."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    sent: list[dict[str, Any]] = []
    requested = False
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await never.wait()  # the client stays connected; Django cancels this after responding
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await handler(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


def close_from_here(wrapper: Any) -> None:
    """Close another thread's DatabaseWrapper (Django allows it once sharing is on)."""
    wrapper.inc_thread_sharing()
    try:
        wrapper.close()
    finally:
        wrapper.dec_thread_sharing()


def session(dsn: str, pid: int) -> tuple[Any, ...] | None:
    """The pg_stat_activity row (application_name, state) of backend ``pid``, if it exists."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        return admin.execute(
            "SELECT application_name, state FROM pg_stat_activity WHERE pid = %s", [pid]
        ).fetchone()


def wait_gone(dsn: str, pid: int, timeout: float = 10.0) -> None:
    """Wait until the server has no session ``pid`` (a close reaches it asynchronously)."""
    deadline = time.monotonic() + timeout
    while session(dsn, pid) is not None:
        if time.monotonic() > deadline:
            raise AssertionError(f"backend {pid} still connected after {timeout}s")
        time.sleep(0.02)


@contextmanager
def database_settings(alias: str = "default", **values: Any) -> Iterator[dict[str, Any]]:
    """Change DATABASES[alias] keys (CONN_MAX_AGE, CONN_HEALTH_CHECKS) for the block; the
    connection of this thread is closed before and after so new values apply."""
    settings_dict = connections[alias].settings_dict
    before = {key: settings_dict[key] for key in values}
    connections[alias].close()
    settings_dict.update(values)
    try:
        yield settings_dict
    finally:
        connections[alias].close()
        settings_dict.update(before)
