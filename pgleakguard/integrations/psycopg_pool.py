"""psycopg_pool: each getconn/putconn (and ``with pool.connection()``) is a checkout;
a PoolTimeout names the call-sites holding the pool's connections."""

from __future__ import annotations

from functools import wraps
from time import monotonic
from typing import Any

from .._safety import guard, record_internal_error
from ..tracker import CHECKOUT_ATTR, Checkout, describe_holders
from . import DidNotEnable, Integration

try:
    import psycopg_pool
    from psycopg_pool import PoolTimeout
except ImportError as exc:  # pragma: no cover - exercised only without psycopg_pool
    raise DidNotEnable("psycopg_pool is not installed") from exc

from .psycopg import META_ATTR, connection_meta

INTEGRATION = "psycopg_pool"


class PsycopgPoolIntegration(Integration):
    """Hooks ``ConnectionPool`` and ``AsyncConnectionPool`` (and the null pools, which inherit)."""

    identifier = INTEGRATION

    def setup(self) -> None:
        self._hook_sync(psycopg_pool.ConnectionPool)
        self._hook_async(psycopg_pool.AsyncConnectionPool)

    def _hook_sync(self, cls: Any) -> None:
        integration = self
        orig_getconn = cls.getconn
        orig_putconn = cls.putconn

        def getconn(self: Any, timeout: float | None = None) -> Any:
            started = monotonic()
            try:
                conn = orig_getconn(self, timeout)
            except PoolTimeout as exc:
                integration.explain_timeout(exc, self, started)
                raise
            integration.checked_out(conn, self, started)
            return conn

        def putconn(self: Any, conn: Any) -> None:
            integration.checked_in(conn)
            orig_putconn(self, conn)

        self._install(cls, getconn, orig_getconn, putconn, orig_putconn)

    def _hook_async(self, cls: Any) -> None:
        integration = self
        orig_getconn = cls.getconn
        orig_putconn = cls.putconn

        async def getconn(self: Any, timeout: float | None = None) -> Any:
            started = monotonic()
            try:
                conn = await orig_getconn(self, timeout)
            except PoolTimeout as exc:
                integration.explain_timeout(exc, self, started)
                raise
            integration.checked_out(conn, self, started)
            return conn

        async def putconn(self: Any, conn: Any) -> None:
            integration.checked_in(conn)
            await orig_putconn(self, conn)

        self._install(cls, getconn, orig_getconn, putconn, orig_putconn)

    def _install(self, cls: Any, getconn: Any, orig_get: Any, putconn: Any, orig_put: Any) -> None:
        self.patcher.patch(cls, "getconn", wraps(orig_get)(getconn))
        self.patcher.patch(cls, "putconn", wraps(orig_put)(putconn))

    # -- the glue -------------------------------------------------------------------------

    def checked_out(self, conn: Any, pool: Any, started: float) -> None:
        try:
            tracker = self.tracker
            telemetry = tracker.telemetry
            if telemetry is not None and telemetry.metrics_on:
                with guard():  # a fault in the metrics must not cost the checkout its tracking
                    telemetry.waited(pool.name, monotonic() - started, timed_out=False)
                    telemetry.register_pool(pool.name, pool, pool_stats)
            attrs = conn.__dict__
            conn_id, pid, name = attrs.get(META_ATTR) or connection_meta(conn)
            attrs[CHECKOUT_ATTR] = tracker.begin(
                conn, INTEGRATION, pool.name, pid, name, conn_id, 2, id(pool)
            )
        except Exception as exc:
            record_internal_error(exc)

    def checked_in(self, conn: Any) -> None:
        try:
            rec = conn.__dict__.pop(CHECKOUT_ATTR, None)
            if rec is not None:
                self.tracker.end(rec)
        except Exception as exc:
            record_internal_error(exc)

    def explain_timeout(self, exc: BaseException, pool: Any, started: float) -> None:
        """Append the holders of ``pool`` to the PoolTimeout's own message, in place."""
        try:
            telemetry = self.tracker.telemetry
            if telemetry is not None and telemetry.metrics_on:
                telemetry.waited(pool.name, monotonic() - started, timed_out=True)

            def ours(rec: Checkout) -> bool:  # this pool's, not another of the same name
                return rec.integration == INTEGRATION and rec.pool_id == id(pool)

            holders = [r for r in self.tracker.registry.snapshot() if ours(r) and not r.closed]
            lost = [r for r in list(self.tracker.collected) if ours(r)]
            text = str(exc.args[0]) if exc.args else ""
            summary = describe_holders(holders, pool.name, lost)
            exc.args = (f"{text}\n{summary}", *exc.args[1:])
        except Exception as err:
            record_internal_error(err)


def pool_stats(pool: Any) -> dict[str, int]:
    """The pool's own figures for the OpenTelemetry instruments (``get_stats()``, no I/O)."""
    stats = pool.get_stats()
    return {
        "idle": stats["pool_available"],
        "max": stats["pool_max"],
        "idle_min": stats["pool_min"],
        "pending": stats["requests_waiting"],
    }
