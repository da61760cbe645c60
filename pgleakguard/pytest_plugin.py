"""The pytest plugin: a test that leaks a PostgreSQL connection fails, naming the line.

Loaded through the ``pytest11`` entry point in every pytest run (``-p no:pgleakguard``
leaves it out). It costs nothing until the test session imports a library pgleakguard
hooks (psycopg, psycopg_pool, SQLAlchemy, Django's ORM); then it installs pgleakguard,
unless the suite already did, and checks each test:

- a connection taken during the test or its function-scoped fixtures and still held once
  they are finalized (after a ``gc.collect()``, so garbage is told from a held connection)
  is the test's leak: in ``fail`` mode the test errors in teardown with the report;
- a connection taken by a class-, module-, package- or session-scoped fixture belongs to
  that fixture and is checked when the fixture is finalized;
- connections that existed before the test are never blamed on it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .events import LeakEvent
    from .testing import ServerCheck, ServerLeak, Window
    from .tracker import Checkout, Tracker

MODES = ("fail", "warn", "off")

#: integration -> the module whose presence in sys.modules says the session uses it.
LIBRARIES = {
    "psycopg": "psycopg",
    "psycopg_pool": "psycopg_pool",
    "sqlalchemy": "sqlalchemy",
    "django": "django.db",
}

#: Set on a teardown report: the leaks found there (JSON-ready dicts, so pytest-xdist
#: carries them from the worker to the controller with the report).
REPORT_ATTR = "pgleakguard_leaks"

_records_key = pytest.StashKey[list[dict[str, Any]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pgleakguard", "PostgreSQL connection leaks (pgleakguard)")
    group.addoption(
        "--pgleakguard",
        dest="pgleakguard_mode",
        choices=MODES,
        default=None,
        help="fail: a test that leaks a connection errors in teardown (default); "
        "warn: leaks are only listed in the summary; off: no checks. "
        "ini: pgleakguard_mode",
    )
    group.addoption(
        "--pgleakguard-no-gc",
        action="store_true",
        dest="pgleakguard_no_gc",
        help="skip the gc.collect() that tells a garbage connection from a held one",
    )
    group.addoption(
        "--pgleakguard-report",
        metavar="FILE",
        dest="pgleakguard_report",
        help="write the leaks found as JSON to FILE (for CI)",
    )
    group.addoption(
        "--pgleakguard-server-check",
        action="store_true",
        dest="pgleakguard_server_check",
        help="after each test, also read pg_stat_activity (separate connection) for sessions "
        "of this process left idle in transaction or held by code no hook sees",
    )
    group.addoption(
        "--pgleakguard-dsn",
        metavar="DSN",
        dest="pgleakguard_dsn",
        help="server to read for --pgleakguard-server-check (default: $PGLEAKGUARD_DSN)",
    )
    parser.addini("pgleakguard_mode", "fail, warn or off (default: fail)", default="fail")
    parser.addini(
        "pgleakguard_ignore",
        "call-site patterns whose leaks are not counted (fnmatch, against file or "
        "file:line, absolute or relative to rootdir), one per line",
        type="linelist",
        default=[],
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pgleakguard(allow=True): this test may leak PostgreSQL connections; "
        "allow='reason' says why (the leaks are still listed in the summary).",
    )
    mode = config.getoption("pgleakguard_mode") or str(config.getini("pgleakguard_mode"))
    mode = mode.strip().lower() or "fail"
    if mode not in MODES:
        raise pytest.UsageError(
            f"pgleakguard: pgleakguard_mode = {mode!r} in {config.inipath}: "
            "expected fail, warn or off"
        )
    if mode != "off":
        config.pluginmanager.register(LeakGuard(config, mode), "pgleakguard-checks")


class LeakGuard:
    """The plugin's state for one test session (registered only when its mode is not off)."""

    def __init__(self, config: pytest.Config, mode: str) -> None:
        self.config = config
        self.mode = mode
        self.collect = not config.getoption("pgleakguard_no_gc")
        self.ignore: list[str] = [str(p) for p in config.getini("pgleakguard_ignore")]
        self.report_path: str | None = config.getoption("pgleakguard_report")
        self.rootdir = str(config.rootpath)
        # Libraries not hooked yet (None: the user chose the integrations, we add none).
        self.pending: dict[str, str] | None = (
            None if os.environ.get("PGLEAKGUARD_INTEGRATIONS") else dict(LIBRARIES)
        )
        self.installed: Any = None  # the installation this plugin made, if any
        self.window: Window | None = None  # the running test's
        #: Wider-scoped fixtures' checkouts (name, scope, checkouts) until finalized.
        self.owned: dict[Any, tuple[str, str, list[Checkout]]] = {}
        self.finalized: list[tuple[str, str, list[Checkout]]] = []
        #: Function-scoped fixtures of the running test: checkout id -> fixture name.
        self.taken_in: dict[int, str] = {}
        #: Every leak seen in this session (from the reports, so xdist workers' too).
        self.results: list[dict[str, Any]] = []
        self.server: ServerCheck | None = None
        self._saved_appname: str | None = None
        if config.getoption("pgleakguard_server_check") and not _is_xdist_controller(config):
            self._start_server_check()

    # -- pgleakguard itself -----------------------------------------------------------------

    def _tracker(self) -> Tracker | None:
        """The tracker to check with: installs pgleakguard, or hooks more libraries, once
        the session has imported them."""
        pending = self.pending
        imported = [name for name, module in (pending or {}).items() if module in sys.modules]
        if imported:
            from . import _runtime

            for name in imported:
                del pending[name]  # type: ignore[union-attr]
            state = _runtime.current()
            if state is None:
                _runtime.install(integrations=imported)
                self.installed = _runtime.current()
            elif state.config.integrations != ("auto",):
                _runtime.enable_integrations(tuple(imported))
        runtime = sys.modules.get("pgleakguard._runtime")  # not imported: not installed
        state = runtime.current() if runtime is not None else None
        return state.tracker if state is not None else None

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.installed is not None:
            from . import _runtime

            if _runtime.current() is self.installed:
                _runtime.uninstall()
        if self.server is not None:
            self.server.close()
            if self._saved_appname is None:
                os.environ.pop("PGAPPNAME", None)
            else:
                os.environ["PGAPPNAME"] = self._saved_appname

    def pytest_report_header(self, config: pytest.Config) -> str:
        parts = [f"mode {self.mode}", "gc on" if self.collect else "gc off"]
        if config.getoption("pgleakguard_server_check"):
            parts.append("server check on")
        return "pgleakguard: " + ", ".join(parts)

    # -- windows: which test or fixture took each checkout ----------------------------------

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Any:
        self.taken_in = {}
        self.window = None
        try:
            if self._tracker() is not None:
                from .testing import Window

                self.window = Window(f"test {item.nodeid}")
            if self.server is not None:
                self.server.start()
        except Exception as exc:
            _internal_error(exc)
        result = yield
        _allowed(item)  # a malformed marker fails the test here, leak or not
        return result

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: Any, request: Any) -> Any:
        window = self.window
        if window is None or window.tracker is None:
            return (yield)
        tracker = window.tracker
        before = tracker.mark()
        try:
            return (yield)
        finally:
            after = tracker.mark()
            if after != before + 1:  # ids were taken in between: checkouts began
                self._fixture_set_up(fixturedef, window, before, after)

    def _fixture_set_up(self, fixturedef: Any, window: Window, before: int, after: int) -> None:
        from ._safety import guard

        with guard():
            recs = [r for r in window.tracker.registry.snapshot() if before < r.id < after]
            if not recs:
                return
            scope = str(getattr(fixturedef, "scope", "function"))
            if scope == "function":
                self.taken_in.update((r.id, fixturedef.argname) for r in recs)
                return
            self.owned[fixturedef] = (fixturedef.argname, scope, recs)
            window.excluded.update(r.id for r in recs)

    def pytest_fixture_post_finalizer(self, fixturedef: Any, request: Any) -> None:
        owned = self.owned.pop(fixturedef, None)
        if owned is not None:
            self.finalized.append(owned)

    # -- the check --------------------------------------------------------------------------

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: pytest.Item | None) -> Any:
        try:
            result = yield
        except BaseException:
            self._check(item, fail=False)  # the teardown's own error is the one shown
            raise
        self._check(item, fail=self.mode == "fail")
        return result

    def _check(self, item: pytest.Item, fail: bool) -> None:
        if self.window is None and not self.finalized:
            return  # nothing tracked: pgleakguard is not installed
        from ._safety import guard

        records: list[dict[str, Any]] = []
        with guard():
            records = self._find(item)
        if not records:
            return
        allowed = _allowed(item)
        for record in records:
            record["allowed"] = allowed
        item.stash[_records_key] = records
        if fail and allowed is None:
            pytest.fail(_failure_text(records, self.rootdir), pytrace=False)

    def _find(self, item: pytest.Item) -> list[dict[str, Any]]:
        """The leaks of the test that just ended, and of the fixtures finalized with it."""
        window, self.window = self.window, None
        finalized, self.finalized = self.finalized, []
        if window is None or window.tracker is None:
            return []
        tracker = window.tracker
        # (owner, fixture name, checkouts): the test's own, then the fixtures finalized now.
        scopes: list[tuple[str, str | None, list[Checkout]]] = [
            (f"test {item.nodeid}", None, window.taken())
        ]
        scopes += [
            (f"fixture {name!r} ({scope} scope)", name, recs) for name, scope, recs in finalized
        ]
        records = []
        if any(recs for *_, recs in scopes):
            records = self._classify(item, tracker, scopes)
        if self.server is not None:
            held = {r["backend_pid"] for r in records}
            for leak in self.server.check(tracker, exclude=held):
                records.append(_server_record(item.nodeid, leak))
        return records

    def _classify(
        self, item: pytest.Item, tracker: Tracker, scopes: list[tuple[str, str | None, Any]]
    ) -> list[dict[str, Any]]:
        from .testing import classify, collect_garbage

        if self.collect:
            collect_garbage(r for *_, recs in scopes for r in recs)
        records = []
        for owner, fixture, recs in scopes:
            for event in classify(tracker, recs, owner, collect=False):
                if not self._ignored(event):
                    name = fixture or self.taken_in.get(event.checkout_id)
                    records.append(_record(item.nodeid, owner, name, event))
        return records

    def _ignored(self, event: LeakEvent) -> bool:
        if not self.ignore:
            return False
        site = event.callsite
        names = [site.file]
        if site.file.startswith(self.rootdir + os.sep):
            names.append(os.path.relpath(site.file, self.rootdir))
        candidates = [n for name in names for n in (name, f"{name}:{site.line}")]
        return any(fnmatch.fnmatch(c, p) for p in self.ignore for c in candidates)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        report = yield
        if call.when == "teardown":
            records = item.stash.get(_records_key, None)
            if records:
                setattr(report, REPORT_ATTR, records)
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        records = getattr(report, REPORT_ATTR, None)
        if records:
            self.results.extend(records)

    # -- the summary ------------------------------------------------------------------------

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.results:
            return
        tr = terminalreporter
        tr.section("pgleakguard")
        for line in summary_lines(self.results, self.rootdir):
            tr.line(line)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.report_path and not hasattr(self.config, "workerinput"):
            write_report(self.report_path, self.mode, self.results)

    # -- server-side confirmation -----------------------------------------------------------

    def _start_server_check(self) -> None:
        from .server import ServerError
        from .tagging import application_name
        from .testing import ServerCheck

        dsn = self.config.getoption("pgleakguard_dsn") or os.environ.get("PGLEAKGUARD_DSN")
        if not dsn:
            raise pytest.UsageError(
                "pgleakguard: --pgleakguard-server-check needs a server to read: "
                "--pgleakguard-dsn DSN or $PGLEAKGUARD_DSN"
            )
        try:
            self.server = ServerCheck(dsn)
        except ServerError as exc:
            raise pytest.UsageError(f"pgleakguard: --pgleakguard-server-check: {exc}") from None
        # Connections opened by code no hook sees carry this process's tag too (libpq reads
        # PGAPPNAME); a tag inherited from another process (xdist's controller) is replaced.
        self._saved_appname = os.environ.get("PGAPPNAME")
        os.environ["PGAPPNAME"] = application_name(
            self._saved_appname, os.environ.get("PGLEAKGUARD_SERVICE")
        )


