"""The pytest plugin, run by pytester on real leaking test files against the real PostgreSQL.

Each inner test file marks the line that takes a connection with ``# leak: <name>``; the
assertions check that exact line in the failure, the summary and the JSON report.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import subprocess
import sys
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


def literal(text: str) -> str:
    """``text`` as an fnmatch pattern that matches only itself (``[2]`` is a character set)."""
    return re.sub(r"([\[\]*?])", r"[\1]", text)


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


HELD = (
    FIXTURES
    + """
from conftest import KEPT


def test_raw(dsn):
    KEPT.append(psycopg.connect(dsn))  # leak: raw


def test_pool(pool):
    KEPT.append(pool.getconn())  # leak: pool


def test_sqlalchemy(engine):
    KEPT.append(engine.connect())  # leak: sqlalchemy


def test_orm_session(engine):
    session = Session(engine)
    session.execute(sa.text("SELECT 1"))  # leak: session
    KEPT.append(session)


def test_last():
    pass  # the module's fixtures are finalized here: nothing of theirs is left open
"""
)


def test_each_kind_of_connection_still_held_is_scope_ended_at_its_own_line(inner: Inner) -> None:
    path = inner.write("test_held", HELD)
    result = inner.run()
    result.assert_outcomes(passed=5, errors=4)
    leaks = {leak["test"].split("::")[1]: leak for leak in inner.leaks()}
    expected = {
        "test_raw": ("raw", "psycopg", None),
        "test_pool": ("pool", "psycopg_pool", None),
        "test_sqlalchemy": ("sqlalchemy", "sqlalchemy", None),
        "test_orm_session": ("session", "sqlalchemy", "INTRANS"),
    }
    assert sorted(leaks) == sorted(expected)
    for test, (mark, integration, transaction) in expected.items():
        leak = leaks[test]
        assert leak["kind"] == "scope_ended", leak["report"]
        assert leak["callsite"] == site(path, mark, test)
        assert leak["event"]["integration"] == integration
        assert leak["owner"] == f"test test_held.py::{test}"
        if transaction:
            assert leak["event"]["transaction_status"] == transaction
    result.stdout.fnmatch_lines(["4 test(s) leaked 4 PostgreSQL connection(s):"])


# -- what belongs to whom ---------------------------------------------------------------------

SHARED_FIXTURE = """
import psycopg
import pytest

from conftest import DSN


@pytest.fixture(scope="{scope}")
def shared():
    conn = psycopg.connect(DSN, autocommit=True)  # leak: shared
    yield conn
    # never closed: the fixture's own leak
"""

USES_SHARED = """
import pytest


class {cls}:
    @pytest.mark.parametrize("n", range(3))
    def test_uses_shared(self, shared, n):
        assert shared.execute("SELECT %s::int", [n]).fetchone() == (n,)
"""

NOT_SHARED = """
import pytest


class {cls}:
    @pytest.mark.parametrize("n", range(3))
    def test_other(self, dsn, n):
        pass
