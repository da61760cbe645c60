"""The pytest plugin, run by pytester on real leaking test files against the real PostgreSQL.

Each inner test file marks the line that takes a connection with ``# leak: <name>``; the
assertions check that exact line in the failure, the summary and the JSON report.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import textwrap
import warnings
from pathlib import Path
from typing import Any

# Imported here, not only in the inner runs: pytester takes out of sys.modules what an
# in-process run imported, and a second import misbehaves (psycopg's C extension keeps
# raising the exception classes of its first import; SQLAlchemy's dialects register their
# SQL functions twice and warn).
import psycopg  # noqa: F401
import psycopg2  # noqa: F401
import psycopg_pool  # noqa: F401
import pytest
import sqlalchemy.dialects.postgresql.psycopg  # noqa: F401
import sqlalchemy.ext.asyncio  # noqa: F401
import sqlalchemy.orm  # noqa: F401

import pgleakguard.integrations.psycopg_pool  # noqa: F401
import pgleakguard.integrations.sqlalchemy  # noqa: F401
import pgleakguard.pytest_plugin  # noqa: F401
import pgleakguard.testing  # the module the plugin runs on; patched by the fault tests

from conftest import marked_line

pytest_plugins = ["pytester"]

CONFTEST = """
import os

import pytest

DSN = os.environ["PGLEAKGUARD_INNER_DSN"]

#: Connections the tests leak on purpose and keep: closed after the session (pgleakguard's
#: checks are done by then), so that nothing stays open in the process running pytester.
KEPT = []


@pytest.fixture
def dsn():
    return DSN


def pytest_sessionfinish():
    for conn in KEPT:
        pgconn = getattr(conn, "pgconn", None)
        if pgconn is not None:
            pgconn.finish()  # psycopg, sync or async: no event loop needed
        else:
            conn.close()
"""

# Python's default warning filters (the outer suite's "error" must not reach inner runs:
# psycopg and SQLAlchemy warn when a leaked connection is garbage collected).
INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings = default
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> Inner:
    """A pytester directory with a ``dsn`` fixture pointing at the test server."""
    monkeypatch.setenv("PGLEAKGUARD_INNER_DSN", pg_dsn)
    for name in list(os.environ):
        if name.startswith("PGLEAKGUARD_") and name != "PGLEAKGUARD_INNER_DSN":
            monkeypatch.delenv(name)
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    return Inner(pytester)


class Inner:
    """Runs an inner pytest session and reads its JSON report."""

    def __init__(self, pytester: pytest.Pytester) -> None:
        self.pytester = pytester
        self.report = pytester.path / "leaks.json"

    def write(self, name: str, source: str) -> Path:
        return self.pytester.makepyfile(**{name: textwrap.dedent(source)})

    def run(self, *args: str, subprocess: bool = False) -> pytest.RunResult:
        argv = ("-p", "no:cacheprovider", f"--pgleakguard-report={self.report}", *args)
        if subprocess:
            return self.pytester.runpytest_subprocess(*argv, timeout=120)
        return self.inline(*argv)

    def inline(self, *argv: str) -> pytest.RunResult:
        """An in-process run. The connections its test modules keep are freed when pytester
        takes those modules out of sys.modules, and psycopg warns (ResourceWarning) as each
        is collected: under this suite's "error" filter that would fail whichever test runs
        then. They are collected here, quietly."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = self.pytester.runpytest(*argv)
            gc.collect()
        return result

    def leaks(self) -> list[dict[str, Any]]:
        document = json.loads(self.report.read_text())
        assert document["version"] == 1
        return list(document["leaks"])


def site(path: Path, name: str, function: str) -> str:
    """``file:line in function`` of the line marked ``# leak: name``."""
    return f"{path}:{marked_line(str(path), name)} in {function}"


# -- each kind of connection, leaked and not ------------------------------------------------

