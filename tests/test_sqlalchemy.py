"""SQLAlchemy: sync and async engines on psycopg, psycopg2 and asyncpg, each naming the line."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any, Callable

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, event, exc, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool, Pool, QueuePool, StaticPool

import pgleakguard
from pgleakguard import _runtime, tagging

from conftest import EventLog, marked_line, run_in_threads

HERE = __file__


def url(dsn: str, driver: str) -> str:
    return dsn.replace("postgresql://", f"postgresql+{driver}://", 1)


@pytest.fixture
def make_engine(pg_dsn: str) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(driver: str = "psycopg", **kw: Any) -> Engine:
        engine = create_engine(url(pg_dsn, driver), **kw)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
async def make_async_engine(pg_dsn: str) -> AsyncIterator[Callable[..., AsyncEngine]]:
    engines: list[AsyncEngine] = []

    def make(driver: str = "asyncpg", **kw: Any) -> AsyncEngine:
        engine = create_async_engine(url(pg_dsn, driver), **kw)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.dispose()


def server_pid(conn: Any) -> int:
    return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


# -- leak kinds ----------------------------------------------------------------------------


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_thread_that_exits_holding_a_connection(
    driver: str, make_engine: Callable[..., Engine], events: EventLog
) -> None:
    engine = make_engine(driver)
    kept: list[Any] = []

    def worker() -> None:
        conn = engine.connect()  # leak: sa-thread
        kept.append((conn, server_pid(conn)))

    t = threading.Thread(target=worker, name="sa-worker")
    t.start()
    t.join()
    [event] = events.wait_for("owner_exited")
    assert event.callsite.file == HERE
    assert event.callsite.line == marked_line(HERE, "sa-thread")
    assert event.callsite.function == "worker"
    assert event.integration == "sqlalchemy"
    assert event.holder == "sa-worker"
    assert event.backend_pid == kept[0][1]
    assert event.pool == f"postgresql+{driver}:///postgres"
    kept[0][0].close()
    assert events.wait_returned().checkout_id == event.checkout_id


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_task_that_finishes_holding_an_async_connection(
    driver: str, make_async_engine: Callable[..., AsyncEngine], events: EventLog
) -> None:
    engine = make_async_engine(driver)
    kept: list[Any] = []

    async def handler() -> None:
        conn = await engine.connect()  # leak: sa-task
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        kept.append((conn, pid))

    await asyncio.create_task(handler(), name="request-42")
    await asyncio.to_thread(events.wait_for, "owner_exited")
    [event] = events.leaks("owner_exited")
    assert (event.callsite.file, event.callsite.line) == (HERE, marked_line(HERE, "sa-task"))
    assert event.holder == "request-42" and event.holder_kind == "task"
    assert event.backend_pid == kept[0][1]
    await kept[0][0].close()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_session_left_open_in_a_transaction(
    driver: str, make_engine: Callable[..., Engine], install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=60, idle_in_transaction_threshold=0.2)
    engine = make_engine(driver)
    session = Session(engine)
    session.execute(text("SELECT 1"))  # leak: sa-session
    [event] = events.wait_for("idle_in_transaction")
    assert event.callsite.line == marked_line(HERE, "sa-session")
    assert event.transaction_status == "INTRANS"
    session.close()
    returned = events.wait_returned()
    assert returned.kinds == ("idle_in_transaction",)


async def test_async_session_idle_in_transaction_with_asyncpg(
    make_async_engine: Callable[..., AsyncEngine], install: Callable[..., EventLog]
) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession

    events = install(leak_threshold=60, idle_in_transaction_threshold=0.2)
    engine = make_async_engine("asyncpg")
    session = AsyncSession(engine)
    await session.execute(text("SELECT 1"))  # leak: sa-async-session
    await asyncio.to_thread(events.wait_for, "idle_in_transaction")
    [event] = events.leaks("idle_in_transaction")
    assert event.callsite.line == marked_line(HERE, "sa-async-session")
    await session.close()


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_connection_dropped_without_close_is_garbage_collected(
    driver: str, make_engine: Callable[..., Engine], events: EventLog
) -> None:
    engine = make_engine(driver)

    def forgetful() -> None:
        conn = engine.connect()  # leak: sa-gc
        conn.execute(text("SELECT 1"))

    forgetful()
    gc.collect()
    [event] = events.wait_for("garbage_collected")
    assert event.callsite.line == marked_line(HERE, "sa-gc")
    assert pgleakguard.open_checkouts() == []


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore:The garbage collector is trying to clean up")
async def test_async_connection_dropped_without_close_is_garbage_collected(
    make_async_engine: Callable[..., AsyncEngine], events: EventLog
) -> None:
    engine = make_async_engine("asyncpg")

    async def forgetful() -> None:
        conn = await engine.connect()  # leak: sa-async-gc
        await conn.execute(text("SELECT 1"))

    await forgetful()
    gc.collect()
    await asyncio.to_thread(events.wait_for, "garbage_collected")
    [event] = events.leaks("garbage_collected")
    assert event.callsite.line == marked_line(HERE, "sa-async-gc")


NEVER_CLOSED = """
import sys
import sqlalchemy as sa
import pgleakguard

