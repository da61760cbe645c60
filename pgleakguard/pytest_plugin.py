"""The pytest plugin: a test that leaks a PostgreSQL connection fails, naming the line.

Loaded through the ``pytest11`` entry point in every pytest run (``--pgleakguard=off`` or
``-p no:pgleakguard`` switch it off). It costs nothing until the test session imports a
library pgleakguard hooks (psycopg, psycopg_pool, SQLAlchemy, Django's ORM), at collection or
in a test; then it installs pgleakguard, unless the suite already did, and checks each test:

- a connection taken during the test or its function-scoped fixtures and still held once
  they are finalized (after a ``gc.collect()``, so garbage is told from a held connection)
  is the test's leak: in ``fail`` mode the test errors in teardown with the report;
- a connection taken by a class-, module-, package- or session-scoped fixture, or held
  through such a fixture's value (a module-scoped ORM ``Session`` whose first query ran in
  a test), belongs to that fixture and is checked when the fixture is finalized;
- connections that existed before the test are never blamed on it;
- a leak the plugin has reported is not reported again by pgleakguard's sinks (when the
  connection is finally garbage collected, or by the watchdog later on).
"""

from __future__ import annotations

import fnmatch
import gc
import json
import os
import sys
import types
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable

import pytest

if TYPE_CHECKING:
    from ._runtime import Installed
    from .events import Event, LeakEvent
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

#: The service name in reports and application_name when the plugin installs pgleakguard
#: and $PGLEAKGUARD_SERVICE is not set (else ``python -m pytest`` would say "python").
SERVICE = "pytest"

#: Set on a teardown report: the leaks found there (JSON-ready dicts, so pytest-xdist
#: carries them from the worker to the controller with the report).
REPORT_ATTR = "pgleakguard_leaks"

#: How many objects the search for a wider fixture holding a connection looks at, per
#: fixture (a Session reaches its connection within a few hundred).
REACH_LIMIT = 10_000

_SCOPES = ("class", "module", "package", "session")  # narrowest first


def _mode_option(value: str) -> str:
    return value.strip().lower()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pgleakguard", "PostgreSQL connection leaks (pgleakguard)")
    group.addoption(
        "--pgleakguard",
        dest="pgleakguard_mode",
        type=_mode_option,
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
        help="write the leaks found as JSON to FILE (for CI; missing folders are created)",
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
        "allow='reason' says why (the leaks are still listed in the summary). On a class "
        "or a module (pytestmark), it also allows the leaks of fixtures of that scope.",
    )
    mode = config.getoption("pgleakguard_mode")
    if mode is None:
        mode = _mode_option(str(config.getini("pgleakguard_mode"))) or "fail"
        if mode not in MODES:
            where = f"{config.inipath} or -o" if config.inipath else "-o"
            raise pytest.UsageError(
                f"pgleakguard: pgleakguard_mode = {mode!r} (from {where}): "
                "expected fail, warn or off"
            )
    if mode != "off":
        config.pluginmanager.register(LeakGuard(config, mode), "pgleakguard-checks")


class _Fixture:
    """One set-up instance of a class-, module-, package- or session-scoped fixture (a plain
    class: a dataclass would cost every pytest run a few milliseconds at import)."""

    __slots__ = ("checkouts", "name", "node", "scope", "value")

    def __init__(self, name: str, scope: str, node: Any, value: Any) -> None:
        self.name = name
        self.scope = scope
        #: The collection node of its scope: a pgleakguard marker there allows its leaks.
        self.node = node
        #: Its value (None if its setup failed): a connection held through it is the fixture's.
        self.value = value
        self.checkouts: list[Checkout] = []

    @property
    def owner(self) -> str:
        return f"fixture {self.name!r} ({self.scope} scope)"