"""

# Per scope: (files, the test whose teardown finalizes the fixture, the fixture's file).
# The first group of tests uses the fixture and the next one does not: the leak lands at
# the first group's last test (the whole session's last test for session scope).
WIDE_LAYOUTS: dict[str, tuple[dict[str, str], str, str]] = {
    "class": (
        {
            "test_groups.py": SHARED_FIXTURE
            + USES_SHARED.replace("{cls}", "TestFirst")
            + NOT_SHARED.replace("{cls}", "TestNext"),
        },
        "test_groups.py::TestFirst::test_uses_shared[2]",
        "test_groups.py",
    ),
    "module": (
        {
            "test_a.py": SHARED_FIXTURE + USES_SHARED.replace("{cls}", "TestFirst"),
            "test_b.py": NOT_SHARED.replace("{cls}", "TestNext"),
        },
        "test_a.py::TestFirst::test_uses_shared[2]",
        "test_a.py",
    ),
    "package": (
        {
            "pkg_a/__init__.py": "",
            "pkg_a/conftest.py": SHARED_FIXTURE,
            "pkg_a/test_a.py": USES_SHARED.replace("{cls}", "TestFirst"),
            "pkg_b/__init__.py": "",
            "pkg_b/test_b.py": NOT_SHARED.replace("{cls}", "TestNext"),
        },
        "pkg_a/test_a.py::TestFirst::test_uses_shared[2]",
        "pkg_a/conftest.py",
    ),
    "session": (
        {
            "test_a.py": SHARED_FIXTURE + USES_SHARED.replace("{cls}", "TestFirst"),
            "test_b.py": NOT_SHARED.replace("{cls}", "TestNext"),
        },
        "test_b.py::TestNext::test_other[2]",
        "test_a.py",
    ),
}


@pytest.mark.parametrize("scope", list(WIDE_LAYOUTS))
def test_wider_fixture_connection_is_the_fixtures_reported_once_at_its_finalization(
    inner: Inner, scope: str
) -> None:
    files, finalizing, fixture_file = WIDE_LAYOUTS[scope]
    for name, source in files.items():
        path = inner.pytester.path / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(textwrap.dedent(source.replace("{scope}", scope)))
    result = inner.run()
    # 6 tests pass; the fixture's leak errors once, in the teardown that finalizes it.
    result.assert_outcomes(passed=6, errors=1)
    [leak] = inner.leaks()
    assert leak["test"] == finalizing
    assert leak["owner"] == f"fixture 'shared' ({scope} scope)"
    assert leak["fixture"] == "shared"
    assert leak["kind"] == "scope_ended"
    shared_path = inner.pytester.path / fixture_file
    assert leak["callsite"] == site(shared_path, "shared", "shared")
    line = marked_line(str(shared_path), "shared")
    result.stdout.fnmatch_lines(
        [
            f"*ERROR at teardown of {literal(finalizing.split('::', 1)[1].replace('::', '.'))} *",
            f"pgleakguard: fixture 'shared' ({scope} scope) leaked at {fixture_file}:{line} "
            "in shared (scope_ended)",
            "A fixture's connection is checked when the fixture is finalized, here in this "
            "test's setup or teardown: the fixture leaked it, not this test.",
            f"*scope=fixture 'shared' ({scope} scope)",
            "1 fixture(s) leaked 1 PostgreSQL connection(s):",
            f"  {finalizing} [fixture 'shared' ({scope} scope)]: scope_ended at "
            f"{fixture_file}:{line} in shared",
        ]
    )
    document = json.loads(inner.report.read_text())
    assert (document["tests_leaking"], document["fixtures_leaking"]) == (0, 1)


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


NESTED_SETUPS = """
import psycopg
import pytest

from conftest import DSN, KEPT


@pytest.fixture(scope="module")
def shared():
    conn = psycopg.connect(DSN, autocommit=True)
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def other():
    conn = psycopg.connect(DSN, autocommit=True)
    yield conn
    conn.close()


@pytest.fixture
def mine(request):
    request.getfixturevalue("shared")  # set up from inside this fixture
    KEPT.append(psycopg.connect(DSN))  # leak: mine


def test_a_fixture_requests_a_wider_one(mine):
    pass


def test_the_test_requests_a_wider_one(request):
    request.getfixturevalue("other")  # set up from inside the test's call
    KEPT.append(psycopg.connect(DSN))  # leak: body
"""


def test_a_fixture_set_up_from_inside_another_or_the_test_owns_only_its_own(
    inner: Inner,
) -> None:
    path = inner.write("test_nested", NESTED_SETUPS)
    result = inner.run()
    result.assert_outcomes(passed=2, errors=2)
    leaks = {leak["test"].split("::")[1]: leak for leak in inner.leaks()}
    # The module fixtures' connections (closed at the module's end) are nobody's leak; what
    # the requester took after them is the test's.
    assert sorted(leaks) == [
        "test_a_fixture_requests_a_wider_one",
        "test_the_test_requests_a_wider_one",
    ]
    by_fixture = leaks["test_a_fixture_requests_a_wider_one"]
    assert (by_fixture["owner"], by_fixture["fixture"]) == (
        "test test_nested.py::test_a_fixture_requests_a_wider_one",
        "mine",
    )
    assert by_fixture["callsite"] == site(path, "mine", "mine")
    in_body = leaks["test_the_test_requests_a_wider_one"]
    assert in_body["fixture"] is None
    assert in_body["callsite"] == site(path, "body", "test_the_test_requests_a_wider_one")


HELD_THROUGH_FIXTURES = """
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from conftest import DSN, KEPT

