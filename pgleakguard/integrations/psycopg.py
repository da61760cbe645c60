"""psycopg 3: tag application_name at connect, track raw connections from open to close,
and follow each connection's transaction status after every operation."""

from __future__ import annotations

import os
import sys
from functools import wraps
from time import monotonic
from types import FrameType
from typing import Any, cast

from .. import tagging
from .._safety import record_internal_error, safe_call
from ..tracker import CHECKOUT_ATTR, TX_ACTIVE
from . import DidNotEnable, Integration

try:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict
except ImportError as exc:  # pragma: no cover - exercised only without psycopg
    raise DidNotEnable("psycopg (version 3) is not installed") from exc

#: Callers whose connections belong to a pool (tracked per checkout, not from open to close).
POOL_MODULES = ("psycopg_pool", "sqlalchemy", "django.db")

#: Wrappers between a pool and psycopg.connect (other instrumentations).
WRAPPER_MODULES = ("opentelemetry", "wrapt", "pgleakguard")


def _within(module: object, packages: tuple[str, ...]) -> bool:
    """Whether ``module`` is one of ``packages`` or inside one (``sqlalchemy_utils`` is not
    ``sqlalchemy``)."""
    return isinstance(module, str) and any(
        module == p or module.startswith(p + ".") for p in packages
    )


#: Per physical connection: (connection id, backend pid, application_name), set at connect.
META_ATTR = "_pgleakguard_meta"


def connection_meta(conn: Any) -> tuple[int, int | None, str | None]:
    """Connection id, backend pid and application_name of a psycopg connection (no I/O)."""
    meta: tuple[int, int | None, str | None] | None = conn.__dict__.get(META_ATTR)
    if meta is None:
        pgconn = conn.pgconn
        name = pgconn.parameter_status(b"application_name")
        meta = (id(conn), pgconn.backend_pid or None, name.decode() if name else None)
        conn.__dict__[META_ATTR] = meta
    return meta