pgleakguard.install(service="exit-test", leak_threshold=60)
url = sys.argv[1].replace("postgresql://", "postgresql+" + sys.argv[2] + "://", 1)
engine = sa.create_engine(url)
kept = [engine.connect()]  # leak: exit-sa
kept[0].execute(sa.text("SELECT 1"))
print("main done", flush=True)
"""


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_connection_still_held_at_exit_is_never_closed_once(
    driver: str, pg_dsn: str, tmp_path: Any
) -> None:
    import subprocess
    import sys

    script = tmp_path / "exit_leak.py"
    script.write_text(NEVER_CLOSED)
    proc = subprocess.run(
        [sys.executable, "-W", "ignore::ResourceWarning", str(script), pg_dsn, driver],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "main done" in proc.stdout
    assert "Traceback" not in proc.stderr
    where = f"{script}:{marked_line(str(script), 'exit-sa')} in <module>"
    assert proc.stderr.count("pgleakguard: connection leak") == 1, proc.stderr
    assert f"[never_closed, definite] checked out at {where}" in proc.stderr


def test_queuepool_timeout_keeps_type_code_and_text_and_names_holders(
    make_engine: Callable[..., Engine], events: EventLog
) -> None:
    engine = make_engine(pool_size=2, max_overflow=0, pool_timeout=0.2)
    held = []
    for _ in range(2):
        held.append(engine.connect())  # leak: sa-timeout
    with pytest.raises(exc.TimeoutError) as info:
        engine.connect()
    message = str(info.value)
    assert info.value.code == "3o7r"
    assert message.startswith(
        "QueuePool limit of size 2 overflow 0 reached, connection timed out, timeout 0.20\n"
    )
    line = marked_line(HERE, "sa-timeout")
    assert (
        "pgleakguard: 2 connection(s) of pool 'postgresql+psycopg:///postgres' checked out"
        in message
    )
    assert f"  2 x {HERE}:{line} in test_queuepool_timeout" in message
    assert "held by MainThread)\n (Background on this error at: https://sqlalche.me/e/" in message
    for conn in held:
        conn.close()


async def test_async_pool_timeout_names_holders(
    make_async_engine: Callable[..., AsyncEngine], events: EventLog
) -> None:
    engine = make_async_engine("asyncpg", pool_size=1, max_overflow=0, pool_timeout=0.2)
    held = await engine.connect()  # leak: sa-async-timeout
    with pytest.raises(exc.TimeoutError) as info:
        await engine.connect()
    assert f"1 x {HERE}:{marked_line(HERE, 'sa-async-timeout')} in test_async_pool" in str(
        info.value
    )
    await held.close()


# -- drivers, pids, tags ---------------------------------------------------------------------


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_backend_pid_and_tag_match_pg_stat_activity(
    driver: str, make_engine: Callable[..., Engine], events: EventLog
) -> None:
    engine = make_engine(driver)
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT pid, application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        ).one()
        [info] = pgleakguard.open_checkouts()
    assert info.backend_pid == row.pid
    assert info.application_name == row.application_name
    tag = tagging.parse(row.application_name)
    assert tag is not None and tag.service == "tests"


async def test_asyncpg_pid_and_tag_match_pg_stat_activity(
    make_async_engine: Callable[..., AsyncEngine], events: EventLog
) -> None:
    engine = make_async_engine(
        "asyncpg", connect_args={"server_settings": {"application_name": "api"}}
    )
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT pid, application_name FROM pg_stat_activity "
                    "WHERE pid = pg_backend_pid()"
                )
            )
        ).one()
        [info] = pgleakguard.open_checkouts()
    assert info.backend_pid == row.pid
    tag = tagging.parse(row.application_name)
    assert tag is not None and tag.service == "api"  # the user's name is kept as the service


def test_sql_comments_reach_pg_stat_activity_and_parse_back(
    make_engine: Callable[..., Engine], install: Callable[..., EventLog], pg_dsn: str
) -> None:
    install(sql_comments=True, service="billing")
    engine = make_engine("psycopg")
    with engine.connect() as conn, psycopg.connect(pg_dsn) as observer:  # leak: sa-comment
        pid = server_pid(conn)
        conn.execute(text("SELECT 'no % here' AS x"))
        query = observer.execute(
            "SELECT query FROM pg_stat_activity WHERE pid = %s", [pid]
        ).fetchone()
    assert query is not None
    comment = tagging.parse_sql_comment(query[0])
    assert comment == {
        "callsite": f"test_sqlalchemy.py:{marked_line(HERE, 'sa-comment')}",
        "pid": str(os.getpid()),
        "service": "billing",
    }
    assert query[0].startswith("SELECT 'no % here' AS x /*")


def test_statement_with_a_comment_is_left_alone(
    make_engine: Callable[..., Engine], install: Callable[..., EventLog], pg_dsn: str
) -> None:
    install(sql_comments=True)
    engine = make_engine("psycopg")
    with engine.connect() as conn, psycopg.connect(pg_dsn) as observer:
        pid = server_pid(conn)
        conn.execute(text("SELECT 1 /* mine */"))
        query = observer.execute(
            "SELECT query FROM pg_stat_activity WHERE pid = %s", [pid]
        ).fetchone()
    assert query == ("SELECT 1 /* mine */",)


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_retag_on_checkout_names_the_call_site_without_a_transaction(
    driver: str, make_engine: Callable[..., Engine], install: Callable[..., EventLog], pg_dsn: str
) -> None:
    install(retag_on_checkout=True, service="billing")
    engine = make_engine(driver, pool_size=1, max_overflow=0)
    with psycopg.connect(pg_dsn, autocommit=True) as observer:
        seen = []
        for _ in range(2):
            with engine.connect():  # leak: sa-retag
                # the pid, without a query of ours
                [held] = [c for c in pgleakguard.open_checkouts() if c.integration == "sqlalchemy"]
                row = observer.execute(
                    "SELECT application_name, query, xact_start, state_change "
                    "FROM pg_stat_activity WHERE pid = %s",
                    [held.backend_pid],
                ).fetchone()
                seen.append(row)
    tag = f"billing/pid:{os.getpid()}/test_sqlalchemy.py:{marked_line(HERE, 'sa-retag')}"
    assert seen[0] is not None and seen[1] is not None
    # first checkout: the tag was sent, in autocommit: no transaction is open
    assert seen[0][:3] == (tag, f"SET application_name = '{tag}'", None)
    # second checkout, same call-site, same tag: nothing was sent (state unchanged)
    assert seen[1] == seen[0]


# -- correctness under load and faults ------------------------------------------------------


def test_20_threads_x_200_connections_and_sessions_report_nothing(
    make_engine: Callable[..., Engine], install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=5, idle_in_transaction_threshold=5)
    engine = make_engine("psycopg", pool_size=5, max_overflow=5, pool_timeout=60)

    def work() -> None:
        for i in range(200):
            if i % 2:
                with engine.connect() as conn:
                    if i % 10 == 1:
                        conn.execute(text("SELECT 1"))
            else:
                with Session(engine) as session:
                    if i % 10 == 0:
                        session.execute(text("SELECT 1"))

    assert run_in_threads(work, 20) == []
    pgleakguard.check()
    assert events == []
    assert pgleakguard.open_checkouts() == []


@pytest.mark.parametrize(
    "options",
    [
        {"poolclass": QueuePool},
        {"poolclass": NullPool},
        {"poolclass": StaticPool},
        {"pool_pre_ping": True},
    ],
    ids=["QueuePool", "NullPool", "StaticPool", "pre_ping"],
)
def test_every_pool_class_returns_cleanly(
    options: dict[str, Any], make_engine: Callable[..., Engine], events: EventLog
) -> None:
    engine = make_engine("psycopg", **options)
    for _ in range(5):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            assert len(pgleakguard.open_checkouts()) == 1
        assert pgleakguard.open_checkouts() == []
    engine.dispose()
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    pgleakguard.check()
    assert events == []
    assert pgleakguard.open_checkouts() == []


def test_server_killed_connection_leaves_no_stale_checkout(
    make_engine: Callable[..., Engine], events: EventLog, pg_dsn: str
) -> None:
    engine = make_engine("psycopg")
    with engine.connect() as conn:
        pid = server_pid(conn)
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        with pytest.raises(exc.OperationalError):
            conn.execute(text("SELECT 1"))
    assert pgleakguard.open_checkouts() == []
    with engine.connect() as conn:  # the pool recovers with a new connection
        assert server_pid(conn) != pid
    pgleakguard.check()
    assert events == []


# -- install / instrument_engine / uninstall ------------------------------------------------


def test_engine_created_before_install_is_tracked(
    make_engine: Callable[..., Engine], install: Callable[..., EventLog]
) -> None:
    engine = make_engine("psycopg")
    install()
    with engine.connect():
        assert [c.integration for c in pgleakguard.open_checkouts()] == ["sqlalchemy"]


def test_instrument_engine_tracks_one_engine_only(
    make_engine: Callable[..., Engine], install: Callable[..., EventLog]
) -> None:
    install(integrations=["psycopg"])
    mine, other = make_engine("psycopg2"), make_engine("psycopg2")
    pgleakguard.instrument_engine(mine)
    pgleakguard.instrument_engine(mine)  # idempotent
    with mine.connect(), other.connect():
        assert [c.pool for c in pgleakguard.open_checkouts()] == ["postgresql+psycopg2:///postgres"]
    pgleakguard.uninstall()
    assert not event.contains(mine.pool, "checkout", _listener_of(mine.pool))


def _listener_of(pool: Any) -> Any:
    listeners = list(pool.dispatch.checkout)
    return listeners[0] if listeners else lambda *a: None


def test_instrument_engine_needs_install() -> None:
    engine = create_engine("postgresql+psycopg://localhost/none")
    with pytest.raises(RuntimeError, match="call pgleakguard.install\\(\\) first"):
        pgleakguard.instrument_engine(engine)


def test_uninstall_removes_every_listener(make_engine: Callable[..., Engine]) -> None:
    connect_before = Pool.connect
    pgleakguard.install()
    state = _runtime.current()
    assert state is not None
    [integration] = [i for i in state.integrations if i.identifier == "sqlalchemy"]
    listeners = list(integration._listeners)  # type: ignore[attr-defined]
    assert len(listeners) >= 6
    assert all(event.contains(target, name, fn) for target, name, fn in listeners)
    pgleakguard.uninstall()
    assert not any(event.contains(target, name, fn) for target, name, fn in listeners)
    assert Pool.connect is connect_before
    engine = make_engine("psycopg")
    with engine.connect():
        assert pgleakguard.open_checkouts() == []