URL = DSN.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture(scope="module")
def engine():
    engine = sa.create_engine(URL)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def session(engine):
    session = Session(engine)  # no connection yet: its first query takes one
    yield session
    session.close()


class Repository:
    def __init__(self, session):
        self.session = session


@pytest.fixture(scope="module")
def repo(engine):
    return Repository(Session(engine))  # never closed


def test_first_query_through_the_session(session):
    session.execute(sa.text("SELECT 1"))  # taken here; the transaction stays open


def test_own_connection_beside_the_fixtures(session, engine):
    session.execute(sa.text("SELECT 2"))
    KEPT.append(engine.connect())  # leak: own


def test_through_an_object_of_the_fixture(repo):
    repo.session.execute(sa.text("SELECT 1"))  # leak: wrapped


def test_last(session, repo):
    pass
"""


def test_a_connection_held_through_a_wider_fixtures_object_is_the_fixtures(
    inner: Inner,
) -> None:
    path = inner.write("test_through", HELD_THROUGH_FIXTURES)
    result = inner.run()
    result.assert_outcomes(passed=4, errors=2)
    leaks = {leak["test"].split("::")[1]: leak for leak in inner.leaks()}
    # The module-scoped Session's connection, first taken in a test and closed by the
    # fixture, is nobody's leak; the test's own connection is the test's.
    assert sorted(leaks) == ["test_last", "test_own_connection_beside_the_fixtures"]
    own = leaks["test_own_connection_beside_the_fixtures"]
    assert own["owner"] == "test test_through.py::test_own_connection_beside_the_fixtures"
    assert own["callsite"] == site(path, "own", "test_own_connection_beside_the_fixtures")
    # The Session inside the object of fixture 'repo' is never closed: the fixture's leak,
    # found when 'repo' is finalized, still naming the line that took the connection.
    wrapped = leaks["test_last"]
    assert wrapped["owner"] == "fixture 'repo' (module scope)"
    assert wrapped["kind"] == "scope_ended"
    assert wrapped["event"]["transaction_status"] == "INTRANS"
    assert wrapped["callsite"] == site(path, "wrapped", "test_through_an_object_of_the_fixture")


FIXTURE_AND_MARKER = """
import psycopg
import pytest

from conftest import DSN, KEPT

{module_marker}


@pytest.fixture(scope="module")
def shared():
    yield psycopg.connect(DSN, autocommit=True)  # leak: shared


def test_uses(shared):
    shared.execute("SELECT 1")


@pytest.mark.pgleakguard(allow="this test keeps one")
def test_last(shared):
    KEPT.append(psycopg.connect(DSN))  # leak: own
"""


def test_the_marker_of_the_test_that_finalizes_a_fixture_does_not_allow_its_leak(
    inner: Inner,
) -> None:
    path = inner.write("test_marked", FIXTURE_AND_MARKER.replace("{module_marker}", ""))
    result = inner.run()
    result.assert_outcomes(passed=2, errors=1)
    leaks = {str(leak["owner"]): leak for leak in inner.leaks()}
    assert leaks["test test_marked.py::test_last"]["allowed"] == "this test keeps one"
    assert leaks["fixture 'shared' (module scope)"]["allowed"] is None
    line = marked_line(str(path), "shared")
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_last*",
            # Only what is not allowed fails the test, and it says whose leak it is.
            f"pgleakguard: fixture 'shared' (module scope) leaked at test_marked.py:{line} "
            "in shared (scope_ended)",
            "1 fixture(s) leaked 1 PostgreSQL connection(s):",
            f"  test_marked.py::test_last [fixture 'shared' (module scope)]: scope_ended at "
            f"test_marked.py:{line} in shared",
            "1 leak(s) allowed by @pytest.mark.pgleakguard:",
            "  test_marked.py::test_last: scope_ended at test_marked.py:"
            f"{marked_line(str(path), 'own')} in test_last (this test keeps one)",
        ]
    )


def test_a_module_marker_allows_the_leaks_of_its_module_scoped_fixtures(inner: Inner) -> None:
    marker = 'pytestmark = pytest.mark.pgleakguard(allow="legacy module")'
    inner.write("test_marked", FIXTURE_AND_MARKER.replace("{module_marker}", marker))
    result = inner.run()
    result.assert_outcomes(passed=2)
    allowed = {str(leak["owner"]): leak["allowed"] for leak in inner.leaks()}
    assert allowed == {
        "test test_marked.py::test_last": "this test keeps one",  # the closest marker
        "fixture 'shared' (module scope)": "legacy module",
    }


BEFORE = """
import os