# The fixtures both versions of the test file use.
FIXTURES = """
import psycopg
import psycopg_pool
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

from conftest import DSN

URL = DSN.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture(scope="module")
def pool():
    with psycopg_pool.ConnectionPool(DSN, min_size=1, max_size=4) as pool:
        yield pool


@pytest.fixture(scope="module")
def engine():
    engine = sa.create_engine(URL)
    yield engine
    engine.dispose()
"""

LEAKS = (
    FIXTURES
    + """

def test_raw(dsn):
    conn = psycopg.connect(dsn)  # leak: raw
    conn.execute("SELECT 1")


async def test_async_raw(dsn):
    conn = await psycopg.AsyncConnection.connect(dsn)  # leak: async_raw
    await conn.execute("SELECT 1")


def test_pool(pool):
    conn = pool.getconn()  # leak: pool
    conn.execute("SELECT 1")


async def test_async_pool(dsn):
    async with psycopg_pool.AsyncConnectionPool(dsn, min_size=1, max_size=2) as apool:
        conn = await apool.getconn()  # leak: async_pool
        await conn.execute("SELECT 1")


def test_sqlalchemy(engine):
    conn = engine.connect()  # leak: sqlalchemy
    conn.execute(sa.text("SELECT 1"))


async def test_sqlalchemy_async():
    engine = create_async_engine(URL)
    conn = await engine.connect()  # leak: sqlalchemy_async
    await conn.execute(sa.text("SELECT 1"))


def test_orm_session(engine):
    session = Session(engine)
    session.execute(sa.text("SELECT 1"))  # leak: session
"""
)

CLEAN = (
    FIXTURES
    + """

def test_raw(dsn):
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT 1")


async def test_async_raw(dsn):
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute("SELECT 1")


def test_pool(pool):
    conn = pool.getconn()
    conn.execute("SELECT 1")
    pool.putconn(conn)


async def test_async_pool(dsn):
    async with psycopg_pool.AsyncConnectionPool(dsn, min_size=1, max_size=2) as apool:
        async with apool.connection() as conn:
            await conn.execute("SELECT 1")


def test_sqlalchemy(engine):
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))


async def test_sqlalchemy_async():
    engine = create_async_engine(URL)
    async with engine.connect() as conn:
        await conn.execute(sa.text("SELECT 1"))
    await engine.dispose()


def test_orm_session(engine):
    with Session(engine) as session:
        session.execute(sa.text("SELECT 1"))
"""
)

EXPECTED = [
    ("test_raw", "raw", "psycopg"),
    ("test_async_raw", "async_raw", "psycopg"),
    ("test_pool", "pool", "psycopg_pool"),
    ("test_async_pool", "async_pool", "psycopg_pool"),
    ("test_sqlalchemy", "sqlalchemy", "sqlalchemy"),
    ("test_sqlalchemy_async", "sqlalchemy_async", "sqlalchemy"),
    ("test_orm_session", "session", "sqlalchemy"),
]


def test_each_leaking_test_errors_in_teardown_naming_its_own_line(inner: Inner) -> None:
    path = inner.write("test_leaks", LEAKS)
    result = inner.run()
    result.assert_outcomes(passed=7, errors=7)
    leaks = {leak["test"]: leak for leak in inner.leaks()}
    assert sorted(leaks) == sorted(f"test_leaks.py::{test}" for test, _, _ in EXPECTED)
    for test, mark, integration in EXPECTED:
        leak = leaks[f"test_leaks.py::{test}"]
        assert leak["callsite"] == site(path, mark, test), leak["report"]
        assert leak["kind"] == "garbage_collected"
        assert leak["event"]["integration"] == integration
        assert leak["event"]["stack"][0]["line"] == marked_line(str(path), mark)
        assert leak["backend_pid"] > 0
        # The teardown error carries the report: kind, call-site, stack, backend pid.
        result.stdout.fnmatch_lines(
            [
                f"*ERROR at teardown of {test} *",
                f"pgleakguard: leaked at test_leaks.py:{marked_line(str(path), mark)} in {test}*",
                f"pgleakguard: connection leak [garbage_collected, definite] checked out at "
                f"{site(path, mark, test)}",
            ]
        )
        assert f"backend_pid={leak['backend_pid']} " in leak["report"]
    result.stdout.fnmatch_lines(
        [
            "*= pgleakguard =*",
            "7 test(s) leaked 7 PostgreSQL connection(s):",
            f"  test_leaks.py::test_raw: garbage_collected at test_leaks.py:"
            f"{marked_line(str(path), 'raw')} in test_raw",
        ]
    )


