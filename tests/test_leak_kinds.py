"""Every leak kind, for raw psycopg and psycopg_pool, sync and async, naming the exact line."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import psycopg_pool
import pytest

from conftest import EventLog, marked_line, settle

HERE = __file__

# -- the code under test: each helper takes a connection on its marked line --------------


def take_raw(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn)  # leak: raw


def take_pool(pool: psycopg_pool.ConnectionPool[Any]) -> psycopg.Connection[Any]:
    return pool.getconn()  # leak: pool


async def take_araw(dsn: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn)  # leak: araw


async def take_apool(pool: psycopg_pool.AsyncConnectionPool[Any]) -> psycopg.AsyncConnection[Any]:
    return await pool.getconn()  # leak: apool


async def take_wait_for(source: Async) -> psycopg.AsyncConnection[Any]:
    connect = psycopg.AsyncConnection.connect
    if source.flavor == "araw":
        return await asyncio.wait_for(connect(source.dsn), 5)  # leak: wf-araw
    return await asyncio.wait_for(source.pool.getconn(), 5)  # leak: wf-apool


def hold_in_block(pool: psycopg_pool.ConnectionPool[Any], until: Any) -> None:
    with pool.connection() as conn:  # leak: pool-block
        conn.execute("SELECT 1")
        conn.commit()
        until()


async def ahold_in_block(pool: psycopg_pool.AsyncConnectionPool[Any], until: Any) -> None:
    async with pool.connection() as conn:  # leak: apool-block
        await conn.execute("SELECT 1")
        await conn.commit()
        await until()  # leak: apool-await


class Sync:
    """Take and give back a connection the raw way or the pool way."""

    def __init__(self, flavor: str, dsn: str) -> None:
        self.flavor = flavor
        self.dsn = dsn
        self.pool = psycopg_pool.ConnectionPool(dsn, min_size=1, max_size=4, open=True)
        self.integration = "psycopg" if flavor == "raw" else "psycopg_pool"

    def take(self) -> psycopg.Connection[Any]:
        return take_raw(self.dsn) if self.flavor == "raw" else take_pool(self.pool)

    def give_back(self, conn: psycopg.Connection[Any]) -> None:
        if self.flavor == "raw":
            conn.close()
        else:
            self.pool.putconn(conn)

    @property
    def line(self) -> int:
        return marked_line(HERE, self.flavor)


class Async:
    def __init__(self, flavor: str, dsn: str) -> None:
        self.flavor = flavor
        self.dsn = dsn
        self.pool = psycopg_pool.AsyncConnectionPool(dsn, min_size=1, max_size=4, open=False)
        self.integration = "psycopg" if flavor == "araw" else "psycopg_pool"

    async def take(self) -> psycopg.AsyncConnection[Any]:
        return await (take_araw(self.dsn) if self.flavor == "araw" else take_apool(self.pool))

    async def give_back(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self.flavor == "araw":
            await conn.close()
        else:
            await self.pool.putconn(conn)

    @property
    def line(self) -> int:
        return marked_line(HERE, self.flavor)


@pytest.fixture(params=["raw", "pool"])
def sync(request: pytest.FixtureRequest, pg_dsn: str, events: EventLog) -> Iterator[Sync]:
    source = Sync(request.param, pg_dsn)
    yield source
    source.pool.close()


@pytest.fixture(params=["araw", "apool"])
async def asource(
    request: pytest.FixtureRequest, pg_dsn: str, events: EventLog
) -> AsyncIterator[Async]:
    source = Async(request.param, pg_dsn)
    await source.pool.open()
    yield source
    await source.pool.close()


def assert_names_line(event: Any, source: Sync | Async) -> None:
    assert event.callsite.file == HERE
    assert event.callsite.line == source.line
    assert event.integration == source.integration
    assert event.stack[0]["line"] == source.line
    assert event.backend_pid is not None and event.backend_pid > 0


# -- sync --------------------------------------------------------------------------------


def test_held_too_long_names_the_line_then_returned_reports_hold_time(
    sync: Sync, events: EventLog
) -> None:
    conn = sync.take()
    pid = conn.info.backend_pid
    [event] = events.wait_for("held_too_long")
    settle()
    assert events.leaks() == [event]  # reported once, however many scans see it
    assert_names_line(event, sync)
    assert event.backend_pid == pid
    assert event.severity == "suspected"
    assert event.holder == threading.current_thread().name and event.holder_alive
    assert event.age >= 0.3
    assert "held_too_long" in event.render() and f"{HERE}:{sync.line}" in event.render()
    sync.give_back(conn)
    returned = events.wait_returned()
    assert returned.checkout_id == event.checkout_id
    assert returned.kinds == ("held_too_long",)
    assert returned.held_for >= event.age
    assert events.leaks("held_too_long") == [event]  # reported once


def test_idle_in_transaction_names_the_line(sync: Sync, install: Any, pg_dsn: str) -> None:
    pgleakguard_events = install(leak_threshold=60, idle_in_transaction_threshold=0.2)
    conn = sync.take()
    conn.execute("SELECT 1")  # opens a transaction (autocommit is off), then idles
    [event] = pgleakguard_events.wait_for("idle_in_transaction")
    settle()
    assert pgleakguard_events.leaks() == [event]  # reported once
    assert_names_line(event, sync)
    assert event.transaction_status == "INTRANS"
    assert event.idle is not None and event.idle >= 0.2
    conn.rollback()
    sync.give_back(conn)


def test_a_long_statement_in_a_transaction_is_not_idle_but_the_idle_after_it_is(
    sync: Sync, install: Any
) -> None:
    events = install(leak_threshold=60, idle_in_transaction_threshold=0.3)
    conn = sync.take()
    conn.execute("SELECT 1")  # opens a transaction
    conn.execute("SELECT pg_sleep(1.5)")  # five thresholds long, but running, not idle
    import pgleakguard

    pgleakguard.check()  # deliver whatever the watchdog found while the statement ran
    assert events.leaks() == []
    [event] = events.wait_for("idle_in_transaction")  # the idle after it is reported
    assert_names_line(event, sync)
    assert event.transaction_status == "INTRANS"
    assert event.age >= 1.8 and 0.3 <= event.idle < event.age - 1.5
    conn.rollback()
    sync.give_back(conn)


def test_held_too_long_inside_a_pool_connection_block_names_the_with_line(
    pg_dsn: str, events: EventLog
) -> None:
    found: list[Any] = []
    with psycopg_pool.ConnectionPool(pg_dsn, min_size=1, max_size=2, name="blocks") as pool:
        hold_in_block(pool, lambda: found.extend(events.wait_for("held_too_long")))
        [event] = found
        assert (event.callsite.file, event.callsite.line, event.callsite.function) == (
            HERE,
            marked_line(HERE, "pool-block"),
            "hold_in_block",
        )
        assert (event.integration, event.pool) == ("psycopg_pool", "blocks")
        # the block's end gave it back
        assert events.wait_returned().checkout_id == event.checkout_id


def test_owner_exited_when_thread_ends_holding_it(sync: Sync, events: EventLog) -> None:
    kept: list[Any] = []
    worker = threading.Thread(target=lambda: kept.append(sync.take()), name="leaky-worker")
    worker.start()
    worker.join()
    [event] = events.wait_for("owner_exited")
    settle()
    assert events.leaks() == [event]  # reported once, and nothing else (definite)
    assert_names_line(event, sync)
    assert event.severity == "definite"
    assert event.holder == "leaky-worker" and not event.holder_alive
    sync.give_back(kept.pop())


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_garbage_collected_when_dropped_without_return(sync: Sync, events: EventLog) -> None:
    def drop() -> None:
        sync.take()

    drop()
    gc.collect()
    [event] = events.wait_for("garbage_collected")
    settle()
    assert events.leaks() == [event]  # reported once
    assert_names_line(event, sync)
    assert event.severity == "definite"


def test_proper_use_reports_nothing(sync: Sync, events: EventLog) -> None:
    for _ in range(20):
        conn = sync.take()
        conn.execute("SELECT 1")
        conn.commit()
        sync.give_back(conn)
    import pgleakguard

    pgleakguard.check()
    assert events == []
    assert pgleakguard.open_checkouts() == []


# -- async -------------------------------------------------------------------------------


async def test_async_held_too_long_names_the_line(asource: Async, events: EventLog) -> None:
    conn = await asource.take()
    await asyncio.to_thread(events.wait_for, "held_too_long")
    await asyncio.to_thread(settle)
    [event] = events.leaks()
    assert_names_line(event, asource)
    assert event.holder_kind == "task" and event.holder_alive
    await asource.give_back(conn)
    assert (await asyncio.to_thread(events.wait_returned)).checkout_id == event.checkout_id


async def test_async_idle_in_transaction_names_the_line(asource: Async, events: EventLog) -> None:
    conn = await asource.take()
    await conn.execute("SELECT 1")
    await asyncio.to_thread(events.wait_for, "idle_in_transaction")
    await asyncio.to_thread(settle)
    [event] = events.leaks("idle_in_transaction")
    assert_names_line(event, asource)
    assert event.transaction_status == "INTRANS"
    await conn.rollback()
    await asource.give_back(conn)


async def test_async_long_statement_in_a_transaction_is_not_idle_but_the_idle_after_it_is(
    asource: Async, install: Any
) -> None:
    events = install(leak_threshold=60, idle_in_transaction_threshold=0.3)
    conn = await asource.take()
    await conn.execute("SELECT 1")
    await conn.execute("SELECT pg_sleep(1.5)")
    import pgleakguard

    await asyncio.to_thread(pgleakguard.check)
    assert events.leaks() == []
    [event] = await asyncio.to_thread(events.wait_for, "idle_in_transaction")
    assert_names_line(event, asource)
    assert event.transaction_status == "INTRANS"
    assert event.age >= 1.8 and 0.3 <= event.idle < event.age - 1.5
    await conn.rollback()
    await asource.give_back(conn)


async def test_wait_for_checkout_is_held_by_the_task_awaiting_it(
    asource: Async, events: EventLog
) -> None:
    # Before Python 3.12 wait_for runs the checkout in a task of its own that ends at once.
    line = marked_line(HERE, "wf-" + asource.flavor)
    conn = await take_wait_for(asource)
    [event] = await asyncio.to_thread(events.wait_for, "held_too_long")
    await asyncio.to_thread(settle)
    assert events.leaks() == [event]  # no owner_exited: this task holds it and is running
    assert (event.callsite.file, event.callsite.line) == (HERE, line)
    assert event.callsite.function == "take_wait_for"
    me = asyncio.current_task()
    assert me is not None
    assert (event.holder, event.holder_kind, event.holder_alive) == (me.get_name(), "task", True)
    await asource.give_back(conn)
    events.clear()

    kept: list[Any] = []

    async def leaky() -> None:
        kept.append(await take_wait_for(asource))

    await asyncio.create_task(leaky(), name="wait-for-leaker")
    [event] = await asyncio.to_thread(events.wait_for, "owner_exited")
    assert (event.callsite.line, event.holder) == (line, "wait-for-leaker")
    await asource.give_back(kept.pop())


async def test_async_pool_connection_block_names_the_line_and_where_the_task_waits(
    pg_dsn: str, events: EventLog
) -> None:
    found: list[Any] = []

    async def until() -> None:
        found.extend(await asyncio.to_thread(events.wait_for, "held_too_long"))  # leak: waits

    pool = psycopg_pool.AsyncConnectionPool(pg_dsn, min_size=1, max_size=2, name="ablocks")
    async with pool:
        await ahold_in_block(pool, until)
        [event] = found
        assert (event.callsite.file, event.callsite.line, event.callsite.function) == (
            HERE,
            marked_line(HERE, "apool-block"),
            "ahold_in_block",
        )
        assert (event.integration, event.pool, event.holder_kind) == (
            "psycopg_pool",
            "ablocks",
            "task",
        )
        # the pending task's stack, innermost first: where it awaits, and what awaits that
        assert event.holder_stack is not None
        mine = [(f["line"], f["function"]) for f in event.holder_stack if f["file"] == HERE]
        assert mine[:2] == [
            (marked_line(HERE, "waits"), "until"),
            (marked_line(HERE, "apool-await"), "ahold_in_block"),
        ]
        assert "await until()  # leak: apool-await" in event.render()
        returned = await asyncio.to_thread(events.wait_returned)
        assert returned.checkout_id == event.checkout_id


async def test_async_connections_are_tagged_with_service_and_pid(
    pg_dsn: str, events: EventLog
) -> None:
    tag = f"tests/pid:{os.getpid()}"
    query = "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        assert conn.info.parameter_status("application_name") == tag
        assert await (await conn.execute(query)).fetchone() == (tag,)
    named = await psycopg.AsyncConnection.connect(pg_dsn, application_name="billing-worker")
    async with named:  # the user's own name is kept as the service part
        assert (
            named.info.parameter_status("application_name") == f"billing-worker/pid:{os.getpid()}"
        )
    pool = psycopg_pool.AsyncConnectionPool(pg_dsn, min_size=1, max_size=1, open=False)
    async with pool, pool.connection() as pooled:  # the pool's own connections too
        assert await (await pooled.execute(query)).fetchone() == (tag,)


async def test_async_owner_exited_when_task_finishes_holding_it(
    asource: Async, events: EventLog
) -> None:
    kept: list[Any] = []

    async def leaky() -> None:
        kept.append(await asource.take())

    await asyncio.create_task(leaky(), name="leaky-task")
    await asyncio.to_thread(events.wait_for, "owner_exited")
    await asyncio.to_thread(settle)
    [event] = events.leaks()
    assert_names_line(event, asource)
    assert event.holder == "leaky-task" and event.holder_kind == "task"
    await asource.give_back(kept.pop())


@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_async_garbage_collected_when_dropped(asource: Async, events: EventLog) -> None:
    async def drop() -> None:
        await asource.take()

    await drop()
    gc.collect()
    await asyncio.to_thread(events.wait_for, "garbage_collected")
    await asyncio.to_thread(settle)
    [event] = events.leaks()
    assert_names_line(event, asource)


# -- never_closed, at interpreter exit ----------------------------------------------------

NEVER_CLOSED = """
import asyncio, sys, threading
import psycopg, psycopg_pool
import pgleakguard

