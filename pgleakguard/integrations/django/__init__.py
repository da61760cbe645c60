"""Django: every DatabaseWrapper connection is a checkout owned by its thread; a request is
a scope whose end checks the connections it used; the native pool (Django >= 5.1) is
tracked through psycopg_pool; application_name is tagged in the connection parameters.

Enable it with ``"pgleakguard.integrations.django"`` in INSTALLED_APPS (options from
``settings.PGLEAKGUARD``), or with ``pgleakguard.install()``.

Between requests Django keeps a persistent connection (CONN_MAX_AGE > 0) for the next one,
and the main thread's connection (a management command, the shell, the test runner's
test-database connection) for the life of the process: those are *parked*: reported
only when the thread holding one ends and it is still open leak_threshold later (the
watchdog's rule), or, on the main thread, when the application leaves a transaction idle
on it (idle_in_transaction). A request's first use of a connection starts a new checkout,
named after the request's own code: when Django itself made that use before the view ran
(ATOMIC_REQUESTS opens the view's transaction), it is named after the next use the
application makes.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import threading
import weakref
from contextvars import ContextVar
from functools import wraps
from pathlib import Path
from typing import Any

from ... import tagging
from ..._safety import guard, logger, record_internal_error, safe_call
from ...callsite import AWAITING, Stack, capture, line_of
from ...drivers import application_name_of, backend_pid
from ...events import SCOPE_ENDED
from ...tracker import CHECKOUT_ATTR, Checkout
from .. import DidNotEnable, Integration

try:
    import django
    from asgiref.sync import SyncToAsync
    from django.core import signals
    from django.db import close_old_connections, connections
    from django.db.backends.base.base import BaseDatabaseWrapper
except ImportError as exc:  # pragma: no cover - exercised only without Django
    raise DidNotEnable("Django is not installed") from exc

if django.VERSION < (4, 2):
    raise DidNotEnable(f"Django {django.get_version()} is too old; 4.2 or newer is needed")

INTEGRATION = "django"
_STARTED_UID = "pgleakguard.request_started"
_FINISHED_UID = "pgleakguard.request_finished"
# Each installation keys its checkouts on the DatabaseWrapper objects under its own name:
# wrappers outlive an uninstall, and a later installation must not trust what they carry.
_installations = itertools.count(1)
_main_thread = threading.main_thread()
_current_thread = threading.current_thread
#: Django's ASGIHandler has served a request in this process (since install).
_asgi_served = False


class RequestScope:
    """One request: its description and the connections it used (with the depth of their
    atomic blocks when it first used them)."""

    __slots__ = ("name", "started", "used", "entry")

    def __init__(self, name: str) -> None:
        self.name = name
        #: request_started was seen (a WSGI thread's next request needs a new scope).
        self.started = False
        self.used: list[tuple[weakref.ref[Any], Checkout, int]] = []
        #: The call-site of the code that called Django for this request (the WSGI
        #: server's frame, or a test calling the test client); empty if unknown (ASGI).
        self.entry: Stack = ()

    def outside(self, stack: Stack) -> bool:
        """True if a checkout taken at ``stack`` was taken by no application code of the
        request: Django's own frames lead straight out to the server, or to nothing."""
        entry = self.entry
        if not stack:
            return True
        if not entry or stack[0] is not entry[0]:
            return False
        # The same line: a coroutine awaiting the request is seen at either instruction of
        # its await (SEND while the request runs in it, YIELD_VALUE while suspended).
        return stack[1] == entry[1] or line_of(stack[0], stack[1]) == line_of(entry[0], entry[1])


_request: ContextVar[RequestScope | None] = ContextVar("pgleakguard_django_request", default=None)


#: First parts of settings modules that name no project (cookiecutter-django's
#: ``config.settings.production``): the project is the folder that holds them.
_GENERIC_NAMES = frozenset({"config", "settings", "core", "project", "conf", "src"})


def project_name() -> str | None:
    """The project's name: the first part of the settings module (``mysite.settings``);
    when that is a generic name (``config.settings.production``), the name of the folder
    holding it (the project's folder, where manage.py is)."""
    from django.conf import settings

    module = os.environ.get("DJANGO_SETTINGS_MODULE")
    if not module and settings.configured:
        module = getattr(settings, "SETTINGS_MODULE", None)
    if not module:
        return None
    top = module.split(".")[0]
    if top in _GENERIC_NAMES:
        folder = _folder_holding(top)
        while folder is not None and folder.name in _GENERIC_NAMES:  # src/config/...
            folder = folder.parent
        if folder is not None and folder.name:
            return folder.name
    return top


def _folder_holding(name: str) -> Path | None:
    """The folder that holds the imported module or package ``name``."""
    module = sys.modules.get(name)
    paths = list(getattr(module, "__path__", None) or [])  # a package: its own folder
    if paths:
        return Path(paths[0]).resolve().parent
    file = getattr(module, "__file__", None)
    return Path(file).resolve().parent if file else None