def test_the_same_tests_written_correctly_pass(inner: Inner) -> None:
    inner.write("test_clean", CLEAN)
    result = inner.run()
    result.assert_outcomes(passed=7)
    assert inner.leaks() == []
    assert "= pgleakguard =" not in result.stdout.str()
    result.stdout.fnmatch_lines(["pgleakguard: mode fail, gc on"])


# -- what belongs to whom ---------------------------------------------------------------------

WIDE_FIXTURE = """
import psycopg
import pytest

from conftest import DSN


@pytest.fixture(scope="{scope}")
def shared():
    conn = psycopg.connect(DSN, autocommit=True)  # leak: shared
    yield conn
    # never closed: the fixture's own leak


class TestShared:
    @pytest.mark.parametrize("n", range(20))
    def test_uses_shared(self, shared, n):
        assert shared.execute("SELECT %s::int", [n]).fetchone() == (n,)
"""


@pytest.mark.parametrize("scope", ["class", "module", "package", "session"])
def test_wider_fixture_connection_is_the_fixtures_reported_once_at_its_finalization(
    inner: Inner, scope: str
) -> None:
    path = inner.write("test_shared", WIDE_FIXTURE.replace("{scope}", scope))
    result = inner.run()
    # 20 tests pass; the fixture's leak errors once, in the teardown that finalizes it.
    result.assert_outcomes(passed=20, errors=1)
    [leak] = inner.leaks()
    assert leak["test"] == "test_shared.py::TestShared::test_uses_shared[19]"
    assert leak["owner"] == f"fixture 'shared' ({scope} scope)"
    assert leak["fixture"] == "shared"
    assert leak["kind"] == "scope_ended"
    assert leak["callsite"] == site(path, "shared", "shared")
    result.stdout.fnmatch_lines(
        [
            f"*scope=fixture 'shared' ({scope} scope)",
            "1 test(s) leaked 1 PostgreSQL connection(s):",
            f"  test_shared.py::TestShared::test_uses_shared[19] [fixture 'shared' ({scope} "
            f"scope)]: scope_ended at test_shared.py:{marked_line(str(path), 'shared')} in shared",
        ]
    )


def test_a_fixture_that_closes_its_connection_leaks_nothing(inner: Inner) -> None:
    inner.write(
        "test_closing",
        """
        import psycopg
        import pytest

        from conftest import DSN


        @pytest.fixture(scope="module")
        def shared():
            with psycopg.connect(DSN, autocommit=True) as conn:
                yield conn


        @pytest.mark.parametrize("n", range(20))
        def test_uses_shared(shared, n):
            shared.execute("SELECT 1")
        """,
    )
    inner.run().assert_outcomes(passed=20)
    assert inner.leaks() == []


def test_function_fixture_leak_is_the_tests_and_names_the_fixture(inner: Inner) -> None:
    path = inner.write(
        "test_function_fixture",
        """
        import psycopg
        import pytest


        @pytest.fixture
        def conn(dsn):
            conn = psycopg.connect(dsn)  # leak: fixture
            yield conn


        def test_one(conn):
            conn.execute("SELECT 1")
        """,
    )
    inner.run().assert_outcomes(passed=1, errors=1)
    [leak] = inner.leaks()
    assert leak["test"] == "test_function_fixture.py::test_one"
    assert leak["owner"] == "test test_function_fixture.py::test_one"
    assert leak["fixture"] == "conn"
    assert leak["callsite"] == site(path, "fixture", "conn")