class PsycopgIntegration(Integration):
    """Hooks ``psycopg.Connection`` and ``psycopg.AsyncConnection``."""

    identifier = "psycopg"

    def setup(self) -> None:
        for cls in (psycopg.Connection, psycopg.AsyncConnection):
            self._hook_class(cls)
        # psycopg.connect is bound to Connection.connect at import time: rebind it.
        self.patcher.patch(psycopg, "connect", psycopg.Connection.connect)

    def _hook_class(self, cls: Any) -> None:
        integration = self
        # The descriptor as it is now: another instrumentation's wrapper stays in the chain.
        connect_descriptor = vars(cls)["connect"]
        orig_connect = (
            connect_descriptor.__func__ if isinstance(connect_descriptor, classmethod) else None
        )
        orig_wait = cls.wait
        orig_close = cls.close
        is_async = cls is psycopg.AsyncConnection

        if is_async:

            async def connect(cls: Any, conninfo: str = "", **kwargs: Any) -> Any:
                kwargs = safe_call(integration.connect_kwargs, conninfo, kwargs, default=kwargs)
                started = monotonic()
                conn = await connect_descriptor.__get__(None, cls)(conninfo, **kwargs)
                caller = sys._getframe(1)
                safe_call(integration.connected, conn, caller, started, default=None)
                return conn

            async def wait(self: Any, gen: Any, *args: Any, **kwargs: Any) -> Any:
                # (try/except inline, not safe_call: this runs around every statement)
                try:
                    _busy(self)
                except Exception as exc:
                    record_internal_error(exc)
                try:
                    return await orig_wait(self, gen, *args, **kwargs)
                finally:
                    try:
                        _touch(self)
                    except Exception as exc:
                        record_internal_error(exc)

            async def close(self: Any) -> None:
                _closing(integration, self)
                await orig_close(self)

        else:

            def connect(cls: Any, conninfo: str = "", **kwargs: Any) -> Any:  # type: ignore[misc]
                kwargs = safe_call(integration.connect_kwargs, conninfo, kwargs, default=kwargs)
                started = monotonic()
                conn = connect_descriptor.__get__(None, cls)(conninfo, **kwargs)
                caller = sys._getframe(1)
                safe_call(integration.connected, conn, caller, started, default=None)
                return conn

            def wait(self: Any, gen: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
                try:
                    _busy(self)
                except Exception as exc:
                    record_internal_error(exc)
                try:
                    return orig_wait(self, gen, *args, **kwargs)
                finally:
                    try:
                        _touch(self)
                    except Exception as exc:
                        record_internal_error(exc)

            def close(self: Any) -> None:  # type: ignore[misc]
                _closing(integration, self)
                orig_close(self)

        wrapped = wraps(orig_connect)(connect) if orig_connect is not None else connect
        self.patcher.patch(cls, "connect", classmethod(cast(Any, wrapped)))
        self.patcher.patch(cls, "wait", wraps(orig_wait)(wait))
        self.patcher.patch(cls, "close", wraps(orig_close)(close))

    # -- the glue -------------------------------------------------------------------------

    def connect_kwargs(self, conninfo: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Connection keywords with pgleakguard's application_name tag added."""
        config = self.tracker.config
        if not config.tag_application_name:
            return kwargs
        user = kwargs.get("application_name")
        if not user:
            try:
                user = conninfo_to_dict(conninfo).get("application_name")
            except Exception:
                # The user's own malformed conninfo: psycopg's connect raises its own error
                # for it (no internal error of ours, and no text of a DSN in our log).
                return kwargs
        user = user or os.environ.get("PGAPPNAME")
        new = dict(kwargs)
        new["application_name"] = tagging.application_name(user and str(user), config.service)
        return new

    def connected(self, conn: Any, caller: FrameType, started: float) -> None:
        """A physical connection was opened: track it unless a pool owns it."""
        _, pid, name = connection_meta(conn)
        self.tracker.connected(pid, conn)
        # Look through other instrumentations' wrappers to the code that asked.
        while caller.f_back is not None and _within(
            caller.f_globals.get("__name__"), WRAPPER_MODULES
        ):
            caller = caller.f_back
        module = caller.f_globals.get("__name__")
        if _within(module, POOL_MODULES):
            telemetry = self.tracker.telemetry
            if (
                _within(module, ("psycopg_pool",))
                and telemetry is not None
                and telemetry.metrics_on
            ):
                # Only the pool's own frame knows which pool this connection is for.
                pool = caller.f_locals.get("self")
                telemetry.created(getattr(pool, "name", None), monotonic() - started)
            return  # a pool's connection: its integration tracks each checkout instead
        rec = self.tracker.begin(conn, "psycopg", backend_pid=pid, application_name=name, skip=2)
        conn.__dict__[CHECKOUT_ATTR] = rec


def _busy(conn: Any) -> None:
    # Before every operation: a statement is running, so the transaction is not idle however
    # long it takes (the watchdog skips ACTIVE; _touch sets the real status and time after).
    rec = conn.__dict__.get(CHECKOUT_ATTR)
    if rec is not None:
        rec.tx_status = TX_ACTIVE


def _touch(conn: Any) -> None:
    # After every operation, in the user's own thread: the only safe place to read pgconn.
    rec = conn.__dict__.get(CHECKOUT_ATTR)
    if rec is not None:
        rec.last_activity = monotonic()
        rec.tx_status = conn.pgconn.transaction_status


def _closing(integration: PsycopgIntegration, conn: Any) -> None:
    try:
        rec = conn.__dict__.get(CHECKOUT_ATTR)
        if rec is not None and rec.integration == "psycopg":
            del conn.__dict__[CHECKOUT_ATTR]
            integration.tracker.end(rec)
    except Exception as exc:
        record_internal_error(exc)
