"""SQLAlchemy: sync and async engines on psycopg, psycopg2 and asyncpg, each naming the line."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any, Callable

import psycopg
import pytest
import sqlalchemy
from sqlalchemy import create_engine, exc, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool, Pool, QueuePool, StaticPool

import pgleakguard
from pgleakguard import _safety, tagging

from conftest import EventLog, marked_line, run_in_threads

pytest_plugins = ["pytester"]

HERE = __file__
# SQLAlchemy 1.4's asyncpg adapter, cleaning up a garbage-collected connection, makes a
# coroutine it cannot await; the log record of that cleanup keeps it until a later test.
pytestmark = pytest.mark.filterwarnings(
    "ignore:coroutine 'AsyncAdapt_asyncpg_connection._rollback_and_discard' was never awaited"
)
SA14 = sqlalchemy.__version__.startswith("1.")
#: The sync driver of tests where any driver does (1.4 has no psycopg 3 dialect).
SYNC = "psycopg2" if SA14 else "psycopg"
#: psycopg 3 as a parameter: skipped on SQLAlchemy 1.4.
PSYCOPG = pytest.param(
    "psycopg", marks=pytest.mark.skipif(SA14, reason="SQLAlchemy 1.4 has no psycopg 3 dialect")
)
PSYCOPG_ASYNC = pytest.param(
    "psycopg_async",
    marks=pytest.mark.skipif(SA14, reason="SQLAlchemy 1.4 has no psycopg 3 dialect"),
)


def url(dsn: str, driver: str) -> str:
    return dsn.replace("postgresql://", f"postgresql+{driver}://", 1)


@pytest.fixture
def make_engine(pg_dsn: str) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(driver: str = SYNC, **kw: Any) -> Engine:
        if SA14:
            kw.setdefault("future", True)  # 2.0-style commit() and autobegin
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


def sa_checkouts() -> list[pgleakguard.CheckoutInfo]:
    """The open checkouts of SQLAlchemy connections (not the tests' own observer)."""
    return [c for c in pgleakguard.open_checkouts() if c.integration == "sqlalchemy"]


def server_pid(conn: Any) -> int:
    return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


# -- leak kinds ----------------------------------------------------------------------------


@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
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


@pytest.mark.parametrize("driver", ["asyncpg", PSYCOPG])
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


@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
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


@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
def test_a_long_statement_in_a_session_is_not_idle_but_the_idle_after_it_is(
    driver: str, make_engine: Callable[..., Engine], install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=60, idle_in_transaction_threshold=0.3)
    session = Session(make_engine(driver))
    session.execute(text("SELECT 1"))  # leak: sa-long-statement
    session.execute(text("SELECT pg_sleep(1.5)"))  # five thresholds long, but running
    pgleakguard.check()  # deliver whatever the watchdog found while the statement ran
    assert events.leaks() == []
    [event] = events.wait_for("idle_in_transaction")  # the idle after it is reported
    assert event.callsite.line == marked_line(HERE, "sa-long-statement")
    assert event.age >= 1.8 and 0.3 <= event.idle < event.age - 1.5
    session.close()


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
@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
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
@pytest.mark.parametrize("driver", ["asyncpg", PSYCOPG])
async def test_async_connection_dropped_without_close_is_garbage_collected(
    driver: str, make_async_engine: Callable[..., AsyncEngine], events: EventLog
) -> None:
    engine = make_async_engine(driver)

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


@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
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
        f"pgleakguard: 2 connection(s) of pool 'postgresql+{SYNC}:///postgres' checked out"
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
    message = str(info.value)
    assert info.value.code == "3o7r"
    assert message.startswith(
        "QueuePool limit of size 1 overflow 0 reached, connection timed out, timeout 0.20\n"
        "pgleakguard: 1 connection(s) of pool 'postgresql+asyncpg:///postgres' checked out, "
        "by call-site:\n"
        f"  1 x {HERE}:{marked_line(HERE, 'sa-async-timeout')} in test_async_pool"
    )
    assert "(Background on this error at: https://sqlalche.me/e/" in message
    await held.close()


# -- drivers, pids, tags ---------------------------------------------------------------------


@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
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
    engine = make_engine(SYNC)
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
    engine = make_engine(SYNC)
    with engine.connect() as conn, psycopg.connect(pg_dsn) as observer:
        pid = server_pid(conn)
        conn.execute(text("SELECT 1 /* mine */"))
        query = observer.execute(
            "SELECT query FROM pg_stat_activity WHERE pid = %s", [pid]
        ).fetchone()
    assert query == ("SELECT 1 /* mine */",)


@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
def test_retag_on_checkout_names_the_call_site_without_a_transaction(
    driver: str, make_engine: Callable[..., Engine], install: Callable[..., EventLog], pg_dsn: str
) -> None:
    install(retag_on_checkout=True, service="billing")
    engine = make_engine(driver, pool_size=1, max_overflow=0)
    with psycopg.connect(pg_dsn, autocommit=True) as observer:
        seen, reported = [], []
        for _ in range(2):
            with engine.connect():  # leak: sa-retag
                # the pid, without a query of ours
                [held] = sa_checkouts()
                row = observer.execute(
                    "SELECT application_name, query, xact_start, state_change "
                    "FROM pg_stat_activity WHERE pid = %s",
                    [held.backend_pid],
                ).fetchone()
                seen.append(row)
                reported.append(held.application_name)
    tag = f"billing/pid:{os.getpid()}/test_sqlalchemy.py:{marked_line(HERE, 'sa-retag')}"
    assert seen[0] is not None and seen[1] is not None
    # first checkout: the tag was sent, in autocommit: no transaction is open
    assert seen[0][:3] == (tag, f"SET application_name = '{tag}'", None)
    # second checkout, same call-site, same tag: nothing was sent (state unchanged)
    assert seen[1] == seen[0]
    # and both checkouts report the connection's application_name as it is now
    assert reported == [tag, tag]


@pytest.mark.parametrize("driver", ["asyncpg", PSYCOPG])
async def test_retag_on_checkout_of_async_engines(
    driver: str,
    make_async_engine: Callable[..., AsyncEngine],
    install: Callable[..., EventLog],
    pg_dsn: str,
) -> None:
    install(retag_on_checkout=True, service="billing")
    engine = make_async_engine(driver, pool_size=1, max_overflow=0)
    with psycopg.connect(pg_dsn, autocommit=True) as observer:
        seen = []
        for _ in range(2):
            async with engine.connect():  # leak: sa-async-retag
                [held] = sa_checkouts()
                row = observer.execute(
                    "SELECT application_name, query, xact_start FROM pg_stat_activity "
                    "WHERE pid = %s",
                    [held.backend_pid],
                ).fetchone()
                seen.append((row, held.application_name))
    tag = f"billing/pid:{os.getpid()}/test_sqlalchemy.py:{marked_line(HERE, 'sa-async-retag')}"
    assert seen[0] == ((tag, f"SET application_name = '{tag}'", None), tag)
    assert seen[1] == seen[0]


@pytest.mark.parametrize("failed", [False, True], ids=["open", "failed"])
@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
def test_retag_never_runs_inside_a_transaction(
    driver: str,
    failed: bool,
    make_engine: Callable[..., Engine],
    install: Callable[..., EventLog],
    pg_dsn: str,
) -> None:
    install(retag_on_checkout=True, service="billing")
    # reset_on_return=None: a connection goes back to the pool as it is, transaction and all
    engine = make_engine(driver, pool_size=1, max_overflow=0, pool_reset_on_return=None)
    raw = engine.raw_connection()  # leak: sa-raw
    cursor = raw.cursor()
    cursor.execute("SELECT 1")
    if failed:
        with pytest.raises(Exception, match="no_such_column"):
            cursor.execute("SELECT no_such_column")
    cursor.close()
    raw.close()  # back to the pool inside its transaction
    with engine.connect(), psycopg.connect(pg_dsn, autocommit=True) as observer:
        [held] = sa_checkouts()
        row = observer.execute(
            "SELECT application_name, state FROM pg_stat_activity WHERE pid = %s",
            [held.backend_pid],
        ).fetchone()
    # the tag of the raw_connection() checkout: the second checkout sent no SET
    tag = f"billing/pid:{os.getpid()}/test_sqlalchemy.py:{marked_line(HERE, 'sa-raw')}"
    state = "idle in transaction (aborted)" if failed else "idle in transaction"
    assert row == (tag, state)
    assert held.application_name == tag


def _first_statement_after_a_server_kill(engine: Engine, pg_dsn: str) -> tuple[Any, ...]:
    """An idle pooled connection is killed by the server, then checked out and used: what
    the user's statement raises, and the next checkout's result."""
    with engine.connect() as conn:
        pid = server_pid(conn)
    _terminate(pg_dsn, pid)
    with pytest.raises(exc.DBAPIError) as info, engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    error = info.value
    with engine.connect() as conn:  # the pool recovers
        after = conn.execute(text("SELECT 2")).scalar_one()
    return type(error), type(error.orig), str(error.orig).splitlines()[0], after


async def _async_first_statement_after_a_server_kill(
    engine: AsyncEngine, pg_dsn: str
) -> tuple[Any, ...]:
    async with engine.connect() as conn:
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    _terminate(pg_dsn, pid)
    with pytest.raises(exc.DBAPIError) as info:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    error = info.value
    async with engine.connect() as conn:
        after = (await conn.execute(text("SELECT 2"))).scalar_one()
    return type(error), type(error.orig), str(error.orig).splitlines()[0], after


def _terminate(pg_dsn: str, pid: int) -> None:
    """Kill the backend ``pid`` and wait until it is gone from pg_stat_activity."""
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        deadline = time.monotonic() + 10
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone():
            assert time.monotonic() < deadline, f"backend {pid} still there"
            time.sleep(0.01)


@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
def test_retag_leaves_a_dead_connection_to_the_users_statement(
    driver: str, make_engine: Callable[..., Engine], install: Callable[..., EventLog], pg_dsn: str
) -> None:
    bare = _first_statement_after_a_server_kill(make_engine(driver, pool_size=1), pg_dsn)
    install(retag_on_checkout=True)
    ours = _first_statement_after_a_server_kill(make_engine(driver, pool_size=1), pg_dsn)
    assert ours == bare  # same exception, same message, and the pool recovers alike
    assert bare[3] == 2
    assert pgleakguard.open_checkouts() == []


@pytest.mark.parametrize("driver", ["asyncpg", PSYCOPG])
async def test_retag_leaves_a_dead_async_connection_to_the_users_statement(
    driver: str,
    make_async_engine: Callable[..., AsyncEngine],
    install: Callable[..., EventLog],
    pg_dsn: str,
) -> None:
    engine = make_async_engine(driver, pool_size=1)
    bare = await _async_first_statement_after_a_server_kill(engine, pg_dsn)
    install(retag_on_checkout=True)
    engine = make_async_engine(driver, pool_size=1)
    ours = await _async_first_statement_after_a_server_kill(engine, pg_dsn)
    assert ours == bare
    assert bare[3] == 2


@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
def test_connection_dying_under_the_retag_is_replaced(
    driver: str,
    make_engine: Callable[..., Engine],
    install: Callable[..., EventLog],
    pg_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The server's goodbye arrives after retag looked at the socket, before its SET: the
    # pool replaces the connection, as pool_pre_ping would, and no checkout is left over.
    from pgleakguard.integrations import sqlalchemy as hooks

    monkeypatch.setattr(hooks, "_has_unread_input", lambda driver: False)
    install(retag_on_checkout=True)
    engine = make_engine(driver, pool_size=1)
    with engine.connect() as conn:
        pid = server_pid(conn)
    _terminate(pg_dsn, pid)
    with engine.connect() as conn:
        new_pid = server_pid(conn)
        [held] = pgleakguard.open_checkouts()
    assert new_pid != pid
    assert held.backend_pid == new_pid
    assert pgleakguard.open_checkouts() == []


# -- correctness under load and faults ------------------------------------------------------


@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
def test_20_threads_x_200_connections_and_sessions_report_nothing(
    driver: str, make_engine: Callable[..., Engine], install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=5, idle_in_transaction_threshold=5)
    engine = make_engine(driver, pool_size=5, max_overflow=5, pool_timeout=60)

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
@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
def test_every_pool_class_returns_cleanly(
    driver: str, options: dict[str, Any], make_engine: Callable[..., Engine], events: EventLog
) -> None:
    engine = make_engine(driver, **options)
    for _ in range(5):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            assert len(pgleakguard.open_checkouts()) == 1
        assert pgleakguard.open_checkouts() == []
    listeners = _engine_listeners(engine)
    engine.dispose()
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        [held] = pgleakguard.open_checkouts()
    assert held.pool == f"postgresql+{driver}:///postgres"  # the new pool has the same name
    assert _engine_listeners(engine) == listeners  # dispose() added none
    pgleakguard.check()
    assert events == []
    assert pgleakguard.open_checkouts() == []
    errors = _safety.internal_error_count()
    pgleakguard.uninstall()
    assert _safety.internal_error_count() == errors
    assert _engine_listeners(engine) == [0] * 7


def _engine_listeners(engine: Engine) -> list[int]:
    """How many listeners SQLAlchemy's own dispatch has for the events pgleakguard uses,
    on the engine, its dialect and its pool."""
    counts = []
    for name in ("after_cursor_execute", "commit", "rollback", "handle_error", "do_connect"):
        # handle_error is a dialect event since SQLAlchemy 2.0, a connection event in 1.4
        dispatch = engine.dispatch if hasattr(engine.dispatch, name) else engine.dialect.dispatch
        counts.append(len(getattr(dispatch, name)))
    counts += [len(getattr(engine.pool.dispatch, name)) for name in ("checkout", "checkin")]
    return counts


@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
def test_detached_connection_ends_its_checkout_when_closed(
    driver: str, make_engine: Callable[..., Engine], install: Callable[..., EventLog]
) -> None:
    events = install(sql_comments=True)
    engine = make_engine(driver)
    conn = engine.connect()
    conn.detach()  # out of the pool: it ends with close_detached, not checkin
    assert conn.execute(text("SELECT 'detached'")).scalar_one() == "detached"
    assert len(sa_checkouts()) == 1
    conn.close()
    assert pgleakguard.open_checkouts() == []
    pgleakguard.check()
    assert events == []


def test_server_killed_connection_leaves_no_stale_checkout(
    make_engine: Callable[..., Engine], events: EventLog, pg_dsn: str
) -> None:
    engine = make_engine(SYNC)
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
    engine = make_engine(SYNC)
    install()
    with engine.connect():
        assert [c.integration for c in pgleakguard.open_checkouts()] == ["sqlalchemy"]


def test_instrument_engine_tracks_one_engine_only(
    make_engine: Callable[..., Engine], install: Callable[..., EventLog]
) -> None:
    events = install(integrations=["psycopg"], leak_threshold=60, idle_in_transaction_threshold=0.2)
    mine, other = make_engine("psycopg2"), make_engine("psycopg2")
    pgleakguard.instrument_engine(mine)
    pgleakguard.instrument_engine(mine)  # idempotent
    with mine.connect() as conn, other.connect() as untracked:
        assert [c.pool for c in pgleakguard.open_checkouts()] == ["postgresql+psycopg2:///postgres"]
        untagged = untracked.execute(text("SHOW application_name")).scalar_one()
        conn.execute(text("SELECT 1"))
        [event] = events.wait_for("idle_in_transaction")  # its transactions are followed
    assert untagged == ""  # the other engine's connections are not even tagged
    assert event.pool == "postgresql+psycopg2:///postgres"
    pgleakguard.uninstall()
    assert _engine_listeners(mine) == [0] * 7


def test_instrument_engine_takes_an_engine_seen_before(
    make_engine: Callable[..., Engine], install: Callable[..., EventLog]
) -> None:
    install(integrations=["psycopg"])
    first, later = make_engine("psycopg2"), make_engine("psycopg2")
    pgleakguard.instrument_engine(first)
    with later.connect():  # not instrumented yet: left alone
        assert sa_checkouts() == []
    pgleakguard.instrument_engine(later)
    with later.connect():
        assert [c.pool for c in sa_checkouts()] == ["postgresql+psycopg2:///postgres#2"]


async def test_instrument_engine_takes_an_async_engine(
    make_async_engine: Callable[..., AsyncEngine], install: Callable[..., EventLog]
) -> None:
    install(integrations=["psycopg"])
    engine = make_async_engine("asyncpg")
    pgleakguard.instrument_engine(engine)
    async with engine.connect():
        assert [c.pool for c in sa_checkouts()] == ["postgresql+asyncpg:///postgres"]


def test_instrument_engine_leaves_other_databases_alone(
    install: Callable[..., EventLog], caplog: pytest.LogCaptureFixture
) -> None:
    install(integrations=["psycopg"])
    engine = create_engine("sqlite://")
    with caplog.at_level("WARNING", logger="pgleakguard"):
        pgleakguard.instrument_engine(engine)
    assert [r.getMessage() for r in caplog.records] == [
        "pgleakguard: instrument_engine() ignored for a 'sqlite' engine: only PostgreSQL "
        "engines are tracked"
    ]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
        assert pgleakguard.open_checkouts() == []


def test_instrument_engine_needs_install() -> None:
    engine = create_engine(f"postgresql+{SYNC}://localhost/none")
    with pytest.raises(RuntimeError, match="call pgleakguard.install\\(\\) first"):
        pgleakguard.instrument_engine(engine)


@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
def test_uninstall_removes_every_listener_and_patch(driver: str, pg_dsn: str) -> None:
    connect_before, raw_connection_before = Pool.connect, Engine.raw_connection
    pgleakguard.install(sql_comments=True)
    engine = create_engine(url(pg_dsn, driver))
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        assert len(sa_checkouts()) == 1
    assert _engine_listeners(engine) != [0] * 7
    pgleakguard.uninstall()
    assert _engine_listeners(engine) == [0] * 7  # SQLAlchemy's own dispatch, not our list
    assert len(engine.dispatch.before_cursor_execute) == 0
    assert (Pool.connect, Engine.raw_connection) == (connect_before, raw_connection_before)
    with engine.connect():
        assert pgleakguard.open_checkouts() == []
    ref = weakref.ref(engine)
    engine.dispose()
    del engine, conn
    gc.collect()
    assert ref() is None


# -- which engines: PostgreSQL only, each engine once, none kept alive ---------------------


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.parametrize("tag", [True, False], ids=["tagging", "no-tagging"])
def test_a_sqlite_engine_is_left_alone(
    tag: bool, install: Callable[..., EventLog], tmp_path: Any
) -> None:
    events = install(tag_application_name=tag, leak_threshold=0.1, sql_comments=True)
    engine = create_engine(
        f"sqlite:///{tmp_path / 'app.db'}",
        poolclass=QueuePool,
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.1,
    )
    with engine.connect() as conn:  # no application_name given to sqlite3.connect()
        assert conn.execute(text("SELECT 'sqlite'")).scalar_one() == "sqlite"
        assert pgleakguard.open_checkouts() == []
        with pytest.raises(exc.TimeoutError) as info:
            engine.connect()
    assert str(info.value).startswith(
        "QueuePool limit of size 1 overflow 0 reached, connection timed out, timeout 0.10 "
        "(Background on this error"
    )  # the message is SQLAlchemy's alone

    def forgetful() -> None:
        engine.connect().execute(text("SELECT 1"))

    forgetful()
    gc.collect()
    held = engine.connect()
    assert pgleakguard.open_checkouts() == []
    pgleakguard.check()
    assert events == []
    held.close()
    engine.dispose()
    assert _engine_listeners(engine)[:4] == [0, 0, 0, 0]  # no listener of its own


def test_a_sqlite_test_suite_passes_under_the_pytest_plugin(pytester: pytest.Pytester) -> None:
    # The plugin installs pgleakguard as soon as a test session imports SQLAlchemy.
    pytester.makeini("[pytest]\nfilterwarnings = default\n")
    pytester.makepyfile(
        test_sqlite="""
        import sqlalchemy as sa

        KEPT = []

        def test_sqlite(tmp_path):
            engine = sa.create_engine(f"sqlite:///{tmp_path / 'app.db'}")
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
            KEPT.append(engine.connect())  # held past the test: not a PostgreSQL connection
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1)


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
def test_a_dropped_engine_is_collected_with_its_server_session(
    driver: str, pg_dsn: str, events: EventLog
) -> None:
    engine = create_engine(url(pg_dsn, driver))
    with engine.connect() as conn:
        pid = server_pid(conn)
    ref = weakref.ref(engine)
    del engine, conn
    gc.collect()
    assert ref() is None
    with psycopg.connect(pg_dsn, autocommit=True) as observer:
        deadline = time.monotonic() + 10
        while observer.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone():
            assert time.monotonic() < deadline, "the pooled session outlived its engine"
            time.sleep(0.01)


async def test_a_dropped_async_engine_is_collected(pg_dsn: str, events: EventLog) -> None:
    engine = create_async_engine(url(pg_dsn, "asyncpg"), poolclass=NullPool)
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    ref = weakref.ref(engine.sync_engine)
    del engine, conn
    gc.collect()
    assert ref() is None


def test_reinstall_follows_the_transactions_of_existing_engines(
    make_engine: Callable[..., Engine], install: Callable[..., EventLog]
) -> None:
    install()
    engine = make_engine("psycopg2")
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    pgleakguard.uninstall()
    events = install(leak_threshold=60, idle_in_transaction_threshold=0.2)
    conn = engine.connect()  # leak: sa-reinstall
    conn.execute(text("SELECT 1"))
    [event] = events.wait_for("idle_in_transaction")
    assert event.callsite.line == marked_line(HERE, "sa-reinstall")
    assert event.transaction_status == "INTRANS"
    conn.close()


def test_two_engines_to_one_url_have_their_own_pool_and_culprits(
    make_engine: Callable[..., Engine], events: EventLog
) -> None:
    first = make_engine(pool_size=1, max_overflow=0, pool_timeout=0.2)
    second = make_engine(pool_size=1, max_overflow=0, pool_timeout=0.2)
    held_first = first.connect()  # leak: sa-first
    held_second = second.connect()  # leak: sa-second
    name = f"postgresql+{SYNC}:///postgres"
    assert [c.pool for c in sa_checkouts()] == [name, f"{name}#2"]
    with pytest.raises(exc.TimeoutError) as info:
        second.connect()
    message = str(info.value)
    assert (
        f"pgleakguard: 1 connection(s) of pool '{name}#2' checked out, by call-site:\n"
        f"  1 x {HERE}:{marked_line(HERE, 'sa-second')} in test_two_engines" in message
    )
    assert f"{HERE}:{marked_line(HERE, 'sa-first')}" not in message
    held_first.close()
    held_second.close()


def test_pool_name_is_the_logging_name_or_the_url_without_password(
    make_engine: Callable[..., Engine], events: EventLog
) -> None:
    from pgleakguard.integrations.sqlalchemy import pool_name

    remote = create_engine("postgresql+psycopg2://app:s3cret@db.internal:6432/orders")
    assert pool_name(remote) == "postgresql+psycopg2://db.internal:6432/orders"
    engine = make_engine(logging_name="orders-db")
    with engine.connect():
        assert [c.pool for c in sa_checkouts()] == ["orders-db"]


def test_a_pool_used_only_through_raw_connection_is_named(
    make_engine: Callable[..., Engine], events: EventLog
) -> None:
    engine = make_engine(SYNC)
    raw = engine.raw_connection()  # leak: sa-raw-only
    [held] = sa_checkouts()
    assert held.pool == f"postgresql+{SYNC}:///postgres"
    assert held.callsite.line == marked_line(HERE, "sa-raw-only")
    raw.close()


@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
def test_autocommit_engine_is_never_idle_in_transaction(
    driver: str, make_engine: Callable[..., Engine], install: Callable[..., EventLog], pg_dsn: str
) -> None:
    events = install(leak_threshold=0.6, idle_in_transaction_threshold=0.2)
    engine = make_engine(driver, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        with conn.begin():  # SQLAlchemy's begin event fires, the server opens nothing
            pid = server_pid(conn)
        conn.execute(text("SELECT 1"))
        # held_too_long comes after the idle threshold: by then the watchdog looked
        [held] = events.wait_for("held_too_long")
        with psycopg.connect(pg_dsn, autocommit=True) as observer:
            row = observer.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid])
            state = row.fetchone()
    assert state == ("idle",)
    assert held.transaction_status == "IDLE"
    assert events.leaks("idle_in_transaction") == []


async def test_autocommit_asyncpg_engine_is_never_idle_in_transaction(
    make_async_engine: Callable[..., AsyncEngine], install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=0.6, idle_in_transaction_threshold=0.2)
    engine = make_async_engine("asyncpg", isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        async with conn.begin():
            await conn.execute(text("SELECT 1"))
        await conn.execute(text("SELECT 1"))
        await asyncio.to_thread(events.wait_for, "held_too_long")
    [held] = events.leaks("held_too_long")
    assert held.transaction_status == "IDLE"
    assert events.leaks("idle_in_transaction") == []


@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
def test_statement_without_begin_left_idle_in_transaction(
    driver: str, make_engine: Callable[..., Engine], install: Callable[..., EventLog]
) -> None:
    # On SQLAlchemy 1.4's legacy Connection no begin event fires for this transaction.
    events = install(leak_threshold=60, idle_in_transaction_threshold=0.2)
    engine = make_engine(driver, **({"future": False} if SA14 else {}))
    conn = engine.connect()  # leak: sa-no-begin
    conn.execute(text("SELECT 1"))
    [event] = events.wait_for("idle_in_transaction")
    assert event.callsite.line == marked_line(HERE, "sa-no-begin")
    assert event.transaction_status == "INTRANS"
    conn.close()


@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
def test_failed_transaction_is_reported_as_such(
    driver: str, make_engine: Callable[..., Engine], install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=60, idle_in_transaction_threshold=0.2)
    engine = make_engine(driver)
    conn = engine.connect()  # leak: sa-failed-tx
    conn.execute(text("SELECT 1"))
    with pytest.raises(exc.ProgrammingError):
        conn.execute(text("SELECT no_such_column"))
    [event] = events.wait_for("idle_in_transaction")
    assert event.callsite.line == marked_line(HERE, "sa-failed-tx")
    assert event.transaction_status == "INERROR"
    conn.rollback()
    conn.close()


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_garbage_collected_connection_goes_back_to_the_pool(
    make_engine: Callable[..., Engine], events: EventLog
) -> None:
    engine = make_engine(pool_size=1, max_overflow=0, pool_timeout=0.2)

    def forgetful() -> None:
        engine.connect().execute(text("SELECT 1"))  # leak: sa-gc-slot

    forgetful()
    gc.collect()
    [event] = events.wait_for("garbage_collected")
    assert event.callsite.line == marked_line(HERE, "sa-gc-slot")
    assert engine.pool.checkedout() == 0  # SQLAlchemy took it back: no slot was lost
    held = engine.connect()  # leak: sa-gc-holder
    with pytest.raises(exc.TimeoutError) as info:
        engine.connect()
    message = str(info.value)
    assert "garbage collected" not in message
    assert (
        f"checked out, by call-site:\n  1 x {HERE}:{marked_line(HERE, 'sa-gc-holder')} in"
        in message
    )
    held.close()


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_dropped_orm_session_is_garbage_collected(
    make_engine: Callable[..., Engine], events: EventLog
) -> None:
    engine = make_engine(SYNC)

    def forgetful() -> None:
        session = Session(engine)
        session.execute(text("SELECT 1"))  # leak: sa-session-gc

    forgetful()
    gc.collect()
    [event] = events.wait_for("garbage_collected")
    assert event.callsite.line == marked_line(HERE, "sa-session-gc")
    assert event.callsite.function == "forgetful"


@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
def test_connection_held_too_long_names_the_line_and_the_stack(
    driver: str, make_engine: Callable[..., Engine], install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=0.2, idle_in_transaction_threshold=60)
    engine = make_engine(driver)

    def take() -> Any:
        return engine.connect()  # leak: sa-held

    conn = take()  # leak: sa-held-caller
    [event] = events.wait_for("held_too_long")
    assert (event.callsite.file, event.callsite.line) == (HERE, marked_line(HERE, "sa-held"))
    assert [(f["file"], f["line"], f["function"]) for f in event.stack[:2]] == [
        (HERE, marked_line(HERE, "sa-held"), "take"),
        (
            HERE,
            marked_line(HERE, "sa-held-caller"),
            "test_connection_held_too_long_names_the_line_and_the_stack",
        ),
    ]
    assert event.stack[0]["code"] == "return engine.connect()  # leak: sa-held"
    assert event.pool == f"postgresql+{driver}:///postgres"
    conn.close()


@pytest.mark.parametrize("driver", [PSYCOPG, "psycopg2"])
def test_users_application_name_is_kept_as_the_service(
    driver: str, pg_dsn: str, make_engine: Callable[..., Engine], events: EventLog
) -> None:
    engine = create_engine(url(pg_dsn, driver) + "&application_name=api")
    try:
        with engine.connect() as conn:
            name = conn.execute(text("SHOW application_name")).scalar_one()
            [held] = sa_checkouts()
    finally:
        engine.dispose()
    assert name == f"api/pid:{os.getpid()}"
    assert held.application_name == name