import psycopg

from conftest import DSN, KEPT

if os.environ.get("INSTALL_FIRST"):
    import pgleakguard

    pgleakguard.install(service="suite")  # the suite's own installation, used by the plugin

KEPT.append(psycopg.connect(DSN))  # leak: import


def test_tracked_before():
    import pgleakguard

    # The import-time connection is tracked (so it could be blamed): it is not.
    [before] = pgleakguard.open_checkouts()
    assert before.callsite.function == "<module>"


def test_first(dsn):
    KEPT.append(psycopg.connect(dsn))  # leak: first


def test_second(dsn):
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT 1")
"""


@pytest.mark.parametrize(
    "how", ["suite installs first", "plugin installs at the import, new process"]
)
def test_connections_that_existed_before_a_test_are_never_blamed_on_it(
    inner: Inner, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how == "suite installs first":
        monkeypatch.setenv("INSTALL_FIRST", "1")
    path = inner.write("test_before", BEFORE)
    result = inner.run(subprocess=how.endswith("new process"))
    result.assert_outcomes(passed=3, errors=1)
    [leak] = inner.leaks()
    assert leak["test"] == "test_before.py::test_first"
    assert leak["kind"] == "scope_ended"  # still held, in KEPT
    assert leak["callsite"] == site(path, "first", "test_first")
    # The suite's installation is the one used; else the plugin's names the service pytest.
    assert leak["event"]["service"] == ("suite" if how.startswith("suite") else "pytest")


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


LAZY_IN_BODY = """
from conftest import KEPT


def test_first(dsn):
    import psycopg  # the session's first import of a hooked library

    KEPT.append(psycopg.connect(dsn))  # leak: lazy


def test_second(dsn):
    import psycopg

    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT 1")
"""

LAZY_IN_FIXTURE = """
import pytest

from conftest import DSN, KEPT


@pytest.fixture(scope="module")
def engine():
    import sqlalchemy as sa  # the session's first import of a hooked library

    engine = sa.create_engine(DSN.replace("postgresql://", "postgresql+psycopg://", 1))
    KEPT.append(engine.connect())  # leak: lazy
    yield engine


def test_first(engine):
    pass


def test_second(dsn):
    pass
"""


@pytest.mark.parametrize(
    ("source", "owner", "test", "function"),
    [
        (LAZY_IN_BODY, "test test_lazy.py::test_first", "test_first", "test_first"),
        (LAZY_IN_FIXTURE, "fixture 'engine' (module scope)", "test_second", "engine"),
    ],
    ids=["test body", "module fixture"],
)
def test_a_library_first_imported_inside_a_test_is_hooked_from_that_line(
    inner: Inner, source: str, owner: str, test: str, function: str
) -> None:
    path = inner.write("test_lazy", source)
    result = inner.run(subprocess=True)  # a new process: nothing imported yet
    result.assert_outcomes(passed=2, errors=1)
    [leak] = inner.leaks()
    assert leak["owner"] == owner
    assert leak["test"] == f"test_lazy.py::{test}"
    assert leak["kind"] == "scope_ended"
    assert leak["callsite"] == site(path, "lazy", function)


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


def test_a_bad_mode_given_with_dash_o_is_a_usage_error_naming_where(inner: Inner) -> None:
    inner.write("test_leaks", LEAKS)
    result = inner.run("-o", "pgleakguard_mode=strict")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            f"ERROR: pgleakguard: pgleakguard_mode = 'strict' (from {inner.pytester.path}"
            f"{os.sep}tox.ini or -o): expected fail, warn or off"
        ]
    )


@pytest.mark.parametrize(("given", "errors"), [("FAIL", 7), ("Warn", 0), ("OFF", 0)])
def test_the_mode_option_ignores_case_like_the_ini_value(
    inner: Inner, given: str, errors: int
) -> None:
    inner.write("test_leaks", LEAKS)
    inner.run(f"--pgleakguard={given}").assert_outcomes(passed=7, errors=errors)


def test_integrations_chosen_in_the_environment_are_installed_and_shown(
    inner: Inner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGLEAKGUARD_INTEGRATIONS", "psycopg")
    path = inner.write("test_leaks", LEAKS)
    result = inner.run()
    result.stdout.fnmatch_lines(
        ["pgleakguard: mode fail, gc on, integrations psycopg ($PGLEAKGUARD_INTEGRATIONS)"]
    )
    # Only the raw psycopg connections are hooked: the user chose.
    result.assert_outcomes(passed=7, errors=2)
    leaks = {leak["test"].split("::")[1]: leak for leak in inner.leaks()}
    assert sorted(leaks) == ["test_async_raw", "test_raw"]
    assert leaks["test_raw"]["callsite"] == site(path, "raw", "test_raw")


def test_a_bad_pgleakguard_variable_is_one_clear_usage_error(
    inner: Inner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGLEAKGUARD_INTEGRATIONS", "psycopg,mysql")
    inner.write("test_leaks", LEAKS)
    result = inner.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: pgleakguard: invalid integrations='psycopg,mysql' "
            "(from $PGLEAKGUARD_INTEGRATIONS): expected*psycopg, psycopg_pool, sqlalchemy, django"
        ]
    )


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


SPREAD = """
import psycopg
import pytest