def test_connections_that_existed_before_a_test_are_never_blamed_on_it(inner: Inner) -> None:
    path = inner.write(
        "test_before",
        """
        import psycopg

        from conftest import DSN, KEPT

        KEPT.append(psycopg.connect(DSN))  # opened at import, before any test


        def test_first(dsn):
            KEPT.append(psycopg.connect(dsn))  # leak: first


        def test_second(dsn):
            with psycopg.connect(dsn) as conn:
                conn.execute("SELECT 1")
        """,
    )
    result = inner.run()
    result.assert_outcomes(passed=2, errors=1)
    [leak] = inner.leaks()
    assert leak["test"] == "test_before.py::test_first"
    assert leak["kind"] == "scope_ended"  # still held, in KEPT
    assert leak["callsite"] == site(path, "first", "test_first")


CYCLE = """
import psycopg


class Holder:
    def __init__(self, conn):
        self.conn = conn
        self.me = self  # a reference cycle: only the garbage collector frees it


def test_cycle(dsn):
    Holder(psycopg.connect(dsn))  # leak: cycle
"""


def test_gc_tells_garbage_from_a_held_connection_and_no_gc_skips_it(inner: Inner) -> None:
    path = inner.write("test_cycle", CYCLE)
    inner.run().assert_outcomes(passed=1, errors=1)
    [leak] = inner.leaks()
    assert leak["kind"] == "garbage_collected"
    assert leak["callsite"] == site(path, "cycle", "test_cycle")

    result = inner.run("--pgleakguard-no-gc")
    result.assert_outcomes(passed=1, errors=1)
    [leak] = inner.leaks()
    assert leak["kind"] == "scope_ended"  # without a collection it still looks held
    result.stdout.fnmatch_lines(["pgleakguard: mode fail, gc off"])


def test_a_thread_that_ends_holding_a_connection_is_owner_exited(inner: Inner) -> None:
    path = inner.write(
        "test_thread",
        """
        import threading

        import psycopg

        from conftest import KEPT


        def job(dsn):
            KEPT.append(psycopg.connect(dsn))  # leak: thread


        def test_thread(dsn):
            worker = threading.Thread(target=job, args=(dsn,), name="job-1")
            worker.start()
            worker.join()
        """,
    )
    inner.run().assert_outcomes(passed=1, errors=1)
    [leak] = inner.leaks()
    assert leak["kind"] == "owner_exited"
    assert leak["callsite"] == site(path, "thread", "job")
    assert leak["event"]["holder"] == "job-1"


# -- modes, exemptions, switches -------------------------------------------------------------


def test_warn_mode_passes_and_reports(inner: Inner) -> None:
    path = inner.write("test_leaks", LEAKS)
    result = inner.run("--pgleakguard=warn")
    result.assert_outcomes(passed=7)
    assert len(inner.leaks()) == 7
    result.stdout.fnmatch_lines(
        [
            "*= pgleakguard =*",
            "7 test(s) leaked 7 PostgreSQL connection(s):",
            f"  test_leaks.py::test_raw: garbage_collected at test_leaks.py:"
            f"{marked_line(str(path), 'raw')} in test_raw",
        ]
    )
    assert result.ret == pytest.ExitCode.OK


def test_ini_mode_and_command_line_override(inner: Inner) -> None:
    inner.pytester.makeini(INI + "pgleakguard_mode = warn\n")
    inner.write("test_leaks", LEAKS)
    inner.run().assert_outcomes(passed=7)
    inner.run("--pgleakguard=fail").assert_outcomes(passed=7, errors=7)


def test_a_bad_ini_mode_is_one_clear_usage_error(inner: Inner) -> None:
    inner.pytester.makeini(INI + "pgleakguard_mode = strict\n")
    inner.write("test_leaks", LEAKS)
    result = inner.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*pgleakguard_mode = 'strict'*expected fail, warn or off*"])


@pytest.mark.parametrize("switch", [("-p", "no:pgleakguard"), ("--pgleakguard=off",)])
def test_switched_off_no_test_fails(inner: Inner, switch: tuple[str, ...]) -> None:
    inner.write("test_leaks", LEAKS)
    result = inner.inline("-p", "no:cacheprovider", *switch)
    result.assert_outcomes(passed=7)
    assert "pgleakguard: mode" not in result.stdout.str()
    assert "= pgleakguard =" not in result.stdout.str()


