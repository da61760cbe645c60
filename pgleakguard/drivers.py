"""What pgleakguard reads from a PostgreSQL driver connection, the driver's own way and
without I/O: psycopg 3, psycopg2 and asyncpg (also under a SQLAlchemy async adapter)."""

from __future__ import annotations

from typing import Any

from .tracker import TX_IDLE, TX_INTRANS


def driver_connection(dbapi_connection: Any) -> Any:
    """The driver's own connection (asyncpg / psycopg AsyncConnection under an adapter)."""
    return getattr(dbapi_connection, "driver_connection", None) or dbapi_connection


def backend_pid(dbapi_connection: Any) -> int | None:
    """The server pid of the connection."""
    driver = driver_connection(dbapi_connection)
    info = getattr(driver, "info", None)
    pid = getattr(info, "backend_pid", None)  # psycopg 3, psycopg2 >= 2.8
    if pid is None and hasattr(driver, "get_server_pid"):  # asyncpg
        pid = driver.get_server_pid()
    if pid is None and hasattr(driver, "get_backend_pid"):  # older psycopg2
        pid = driver.get_backend_pid()
    return int(pid) if pid else None


def application_name_of(dbapi_connection: Any) -> str | None:
    """The application_name the server reported for this connection."""
    driver = driver_connection(dbapi_connection)
    info = getattr(driver, "info", None)
    if hasattr(info, "parameter_status"):  # psycopg 3
        return info.parameter_status("application_name")  # type: ignore[union-attr,no-any-return]
    if hasattr(driver, "get_parameter_status"):  # psycopg2
        return driver.get_parameter_status("application_name")  # type: ignore[no-any-return]
    if hasattr(driver, "get_settings"):  # asyncpg
        return getattr(driver.get_settings(), "application_name", None)
    return None


def transaction_status(dbapi_connection: Any) -> int | None:
    """libpq's transaction status (``TX_*``) as the driver last saw it; ``None`` if unknown.

    asyncpg tells no failed transaction apart: it reads as ``TX_INTRANS``.
    """
    driver = driver_connection(dbapi_connection)
    info = getattr(driver, "info", None)
    status = getattr(info, "transaction_status", None)  # psycopg 3, psycopg2 >= 2.8
    if status is None and hasattr(driver, "get_transaction_status"):  # older psycopg2
        status = driver.get_transaction_status()
    if status is None and hasattr(driver, "is_in_transaction"):  # asyncpg
        return TX_INTRANS if driver.is_in_transaction() else TX_IDLE
    return int(status) if status is not None else None
