"""PoolTimeout names the culprit; heavy proper use reports nothing."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import psycopg_pool
import pytest

import pgleakguard

from conftest import EventLog, marked_line, run_in_threads


def leak_one(pool: psycopg_pool.ConnectionPool[Any]) -> Any:
    return pool.getconn()  # leak: timeout-sync


async def aleak_one(pool: psycopg_pool.AsyncConnectionPool[Any]) -> Any:
    return await pool.getconn()  # leak: timeout-async


def test_pool_timeout_message_names_the_leaking_line(pg_dsn: str, events: EventLog) -> None:
    line = marked_line(__file__, "timeout-sync")
    with psycopg_pool.ConnectionPool(pg_dsn, min_size=2, max_size=2, name="orders") as pool:
        kept = [leak_one(pool), leak_one(pool)]
        with pytest.raises(psycopg_pool.PoolTimeout) as info, pool.connection(timeout=0.2):
            pass
        message = str(info.value)
        assert message.startswith("couldn't get a connection after 0.20 sec\n")
        assert "2 connection(s) of pool 'orders' checked out, by call-site:" in message
        assert re.search(
            rf"2 x {re.escape(__file__)}:{line} in leak_one "
            r"\(oldest \d+\.\ds; held by MainThread\)",
            message,
        ), message
        for conn in kept:
            pool.putconn(conn)


def leak_other(pool: psycopg_pool.ConnectionPool[Any]) -> Any:
    return pool.getconn()  # leak: timeout-other


def test_pool_timeout_names_only_its_own_pool_when_two_share_a_name(
    pg_dsn: str, events: EventLog
) -> None:
    mine, other = (
        psycopg_pool.ConnectionPool(pg_dsn, min_size=1, max_size=1, name="same") for _ in "ab"
    )
    with mine, other:
        kept = [leak_one(mine), leak_other(other)]
        with pytest.raises(psycopg_pool.PoolTimeout) as info:
            mine.getconn(timeout=0.1)
        lines = str(info.value).splitlines()
        assert lines[1:] == [
            "pgleakguard: 1 connection(s) of pool 'same' checked out, by call-site:",
            lines[2],
        ]
        assert lines[2].startswith(
            f"  1 x {__file__}:{marked_line(__file__, 'timeout-sync')} in leak_one (oldest "
        )
        mine.putconn(kept[0])
        other.putconn(kept[1])


async def test_async_pool_timeout_message_names_the_leaking_line(
    pg_dsn: str, events: EventLog
) -> None:
    line = marked_line(__file__, "timeout-async")
    pool = psycopg_pool.AsyncConnectionPool(pg_dsn, min_size=1, max_size=1, open=False)
    async with pool:
        kept = await aleak_one(pool)
        with pytest.raises(psycopg_pool.PoolTimeout) as info:
            await pool.getconn(timeout=0.2)
        assert f"1 x {__file__}:{line} in aleak_one" in str(info.value)
        await pool.putconn(kept)


def test_50_threads_x_100_checkouts_report_nothing(pg_dsn: str, install: Any) -> None:
    events = install(leak_threshold=5, idle_in_transaction_threshold=5)
    with psycopg_pool.ConnectionPool(pg_dsn, min_size=4, max_size=8, timeout=60) as pool:

        def work() -> None:
            for i in range(100):
                with pool.connection() as conn:
                    if i % 10 == 0:
                        conn.execute("SELECT 1")

        errors = run_in_threads(work, 50)
        pgleakguard.check()
    assert errors == []
    assert events == []
    assert pgleakguard.open_checkouts() == []
    assert pgleakguard.stats()["open_checkouts"] == 0


async def test_200_tasks_on_the_async_pool_report_nothing(pg_dsn: str, install: Any) -> None:
    events = install(leak_threshold=5, idle_in_transaction_threshold=5)
    pool = psycopg_pool.AsyncConnectionPool(pg_dsn, min_size=4, max_size=8, open=False, timeout=60)
    async with pool:

        async def work() -> None:
            for _ in range(5):
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")

        await asyncio.gather(*(work() for _ in range(200)))
    await asyncio.to_thread(pgleakguard.check)
    assert events == []
    assert pgleakguard.open_checkouts() == []


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_pool_timeout_names_connections_lost_to_garbage_collection(
    pg_dsn: str, events: EventLog
) -> None:
    import gc

    line = marked_line(__file__, "timeout-sync")
    with psycopg_pool.ConnectionPool(pg_dsn, min_size=1, max_size=1, name="lossy") as pool:
        leak_one(pool)  # dropped at once: psycopg_pool never gets this slot back
        gc.collect()
        with pytest.raises(psycopg_pool.PoolTimeout) as info:
            pool.getconn(timeout=0.2)
    message = str(info.value)
    assert (
        "1 connection(s) of pool 'lossy' were garbage collected without being returned" in message
    )
    assert f"1 x {__file__}:{line} in leak_one" in message
    events.wait_for("garbage_collected")