def settings_options() -> dict[str, Any]:
    """``install()`` options from ``settings.PGLEAKGUARD``; the service defaults to the
    project's name unless ``PGLEAKGUARD_SERVICE`` is set. The Django integration is always
    among the integrations."""
    from django.conf import settings

    options = dict(getattr(settings, "PGLEAKGUARD", None) or {})
    if "service" not in options and not os.environ.get("PGLEAKGUARD_SERVICE"):
        options["service"] = project_name()
    names = options.get("integrations", os.environ.get("PGLEAKGUARD_INTEGRATIONS"))
    if names:
        listed = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if listed != ["auto"] and INTEGRATION not in listed:
            options["integrations"] = [*listed, INTEGRATION]
    return options


class DjangoIntegration(Integration):
    """Hooks ``BaseDatabaseWrapper.ensure_connection`` / ``close``, the request signals,
    the PostgreSQL backend's connection parameters and asgiref's ``sync_to_async``."""

    identifier = INTEGRATION

    def __init__(self, tracker: Any) -> None:
        super().__init__(tracker)
        self.attr = f"_pgleakguard_django_{next(_installations)}"
        #: Set on a wrapper whose checkout waits for its call-site (:meth:`named_later`).
        self.unnamed_attr = self.attr + "_unnamed"
        config = tracker.config
        self._depth = config.stack_depth if config.capture_stack else 1  # as the tracker's
        # Per thread, the DatabaseWrappers it tracked (a thread's Django connections are its
        # own): cheaper than connections.all(), which costs more than the rest of a request.
        self._wrappers = threading.local()

    # -- enabling -------------------------------------------------------------------------

    def setup(self) -> None:
        global _asgi_served
        _asgi_served = False
        self._hook_wrapper(BaseDatabaseWrapper)
        self._hook_connection_params()
        self._hook_sync_to_async()
        self._hook_asgi_handler()
        signals.request_started.connect(self.request_started, weak=False, dispatch_uid=_STARTED_UID)
        signals.request_finished.connect(
            self.request_finished, weak=False, dispatch_uid=_FINISHED_UID
        )
        # Django's close_old_connections closes (and so rolls back) a connection left in an
        # atomic block: the request's connections are checked before it runs.
        if signals.request_finished.disconnect(close_old_connections):
            signals.request_finished.connect(close_old_connections)

    def teardown(self) -> None:
        signals.request_started.disconnect(dispatch_uid=_STARTED_UID)
        signals.request_finished.disconnect(dispatch_uid=_FINISHED_UID)
        super().teardown()

    def _hook_wrapper(self, cls: Any) -> None:
        integration = self
        attr = self.attr
        unnamed = self.unnamed_attr
        orig_ensure = cls.ensure_connection
        orig_close = cls.close

        def ensure_connection(self: Any) -> None:
            orig_ensure(self)
            try:  # guard() without its context manager's cost: Django calls this per query
                rec = self.__dict__.get(attr)
                if rec is None or rec.parked or rec.closed:
                    integration.touched(self, rec)
                elif unnamed in self.__dict__:
                    integration.named_later(self, rec)
            except Exception as exc:
                record_internal_error(exc)

        def close(self: Any) -> None:
            rec = conn = None
            live = False
            with guard():
                rec = self.__dict__.get(attr)
                conn = self.connection
                live = conn is not None and not self.closed_in_transaction
            if rec is None:
                return orig_close(self)  # type: ignore[no-any-return]
            try:
                orig_close(self)
            finally:
                with guard():
                    # Closed, returned to the pool, or closed inside an atomic block.
                    if live and (self.connection is None or self.closed_in_transaction):
                        integration.closed(self, conn, rec)

        self.patcher.patch(cls, "ensure_connection", wraps(orig_ensure)(ensure_connection))
        self.patcher.patch(cls, "close", wraps(orig_close)(close))

    def _hook_connection_params(self) -> None:
        try:
            from django.db.backends.postgresql.base import DatabaseWrapper
        except Exception:  # no PostgreSQL driver: no PostgreSQL connection to tag
            return
        integration = self
        original = DatabaseWrapper.get_connection_params

        def get_connection_params(self: Any) -> Any:
            params = original(self)
            return safe_call(integration.tagged, params, default=params)

        self.patcher.patch(
            DatabaseWrapper, "get_connection_params", wraps(original)(get_connection_params)
        )

    def _hook_sync_to_async(self) -> None:
        # The ORM under an async view runs in a worker thread whose own stack holds only
        # asgiref and Django: record the awaiting task, where the view's await is.
        original: Any = SyncToAsync.__call__

        async def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            token = safe_call(_awaiting_here, default=None)
            try:
                return await original(self, *args, **kwargs)
            finally:
                if token is not None:
                    safe_call(AWAITING.reset, token, default=None)

        self.patcher.patch(SyncToAsync, "__call__", wraps(original)(call))

    def _hook_asgi_handler(self) -> None:
        # Django 5 sends request_started to sync receivers in a task of its own, whose
        # context changes do not reach the request: open the scope around the whole request.
        from django.core.handlers.asgi import ASGIHandler

        original: Any = ASGIHandler.__call__

        def open_scope(scope: Any) -> Any:
            global _asgi_served
            if not _asgi_served:
                _asgi_served = True
                for warning in persistent_connections_under_asgi():
                    logger.warning("pgleakguard: %s %s", warning[0], warning[1])
            return _request.set(RequestScope(_describe({"scope": scope})))

        async def call(self: Any, scope: Any, receive: Any, send: Any) -> Any:
            token = safe_call(open_scope, scope, default=None)
            try:
                return await original(self, scope, receive, send)
            finally:
                if token is not None:
                    _request.reset(token)

        self.patcher.patch(ASGIHandler, "__call__", wraps(original)(call))

    # -- connections ----------------------------------------------------------------------

    def tagged(self, params: dict[str, Any]) -> dict[str, Any]:
        """Connection parameters with the application_name tag (the OPTIONS one, or
        ``PGAPPNAME``, kept as its service part)."""
        config = self.tracker.config
        if not config.tag_application_name:
            return params
        user = params.get("application_name") or os.environ.get("PGAPPNAME")
        new = dict(params)
        new["application_name"] = tagging.application_name(
            user and str(user), config.service or project_name()
        )
        return new

    def touched(self, wrapper: Any, rec: Checkout | None) -> None:
        """Application code uses ``wrapper``'s connection and it is new, parked, or not
        tracked yet (opened before install)."""
        try:
            if rec is None or rec.closed:
                if (
                    wrapper.vendor != "postgresql"
                    or wrapper.connection is None
                    or wrapper.closed_in_transaction
                ):
                    return
                rec = self._track(wrapper)
                if rec is None:
                    return  # max_open_checkouts reached: not tracked
            scope = _request.get()
            if scope is None:
                if _current_thread() is _main_thread:
                    self._main_thread_use(wrapper, rec)
                return  # another thread's connection outside requests: an ordinary checkout
            if rec.parked:
                self.tracker.resume(rec, skip=2)
            scope.used.append((weakref.ref(wrapper), rec, len(wrapper.atomic_blocks)))
            if scope.outside(rec.stack):
                wrapper.__dict__[self.unnamed_attr] = rec
            else:
                wrapper.__dict__.pop(self.unnamed_attr, None)
        except Exception as exc:
            record_internal_error(exc)

    def _main_thread_use(self, wrapper: Any, rec: Checkout) -> None:
        # The main thread's connection lives as long as the process (a management command,
        # a cron job, a Celery prefork child's task): its age is no leak, it stays parked.
        # A transaction the application leaves idle on it is one: from the first use in a
        # transaction the application opened (not a test case's, which holds the test
        # database's transaction on purpose) it is a new checkout, named there and watched.
        blocks = wrapper.atomic_blocks
        watch = not wrapper.autocommit and not (
            blocks and getattr(blocks[0], "_from_testcase", False)
        )
        if watch and rec.parked and not rec.watch_transaction:
            self.tracker.resume(rec, skip=3)
        self.tracker.park(rec, watch_transaction=watch)

    def named_later(self, wrapper: Any, rec: Checkout) -> None:
        """The checkout of ``wrapper`` was taken by Django before the view ran (the
        transaction of ATOMIC_REQUESTS): the first use from application code names it.
        Its id, age and reports are kept."""
        scope = _request.get()
        if wrapper.__dict__.get(self.unnamed_attr) is not rec or scope is None:
            wrapper.__dict__.pop(self.unnamed_attr, None)
            return
        stack = capture(self._depth, 3)
        if not scope.outside(stack):
            rec.stack = stack
            del wrapper.__dict__[self.unnamed_attr]

    def _track(self, wrapper: Any) -> Checkout | None:
        conn = wrapper.connection
        conn_dict = getattr(conn, "__dict__", None)
        pooled = conn_dict.get(CHECKOUT_ATTR) if conn_dict is not None else None
        rec: Checkout | None
        if pooled is not None and pooled in self.tracker.registry:
            rec = pooled  # a native pool connection: psycopg_pool's checkout
        else:
            rec = self.tracker.begin(
                wrapper,
                INTEGRATION,
                backend_pid=backend_pid(conn),
                application_name=application_name_of(conn),
                connection_id=id(conn),
                skip=4,
            )
            if rec is None:
                return None
            if conn_dict is not None:  # psycopg 3 follows the transaction status there
                conn_dict[CHECKOUT_ATTR] = rec
        wrapper.__dict__[self.attr] = rec
        try:
            tracked = self._wrappers.tracked
        except AttributeError:  # this thread's first
            tracked = self._wrappers.tracked = {}
        tracked[id(wrapper)] = weakref.ref(wrapper)
        return rec

    def closed(self, wrapper: Any, conn: Any, rec: Checkout) -> None:
        """``wrapper`` closed its connection (or gave it back to the pool)."""
        try:
            wrapper.__dict__.pop(self.attr, None)
            wrapper.__dict__.pop(self.unnamed_attr, None)
            if rec.integration == INTEGRATION:  # a pool's checkout ends at its putconn
                conn_dict = getattr(conn, "__dict__", None)
                if conn_dict is not None and conn_dict.get(CHECKOUT_ATTR) is rec:
                    del conn_dict[CHECKOUT_ATTR]
                self.tracker.end(rec)
        except Exception as exc:
            record_internal_error(exc)

    # -- requests -------------------------------------------------------------------------

    def request_started(self, sender: Any, **kwargs: Any) -> None:
        """Receiver of ``request_started``: open the request's scope."""
        try:  # guard() without its context manager's cost (per request)
            scope = _request.get()
            if scope is None or scope.started:
                scope = RequestScope(_describe(kwargs))
                _request.set(scope)
            scope.started = True
            scope.entry = capture(1)
            self._park_thread_connections()
        except Exception as exc:
            record_internal_error(exc)

    def request_finished(self, sender: Any, **kwargs: Any) -> None:
        """Receiver of ``request_finished`` (before Django's close_old_connections)."""
        with guard():
            scope = _request.get()
            _request.set(None)
            if scope is not None and self._check(scope):
                self.tracker.hand_over()
            self._park_thread_connections()

    def _check(self, scope: RequestScope) -> bool:
        """Report the connections ``scope`` leaves behind; True if any was reported."""
        here = _current_thread()
        found = False
        for ref, rec, depth in scope.used:
            wrapper = ref()
            if wrapper is None or rec.closed or wrapper.__dict__.get(self.attr) is not rec:
                continue
            if len(wrapper.atomic_blocks) > depth:
                state = "inside an atomic block the request opened"
            elif rec.owner_object() is not here and wrapper.settings_dict.get("CONN_MAX_AGE") == 0:
                # Django closes only the connections of the request's own thread.
                pooled = wrapper.settings_dict["OPTIONS"].get("pool")
                state = "still checked out from the pool" if pooled else "still open"
            else:
                continue
            details = {"scope": scope.name, "state": state}
            found = self.tracker.report(rec, SCOPE_ENDED, details) or found
        return found

    def _park_thread_connections(self) -> None:
        # What survives a request (a persistent connection) is Django's until the next one.
        for ref in list(getattr(self._wrappers, "tracked", {}).values()):
            wrapper = ref()
            if wrapper is None:
                continue
            wrapper.__dict__.pop(self.unnamed_attr, None)
            rec = wrapper.__dict__.get(self.attr)
            if rec is not None and SCOPE_ENDED not in rec.reported:
                self.tracker.park(rec)