def test_the_marker_exempts_and_the_summary_still_lists(inner: Inner) -> None:
    path = inner.write(
        "test_marked",
        """
        import psycopg
        import pytest

        from conftest import KEPT


        @pytest.mark.pgleakguard(allow=True)
        def test_allowed(dsn):
            KEPT.append(psycopg.connect(dsn))  # leak: allowed


        @pytest.mark.pgleakguard(allow="ticket 42: the cache keeps one")
        def test_with_reason(dsn):
            KEPT.append(psycopg.connect(dsn))  # leak: reason


        @pytest.mark.pgleakguard(allow=False)
        def test_not_allowed(dsn):
            KEPT.append(psycopg.connect(dsn))  # leak: not_allowed
        """,
    )
    result = inner.run()
    result.assert_outcomes(passed=3, errors=1)
    allowed = {leak["test"].split("::")[1]: leak["allowed"] for leak in inner.leaks()}
    assert allowed == {
        "test_allowed": "allowed by @pytest.mark.pgleakguard",
        "test_with_reason": "ticket 42: the cache keeps one",
        "test_not_allowed": None,
    }
    result.stdout.fnmatch_lines(
        [
            "1 test(s) leaked 1 PostgreSQL connection(s):",
            "*test_marked.py::test_not_allowed: scope_ended at test_marked.py:"
            f"{marked_line(str(path), 'not_allowed')} in test_not_allowed",
            "2 leak(s) allowed by @pytest.mark.pgleakguard:",
            "*test_with_reason: scope_ended at *(ticket 42: the cache keeps one)",
        ]
    )


def test_a_marker_with_unknown_arguments_fails_the_test_saying_so(inner: Inner) -> None:
    inner.write(
        "test_bad_marker",
        """
        import pytest


        @pytest.mark.pgleakguard("yes")
        def test_one():
            pass
        """,
    )
    result = inner.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at setup of test_one*", "*takes allow=True or allow='reason', not 'yes'*"]
    )


def test_ini_ignore_patterns_exempt_call_sites(inner: Inner) -> None:
    inner.pytester.mkpydir("vendored")
    (inner.pytester.path / "vendored" / "legacy.py").write_text(
        textwrap.dedent(
            """
            import psycopg

            from conftest import KEPT


            def remember(dsn):
                KEPT.append(psycopg.connect(dsn))
            """
        )
    )
    path = inner.write(
        "test_vendored",
        """
        import psycopg

        from vendored import legacy

        from conftest import KEPT


        def test_vendored(dsn):
            legacy.remember(dsn)


        def test_own(dsn):
            KEPT.append(psycopg.connect(dsn))  # leak: own
        """,
    )
    inner.pytester.makeini(INI + "pgleakguard_ignore =\n    vendored/*\n")
    result = inner.run()
    result.assert_outcomes(passed=2, errors=1)
    [leak] = inner.leaks()
    assert leak["callsite"] == site(path, "own", "test_own")


# -- asyncio, xdist, Django ------------------------------------------------------------------


def test_an_async_task_ending_with_its_connection_is_reported(inner: Inner) -> None:
    path = inner.write(
        "test_tasks",
        """
        import asyncio

        import psycopg_pool

        from conftest import KEPT


        async def job(pool):
            KEPT.append(await pool.getconn())  # leak: task


        async def test_task(dsn):
            async with psycopg_pool.AsyncConnectionPool(dsn, min_size=1, max_size=2) as pool:
                await asyncio.create_task(job(pool), name="job-task")
        """,
    )
    inner.run().assert_outcomes(passed=1, errors=1)
    [leak] = inner.leaks()
    assert leak["kind"] == "owner_exited"
    assert leak["callsite"] == site(path, "task", "job")
    assert leak["event"]["holder"] == "job-task"


