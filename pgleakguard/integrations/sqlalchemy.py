"""SQLAlchemy: every pool checkout is a checkout, for sync and async engines and any
PostgreSQL driver; QueuePool timeouts name the holders.

Hooks are SQLAlchemy's public pool, dialect and connection events, registered on the
classes (every engine, existing or future) or on one engine by ``instrument_engine``.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import wraps
from time import monotonic
from typing import Any, Callable

from .. import tagging
from .._safety import guard, record_internal_error
from ..callsite import CallSite, callsite_of
from ..drivers import application_name_of, backend_pid
from ..drivers import driver_connection as _driver
from ..tracker import (
    CHECKOUT_ATTR,
    TX_IDLE,
    TX_INERROR,
    TX_INTRANS,
    Checkout,
    describe_holders,
)
from . import DidNotEnable, Integration

try:
    import sqlalchemy
    from sqlalchemy import event, exc
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import Pool
except ImportError as err:  # pragma: no cover - exercised only without SQLAlchemy
    raise DidNotEnable("SQLAlchemy is not installed") from err

if tuple(int(p) for p in sqlalchemy.__version__.split(".")[:2]) < (1, 4):
    raise DidNotEnable(f"SQLAlchemy {sqlalchemy.__version__} is too old; 1.4 or newer is needed")

INTEGRATION = "sqlalchemy"
_REC = "pgleakguard.checkout"  # in ConnectionPoolEntry.record_info, for one checkout
_PID = "pgleakguard.backend_pid"  # in ConnectionPoolEntry.info, per DBAPI connection
_APP = "pgleakguard.application_name"
_TAG = "pgleakguard.retag"  # last application_name sent by retag_on_checkout
_CREATED = "pgleakguard.create_time"  # seconds the DBAPI connect took, until reported
_WAITED = "pgleakguard.wait_time"  # an engine's first wait, until its pool has a name
_UNNAMED_POOL = "sqlalchemy"

# Set on each engine's Pool: its report name (the engine's logging_name, or
# driver://host:port/db). A pool does not know its engine, so engine_connect names it.
_NAME = "_pgleakguard_name"


def _name_of(pool: Any) -> str | None:
    return pool.__dict__.get(_NAME) if pool is not None else None


def pool_name(engine: Engine) -> str:
    """``engine.logging_name`` or ``driver://host:port/database`` (never a password)."""
    if engine.logging_name:
        return str(engine.logging_name)
    url = engine.url
    port = f":{url.port}" if url.port else ""
    return f"{url.drivername}://{url.host or ''}{port}/{url.database or ''}"