class LeakGuard:
    """The plugin's state for one test session (registered only when its mode is not off)."""

    def __init__(self, config: pytest.Config, mode: str) -> None:
        self.config = config
        self.mode = mode
        self.collect = not config.getoption("pgleakguard_no_gc")
        self.ignore: list[str] = [str(p) for p in config.getini("pgleakguard_ignore")]
        self.report_path: str | None = config.getoption("pgleakguard_report")
        self.report_error: str | None = None
        self.rootdir = str(config.rootpath)
        #: $PGLEAKGUARD_INTEGRATIONS, validated: the user chose; we install those, add none.
        self.chosen = _chosen_integrations()
        # Libraries the session has not imported yet: integration -> module.
        self.pending: dict[str, str] = dict(LIBRARIES)
        if self.chosen and self.chosen != ("auto",):
            self.pending = {n: m for n, m in LIBRARIES.items() if n in self.chosen}
        self.installed: Installed | None = None  # the installation this plugin made, if any
        self.item: pytest.Item | None = None  # the running test, setup to teardown
        self.window: Window | None = None  # the running test's
        self._scopes: dict[Any, str] = {}  # fixture definition -> its scope
        #: Wider-scoped fixtures set up and not finalized yet.
        self.wide: dict[Any, _Fixture] = {}
        #: Those finalized since the last check.
        self.finalized: list[_Fixture] = []
        #: Function-scoped fixtures of the running test: checkout id -> fixture name.
        self.taken_in: dict[int, str] = {}
        #: Leaks found in a test's teardown, until its teardown report carries them.
        self._found: dict[str, list[dict[str, Any]]] = {}
        #: Every leak seen in this session (from the reports, so xdist workers' too).
        self.results: list[dict[str, Any]] = []
        #: Checkout ids this plugin reported, for the installation it saw (``_Once``).
        self._reported: set[int] = set()
        self._gated: Installed | None = None
        self.server: ServerCheck | None = None
        self._saved_appname: str | None = None
        self._watch: _ImportWatch | None = None
        if any(module not in sys.modules for module in self.pending.values()):
            self._watch = _ImportWatch(set(self.pending.values()), self._imported)
            sys.meta_path.insert(0, self._watch)
        if config.getoption("pgleakguard_server_check") and not _is_xdist_controller(config):
            self._start_server_check()

    # -- pgleakguard itself -----------------------------------------------------------------

    def _tracker(self) -> Tracker | None:
        """The tracker to check with: installs pgleakguard, or hooks more libraries, once
        the session has imported them."""
        imported = [name for name, module in self.pending.items() if module in sys.modules]
        if imported:
            from . import _runtime

            for name in imported:
                del self.pending[name]
            self._install(_runtime, tuple(imported))
            if not self.pending:
                self._unwatch()
        runtime = sys.modules.get("pgleakguard._runtime")  # not imported: not installed
        state: Installed | None = runtime.current() if runtime is not None else None
        if state is None:
            return None
        self._gate(state)
        return state.tracker

    def _install(self, runtime: Any, imported: tuple[str, ...]) -> None:
        state = runtime.current()
        if state is None:
            options: dict[str, Any] = {}
            if not os.environ.get("PGLEAKGUARD_SERVICE"):
                options["service"] = SERVICE
            if self.chosen:
                self.pending.clear()  # the user's list, from the environment: all at once
            else:
                options["integrations"] = imported
            runtime.install(**options)
            self.installed = runtime.current()
        elif not self.chosen and state.config.integrations != ("auto",):
            runtime.enable_integrations(imported)

    def _imported(self) -> None:
        """A library we wait for was just imported (at collection, or in a test or fixture):
        install now, so that the connections it opens from the next line on are tracked."""
        if _installing():
            return  # an installation enabling its integrations imported it: it hooks it
        from ._safety import guard

        with guard():
            tracker = self._tracker()
            if tracker is not None and self.item is not None and self.window is None:
                from .testing import Window

                self.window = Window(f"test {self.item.nodeid}")

    def _unwatch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None and watch in sys.meta_path:
            sys.meta_path.remove(watch)

    def _gate(self, state: Installed) -> None:
        """Put :class:`_Once` in front of each of the installation's sinks (again for a sink
        added since: OpenTelemetry's is added once an SDK is configured)."""
        if state is not self._gated:
            self._gated, self._reported = state, set()
        for sinks in _sink_lists(state):
            for i, sink in enumerate(sinks):
                if not isinstance(sink, _Once):
                    sinks[i] = _Once(sink, self._reported)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self._unwatch()
        if self.installed is not None:
            from . import _runtime

            if _runtime.current() is self.installed:
                _runtime.uninstall()  # its last events still pass the gates
        gated, self._gated = self._gated, None
        if gated is not None:  # an installation the suite made lives on without our gates
            for sinks in _sink_lists(gated):
                sinks[:] = [s.sink if isinstance(s, _Once) else s for s in sinks]
        if self.server is not None:
            self.server.close()
            if self._saved_appname is None:
                os.environ.pop("PGAPPNAME", None)
            else:
                os.environ["PGAPPNAME"] = self._saved_appname

    def pytest_report_header(self, config: pytest.Config) -> str:
        parts = [f"mode {self.mode}", "gc on" if self.collect else "gc off"]
        if self.chosen:
            parts.append("integrations " + ",".join(self.chosen) + " ($PGLEAKGUARD_INTEGRATIONS)")
        if config.getoption("pgleakguard_server_check"):
            parts.append("server check on")
        return "pgleakguard: " + ", ".join(parts)

    # -- windows: which test or fixture took each checkout ----------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        # Before the test's fixtures are set up: its window is open while they are.
        self.taken_in = {}
        self.window = None
        self.item = item
        try:
            if self._tracker() is not None:
                from .testing import Window

                self.window = Window(f"test {item.nodeid}")
            if self.server is not None:
                self.server.start()
        except Exception as exc:
            _internal_error(exc)
        _allowed(item)  # a malformed marker fails the test here, leak or not

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: Any, request: Any) -> Any:
        window = self.window
        tracker: Any = window.tracker if window is not None else None
        before: int = tracker.mark() if tracker is not None else -1  # -1: no window yet
        value = None
        try:
            value = yield
            return value
        finally:
            # Quickly done with the common case (every test sets up several): a fixture known
            # to be function-scoped that took no connection (no id taken between two marks).
            now = self.window
            if not (
                self._scopes.get(fixturedef) == "function"
                and (now is None or (now is window and tracker.mark() == before + 1))
            ):
                try:
                    self._fixture_set_up(fixturedef, request, value, before)
                except Exception as exc:
                    _internal_error(exc)

    def _scope(self, fixturedef: Any) -> str:
        # FixtureDef.scope reads an enum member's value: slow enough to matter when every
        # test sets up ten fixtures. A fixture definition's scope never changes.
        scope = self._scopes.get(fixturedef)
        if scope is None:
            scope = self._scopes[fixturedef] = str(fixturedef.scope)
        return scope

    def _fixture_set_up(self, fixturedef: Any, request: Any, value: Any, before: int) -> None:
        scope = self._scope(fixturedef)
        fixture = None
        if scope != "function":
            fixture = self.wide[fixturedef] = _Fixture(
                fixturedef.argname, scope, request.node, value
            )
            # Told of its finalization by a finalizer of its own (a pytest_fixture_post_finalizer
            # hook would be called for every fixture of every test).
            request.addfinalizer(lambda: self._fixture_finalized(fixturedef))
        window = self.window
        if window is None:
            return
        if before < 0:  # the window began inside this fixture (its import of a library)
            before = window.start
        after = window.tracker.mark()
        if after == before + 1:
            return  # no ids were taken in between: no checkout began
        recs = [r for r in window.tracker.registry.snapshot() if before < r.id < after]
        if fixture is None:
            self.taken_in.update((r.id, fixturedef.argname) for r in recs)
        elif recs:
            fixture.checkouts += recs
            window.excluded.update(r.id for r in recs)

    def _fixture_finalized(self, fixturedef: Any) -> None:
        fixture = self.wide.pop(fixturedef, None)
        if fixture is not None:  # checked at the next check, and may still adopt checkouts
            self.finalized.append(fixture)

    # -- the check --------------------------------------------------------------------------

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: pytest.Item | None) -> Any:
        try:
            result = yield
        except BaseException:
            self._check(item, fail=False)  # the teardown's own error is the one shown
            raise
        finally:
            self.item = None
        self._check(item, fail=self.mode == "fail")
        return result

    def _check(self, item: pytest.Item, fail: bool) -> None:
        if self.window is None:
            self.finalized = []  # nothing tracked: pgleakguard is not installed
            return
        try:
            records = self._find(item)
        except Exception as exc:
            _internal_error(exc)
            return
        if not records:
            return
        self._found[item.nodeid] = records
        counted = [r for r in records if r["allowed"] is None]
        if fail and counted:
            pytest.fail(_failure_text(counted, self.rootdir), pytrace=False)

    def _find(self, item: pytest.Item) -> list[dict[str, Any]]:
        """The leaks of the test that just ended, and of the fixtures finalized with it."""
        window, self.window = self.window, None
        finalized, self.finalized = self.finalized, []
        if window is None or window.tracker is None:
            return []
        tracker = window.tracker
        taken = window.taken()
        records = []
        # A clean test took nothing still open; most finalized fixtures took nothing either
        # (pytest-django's class-scoped autouse fixture is finalized after every test).
        if taken or any(f.checkouts for f in finalized):
            records = self._classify(item, tracker, taken, finalized)
        if self.server is not None:
            held = {r["backend_pid"] for r in records}
            for leak in self.server.check(tracker, exclude=held):
                records.append(_server_record(item.nodeid, leak, _allowed(item)))
        return records

    def _classify(
        self, item: pytest.Item, tracker: Tracker, taken: list[Checkout], finalized: list[_Fixture]
    ) -> list[dict[str, Any]]:
        from .testing import classify, collect_garbage

        if self.collect:
            collect_garbage([*taken, *(r for f in finalized for r in f.checkouts)])
        taken = self._adopt(taken, [*self.wide.values(), *finalized])
        # (owner, fixture name, node whose marker may allow, checkouts)
        scopes: list[tuple[str, str | None, Any, list[Checkout]]] = [
            (f"test {item.nodeid}", None, item, taken)
        ]
        scopes += [(f.owner, f.name, f.node, f.checkouts) for f in finalized]
        records = []
        for owner, fixture, node, recs in scopes:
            if not recs:
                continue
            events = classify(tracker, recs, owner, collect=False)
            self._reported.update(e.checkout_id for e in events)
            allowed = _allowed(node) if node is not None else None
            for event in events:
                if not self._ignored(event):
                    name = fixture or self.taken_in.get(event.checkout_id)
                    records.append(_record(item.nodeid, owner, name, event, allowed))
        return records

    def _adopt(self, taken: list[Checkout], fixtures: list[_Fixture]) -> list[Checkout]:
        """Give the test's checkouts that a wider fixture's value still holds to that
        fixture (narrowest scope first); the rest stay the test's."""
        fixtures = [f for f in fixtures if f.value is not None]
        if not fixtures:
            return taken
        targets: dict[int, Checkout] = {}
        for rec in taken:
            ref = rec.conn_ref
            obj = ref() if ref is not None and not rec.closed and not rec.parked else None
            if obj is not None:
                targets[id(obj)] = rec
        if not targets:
            return taken
        adopted: set[int] = set()
        fixtures.sort(key=lambda f: _SCOPES.index(f.scope) if f.scope in _SCOPES else 99)
        for fixture in fixtures:
            for found in _reachable(fixture.value, targets, REACH_LIMIT):
                rec = targets.pop(found)
                fixture.checkouts.append(rec)
                adopted.add(rec.id)
            if not targets:
                break
        return [r for r in taken if r.id not in adopted]

    def _ignored(self, event: LeakEvent) -> bool:
        if not self.ignore:
            return False
        site = event.callsite
        names = [site.file]
        if site.file.startswith(self.rootdir + os.sep):
            names.append(os.path.relpath(site.file, self.rootdir))
        candidates = [n for name in names for n in (name, f"{name}:{site.line}")]
        return any(fnmatch.fnmatch(c, p) for p in self.ignore for c in candidates)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Before the other logreport hooks: under xdist, a worker's sends the report, with
        # this attribute, to the controller, whose LeakGuard reads it here.
        if report.when == "teardown" and report.nodeid in self._found:
            setattr(report, REPORT_ATTR, self._found.pop(report.nodeid))
        records = getattr(report, REPORT_ATTR, None)
        if records:
            self.results.extend(records)

    # -- the summary ------------------------------------------------------------------------

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.results and not self.report_error:
            return
        tr = terminalreporter
        tr.section("pgleakguard")
        for line in summary_lines(self.results, self.rootdir):
            tr.line(line)
        if self.report_error:
            tr.line(self.report_error, red=True)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.report_path and not hasattr(self.config, "workerinput"):
            try:
                write_report(self.report_path, self.mode, self.results)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                self.report_error = (
                    f"pgleakguard: cannot write --pgleakguard-report={self.report_path}: {reason}"
                )

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
            self._saved_appname, os.environ.get("PGLEAKGUARD_SERVICE") or SERVICE
        )


