"""install() / uninstall(): idempotent, reversible, and clear about missing libraries."""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
from typing import Any, Callable

import psycopg
import psycopg_pool
import pytest

import pgleakguard
from pgleakguard import _runtime

from conftest import EventLog, settle

PATCHED = [
    (psycopg, "connect"),
    (psycopg.Connection, "connect"),
    (psycopg.Connection, "wait"),
    (psycopg.Connection, "close"),
    (psycopg.AsyncConnection, "connect"),
    (psycopg.AsyncConnection, "wait"),
    (psycopg.AsyncConnection, "close"),
    (psycopg_pool.ConnectionPool, "getconn"),
    (psycopg_pool.ConnectionPool, "putconn"),
    (psycopg_pool.AsyncConnectionPool, "getconn"),
    (psycopg_pool.AsyncConnectionPool, "putconn"),
]


def _originals() -> list[Any]:
    return [vars(owner).get(name) for owner, name in PATCHED]


def test_uninstall_restores_every_original_function() -> None:
    before = _originals()
    pgleakguard.install()
    during = _originals()
    assert all(a is not b for a, b in zip(before, during))
    pgleakguard.uninstall()
    assert all(a is b for a, b in zip(before, _originals()))
    pgleakguard.uninstall()  # a second uninstall is harmless


def test_install_twice_does_not_double_count(pg_dsn: str, install: Callable[..., EventLog]) -> None:
    log = install(leak_threshold=0.2)
    pgleakguard.install(
        leak_threshold=0.2, idle_in_transaction_threshold=0.3, service="tests", on_leak=log.append
    )
    with psycopg_pool.ConnectionPool(pg_dsn, min_size=1, max_size=2) as pool:
        conn = pool.getconn()
        assert len(pgleakguard.open_checkouts()) == 1
        log.wait_for("held_too_long")
        settle()
        assert len(log.leaks()) == 1
        pool.putconn(conn)
    assert pgleakguard.open_checkouts() == []


def test_reinstall_with_other_options_replaces_the_first(pg_dsn: str) -> None:
    pgleakguard.install(service="first")
    pgleakguard.install(service="second")
    with psycopg.connect(pg_dsn) as conn:
        [info] = pgleakguard.open_checkouts()
        assert info.service == "second"
        assert conn.info.parameter_status("application_name").startswith("second/pid:")


def test_after_uninstall_nothing_is_tracked(pg_dsn: str) -> None:
    pgleakguard.install()
    pgleakguard.uninstall()
    with psycopg.connect(pg_dsn) as conn:
        assert pgleakguard.open_checkouts() == []
        assert "/pid:" not in (conn.info.parameter_status("application_name") or "")


def _without_sqlalchemy(monkeypatch: pytest.MonkeyPatch) -> None:
    # An import of sqlalchemy now fails as on a machine without it.
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    monkeypatch.delitem(sys.modules, "pgleakguard.integrations.sqlalchemy", raising=False)


def _without_django(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "django", None)
    monkeypatch.delitem(sys.modules, "pgleakguard.integrations.django", raising=False)


def test_missing_library_asked_for_by_name_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without_sqlalchemy(monkeypatch)
    before = _originals()
    with pytest.raises(pgleakguard.DidNotEnable, match="^SQLAlchemy is not installed$"):
        pgleakguard.install(integrations=["psycopg_pool", "sqlalchemy"])
    assert not pgleakguard.stats()["installed"]
    # psycopg and psycopg_pool were hooked before sqlalchemy failed: unhooked again
    assert all(a is b for a, b in zip(before, _originals()))


def test_missing_library_is_skipped_quietly_by_auto_detection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without_sqlalchemy(monkeypatch)
    _without_django(monkeypatch)
    pgleakguard.install()
    state = _runtime.current()
    assert state is not None
    assert [i.identifier for i in state.integrations] == ["psycopg", "psycopg_pool"]


def test_uninstall_restores_what_another_tools_unwrap_left_of_our_hook() -> None:
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

    before = _originals()
    pgleakguard.install()
    theirs = PsycopgInstrumentor()
    theirs.instrument(skip_dep_check=True)
    theirs.uninstrument()  # it puts back a bound method of our hook, not our classmethod
    assert not isinstance(vars(psycopg.Connection)["connect"], classmethod)
    pgleakguard.uninstall()
    assert all(a is b for a, b in zip(before, _originals()))


def test_named_integration_enables_only_that_one() -> None:
    before = _originals()
    pgleakguard.install(integrations=["psycopg"])
    after = _originals()
    pool_hooks = [i for i, (owner, _) in enumerate(PATCHED) if "Pool" in str(owner)]
    assert all(before[i] is after[i] for i in pool_hooks)
    assert before[0] is not after[0]


def test_django_asked_for_by_name_without_django_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without_django(monkeypatch)
    with pytest.raises(pgleakguard.DidNotEnable, match="^Django is not installed$"):
        pgleakguard.install(integrations=["django"])
    assert not pgleakguard.stats()["installed"]


def test_public_api_names_resolve_on_first_use() -> None:
    import pgleakguard as api

    assert set(api.__all__) == {*api._HOME, "__version__"}
    for name in api.__all__:
        assert getattr(api, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        api.nope  # noqa: B018
    # help(pgleakguard.Event) explains the Union rather than showing typing's own text
    assert (api.Event.__doc__ or "").startswith("What pgleakguard delivers to ``on_leak``")


def test_the_documented_submodules_work_after_a_plain_import_pgleakguard() -> None:
    # a fresh interpreter: in this one the suite has imported them already
    code = (
        "import sys, pgleakguard; "
        "print(sorted(m for m in ('pgleakguard.tagging', 'pgleakguard.testing') "
        "if m in sys.modules)); "
        "print(pgleakguard.tagging.parse('billing/pid:4123')); "
        "print(pgleakguard.testing.assert_no_leaks.__module__); "
        "print('tagging' in dir(pgleakguard), 'testing' in dir(pgleakguard)); "
        "from pgleakguard.testing import LeakError; print(LeakError.__name__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.splitlines() == [
        "[]",  # not imported until used
        "Tag(service='billing', pid=4123, file=None, line=None)",
        "pgleakguard.testing",
        "True True",
        "LeakError",
    ]


def test_uninstall_leaves_a_wrapper_installed_on_top_of_ours(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    before = _originals()
    pgleakguard.install()
    ours = psycopg.Connection.close
    closed: list[Any] = []

    @functools.wraps(ours)
    def theirs(self: Any) -> None:  # another instrumentation, wrapping after us
        closed.append(self)
        ours(self)

    psycopg.Connection.close = theirs  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.DEBUG, logger="pgleakguard"):
            pgleakguard.uninstall()
        assert psycopg.Connection.close is theirs  # not dropped
        others = [(o, n) for o, n in PATCHED if (o, n) != (psycopg.Connection, "close")]
        assert all(
            vars(o).get(n) is before[PATCHED.index((o, n))] for o, n in others
        )  # the rest restored
        assert "pgleakguard: Connection.close is wrapped by another instrumentation " in (
            caplog.text
        )
        conn = psycopg.connect(pg_dsn)
        conn.close()
        assert closed == [conn]
    finally:
        psycopg.Connection.close = before[PATCHED.index((psycopg.Connection, "close"))]