def _internal_error(exc: Exception) -> None:
    from ._safety import record_internal_error

    record_internal_error(exc)


def _is_xdist_controller(config: pytest.Config) -> bool:
    # The controller runs no test: only its workers check.
    return not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", None))


def _allowed(item: pytest.Item) -> str | None:
    """The marker's reason to allow this test's leaks, or None."""
    marker = item.get_closest_marker("pgleakguard")
    if marker is None:
        return None
    unknown = sorted(set(marker.kwargs) - {"allow"})
    if marker.args or unknown:
        given = ", ".join([*map(repr, marker.args), *(f"{k}=..." for k in unknown)])
        pytest.fail(
            f"@pytest.mark.pgleakguard takes allow=True or allow='reason', not {given}",
            pytrace=False,
        )
    allow = marker.kwargs.get("allow", False)
    if allow is True:
        return "allowed by @pytest.mark.pgleakguard"
    if isinstance(allow, str) and allow.strip():
        return allow.strip()
    return None


def _record(test: str, owner: str, fixture: str | None, event: LeakEvent) -> dict[str, Any]:
    """One leak as a JSON-ready dict (what reports carry, the summary and the JSON show)."""
    site = event.callsite
    record = {
        "test": test,
        "owner": owner,
        "fixture": fixture,
        "source": "pgleakguard",
        "kind": event.kind,
        "callsite": str(site),
        "file": site.file,
        "line": site.line,
        "function": site.function,
        "backend_pid": event.backend_pid,
        "allowed": None,  # set by the caller, from the test's marker
        "report": event.render(),
        "event": event.as_dict(),
    }
    return json.loads(json.dumps(record, default=str))  # type: ignore[no-any-return]