def _sink_lists(state: Installed) -> list[list[Callable[[Event], None]]]:
    """The installation's lists of sinks: its dispatcher's, and the on_leak callback's where
    that has a dispatcher of its own."""
    dispatchers = [state.dispatcher, getattr(state, "callbacks", None)]
    return [d.sinks for d in dispatchers if d is not None]


class _Once:
    """In front of one sink of the installation the plugin checks with: a leak of a
    checkout the plugin has reported is not delivered again (DESIGN: a leak is reported
    once), neither as ``garbage_collected`` when it is finally collected nor by the
    watchdog later in the session. Its ReturnedEvent still is."""

    __slots__ = ("reported", "sink")

    def __init__(self, sink: Callable[[Event], None], reported: set[int]) -> None:
        self.sink = sink
        self.reported = reported

    def __call__(self, event: Event) -> None:
        is_leak = hasattr(event, "kind")  # a LeakEvent (a ReturnedEvent has ``kinds``)
        if not (is_leak and event.checkout_id in self.reported):
            self.sink(event)


class _ImportWatch:
    """A ``sys.meta_path`` finder that finds nothing itself: when a module it waits for is
    imported, it lets the other finders find it and calls ``imported`` once the module has
    run, so a library first imported inside a test is hooked before its first connection."""

    def __init__(self, modules: set[str], imported: Callable[[], None]) -> None:
        self.modules = modules
        self.imported = imported

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in self.modules:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None  # the import system finds it again, unwatched
        spec.loader = _ThenCall(spec.loader, self.imported)
        return spec