from conftest import KEPT


@pytest.mark.parametrize("n", range(3))
def test_clean(dsn, n):
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT 1")


def test_leaky(dsn):
    KEPT.append(psycopg.connect(dsn))  # leak: spread
"""


def test_xdist_workers_check_independently_and_the_summary_adds_up(inner: Inner) -> None:
    paths = [inner.write(name, SPREAD) for name in ("test_one", "test_two")]
    # loadfile: each file runs whole on one worker; two files, two workers, one file each.
    result = inner.run("-n", "2", "--dist=loadfile", subprocess=True)
    result.assert_outcomes(passed=8, errors=2)
    leaks = sorted(inner.leaks(), key=lambda leak: str(leak["test"]))
    assert [leak["test"] for leak in leaks] == [
        "test_one.py::test_leaky",
        "test_two.py::test_leaky",
    ]
    for leak, path in zip(leaks, paths):
        assert leak["callsite"] == site(path, "spread", "test_leaky")
    # Found by two different processes: each worker tags its connections with its pid.
    pids = {leak["event"]["application_name"].rsplit("/pid:", 1)[1] for leak in leaks}
    assert len(pids) == 2
    result.stdout.fnmatch_lines(
        ["*= pgleakguard =*", "2 test(s) leaked 2 PostgreSQL connection(s):"]
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


# -- the JSON report, reported once, other databases, the README's demo ---------------------


def test_the_report_goes_into_a_folder_that_does_not_exist_yet(inner: Inner) -> None:
    inner.write("test_leaks", LEAKS)
    result = inner.inline("-p", "no:cacheprovider", "--pgleakguard-report=reports/ci/leaks.json")
    result.assert_outcomes(passed=7, errors=7)
    document = json.loads((inner.pytester.path / "reports/ci/leaks.json").read_text())
    assert (document["tests_leaking"], document["fixtures_leaking"]) == (7, 0)
    assert len(document["leaks"]) == 7


@pytest.mark.parametrize(("mode", "status"), [("fail", 1), ("warn", 0)])
def test_a_report_that_cannot_be_written_is_one_line_after_the_normal_summary(
    inner: Inner, mode: str, status: int
) -> None:
    inner.write("test_leaks", LEAKS)
    folder = inner.pytester.mkdir("taken")  # a folder where the file should be
    result = inner.inline(
        "-p", "no:cacheprovider", f"--pgleakguard={mode}", f"--pgleakguard-report={folder}"
    )
    result.stdout.fnmatch_lines(
        [
            "*= pgleakguard =*",
            "7 test(s) leaked 7 PostgreSQL connection(s):",
            f"pgleakguard: cannot write --pgleakguard-report={folder}: Is a directory",
            "*7 passed*",
        ]
    )
    assert result.ret == status  # the tests' outcome, as without the report
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


ONCE = """
import gc
import json
import os
import time

import psycopg

import pgleakguard
from conftest import KEPT