class SQLAlchemyIntegration(Integration):
    """Class-level listeners for every engine; :meth:`setup_engine` for one engine."""

    identifier = INTEGRATION

    def __init__(self, tracker: Any) -> None:
        super().__init__(tracker)
        self._listeners: list[tuple[Any, str, Callable[..., Any]]] = []
        self._engines: weakref.WeakSet[Any] = weakref.WeakSet()
        self._detached: dict[int, Checkout] = {}
        self._comments: dict[tuple[CallSite, int], str] = {}
        #: Threads/tasks inside Pool.connect per pool (pending requests), with metrics on.
        self.waiting: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.global_hooks = False

    # -- enabling -------------------------------------------------------------------------

    def setup(self) -> None:
        self.global_hooks = True
        self._hook(Engine, Pool)
        self._hook_pool_timeout()

    def setup_engine(self, engine: Any) -> None:
        """Instrument one engine (sync or async); idempotent."""
        engine = getattr(engine, "sync_engine", engine)
        if self.global_hooks or engine in self._engines:
            return
        if not self._engines:
            self._hook_pool_timeout()
        self._engines.add(engine)
        self._hook(engine, engine.pool)
        engine.pool.__dict__[_NAME] = pool_name(engine)
        self._hook_transactions(engine)

    def teardown(self) -> None:
        while self._listeners:
            target, name, fn = self._listeners.pop()
            with guard():
                event.remove(target, name, fn)
        super().teardown()

    def _listen(self, target: Any, name: str, fn: Callable[..., Any], **kw: Any) -> None:
        event.listen(target, name, fn, **kw)
        self._listeners.append((target, name, fn))

    def _hook(self, engine: Any, pool: Any) -> None:
        config = self.tracker.config
        self._listen(pool, "connect", self._on_connect)
        self._listen(pool, "checkout", self._on_checkout)
        self._listen(pool, "checkin", self._on_checkin)
        self._listen(pool, "detach", self._on_detach)
        self._listen(pool, "close_detached", self._on_close_detached)
        self._listen(engine, "engine_connect", self._on_engine_connect)
        self._listen(engine, "do_connect", self._on_do_connect)
        if config.sql_comments:
            self._listen(engine, "before_cursor_execute", self._add_comment, retval=True)

    def _hook_pool_timeout(self) -> None:
        # There is no pool event for a checkout timeout: wrap Pool.connect (public), the
        # one entry every engine and AsyncEngine goes through, to extend the TimeoutError.
        integration = self
        original = Pool.connect

        @wraps(original)
        def connect(pool: Any) -> Any:
            telemetry = integration.tracker.telemetry
            if telemetry is None or not telemetry.metrics_on:
                try:
                    return original(pool)
                except exc.TimeoutError as error:
                    integration.explain_timeout(error, pool)
                    raise
            started = integration.acquiring(pool)
            fairy, timed_out = None, False
            try:
                fairy = original(pool)
            except exc.TimeoutError as error:
                timed_out = True
                integration.explain_timeout(error, pool)
                raise
            finally:
                integration.acquired(pool, fairy, started, timed_out)
            return fairy

        self.patcher.patch(Pool, "connect", connect)

    def acquiring(self, pool: Any) -> float:
        """A checkout starts waiting on ``pool`` (metrics on): count it as pending."""
        with guard():
            self.waiting[pool] = self.waiting.get(pool, 0) + 1
        return monotonic()

    def acquired(self, pool: Any, fairy: Any, started: float, timed_out: bool) -> None:
        """The wait is over: record its time, or the timeout."""
        with guard():
            self.waiting[pool] = max(0, self.waiting.get(pool, 1) - 1)
            telemetry = self.tracker.telemetry
            waited = monotonic() - started
            name = _name_of(pool)
            if fairy is None:
                if timed_out:
                    telemetry.waited(name, waited, timed_out=True)
            elif name is None:  # an engine's first connect: engine_connect reports it
                fairy.info[_WAITED] = waited
            else:
                telemetry.waited(name, waited, timed_out=False)

    # -- pool events ----------------------------------------------------------------------

    def _on_do_connect(self, dialect: Any, conn_rec: Any, cargs: Any, cparams: Any) -> None:
        with guard():
            conn_rec.info[_CREATED] = monotonic()
            if not self.tracker.config.tag_application_name:
                return
            if dialect.driver == "asyncpg":
                settings = dict(cparams.get("server_settings") or {})
                user = settings.get("application_name")
                settings["application_name"] = self._app_name(user)
                cparams["server_settings"] = settings
            else:
                cparams["application_name"] = self._app_name(cparams.get("application_name"))

    def _app_name(self, user: str | None) -> str:
        user = user or os.environ.get("PGAPPNAME")
        return tagging.application_name(user, self.tracker.config.service)

    def _on_connect(self, dbapi_connection: Any, connection_record: Any) -> None:
        with guard():
            started = connection_record.info.get(_CREATED)
            if isinstance(started, float):  # reported by engine_connect, which knows the pool
                connection_record.info[_CREATED] = (monotonic() - started,)
            pid = connection_record.info[_PID] = backend_pid(dbapi_connection)
            self.tracker.connected(pid, dbapi_connection)
            connection_record.info[_APP] = application_name_of(dbapi_connection)

    def _on_checkout(self, dbapi_connection: Any, connection_record: Any, proxy: Any) -> None:
        try:
            info = connection_record.info
            rec = self.tracker.begin(
                proxy,
                INTEGRATION,
                # _ConnectionFairy._pool: no public way from a checkout to its pool
                _name_of(getattr(proxy, "_pool", None)) or _UNNAMED_POOL,
                backend_pid=info.get(_PID),
                application_name=info.get(_APP),
                connection_id=id(connection_record),
                skip=1,
            )
            if rec is None:
                return
            connection_record.record_info[_REC] = rec
            driver = _driver(dbapi_connection)
            if hasattr(driver, "__dict__"):  # psycopg 3: its wait() hook follows the state
                driver.__dict__[CHECKOUT_ATTR] = rec
        except Exception as error:
            record_internal_error(error)
            return
        if self.tracker.config.retag_on_checkout:
            with guard():
                self._retag(dbapi_connection, connection_record, rec)

    def _on_checkin(self, dbapi_connection: Any, connection_record: Any) -> None:
        try:
            rec = connection_record.record_info.pop(_REC, None) if connection_record else None
            if dbapi_connection is not None:
                driver = _driver(dbapi_connection)
                if hasattr(driver, "__dict__"):
                    driver.__dict__.pop(CHECKOUT_ATTR, None)
            if rec is not None:
                self.tracker.end(rec)
        except Exception as error:
            record_internal_error(error)

    def _on_detach(self, dbapi_connection: Any, connection_record: Any) -> None:
        # The DBAPI connection leaves its pool record while still checked out (e.g. a
        # pool_pre_ping replacement); it ends with close_detached instead of checkin.
        with guard():
            rec = connection_record.record_info.pop(_REC, None)
            if rec is not None:
                self._detached[id(dbapi_connection)] = rec

    def _on_close_detached(self, dbapi_connection: Any) -> None:
        with guard():
            rec = self._detached.pop(id(dbapi_connection), None)
            if rec is not None:
                self.tracker.end(rec)

    # -- connection events ----------------------------------------------------------------

    def _on_engine_connect(self, conn: Any, *_: Any) -> None:
        with guard():
            engine = conn.engine
            pool = engine.pool
            name = pool.__dict__.get(_NAME)
            if name is None:  # this engine's first connection
                name = pool.__dict__[_NAME] = pool_name(engine)
                self._hook_transactions(engine)
                rec = _checkout_of(conn)
                if rec is not None and rec.pool == _UNNAMED_POOL:
                    rec.pool = name
            telemetry = self.tracker.telemetry
            if telemetry is not None and telemetry.metrics_on:
                telemetry.register_pool(name, pool, self.pool_stats)
                info = conn.connection.info
                created = info.pop(_CREATED, None)
                if isinstance(created, tuple):
                    telemetry.created(name, created[0])
                waited = info.pop(_WAITED, None)
                if waited is not None:
                    telemetry.waited(name, waited, timed_out=False)

    def pool_stats(self, pool: Any) -> dict[str, int]:
        """The pool's own figures for the OpenTelemetry instruments (no I/O)."""
        stats = {"pending": self.waiting.get(pool, 0)}
        if hasattr(pool, "checkedin"):
            stats["idle"] = pool.checkedin()
        if hasattr(pool, "size") and hasattr(pool, "_max_overflow"):
            # QueuePool exposes size() but keeps max_overflow private; -1 means unlimited.
            stats["idle_max"] = pool.size()
            if pool._max_overflow >= 0:
                stats["max"] = pool.size() + pool._max_overflow
        return stats

    def _hook_transactions(self, engine: Any) -> None:
        # psycopg 3 reports its transaction state itself (the psycopg integration's wait()
        # hook); other drivers (psycopg2, asyncpg) are followed through these events.
        if engine.dialect.driver in ("psycopg", "psycopg_async"):
            return
        self._listen(engine, "begin", self._on_begin)
        self._listen(engine, "commit", self._on_end_transaction)
        self._listen(engine, "rollback", self._on_end_transaction)
        self._listen(engine, "after_cursor_execute", self._on_execute)
        self._listen(engine, "handle_error", self._on_error)

    def _on_begin(self, conn: Any) -> None:
        _set_state(conn, TX_INTRANS)

    def _on_execute(self, conn: Any, *_: Any) -> None:
        _set_state(conn, None)

    def _on_end_transaction(self, conn: Any) -> None:
        _set_state(conn, TX_IDLE)

    def _on_error(self, context: Any) -> None:
        conn = getattr(context, "connection", None)
        if conn is not None and conn.in_transaction():
            _set_state(conn, TX_INERROR)

    def _add_comment(
        self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> tuple[str, Any]:
        try:
            if "/*" not in statement:
                rec = _checkout_of(conn)
                if rec is not None:
                    statement = f"{statement} {self._comment(rec)}"
        except Exception as error:
            record_internal_error(error)
        return statement, parameters

    def _comment(self, rec: Checkout) -> str:
        """The checkout's sqlcommenter comment; one string per call-site (stable values)."""
        site = callsite_of(rec.stack)
        key = (site, os.getpid())  # a forked child has its own pid
        comment = self._comments.get(key)
        if comment is None:
            if len(self._comments) > 10_000:
                self._comments.clear()
            comment = self._comments[key] = tagging.sql_comment(
                callsite=site.short, service=rec.service, pid=str(key[1])
            )
        return comment

    # -- retag and timeout ----------------------------------------------------------------

    def _retag(self, dbapi_connection: Any, connection_record: Any, rec: Checkout) -> None:
        site = callsite_of(rec.stack)
        service = tagging.parse(rec.application_name or "")
        tag = tagging.build(
            service.service if service else (rec.service or tagging.default_service()),
            os.getpid(),
            site.file,
            site.line,
        )
        info = connection_record.info
        if info.get(_TAG) == tag:
            return  # only send when the tag changed
        sql = f"SET application_name = '{tag}'"  # tag chars are [A-Za-z0-9._:/@-] only
        driver = _driver(dbapi_connection)
        if hasattr(dbapi_connection, "run_async"):
            if hasattr(driver, "set_autocommit"):  # psycopg AsyncConnection

                async def send(c: Any) -> None:
                    if c.info.transaction_status != TX_IDLE:
                        return
                    with_ac = c.autocommit
                    await c.set_autocommit(True)
                    try:
                        await c.execute(sql)
                    finally:
                        await c.set_autocommit(with_ac)

                dbapi_connection.run_async(send)
            elif not driver.is_in_transaction():  # asyncpg: no implicit transactions
                dbapi_connection.run_async(lambda c: c.execute(sql))
            else:
                return
        else:
            status = _sync_tx_status(driver)
            if status != TX_IDLE:
                return  # never open a transaction, never run inside a failed one
            with _autocommit(driver):
                cursor = driver.cursor()
                try:
                    cursor.execute(sql)
                finally:
                    cursor.close()
        info[_TAG] = tag
        rec.application_name = tag

    def explain_timeout(self, error: BaseException, pool: Any) -> None:
        """Append the pool's holders to the TimeoutError's own text, in place (type, code
        3o7r and the original message are kept)."""
        try:
            name = _name_of(pool)

            def ours(rec: Checkout) -> bool:
                return rec.integration == INTEGRATION and (name is None or rec.pool == name)

            holders = [r for r in self.tracker.registry.snapshot() if ours(r) and not r.closed]
            lost = [r for r in list(self.tracker.collected) if ours(r)]
            text = str(error.args[0]) if error.args else ""
            # SQLAlchemy appends its "(Background on this error ...)" link: own line for it.
            summary = describe_holders(holders, name, lost)
            error.args = (f"{text}\n{summary}\n", *error.args[1:])
        except Exception as err:
            record_internal_error(err)


def _checkout_of(conn: Any) -> Checkout | None:
    """The open checkout behind a SQLAlchemy Connection, if we track it."""
    fairy = conn.connection if not conn.invalidated else None
    record_info = getattr(fairy, "record_info", None)
    return record_info.get(_REC) if record_info else None


def _set_state(conn: Any, status: int | None) -> None:
    """Record activity on ``conn``, and its new transaction state unless ``None``."""
    try:
        rec = _checkout_of(conn)
        if rec is not None:
            rec.last_activity = monotonic()
            if status is not None:
                rec.tx_status = status
    except Exception as error:
        record_internal_error(error)


def _sync_tx_status(driver: Any) -> int | None:
    info = getattr(driver, "info", None)
    status = getattr(info, "transaction_status", None)  # psycopg 3 and psycopg2 >= 2.8
    if status is None and hasattr(driver, "get_transaction_status"):
        status = driver.get_transaction_status()
    return int(status) if status is not None else None


@contextmanager
def _autocommit(driver: Any) -> Iterator[None]:
    before = driver.autocommit
    driver.autocommit = True
    try:
        yield
    finally:
        driver.autocommit = before