class _ThenCall:
    """Loads with ``loader``, then calls ``then`` (the module, its spec and its
    ``__loader__`` keep the real loader)."""

    def __init__(self, loader: Any, then: Callable[[], None]) -> None:
        self.loader = loader
        self.then = then

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self.loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self.loader
        self.loader.exec_module(module)
        self.then()


#: Never searched for a connection: shared program structure, not data a fixture holds.
_NOT_HELD = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.CodeType,
    types.FrameType,
)


def _reachable(root: Any, targets: dict[int, Any], limit: int) -> list[int]:
    """The keys of ``targets`` (object ids) among the objects ``root`` references, directly
    or through other objects, looked for breadth first among at most ``limit`` objects."""
    found: list[int] = []
    if isinstance(root, _NOT_HELD):
        return found
    seen = {id(root)}
    frontier = [root]
    while frontier:
        following = []
        for obj in gc.get_referents(*frontier):
            key = id(obj)
            # Untracked objects (numbers, strings, containers of only those) hold nothing.
            if key in seen or not gc.is_tracked(obj) or isinstance(obj, _NOT_HELD):
                continue
            if len(seen) >= limit:
                return found
            seen.add(key)
            if key in targets:
                found.append(key)
                if len(found) == len(targets):
                    return found
            following.append(obj)
        frontier = following
    return found