pgleakguard.install(service="exit-test", leak_threshold=60)
dsn = sys.argv[1]
kept = []

async def hold(ready):
    kept.append(asyncio.current_task())  # (the loop keeps only weak references to tasks)
    apool = psycopg_pool.AsyncConnectionPool(dsn, min_size=1, open=False)
    await apool.open()
    kept.append(await psycopg.AsyncConnection.connect(dsn))  # leak: exit-araw
    kept.append(await apool.getconn())  # leak: exit-apool
    ready.set()
    await asyncio.Event().wait()  # the task still holds them when the process exits

loop = asyncio.new_event_loop()
loop.set_exception_handler(lambda loop, context: None)  # (pending at exit on purpose)
threading.Thread(target=loop.run_forever, name="event-loop", daemon=True).start()
ready = threading.Event()
asyncio.run_coroutine_threadsafe(hold(ready), loop)
pool = psycopg_pool.ConnectionPool(dsn, min_size=1, open=True)
kept.append(psycopg.connect(dsn))  # leak: exit-raw
kept.append(pool.getconn())  # leak: exit-pool
assert ready.wait(30)

async def finish():
    kept.append(await psycopg.AsyncConnection.connect(dsn))  # leak: exit-finished

asyncio.run_coroutine_threadsafe(finish(), loop).result(30)
pgleakguard.check()  # owner_exited now; at exit it is not reported again
print("main done", flush=True)
"""


def test_never_closed_reported_once_at_exit_for_each_flavor(pg_dsn: str, tmp_path: Any) -> None:
    script = tmp_path / "exit_leak.py"
    script.write_text(textwrap.dedent(NEVER_CLOSED))
    proc = subprocess.run(
        [sys.executable, "-W", "ignore::ResourceWarning", str(script), pg_dsn],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "main done\n"
    assert "Traceback" not in proc.stderr and "Task was destroyed" not in proc.stderr
    reports = proc.stderr.split("pgleakguard: connection leak ")[1:]
    assert len(reports) == 5, proc.stderr  # one per checkout, nothing else
    for name, function, kind in [
        ("exit-raw", "<module>", "never_closed"),
        ("exit-pool", "<module>", "never_closed"),
        ("exit-araw", "hold", "never_closed"),
        ("exit-apool", "hold", "never_closed"),
        ("exit-finished", "finish", "owner_exited"),
    ]:
        where = f"{script}:{marked_line(str(script), name)} in {function}"
        found = [r for r in reports if f"checked out at {where}\n" in r]
        assert [r.split(",")[0] for r in found] == [f"[{kind}"], (name, proc.stderr)
