"""Django: every DatabaseWrapper connection is a checkout owned by its thread; a request is
a scope whose end checks the connections it used; the native pool (Django >= 5.1) is
tracked through psycopg_pool; application_name is tagged in the connection parameters.

Enable it with ``"pgleakguard.integrations.django"`` in INSTALLED_APPS (options from
``settings.PGLEAKGUARD``), or with ``pgleakguard.install()``.

Between requests Django keeps a persistent connection (CONN_MAX_AGE > 0) for the next one,
and the main thread's connection (a management command, the shell, the test runner's
test-database connection) for the life of the process: those are *parked*, and only a
thread that ends holding one is reported. A request's first use of a connection starts a
new checkout, named after the request's own code.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import weakref
from contextvars import ContextVar
from functools import wraps
from typing import Any

from ... import tagging
from ..._safety import guard, record_internal_error, safe_call
from ...callsite import AWAITING
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


class RequestScope:
    """One request: its description and the connections it used (with the depth of their
    atomic blocks when it first used them)."""

    __slots__ = ("name", "started", "used")

    def __init__(self, name: str) -> None:
        self.name = name
        #: request_started was seen (a WSGI thread's next request needs a new scope).
        self.started = False
        self.used: list[tuple[weakref.ref[Any], Checkout, int]] = []


_request: ContextVar[RequestScope | None] = ContextVar("pgleakguard_django_request", default=None)


def project_name() -> str | None:
    """The project's name: the first part of the settings module (``mysite.settings``)."""
    from django.conf import settings

    module = os.environ.get("DJANGO_SETTINGS_MODULE")
    if not module and settings.configured:
        module = getattr(settings, "SETTINGS_MODULE", None)
    return module.split(".")[0] if module else None


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

    # -- enabling -------------------------------------------------------------------------

    def setup(self) -> None:
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
        orig_ensure = cls.ensure_connection
        orig_close = cls.close

        def ensure_connection(self: Any) -> None:
            orig_ensure(self)
            with guard():
                rec = self.__dict__.get(attr)
                if rec is None or rec.parked or rec.closed:
                    integration.touched(self, rec)

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
            token = AWAITING.set(asyncio.current_task())
            try:
                return await original(self, *args, **kwargs)
            finally:
                AWAITING.reset(token)

        self.patcher.patch(SyncToAsync, "__call__", wraps(original)(call))

    def _hook_asgi_handler(self) -> None:
        # Django 5 sends request_started to sync receivers in a task of its own, whose
        # context changes do not reach the request: open the scope around the whole request.
        from django.core.handlers.asgi import ASGIHandler

        original: Any = ASGIHandler.__call__

        def open_scope(scope: Any) -> Any:
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
            if rec.parked:
                if scope is None:
                    return  # still outside any request: Django keeps it
                self.tracker.resume(rec, skip=2)
            elif scope is None:
                if _current_thread() is _main_thread:
                    self.tracker.park(rec)
                return
            scope.used.append((weakref.ref(wrapper), rec, len(wrapper.atomic_blocks)))
        except Exception as exc:
            record_internal_error(exc)

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
        return rec

    def closed(self, wrapper: Any, conn: Any, rec: Checkout) -> None:
        """``wrapper`` closed its connection (or gave it back to the pool)."""
        try:
            wrapper.__dict__.pop(self.attr, None)
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
        with guard():
            scope = _request.get()
            if scope is None or scope.started:
                scope = RequestScope(_describe(kwargs))
                _request.set(scope)
            scope.started = True
            self._park_thread_connections()

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
        for wrapper in connections.all(initialized_only=True):
            rec = wrapper.__dict__.get(self.attr)
            if rec is not None and SCOPE_ENDED not in rec.reported:
                self.tracker.park(rec)


def _describe(kwargs: dict[str, Any]) -> str:
    environ = kwargs.get("environ")
    if environ is not None:
        method, path = environ.get("REQUEST_METHOD"), environ.get("PATH_INFO")
    else:
        scope = kwargs.get("scope") or {}
        method, path = scope.get("method"), scope.get("path")
    return f"request {method or '?'} {path or '/'}"