def _installing() -> bool:
    """Whether pgleakguard is being installed (or integrations enabled) in this thread."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        if module == "pgleakguard._runtime" or module.startswith("pgleakguard.integrations"):
            return True
        frame = frame.f_back
    return False


def _chosen_integrations() -> tuple[str, ...] | None:
    """The integrations named in $PGLEAKGUARD_INTEGRATIONS, or None; a bad value of any
    ``PGLEAKGUARD_*`` option is a usage error now rather than a silent plugin later."""
    if not any(name.startswith("PGLEAKGUARD_") and value for name, value in os.environ.items()):
        return None
    from .config import Config

    try:
        config = Config.load()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    return config.integrations if os.environ.get("PGLEAKGUARD_INTEGRATIONS") else None


def _internal_error(exc: Exception) -> None:
    from ._safety import record_internal_error

    record_internal_error(exc)


def _is_xdist_controller(config: pytest.Config) -> bool:
    # The controller runs no test: only its workers check.
    return not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", None))


def _allowed(node: Any) -> str | None:
    """The reason a pgleakguard marker on ``node`` (or its parents) gives to allow leaks."""
    marker = node.get_closest_marker("pgleakguard")
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


def _record(
    test: str, owner: str, fixture: str | None, event: LeakEvent, allowed: str | None
) -> dict[str, Any]:
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
        "allowed": allowed,
        "report": event.render(),
        "event": event.as_dict(),
    }
    return json.loads(json.dumps(record, default=str))  # type: ignore[no-any-return]


def _server_record(test: str, leak: ServerLeak, allowed: str | None) -> dict[str, Any]:
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
        "allowed": allowed,
        "report": leak.render(),
        "event": leak.as_dict(),
    }


def _by_fixture(record: dict[str, Any]) -> bool:
    return str(record["owner"]).startswith("fixture ")


def _failure_text(records: list[dict[str, Any]], rootdir: str) -> str:
    # The first line is what pytest's short summary shows: make it say where, and whose.
    head = "pgleakguard: " + "; ".join(
        f"{r['owner'] + ' ' if _by_fixture(r) else ''}leaked at {_short(r, rootdir)} ({r['kind']})"
        for r in records
    )
    parts = [head]
    if any(_by_fixture(r) for r in records):
        parts.append(
            "A fixture's connection is checked when the fixture is finalized, here in this "
            "test's setup or teardown: the fixture leaked it, not this test."
        )
    return "\n\n".join([*parts, *(str(r["report"]) for r in records)])


def _owners(records: Iterable[dict[str, Any]]) -> tuple[int, int]:
    """How many tests and how many fixture instances own ``records``."""
    owners = {(r["owner"], r["test"]) for r in records}
    fixtures = sum(1 for owner, _ in owners if owner.startswith("fixture "))
    return len(owners) - fixtures, fixtures


def summary_lines(results: list[dict[str, Any]], rootdir: str) -> list[str]:
    """The terminal summary: counts, then one line per leak (test id, kind, call-site)."""
    counted = [r for r in results if r["allowed"] is None]
    allowed = [r for r in results if r["allowed"] is not None]
    lines = []
    if counted:
        tests, fixtures = _owners(counted)
        who = [f"{n} {what}(s)" for n, what in ((tests, "test"), (fixtures, "fixture")) if n]
        lines.append(f"{' and '.join(who)} leaked {len(counted)} PostgreSQL connection(s):")
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
    by = f" [{record['owner']}]" if _by_fixture(record) else ""
    via = " (server)" if record["source"] == "server" else ""
    return f"  {record['test']}{by}: {record['kind']}{via} at {where}"


def write_report(path: str, mode: str, results: list[dict[str, Any]]) -> None:
    """The ``--pgleakguard-report`` file: ``{"version": 1, "mode", "tests_leaking",
    "fixtures_leaking", "leaks"}`` (the counts leave allowed leaks out). Creates missing
    folders; raises OSError when the file cannot be written."""
    tests, fixtures = _owners(r for r in results if r["allowed"] is None)
    document = {
        "version": 1,
        "mode": mode,
        "tests_leaking": tests,
        "fixtures_leaking": fixtures,
        "leaks": results,
    }
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(document, fh, indent=2, sort_keys=True)
        fh.write("\n")