def test_xdist_workers_check_independently_and_the_summary_adds_up(inner: Inner) -> None:
    path = inner.write(
        "test_spread",
        """
        import psycopg
        import pytest

        from conftest import KEPT


        @pytest.mark.parametrize("n", range(6))
        def test_clean(dsn, n):
            with psycopg.connect(dsn) as conn:
                conn.execute("SELECT 1")


        @pytest.mark.parametrize("n", range(3))
        def test_leaky(dsn, n):
            KEPT.append(psycopg.connect(dsn))  # leak: spread
        """,
    )
    result = inner.run("-n", "2", subprocess=True)
    result.assert_outcomes(passed=9, errors=3)
    leaks = inner.leaks()
    assert sorted(leak["test"] for leak in leaks) == [
        f"test_spread.py::test_leaky[{n}]" for n in range(3)
    ]
    assert {leak["callsite"] for leak in leaks} == {site(path, "spread", "test_leaky")}
    result.stdout.fnmatch_lines(
        ["*= pgleakguard =*", "3 test(s) leaked 3 PostgreSQL connection(s):"]
    )


DJANGO_SETTINGS = """
import os

from psycopg.conninfo import conninfo_to_dict

_server = conninfo_to_dict(os.environ["PGLEAKGUARD_INNER_DSN"])
SECRET_KEY = "pgleakguard-plugin-tests"
INSTALLED_APPS = ["django.contrib.contenttypes", "pgleakguard.integrations.django"]
ROOT_URLCONF = "leakyurls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _server.get("dbname") or "postgres",
        "USER": _server.get("user") or "",
        "PASSWORD": _server.get("password") or "",
        "HOST": _server.get("host") or "",
        "PORT": str(_server.get("port") or ""),
        "TEST": {"NAME": "test_pgleakguard_plugin"},
    }
}
"""

DJANGO_URLS = """
import threading

from django.db import connection
from django.http import HttpResponse
from django.urls import path


def job():
    with connection.cursor() as cursor:  # leak: view_thread
        cursor.execute("SELECT 1")


def leaky(request):
    worker = threading.Thread(target=job, name="export-1")
    worker.start()
    worker.join()
    return HttpResponse("started")


def clean(request):
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return HttpResponse("ok")


urlpatterns = [path("leaky/", leaky), path("clean/", clean)]
"""

DJANGO_TESTS = """
import pytest
from django.db import connection


@pytest.mark.django_db
def test_view_that_leaks_from_a_thread(client):
    assert client.get("/leaky/").status_code == 200


@pytest.mark.django_db
def test_clean_view(client):
    assert client.get("/clean/").status_code == 200


@pytest.mark.django_db(transaction=True)
def test_transactional_clean_view(client):
    assert client.get("/clean/").status_code == 200


@pytest.mark.django_db
def test_orm_in_the_test_itself():
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
"""


def test_pytest_django_thread_leak_fails_and_clean_tests_pass(
    inner: Inner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)  # pytest-django on, in its own process
    inner.pytester.makeini(INI + "DJANGO_SETTINGS_MODULE = leakysettings\n")
    inner.write("leakysettings", DJANGO_SETTINGS)
    urls = inner.write("leakyurls", DJANGO_URLS)
    inner.write("test_django", DJANGO_TESTS)
    result = inner.run("-p", "django", subprocess=True)
    result.assert_outcomes(passed=4, errors=1)
    [leak] = inner.leaks()
    assert leak["test"] == "test_django.py::test_view_that_leaks_from_a_thread"
    assert leak["callsite"] == site(urls, "view_thread", "job")
    assert leak["kind"] == "garbage_collected"  # the ended thread's connection, dropped
    assert leak["event"]["integration"] == "django"


# -- server-side confirmation ----------------------------------------------------------------

SERVER = """
import psycopg
import psycopg2
import pytest

from conftest import DSN, KEPT


@pytest.fixture(scope="session")
def shared():
    conn = psycopg.connect(DSN)
    yield conn
    conn.close()


def test_untracked_connection(dsn):
    KEPT.append(psycopg2.connect(dsn))  # no hook sees psycopg2 used directly


def test_leaves_a_transaction_open(shared):
    shared.execute("SELECT 1")


def test_clean(shared, dsn):
    shared.rollback()
    closed = psycopg2.connect(dsn)
    closed.close()
"""


