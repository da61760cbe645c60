"""An asyncio SQLAlchemy service whose request task finishes holding a connection.

Run: ``pgleakguard demo examples/sqlalchemy_async_leak.py`` (throwaway PostgreSQL), or
``DATABASE_URL=postgresql://... python examples/sqlalchemy_async_leak.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import pgleakguard

OPEN: list[Any] = []


async def handle_request(engine: AsyncEngine, request_id: int) -> None:
    """A request handler that returns early on one path and forgets its connection."""
    conn = await engine.connect()
    total = (await conn.execute(text("SELECT count(*) FROM pg_class"))).scalar_one()
    if total > 0:
        OPEN.append(conn)  # BUG: early return without `await conn.close()`
        return
    await conn.close()


async def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s\n", stream=sys.stdout)
    pgleakguard.install(service="api-demo", leak_threshold=5)
    url = os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+asyncpg://", 1)
    engine = create_async_engine(url, pool_size=1, max_overflow=0, pool_timeout=1)
    await asyncio.create_task(handle_request(engine, 1), name="request-1")
    await asyncio.to_thread(pgleakguard.check)
    try:
        await handle_request(engine, 2)
    except PoolTimeout as exc:
        print(f"TimeoutError: {exc}\n", flush=True)
    for conn in OPEN:
        await conn.close()
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
