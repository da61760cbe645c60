"""SQLAlchemy: every pool checkout of a PostgreSQL engine is a checkout, for sync and async
engines and any PostgreSQL driver; QueuePool timeouts name the holders.

Hooks are SQLAlchemy's public pool, dialect and connection events. Pool events are
listened to on the Pool class: a pool recreated by ``engine.dispose()`` carries its
listeners over, and listeners on one pool could not be removed once that pool is gone.
Each listener returns at once for a pool this installation does not track. Which pools
it tracks is decided at an engine's first connection (a wrapper around
``Engine.raw_connection``, the way every Connection and AsyncConnection takes its DBAPI
connection): PostgreSQL engines, all of them or those given to ``instrument_engine``.
Engines of other databases get no tag, no checkout and no listener of their own.
"""

from __future__ import annotations

import os
import select
import threading
import weakref
from functools import wraps
from time import monotonic
from typing import Any, Callable

from .. import tagging
from .._safety import (
    guard,
    is_operational,
    logger,
    record_internal_error,
    record_operational_error,
)
from ..callsite import CallSite, callsite_of
from ..drivers import application_name_of, backend_pid, transaction_status
from ..drivers import driver_connection as _driver
from ..tracker import (
    CHECKOUT_ATTR,
    TX_ACTIVE,
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
_APP = "pgleakguard.application_name"  # its application_name now (retag changes it)
_CREATED = "pgleakguard.create_time"  # when the DBAPI connect began, then how long it took

# On a Pool: (installation token, pool name or None when not tracked). On an Engine:
# (installation token, pool name) once this installation hooked it. A token per
# installation: after uninstall() and install() every engine is looked at afresh (the marks
# uninstall() leaves behind name a token nobody holds).
_MARK = "_pgleakguard"

# Drivers whose transaction state the psycopg integration follows itself (its wait() hook).
_FOLLOWED_BY_PSYCOPG = ("psycopg", "psycopg_async")


def pool_name(engine: Engine) -> str:
    """``engine.logging_name`` or ``driver://host:port/database`` (never a password)."""
    if engine.logging_name:
        return str(engine.logging_name)
    url = engine.url
    port = f":{url.port}" if url.port else ""
    return f"{url.drivername}://{url.host or ''}{port}/{url.database or ''}"


class SQLAlchemyIntegration(Integration):
    """Every PostgreSQL engine (:meth:`setup`) or the engines given to :meth:`setup_engine`."""

    identifier = INTEGRATION

    def __init__(self, tracker: Any) -> None:
        super().__init__(tracker)
        self._token = object()
        self._lock = threading.Lock()
        # (weak reference to the target, event, listener): a listener never keeps an
        # engine (and its pooled server sessions) alive.
        self._listeners: list[tuple[weakref.ref[Any], str, Callable[..., Any]]] = []
        self._engines: weakref.WeakSet[Any] = weakref.WeakSet()  # given to instrument_engine
        self._names: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self._detached: dict[int, Checkout] = {}
        self._comments: dict[tuple[CallSite, int], str] = {}
        #: Threads/tasks inside Pool.connect per pool (pending requests), with metrics on.
        self.waiting: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.global_hooks = False
        self._pools_hooked = False

    # -- enabling -------------------------------------------------------------------------

    def setup(self) -> None:
        self.global_hooks = True
        self._hook_pools()
        self._hook_engine(Engine)

    def setup_engine(self, engine: Any) -> None:
        """Instrument one engine (sync or async); idempotent. A non-PostgreSQL engine is
        left alone, with one warning."""
        engine = _root(getattr(engine, "sync_engine", engine))
        if self.global_hooks or engine in self._engines:
            return
        if engine.dialect.name != "postgresql":
            logger.warning(
                "pgleakguard: instrument_engine() ignored for a %r engine: only PostgreSQL "
                "engines are tracked",
                engine.dialect.name,
            )
            return
        self._hook_pools()
        self._engines.add(engine)
        self._hook_engine(engine)
        engine.pool.__dict__.pop(_MARK, None)  # maybe seen (and left alone) before now
        self.first_sight(engine)

    def teardown(self) -> None:
        while self._listeners:
            ref, name, fn = self._listeners.pop()
            target = ref()
            if target is not None:  # a collected engine took its listeners with it
                with guard():
                    event.remove(target, name, fn)
        super().teardown()

    def _listen(self, target: Any, name: str, fn: Callable[..., Any], **kw: Any) -> None:
        event.listen(target, name, fn, **kw)
        self._listeners.append((weakref.ref(target), name, fn))

    def _hook_pools(self) -> None:
        # Once per installation, for either mode: the pool listeners (on the class) and
        # the two patches.
        if self._pools_hooked:
            return
        self._pools_hooked = True
        for name, fn in (
            ("connect", self._on_connect),
            ("checkout", self._on_checkout),
            ("checkin", self._on_checkin),
            ("detach", self._on_detach),
            ("close_detached", self._on_close_detached),
        ):
            self._listen(Pool, name, fn)
        self._patch_raw_connection()
        self._patch_pool_connect()

    def _hook_engine(self, target: Any) -> None:
        # The Engine class (every engine, existing or future) or one engine.
        self._listen(target, "do_connect", self._on_do_connect)
        if self.tracker.config.sql_comments:
            self._listen(target, "before_cursor_execute", self._add_comment, retval=True)

    def _patch_raw_connection(self) -> None:
        # Every Connection (sync or async) takes its DBAPI connection through
        # Engine.raw_connection: the one place that knows both the engine and its pool
        # before the pool's first checkout, also after engine.dispose() made a new pool.
        integration = self
        token = self._token
        original = Engine.raw_connection

        @wraps(original)
        def raw_connection(engine: Any, *args: Any, **kwargs: Any) -> Any:
            mark = engine.pool.__dict__.get(_MARK)
            if mark is None or mark[0] is not token:
                integration.first_sight(engine)
            return original(engine, *args, **kwargs)

        self.patcher.patch(Engine, "raw_connection", raw_connection)

    def first_sight(self, engine: Any) -> None:
        """An engine's pool is seen for the first time: mark it tracked (with its name) or
        not, and follow the engine's transactions where the driver needs it."""
        with guard(), self._lock:
            pool = engine.pool
            mark = pool.__dict__.get(_MARK)
            if mark is not None and mark[0] is self._token:
                return  # another thread was first
            name = None
            try:
                engine = _root(engine)
                if engine.dialect.name == "postgresql" and (
                    self.global_hooks or engine in self._engines
                ):
                    name = self._engine_name(engine)
            finally:  # on an internal error: not tracked, and not looked at again
                pool.__dict__[_MARK] = (self._token, name)
            telemetry = self.tracker.telemetry
            if name is not None and telemetry is not None and telemetry.metrics_on:
                telemetry.register_pool(name, pool, self.pool_stats)

    def _engine_name(self, engine: Any) -> str:
        # The engine's pool name, unique among the live engines (OpenTelemetry's
        # db.client.connection.pool.name must tell pools apart): a second engine to the
        # same URL is "...#2". Its transaction listeners are added once per installation.
        mark = engine.__dict__.get(_MARK)
        if mark is not None and mark[0] is self._token:
            return str(mark[1])
        base = name = pool_name(engine)
        number = 1
        while (other := self._names.get(name)) is not None and other is not engine:
            number += 1
            name = f"{base}#{number}"
        if engine.dialect.driver not in _FOLLOWED_BY_PSYCOPG:
            self._hook_transactions(engine)
        self._names[name] = engine
        engine.__dict__[_MARK] = (self._token, name)
        return name

    def _name_of(self, pool: Any) -> str | None:
        """The name of a pool this installation tracks; ``None`` for any other pool."""
        mark = pool.__dict__.get(_MARK) if pool is not None else None
        return mark[1] if mark is not None and mark[0] is self._token else None

    def _patch_pool_connect(self) -> None:
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
        """The wait is over: record its time or the timeout, and a new connection's
        create time."""
        with guard():
            self.waiting[pool] = max(0, self.waiting.get(pool, 1) - 1)
            name = self._name_of(pool)
            if name is None:
                return
            telemetry = self.tracker.telemetry
            if fairy is None:
                if timed_out:
                    telemetry.waited(name, monotonic() - started, timed_out=True)
                return
            telemetry.waited(name, monotonic() - started, timed_out=False)
            created = fairy.info.pop(_CREATED, None)
            if isinstance(created, tuple):  # this checkout opened the connection
                telemetry.created(name, created[0])

    # -- pool events ----------------------------------------------------------------------

    def _on_do_connect(self, dialect: Any, conn_rec: Any, cargs: Any, cparams: Any) -> None:
        if dialect.name != "postgresql":
            return
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
            info = connection_record.info
            started = info.get(_CREATED)
            if not isinstance(started, float):
                return  # not a connection do_connect saw: not PostgreSQL, or not ours
            info[_CREATED] = (monotonic() - started,)  # reported at the end of Pool.connect
            self._remember(dbapi_connection, info)

    def _remember(self, dbapi_connection: Any, info: dict[str, Any]) -> None:
        pid = info[_PID] = backend_pid(dbapi_connection)
        info[_APP] = application_name_of(dbapi_connection)
        self.tracker.connected(pid, dbapi_connection)

    def _on_checkout(self, dbapi_connection: Any, connection_record: Any, proxy: Any) -> None:
        try:
            # _ConnectionFairy._pool: no public way from a checkout to its pool
            name = self._name_of(getattr(proxy, "_pool", None))
            if name is None:
                return
            info = connection_record.info
            if _PID not in info:  # opened before install() or instrument_engine()
                self._remember(dbapi_connection, info)
            rec = self.tracker.begin(
                proxy,
                INTEGRATION,
                name,
                backend_pid=info[_PID],
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
            try:
                self._retag(dbapi_connection, info, rec)
            except exc.DisconnectionError:
                # The connection died under our SET: SQLAlchemy replaces it and checks
                # out again (as pool_pre_ping would); this checkout is not the user's.
                connection_record.record_info.pop(_REC, None)
                self.tracker.end(rec)
                raise
            except Exception as error:
                # The server refusing our SET is not a bug of ours (one warning line).
                if is_operational(error):
                    record_operational_error("retag_on_checkout SET application_name", error)
                else:
                    record_internal_error(error)

    def _on_checkin(self, dbapi_connection: Any, connection_record: Any) -> None:
        try:
            rec = connection_record.record_info.pop(_REC, None) if connection_record else None
            if rec is None:
                return
            if dbapi_connection is not None:
                driver = _driver(dbapi_connection)
                if hasattr(driver, "__dict__"):
                    driver.__dict__.pop(CHECKOUT_ATTR, None)
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

    # -- connection events ----------------------------------------------------------------

    def _hook_transactions(self, engine: Any) -> None:
        # psycopg2 and asyncpg: after each statement and at commit/rollback, read the
        # driver's own transaction state (no I/O). SQLAlchemy's begin event is not used:
        # it fires under AUTOCOMMIT too, and 1.4's legacy Connection opens transactions
        # without it.
        self._listen(engine, "commit", self._on_end_transaction)
        self._listen(engine, "rollback", self._on_end_transaction)
        self._listen(engine, "before_cursor_execute", self._on_statement)
        self._listen(engine, "after_cursor_execute", self._on_execute)
        self._listen(engine, "handle_error", self._on_error)

    # Each listener is guarded on its own: an error of ours never reaches SQLAlchemy, which
    # would raise it instead of the statement's result (or of the user's own exception).

    def _on_statement(self, conn: Any, *_: Any) -> None:
        # A statement runs: however long it takes, the transaction is not idle.
        with guard():
            _follow(conn, TX_ACTIVE)

    def _on_execute(self, conn: Any, *_: Any) -> None:
        with guard():
            _follow(conn)

    def _on_end_transaction(self, conn: Any) -> None:
        # Fired before the COMMIT/ROLLBACK is sent: after it, no transaction is open (a
        # failed COMMIT ends the transaction too).
        with guard():
            _follow(conn, TX_IDLE)

    def _on_error(self, context: Any) -> None:
        with guard():
            conn = context.connection
            if conn is not None:
                _follow(conn, failed=True)

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

    def _retag(self, dbapi_connection: Any, info: dict[str, Any], rec: Checkout) -> None:
        site = callsite_of(rec.stack)
        service = tagging.parse(rec.application_name or "")
        tag = tagging.build(
            service.service if service else (rec.service or tagging.default_service()),
            os.getpid(),
            site.file,
            site.line,
        )
        if info.get(_APP) == tag:
            return  # only send when the tag changed
        driver = _driver(dbapi_connection)
        if _has_unread_input(driver):
            # The server spoke unasked, most often to say it is closing this connection:
            # the user's own statement must be the one to find out, as without us.
            return
        sql = f"SET application_name = '{tag}'"  # tag chars are [A-Za-z0-9._:/@-] only
        try:
            if not _send_outside_transaction(dbapi_connection, driver, sql):
                return
        except Exception as error:
            if _is_closed(driver):
                raise exc.DisconnectionError(
                    "pgleakguard: the connection was closed during retag_on_checkout"
                ) from error
            raise
        info[_APP] = rec.application_name = tag

    def explain_timeout(self, error: BaseException, pool: Any) -> None:
        """Append the pool's holders to the TimeoutError's own text, in place (type, code
        3o7r and the original message are kept)."""
        try:
            name = self._name_of(pool)
            if name is None:
                return
            holders = [
                r
                for r in self.tracker.registry.snapshot()
                if r.integration == INTEGRATION and not r.closed and _pool_of(r) is pool
            ]
            text = str(error.args[0]) if error.args else ""
            # SQLAlchemy appends its "(Background on this error ...)" link: own line for it.
            # SQLAlchemy returns a garbage-collected connection to its pool: no slot is
            # lost, so collected checkouts are not listed (they were reported as leaks).
            summary = describe_holders(holders, name)
            error.args = (f"{text}\n{summary}\n", *error.args[1:])
        except Exception as err:
            record_internal_error(err)


def _root(engine: Any) -> Any:
    """The engine an ``execution_options()`` copy was made from (they share a pool)."""
    while isinstance(getattr(engine, "_proxied", None), Engine):
        engine = engine._proxied
    return engine


def _checkout_of(conn: Any) -> Checkout | None:
    """The open checkout behind a SQLAlchemy Connection, if we track it."""
    # Connection._dbapi_connection: the public Connection.connection would reconnect.
    fairy = getattr(conn, "_dbapi_connection", None)
    if fairy is None or not fairy.is_valid:
        return None
    record_info = fairy.record_info  # None once detached from its pool
    return record_info.get(_REC) if record_info is not None else None


def _pool_of(rec: Checkout) -> Any:
    ref = rec.conn_ref
    fairy = ref() if ref is not None else None
    return getattr(fairy, "_pool", None)


def _follow(conn: Any, status: int | None = None, failed: bool = False) -> None:
    """Record activity on ``conn`` and its transaction state: ``status``, else the
    driver's own (read without I/O)."""
    rec = _checkout_of(conn)
    if rec is None:
        return
    rec.last_activity = monotonic()
    if status is None:
        status = transaction_status(conn._dbapi_connection.dbapi_connection)
        if failed and status == TX_INTRANS:  # asyncpg says only "in a transaction"
            status = TX_INERROR
    rec.tx_status = status


def _has_unread_input(driver: Any) -> bool:
    """Whether the server sent something not read yet, or the connection is closed (no
    I/O: a zero-timeout poll of its socket)."""
    if _is_closed(driver):
        return True
    if callable(getattr(driver, "fileno", None)):  # psycopg2, psycopg 3
        fd = driver.fileno()
    else:  # asyncpg: the socket its event loop reads (asyncpg has no public accessor)
        transport = getattr(driver, "_transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return False
        fd = sock.fileno()
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])  # pragma: no cover - Windows


def _is_closed(driver: Any) -> bool:
    if callable(getattr(driver, "is_closed", None)):  # asyncpg
        return bool(driver.is_closed())
    return bool(driver.closed)  # psycopg2 (an int), psycopg 3


def _send_outside_transaction(dbapi_connection: Any, driver: Any, sql: str) -> bool:
    """Run ``sql`` in autocommit if no transaction is open; False if one is (not sent)."""
    if transaction_status(dbapi_connection) != TX_IDLE:
        return False  # never open a transaction, never run inside a failed one
    if callable(getattr(driver, "is_in_transaction", None)):  # asyncpg: no implicit BEGIN
        dbapi_connection.run_async(lambda c: c.execute(sql))
    elif hasattr(dbapi_connection, "run_async"):  # psycopg AsyncConnection

        async def send(c: Any) -> None:
            before = c.autocommit
            await c.set_autocommit(True)
            try:
                await c.execute(sql)
            finally:
                if not c.closed:
                    await c.set_autocommit(before)

        dbapi_connection.run_async(send)
    else:  # psycopg2, psycopg 3
        before = driver.autocommit
        driver.autocommit = True
        try:
            cursor = driver.cursor()
            try:
                cursor.execute(sql)
            finally:
                cursor.close()
        finally:
            if not driver.closed:  # a dead connection refuses even this
                driver.autocommit = before
    return True