def test_server_check_reports_untracked_and_idle_in_transaction_sessions(
    inner: Inner, pg_dsn: str
) -> None:
    inner.write("test_server", SERVER)
    result = inner.run("--pgleakguard-server-check", f"--pgleakguard-dsn={pg_dsn}")
    result.assert_outcomes(passed=3, errors=2)
    leaks = {leak["test"].split("::")[1]: leak for leak in inner.leaks()}
    assert sorted(leaks) == ["test_leaves_a_transaction_open", "test_untracked_connection"]
    untracked = leaks["test_untracked_connection"]
    assert (untracked["source"], untracked["kind"]) == ("server", "untracked")
    assert untracked["event"]["state"] == "idle"
    stuck = leaks["test_leaves_a_transaction_open"]
    assert (stuck["source"], stuck["kind"]) == ("server", "idle_in_transaction")
    assert stuck["event"]["query"] == "SELECT 1"
    result.stdout.fnmatch_lines(
        [
            f"pgleakguard: server-side session [untracked] backend_pid={untracked['backend_pid']}",
            "*test_server.py::test_untracked_connection: untracked (server) at backend_pid=*",
        ]
    )


def test_server_check_without_a_dsn_is_a_usage_error(inner: Inner) -> None:
    inner.write("test_clean", CLEAN)
    result = inner.run("--pgleakguard-server-check")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--pgleakguard-server-check needs a server to read*"])


def test_server_check_with_a_wrong_dsn_names_it_without_the_password(inner: Inner) -> None:
    inner.write("test_clean", CLEAN)
    result = inner.run(
        "--pgleakguard-server-check",
        "--pgleakguard-dsn=postgresql://bob:s3cret-sentinel@127.0.0.1:1/nowhere",
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*cannot connect to postgresql://bob@127.0.0.1:1/nowhere*"])
    assert "s3cret-sentinel" not in result.stdout.str() + result.stderr.str()


# -- costs nothing when there is nothing to do ------------------------------------------------


def test_without_a_database_library_nothing_is_installed_or_imported(inner: Inner) -> None:
    inner.write(
        "test_plain",
        """
        import sys


        def test_nothing_hooked():
            assert "pgleakguard.pytest_plugin" in sys.modules
            assert "pgleakguard._runtime" not in sys.modules
            assert "psycopg" not in sys.modules
        """,
    )
    inner.pytester.makeconftest("")
    inner.run(subprocess=True).assert_outcomes(passed=1)
    assert inner.leaks() == []


# -- an internal error never breaks the test run ---------------------------------------------


@pytest.mark.allow_internal_errors
@pytest.mark.parametrize("target", ["classify", "taken"])
def test_a_fault_inside_the_plugin_never_changes_the_outcome_of_tests(
    inner: Inner, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, target: str
) -> None:
    from pgleakguard import _safety

    testing = pgleakguard.testing

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected fault")

    owner = testing if target == "classify" else testing.Window
    monkeypatch.setattr(owner, target, boom)
    inner.write(
        "test_mixed",
        """
        import psycopg
        import pytest

        from conftest import KEPT


        def test_clean(dsn):
            with psycopg.connect(dsn) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)


        def test_leaky(dsn):
            KEPT.append(psycopg.connect(dsn))


        def test_failing(dsn):
            with psycopg.connect(dsn) as conn:
                assert conn.execute("SELECT 1").fetchone() == (2,)
        """,
    )
    _safety.forget_logged()
    before = _safety.internal_error_count()
    with caplog.at_level(logging.ERROR, logger="pgleakguard"):
        result = inner.run()
    result.assert_outcomes(passed=2, failed=1)  # the tests' own outcomes, nothing else
    # Counted each time it is hit (classify: only for the test that took a connection and
    # kept it; taken: after every test), logged once.
    assert _safety.internal_error_count() - before == (1 if target == "classify" else 3)
    logged = [r for r in caplog.records if "pgleakguard internal error" in r.getMessage()]
    assert len(logged) == 1