def _server_record(test: str, leak: ServerLeak) -> dict[str, Any]:
    return {
        "test": test,
        "owner": f"test {test}",
        "fixture": None,
        "source": "server",
        "kind": leak.kind,
        "callsite": leak.callsite,
        "file": None,
        "line": None,
        "function": None,
        "backend_pid": leak.backend_pid,
        "allowed": None,
        "report": leak.render(),
        "event": leak.as_dict(),
    }


def _failure_text(records: list[dict[str, Any]], rootdir: str) -> str:
    # The first line is what pytest's short summary shows: make it say where.
    head = "pgleakguard: leaked at " + "; ".join(
        f"{_short(r, rootdir)} ({r['kind']})" for r in records
    )
    return "\n\n".join([head, *(str(r["report"]) for r in records)])


def summary_lines(results: list[dict[str, Any]], rootdir: str) -> list[str]:
    """The terminal summary: counts, then one line per leak (test id, kind, call-site)."""
    counted = [r for r in results if r["allowed"] is None]
    allowed = [r for r in results if r["allowed"] is not None]
    lines = []
    if counted:
        tests = len({r["test"] for r in counted})
        lines.append(f"{tests} test(s) leaked {len(counted)} PostgreSQL connection(s):")
        lines.extend(_line(r, rootdir) for r in counted)
    if allowed:
        lines.append(f"{len(allowed)} leak(s) allowed by @pytest.mark.pgleakguard:")
        lines.extend(f"{_line(r, rootdir)} ({r['allowed']})" for r in allowed)
    return lines


def _short(record: dict[str, Any], rootdir: str) -> str:
    """The record's call-site, relative to rootdir (or its backend pid)."""
    where = str(record["callsite"] or f"backend_pid={record['backend_pid']}")
    return where[len(rootdir) + 1 :] if where.startswith(rootdir + os.sep) else where


def _line(record: dict[str, Any], rootdir: str) -> str:
    where = _short(record, rootdir)
    owner = str(record["owner"])
    by = f" [{owner}]" if owner.startswith("fixture") else ""
    via = " (server)" if record["source"] == "server" else ""
    return f"  {record['test']}{by}: {record['kind']}{via} at {where}"


def write_report(path: str, mode: str, results: list[dict[str, Any]]) -> None:
    """The ``--pgleakguard-report`` file: ``{"version": 1, "mode", "tests", "leaks"}``."""
    counted = [r for r in results if r["allowed"] is None]
    document = {
        "version": 1,
        "mode": mode,
        "tests_leaking": len({r["test"] for r in counted}),
        "leaks": results,
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(document, fh, indent=2, sort_keys=True)
        fh.write("\n")