if os.environ.get("ONCE_ON_LEAK"):

    def on_leak(event):
        with open(os.environ["ONCE_ON_LEAK"], "a") as fh:
            fh.write(json.dumps(event.as_dict(), default=str) + "\\n")

    pgleakguard.install(leak_threshold=1, on_leak=on_leak)  # the suite's own callback


def test_keeps(dsn):
    KEPT.append(psycopg.connect(dsn))  # leak: kept


def test_held_past_the_threshold_then_collected():
    # The watchdog scans past the kept connection's leak_threshold, then it is collected:
    # neither would be a new leak.
    deadline = time.monotonic() + 30
    while not any(c.age > 1.0 for c in pgleakguard.open_checkouts()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    scans = pgleakguard.stats()["watchdog_scans"]
    while pgleakguard.stats()["watchdog_scans"] < scans + 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    KEPT.clear()
    gc.collect()
    pgleakguard.check()  # delivers what the collection found
"""


@pytest.mark.parametrize(
    "sink", ["JSON lines of the plugin's installation", "on_leak of the suite's install()"]
)
def test_a_leak_the_plugin_reported_is_not_reported_again_by_pgleakguard(
    inner: Inner, monkeypatch: pytest.MonkeyPatch, sink: str
) -> None:
    events = inner.pytester.path / "events.jsonl"
    if sink.startswith("JSON"):
        monkeypatch.setenv("PGLEAKGUARD_JSONL_PATH", str(events))
        monkeypatch.setenv("PGLEAKGUARD_LEAK_THRESHOLD", "1")
    else:
        monkeypatch.setenv("ONCE_ON_LEAK", str(events))
    path = inner.write("test_once", ONCE)
    result = inner.run(subprocess=True)
    result.assert_outcomes(passed=2, errors=1)
    [leak] = inner.leaks()
    assert leak["callsite"] == site(path, "kept", "test_keeps")
    # The sink had that leak once: no held_too_long from the watchdog, no garbage_collected
    # at the collection.
    delivered = [json.loads(line) for line in events.read_text().splitlines()]
    checkout = leak["event"]["checkout_id"]
    kinds = [e["kind"] for e in delivered if e["checkout_id"] == checkout and "kind" in e]
    assert kinds == ["scope_ended"]
    # The report is the teardown error, once: not logged again before the summary (on a CI
    # machine pytest repeats the whole message in its short summary, which comes after), and
    # nothing is logged after pytest's last line (the log's last resort is stderr).
    out = result.stdout.str() + result.stderr.str()
    before_summary = out.split("short test summary info")[0]
    assert before_summary.count("pgleakguard: connection leak [") == 1
    assert "connection leak" not in out.split("1 error in")[1]


SQLITE = """
import gc

import sqlalchemy as sa

from conftest import KEPT


def test_connect_and_query():
    engine = sa.create_engine("sqlite://")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1


def test_a_dropped_connection():
    conn = sa.create_engine("sqlite://").connect()
    conn.execute(sa.text("SELECT 1"))
    del conn
    gc.collect()


def test_a_kept_connection():
    KEPT.append(sa.create_engine("sqlite://").connect())
"""


def test_a_suite_on_another_database_passes_and_reports_nothing(inner: Inner) -> None:
    inner.write("test_sqlite", SQLITE)
    result = inner.run()
    result.assert_outcomes(passed=3)
    assert inner.leaks() == []
    assert "= pgleakguard =" not in result.stdout.str()


def test_the_readme_demo_command_fails_the_example_test_at_the_helpers_line() -> None:
    root = Path(__file__).parent.parent
    orders = root / "examples" / "pytest_suite" / "orders.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGLEAKGUARD_", "PYTEST_"))}
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "pgleakguard"),
            "demo",
            "examples/pytest_suite/run_tests.py",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr  # a test errored
    lines = orders.read_text().splitlines()
    line = next(n for n, text in enumerate(lines, 1) if "conn = engine.connect()" in text)
    assert "pgleakguard demo: throwaway PostgreSQL started" in out
    assert f"pgleakguard: leaked at orders.py:{line} in export_report (garbage_collected)" in out
    assert f"checked out at {orders}:{line} in export_report" in out
    assert "service=pytest integration=sqlalchemy" in out
    assert f"  test_orders.py::test_export_report: garbage_collected at orders.py:{line}" in out
    assert "2 passed, 1 error" in out
    assert "Traceback" not in out + proc.stderr


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