def _awaiting_here() -> Any:
    return AWAITING.set(asyncio.current_task())


def persistent_connections_under_asgi() -> list[tuple[str, str]]:
    """(problem, fix) for each PostgreSQL alias with persistent connections when this
    project is served over ASGI (``settings.ASGI_APPLICATION``, or a request already
    served by Django's ASGIHandler): Django runs a request's sync code in a thread that
    ends with the request, and its connection stays open until the garbage collector
    closes it."""
    from django.conf import settings

    if not (_asgi_served or getattr(settings, "ASGI_APPLICATION", None)):
        return []
    out = []
    for alias in connections:
        max_age = connections.settings[alias].get("CONN_MAX_AGE", 0)
        if max_age != 0 and connections[alias].vendor == "postgresql":
            out.append(
                (
                    f"DATABASES[{alias!r}] has CONN_MAX_AGE={max_age!r} under ASGI: each "
                    "request leaves its connection open in a thread that has ended, until "
                    "the garbage collector closes it (each is reported as a leak).",
                    "Use CONN_MAX_AGE = 0, or Django's native pool (OPTIONS['pool'], "
                    "Django 5.1+), under ASGI.",
                )
            )
    return out


def _describe(kwargs: dict[str, Any]) -> str:
    environ = kwargs.get("environ")
    if environ is not None:
        method, path = environ.get("REQUEST_METHOD"), environ.get("PATH_INFO")
    else:
        scope = kwargs.get("scope") or {}
        method, path = scope.get("method"), scope.get("path")
    return f"request {method or '?'} {path or '/'}"
